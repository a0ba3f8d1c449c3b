"""The mosaic canvas: frames blended in RAM tiles, settled tiles streamed to OME-Zarr.

Coordinates
-----------
*Mosaic pixels* are the stitcher's coordinates: a frame placed at ``(x, y)``
has its top-left pixel centre at mosaic pixel ``(x, y)``; ``x`` grows to the
right, ``y`` downwards; positions are floats and may be negative (the first
frame is near ``(0, 0)`` and the traversal may grow in any direction).
Arrays are indexed ``(y, x)``.

Blending
--------
Each frame is weighted by a separable feather ``w(u, v) = r_x(u) * r_y(v)``
where ``r(d) = clip((d + 0.5) / feather_px, 0, 1)`` and ``d`` is the distance
(pixels) from the pixel centre to the nearest border pixel centre of the
frame: a weight of ``0.5 / feather_px`` at the border rising to 1 at
``feather_px`` inside.  The canvas accumulates ``sum(w * image)`` and
``sum(w)`` (float32) and stores their ratio, rounded to uint8.  Overlapping
frames thus fade into each other over ``feather_px`` (no seam, even between
frames of different brightness), and where frames overlap fully their mean
is taken (which also averages the SEM noise down).  A sub-pixel position
shifts the frame (and its feather, analytically) by the fractional part with
a separable bilinear (or Keys cubic) filter, then adds it at the integer
part; integer positions are copied exactly.

Storage layout (zarr v3, OME-Zarr 0.5 once finalised)
-----------------------------------------------------
``path`` is a zarr v3 group; level ``k`` of the pyramid is the array ``"k"``
(``uint8``, ``dimension_names ["y", "x"]``, fill value 0, default chunk key
encoding ``c/<iy>/<ix>``).  The unit of writing - a *unit* - is the storage
chunk, or the shard when sharding is on: a unit is always written whole, in
one call, from a RAM tile of exactly its size, never read-modify-written.

While the run is live, level 0 is a very large *virtual* array
(``extent_px`` square, default 2**22 px; zarr arrays are sparse, unwritten
chunks cost nothing), with mosaic pixel ``(0, 0)`` at a unit-aligned offset in
its middle, so the mosaic can grow in any direction without moving data, and
anyone can open the array at any time (each chunk file is written beside
and renamed into place, atomically; unsharded units are encoded with the
array's own codec and written directly, sharded ones through zarr).  The
group attributes say where the mosaic origin lies
(``attributes["cemi_stream"]["mosaic"]["origin_xy_px"]``, also the level-0
NGFF translation); :func:`open_mosaic` reads them.

:meth:`MosaicCanvas.finalize` flushes everything, renames the chunk files of
the unit-aligned bounding box so that it starts at array index 0, rewrites the
array metadata with the tight shape (no pixel data is copied), builds the
2x block-mean pyramid unit by unit and writes the NGFF 0.5 metadata
(:mod:`cemi_stream.stitch.omezarr`).  Level 0's element ``(0, 0)`` is at
mosaic pixel :attr:`MosaicInfo.origin_xy`, a unit-aligned corner up to one
unit above/left of the first covered pixel (that margin is the NGFF
``translation``); areas never covered are 0.

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

Layout choice (``bench/bench_mosaic.py``, ``bench/results/mosaic.json``)
----------------------------------------------------------------------
Default: 1024 px chunks, no sharding, blosc-lz4 level 1.  Measured on the
shared 2-core machine (medians of 5 interleaved repeats, several runs; the
spread between runs is large): flushing costs ~2.2-3 ms per frame with
1024 px chunks, ~4-5.5 ms with 512 px (more, smaller files) and ~1.5-2.8 ms
with 2048 px.  Under the stitch stage's flush policy (re-opens) 1024 and
2048 px give the same throughput within the noise, but a 2048 px re-open
stalls its frame ~15-25 ms instead of ~4-5 ms and the tiles take 128 instead of
32 MiB.  lz4 flushes as fast as no compression and stores the empty parts
(unit margins, gaps) almost free: 12 % fewer bytes at paper scale, half on a
3-row mosaic; blended SEM content itself hardly compresses (lz4 1.00-1.02x,
zstd-1 1.08x LD / 1.16x HD), and zstd-1 flushes ~15-25 % slower.  Sharding
bought no speed and makes each RAM tile a whole shard (128 MiB for 4096 px
shards).

During :meth:`~MosaicCanvas.finalize` the group's state is ``finalizing``
(:func:`open_mosaic` refuses it); if finalize fails midway, level-0 files not
yet moved are in ``path/.finalize-units``.

Not thread-safe: one writer (the stitch stage) per canvas.  Durability: the
mosaic is derived data (the raw spool is the durable record), so nothing is
fsynced; a crash mid-run leaves a readable live array of what was flushed.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from array import array
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from ..errors import CemiError
from .omezarr import image_attributes

log = logging.getLogger(__name__)

ATTRS_KEY = "cemi_stream"
DEFAULT_EXTENT_PX = 2**22
_MAX_PENDING_WRITES = 8  # ~8 MiB of finished tiles waiting for the disk
PYRAMID_MAX_SIDE = 1024
_STAGING = ".finalize-units"
_DOWNSAMPLING = "2x2 block mean of the previous level, rounded half up; odd edges replicated"

Compression = Literal["none", "zstd", "lz4"]
Interpolation = Literal["linear", "cubic"]
Rect = tuple[float, float, float, float]


class MosaicError(CemiError):
    """The mosaic could not be created, blended, written or read."""


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


def _compressors(name: str) -> list[Any] | None:
    if name == "none":
        return None
    if name == "zstd":
        return [ZstdCodec(level=1)]
    if name == "lz4":
        return [BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")]
    raise MosaicError(f"mosaic: unknown compression {name!r} (none, zstd or lz4)")


def _unit_codec(name: str) -> numcodecs.abc.Codec | None:
    """The numcodecs codec that encodes a chunk exactly as ``_compressors(name)`` does.

    Used to read and write whole unsharded chunk files directly, which costs
    ~1 ms less per 1 MiB unit than zarr's asynchronous codec pipeline on the
    2-core dev machine (``none`` is the raw bytes: None).
    """
    if name == "lz4":
        return numcodecs.Blosc(cname="lz4", clevel=1, shuffle=numcodecs.Blosc.NOSHUFFLE)
    if name == "zstd":
        return numcodecs.Zstd(level=1)
    return None


def feather_ramp(n: int, frac: float, feather_px: float) -> np.ndarray:
    """1-D feather weights of a frame side shifted by a sub-pixel fraction.

    Parameters
    ----------
    n : int
        Frame side in pixels.
    frac : float
        Sub-pixel shift in ``[0, 1)``; the output has ``n + 1`` samples when it
        is non-zero (the shifted frame straddles one more pixel), else ``n``.
    feather_px : float
        Distance from the border, in pixels, at which the weight reaches 1.

    Returns
    -------
    numpy.ndarray
        float32 weights; sample ``j`` is at frame coordinate ``j - frac``.
    """
    m = n + 1 if frac > 0 else n
    u = np.arange(m, dtype=np.float64) - frac
    d = np.minimum(u, (n - 1) - u)
    return np.clip((d + 0.5) / feather_px, 0.0, 1.0).astype(np.float32)


def _keys(t: float) -> float:
    """Keys cubic convolution kernel (a = -0.5) at distance ``t``."""
    t = abs(t)
    if t <= 1.0:
        return 1.5 * t**3 - 2.5 * t**2 + 1.0
    if t < 2.0:
        return -0.5 * t**3 + 2.5 * t**2 - 4.0 * t + 2.0
    return 0.0


def _shift_kernel(frac: float, interpolation: str) -> tuple[np.ndarray, int]:
    """Correlation kernel (anchor 0) and border padding for a shift by ``frac``.

    Output sample ``j`` is the frame interpolated at ``j - frac``; on the
    frame padded by ``pad`` pixels that reads padded samples ``j .. j + len - 1``.
    """
    if frac == 0:
        return np.ones(1, np.float32), 0
    if interpolation == "linear":
        return np.array([frac, 1.0 - frac], np.float32), 1
    t = 1.0 - frac  # distance from sample j-1 to the interpolated point
    taps = [_keys(t + 1.0), _keys(t), _keys(1.0 - t), _keys(2.0 - t)]
    return np.array(taps, np.float32), 2


def shift_subpixel(image: np.ndarray, fx: float, fy: float, interpolation: str) -> np.ndarray:
    """Shift a frame right/down by ``(fx, fy)`` in ``[0, 1)`` pixels.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 ``(y, x)`` frame.
    fx, fy : float
        Fractional shifts in pixels.
    interpolation : {"linear", "cubic"}
        Bilinear or Keys cubic (a = -0.5) interpolation; borders replicated.

    Returns
    -------
    numpy.ndarray
        float32 ``(h + (fy > 0), w + (fx > 0))``: output ``(j, i)`` is the frame
        at ``(j - fy, i - fx)``.
    """
    h, w = image.shape
    kx, px = _shift_kernel(fx, interpolation)
    ky, py = _shift_kernel(fy, interpolation)
    padded = cv2.copyMakeBorder(image, py, py, px, px, cv2.BORDER_REPLICATE)
    # One separable pass does the shift and the uint8 -> float32 conversion.
    out = cv2.sepFilter2D(
        padded, cv2.CV_32F, kx, ky, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE
    )
    return out[: h + (fy > 0), : w + (fx > 0)]


def downsample_mean(block: np.ndarray) -> np.ndarray:
    """2x2 block mean of a uint8 ``(y, x)`` image, rounded half up.

    An odd last row/column is replicated first, so it is averaged with
    itself.  Output shape ``(ceil(h / 2), ceil(w / 2))``.
    """
    h, w = block.shape
    if h % 2 or w % 2:
        block = cv2.copyMakeBorder(block, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
    s = block[0::2, 0::2].astype(np.uint16)
    s += block[1::2, 0::2]
    s += block[0::2, 1::2]
    s += block[1::2, 1::2]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


class MosaicCanvas:
    """A growing mosaic: blend frames, stream settled tiles to an OME-Zarr group.

    See the module docstring for coordinates, blending and layout.

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
        self.unit = int(shard or chunk)
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
        u = self.unit
        # Even number of units each side so the origin sits on a unit corner.
        n_units = max(2, -(-int(extent_px) // (2 * u)) * 2)
        self._extent = n_units * u
        self._off = (n_units // 2) * u  # live array index of mosaic pixel 0 (x and y)
        self._codecs = _compressors(compression)
        self._unit_codec = _unit_codec(compression)
        self._unit_dirs: set[Path] = set()  # chunk directories known to exist

        self._tiles: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._written: set[tuple[int, int]] = set()  # flushed units (maybe all 0)
        self._stored: set[tuple[int, int]] = set()  # units that have a chunk file
        # Chunk writes run on one background thread, overlapping the blending;
        # a re-open of a unit waits for its own pending write.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mosaic-write")
        self._pending: dict[tuple[int, int], Future[None]] = {}
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

        self._prepare_dir(overwrite)
        try:
            self._group = zarr.open_group(str(self.path), mode="w-", zarr_format=3)
            self._array = self._create_level("0", (self._extent, self._extent))
            self._group.update_attributes(self._attributes(1, (-self._off, -self._off), "live"))
        except (OSError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
            raise MosaicError(f"{self.path}: cannot create the mosaic ({exc})") from exc
        log.debug(
            "%s: live canvas, unit %d px, chunk %d, %s, feather %.0f px, extent %d px",
            self.path, u, self.chunk, compression, self.feather_px, self._extent,
        )  # fmt: skip

    # ------------------------------------------------------------------ setup

    def _prepare_dir(self, overwrite: bool) -> None:
        p = self.path
        if not p.exists():
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise MosaicError(f"{p}: cannot create ({exc.strerror or exc})") from exc
            return
        try:
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()  # zarr's mode "w-" wants to create it itself
                return
            if not overwrite:
                raise MosaicError(f"{p}: already exists (pass overwrite=True to replace a mosaic)")
            if not (p / "zarr.json").is_file():
                raise MosaicError(f"{p}: exists and is not a zarr group; refusing to delete it")
            shutil.rmtree(p)
        except OSError as exc:
            raise MosaicError(f"{p}: cannot replace ({exc.strerror or exc})") from exc

    def _create_level(self, name: str, shape: tuple[int, int]) -> Any:
        return self._group.create_array(
            name,
            shape=shape,
            chunks=(self.chunk, self.chunk),
            shards=(self.shard, self.shard) if self.shard else None,
            dtype="uint8",
            fill_value=0,
            compressors=self._codecs,
            dimension_names=["y", "x"],
            overwrite=True,
            # zarr's own all-fill-value test costs more than the write itself
            # (1 MiB chunk: ~4-6 ms with it, ~1.5-4 ms without, on the 2-core dev
            # machine); _write_tile skips empty units itself.
            config={"write_empty_chunks": True},
        )

    def _attributes(self, levels: int, origin_xy: tuple[int, int], state: str) -> dict[str, Any]:
        attrs = image_attributes(
            levels,
            pixel_size_um=self.pixel_size_um,
            origin_yx_px=(origin_xy[1], origin_xy[0]),
            name=self.name,
            method="mean",
            method_description=_DOWNSAMPLING,
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
        keys = self._units(gx0, gy0, fw, fh)
        for key in keys:
            if key in self._written and key not in self._tiles:
                self._reopen(key)

        ramp_y, ramp_x = self._ramp(h, fy), self._ramp(w, fx)
        weight = np.multiply.outer(ramp_y, ramp_x)
        if fx == 0 and fy == 0:
            shifted = image.astype(np.float32)
        else:
            shifted = shift_subpixel(image, fx, fy, self.interpolation)
        self._accumulate(keys, gx0, gy0, shifted, weight)

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

    def _units(self, gx0: int, gy0: int, fw: int, fh: int) -> list[tuple[int, int]]:
        u = self.unit
        return [
            (ty, tx)
            for ty in range(gy0 // u, (gy0 + fh - 1) // u + 1)
            for tx in range(gx0 // u, (gx0 + fw - 1) // u + 1)
        ]

    def _accumulate(
        self,
        keys: list[tuple[int, int]],
        gx0: int,
        gy0: int,
        shifted: np.ndarray,
        weight: np.ndarray,
    ) -> None:
        u = self.unit
        fh, fw = weight.shape
        for key in keys:
            tile = self._tiles.get(key)
            if tile is None:
                # np.zeros maps fresh zero pages lazily: a new tile costs ~nothing.
                tile = (np.zeros((u, u), np.float32), np.zeros((u, u), np.float32))
                self._tiles[key] = tile
            ty, tx = key
            y0, x0 = max(gy0, ty * u), max(gx0, tx * u)
            y1, x1 = min(gy0 + fh, (ty + 1) * u), min(gx0 + fw, (tx + 1) * u)
            dst = (slice(y0 - ty * u, y1 - ty * u), slice(x0 - tx * u, x1 - tx * u))
            src = (slice(y0 - gy0, y1 - gy0), slice(x0 - gx0, x1 - gx0))
            s, wsum = tile[0][dst], tile[1][dst]
            # OpenCV writes through the views (rows contiguous); the product and
            # the sum in one pass cost ~35 % less than cv2.multiply, cv2.add.
            cv2.accumulateProduct(shifted[src], weight[src], s)
            cv2.accumulate(weight[src], wsum)

    def _reopen(self, key: tuple[int, int]) -> None:
        """Bring a written unit back into RAM as an accumulation tile (see module doc)."""
        if not self.reopen:
            raise MosaicError(
                f"{self.path}: a frame lands on unit {key}, already written "
                "(flush only regions no later frame touches, or use reopen=True)"
            )
        t0 = time.perf_counter()
        u = self.unit
        h, w = self.frame_shape
        ty, tx = key
        # The weight sum is sum_i outer(ry_i, rx_i) over the frames i that touched
        # the unit (ramps clipped to it, zero outside): one product Ry^T Rx.
        # einsum, not matmul: multi-threaded BLAS stalled re-opens to 15-20 ms
        # on the busy 2-core machine (its threads compete with zarr's and
        # blosc's); einsum is single-threaded, ~1.3 ms for 10 frames.
        frames = self._frames_in.get(key, array("q"))
        ry = np.zeros((len(frames), u), np.float32)
        rx = np.zeros((len(frames), u), np.float32)
        for row, n in enumerate(frames):
            gx0, gy0, fx, fy = self._geometry(*self._pos[n])
            ramp_y, ramp_x = self._ramp(h, fy), self._ramp(w, fx)
            y0, x0 = max(gy0, ty * u), max(gx0, tx * u)
            y1, x1 = min(gy0 + len(ramp_y), (ty + 1) * u), min(gx0 + len(ramp_x), (tx + 1) * u)
            ry[row, y0 - ty * u : y1 - ty * u] = ramp_y[y0 - gy0 : y1 - gy0]
            rx[row, x0 - tx * u : x1 - tx * u] = ramp_x[x0 - gx0 : x1 - gx0]
        weight = np.einsum("ki,kj->ij", ry, rx, optimize=False)
        self._wait_writes(key=key)
        if key in self._stored:
            stored = self._read_unit(key)
            total = cv2.multiply(stored, weight, dtype=cv2.CV_32F)
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
        # Rounds, saturates to 0..255 (cubic overshoot) and gives 0 where nothing landed.
        out = cv2.divide(total, weight, dtype=cv2.CV_8U)
        if key in self._stored or cv2.countNonZero(out):
            self._wait_writes(limit=_MAX_PENDING_WRITES - 1)
            self._pending[key] = self._writer.submit(self._store, key, out)
            self._stored.add(key)
            self.units_written += 1
        # An all-zero unit needs no file (fill value 0) but counts as written:
        # a later frame must re-open it to blend with the frames already in it.
        del self._tiles[key]
        self._written.add(key)

    def _unit_path(self, key: tuple[int, int]) -> Path | None:
        """Level-0 chunk file of a unit, when units are read and written directly.

        None with sharding (a unit is then a shard with its index): zarr does it.
        """
        if self.shard:
            return None
        return self.path / "0" / self._array.metadata.encode_chunk_key(key)

    def _store(self, key: tuple[int, int], out: np.ndarray) -> None:
        """Write one unit (on the writer thread)."""
        u = self.unit
        ty, tx = key
        path = self._unit_path(key)
        try:
            if path is None:
                self._array[ty * u : (ty + 1) * u, tx * u : (tx + 1) * u] = out
                return
            codec = self._unit_codec
            data = out.tobytes() if codec is None else codec.encode(out)
            if path.parent not in self._unit_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._unit_dirs.add(path.parent)
            # Written beside and renamed, as zarr does: readers never see half a chunk.
            tmp = path.with_name(path.name + ".partial")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise MosaicError(
                f"{self.path}: cannot write unit {key} ({exc.strerror or exc})"
            ) from exc

    def _read_unit(self, key: tuple[int, int]) -> np.ndarray:
        """The stored uint8 ``(unit, unit)`` pixels of a written unit."""
        u = self.unit
        ty, tx = key
        path = self._unit_path(key)
        try:
            if path is None:
                return np.asarray(self._array[ty * u : (ty + 1) * u, tx * u : (tx + 1) * u])
            data = path.read_bytes()
            codec = self._unit_codec
            raw = np.frombuffer(data if codec is None else codec.decode(data), np.uint8)
        except (OSError, RuntimeError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else None
            raise MosaicError(f"{self.path}: cannot re-open unit {key} ({reason or exc})") from exc
        if raw.size != u * u:
            raise MosaicError(
                f"{self.path}: cannot re-open unit {key} ({raw.size} bytes, expected {u * u})"
            )
        return raw.reshape(u, u)

    def sync(self) -> None:
        """Wait until every flushed unit is on disk (flush only queues the writes)."""
        self._wait_writes()

    def _wait_writes(self, limit: int = 0, key: tuple[int, int] | None = None) -> None:
        """Wait for pending writes: ``key``'s, or until at most ``limit`` are pending.

        A failed write raises here (never swallowed).
        """
        if key is not None:
            future = self._pending.pop(key, None)
            if future is not None:
                future.result()
            return
        while len(self._pending) > limit:
            oldest = next(iter(self._pending))
            self._pending.pop(oldest).result()

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
        self._wait_writes()
        self._writer.shutdown()
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
            units = self._relayout(ux0, uy0, shape)
            t2 = time.perf_counter()
            shapes = [shape]
            level = 1
            while max(shapes[-1]) > self.pyramid_max_side:
                units = self._build_level(level, shapes[-1], units)
                shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
                level += 1
            t3 = time.perf_counter()
            attrs = self._attributes(len(shapes), origin_xy, "final")
            attrs[ATTRS_KEY]["mosaic"]["frames"] = self._n
            self._group.update_attributes(attrs)
        except OSError as exc:
            raise MosaicError(f"{self.path}: finalize failed ({exc.strerror or exc})") from exc
        stored = sum(
            f.stat().st_size
            for k in range(len(shapes))
            for f in (self.path / str(k)).rglob("*")
            if f.is_file() and f.name != "zarr.json"
        )
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
            stored_bytes=stored,
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

    def _relayout(self, ux0: int, uy0: int, shape: tuple[int, int]) -> set[tuple[int, int]]:
        """Rename level-0 unit files so the box starts at 0; rewrite the array metadata.

        No pixel is copied: each unit file is renamed once.  Returns the
        level-0 unit indices that hold data, in the new numbering.
        """
        level_dir = self.path / "0"
        staging = self.path / _STAGING
        live_meta = self._array.metadata
        moves = []
        for ty, tx in sorted(self._stored):
            rel = live_meta.encode_chunk_key((ty, tx))
            moves.append((rel, (ty - uy0, tx - ux0)))
        chunk_root = level_dir / moves[0][0].split("/")[0] if moves else None
        if chunk_root is not None and chunk_root.exists():
            os.replace(chunk_root, staging)
        self._array = self._create_level("0", shape)
        kept: set[tuple[int, int]] = set()
        for rel, new in moves:
            src = staging / rel.split("/", 1)[1]
            dst = level_dir / self._array.metadata.encode_chunk_key(new)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            kept.add(new)
        if staging.exists():
            shutil.rmtree(staging)
        return kept

    def _build_level(
        self, level: int, prev_shape: tuple[int, int], prev_units: set[tuple[int, int]]
    ) -> set[tuple[int, int]]:
        """Level ``level`` as the 2x block mean of the previous one, unit by unit."""
        u = self.unit
        prev: Any = self._group[str(level - 1)]
        shape = ((prev_shape[0] + 1) // 2, (prev_shape[1] + 1) // 2)
        target = self._create_level(str(level), shape)
        out_units = sorted({(ty // 2, tx // 2) for ty, tx in prev_units})
        written: set[tuple[int, int]] = set()
        for ty, tx in out_units:
            y0, x0 = ty * u, tx * u
            y1, x1 = min(y0 + u, shape[0]), min(x0 + u, shape[1])
            src = np.asarray(
                prev[2 * y0 : min(2 * y1, prev_shape[0]), 2 * x0 : min(2 * x1, prev_shape[1])]
            )
            down = downsample_mean(src)
            if down.any():
                target[y0:y1, x0:x1] = down
                written.add((ty, tx))
        return written

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
