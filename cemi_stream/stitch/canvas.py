"""The live mosaic canvas: place frames, keep unsettled tiles in RAM, flush, finalise.

Positions are mosaic pixels (:mod:`cemi_stream.stitch.mosaic`: ``x`` right,
``y`` down, floats of any sign; arrays ``(y, x)``).  Inside, the canvas uses
*live-array pixels*: mosaic pixels plus a unit-aligned offset that puts mosaic
``(0, 0)`` in the middle of the live level-0 array (``extent_px`` square,
default 2**22 px), so the mosaic grows in any direction without moving data.
Blending is :mod:`~cemi_stream.stitch.blend`, storage
:mod:`~cemi_stream.stitch.chunks`, the pyramid :mod:`~cemi_stream.stitch.pyramid`.

Written units and late frames
-----------------------------
:meth:`MosaicCanvas.flush` writes the tiles no future frame will touch (the
caller says which regions may still change) and drops them from RAM, so
memory is bounded by the unsettled area, however long the traversal.  A frame
that later lands on a written unit *re-opens* it: the weight sum is recomputed
exactly from the positions of the frames that touched the unit (weights
depend on geometry only), the weighted sum is taken as stored value x weight
sum, and blending carries on.  The result equals an uninterrupted blend up to
the uint8 rounding of the earlier write (at most 0.5 grey level before the
new frame's share; within 1 grey level of the reference composite, tested).
A re-open costs one unit read and a small product, ~2-3 ms for a 1024 px unit;
it is what lets the stitch stage flush everything but the rest of the current
row (RAM: ~4 tiles, 32 MiB) and let the next row re-open the band it overlaps.
Re-opens are counted (:attr:`MosaicInfo.units_reopened`) and logged at debug
level.  Pass ``reopen=False`` to make them an error instead.  The bookkeeping
this needs grows by ~60-80 bytes per frame (its position and unit list).

Finalising
----------
:meth:`MosaicCanvas.finalize` flushes everything, renames level 0 into its
unit-aligned bounding box (:meth:`~cemi_stream.stitch.chunks.ChunkStore.relayout`,
no pixel copied), builds the pyramid and writes the NGFF 0.5 metadata
(:mod:`cemi_stream.stitch.omezarr`).  Level 0's element ``(0, 0)`` is at
mosaic pixel :attr:`MosaicInfo.origin_xy`, a unit-aligned corner up to one
unit above/left of the first covered pixel (that margin is the NGFF
``translation``); areas never covered are 0.  Meanwhile the group's state is
``finalizing`` (:func:`~cemi_stream.stitch.mosaic.open_mosaic` refuses it).

Not thread-safe: one writer (the stitch stage) per canvas.  Durability: the
mosaic is derived data (the raw spool is the durable record), so nothing is
fsynced; a crash mid-run leaves a readable live array of what was flushed.
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import zarr

from .blend import (
    Placement,
    Tile,
    accumulate,
    feather_ramp,
    normalise,
    restore_sum,
    shift_subpixel,
    unit_weight_sum,
    units_touched,
)
from .chunks import ChunkStore, MosaicError
from .omezarr import image_attributes
from .pyramid import DOWNSAMPLING, build_pyramid

log = logging.getLogger(__name__)

ATTRS_KEY = "cemi_stream"
DEFAULT_EXTENT_PX = 2**22
PYRAMID_MAX_SIDE = 1024

Compression = Literal["none", "zstd", "lz4"]
Interpolation = Literal["linear", "cubic"]
Rect = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class MosaicInfo:
    """What :meth:`MosaicCanvas.finalize` produced.

    Attributes
    ----------
    path : Path
        The OME-Zarr group directory.
    shape : (int, int)
        Level-0 array shape ``(height, width)`` in pixels.
    origin_xy : (int, int)
        Mosaic pixel ``(x, y)`` of level-0 array element ``(0, 0)``: a frame
        placed at mosaic ``(x, y)`` starts at level-0 array index
        ``(y - origin_xy[1], x - origin_xy[0])``.
    levels : int
        Number of pyramid levels (arrays ``"0"`` .. ``str(levels - 1)``).
    level_shapes : tuple of (int, int)
        ``(height, width)`` of every level.
    pixel_size_um : float or None
        Level-0 pixel size in micrometres (None: unknown).
    frames : int
        Frames blended.
    units_written : int
        Level-0 unit writes during the run and the final flush (re-written
        units count again).
    units_reopened : int
        Written units that a later frame re-opened.
    stored_bytes : int
        Bytes of all chunk files of all levels.
    add_s, flush_s : float
        Total seconds spent in :meth:`MosaicCanvas.add` and
        :meth:`MosaicCanvas.flush`.
    reopen_s : float
        Part of ``add_s`` spent re-opening written units.
    finalize_s : float
        Seconds of :meth:`MosaicCanvas.finalize` (final flush included).
    relayout_s, pyramid_s : float
        Parts of ``finalize_s``: renaming level 0 to its tight box, building
        the pyramid.
    """

    path: Path
    shape: tuple[int, int]
    origin_xy: tuple[int, int]
    levels: int
    level_shapes: tuple[tuple[int, int], ...]
    pixel_size_um: float | None
    frames: int
    units_written: int
    units_reopened: int
    stored_bytes: int
    add_s: float
    flush_s: float
    reopen_s: float
    finalize_s: float
    relayout_s: float
    pyramid_s: float


class MosaicCanvas:
    """A growing mosaic: blend frames, stream settled tiles to an OME-Zarr group.

    See the module docstrings: this one (coordinates, flushing, re-opening,
    finalising), :mod:`~cemi_stream.stitch.blend` (weights) and
    :mod:`~cemi_stream.stitch.chunks` (storage layout, default choice).

    Parameters
    ----------
    path : Path
        Directory of the zarr v3 group to create (e.g. ``mosaic.ome.zarr``).
    frame_shape : (int, int)
        ``(height, width)`` of every frame in pixels.
    pixel_size_um : float or None
        Pixel size in micrometres (NGFF scale and unit); None = unknown
        (transformations in pixels, axes without unit).
    chunk : int
        Storage chunk side in pixels (square chunks, even, >= 64).
    shard : int or None
        Shard side in pixels (a multiple of ``chunk``) or None for no
        sharding.  With sharding the write unit (and RAM tile) is the shard.
    compression : {"lz4", "none", "zstd"}
        Chunk compression: blosc-lz4 level 1 (default: as fast as none, and
        empty areas cost almost nothing), none, or zstd level 1 (8-16 %
        smaller on SEM content, ~20 % slower to flush); see the module
        docstring.
    feather_px : float or None
        Width of the blending ramp in pixels; None = a quarter of the
        shorter frame side.
    interpolation : {"linear", "cubic"}
        Sub-pixel shift filter.
    reopen : bool
        A frame landing on an already written unit re-opens it (True) or
        raises :class:`MosaicError` (False).
    extent_px : int
        Side of the live virtual level-0 array; the mosaic may extend about
        ``extent_px / 2`` pixels from the origin in every direction.
    name : str
        Name of the multiscale image in the NGFF metadata.
    pyramid_max_side : int
        The pyramid gets levels until the longest side is <= this (pixels).
    overwrite : bool
        Replace an existing mosaic at ``path`` (only a zarr group or an empty
        directory is ever removed).

    Raises
    ------
    MosaicError
        Invalid arguments, or ``path`` exists (without ``overwrite``) or
        cannot be created.

    Attributes
    ----------
    frame_shape : (int, int)
        ``(height, width)`` of the frames.
    unit : int
        Side of a write unit (chunk, or shard when sharding) in pixels.
    """

    def __init__(
        self,
        path: Path,
        frame_shape: tuple[int, int],
        *,
        pixel_size_um: float | None = None,
        chunk: int = 1024,
        shard: int | None = None,
        compression: Compression = "lz4",
        feather_px: float | None = None,
        interpolation: Interpolation = "linear",
        reopen: bool = True,
        extent_px: int = DEFAULT_EXTENT_PX,
        name: str = "mosaic",
        pyramid_max_side: int = PYRAMID_MAX_SIDE,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        h, w = (int(v) for v in frame_shape)
        if h < 1 or w < 1:
            raise MosaicError(f"{self.path}: invalid frame shape {frame_shape}")
        if chunk < 64 or chunk % 2:
            raise MosaicError(f"{self.path}: chunk {chunk} must be even and >= 64")
        if shard is not None and (shard < chunk or shard % chunk):
            raise MosaicError(f"{self.path}: shard {shard} must be a multiple of chunk {chunk}")
        if pixel_size_um is not None and not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
            raise MosaicError(f"{self.path}: pixel size {pixel_size_um} um must be positive")
        if interpolation not in ("linear", "cubic"):
            raise MosaicError(f"{self.path}: interpolation {interpolation!r} (linear or cubic)")
        self.frame_shape = (h, w)
        self.pixel_size_um = pixel_size_um
        self.chunk = int(chunk)
        self.shard = shard
        self.compression = compression
        self.feather_px = float(feather_px if feather_px is not None else max(1, min(h, w) // 4))
        if not self.feather_px > 0:
            raise MosaicError(f"{self.path}: feather_px {feather_px} must be positive")
        self.interpolation = interpolation
        self.reopen = reopen
        self.name = name
        if pyramid_max_side < 1:
            raise MosaicError(f"{self.path}: pyramid_max_side {pyramid_max_side} must be >= 1")
        self.pyramid_max_side = int(pyramid_max_side)
        self.unit = u = int(shard or chunk)
        # Even number of units each side so the origin sits on a unit corner.
        n_units = max(2, -(-int(extent_px) // (2 * u)) * 2)
        self._extent = n_units * u
        self._off = (n_units // 2) * u  # live array index of mosaic pixel 0 (x and y)
        # Units that have a chunk file are self._chunks.stored.
        self._chunks = ChunkStore(self.path, chunk=self.chunk, shard=shard, compression=compression)

        self._tiles: dict[tuple[int, int], Tile] = {}
        self._written: set[tuple[int, int]] = set()  # flushed units (maybe all 0)
        # Frame positions (live array pixels) and, per unit, the frames that
        # touched it: what a re-open needs to rebuild the weight sum exactly.
        self._pos = np.empty((1024, 2), np.float64)
        self._frames_in: dict[tuple[int, int], array[int]] = {}
        self._n = 0
        self._bbox = [math.inf, math.inf, -math.inf, -math.inf]  # gx0, gy0, gx1, gy1
        self._ramps: dict[tuple[int, float], np.ndarray] = {}
        self.units_written = 0
        self.units_reopened = 0
        self.max_tiles = 0
        self._add_s = 0.0
        self._flush_s = 0.0
        self._reopen_s = 0.0
        self._info: MosaicInfo | None = None

        self._chunks.prepare_dir(overwrite)
        try:
            self._group = self._chunks.create(self._extent)
            self._group.update_attributes(self._attributes(1, (-self._off, -self._off), "live"))
        except (OSError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
            raise MosaicError(f"{self.path}: cannot create the mosaic ({exc})") from exc
        log.debug(
            "%s: live canvas, unit %d px, chunk %d, %s, feather %.0f px, extent %d px",
            self.path, u, self.chunk, compression, self.feather_px, self._extent,
        )  # fmt: skip

    # ------------------------------------------------------------------ setup

    def _attributes(self, levels: int, origin_xy: tuple[int, int], state: str) -> dict[str, Any]:
        attrs = image_attributes(
            levels,
            pixel_size_um=self.pixel_size_um,
            origin_yx_px=(origin_xy[1], origin_xy[0]),
            name=self.name,
            method="mean",
            method_description=DOWNSAMPLING,
        )
        attrs[ATTRS_KEY] = {
            "mosaic": {
                "state": state,
                "origin_xy_px": [int(origin_xy[0]), int(origin_xy[1])],
                "frame_shape": list(self.frame_shape),
                "chunk_px": self.chunk,
                "shard_px": self.shard,
                "compression": self.compression,
                "feather_px": self.feather_px,
                "interpolation": self.interpolation,
                "pixel_size_um": self.pixel_size_um,
            }
        }
        return attrs

    # ------------------------------------------------------------------ state

    @property
    def tiles_held(self) -> int:
        """Number of accumulation tiles in RAM (each ``unit x unit`` x 8 bytes)."""
        return len(self._tiles)

    @property
    def frames(self) -> int:
        """Frames added so far."""
        return self._n

    @property
    def finalized(self) -> bool:
        """Whether :meth:`finalize` has run."""
        return self._info is not None

    # ------------------------------------------------------------------ blending

    def _ramp(self, n: int, frac: float) -> np.ndarray:
        key = (n, frac)
        ramp = self._ramps.get(key)
        if ramp is None:
            ramp = feather_ramp(n, frac, self.feather_px)
            if frac == 0:  # the common integer case is worth caching
                self._ramps[key] = ramp
        return ramp

    def _geometry(self, gx: float, gy: float) -> tuple[int, int, float, float]:
        ix, iy = math.floor(gx), math.floor(gy)
        return ix, iy, gx - ix, gy - iy

    def _placement(self, n: int) -> Placement:
        """Frame ``n``'s live-array top-left pixel and feather ramps (y, x)."""
        h, w = self.frame_shape
        gx0, gy0, fx, fy = self._geometry(*self._pos[n])
        return gx0, gy0, self._ramp(h, fy), self._ramp(w, fx)

    def add(self, image: np.ndarray, x: float, y: float) -> None:
        """Blend one frame into the canvas with its top-left pixel at mosaic ``(x, y)``.

        Parameters
        ----------
        image : numpy.ndarray
            uint8 ``(y, x)`` frame of :attr:`frame_shape`.
        x, y : float
            Mosaic position of the frame's top-left pixel centre, in pixels
            (any sign, sub-pixel allowed).

        Raises
        ------
        MosaicError
            Wrong shape or dtype, non-finite or out-of-extent position, a
            finalised canvas, or (``reopen=False``) a frame landing on an
            already written unit; a failed re-open read.
        """
        if self._info is not None:
            raise MosaicError(f"{self.path}: add after finalize")
        if image.dtype != np.uint8 or image.shape != self.frame_shape:
            raise MosaicError(
                f"{self.path}: frame {image.shape} {image.dtype}, canvas takes "
                f"{self.frame_shape} uint8"
            )
        if not (math.isfinite(x) and math.isfinite(y)):
            raise MosaicError(f"{self.path}: frame position ({x}, {y}) is not finite")
        t0 = time.perf_counter()
        h, w = self.frame_shape
        gx0, gy0, fx, fy = self._geometry(x + self._off, y + self._off)
        fh, fw = h + (fy > 0), w + (fx > 0)
        if gx0 < 0 or gy0 < 0 or gx0 + fw > self._extent or gy0 + fh > self._extent:
            raise MosaicError(
                f"{self.path}: frame at ({x:.1f}, {y:.1f}) px leaves the canvas extent "
                f"(+-{self._off} px around the origin; raise extent_px)"
            )
        keys = units_touched(self.unit, gx0, gy0, fw, fh)
        for key in keys:
            if key in self._written and key not in self._tiles:
                self._reopen(key)

        ramp_y, ramp_x = self._ramp(h, fy), self._ramp(w, fx)
        weight = np.multiply.outer(ramp_y, ramp_x)
        if fx == 0 and fy == 0:
            shifted = image.astype(np.float32)
        else:
            shifted = shift_subpixel(image, fx, fy, self.interpolation)
        accumulate(self._tiles, self.unit, keys, gx0, gy0, shifted, weight)

        n = self._n
        if n == len(self._pos):
            self._pos = np.concatenate([self._pos, np.empty_like(self._pos)])
        self._pos[n] = (x + self._off, y + self._off)
        for key in keys:
            self._frames_in.setdefault(key, array("q")).append(n)
        self._n = n + 1
        b = self._bbox
        b[0], b[1] = min(b[0], gx0), min(b[1], gy0)
        b[2], b[3] = max(b[2], gx0 + fw), max(b[3], gy0 + fh)
        self.max_tiles = max(self.max_tiles, len(self._tiles))
        self._add_s += time.perf_counter() - t0

    def _reopen(self, key: tuple[int, int]) -> None:
        """Bring a written unit back into RAM as an accumulation tile (see module doc)."""
        if not self.reopen:
            raise MosaicError(
                f"{self.path}: a frame lands on unit {key}, already written "
                "(flush only regions no later frame touches, or use reopen=True)"
            )
        t0 = time.perf_counter()
        u = self.unit
        frames = self._frames_in.get(key, array("q"))
        weight = unit_weight_sum(key, u, len(frames), (self._placement(n) for n in frames))
        self._chunks.wait(key=key)
        if key in self._chunks.stored:
            total = restore_sum(self._chunks.read(key), weight)
        else:  # flushed all-zero: no file, nothing landed on it yet
            total = np.zeros((u, u), np.float32)
        self._tiles[key] = (total, weight)
        self._written.discard(key)
        self.units_reopened += 1
        self._reopen_s += time.perf_counter() - t0
        log.debug("%s: re-opened written unit %s", self.path, key)

    # ------------------------------------------------------------------ writing

    def flush(self, keep: Sequence[Rect] = ()) -> int:
        """Write every tile that no ``keep`` rectangle touches, and free it.

        The writes run on a background thread, overlapping the next frames'
        blending; :meth:`sync` waits for them, :meth:`finalize` too.

        Parameters
        ----------
        keep : sequence of (x0, y0, x1, y1)
            Mosaic-pixel rectangles (floats, ``x0 <= x1``, ``y0 <= y1``, any
            may be +-inf) that later frames may still touch: e.g. the extent
            of the frames still to come, ``(x, y, x + width, y + height)``.
            A tile whose unit intersects one of them stays in RAM.

        Returns
        -------
        int
            Number of units written.

        Raises
        ------
        MosaicError
            A malformed rectangle, or a failed write (never swallowed: the
            tile stays in RAM and the error propagates).
        """
        if self._info is not None:
            raise MosaicError(f"{self.path}: flush after finalize")
        t0 = time.perf_counter()
        rects = self._keep_rects(keep)
        u = self.unit
        done = []
        for key in self._tiles:
            ty, tx = key
            ux0, uy0 = tx * u, ty * u
            if rects.size:
                hit = (
                    (rects[:, 0] < ux0 + u)
                    & (rects[:, 2] > ux0)
                    & (rects[:, 1] < uy0 + u)
                    & (rects[:, 3] > uy0)
                )
                if hit.any():
                    continue
            done.append(key)
        for key in done:
            self._write_tile(key)
        self._flush_s += time.perf_counter() - t0
        return len(done)

    def _keep_rects(self, keep: Sequence[Rect]) -> np.ndarray:
        try:
            rects = np.asarray(keep, dtype=np.float64).reshape(-1, 4)
        except (TypeError, ValueError) as exc:
            raise MosaicError(f"{self.path}: keep must be (x0, y0, x1, y1) rectangles") from exc
        if (
            np.isnan(rects).any()
            or (rects[:, 2] < rects[:, 0]).any()
            or (rects[:, 3] < rects[:, 1]).any()
        ):
            raise MosaicError(f"{self.path}: invalid keep rectangle in {keep!r}")
        return rects + self._off

    def _write_tile(self, key: tuple[int, int]) -> None:
        total, weight = self._tiles[key]
        out = normalise(total, weight)
        if key in self._chunks.stored or cv2.countNonZero(out):
            self._chunks.submit(key, out)
            self.units_written += 1
        # An all-zero unit needs no file (fill value 0) but counts as written:
        # a later frame must re-open it to blend with the frames already in it.
        del self._tiles[key]
        self._written.add(key)

    def sync(self) -> None:
        """Wait until every flushed unit is on disk (flush only queues the writes)."""
        self._chunks.wait()

    # ------------------------------------------------------------------ finalize

    def finalize(self) -> MosaicInfo:
        """Flush everything, make level 0 tight, build the pyramid, write NGFF 0.5.

        Returns
        -------
        MosaicInfo
            Final shape, origin, levels and timings.

        Raises
        ------
        MosaicError
            No frame was added, finalize ran already, or a file operation failed.
        """
        if self._info is not None:
            raise MosaicError(f"{self.path}: finalize called twice")
        if self._n == 0:
            raise MosaicError(f"{self.path}: no frame was added; nothing to finalize")
        t0 = time.perf_counter()
        self.flush(())
        self._chunks.wait()
        self._chunks.shutdown()
        t1 = time.perf_counter()
        u = self.unit
        gx0, gy0, gx1, gy1 = (int(v) for v in self._bbox)
        ux0, uy0 = gx0 // u, gy0 // u
        shape = (gy1 - uy0 * u, gx1 - ux0 * u)
        origin_xy = (ux0 * u - self._off, uy0 * u - self._off)
        try:
            self._group.update_attributes(
                {ATTRS_KEY: {"mosaic": {"state": "finalizing"}}}
            )  # readers: the layout is changing
            units = self._chunks.relayout(ux0, uy0, shape)
            t2 = time.perf_counter()
            shapes = build_pyramid(self._chunks, shape, units, self.pyramid_max_side)
            t3 = time.perf_counter()
            attrs = self._attributes(len(shapes), origin_xy, "final")
            attrs[ATTRS_KEY]["mosaic"]["frames"] = self._n
            self._group.update_attributes(attrs)
        except OSError as exc:
            raise MosaicError(f"{self.path}: finalize failed ({exc.strerror or exc})") from exc
        self._info = MosaicInfo(
            path=self.path,
            shape=shape,
            origin_xy=origin_xy,
            levels=len(shapes),
            level_shapes=tuple(shapes),
            pixel_size_um=self.pixel_size_um,
            frames=self._n,
            units_written=self.units_written,
            units_reopened=self.units_reopened,
            stored_bytes=self._chunks.stored_bytes(len(shapes)),
            add_s=self._add_s,
            flush_s=self._flush_s,
            reopen_s=self._reopen_s,
            finalize_s=time.perf_counter() - t0,
            relayout_s=t2 - t1,
            pyramid_s=t3 - t2,
        )
        log.info(
            "%s: mosaic %d x %d px (origin %s), %d levels, %d frames, %.2f s finalize",
            self.path, shape[1], shape[0], origin_xy, len(shapes), self._n,
            self._info.finalize_s,
        )  # fmt: skip
        return self._info

    # ------------------------------------------------------------------ reading

    def preview(self, max_side: int = 2048) -> np.ndarray:
        """A downsampled uint8 ``(y, x)`` view of the whole mosaic (after finalize).

        Parameters
        ----------
        max_side : int
            Longest side of the result in pixels.

        Returns
        -------
        numpy.ndarray
            The finest pyramid level whose longest side is <= ``max_side``,
            or the coarsest level resized (area average) to fit.
        """
        info = self._info
        if info is None:
            raise MosaicError(f"{self.path}: preview before finalize")
        if max_side < 1:
            raise MosaicError(f"{self.path}: preview max_side {max_side} must be >= 1")
        level = next(
            (k for k, s in enumerate(info.level_shapes) if max(s) <= max_side), info.levels - 1
        )
        array: Any = self._group[str(level)]
        image = np.asarray(array[...])
        h, w = image.shape
        if max(h, w) > max_side:
            f = max_side / max(h, w)
            size = (max(1, round(w * f)), max(1, round(h * f)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return image
