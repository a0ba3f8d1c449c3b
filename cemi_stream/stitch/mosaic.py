"""The mosaic: frames blended into a live OME-Zarr image; the public entry points.

Import the mosaic from here: :class:`MosaicCanvas` (build one),
:func:`open_mosaic` and :class:`MosaicView` (read one, live or finalised),
:class:`MosaicInfo`, :class:`MosaicError` and the helpers the tests and
benchmarks use.  The implementation is split by idea:

* :mod:`cemi_stream.stitch.canvas` - the live canvas: placing frames, RAM
  tiles, flushing settled tiles, re-opening written ones, finalising;
* :mod:`cemi_stream.stitch.blend` - feather weights, the sub-pixel shift,
  accumulation and normalisation of the weighted sums;
* :mod:`cemi_stream.stitch.chunks` - the zarr v3 group, direct chunk
  encode/write/read of level-0 units on a background writer thread, the
  re-layout into the tight box, and the storage layout choice;
* :mod:`cemi_stream.stitch.pyramid` - the 2x block-mean levels;
* :mod:`cemi_stream.stitch.omezarr` - the NGFF 0.5 metadata.

Coordinates
-----------
*Mosaic pixels* are the stitcher's coordinates: a frame placed at ``(x, y)``
has its top-left pixel centre at mosaic pixel ``(x, y)``; ``x`` grows to the
right, ``y`` downwards; positions are floats and may be negative (the first
frame is near ``(0, 0)`` and the traversal may grow in any direction).
Arrays are indexed ``(y, x)``; shapes are ``(height, width)`` in pixels.

Reading
-------
``path`` is a zarr v3 group, level ``k`` the uint8 array ``"k"``.  The group
attributes say where the mosaic origin lies
(``attributes["cemi_stream"]["mosaic"]["origin_xy_px"]``, also the level-0
NGFF translation) and its state: ``live`` while the run writes (level 0 is
then a large sparse virtual array with mosaic pixel ``(0, 0)`` in its
middle), ``finalizing`` during :meth:`MosaicCanvas.finalize` (refused by
:func:`open_mosaic`), ``final`` after it (level 0 tight, the pyramid built).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .blend import feather_ramp, shift_subpixel
from .canvas import (
    ATTRS_KEY,
    DEFAULT_EXTENT_PX,
    PYRAMID_MAX_SIDE,
    Compression,
    Interpolation,
    MosaicCanvas,
    MosaicInfo,
    Rect,
)
from .chunks import MosaicError
from .pyramid import downsample_mean

__all__ = [
    "ATTRS_KEY",
    "DEFAULT_EXTENT_PX",
    "PYRAMID_MAX_SIDE",
    "Compression",
    "Interpolation",
    "MosaicCanvas",
    "MosaicError",
    "MosaicInfo",
    "MosaicView",
    "Rect",
    "downsample_mean",
    "feather_ramp",
    "open_mosaic",
    "shift_subpixel",
]


@dataclass(frozen=True, slots=True)
class MosaicView:
    """A mosaic level opened for reading (see :func:`open_mosaic`).

    Attributes
    ----------
    array : zarr.Array
        The level's uint8 ``(y, x)`` array (read-only handle).
    origin_xy : (int, int)
        Mosaic pixel ``(x, y)`` (level-0 units) of array element ``(0, 0)``.
    level : int
        Pyramid level; one pixel spans ``2**level`` level-0 pixels.
    live : bool
        True while the run is still writing (level 0 is then a large sparse
        virtual array).
    pixel_size_um : float or None
        Level-0 pixel size in micrometres.
    """

    array: Any
    origin_xy: tuple[int, int]
    level: int
    live: bool
    pixel_size_um: float | None

    def region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels of the mosaic rectangle ``[x0, x1) x [y0, y1)``, uint8 ``(y, x)``.

        Coordinates are level-0 mosaic pixels (divided by ``2**level`` for
        this level's sampling); parts outside the array read as 0.
        """
        f = 2**self.level
        ax0, ay0 = (x0 - self.origin_xy[0]) // f, (y0 - self.origin_xy[1]) // f
        ax1, ay1 = -(-(x1 - self.origin_xy[0]) // f), -(-(y1 - self.origin_xy[1]) // f)
        out = np.zeros((max(0, ay1 - ay0), max(0, ax1 - ax0)), np.uint8)
        h, w = self.array.shape
        cy0, cx0, cy1, cx1 = max(ay0, 0), max(ax0, 0), min(ay1, h), min(ax1, w)
        if cy1 > cy0 and cx1 > cx0:
            out[cy0 - ay0 : cy1 - ay0, cx0 - ax0 : cx1 - ax0] = self.array[cy0:cy1, cx0:cx1]
        return out


def open_mosaic(path: Path, level: int = 0) -> MosaicView:
    """Open a mosaic (live or finalised) for reading.

    Parameters
    ----------
    path : Path
        The mosaic's zarr group directory.
    level : int
        Pyramid level (only level 0 exists while the run is live).

    Returns
    -------
    MosaicView
        The array and where it lies in mosaic pixels.

    Raises
    ------
    MosaicError
        Not a mosaic, the level does not exist, or the mosaic is being
        finalised right now.
    """
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        ours: Any = dict(group.attrs).get(ATTRS_KEY)
        meta = ours.get("mosaic") if isinstance(ours, dict) else None
        if not isinstance(meta, dict) or meta.get("state") not in ("live", "final"):
            state = meta.get("state") if isinstance(meta, dict) else None
            raise MosaicError(f"{path}: not a readable cemi-stream mosaic (state {state!r})")
        arr = group[str(level)]
    except (OSError, KeyError, zarr.errors.GroupNotFoundError) as exc:
        raise MosaicError(f"{path}: cannot open mosaic level {level} ({exc})") from exc
    ox, oy = (int(v) for v in meta["origin_xy_px"])
    return MosaicView(
        array=arr,
        origin_xy=(ox, oy),
        level=level,
        live=meta["state"] == "live",
        pixel_size_um=meta.get("pixel_size_um"),
    )
