"""Mosaic tiles from the OME-Zarr on disk: content, versions, composition, the feed's events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cemi_stream.dashboard.feed import RunFeed
from cemi_stream.dashboard.tiles import MAX_LEVEL, TILE_PX, ChunkIndex, TileError, TileRenderer
from cemi_stream.stitch.mosaic import open_mosaic

REPO = Path(__file__).resolve().parents[3]
SOURCE = "sim:?rows=2&frames_per_row=6&frame_size=384x288&seed=7"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiles") / "run"
    subprocess.run(
        [sys.executable, "run_daemon.py", "replay", SOURCE, "--out", str(out), "-q"],
        cwd=REPO, check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    return out


def test_level_0_tiles_are_the_mosaic_pixels(run_dir: Path) -> None:
    index = ChunkIndex(run_dir / "mosaic.ome.zarr")
    changed = index.scan()
    assert changed and index.mosaic.state == "final"
    assert index.scan() == {}  # nothing changed since
    view = open_mosaic(run_dir / "mosaic.ome.zarr")
    x0, y0, x1, y1 = index.bounds()  # type: ignore[misc]
    h, w = view.array.shape
    ox, oy = view.origin_xy
    assert x0 <= ox and y0 <= oy and x1 >= ox + w and y1 >= oy + h
    tiles = TileRenderer(index)
    for tx, ty in ((0, 0), (1, 0), (2, 1)):
        expect = view.region(tx * TILE_PX, ty * TILE_PX, (tx + 1) * TILE_PX, (ty + 1) * TILE_PX)
        assert np.array_equal(tiles.tile(0, tx, ty), expect)
    png = cv2.imdecode(np.frombuffer(tiles.png(0, 1, 0), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(png, tiles.tile(0, 1, 0))
    # Far outside: an empty tile, version 0; a level out of range is refused.
    assert index.version(0, 500, 500) == 0 and not tiles.tile(0, 500, 500).any()
    with pytest.raises(TileError, match="outside"):
        tiles.tile(MAX_LEVEL + 1, 0, 0)


def test_coarse_tiles_are_block_means_of_finer_ones(run_dir: Path) -> None:
    index = ChunkIndex(run_dir / "mosaic.ome.zarr")
    index.scan()
    tiles = TileRenderer(index)
    level0 = open_mosaic(run_dir / "mosaic.ome.zarr")
    k = 3  # beyond this small mosaic's pyramid: composed from level 2
    span = TILE_PX * 2**k
    region = level0.region(0, 0, span, span).astype(np.float32)
    expect = cv2.resize(region, (TILE_PX, TILE_PX), interpolation=cv2.INTER_AREA)
    got = tiles.tile(k, 0, 0).astype(np.float32)
    lit = expect > 0
    assert lit.mean() > 0.02
    assert np.abs(got - expect)[lit].mean() < 3.0  # rounding at each of the levels


def test_a_rewritten_chunk_changes_its_tile(tmp_path: Path, run_dir: Path) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir / "mosaic.ome.zarr", copy / "mosaic.ome.zarr")
    index = ChunkIndex(copy / "mosaic.ome.zarr")
    index.scan()
    tiles = TileRenderer(index)
    before_v = index.version(0, 0, 0)
    before = tiles.tile(0, 0, 0).copy()
    chunk = copy / "mosaic.ome.zarr" / "0" / "c" / "0" / "0"
    # Rewrite the chunk as the stitcher does (beside, then renamed into place), with
    # the content of another chunk.
    other = copy / "mosaic.ome.zarr" / "0" / "c" / "0" / "1"
    tmp = chunk.with_name("0.tmp")
    tmp.write_bytes(other.read_bytes())
    time.sleep(0.01)
    os.replace(tmp, chunk)
    changed = index.scan()
    assert list(changed) == [(index.mosaic.origin_xy[0] // index.mosaic.unit_px,
                              index.mosaic.origin_xy[1] // index.mosaic.unit_px)]  # fmt: skip
    assert index.version(0, 0, 0) > before_v
    assert not np.array_equal(tiles.tile(0, 0, 0), before)  # the cache did not hide it


def test_the_feed_of_a_finished_run(run_dir: Path) -> None:
    record = {"id": "r", "state": "finished", "run_dir": str(run_dir), "stages": {},
              "counts": {"placed": 12, "predicted": 0, "skipped": 0}}  # fmt: skip
    feed = RunFeed("r", lambda _id: record, run_dir, run_dir)
    feed.poll()
    snap = json.loads(feed.snapshot().data)
    assert snap["run"]["state"] == "finished"
    assert len(snap["frames"]) == 12 and {f[3] for f in snap["frames"]} == {"placed"}
    assert snap["frame_shape"] == [288, 384] and snap["mosaic"]["state"] == "final"
    # Refined positions in mosaic pixels: frame 0's outline lies on the mosaic.
    view = open_mosaic(run_dir / "mosaic.ome.zarr")
    x, y = snap["frames"][0][1:3]
    patch = view.region(int(x) + 20, int(y) + 20, int(x) + 60, int(y) + 60)
    assert patch.mean() > 20
    # Events after a number; a number older than the ring gives None (-> snapshot).
    n = feed.seq
    assert feed.since(n) == []
    assert [e.seq for e in feed.since(0) or []] == list(range(1, n + 1))
    feed.poll()  # nothing changed: no event
    assert feed.seq == n, [e.kind for e in feed.since(n) or []]
