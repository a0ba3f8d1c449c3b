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
from collections.abc import Callable
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
#: How tiles and frame thumbnails are encoded: zlib's fastest level, its RLE strategy
#: and the one "sub" filter.  On the paper-sized run's tiles this costs a third of
#: the CPU of level 1 with the default strategy and libpng's trial of every filter on
#: every row (a level-7 tile, mostly empty margin: 0.8 vs 2.7 ms; a full level-0 tile
#: 2.9 vs 7.8 ms; a 384 px thumbnail 1.2 vs 3.4 ms), for sizes within -3..+3 % of it:
#: on noisy micrographs deflate finds few long matches, and "sub" is the filter the
#: trials mostly pick.
PNG_PARAMS = (cv2.IMWRITE_PNG_COMPRESSION, 1,
              cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
              cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB)  # fmt: skip


class TileError(CemiError):
    """A tile that cannot be served (out of range, mosaic unreadable)."""


def encode_png(image: np.ndarray) -> bytes:
    """``image`` as PNG bytes, encoded with :data:`PNG_PARAMS`.

    Raises
    ------
    TileError
        The encoder refused the image.
    """
    ok, buf = cv2.imencode(".png", image, list(PNG_PARAMS))
    if not ok:
        raise TileError(f"PNG encoding of a {image.shape} {image.dtype} image failed")
    return buf.tobytes()


class BytesCache:
    """A bounded LRU cache of encoded images where each key is made once, however many ask.

    Parameters
    ----------
    size : int
        Most entries kept (least recently used dropped first).

    Notes
    -----
    Dashboards watching one run are told of a change by the same event, within
    the feed's poll interval of each other, and all ask for the same images at
    once.  A plain check-then-encode cache then encodes each of them once per
    dashboard, since the answers are all still being made when the others
    ask; here the first caller makes it and the others wait for its bytes.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._making: dict[Any, threading.Event] = {}
        self._lock = threading.Lock()
        #: Entries made (for the tests and benchmarks: makes versus requests).
        self.made = 0

    def peek(self, key: Any) -> bytes | None:
        """The bytes kept for ``key``, or None; never waits for them to be made."""
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def get(self, key: Any, make: Callable[[], bytes]) -> bytes:
        """The bytes kept for ``key``, made by ``make()`` when there are none.

        Parameters
        ----------
        key : hashable
            What the bytes are of (with their version).
        make : callable
            ``() -> bytes``; called in this thread, and by one caller at a
            time per key.  What it raises goes to its caller only: a waiting
            caller then calls ``make`` itself.
        """
        while True:
            with self._lock:
                hit = self._items.get(key)
                if hit is not None:
                    self._items.move_to_end(key)
                    return hit
                pending = self._making.get(key)
                if pending is None:
                    self._making[key] = threading.Event()
                    break
            pending.wait()
        try:
            body = make()
            with self._lock:
                self.made += 1
                self._items[key] = body
                self._items.move_to_end(key)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            return body
        finally:
            with self._lock:
                done = self._making.pop(key)
            done.set()


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

    It also keeps the bounds and the tile versions of each level asked for:
    each tile request asks for them (several times for a composed coarse tile),
    and working them out from the chunks each time cost a pass over all of them
    per request on a paper-sized mosaic (~850 chunks), while a scan changes a
    few dozen chunks, i.e. one entry per level each.
    """

    def __init__(self, mosaic_dir: Path) -> None:
        self.path = Path(mosaic_dir)
        self.mosaic = MosaicState()
        self.versions: dict[tuple[int, int], int] = {}
        self._row_mtimes: dict[str, int] = {}
        self._group_mtime = -1
        self._lock = threading.Lock()
        # Per level asked for: (tx, ty) -> version, for the chunk size _tiles_unit.
        self._tiles: dict[int, dict[tuple[int, int], int]] = {}
        self._tiles_unit = 0
        self._bounds: tuple[int, int, int, int] | None = None

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
            older = False
            for key, version in seen.items():
                before = self.versions.get(key)
                if before != version:
                    changed[key] = version
                    self.versions[key] = version
                    older = older or (before is not None and version < before)
            if full or older or unit != self._tiles_unit:
                # Tile versions are maxima: a chunk whose time went back (a clock set
                # back) or a new layout needs them worked out again from all chunks.
                self._tiles = {}
                self._tiles_unit = unit
                self._bounds = None
                changed_now = self.versions
            else:
                changed_now = changed
            for key, version in changed_now.items():
                self._add_bounds(key)
                for level, tiles in self._tiles.items():
                    self._add_chunk(tiles, level, key, version)
            return changed

    def _add_bounds(self, key: tuple[int, int]) -> None:
        # Under the lock: chunk `key` is written.
        unit = self._tiles_unit
        x0, y0 = key[0] * unit, key[1] * unit
        b = self._bounds
        self._bounds = (
            (x0, y0, x0 + unit, y0 + unit) if b is None
            else (min(b[0], x0), min(b[1], y0), max(b[2], x0 + unit), max(b[3], y0 + unit))
        )  # fmt: skip

    def _add_chunk(
        self, tiles: dict[tuple[int, int], int], level: int, key: tuple[int, int], version: int
    ) -> None:
        # Under the lock: chunk `key` now has `version`; raise the tiles of `level` over it.
        unit = self._tiles_unit
        span = TILE_PX << level
        x0, y0 = key[0] * unit, key[1] * unit
        if span % unit == 0:  # the chunk lies in one tile (most levels): the quick way
            at = (x0 // span, y0 // span)
            if tiles.get(at, 0) < version:
                tiles[at] = version
            return
        for ty in range(y0 // span, (y0 + unit - 1) // span + 1):  # the tiles overlapping it
            for tx in range(x0 // span, (x0 + unit - 1) // span + 1):
                if tiles.get((tx, ty), 0) < version:
                    tiles[(tx, ty)] = version

    def bounds(self) -> tuple[int, int, int, int] | None:
        """``(x0, y0, x1, y1)`` in mosaic pixels of the chunks written so far, or None."""
        with self._lock:
            return self._bounds

    def version(self, level: int, tx: int, ty: int) -> int:
        """Version of tile ``(level, tx, ty)``: the newest of its chunks (0 when none).

        The first call for a level works its versions out from all chunks; the
        scans keep them up to date from then on.
        """
        with self._lock:
            tiles = self._tiles.get(level)
            if tiles is None:
                tiles = self._tiles[level] = {}
                for key, version in self.versions.items():
                    self._add_chunk(tiles, level, key, version)
            return tiles.get((tx, ty), 0)

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
        self.pngs = BytesCache(PNG_CACHE)
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
                        # (No test for an empty child first: it costs more than the resize.)
                        small = cv2.resize(child, (half, half), interpolation=cv2.INTER_AREA)
                        out[dy * half : (dy + 1) * half, dx * half : (dx + 1) * half] = small
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

        The last :data:`PNG_CACHE` encodings are kept by version, and each one is
        made once: several pages watching one run ask for the same tiles at the
        same time.
        """
        key = (level, tx, ty, self.index.version(level, tx, ty))
        return self.pngs.get(key, lambda: encode_png(self.tile(level, tx, ty)))

    def cached_png(self, level: int, tx: int, ty: int) -> bytes | None:
        """The PNG of the tile's current version when it is kept, else None (never renders)."""
        return self.pngs.peek((level, tx, ty, self.index.version(level, tx, ty)))
