"""Chunk storage of a mosaic: the zarr v3 group, direct unit I/O, the background writer.

Storage layout (zarr v3, OME-Zarr 0.5 once finalised)
-----------------------------------------------------
``path`` is a zarr v3 group; level ``k`` of the pyramid is the array ``"k"``
(``uint8``, ``dimension_names ["y", "x"]``, fill value 0, default chunk key
encoding ``c/<iy>/<ix>``).  The unit of writing - a *unit* - is the storage
chunk, or the shard when sharding is on: a unit is always written whole, in
one call, from a RAM tile of exactly its size, never read-modify-written.
Units are indexed ``(ty, tx)`` (row, column of units); unit ``(ty, tx)`` holds
array elements ``[ty * unit, (ty + 1) * unit)`` x ``[tx * unit, (tx + 1) * unit)``.

While the run is live, level 0 is a very large *virtual* array (zarr arrays
are sparse, unwritten chunks cost nothing), so anyone can open it at any time:
each chunk file is written beside and renamed into place, atomically;
unsharded units are encoded with the array's own codec and written directly,
sharded ones through zarr.  :meth:`ChunkStore.relayout` later renames the
chunk files of the unit-aligned bounding box so that it starts at array index
0 and rewrites the array metadata with the tight shape (no pixel data is
copied); level-0 files not yet moved when it fails midway are in
``path/.finalize-units``.

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

Not thread-safe: one owner per store; only the store's own writer thread
runs beside it.  Nothing is fsynced (the mosaic is derived data).
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from ..errors import CemiError

_MAX_PENDING_WRITES = 8  # ~8 MiB of finished tiles waiting for the disk
_STAGING = ".finalize-units"


class MosaicError(CemiError):
    """The mosaic could not be created, blended, written or read."""


def _compressors(name: str) -> list[Any] | None:
    if name == "none":
        return None
    if name == "zstd":
        return [ZstdCodec(level=1)]
    if name == "lz4":
        return [BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")]
    raise MosaicError(f"mosaic: unknown compression {name!r} (none, zstd or lz4)")


def unit_codec(name: str) -> numcodecs.abc.Codec | None:
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


class ChunkStore:
    """The zarr group of one mosaic and the whole-unit writes and reads of its level 0.

    Parameters
    ----------
    path : Path
        Directory of the zarr v3 group (created by :meth:`create`).
    chunk : int
        Storage chunk side in pixels.
    shard : int or None
        Shard side in pixels, or None for no sharding.
    compression : {"lz4", "none", "zstd"}
        Chunk compression (see the module docstring).

    Raises
    ------
    MosaicError
        Unknown compression.

    Attributes
    ----------
    unit : int
        Side of a write unit (chunk, or shard when sharding) in pixels.
    stored : set of (int, int)
        Level-0 units that have a chunk file (or a pending write).
    group, array : zarr.Group, zarr.Array
        The group and its level-0 array, once :meth:`create` has run.
    """

    def __init__(self, path: Path, *, chunk: int, shard: int | None, compression: str) -> None:
        self.path = path
        self.chunk = chunk
        self.shard = shard
        self.unit = int(shard or chunk)
        self._codecs = _compressors(compression)
        self._unit_codec = unit_codec(compression)
        self._unit_dirs: set[Path] = set()  # chunk directories known to exist
        self.stored: set[tuple[int, int]] = set()
        # Chunk writes run on one background thread, overlapping the blending;
        # a re-open of a unit waits for its own pending write.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mosaic-write")
        self._pending: dict[tuple[int, int], Future[None]] = {}
        self.group: Any = None
        self.array: Any = None

    def prepare_dir(self, overwrite: bool) -> None:
        """Make way for :meth:`create`: the parent exists, ``path`` does not.

        An existing ``path`` is removed only with ``overwrite`` and only when it
        is a zarr group or an empty directory; otherwise :class:`MosaicError`.
        """
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

    def create(self, extent: int) -> Any:
        """Create the group and the live ``extent`` x ``extent`` level 0; return the group.

        Raises what zarr raises (OSError, zarr's contains-errors): the caller
        names the failure.
        """
        self.group = zarr.open_group(str(self.path), mode="w-", zarr_format=3)
        self.array = self.create_level("0", (extent, extent))
        return self.group

    def create_level(self, name: str, shape: tuple[int, int]) -> Any:
        """Create (or replace) the uint8 ``(y, x)`` array ``name`` of ``shape`` pixels."""
        return self.group.create_array(
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
            # machine); the canvas skips empty units itself.
            config={"write_empty_chunks": True},
        )

    def stored_bytes(self, levels: int) -> int:
        """Bytes of all chunk files of levels ``0 .. levels - 1`` (metadata excluded)."""
        return sum(
            f.stat().st_size
            for k in range(levels)
            for f in (self.path / str(k)).rglob("*")
            if f.is_file() and f.name != "zarr.json"
        )

    # ------------------------------------------------------------------ units

    def _unit_path(self, key: tuple[int, int]) -> Path | None:
        """Level-0 chunk file of a unit, when units are read and written directly.

        None with sharding (a unit is then a shard with its index): zarr does it.
        """
        if self.shard:
            return None
        return self.path / "0" / self.array.metadata.encode_chunk_key(key)

    def submit(self, key: tuple[int, int], out: np.ndarray) -> None:
        """Queue the write of unit ``key`` (uint8 ``(unit, unit)``) on the writer thread.

        Waits first while too many writes are pending, so finished tiles do not
        pile up in RAM; an earlier failed write raises here.
        """
        self.wait(limit=_MAX_PENDING_WRITES - 1)
        self._pending[key] = self._writer.submit(self._write, key, out)
        self.stored.add(key)

    def _write(self, key: tuple[int, int], out: np.ndarray) -> None:
        """Write one unit (on the writer thread)."""
        u = self.unit
        ty, tx = key
        path = self._unit_path(key)
        try:
            if path is None:
                self.array[ty * u : (ty + 1) * u, tx * u : (tx + 1) * u] = out
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

    def read(self, key: tuple[int, int]) -> np.ndarray:
        """The stored uint8 ``(unit, unit)`` pixels of a written unit."""
        u = self.unit
        ty, tx = key
        path = self._unit_path(key)
        try:
            if path is None:
                return np.asarray(self.array[ty * u : (ty + 1) * u, tx * u : (tx + 1) * u])
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

    def wait(self, limit: int = 0, key: tuple[int, int] | None = None) -> None:
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

    def shutdown(self) -> None:
        """Stop the writer thread (after :meth:`wait`: no write is pending)."""
        self._writer.shutdown()

    # ------------------------------------------------------------------ finalize

    def relayout(self, ux0: int, uy0: int, shape: tuple[int, int]) -> set[tuple[int, int]]:
        """Rename level-0 unit files so the box starts at 0; rewrite the array metadata.

        Parameters
        ----------
        ux0, uy0 : int
            Live unit index (column, row) that becomes unit ``(0, 0)``.
        shape : (int, int)
            Tight level-0 shape ``(height, width)`` in pixels.

        Returns
        -------
        set of (int, int)
            The level-0 unit indices that hold data, in the new numbering.

        Notes
        -----
        No pixel is copied: each unit file is renamed once.  Raises OSError
        (the caller names the failure).
        """
        level_dir = self.path / "0"
        staging = self.path / _STAGING
        live_meta = self.array.metadata
        moves = []
        for ty, tx in sorted(self.stored):
            rel = live_meta.encode_chunk_key((ty, tx))
            moves.append((rel, (ty - uy0, tx - ux0)))
        chunk_root = level_dir / moves[0][0].split("/")[0] if moves else None
        if chunk_root is not None and chunk_root.exists():
            os.replace(chunk_root, staging)
        self.array = self.create_level("0", shape)
        kept: set[tuple[int, int]] = set()
        for rel, new in moves:
            src = staging / rel.split("/", 1)[1]
            dst = level_dir / self.array.metadata.encode_chunk_key(new)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            kept.add(new)
        if staging.exists():
            shutil.rmtree(staging)
        return kept
