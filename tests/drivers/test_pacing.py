"""Pacing (throttle / decimate) and looping around frame sources."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cemi_stream.errors import SourceError
from cemi_stream.frame import Frame, FrameMeta
from drivers import open_source
from drivers.base import FrameSource, SourceInfo
from drivers.pacing import PacedSource, parse_pace, wrap_pacing


class ListSource:
    """A replay (or live) source of ``count`` tiny frames; counts its opens."""

    def __init__(
        self, count: int, *, fps: float | None = None, live: bool = False, delay_s: float = 0.0
    ) -> None:
        self.uri = "test:list"
        self.count = count
        self.fps = fps
        self.live = live
        self.delay_s = delay_s
        self.opens = 0
        self.is_open = False
        self._index = 0

    @property
    def info(self) -> SourceInfo:
        return SourceInfo(kind="test", fps=self.fps, live=self.live, frame_count=self.count)

    def open(self) -> None:
        self.opens += 1
        self.is_open = True
        self._index = 0

    def read(self) -> Frame | None:
        if self._index >= self.count:
            return None
        if self.delay_s:
            time.sleep(self.delay_s)
        frame = Frame(
            np.full((2, 2), self._index, np.uint8), FrameMeta(self._index, time.time_ns())
        )
        self._index += 1
        return frame

    def close(self) -> None:
        self.is_open = False


class FakeClock:
    """Monotonic clock advanced by ``sleep`` and by simulated work."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def read_n(source: FrameSource, n: int) -> list[Frame]:
    frames = []
    for _ in range(n):
        frame = source.read()
        if frame is None:
            break
        frames.append(frame)
    return frames


@pytest.mark.parametrize("bad", ["fast", "0", "-2", "nan", "inf", ""])
def test_invalid_pace_names_the_value(bad: str) -> None:
    with pytest.raises(SourceError, match=f"pace '{bad}'"):
        parse_pace(bad)


def test_parse_pace_values() -> None:
    assert parse_pace(None) is None
    assert parse_pace("Native") == "native"
    assert parse_pace(" max ") == "max"
    assert parse_pace("12.5") == 12.5


@pytest.mark.parametrize("pace", [None, "max"])
def test_nothing_to_do_returns_the_source(pace: str | None) -> None:
    source = ListSource(3)
    assert wrap_pacing(source, pace, loop=False) is source


def test_wrapper_forwards_uri_and_info() -> None:
    inner = ListSource(3, fps=5.0)
    paced = wrap_pacing(inner, "native", loop=False)
    assert isinstance(paced, PacedSource)
    assert isinstance(paced, FrameSource)
    paced.open()
    assert paced.uri == inner.uri
    assert paced.info == inner.info
    paced.close()
    paced.close()
    assert not inner.is_open


def test_schedule_has_no_drift_and_no_catch_up_burst() -> None:
    clock = FakeClock()
    paced = PacedSource(ListSource(20), 10.0, False, clock=clock, sleep=clock.sleep)
    paced.open()
    delivered = []
    for k in range(10):
        paced.read()
        delivered.append(clock.now)
        clock.now += 0.03 if k < 5 else 0.35  # consumer work; slower than 0.1 s from k=5
    steps = np.diff(delivered)
    # On time: exactly one period apart however long the work took (no drift).
    assert steps[:5] == pytest.approx([0.1] * 5)
    # Late consumer: each frame at once, never a burst of zero-wait frames.
    assert steps[5:] == pytest.approx([0.35] * 4)
    assert len(clock.sleeps) == 5


def test_numeric_pace_rate_on_real_clock() -> None:
    paced = wrap_pacing(ListSource(12), "40", loop=False)
    paced.open()
    start = time.monotonic()
    frames = read_n(paced, 100)
    elapsed = time.monotonic() - start
    assert len(frames) == 12
    # 12 frames at 40 frames/s: 11 periods of 25 ms.
    assert 0.26 <= elapsed < 0.40


def test_native_pace_uses_source_fps_and_skips_without_fps() -> None:
    paced = wrap_pacing(ListSource(6, fps=50.0), "native", loop=False)
    paced.open()
    start = time.monotonic()
    assert len(read_n(paced, 10)) == 6
    assert 0.09 <= time.monotonic() - start < 0.2
    unpaced = wrap_pacing(ListSource(6), "native", loop=False)
    unpaced.open()
    start = time.monotonic()
    assert len(read_n(unpaced, 10)) == 6
    assert time.monotonic() - start < 0.02


def test_live_source_is_decimated_not_slowed() -> None:
    inner = ListSource(1000, live=True, fps=200.0, delay_s=0.005)
    paced = wrap_pacing(inner, "50", loop=False)
    paced.open()
    start = time.monotonic()
    frames = read_n(paced, 8)
    elapsed = time.monotonic() - start
    indices = [f.meta.src_index for f in frames]
    assert 0.12 <= elapsed < 0.3
    # About 4 device frames per delivered one; the dropped ones leave gaps.
    assert indices[-1] >= 20
    assert all(b > a for a, b in itertools.pairwise(indices))
    # Every frame left out is counted (the capture records each as `decimated`).
    assert paced.decimated == indices[-1] + 1 - len(indices)


def test_fast_forward_hands_out_skipped_frames_unpaced() -> None:
    clock = FakeClock()
    paced = PacedSource(ListSource(6), 2.0, False, clock=clock, sleep=clock.sleep)
    paced.fast_forward(4)  # a resumed capture skips what it had spooled
    paced.open()
    assert [f.meta.src_index for f in read_n(paced, 4)] == [0, 1, 2, 3]
    assert clock.sleeps == []
    assert [f.meta.src_index for f in read_n(paced, 5)] == [4, 5]
    assert clock.sleeps == [pytest.approx(0.5)] * 2  # back on the schedule after them


def test_live_native_is_not_throttled() -> None:
    paced = wrap_pacing(ListSource(10, live=True, fps=2.0), "native", loop=False)
    paced.open()
    start = time.monotonic()
    assert len(read_n(paced, 20)) == 10
    assert time.monotonic() - start < 0.05


def test_loop_restarts_and_keeps_indices_increasing() -> None:
    inner = ListSource(3)
    paced = wrap_pacing(inner, None, loop=True)
    paced.open()
    frames = read_n(paced, 10)
    assert [f.meta.src_index for f in frames] == list(range(10))
    assert [int(f.image[0, 0]) for f in frames] == [0, 1, 2] * 3 + [0]
    assert inner.opens == 4


def test_loop_on_empty_source_ends() -> None:
    paced = wrap_pacing(ListSource(0), None, loop=True)
    paced.open()
    assert paced.read() is None


def test_loop_on_live_source_is_refused() -> None:
    inner = ListSource(3, live=True)
    paced = wrap_pacing(inner, None, loop=True)
    with pytest.raises(SourceError, match="loop is not possible on a live source"):
        paced.open()
    assert not inner.is_open


def test_loop_and_pace_through_open_source(tmp_path: Path) -> None:
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((4, 4), i, np.uint8))
    source = open_source(f"{tmp_path}?loop=1&pace=max")
    frames = read_n(source, 5)
    source.close()
    assert [f.meta.src_index for f in frames] == [0, 1, 2, 3, 4]
    assert [int(f.image[0, 0]) for f in frames] == [0, 1, 0, 1, 0]
    with pytest.raises(SourceError, match="pace 'turbo'"):
        open_source(f"{tmp_path}?pace=turbo")
