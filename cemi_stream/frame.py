"""The frame record every stage passes around.

A frame is a 2-D ``uint8`` image with axes ``(y, x)`` plus :class:`FrameMeta`.
Sources convert whatever they read (16-bit, RGB) to this form, so downstream
code only ever sees 8-bit greyscale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np


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
    """A 2-D ``uint8`` image ``(y, x)`` and its metadata."""

    image: np.ndarray
    meta: FrameMeta

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape as ``(height, width)`` in pixels."""
        h, w = self.image.shape[:2]
        return int(h), int(w)
