"""Specimens for the virtual SEM: an infinite plane of signal yield.

Two kinds satisfy the :class:`Specimen` protocol:

* :class:`ImageSpecimen` - a real micrograph, extended to the whole plane by
  mirror tiling so that traversals of any length stay on textured ground;
* :class:`ProceduralSpecimen` - the procedural eutectic of
  :mod:`drivers.sim.eutectic`, rendered in fixed tiles held in a small LRU
  cache, so memory stays bounded however long the traversal is.

Coordinates are specimen pixels; pixel ``(i, j)`` (row ``i``, column ``j``) is
centred at ``x = j, y = i``.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from cemi_stream.errors import ConfigError, SourceError
from drivers.base import to_gray8

from .eutectic import EutecticParams, render_eutectic

log = logging.getLogger(__name__)


@runtime_checkable
class Specimen(Protocol):
    """What the scanner needs from a specimen."""

    def region(self, x0: float, y0: float, width: int, height: int) -> np.ndarray:
        """Sample a ``width`` x ``height`` block with top-left at ``(x0, y0)``.

        Parameters
        ----------
        x0, y0 : float
            Specimen position of the block's top-left pixel, in pixels
            (sub-pixel positions are interpolated bilinearly).
        width, height : int
            Block size in pixels.

        Returns
        -------
        ndarray of float32
            ``(y, x)`` signal yield in ``0..1``, shape ``(height, width)``.
        """
        ...


def shift_subpixel(patch: np.ndarray, fx: float, fy: float, width: int, height: int) -> np.ndarray:
    """Resample ``patch`` at ``(x + fx, y + fy)`` for an output of the given size.

    Parameters
    ----------
    patch : ndarray of float32
        ``(y, x)`` source block, at least ``(height + 1, width + 1)`` when a
        fraction is non-zero.
    fx, fy : float
        Sub-pixel offsets in ``[0, 1)``, pixels.
    width, height : int
        Output size in pixels.

    Returns
    -------
    ndarray of float32
        ``(y, x)`` block of shape ``(height, width)``.

    Notes
    -----
    OpenCV's bilinear warp quantises positions to 1/32 px, far below the
    accuracy any registration reaches on noisy frames.
    """
    if fx == 0.0 and fy == 0.0:
        return np.ascontiguousarray(patch[:height, :width])
    matrix = np.array([[1.0, 0.0, fx], [0.0, 1.0, fy]], dtype=np.float64)
    out: np.ndarray = cv2.warpAffine(
        patch,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return out


def _split(x0: float) -> tuple[int, float]:
    """Integer pixel and fraction in ``[0, 1)`` of a coordinate."""
    base = math.floor(x0)
    return int(base), float(x0 - base)


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ConfigError(f"specimen region: size must be positive, not {width}x{height}")


class ImageSpecimen:
    """A real micrograph mirror-tiled over the whole plane.

    Parameters
    ----------
    image : ndarray
        ``(y, x)`` image (any dtype accepted by :func:`drivers.base.to_gray8`).
    scale : float
        Magnification applied first (``2.0`` doubles every feature), resampled
        with cubic (up) or area (down) interpolation.
    name : str
        Used in error messages.

    Notes
    -----
    Mirror tiling (reflection without repeating the edge pixel) keeps the
    plane continuous, so frames crossing a tile edge register normally; only
    the mirror symmetry betrays the repetition.
    """

    def __init__(self, image: np.ndarray, scale: float = 1.0, name: str = "specimen") -> None:
        if not scale > 0:
            raise ConfigError(f"specimen_scale must be > 0, not {scale}")
        gray = to_gray8(image, name=name)
        if scale != 1.0:
            interp = cv2.INTER_CUBIC if scale > 1.0 else cv2.INTER_AREA
            gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=interp)
        if gray.shape[0] < 2 or gray.shape[1] < 2:
            raise SourceError(f"{name}: image of {gray.shape[1]}x{gray.shape[0]} px is too small")
        self.image: np.ndarray = np.ascontiguousarray(gray, dtype=np.float32) * np.float32(1 / 255)
        self.name = name

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of one mirror tile in pixels."""
        h, w = self.image.shape
        return int(w), int(h)

    @staticmethod
    def _mirror(start: int, count: int, length: int) -> np.ndarray:
        """Reflect-101 indices of ``count`` pixels from ``start`` into ``0..length-1``."""
        idx = np.arange(start, start + count, dtype=np.int64) % (2 * length - 2)
        result: np.ndarray = np.where(idx >= length, 2 * length - 2 - idx, idx)
        return result

    def patch(self, ix: int, iy: int, width: int, height: int) -> np.ndarray:
        """Integer-aligned block ``(y, x)`` of the mirror-tiled plane (float32)."""
        h, w = self.image.shape
        if ix >= 0 and ix + width <= w and iy >= 0 and iy + height <= h:
            # A copy: callers may write into what they get.
            return self.image[iy : iy + height, ix : ix + width].copy()
        rows = self._mirror(iy, height, h)
        cols = self._mirror(ix, width, w)
        out: np.ndarray = self.image[rows[:, None], cols[None, :]]
        return out

    def region(self, x0: float, y0: float, width: int, height: int) -> np.ndarray:
        """Sample a block; see :meth:`Specimen.region`."""
        _check_size(width, height)
        ix, fx = _split(x0)
        iy, fy = _split(y0)
        extra = 1 if (fx or fy) else 0
        patch = self.patch(ix, iy, width + extra, height + extra)
        return shift_subpixel(patch, fx, fy, width, height)


