"""Frames for a downstream stage, in sequence order, from the bus or the spool.

A live stage takes frames from its bus pipe.  Whatever the bus cannot
give - frames delivered to a previous process of the stage that died, frames
sent before this one connected, or everything once the producer has
finished - is read from the producer's spool, which holds every frame it
ever published.  Either way the stage sees ``seq`` 0, 1, 2 ... without gaps.

A *frames folder* is where a producer keeps ``frames.zarr``, ``bus.json``
and, once it has finished, its summary: the run directory itself for the
capture (``capture.json``), ``RUN_DIR/denoised`` for the denoise stage
(``denoise.json``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..bus.auth import KeyPair
from ..bus.protocol import Kind
from ..bus.transport import FrameReceiver, read_endpoints
from ..capture.spool import ARRAY_NAME, SPOOL_DIR, SpoolReader, raw_chunks
from ..errors import BusError
from ..frame import Frame

log = logging.getLogger(__name__)

CAPTURE_SUMMARY = "capture.json"
DENOISE_SUMMARY = "denoise.json"
# Folder of a run directory holding the denoise stage's spool, bus and summary.
DENOISED_DIR = "denoised"
# Written by a producer only once every frame it will ever publish is in its spool.
COMPLETION_MARKERS = (CAPTURE_SUMMARY, DENOISE_SUMMARY)


def capture_finished(run_dir: Path) -> bool:
    """Whether the producer of the frames folder ``run_dir`` has finished.

    True once the capture (``capture.json``) or the denoise stage
    (``denoise.json``) has written its completion marker there.
    """
    return any((Path(run_dir) / name).is_file() for name in COMPLETION_MARKERS)


class FrameFeed:
    """The frames of a frames folder in sequence order, polled with a timeout.

    The non-blocking form of :func:`frames_in_order`, for stages that must
    act when frames stop arriving (the denoise stage flushes a partial batch).

    Parameters
    ----------
    run_dir : Path
        Frames folder: the run directory of the capture, or the output
        folder of another producer such as the denoise stage.
    start : int
        First sequence number wanted (a resumed stage skips what it has).
    pipe : str
        Bus pipe to consume while the producer is running.
    wait_s : float
        How long to wait for the producer to appear or to send anything
        (frames or heartbeats) before giving up with :class:`BusError`.
    curve : KeyPair or None
        This consumer's CURVE key pair, for a producer whose tcp bus is
        CURVE-secured (``server_key`` in its ``bus.json``).

    Attributes
    ----------
    next_seq : int
        Sequence number of the next frame :meth:`poll` returns.
    done : bool
        True once the producer's last frame has been returned.
    """

    def __init__(
        self,
        run_dir: Path,
        start: int = 0,
        pipe: str = "stitch",
        wait_s: float = 60.0,
        curve: KeyPair | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.curve = curve
        self.pipe = pipe
        self.wait_s = wait_s
        self.next_seq = start
        self.done = False
        self._spool: SpoolFrames | None = None
        self._receiver: FrameReceiver | None = None
        # Frames next_seq..fill_to-1 come from the spool before anything else.
        self._fill_to: int | None = None
        # After that fill the stream is over (end message, or producer finished).
        self._final = False
        # A bus frame that arrived ahead of a gap, served once the gap is filled.
        self._held: tuple[int, Frame] | None = None
        self._silent_since = time.monotonic()

    def poll(self, timeout_s: float) -> tuple[int, Frame] | None:
        """The next ``(seq, frame)``, or None when none comes within ``timeout_s``.

        Also None once :attr:`done`.  Frames already known (queued on the bus
        or due from the spool) are returned without waiting.

        Raises
        ------
        BusError
            When the producer does not appear, or sends nothing at all, for
            ``wait_s`` seconds.
        SpoolError
            When a frame due from the spool cannot be read.
        """
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while not self.done:
            item = self._from_backlog()
            if item is not None or self.done:
                return item
            receiver = self._receiver
            if receiver is None:
                if capture_finished(self.run_dir):
                    self._finish_from_spool(None)
                elif not self._try_connect():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    time.sleep(min(remaining, 0.05))
                continue
            wait_ms = max(int((deadline - time.monotonic()) * 1000), 0)
            message = receiver.recv(timeout_ms=wait_ms)
            if message is None:
                if capture_finished(self.run_dir):
                    # The producer is gone; whatever is left is on disk.
                    self._finish_from_spool(None)
                    continue
                if time.monotonic() - self._silent_since > self.wait_s:
                    raise BusError(
                        f"{self.run_dir}: no frames or heartbeats for {self.wait_s:.0f} s"
                    )
                return None
            self._silent_since = time.monotonic()
            if message.kind is Kind.HEARTBEAT:
                continue
            if message.kind is Kind.END:
                self._finish_from_spool(message.count)
                continue
            if message.seq < self.next_seq or message.frame is None:
                continue
            # The message buffer is reused by nothing, but copy: the stage keeps frames.
            item = (message.seq, Frame(message.frame.image.copy(), message.frame.meta))
            if message.seq > self.next_seq:
                log.info("frames %d..%d read from the spool", self.next_seq, message.seq - 1)
                self._fill_to = message.seq
                self._held = item
                continue
            self.next_seq = message.seq + 1
            return item
        return None

    def close(self) -> None:
        """Disconnect from the bus (the spool needs no closing)."""
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None

    def __enter__(self) -> FrameFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reader(self) -> SpoolFrames:
        if self._spool is None:
            self._spool = SpoolFrames(self.run_dir)
        return self._spool

    def _from_backlog(self) -> tuple[int, Frame] | None:
        """A frame due from the spool fill or held back, if any (may set :attr:`done`)."""
        if self._fill_to is not None:
            if self.next_seq < self._fill_to:
                seq = self.next_seq
                frame = self._reader().read(seq)
                self.next_seq += 1
                return seq, frame
            self._fill_to = None
            if self._final:
                self.done = True
                self.close()
                return None
        if self._held is not None:
            item, self._held = self._held, None
            self.next_seq = item[0] + 1
            return item
        return None

    def _finish_from_spool(self, upto: int | None) -> None:
        """End of stream: serve the rest (up to ``upto``, or all committed) from the spool."""
        self._final = True
        self._fill_to = self._reader().refresh() if upto is None else upto
        # Disconnecting now lets the producer's sender see that its end arrived.
        self.close()

    def _try_connect(self) -> bool:
        """Connect to the pipe once the producer has published its endpoints."""
        try:
            endpoints = read_endpoints(self.run_dir, timeout_s=0.0)
        except BusError:
            if time.monotonic() - self._silent_since > self.wait_s:
                raise
            return False
        if self.pipe not in endpoints.pipes:
            known = ", ".join(endpoints.pipes) or "none"
            raise BusError(
                f"{self.run_dir}: its producer has no pipe {self.pipe!r} (pipes: {known})"
            )
        curve: tuple[KeyPair, bytes] | None = None
        if endpoints.server_key is not None:
            if self.curve is None:
                raise BusError(
                    f"{self.run_dir}: the producer's bus requires CURVE authentication "
                    "and this stage has no key pair (set bus.curve_dir)"
                )
            curve = (self.curve, endpoints.server_key.encode("ascii"))
        self._receiver = FrameReceiver(endpoints.pipes[self.pipe], curve=curve)
        self._silent_since = time.monotonic()
        return True


class SpoolFrames:
    """Frames read back from a spool by sequence number, for the renderer.

    An uncompressed spool (the default) stores each frame as one raw chunk
    file, which is read directly: ~0.1 ms per 1024 x 768 frame against
    ~0.8 ms through zarr's asynchronous pipeline (2-core dev machine).  Any
    other layout, and a chunk file of unexpected size, goes through
    :class:`~cemi_stream.capture.spool.SpoolReader`.

    Parameters
    ----------
    frames_dir : Path
        Folder holding ``frames.zarr``.

    Raises
    ------
    SpoolError
        When there is no readable spool there.
    """

    def __init__(self, frames_dir: Path) -> None:
        self._reader = SpoolReader(frames_dir)
        self._shape = self._reader.frame_shape
        self._dir: Path | None = None
        self._meta: Any = None
        array_dir = Path(frames_dir) / SPOOL_DIR / ARRAY_NAME
        try:
            array: Any = zarr.open_array(str(array_dir), mode="r")
        except (OSError, ValueError, KeyError):
            return  # SpoolReader opened it: read through it
        if raw_chunks(array):
            self._dir, self._meta = array_dir, array.metadata

    def image(self, seq: int) -> np.ndarray:
        """Pixels of frame ``seq``, uint8 ``(y, x)``."""
        if self._dir is not None:
            try:
                data = np.fromfile(self._dir / self._meta.encode_chunk_key((seq, 0, 0)), np.uint8)
            except OSError:
                data = None  # not there yet as a file: let SpoolReader decide
            h, w = self._shape
            if data is not None and data.size == h * w:
                return data.reshape(h, w)
        return self._reader.image(seq)

    def read(self, seq: int) -> Frame:
        """Frame ``seq`` with its metadata (as :meth:`SpoolReader.read`)."""
        if seq >= len(self._reader):
            self._reader.refresh()
        if not 0 <= seq < len(self._reader):
            return self._reader.read(seq)  # raises SpoolError
        return Frame(self.image(seq), self._reader.meta(seq))

    def refresh(self) -> int:
        """Pick up newly committed frames; returns the frame count."""
        return self._reader.refresh()


def frames_in_order(
    run_dir: Path,
    start: int = 0,
    pipe: str = "stitch",
    wait_s: float = 60.0,
    curve: KeyPair | None = None,
) -> Iterator[tuple[int, Frame]]:
    """Yield ``(seq, frame)`` from ``start`` on, until the producer's last frame.

    A generator over :class:`FrameFeed` (see there for the parameters).

    Raises
    ------
    BusError
        When the producer does not appear, or sends nothing, for ``wait_s`` s.
    """
    feed = FrameFeed(run_dir, start, pipe, wait_s, curve)
    try:
        while not feed.done:
            item = feed.poll(0.5)
            if item is not None:
                yield item
    finally:
        feed.close()
