"""A replay source turned into a live device: frames on the device's clock, a small ring buffer.

A frame grabber delivers frames at the instrument's rate whether or not
anyone reads them; it keeps the last few in a ring buffer, and a reader that
falls behind loses the oldest.  :class:`LiveDevice` does the same with any
replay source (the virtual SEM with ``sim:?live=FPS``): a grabber thread
reads the wrapped source on a fixed schedule (frame ``k`` due at
``t0 + k / fps``) into a ring of ``buffer`` frames.  When the ring is full,
the oldest frame is overwritten and counted in :attr:`LiveDevice.dropped`.

Each frame keeps the wrapped source's ``src_index`` (the device's frame
counter), so a reader sees every loss as a gap in the indices: that is how
the capture counts them (reason ``overrun``, one decision row per lost
frame), exactly, without asking the device.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

from cemi_stream.errors import SourceError
from cemi_stream.frame import Frame

from .base import FrameSource, SourceInfo

log = logging.getLogger(__name__)


class LiveDevice:
    """A live device made of a replay source.

    Parameters
    ----------
    source : FrameSource
        The wrapped (replay) source; opened and read by the grabber thread.
    fps : float
        Device frame rate, frames per second (> 0).
    buffer : int
        Frames the ring buffer holds (>= 1).

    Attributes
    ----------
    produced : int
        Frames the device has acquired so far.
    dropped : int
        Frames overwritten in the ring before they were read.
    """

    def __init__(self, source: FrameSource, fps: float, buffer: int = 4) -> None:
        if not fps > 0:
            raise SourceError(f"{source.uri}: live frame rate must be > 0, not {fps!r}")
        if buffer < 1:
            raise SourceError(f"{source.uri}: live buffer must hold >= 1 frame, not {buffer!r}")
        self.uri = source.uri
        self.source = source
        self.fps = float(fps)
        self.buffer = int(buffer)
        self.produced = 0
        self.dropped = 0
        self._ring: collections.deque[Frame] = collections.deque()
        self._cond = threading.Condition()
        self._ended = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def info(self) -> SourceInfo:
        """The wrapped source's properties, as a live source of unknown length."""
        return dataclasses.replace(self.source.info, live=True, fps=self.fps, frame_count=None)

    def open(self) -> None:
        """Open the wrapped source and start acquiring."""
        self.source.open()
        self._stop.clear()
        self._ended = False
        self._thread = threading.Thread(target=self._grab, name="live-device", daemon=True)
        self._thread.start()

    def _grab(self) -> None:
        period = 1.0 / self.fps
        t0 = time.monotonic()
        k = 0
        try:
            while not self._stop.is_set():
                # On the device's clock: frame k at t0 + k / fps, whatever the reader does.
                delay = t0 + k * period - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
                if delay < -period:
                    # Acquisition itself ran late (the simulator rendering slower than
                    # the rate): a device does not burst out old frames, it goes on.
                    t0 -= delay
                frame = self.source.read()
                if frame is None:
                    break
                k += 1
                with self._cond:
                    if len(self._ring) >= self.buffer:
                        self._ring.popleft()
                        self.dropped += 1
                    self._ring.append(frame)
                    self.produced += 1
                    self._cond.notify()
        except BaseException as exc:  # handed to the reader, which raises it
            self._error = exc
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def read(self) -> Frame | None:
        """The oldest frame in the ring (waiting for one), or None once the device ended.

        Raises
        ------
        SourceError
            When the wrapped source failed, or ``read`` comes before ``open``.
        """
        if self._thread is None:
            raise SourceError(f"{self.uri}: read before open")
        with self._cond:
            while not self._ring and not self._ended:
                self._cond.wait(0.5)
            if self._ring:
                return self._ring.popleft()
        if self._error is not None:
            err = self._error
            if isinstance(err, SourceError):
                raise err
            raise SourceError(f"{self.uri}: device failed: {err}") from err
        return None

    def close(self) -> None:
        """Stop acquiring and close the wrapped source (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        if self.produced:
            log.info(
                "%s: live device acquired %d frames, %d overwritten before they were read",
                self.uri, self.produced, self.dropped,
            )  # fmt: skip
        self.source.close()
