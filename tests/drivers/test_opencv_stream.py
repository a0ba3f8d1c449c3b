"""The ``device`` and ``url`` drivers: options, failures, live-stream semantics."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from cemi_stream.errors import SourceError
from drivers import open_source
from drivers.opencv_stream import DeviceSource, StreamSource, has_gstreamer
from drivers.registry import parse_uri


class FakeCapture:
    """Stands in for ``cv2.VideoCapture``: delivers ``frames`` then fails."""

    def __init__(self, frames: list[np.ndarray], fps: float = 25.0) -> None:
        self.frames = list(frames)
        self.fps = fps
        self.calls: list[tuple[int, float]] = []
        self.released = False

    def isOpened(self) -> bool:  # noqa: N802 - mirrors cv2.VideoCapture
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        if not self.frames:
            return False, None
        return True, self.frames.pop(0)

    def get(self, prop: int) -> float:
        return {cv2.CAP_PROP_FPS: self.fps, cv2.CAP_PROP_FRAME_COUNT: -1.0}.get(prop, 0.0)

    def set(self, prop: int, value: float) -> bool:
        self.calls.append((prop, value))
        return True

    def release(self) -> None:
        self.released = True

    def getBackendName(self) -> str:  # noqa: N802 - mirrors cv2.VideoCapture
        return "FAKE"


def device(uri: str) -> DeviceSource:
    return DeviceSource(parse_uri(uri)[0])


def colour_frames(count: int) -> list[np.ndarray]:
    return [np.full((6, 8, 3), 10 * i, np.uint8) for i in range(count)]


def test_absent_device_path() -> None:
    with pytest.raises(SourceError, match=r"^device /dev/video99: not found$"):
        open_source("/dev/video99")


def test_absent_device_index() -> None:
    with pytest.raises(SourceError, match=r"^device 99: cannot be opened \(") as err:
        open_source("device:99")
    assert "\n" not in str(err.value)


def test_unknown_and_bad_options() -> None:
    with pytest.raises(
        SourceError, match=r"unknown option\(s\) colour, gain \(this source accepts"
    ):
        open_source("device:0?gain=2&colour=1&width=640")
    with pytest.raises(SourceError, match="bad value 'wide' for option width"):
        open_source("device:0?width=wide")
    with pytest.raises(SourceError, match="option fourcc"):
        open_source("device:0?fourcc=MJPEG")
    with pytest.raises(SourceError, match=r"unknown option\(s\) fps"):
        open_source("rtsp://127.0.0.1:1/x#fps=3")


def test_device_options_are_applied_fourcc_first(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCapture(colour_frames(2))
    monkeypatch.setattr(DeviceSource, "_create_capture", lambda self: fake)
    source = device("device:0?width=640&height=480&fps=30&fourcc=MJPG")
    source.open()
    assert fake.calls == [
        (cv2.CAP_PROP_FOURCC, float(cv2.VideoWriter.fourcc(*"MJPG"))),
        (cv2.CAP_PROP_FRAME_WIDTH, 640.0),
        (cv2.CAP_PROP_FRAME_HEIGHT, 480.0),
        (cv2.CAP_PROP_FPS, 30.0),
    ]
    info = source.info
    assert (info.kind, info.live, info.video_like) == ("device", True, True)
    assert (info.frame_size, info.fps, info.frame_count) == ((8, 6), 25.0, None)
    source.close()
    assert fake.released


def test_live_device_that_stops_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DeviceSource, "_create_capture", lambda self: FakeCapture(colour_frames(3)))
    source = device("device:2")
    source.open()
    frames = [source.read() for _ in range(3)]
    assert [f.meta.src_index for f in frames if f is not None] == [0, 1, 2]
    assert all(f is not None and f.image.shape == (6, 8) for f in frames)
    with pytest.raises(SourceError, match=r"^device 2: stopped delivering frames$"):
        source.read()
    source.close()


def test_device_without_frames_fails_at_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DeviceSource, "_create_capture", lambda self: FakeCapture([]))
    with pytest.raises(SourceError, match=r"device 1: cannot be opened \(no frame"):
        device("device:1").open()


def test_stream_that_ends_returns_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StreamSource, "_create_capture", lambda self: FakeCapture(colour_frames(2)))
    source = StreamSource(parse_uri("rtsp://cam.local/live")[0])
    source.open()
    assert source.info.live
    assert source.info.kind == "url"
    assert source.read() is not None
    assert source.read() is not None
    assert source.read() is None
    source.close()


def test_unreachable_rtsp_fails_fast() -> None:
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"rtsp://127\.0\.0\.1:1/x: cannot be opened") as err:
        open_source("rtsp://127.0.0.1:1/x#timeout_ms=2000")
    assert time.monotonic() - start < 5.0
    assert "\n" not in str(err.value)


def test_stream_password_is_not_shown() -> None:
    source = StreamSource(parse_uri("rtsp://admin:secret@127.0.0.1:1/x#timeout_ms=1000")[0])
    with pytest.raises(SourceError) as err:
        source.open()
    assert "secret" not in str(err.value)
    assert "admin:***@127.0.0.1" in str(err.value)


def test_bad_timeout_option() -> None:
    with pytest.raises(SourceError, match="bad value '-5' for option timeout_ms"):
        open_source("http://127.0.0.1:1/x#timeout_ms=-5")


@pytest.mark.skipif(has_gstreamer(), reason="this OpenCV build has GStreamer")
def test_gstreamer_missing_is_reported() -> None:
    with pytest.raises(SourceError, match="no GStreamer support"):
        open_source("gst:videotestsrc num-buffers=3 ! videoconvert ! appsink")
