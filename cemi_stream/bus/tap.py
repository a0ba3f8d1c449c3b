"""A minimal consumer: receive a run's frames and report what arrived.

Used by the demo, the tests and anyone checking a live capture from a shell
(``run_daemon.py tap --run-dir DIR``).  It validates every message exactly as
a real stage would and counts lost, duplicated and rejected messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BusError
from .protocol import Kind, Message
from .transport import MONITOR, FrameReceiver, read_endpoints

log = logging.getLogger(__name__)


def tap(
    run_dir: Path,
    pipe: str = "stitch",
    timeout_s: float = 30.0,
    stop: threading.Event | None = None,
    on_frame: Callable[[Message], None] | None = None,
) -> dict[str, Any]:
    """Consume ``pipe`` of the capture running in ``run_dir`` until its end.

    Parameters
    ----------
    run_dir : Path
        Run directory of the capture (its ``bus.json`` names the endpoints).
    pipe : str
        Durable pipe name, or ``"monitor"`` for the lossy PUB stream.
    timeout_s : float
        Give up after this many seconds without any message (heartbeats
        count), or without ``bus.json`` appearing.
    stop : threading.Event or None
        Set to stop early.
    on_frame : callable or None
        Called with every frame message (zero-copy view; copy to keep).

    Returns
    -------
    dict
        ``frames``, ``missing``, ``duplicates``, ``rejected``, ``heartbeats``,
        ``ended``, ``end_count``, ``seconds``, ``frames_per_s``, ``megabytes_per_s``,
        ``first_seq``, ``last_seq``, ``shape``.
    """
    endpoints = read_endpoints(Path(run_dir), timeout_s=timeout_s)
    if pipe == MONITOR:
        if endpoints.monitor is None:
            raise BusError(f"{run_dir}: this capture has no monitor stream")
        receiver = FrameReceiver(endpoints.monitor, mode="sub")
    else:
        if pipe not in endpoints.pipes:
            known = ", ".join(endpoints.pipes) or "none"
            raise BusError(f"{run_dir}: no pipe named {pipe!r} (pipes: {known})")
        receiver = FrameReceiver(endpoints.pipes[pipe], mode="pull")
    first_seq: int | None = None
    last_seq: int | None = None
    shape: list[int] | None = None
    nbytes = 0
    start: float | None = None
    try:
        while stop is None or not stop.is_set():
            message = receiver.recv(timeout_ms=int(timeout_s * 1000))
            if message is None:
                log.warning("%s: no message for %.0f s, giving up", pipe, timeout_s)
                break
            if message.kind is Kind.FRAME and message.frame is not None:
                start = start or time.monotonic()
                first_seq = message.seq if first_seq is None else first_seq
                last_seq = message.seq
                shape = list(message.frame.image.shape)
                nbytes += message.frame.image.nbytes
                if on_frame is not None:
                    on_frame(message)
            elif message.kind is Kind.END:
                break
        seconds = time.monotonic() - start if start is not None else 0.0
        stats = receiver.stats
        return {
            "pipe": pipe,
            "frames": stats.frames,
            "missing": stats.missing,
            "duplicates": stats.duplicates,
            "rejected": dict(stats.rejected),
            "heartbeats": stats.heartbeats,
            "ended": receiver.ended,
            "end_count": receiver.end_count,
            "seconds": round(seconds, 3),
            "frames_per_s": round(stats.frames / seconds, 1) if seconds > 0 else None,
            "megabytes_per_s": round(nbytes / seconds / 1e6, 1) if seconds > 0 else None,
            "first_seq": first_seq,
            "last_seq": last_seq,
            "shape": shape,
        }
    finally:
        receiver.close()
