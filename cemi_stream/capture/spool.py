"""The raw frame spool: every kept frame on disk before it is published.

Layout of ``RUN_DIR/frames.zarr`` (a zarr v3 group):

* ``frames`` - a ``(n, height, width)`` ``uint8`` array, axes ``(frame, y, x)``,
  one frame per chunk (chunk files ``frames/c.N.0.0`` in one directory);
* ``table.csv`` - one line per spooled frame (:data:`TABLE_COLUMNS`).  This
  append-only table is the commit record: a frame exists in the spool exactly
  when its line is complete.  The array's shape is not (it grows in blocks
  and is trimmed on a clean close).
* group attributes: run id, frame shape, source, crop rectangle.

Durability
----------
For each frame the chunk is written, then its table line is written and
flushed to the operating system, and only then is the frame published.  A
process killed at any point (even ``kill -9``) therefore leaves every
published frame readable: the data is in the OS page cache and reaches the
disk.  At most every ``fsync_interval_s`` seconds (and on close) the chunk
files, the array directory and the table are fsynced, which bounds what a
power failure or kernel crash can lose to that interval.  A torn last table
line (a kill in mid-write) is ignored by readers, and a chunk without a table
line is simply not part of the spool.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

from ..config import SpoolConfig
from ..errors import SpoolError
from ..frame import Frame, FrameMeta

log = logging.getLogger(__name__)

SPOOL_DIR = "frames.zarr"
ARRAY_NAME = "frames"
TABLE_NAME = "table.csv"
TABLE_COLUMNS = (
    "seq",
    "src_index",
    "capture_time_ns",
    "pixel_size_nm",
    "stage_x_um",
    "stage_y_um",
    "row",
)
# Growing the array one frame at a time would rewrite its metadata per frame.
_GROW_BLOCK = 256


def _codec(name: str) -> list[Any] | None:
    if name == "lz4":
        return [BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")]
    if name == "zstd":
        return [ZstdCodec(level=1)]
    return None


def raw_chunks(array: Any) -> bool:
    """Whether a spool array stores each frame as one uncompressed chunk file.

    Such chunk files are the frame's bytes as they are, so they can be
    written and read directly, bypassing zarr's asynchronous pipeline.
    """
    meta = array.metadata
    return bool(
        array.dtype == np.uint8
        and array.shards is None
        and tuple(array.chunks) == (1, *array.shape[1:])
        and len(meta.codecs) == 1
        and isinstance(meta.codecs[0], BytesCodec)
    )


def _fmt(value: float | int | None) -> str:
    return "" if value is None else repr(value)


class FrameSpool:
    """Append-only writer of ``RUN_DIR/frames.zarr``.

    Use :meth:`create`; then :meth:`append` each kept frame and
    :meth:`close` at the end.
    """

    def __init__(
        self, path: Path, group: Any, array: Any, table: TextIO, config: SpoolConfig
    ) -> None:
        self.path = path
        self._group = group
        self._array = array
        self._table = table
        self._config = config
        self._count = 0
        self._capacity = int(array.shape[0])
        self._unsynced: list[int] = []
        self._last_sync = time.monotonic()
        self._closed = False
        # An uncompressed spool (the default) stores each frame as one raw chunk
        # file, written here directly: ~0.7 ms per 1024 x 768 frame against
        # ~3.6 ms through zarr's asynchronous pipeline (2-core EPYC VM), which
        # was the largest part of the capture's CPU time.  SpoolFrames reads
        # them back the same way.
        self._raw_dir = path / ARRAY_NAME if raw_chunks(array) else None

    @classmethod
    def create(
        cls,
        run_dir: Path,
        frame_shape: tuple[int, int],
        config: SpoolConfig,
        attrs: dict[str, Any] | None = None,
    ) -> FrameSpool:
        """Create a new, empty spool in ``run_dir``.

        Parameters
        ----------
        run_dir : Path
            Run directory (created if needed).  An existing spool there is
            never overwritten: raises :class:`SpoolError`.
        frame_shape : (height, width)
            Shape of every frame in pixels.
        config : SpoolConfig
            Compression and fsync policy.
        attrs : dict or None
            JSON-serialisable attributes stored on the group.
        """
        path = Path(run_dir) / SPOOL_DIR
        if path.exists():
            raise SpoolError(f"{path}: a spool already exists; use a new run directory")
        height, width = frame_shape
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(str(path), mode="w-", attributes=dict(attrs or {}))
            array = group.create_array(
                ARRAY_NAME,
                shape=(_GROW_BLOCK, height, width),
                chunks=(1, height, width),
                dtype="uint8",
                compressors=_codec(config.compression),
                fill_value=0,
                chunk_key_encoding={"name": "default", "separator": "."},
                dimension_names=["frame", "y", "x"],
                # A frame equal to the fill value (all black: a blanked beam,
                # or a denoiser's output) must still get its chunk file, which
                # sync() fsyncs.
                config={"write_empty_chunks": True},
            )
            table = open(path / TABLE_NAME, "x", encoding="utf-8", newline="\n")  # noqa: SIM115
            table.write(",".join(TABLE_COLUMNS) + "\n")
            table.flush()
        except OSError as exc:
            raise SpoolError(f"{path}: cannot create spool ({exc.strerror or exc})") from None
        return cls(path, group, array, table, config)

    @classmethod
    def open_append(cls, run_dir: Path, config: SpoolConfig) -> FrameSpool:
        """Reopen the spool in ``run_dir`` to append after its last committed frame.

        A torn last table line (a process killed in mid-write) is cut off, so
        the next line starts clean; a chunk written without its table line is
        overwritten by the next frame.

        Raises
        ------
        SpoolError
            When there is no readable spool in ``run_dir``.
        """
        path = Path(run_dir) / SPOOL_DIR
        count = len(SpoolReader(run_dir))
        table_path = path / TABLE_NAME
        try:
            with open(table_path, "rb+") as f:
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
            group = zarr.open_group(str(path), mode="r+")
            array = zarr.open_array(str(path / ARRAY_NAME), mode="r+").with_config(
                {"write_empty_chunks": True}
            )
            table = open(table_path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115
        except (OSError, ValueError, KeyError) as exc:
            raise SpoolError(f"{path}: cannot reopen the spool ({exc})") from None
        spool = cls(path, group, array, table, config)
        spool._count = count
        group.attrs["complete"] = False  # until this process closes it cleanly
        return spool

    @property
    def count(self) -> int:
        """Number of frames committed."""
        return self._count

    def append(self, frame: Frame) -> int:
        """Write one frame and commit its table line; returns its sequence number.

        Raises
        ------
        SpoolError
            When the frame has the wrong shape/dtype or the write fails.  A
            write failure is never swallowed: the capture must stop rather
            than publish frames it could not keep.
        """
        if self._closed:
            raise SpoolError(f"{self.path}: spool is closed")
        image = frame.image
        if image.dtype != np.uint8 or image.shape != tuple(self._array.shape[1:]):
            raise SpoolError(
                f"{self.path}: frame {frame.meta.src_index} has shape {image.shape} "
                f"{image.dtype}, spool holds {tuple(self._array.shape[1:])} uint8"
            )
        seq = self._count
        meta = frame.meta
        try:
            if seq >= self._capacity:
                self._capacity += _GROW_BLOCK
                self._array.resize((self._capacity, *self._array.shape[1:]))
            self._write_chunk(seq, image)
            self._table.write(
                ",".join(
                    (
                        str(seq),
                        str(meta.src_index),
                        str(meta.capture_time_ns),
                        _fmt(meta.pixel_size_nm),
                        _fmt(meta.stage_x_um),
                        _fmt(meta.stage_y_um),
                        _fmt(meta.row),
                    )
                )
                + "\n"
            )
            self._table.flush()
        except OSError as exc:
            raise SpoolError(
                f"{self.path}: cannot write frame {seq} ({exc.strerror or exc})"
            ) from None
        self._count += 1
        self._unsynced.append(seq)
        if time.monotonic() - self._last_sync >= self._config.fsync_interval_s:
            self.sync()
        return seq

    def _write_chunk(self, seq: int, image: np.ndarray) -> None:
        """Store frame ``seq``'s pixels (its table line is written after)."""
        if self._raw_dir is None:
            self._array[seq] = image
            return
        path = self._raw_dir / self._array.metadata.encode_chunk_key((seq, 0, 0))
        # Written beside and renamed, as zarr does: a reader never sees half a chunk.
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as f:
            f.write(np.ascontiguousarray(image).data)
        os.replace(tmp, path)

    def sync(self) -> None:
        """fsync the chunks written since the last sync, their directory and the table."""
        array_dir = self.path / ARRAY_NAME
        try:
            for seq in self._unsynced:
                key = self._array.metadata.encode_chunk_key((seq, 0, 0))
                fd = os.open(array_dir / key, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            dir_fd = os.open(array_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            os.fsync(self._table.fileno())
        except OSError as exc:
            raise SpoolError(f"{self.path}: fsync failed ({exc.strerror or exc})") from None
        self._unsynced.clear()
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Sync, trim the array to the committed frames and close the table."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sync()
            self._array.resize((self._count, *self._array.shape[1:]))
            self._group.attrs["complete"] = True
        finally:
            self._table.close()


class SpoolFallback:
    """Thread-safe lazy ``reader(seq) -> Frame`` over a spool, for :class:`FrameLog`.

    Used by pipe senders that fell behind the frames still in RAM.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._reader: SpoolReader | None = None
        self._lock = threading.Lock()

    def __call__(self, seq: int) -> Frame:
        with self._lock:
            if self._reader is None:
                self._reader = SpoolReader(self.run_dir)
            return self._reader.read(seq)


def _parse_optional(text: str, kind: type) -> Any:
    return kind(text) if text else None


class SpoolReader:
    """Reads a spool, also while it is still being written.

    Parameters
    ----------
    run_dir : Path
        Run directory holding ``frames.zarr``.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / SPOOL_DIR
        if not (self.path / TABLE_NAME).is_file():
            raise SpoolError(f"{self.path}: no frame spool here")
        try:
            self._group = zarr.open_group(str(self.path), mode="r")
            self._array = zarr.open_array(str(self.path / ARRAY_NAME), mode="r")
        except (OSError, ValueError, KeyError) as exc:
            raise SpoolError(f"{self.path}: unreadable spool ({exc})") from None
        self._metas: list[FrameMeta] = []
        self._table_pos = 0
        self.refresh()

    @property
    def attrs(self) -> dict[str, Any]:
        """Group attributes written at creation."""
        return dict(self._group.attrs)

    @property
    def frame_shape(self) -> tuple[int, int]:
        """``(height, width)`` of every frame."""
        return int(self._array.shape[1]), int(self._array.shape[2])

    def refresh(self) -> int:
        """Pick up frames committed since the last call; returns the frame count."""
        with open(self.path / TABLE_NAME, encoding="utf-8", newline="\n") as table:
            table.seek(self._table_pos)
            text = table.read()
        if self._table_pos == 0:
            header, _, text = text.partition("\n")
            if header.split(",") != list(TABLE_COLUMNS):
                raise SpoolError(f"{self.path / TABLE_NAME}: unexpected header {header!r}")
            self._table_pos = len(header) + 1
        # Only newline-terminated lines are committed; a torn tail is left for later.
        complete, _, _ = text.rpartition("\n")
        if complete:
            for line in complete.split("\n"):
                self._metas.append(self._parse(line))
            self._table_pos += len(complete.encode("utf-8")) + 1
        return len(self._metas)

    def _parse(self, line: str) -> FrameMeta:
        fields = line.split(",")
        if len(fields) != len(TABLE_COLUMNS) or int(fields[0]) != len(self._metas):
            raise SpoolError(f"{self.path / TABLE_NAME}: corrupt line {line!r}")
        return FrameMeta(
            src_index=int(fields[1]),
            capture_time_ns=int(fields[2]),
            pixel_size_nm=_parse_optional(fields[3], float),
            stage_x_um=_parse_optional(fields[4], float),
            stage_y_um=_parse_optional(fields[5], float),
            row=_parse_optional(fields[6], int),
        )

    def __len__(self) -> int:
        return len(self._metas)

    def meta(self, seq: int) -> FrameMeta:
        """Metadata of frame ``seq``."""
        return self._metas[seq]

    def read(self, seq: int) -> Frame:
        """Frame ``seq`` (refreshing the table when it is newer than known)."""
        if seq >= len(self._metas):
            self.refresh()
        if not 0 <= seq < len(self._metas):
            raise SpoolError(f"{self.path}: frame {seq} is not in the spool ({len(self)} frames)")
        if seq >= self._array.shape[0]:
            # The writer grew the array after we opened it.
            self._array = zarr.open_array(str(self.path / ARRAY_NAME), mode="r")
        image = np.asarray(self._array[seq])
        return Frame(image, self._metas[seq])

    def image(self, seq: int) -> np.ndarray:
        """Pixels of frame ``seq``, ``(y, x)`` uint8."""
        return self.read(seq).image

    def __iter__(self) -> Iterator[Frame]:
        for seq in range(len(self)):
            yield self.read(seq)
