"""The frame-source contract shared by every driver.

A driver is a small class satisfying :class:`FrameSource` plus one entry in
:mod:`drivers.registry`.  Sources always hand out :class:`cemi_stream.frame.Frame`
objects holding 2-D ``uint8`` images ``(y, x)``; :func:`to_gray8` is the one
place where 16-bit and colour input is converted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from cemi_stream.errors import SourceError
from cemi_stream.frame import Frame


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """Static properties of a source, as far as it knows them.

    Attributes
    ----------
    kind : str
        Registry name of the driver (``"video"``, ``"folder"``, ``"sim"`` ...).
    frame_size : tuple of int or None
        ``(width, height)`` in pixels of the frames as delivered (before any
        crop by the capture stage).
    fps : float or None
        Native frame rate in frames per second (video files, devices, sim video).
    pixel_size_nm : float or None
        Pixel size in nanometres when the source's metadata gives it.
    frame_count : int or None
        Number of frames when finite and known.
    live : bool
        True for sources that cannot be rewound (devices, network streams).
    video_like : bool
        True when consecutive frames overlap heavily (video), so keyframe
        selection is on by default; False for one-frame-per-field sources
        (image folders, TIFF stacks).
    """

    kind: str
    frame_size: tuple[int, int] | None = None
    fps: float | None = None
    pixel_size_nm: float | None = None
    frame_count: int | None = None
    live: bool = False
    video_like: bool = True


@runtime_checkable
class FrameSource(Protocol):
    """What every frame source provides.

    ``open`` acquires the resource (raising :class:`SourceError` with a
    one-line reason when it cannot), ``read`` returns the next frame or
    ``None`` at the end of the stream, ``close`` releases everything and may
    be called twice.
    """

    uri: str

    @property
    def info(self) -> SourceInfo:
        """Static properties of the source (valid after :meth:`open`)."""
        ...

    def open(self) -> None:
        """Acquire the underlying file or device."""
        ...

    def read(self) -> Frame | None:
        """Return the next frame, or ``None`` when the source has ended."""
        ...

    def close(self) -> None:
        """Release the underlying file or device (idempotent)."""
        ...


def to_gray8(
    image: np.ndarray,
    *,
    name: str = "frame",
    input_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Convert any decoded image to a C-contiguous 2-D ``uint8`` array ``(y, x)``.

    Parameters
    ----------
    image : ndarray
        ``(y, x)``, ``(y, x, 1)``, ``(y, x, 3)`` (BGR, as OpenCV decodes) or
        ``(y, x, 4)`` (BGRA); integer or float dtype.
    name : str
        Used in error messages.
    input_range : (low, high) or None
        Grey levels mapped linearly to 0 and 255.  ``None`` means the dtype's
        full range: ``uint16`` is divided by 257 so a fixed 16-bit scale never
        changes from frame to frame (per-frame stretching would make the
        brightness of overlapping frames disagree); floats are taken as 0..1.

    Returns
    -------
    ndarray
        ``uint8`` array of shape ``(y, x)``.

    Notes
    -----
    Colour frames whose channels are identical (the usual case for SEM frames
    saved as RGB) keep one channel exactly; otherwise ITU-R BT.601 luma is used,
    which also turns coloured UI overlays into grey levels that the border
    detector can strip.
    """
    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 1:
            image = image[:, :, 0]
        elif channels in (3, 4):
            bgr = image[:, :, :3]
            if np.array_equal(bgr[:, :, 0], bgr[:, :, 1]) and np.array_equal(
                bgr[:, :, 1], bgr[:, :, 2]
            ):
                image = bgr[:, :, 0]
            else:
                image = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2GRAY)
        else:
            raise SourceError(f"{name}: unsupported image with {channels} channels")
    elif image.ndim != 2:
        raise SourceError(f"{name}: unsupported image with {image.ndim} dimensions")

    if image.dtype == np.uint8 and input_range is None:
        return np.ascontiguousarray(image)
    if input_range is None:
        if image.dtype == np.uint16:
            return np.ascontiguousarray((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
        if np.issubdtype(image.dtype, np.floating):
            input_range = (0.0, 1.0)
        elif np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            input_range = (float(info.min), float(info.max))
        else:
            raise SourceError(f"{name}: unsupported pixel type {image.dtype}")
    low, high = input_range
    if not high > low:
        raise SourceError(f"{name}: input range {input_range} is empty")
    scaled = (image.astype(np.float32) - low) * (255.0 / (high - low))
    return np.ascontiguousarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8))
