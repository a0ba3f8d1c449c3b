"""The frame record every stage passes around.

A frame is a 2-D greyscale image with axes ``(y, x)`` plus :class:`FrameMeta`.
Sources convert colour to grey but keep the depth they read (``uint8``,
``uint16``, ``float32`` ...); the capture front end maps deeper images to
``uint8`` with one grey-level window for the whole run
(:mod:`cemi_stream.capture.levels`), so every stage after it only sees 8-bit frames.

A source that cannot decode one frame (a truncated image in a folder, an
unreadable TIFF page) still hands out a frame for it: a *fault frame*, with an
empty image and :attr:`Frame.fault` set to the reason (:data:`CORRUPT`).  The
front end records it like any rejected frame, so ``src_index`` stays aligned
with the source, the frame is counted and logged, and the run goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

# Reason of a fault frame whose data could not be read or decoded.
CORRUPT = "corrupt"


def utc_now_ns() -> int:
    """Current UTC time as integer nanoseconds since the Unix epoch."""
    return time.time_ns()


@dataclass(frozen=True, slots=True)
class FrameMeta:
    """What is known about one frame besides its pixels.

    Attributes
    ----------
    src_index : int
        Index of the frame in its source (0-based, counts every frame the
        source produced, including ones later rejected).
    capture_time_ns : int
        Capture (or, for replay, read) time in UTC nanoseconds since the epoch.
    pixel_size_nm : float or None
        Physical size of one pixel in nanometres, when the source knows it.
    stage_x_um, stage_y_um : float or None
        Stage position in micrometres when the source reports one, in the
        source's own convention (FEI/Thermo TIFFs give the field centre with
        y pointing up; the simulator gives the commanded top-left corner).
        It may be off by stage jitter; only differences between frames of
        one source are meaningful.
    row : int or None
        Traversal row the frame belongs to, when the source knows it.
    """

    src_index: int
    capture_time_ns: int
    pixel_size_nm: float | None = None
    stage_x_um: float | None = None
    stage_y_um: float | None = None
    row: int | None = None

    def with_updates(self, **changes: object) -> FrameMeta:
        """Return a copy with some fields replaced."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(slots=True)
class Frame:
    """A 2-D greyscale image ``(y, x)`` and its metadata.

    Attributes
    ----------
    image : ndarray
        ``(y, x)``; ``uint8`` after the capture front end, the source's own
        depth before it; empty (``(0, 0)``) for a fault frame.
    meta : FrameMeta
        What is known about the frame.
    fault : str or None
        None for a normal frame; for a frame the source could not decode, the
        reason it is rejected with (:data:`CORRUPT`).
    """

    image: np.ndarray
    meta: FrameMeta
    fault: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape as ``(height, width)`` in pixels."""
        h, w = self.image.shape[:2]
        return int(h), int(w)


def fault_frame(meta: FrameMeta, reason: str = CORRUPT) -> Frame:
    """A placeholder for a frame the source could not decode.

    Parameters
    ----------
    meta : FrameMeta
        At least the frame's ``src_index`` and the time it was read.
    reason : str
        Why it has no pixels (default :data:`CORRUPT`).
    """
    return Frame(np.zeros((0, 0), np.uint8), meta, reason)
