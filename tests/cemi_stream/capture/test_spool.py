"""The raw spool: round trip, reading while writing, torn tails, durability rules."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cemi_stream.capture.spool import SPOOL_DIR, TABLE_NAME, FrameSpool, SpoolReader
from cemi_stream.config import SpoolConfig
from cemi_stream.errors import SpoolError
from cemi_stream.frame import Frame, FrameMeta


def _frames(n: int, shape: tuple[int, int] = (24, 32)) -> list[Frame]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        meta = FrameMeta(10 + i, 1000 + i, 5.5 if i % 2 else None, float(i), 2.0, i // 3)
        out.append(Frame(image, meta))
    return out


@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
def test_round_trip(tmp_path: Path, compression: str) -> None:
    frames = _frames(300)  # crosses the 256-frame growth block
    spool = FrameSpool.create(
        tmp_path,
        (24, 32),
        SpoolConfig(compression=compression),
        {"run_id": "x"},  # type: ignore[arg-type]
    )
    for i, f in enumerate(frames):
        assert spool.append(f) == i
    spool.close()
    reader = SpoolReader(tmp_path)
    assert len(reader) == 300
    assert reader.frame_shape == (24, 32)
    assert reader.attrs["run_id"] == "x" and reader.attrs["complete"] is True
    for i in (0, 1, 255, 256, 299):
        got = reader.read(i)
        assert np.array_equal(got.image, frames[i].image)
        assert got.meta == frames[i].meta


def test_reader_sees_frames_while_writing(tmp_path: Path) -> None:
    frames = _frames(5)
    spool = FrameSpool.create(tmp_path, (24, 32), SpoolConfig())
    spool.append(frames[0])
    reader = SpoolReader(tmp_path)
    assert len(reader) == 1
    for f in frames[1:]:
        spool.append(f)
    assert np.array_equal(reader.read(4).image, frames[4].image)  # refreshes on demand
    spool.close()


def test_torn_table_line_is_ignored(tmp_path: Path) -> None:
    spool = FrameSpool.create(tmp_path, (24, 32), SpoolConfig())
    for f in _frames(3):
        spool.append(f)
    spool.close()
    with open(tmp_path / SPOOL_DIR / TABLE_NAME, "a") as table:
        table.write("3,13,10")  # a kill in mid-write
    assert len(SpoolReader(tmp_path)) == 3


def test_refuses_to_overwrite_and_checks_shapes(tmp_path: Path) -> None:
    spool = FrameSpool.create(tmp_path, (24, 32), SpoolConfig())
    with pytest.raises(SpoolError, match="already exists"):
        FrameSpool.create(tmp_path, (24, 32), SpoolConfig())
    with pytest.raises(SpoolError, match="has shape"):
        spool.append(Frame(np.zeros((10, 10), np.uint8), FrameMeta(0, 0)))
    spool.close()
    with pytest.raises(SpoolError, match="spool is closed"):
        spool.append(_frames(1)[0])
    with pytest.raises(SpoolError, match="no frame spool"):
        SpoolReader(tmp_path / "elsewhere")


def test_kill_9_keeps_every_committed_frame(tmp_path: Path) -> None:
    """A writer killed without any cleanup leaves all frames whose line was written."""
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np
        from pathlib import Path
        from cemi_stream.config import SpoolConfig
        from cemi_stream.frame import Frame, FrameMeta
        from cemi_stream.capture.spool import FrameSpool
        config = SpoolConfig(fsync_interval_s=60)
        spool = FrameSpool.create(Path({str(tmp_path)!r}), (24, 32), config)
        for i in range(40):
            spool.append(Frame(np.full((24, 32), i, np.uint8), FrameMeta(i, i)))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == -9
    reader = SpoolReader(tmp_path)
    assert len(reader) == 40
    assert all(int(reader.read(i).image[0, 0]) == i for i in range(40))


def test_raw_chunks_written_directly_read_back_through_zarr(tmp_path: Path) -> None:
    # The uncompressed spool writes its chunk files itself; zarr must read them
    # back unchanged, also for a frame that is a strided view (a crop) and
    # after the spool is reopened for appending (a restarted capture).
    frames = _frames(5, (48, 64))
    views = [Frame(f.image[::2, ::2], f.meta) for f in frames]
    spool = FrameSpool.create(tmp_path, (24, 32), SpoolConfig(compression="none"))
    for f in views[:3]:
        spool.append(f)
    spool.close()
    spool = FrameSpool.open_append(tmp_path, SpoolConfig(compression="none"))
    for f in views[3:]:
        spool.append(f)
    spool.close()
    reader = SpoolReader(tmp_path)
    assert len(reader) == 5
    for i, f in enumerate(views):
        np.testing.assert_array_equal(reader.image(i), f.image)
    assert not list((tmp_path / SPOOL_DIR).rglob("*.partial"))
