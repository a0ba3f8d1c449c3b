"""Frames for the stitch stage, in sequence order, from the bus or the spool.

A live stitcher takes frames from its bus pipe.  Whatever the bus cannot
give - frames delivered to a previous stitcher process that died, frames
sent before this one connected, or everything once the capture has
finished - is read from the raw spool, which holds every frame the capture
ever published.  Either way the stage sees ``seq`` 0, 1, 2 ... without gaps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

from ..bus import FrameReceiver, read_endpoints
from ..errors import BusError
from ..frame import Frame
from ..protocol import Kind
from ..spool import SpoolReader

log = logging.getLogger(__name__)

CAPTURE_SUMMARY = "capture.json"


def capture_finished(run_dir: Path) -> bool:
    """Whether the capture process of ``run_dir`` has written its summary."""
    return (Path(run_dir) / CAPTURE_SUMMARY).is_file()


def frames_in_order(
    run_dir: Path,
    start: int = 0,
    pipe: str = "stitch",
    wait_s: float = 60.0,
) -> Iterator[tuple[int, Frame]]:
    """Yield ``(seq, frame)`` from ``start`` on, until the run's last frame.

    Parameters
    ----------
    run_dir : Path
        Run directory of the capture.
    start : int
        First sequence number wanted (a resumed stitcher skips what it has).
    pipe : str
        Bus pipe to consume while the capture is running.
    wait_s : float
        How long to wait for the capture to appear or to send anything
        before giving up with :class:`BusError`.
    """
    run_dir = Path(run_dir)
    spool: SpoolReader | None = None
    nxt = start

    def from_spool(upto: int | None) -> Iterator[tuple[int, Frame]]:
        nonlocal spool, nxt
        if spool is None:
            spool = SpoolReader(run_dir)
        end = spool.refresh() if upto is None else upto
        while nxt < end:
            yield nxt, spool.read(nxt)
            nxt += 1

    if capture_finished(run_dir):
        yield from from_spool(None)
        return
    receiver = _connect(run_dir, pipe, wait_s)
    try:
        silent_since = time.monotonic()
        while True:
            message = receiver.recv(timeout_ms=500)
            if message is None:
                if capture_finished(run_dir):
                    # The capture is gone; whatever is left is on disk.
                    yield from from_spool(None)
                    return
                if time.monotonic() - silent_since > wait_s:
                    raise BusError(f"{run_dir}: no frames or heartbeats for {wait_s:.0f} s")
                continue
            silent_since = time.monotonic()
            if message.kind is Kind.HEARTBEAT:
                continue
            if message.kind is Kind.END:
                yield from from_spool(message.count)
                return
            if message.seq < nxt or message.frame is None:
                continue
            if message.seq > nxt:
                log.info("frames %d..%d read from the spool", nxt, message.seq - 1)
                yield from from_spool(message.seq)
            # The message buffer is reused by nothing, but copy: the stage keeps frames.
            yield message.seq, Frame(message.frame.image.copy(), message.frame.meta)
            nxt = message.seq + 1
    finally:
        receiver.close()


def _connect(run_dir: Path, pipe: str, wait_s: float) -> FrameReceiver:
    endpoints = read_endpoints(run_dir, timeout_s=wait_s)
    if pipe not in endpoints.pipes:
        known = ", ".join(endpoints.pipes) or "none"
        raise BusError(f"{run_dir}: the capture has no pipe {pipe!r} (pipes: {known})")
    return FrameReceiver(endpoints.pipes[pipe])
