"""The frame-source contract shared by every driver.

A driver is a small class satisfying :class:`FrameSource` plus one entry in
:mod:`drivers.registry`.  Sources hand out :class:`cemi_stream.frame.Frame`
objects holding 2-D greyscale images ``(y, x)`` in the depth they decoded
(``uint8``, ``uint16``, ``float32`` ...): :func:`to_gray` is the one place where
colour becomes grey.  Mapping deeper images to 8 bits needs one window for the
whole run, which only the capture front end can choose
(:mod:`cemi_stream.capture.levels`); :func:`to_gray8` is the fixed full-range mapping
for callers that want 8 bits straight away.
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
    significant_bits : int or None
        Bits per sample that carry data when the file says so and it is fewer
        than its pixel type holds (12-bit data in a 16-bit container: a PNG
        ``sBIT`` chunk, TIFF ``BitsPerSample`` or ``MaxSampleValue``); None
        when it declares nothing beyond the pixel type.
    """

    kind: str
    frame_size: tuple[int, int] | None = None
    fps: float | None = None
    pixel_size_nm: float | None = None
    frame_count: int | None = None
    live: bool = False
    video_like: bool = True
    significant_bits: int | None = None


@runtime_checkable
class FrameSource(Protocol):
    """What every frame source provides.

    ``open`` acquires the resource (raising :class:`SourceError` with a
    one-line reason when it cannot), ``read`` returns the next frame or
    ``None`` at the end of the stream, ``close`` releases everything and may
    be called twice.

    A frame that cannot be decoded is not an error of the source: ``read``
    logs it and returns a fault frame for it
    (:func:`cemi_stream.frame.fault_frame`, reason ``corrupt``), and the next
    ``read`` goes on with the next frame.  Frames of another size than the
    first are handed out as they are (the front end rejects them as
    ``size_changed``).  ``read`` raises :class:`SourceError` only when the
    source as a whole fails (a device that stops delivering).
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
        """Return the next frame (possibly a fault frame), or ``None`` at the end."""
        ...

    def close(self) -> None:
        """Release the underlying file or device (idempotent)."""
        ...


def to_gray(image: np.ndarray, *, name: str = "frame") -> np.ndarray:
    """Convert a decoded image to a C-contiguous 2-D grey array ``(y, x)``, keeping its depth.

    Parameters
    ----------
    image : ndarray
        ``(y, x)``, ``(y, x, 1)``, ``(y, x, 3)`` (BGR, as OpenCV decodes) or
        ``(y, x, 4)`` (BGRA); integer, float or bool dtype.
    name : str
        Used in error messages.

    Returns
    -------
    ndarray
        ``(y, x)`` in the input's dtype (bool becomes ``uint8`` 0/255; colour
        with unequal channels of a type OpenCV cannot convert becomes
        ``float32``).

    Raises
    ------
    SourceError
        For other channel counts, dimensions or pixel types.

    Notes
    -----
    Colour frames whose channels are identical (the usual case for SEM frames
    saved as RGB) keep one channel exactly; otherwise ITU-R BT.601 luma is used,
    which also turns coloured UI overlays into grey levels that the border
    detector can strip.
    """
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * np.uint8(255)
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise SourceError(f"{name}: unsupported pixel type {image.dtype}")
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
                if bgr.dtype not in (np.uint8, np.uint16, np.float32):
                    bgr = bgr.astype(np.float32)  # the only other type cvtColor takes
                image = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2GRAY)
        else:
            raise SourceError(f"{name}: unsupported image with {channels} channels")
    elif image.ndim != 2:
        raise SourceError(f"{name}: unsupported image with {image.ndim} dimensions")
    return np.ascontiguousarray(image)


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
        As for :func:`to_gray`.
    name : str
        Used in error messages.
    input_range : (low, high) or None
        Grey levels mapped linearly to 0 and 255.  ``None`` means the dtype's
        full range: ``uint16`` is divided by 257 so a fixed 16-bit scale never
        changes from frame to frame (per-frame stretching would make the
        brightness of overlapping frames disagree); floats are taken as 0..1.
        (The capture chooses a better window for narrow-range data:
        :mod:`cemi_stream.capture.levels`.)

    Returns
    -------
    ndarray
        ``uint8`` array of shape ``(y, x)``.
    """
    image = to_gray(image, name=name)
    if image.dtype == np.uint8 and input_range is None:
        return image
    if input_range is None:
        if image.dtype == np.uint16:
            return np.ascontiguousarray((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
        if np.issubdtype(image.dtype, np.floating):
            input_range = (0.0, 1.0)
        else:
            info = np.iinfo(image.dtype)
            input_range = (float(info.min), float(info.max))
    low, high = input_range
    if not high > low:
        raise SourceError(f"{name}: input range {input_range} is empty")
    scaled = (image.astype(np.float32) - low) * (255.0 / (high - low))
    return np.ascontiguousarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8))
