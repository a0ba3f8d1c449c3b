"""Frame-rate pacing and looping around any frame source.

``pace`` says how fast frames are handed out:

* ``native`` - at the source's own frame rate (``info.fps``); sources without
  one are not throttled, and live sources are never throttled because they
  already deliver at the rate of the hardware;
* ``max`` - as fast as the consumer reads;
* a number - that many frames per second.  Replay sources are slowed down to
  it; a live source is decimated instead (frames arriving before their slot
  are dropped), since sleeping would only let the device's buffer fill up.

The default (``pace=None``) is ``native`` for live sources and ``max`` for
replay, which means no throttling either way.  The schedule uses the monotonic
clock: slot ``k`` is due at ``t0 + k / rate``, so timing errors do not
accumulate; a consumer that falls behind restarts the schedule from now rather
than receiving a burst of frames to catch up.

``loop`` restarts a replay source at its end (``close`` then ``open``), with
``src_index`` increasing monotonically across passes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from cemi_stream.errors import SourceError
from cemi_stream.frame import Frame

from .base import FrameSource, SourceInfo

log = logging.getLogger(__name__)


def parse_pace(pace: str | None) -> float | str | None:
    """Validate a pace value.

    Returns
    -------
    float, ``"native"``, ``"max"`` or None
        A rate in frames per second, one of the two keywords, or None for
        the default.

    Raises
    ------
    SourceError
        Naming the value when it is neither keyword nor a positive number.
    """
    if pace is None:
        return None
    text = pace.strip().lower()
    if text in ("native", "max"):
        return text
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise SourceError(
            f"pace {pace!r}: expected 'native', 'max' or a positive number of frames/s"
        )
    return rate


def wrap_pacing(source: FrameSource, pace: str | None, loop: bool) -> FrameSource:
    """Apply pacing and looping to a (not yet opened) source.

    Parameters
    ----------
    source : FrameSource
        The driver's source; it is opened through the returned object.
    pace : str or None
        ``"native"``, ``"max"``, a rate in frames/s, or None for the default.
    loop : bool
        Restart the source at its end (replay sources only).

    Returns
    -------
    FrameSource
        ``source`` itself when nothing is to be done, else a
        :class:`PacedSource` wrapping it.

    Raises
    ------
    SourceError
        When ``pace`` is invalid.  Looping a live source is refused by
        :meth:`PacedSource.open`, once the source knows it is live.
    """
    mode = parse_pace(pace)
    if not loop and mode in (None, "max"):
        return source
    return PacedSource(source, mode, loop)


class PacedSource:
    """A frame source that throttles and/or loops another one.

    Parameters
    ----------
    source : FrameSource
        The wrapped source.
    mode : float, ``"native"``, ``"max"`` or None
        As returned by :func:`parse_pace`.
    loop : bool
        Restart the source at its end.
    clock, sleep : callable
        Monotonic clock in seconds and sleep function (replaceable in tests).

    Attributes
    ----------
    decimated : int
        Frames of a live source left out because they came before their slot.
    """

    def __init__(
        self,
        source: FrameSource,
        mode: float | str | None,
        loop: bool,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.uri = source.uri
        self.source = source
        self._mode = mode
        self._loop = loop
        self._clock = clock
        self._sleep = sleep
        self._period: float | None = None
        self._next_due: float | None = None
        self._offset = 0
        self._last_index = -1
        self._pass_frames = 0
        # Frames of a live source left out to keep to the pace (counted by the capture).
        self.decimated = 0
        self._unpaced = 0

    @property
    def info(self) -> SourceInfo:
        """The wrapped source's properties."""
        return self.source.info

    @property
    def period_s(self) -> float | None:
        """Seconds between frames as throttled, or None when not throttled."""
        return self._period

    def open(self) -> None:
        """Open the wrapped source and work out the frame period.

        Raises
        ------
        SourceError
            When the source fails to open, or ``loop`` is asked of a live source.
        """
        self.source.open()
        info = self.source.info
        if self._loop and info.live:
            self.source.close()
            raise SourceError(f"{self.uri}: loop is not possible on a live source")
        rate: float | None = None
        if isinstance(self._mode, float):
            rate = self._mode
        elif self._mode == "native" and not info.live:
            rate = info.fps
        self._period = 1.0 / rate if rate else None
        self._next_due = None
        self._offset = 0
        self._last_index = -1
        self._pass_frames = 0
        log.debug("%s: period %s s, loop %s", self.uri, self._period, self._loop)

    def fast_forward(self, frames: int) -> None:
        """Hand out the next ``frames`` frames of a replay source at once, unpaced.

        A resumed capture reads a recorded source again up to where its spool
        ends, only to skip those frames.  Ignored for live sources.
        """
        self._unpaced = max(int(frames), 0)

    def read(self) -> Frame | None:
        """Next frame, on schedule; None at the end (never, when looping)."""
        if self._unpaced > 0 and not self.source.info.live:
            self._unpaced -= 1
            return self._read_looping()
        if self._period is not None and self.source.info.live:
            return self._read_decimated(self._period)
        if self._period is not None:
            self._wait_for_slot(self._period)
        return self._read_looping()

    def close(self) -> None:
        """Close the wrapped source (idempotent)."""
        self.source.close()

    def _wait_for_slot(self, period: float) -> None:
        now = self._clock()
        if self._next_due is None or now > self._next_due:
            # First frame, or the consumer fell behind: start the schedule
            # afresh from now instead of bursting to catch up.
            self._next_due = now + period
            return
        self._sleep(self._next_due - now)
        self._next_due += period

    def _read_decimated(self, period: float) -> Frame | None:
        while True:
            frame = self.source.read()
            if frame is None:
                return None
            now = self._clock()
            if self._next_due is None or now >= self._next_due:
                # Keep the schedule anchored unless we are a whole period late.
                if self._next_due is None or now - self._next_due > period:
                    self._next_due = now + period
                else:
                    self._next_due += period
                return frame
            self.decimated += 1

    def _read_looping(self) -> Frame | None:
        frame = self.source.read()
        if frame is None and self._loop and self._pass_frames > 0:
            log.info("%s: end of pass, looping", self.uri)
            self.source.close()
            self.source.open()
            self._offset = self._last_index + 1
            self._pass_frames = 0
            frame = self.source.read()
        if frame is None:
            return None
        self._pass_frames += 1
        if self._offset:
            frame.meta = frame.meta.with_updates(src_index=self._offset + frame.meta.src_index)
        self._last_index = frame.meta.src_index
        return frame