class ProceduralSpecimen:
    """The procedural eutectic, rendered in cached tiles.

    Parameters
    ----------
    seed : int
        Specimen seed.
    tile_size : int
        Edge of the square tiles in pixels.
    max_tiles : int
        Capacity of the LRU tile cache; memory is at most
        ``max_tiles * tile_size**2 * 4`` bytes.
    params : EutecticParams or None
        Microstructure parameters.

    Notes
    -----
    The tile grid is an implementation detail: every tile is a pure function
    of global coordinates, so the plane is the same whatever ``tile_size``
    (to float32 rounding).
    """

    def __init__(
        self,
        seed: int = 0,
        tile_size: int = 256,
        max_tiles: int = 64,
        params: EutecticParams | None = None,
    ) -> None:
        if tile_size < 16:
            raise ConfigError(f"tile_size must be >= 16, not {tile_size}")
        if max_tiles < 1:
            raise ConfigError(f"max_tiles must be >= 1, not {max_tiles}")
        self.seed = int(seed)
        self.tile_size = int(tile_size)
        self.max_tiles = int(max_tiles)
        self.params = params or EutecticParams()
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.tiles_rendered = 0

    @property
    def cached_tiles(self) -> int:
        """Number of tiles currently held in the cache."""
        return len(self._tiles)

    def tile(self, tx: int, ty: int) -> np.ndarray:
        """Tile ``(tx, ty)`` as a read-only ``(y, x)`` float32 array."""
        key = (tx, ty)
        cached = self._tiles.get(key)
        if cached is not None:
            self._tiles.move_to_end(key)
            return cached
        n = self.tile_size
        data = render_eutectic(tx * n, ty * n, n, n, self.seed, self.params)
        data.setflags(write=False)
        self._tiles[key] = data
        self.tiles_rendered += 1
        while len(self._tiles) > self.max_tiles:
            self._tiles.popitem(last=False)
        return data

    def patch(self, ix: int, iy: int, width: int, height: int) -> np.ndarray:
        """Integer-aligned block ``(y, x)`` assembled from tiles (float32)."""
        n = self.tile_size
        out = np.empty((height, width), dtype=np.float32)
        tx0, tx1 = ix // n, (ix + width - 1) // n
        ty0, ty1 = iy // n, (iy + height - 1) // n
        needed = (tx1 - tx0 + 1) * (ty1 - ty0 + 1)
        if needed > self.max_tiles:
            # Growing the cache beats thrashing it inside a single request.
            log.debug("tile cache grown from %d to %d tiles", self.max_tiles, needed)
            self.max_tiles = needed
        for ty in range(ty0, ty1 + 1):
            ya = max(iy, ty * n)
            yb = min(iy + height, (ty + 1) * n)
            for tx in range(tx0, tx1 + 1):
                xa = max(ix, tx * n)
                xb = min(ix + width, (tx + 1) * n)
                data = self.tile(tx, ty)
                out[ya - iy : yb - iy, xa - ix : xb - ix] = data[
                    ya - ty * n : yb - ty * n, xa - tx * n : xb - tx * n
                ]
        return out

    def region(self, x0: float, y0: float, width: int, height: int) -> np.ndarray:
        """Sample a block; see :meth:`Specimen.region`."""
        _check_size(width, height)
        ix, fx = _split(x0)
        iy, fy = _split(y0)
        extra = 1 if (fx or fy) else 0
        patch = self.patch(ix, iy, width + extra, height + extra)
        return shift_subpixel(patch, fx, fy, width, height)


def read_image(path: Path) -> np.ndarray:
    """Decode an image file for use as a specimen.

    Parameters
    ----------
    path : Path
        Any file OpenCV or tifffile can decode.

    Returns
    -------
    ndarray
        The decoded image, before grey conversion.

    Raises
    ------
    SourceError
        When the file is missing or cannot be decoded; the message names the
        file and the reason.
    """
    if not path.exists():
        raise SourceError(f"{path}: specimen image not found")
    if not path.is_file():
        raise SourceError(f"{path}: specimen image is not a file")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is not None:
        return np.asarray(image)
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile

            data = np.asarray(tifffile.imread(str(path), key=0))
        except Exception as exc:  # tifffile raises many unrelated types on bad input
            raise SourceError(f"{path}: cannot decode specimen image ({exc})") from exc
        return data
    raise SourceError(f"{path}: cannot decode specimen image (not an image format OpenCV reads)")


def load_specimen(source: str | None, seed: int = 0, scale: float = 1.0) -> Specimen:
    """Build the specimen a :class:`drivers.sim.config.SimConfig` asks for.

    Parameters
    ----------
    source : str or None
        Path of a micrograph, or None for the procedural eutectic.
    seed : int
        Seed of the procedural specimen.
    scale : float
        Magnification factor (``specimen_scale``); for the procedural
        specimen it scales every length of the microstructure.

    Returns
    -------
    Specimen
        An :class:`ImageSpecimen` or a :class:`ProceduralSpecimen`.
    """
    if source is None:
        if not scale > 0:
            raise ConfigError(f"specimen_scale must be > 0, not {scale}")
        return ProceduralSpecimen(seed=seed, params=EutecticParams(scale=scale))
    path = Path(source).expanduser()
    image = read_image(path)
    log.info("specimen %s: %dx%d px, scale %.3g", path, image.shape[1], image.shape[0], scale)
    return ImageSpecimen(image, scale=scale, name=str(path))
