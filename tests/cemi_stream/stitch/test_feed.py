"""The frame feed of downstream stages: bus + spool, blocking and polled."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import zmq

from cemi_stream.bus.transport import FrameLog, PipeSender, make_endpoints, write_endpoints
from cemi_stream.capture.spool import FrameSpool, SpoolReader
from cemi_stream.config import BusConfig, SpoolConfig
from cemi_stream.errors import SpoolError
from cemi_stream.frame import Frame, FrameMeta
from cemi_stream.stitch.feed import (
    FrameFeed,
    SpoolFrames,
    capture_finished,
    frames_in_order,
)


def _frame(i: int) -> Frame:
    image = np.random.default_rng(i).integers(0, 256, (32, 48), dtype=np.uint8)
    return Frame(image, FrameMeta(src_index=10 + i, capture_time_ns=i, row=0))


def test_finished_producer_is_read_from_its_spool(tmp_path: Path) -> None:
    """A folder whose producer wrote ``denoise.json`` is complete: no bus needed."""
    spool = FrameSpool.create(tmp_path, (32, 48), SpoolConfig())
    for i in range(3):
        spool.append(_frame(i))
    spool.close()
    assert not capture_finished(tmp_path)
    (tmp_path / "denoise.json").write_text("{}")
    assert capture_finished(tmp_path)
    got = list(frames_in_order(tmp_path, start=1, wait_s=1))
    assert [seq for seq, _ in got] == [1, 2]
    assert np.array_equal(got[1][1].image, _frame(2).image) and got[1][1].meta.src_index == 12


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_spool_frames_read_what_the_spool_reader_reads(
    tmp_path: Path, compression: Literal["none", "lz4"]
) -> None:
    """Raw chunk files are read directly, compressed ones through zarr: the same frames."""
    spool = FrameSpool.create(tmp_path, (32, 48), SpoolConfig(compression=compression))
    for i in range(3):
        spool.append(_frame(i))
    frames = SpoolFrames(tmp_path)
    reader = SpoolReader(tmp_path)
    for i in range(3):
        got = frames.read(i)
        assert np.array_equal(got.image, reader.image(i))
        assert np.array_equal(frames.image(i), _frame(i).image)
        assert got.meta == reader.meta(i)
    spool.append(_frame(3))  # committed after the reader opened
    assert np.array_equal(frames.read(3).image, _frame(3).image)
    spool.close()
    with pytest.raises(SpoolError):
        frames.read(4)


def test_poll_returns_when_nothing_arrives(tmp_path: Path) -> None:
    """``poll`` gives up after its timeout while the producer is live, then delivers in order."""
    config = BusConfig(pipes=["stitch"], monitor=False, drain_timeout_s=5.0)
    spool = FrameSpool.create(tmp_path, (32, 48), SpoolConfig())
    log = FrameLog(16)
    context: zmq.Context[Any] = zmq.Context()
    endpoints = make_endpoints(config, tmp_path)
    sender = PipeSender("stitch", endpoints.pipes["stitch"], log, "run", config, context)
    sender.start()
    sender.wait_bound()
    write_endpoints(tmp_path, endpoints)
    try:
        with FrameFeed(tmp_path, wait_s=10) as feed:
            t0 = time.monotonic()
            assert feed.poll(0.3) is None
            assert 0.25 <= time.monotonic() - t0 < 2.0
            for i in range(3):
                spool.append(_frame(i))  # on disk first, then published, as the producers do
                log.append(_frame(i))
            got = [feed.poll(5.0) for _ in range(3)]
            assert [item[0] for item in got if item is not None] == [0, 1, 2]
            spool.close()
            log.finish()
            assert feed.poll(5.0) is None and feed.done
    finally:
        sender.join(10)
        context.term()
    assert sender.stats.ended and sender.stats.sent == 3
