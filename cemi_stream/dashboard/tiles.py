"""Deep-zoom tiles of a run's mosaic, rendered by the daemon from the OME-Zarr on disk.

The stitcher writes the mosaic's level-0 chunks (:mod:`cemi_stream.stitch.chunks`)
atomically, one file per chunk, while the run goes on; the finalised mosaic
adds the pyramid.  The dashboard never asks the stitcher for anything: it
reads those files, so watching a run costs the acquisition nothing but disk
reads.

Tile grid
---------
Tiles are :data:`TILE_PX` square and live on one global grid in *mosaic
pixels* (:mod:`cemi_stream.stitch.mosaic`), the same while the run is live
and after it is finalised (the finalisation moves chunk files, not pixels).
Tile ``(k, tx, ty)`` covers mosaic pixels ``[tx * S, (tx + 1) * S) x
[ty * S, (ty + 1) * S)`` with ``S = TILE_PX * 2**k``, downsampled ``2**k``
times (block means, as the pyramid).  ``tx``/``ty`` may be negative.

Versions
--------
:class:`ChunkIndex` keeps the modification time (µs) of every level-0 chunk
file; a tile's version is the newest time of the chunks it covers.  Tile URLs
carry it (``?v=``), so a browser caches a tile for good and fetches it again
only when one of its chunks was rewritten; the changed chunks are what the
run's event feed announces (:mod:`cemi_stream.dashboard.feed`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import CemiError
from ..stitch.chunks import unit_codec
from ..stitch.mosaic import ATTRS_KEY, MosaicError, open_mosaic

log = logging.getLogger(__name__)

TILE_PX = 512
#: Coarsest zoom exponent served (one tile spans 512 * 2**20 px: far beyond any mosaic).
MAX_LEVEL = 20
MOSAIC_DIR = "mosaic.ome.zarr"
#: PNG encodings of tiles kept (each ~50-250 kB).
PNG_CACHE = 256


class TileError(CemiError):
    """A tile that cannot be served (out of range, mosaic unreadable)."""


@dataclass(frozen=True, slots=True)
class MosaicState:
    """What :class:`ChunkIndex` knows of a mosaic.

    Attributes
    ----------
    state : str
        ``none`` (no mosaic yet), ``live``, ``finalizing`` or ``final``.
    unit_px : int
        Side of a level-0 chunk, pixels.
    origin_xy : (int, int)
        Mosaic pixel of level-0 array element ``(0, 0)``.
    pixel_size_um : float or None
        Level-0 pixel size, micrometres.
    frame_shape : (int, int) or None
        ``(height, width)`` of the frames, pixels.
    levels : int
        Pyramid levels on disk (1 while live).
    compression : str
        Codec of the level-0 chunk files (``lz4``, ``zstd`` or ``none``).
    sharded : bool
        Chunks are inside shards (then zarr reads them).
    """

    state: str = "none"
    unit_px: int = 1024
    origin_xy: tuple[int, int] = (0, 0)
    pixel_size_um: float | None = None
    frame_shape: tuple[int, int] | None = None
    levels: int = 0
    compression: str = "lz4"
    sharded: bool = False


def _read_state(path: Path) -> MosaicState:
    import json

    try:
        group = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
        meta = group["attributes"][ATTRS_KEY]["mosaic"]
        state = str(meta["state"])
        origin = tuple(int(v) for v in meta["origin_xy_px"])
        unit = int(meta.get("shard_px") or meta["chunk_px"])
    except (OSError, ValueError, KeyError, TypeError):
        return MosaicState()
    shape = meta.get("frame_shape")
    levels = sum(1 for k in range(32) if (path / str(k) / "zarr.json").is_file())
    return MosaicState(
        state=state,
        unit_px=unit,
        origin_xy=(origin[0], origin[1]),
        pixel_size_um=meta.get("pixel_size_um"),
        frame_shape=(int(shape[0]), int(shape[1])) if isinstance(shape, list) else None,
        levels=levels,
        compression=str(meta.get("compression") or "lz4"),
        sharded=bool(meta.get("shard_px")),
    )


class ChunkIndex:
    """The level-0 chunk files of a mosaic and their versions, kept up to date by :meth:`scan`.

    Parameters
    ----------
    mosaic_dir : Path
        The mosaic's zarr group (``RUN_DIR/mosaic.ome.zarr``).

    Notes
    -----
    Chunk ``(cx, cy)`` is the unit covering mosaic pixels ``[cx * U, (cx + 1) * U)
    x [cy * U, (cy + 1) * U)`` (the live and the final origins are unit-aligned).
    :meth:`scan` reads only the chunk rows whose folder changed since the last
    scan (a chunk file is renamed into place, which changes its folder).
    """

    def __init__(self, mosaic_dir: Path) -> None:
        self.path = Path(mosaic_dir)
        self.mosaic = MosaicState()
        self.versions: dict[tuple[int, int], int] = {}
        self._row_mtimes: dict[str, int] = {}
        self._group_mtime = -1
        self._lock = threading.Lock()

    def scan(self) -> dict[tuple[int, int], int]:
        """Look at the files again; returns the chunks new or rewritten since the last scan."""
        with self._lock:
            try:
                group_mtime = (self.path / "zarr.json").stat().st_mtime_ns
            except OSError:
                return {}
            if group_mtime != self._group_mtime:
                state = _read_state(self.path)
                if state.state == "finalizing":
                    return {}  # chunk files are being moved: keep what we know
                old = (self.mosaic.state, self.mosaic.origin_xy)
                relaid = (state.state, state.origin_xy) != old
                self.mosaic = state
                self._group_mtime = group_mtime
                if relaid:
                    self._row_mtimes.clear()  # every chunk has another file index now
            if self.mosaic.state not in ("live", "final"):
                return {}
            changed: dict[tuple[int, int], int] = {}
            seen: dict[tuple[int, int], int] = {}
            rows_dir = self.path / "0" / "c"
            unit = self.mosaic.unit_px
            ox, oy = self.mosaic.origin_xy
            try:
                rows = list(os.scandir(rows_dir))
            except OSError:
                return {}
            full = not self._row_mtimes
            for row in rows:
                if not row.name.isdigit():
                    continue
                try:
                    mtime = row.stat().st_mtime_ns
                except OSError:
                    continue
                if not full and self._row_mtimes.get(row.name) == mtime:
                    continue
                self._row_mtimes[row.name] = mtime
                iy = int(row.name)
                try:
                    entries = list(os.scandir(row.path))
                except OSError:
                    continue
                for entry in entries:
                    if not entry.name.isdigit():
                        continue
                    try:
                        version = entry.stat().st_mtime_ns // 1000
                    except OSError:
                        continue
                    key = (ox // unit + int(entry.name), oy // unit + iy)
                    seen[key] = version
            if full:
                self.versions = {}
            for key, version in seen.items():
                if self.versions.get(key) != version:
                    changed[key] = version
                    self.versions[key] = version
            return changed

    def bounds(self) -> tuple[int, int, int, int] | None:
        """``(x0, y0, x1, y1)`` in mosaic pixels of the chunks written so far, or None."""
        with self._lock:
            if not self.versions:
                return None
            unit = self.mosaic.unit_px
            xs = [k[0] for k in self.versions]
            ys = [k[1] for k in self.versions]
            return min(xs) * unit, min(ys) * unit, (max(xs) + 1) * unit, (max(ys) + 1) * unit

    def version(self, level: int, tx: int, ty: int) -> int:
        """Version of tile ``(level, tx, ty)``: the newest of its chunks (0 when none)."""
        span = TILE_PX * 2**level
        unit = self.mosaic.unit_px
        cx0, cy0 = (tx * span) // unit, (ty * span) // unit
        cx1, cy1 = -(-((tx + 1) * span) // unit), -(-((ty + 1) * span) // unit)
        with self._lock:
            if (cx1 - cx0) * (cy1 - cy0) <= len(self.versions):
                got = (
                    self.versions.get((cx, cy), 0)
                    for cy in range(cy0, cy1)
                    for cx in range(cx0, cx1)
                )
            else:
                got = (
                    v for (cx, cy), v in self.versions.items()
                    if cx0 <= cx < cx1 and cy0 <= cy < cy1
                )  # fmt: skip
            return max(got, default=0)

    def snapshot(self) -> dict[str, Any]:
        """The index as the event feed sends it: unit, state, and ``[cx, cy, version]`` rows."""
        with self._lock:
            return {
                "unit_px": self.mosaic.unit_px,
                "state": self.mosaic.state,
                "chunks": [[cx, cy, v] for (cx, cy), v in sorted(self.versions.items())],
            }


class TileRenderer:
    """Tiles of one mosaic, with a bounded cache of tile arrays keyed by version.

    Parameters
    ----------
    index : ChunkIndex
        The mosaic's chunk index (scanned by the caller; :meth:`render` scans
        it when it has never been).
    cache_bytes : int
        Most bytes of tile arrays of levels 0 and 1 kept (least recently used
        dropped first).
    coarse_cache_bytes : int
        The same for levels >= 2.  These are few (a quarter of the level
        below, each) and each one stands for many chunk reads, so they get a
        budget of their own: a chunk rewritten while a whole paper-sized
        mosaic is in view then costs one chunk read and a resize per level,
        not a read of every chunk.

    Notes
    -----
    Level 0 and 1 tiles are read from level 0 (one tile of level 1 is one
    1024 px chunk at the default chunk size); coarser ones are composed of
    their four children, or read from the finalised pyramid when it has the
    level.
    """

    def __init__(
        self,
        index: ChunkIndex,
        cache_bytes: int = 64 * 2**20,
        coarse_cache_bytes: int = 128 * 2**20,
    ) -> None:
        self.index = index
        self.cache_bytes = cache_bytes
        self.coarse_cache_bytes = coarse_cache_bytes
        self._cache: OrderedDict[tuple[int, int, int], tuple[int, np.ndarray]] = OrderedDict()
        self._coarse: OrderedDict[tuple[int, int, int], tuple[int, np.ndarray]] = OrderedDict()
        self._cached_bytes = 0
        self._coarse_bytes = 0
        self._pngs: OrderedDict[tuple[int, int, int, int], bytes] = OrderedDict()
        # Versions of the four children each coarse tile was made from.
        self._children: dict[tuple[int, int, int], tuple[int, ...]] = {}
        self._views: dict[int, Any] = {}
        self._views_key: tuple[str, tuple[int, int], int] | None = None
        self._lock = threading.Lock()

    def _view(self, level: int) -> Any:
        m = self.index.mosaic
        key = (m.state, m.origin_xy, m.levels)
        if key != self._views_key:
            self._views = {}
            self._views_key = key
        if level not in self._views:
            self._views[level] = open_mosaic(self.index.path, level)
        return self._views[level]

    def _get(self, key: tuple[int, int, int], version: int) -> np.ndarray | None:
        cache = self._coarse if key[0] >= 2 else self._cache
        with self._lock:
            hit = cache.get(key)
            if hit is None or hit[0] != version:
                return None
            cache.move_to_end(key)
            return hit[1]

    def _put(self, key: tuple[int, int, int], version: int, tile: np.ndarray) -> None:
        coarse = key[0] >= 2
        cache = self._coarse if coarse else self._cache
        budget = self.coarse_cache_bytes if coarse else self.cache_bytes
        with self._lock:
            used = self._coarse_bytes if coarse else self._cached_bytes
            old = cache.pop(key, None)
            if old is not None:
                used -= old[1].nbytes
            cache[key] = (version, tile)
            used += tile.nbytes
            while used > budget and cache:
                gone, (_, dropped) = cache.popitem(last=False)
                used -= dropped.nbytes
                self._children.pop(gone, None)
            if coarse:
                self._coarse_bytes = used
            else:
                self._cached_bytes = used

    def tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        """Tile ``(level, tx, ty)`` as uint8 ``(TILE_PX, TILE_PX)`` ``(y, x)``; zeros where empty.

        Raises
        ------
        TileError
            A level outside ``0..MAX_LEVEL``, or the mosaic cannot be read.
        """
        if not 0 <= level <= MAX_LEVEL:
            raise TileError(f"tile level {level}: outside 0..{MAX_LEVEL}")
        version = self.index.version(level, tx, ty)
        if version == 0:
            return np.zeros((TILE_PX, TILE_PX), np.uint8)
        key = (level, tx, ty)
        hit = self._get(key, version)
        if hit is not None:
            return hit
        m = self.index.mosaic
        span = TILE_PX * 2**level
        try:
            direct = self._direct(level, tx, ty)
            if direct is not None:
                out = direct
            elif level == 0 or (m.state == "final" and level < m.levels):
                view = self._view(level)
                out = view.region(tx * span, ty * span, (tx + 1) * span, (ty + 1) * span)
                out = np.ascontiguousarray(out[:TILE_PX, :TILE_PX])
            elif level == 1:
                region = self._view(0).region(
                    tx * span, ty * span, (tx + 1) * span, (ty + 1) * span
                )
                out = cv2.resize(region, (TILE_PX, TILE_PX), interpolation=cv2.INTER_AREA)
            else:
                # Incremental: a quadrant whose child has the version it had when this
                # tile was last made is taken from that tile, so a changed chunk
                # costs one chunk read and one resize per level, even when the
                # unchanged children are no longer cached.
                with self._lock:
                    old = self._coarse.get(key)
                    before = self._children.get(key)
                out = old[1].copy() if old is not None else np.zeros((TILE_PX, TILE_PX), np.uint8)
                half = TILE_PX // 2
                children = []
                for dy in (0, 1):
                    for dx in (0, 1):
                        cx, cy = 2 * tx + dx, 2 * ty + dy
                        cv = self.index.version(level - 1, cx, cy)
                        children.append(cv)
                        if old is not None and before is not None and before[2 * dy + dx] == cv:
                            continue
                        child = self.tile(level - 1, cx, cy)
                        out[dy * half : (dy + 1) * half, dx * half : (dx + 1) * half] = (
                            cv2.resize(child, (half, half), interpolation=cv2.INTER_AREA)
                            if child.any()
                            else 0
                        )
                with self._lock:
                    self._children[key] = tuple(children)
        except (MosaicError, OSError, ValueError, KeyError) as exc:
            raise TileError(f"{self.index.path}: cannot read tile {key} ({exc})") from exc
        self._put(key, version, out)
        return out

    def _chunk(self, cx: int, cy: int) -> np.ndarray | None:
        """Level-0 chunk ``(cx, cy)`` (mosaic chunk indices) read from its file, or None.

        About 1 ms for a 1024 px lz4 chunk, several times less than through
        zarr's pipeline; this is what a changed chunk costs the dashboard.
        """
        m = self.index.mosaic
        u = m.unit_px
        ix, iy = cx - m.origin_xy[0] // u, cy - m.origin_xy[1] // u
        path = self.index.path / "0" / "c" / str(iy) / str(ix)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        codec = unit_codec(m.compression)
        raw = np.frombuffer(data if codec is None else codec.decode(data), np.uint8)
        if raw.size != u * u:
            raise TileError(f"{path}: {raw.size} bytes, expected {u * u}")
        return raw.reshape(u, u)

    def _direct(self, level: int, tx: int, ty: int) -> np.ndarray | None:
        """Tiles of levels 0 and 1 straight from one chunk file, when the layout allows."""
        m = self.index.mosaic
        u = m.unit_px
        span = TILE_PX * 2**level
        if m.sharded or level > 1 or u % span or (m.origin_xy[0] % u) or (m.origin_xy[1] % u):
            return None
        cx, cy = (tx * span) // u, (ty * span) // u
        chunk = self._chunk(cx, cy)
        if chunk is None:
            return np.zeros((TILE_PX, TILE_PX), np.uint8)
        ox, oy = tx * span - cx * u, ty * span - cy * u
        part = chunk[oy : oy + span, ox : ox + span]
        if level == 0:
            return np.ascontiguousarray(part)
        return cv2.resize(part, (TILE_PX, TILE_PX), interpolation=cv2.INTER_AREA)

    def png(self, level: int, tx: int, ty: int) -> bytes:
        """Tile ``(level, tx, ty)`` encoded as PNG (fast compression: tiles are many).

        The last :data:`PNG_CACHE` encodings are kept by version: several pages
        watching one run ask for the same tiles.
        """
        key = (level, tx, ty, self.index.version(level, tx, ty))
        with self._lock:
            hit = self._pngs.get(key)
            if hit is not None:
                self._pngs.move_to_end(key)
                return hit
        ok, buf = cv2.imencode(".png", self.tile(level, tx, ty), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise TileError(f"tile {(level, tx, ty)}: PNG encoding failed")
        body = bytes(buf)
        with self._lock:
            self._pngs[key] = body
            while len(self._pngs) > PNG_CACHE:
                self._pngs.popitem(last=False)
        return body
