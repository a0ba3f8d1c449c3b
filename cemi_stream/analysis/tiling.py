"""What ``analyze`` reads: a mosaic (run directory or OME-Zarr) or images, cut into tiles.

Every source becomes one or more :class:`Image` values: a 2-D Dask array
``(y, x)`` (read lazily from the OME-Zarr level, or from a file), its name,
its pixel size and whether zeros mean "outside the specimen" (true for a
mosaic, whose uncovered area is 0).  :func:`tile_grid` cuts an image into
the paper's grid of ``W x H`` tiles (508 x 413 px by default), left to right
and top to bottom; a last partial column or row is kept when at least half a
tile wide, else dropped (as the paper's 19 x 243 grid of its mosaic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AnalysisError

DEFAULT_TILE = (508, 413)
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MOSAIC_DIR = "mosaic.ome.zarr"


@dataclass(frozen=True, slots=True)
class Image:
    """One image to analyse.

    Attributes
    ----------
    name : str
        Shown in ``tiles.csv`` (the file name, or ``mosaic``).
    array : dask.array.Array
        The pixels, 2-D ``(y, x)``, any integer or float dtype.
    pixel_size_um : float or None
        Size of one pixel of ``array`` in micrometres.
    zero_is_outside : bool
        Pixels equal to 0 are not specimen (a mosaic's uncovered area).
    level : int
        Pyramid level read (0 for images); one pixel spans ``2**level`` level-0 pixels.
    store : zarr.Array or None
        The zarr array behind ``array`` (a mosaic): tiles are then read from it
        directly, each task its own region, instead of rechunking the stored chunks.
    """

    name: str
    array: Any
    pixel_size_um: float | None
    zero_is_outside: bool
    level: int = 0
    store: Any = None


@dataclass(frozen=True, slots=True)
class TileSpec:
    """One tile: grid ``row``/``col`` and its pixel box ``[x0, x0 + w) x [y0, y0 + h)``."""

    row: int
    col: int
    x0: int
    y0: int
    w: int
    h: int


def _mosaic_images(path: Path, level: int) -> list[Image]:
    import dask.array as da
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs: dict[str, Any] = dict(group.attrs)
        ours: Any = attrs.get("cemi_stream") or {}
        meta: dict[str, Any] = (ours.get("mosaic") if isinstance(ours, dict) else None) or {}
        if meta.get("state") not in (None, "final"):
            raise AnalysisError(f"{path}: the mosaic is {meta.get('state')}, not finalised yet")
        levels = sorted(int(k) for k in group.array_keys() if str(k).isdigit())
        if level not in levels:
            raise AnalysisError(f"{path}: no level {level} (the pyramid has {levels})")
        arr = group[str(level)]
    except (OSError, KeyError, ValueError, zarr.errors.GroupNotFoundError) as exc:
        raise AnalysisError(f"{path}: not a readable OME-Zarr mosaic ({exc})") from None
    px = meta.get("pixel_size_um")
    if px is None:
        px = _ngff_pixel_size(attrs)
    pixel = float(px) * 2**level if px else None
    return [Image("mosaic", da.from_zarr(arr), pixel, True, level, store=arr)]


def _ngff_pixel_size(attrs: dict[str, Any]) -> float | None:
    """Level-0 pixel size in µm from NGFF multiscales metadata, when its unit is micrometer."""
    try:
        ms = (attrs.get("ome") or attrs)["multiscales"][0]
        axes = ms["axes"]
        if axes[-1].get("unit") != "micrometer":
            return None
        scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
        return float(scale[-1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _read_image(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise AnalysisError(f"{path}: cannot be read as an image")
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)
    if image.ndim != 2:
        raise AnalysisError(f"{path}: expected a 2-D grey image, got shape {image.shape}")
    return np.asarray(image)


def open_images(source: str | Path, *, level: int = 0,
                pixel_size_um: float | None = None) -> list[Image]:  # fmt: skip
    """The images of ``source``: a run directory, an OME-Zarr mosaic, an image or a folder.

    Parameters
    ----------
    source : str or Path
        Run directory (its ``mosaic.ome.zarr``), the mosaic's zarr group, one
        image file, or a folder of image files (each its own tile grid).
    level : int
        Pyramid level of a mosaic (0 = full resolution).
    pixel_size_um : float or None
        Pixel size (µm) of images, whose files rarely say; a mosaic's own
        metadata wins over it.

    Raises
    ------
    AnalysisError
        No such source, no images in a folder, an unreadable file or mosaic.
    """
    import dask.array as da

    path = Path(source)
    if not path.exists():
        raise AnalysisError(f"{path}: no such file or folder")
    if level < 0:
        raise AnalysisError(f"--level {level}: must be >= 0")
    if (path / MOSAIC_DIR / "zarr.json").is_file():
        return _mosaic_images(path / MOSAIC_DIR, level)
    if (path / "zarr.json").is_file():
        return _mosaic_images(path, level)
    if level:
        raise AnalysisError(f"--level {level}: only a mosaic has pyramid levels")
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )  # fmt: skip
    if not files:
        raise AnalysisError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    out = []
    for f in files:
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            raise AnalysisError(f"{f}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
        image = _read_image(f)
        out.append(Image(f.name, da.from_array(image, chunks=image.shape), pixel_size_um, False))
    return out


def tile_size_px(
    tile: tuple[int, int] | None, tile_um: tuple[float, float] | None, pixel_size_um: float | None
) -> tuple[int, int]:
    """Tile ``(width, height)`` in pixels from ``--tile`` or ``--tile-um``.

    Raises
    ------
    AnalysisError
        Both given, ``--tile-um`` without a pixel size, or a tile under 16 px.
    """
    if tile is not None and tile_um is not None:
        raise AnalysisError("--tile and --tile-um: give one of them")
    if tile_um is not None:
        if not pixel_size_um:
            raise AnalysisError("--tile-um: the pixel size is not known (give --tile in pixels)")
        w, h = (max(round(v / pixel_size_um), 1) for v in tile_um)
    else:
        w, h = tile if tile is not None else DEFAULT_TILE
    if w < 16 or h < 16:
        raise AnalysisError(f"tile {w}x{h} px: tiles must be at least 16 x 16 px")
    return w, h


def tile_grid(shape: tuple[int, int], w: int, h: int) -> list[TileSpec]:
    """The grid of ``w x h`` tiles over an image of ``shape`` ``(height, width)``."""
    height, width = shape
    cols = width // w + (1 if width % w >= w / 2 else 0)
    rows = height // h + (1 if height % h >= h / 2 else 0)
    if cols == 0 or rows == 0:  # an image smaller than half a tile: one tile of it all
        return [TileSpec(0, 0, 0, 0, width, height)]
    return [
        TileSpec(r, c, c * w, r * h, min(w, width - c * w), min(h, height - r * h))
        for r in range(rows)
        for c in range(cols)
    ]


def parse_pair(text: str, what: str, kind: type) -> tuple[Any, Any]:
    """``"508x413"`` or ``"50,40"`` as a pair of ``kind``."""
    parts = text.lower().replace("x", ",").split(",")
    try:
        a, b = (kind(p.strip()) for p in parts)
    except ValueError:
        raise AnalysisError(f"{what} {text!r}: expected two numbers, e.g. 508x413") from None
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        raise AnalysisError(f"{what} {text!r}: both must be positive")
    return a, b
