"""The live device: frames on the device's clock, losses in its ring buffer, counted exactly."""

from __future__ import annotations

import itertools
import time

import pytest

from cemi_stream.errors import SourceError
from drivers import open_source
from drivers.live import LiveDevice
from drivers.sim import SimConfig, SimSource

CONFIG = SimConfig(rows=1, frames_per_row=30, frame_width=64, frame_height=48, overlap=0.3)


def read_all(device: LiveDevice, pause_s: float) -> list[int]:
    device.open()
    try:
        indices = []
        while (frame := device.read()) is not None:
            indices.append(frame.meta.src_index)
            time.sleep(pause_s)
        return indices
    finally:
        device.close()


def test_a_reader_that_keeps_up_gets_every_frame_in_order() -> None:
    device = LiveDevice(SimSource(CONFIG), fps=200.0, buffer=4)
    assert device.info.live and device.info.frame_count is None and device.info.fps == 200.0
    assert read_all(device, 0.0) == list(range(30))
    assert (device.produced, device.dropped) == (30, 0)


def test_a_slow_reader_loses_the_oldest_frames_and_every_loss_is_a_gap() -> None:
    device = LiveDevice(SimSource(CONFIG), fps=200.0, buffer=2)
    indices = read_all(device, 0.03)  # reads at ~30 frames/s from a 200 frames/s device
    gaps = sum(b - a - 1 for a, b in itertools.pairwise(indices))
    assert device.produced == 30 and device.dropped > 10
    assert indices == sorted(set(indices)) and indices[-1] == 29
    assert gaps + indices[0] == device.dropped  # what the capture counts as overrun
    assert len(indices) + device.dropped == device.produced


def test_sim_live_option_and_bad_parameters() -> None:
    source = open_source("sim:?rows=1&frames_per_row=3&frame_size=64x48&live=25&live_buffer=3")
    assert isinstance(source, LiveDevice) and source.buffer == 3 and source.info.fps == 25.0
    assert isinstance(open_source("sim:?rows=1&frames_per_row=3"), SimSource)
    with pytest.raises(SourceError, match="live frame rate"):
        LiveDevice(SimSource(CONFIG), fps=0.0)
    with pytest.raises(SourceError, match="live buffer"):
        LiveDevice(SimSource(CONFIG), fps=10.0, buffer=0)
    with pytest.raises(SourceError, match="read before open"):
        LiveDevice(SimSource(CONFIG), fps=10.0).read()


def test_a_failing_device_fails_the_read() -> None:
    class Broken(SimSource):
        def read(self):  # type: ignore[no-untyped-def]
            if self._next >= 2:
                raise OSError("cable pulled")
            return super().read()

    device = LiveDevice(Broken(CONFIG), fps=500.0)
    device.open()
    try:
        assert device.read() is not None and device.read() is not None
        with pytest.raises(SourceError, match="cable pulled"):
            device.read()
    finally:
        device.close()
