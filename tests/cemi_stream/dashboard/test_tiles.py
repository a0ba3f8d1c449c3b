"""Mosaic tiles from the OME-Zarr on disk: content, versions, composition, the feed's events."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cemi_stream.dashboard.feed import KEYFRAMES, KEYFRAMES_S, RUN_POLL_S, RunFeed
from cemi_stream.dashboard.tiles import (
    MAX_LEVEL,
    TILE_PX,
    BytesCache,
    ChunkIndex,
    TileError,
    TileRenderer,
    encode_png,
)
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
    assert_versions_are_the_newest_of_their_chunks(index)
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
    assert_versions_are_the_newest_of_their_chunks(index)


def assert_versions_are_the_newest_of_their_chunks(index: ChunkIndex) -> None:
    """The versions and bounds the index keeps, against the chunks themselves."""
    unit = index.mosaic.unit_px
    xs, ys = [c[0] for c in index.versions], [c[1] for c in index.versions]
    assert index.bounds() == (min(xs) * unit, min(ys) * unit,
                              (max(xs) + 1) * unit, (max(ys) + 1) * unit)  # fmt: skip
    for level in range(MAX_LEVEL + 1):
        span = TILE_PX * 2**level
        for tx in range(-1, max(xs) * unit // span + 2):
            for ty in range(-1, max(ys) * unit // span + 2):
                expect = max((v for (cx, cy), v in index.versions.items()
                              if cx * unit < (tx + 1) * span and (cx + 1) * unit > tx * span
                              and cy * unit < (ty + 1) * span and (cy + 1) * unit > ty * span),
                             default=0)  # fmt: skip
                assert index.version(level, tx, ty) == expect, (level, tx, ty)


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
    # The keyframe strip, the same for every page: it starts with the newest frames.
    newest = sorted(f[0] for f in snap["frames"])[-KEYFRAMES:]
    assert snap["keyframes"] == newest
    told = [json.loads(e.data) for e in feed.since(0) or [] if e.kind == "keyframes"]
    assert told == [{"frames": newest}]


def test_the_keyframe_strip_moves_on_one_frame_per_update(tmp_path: Path) -> None:
    record = {"id": "r", "state": "running", "run_dir": str(tmp_path), "stages": {}}
    feed = RunFeed("r", lambda _id: dict(record), tmp_path, tmp_path)
    journal = tmp_path / "stitch.journal"

    def place(*seqs: int) -> None:
        with open(journal, "a", encoding="utf-8") as f:
            for q in seqs:
                row = {"seq": q, "x": 10 * q, "y": 0, "status": "placed", "score": 0.9}
                f.write(json.dumps(row) + "\n")

    def strips() -> list[list[int]]:
        events = feed.since(0) or []
        return [json.loads(e.data)["frames"] for e in events if e.kind == "keyframes"]

    place(0, 1, 2, 3, 4)
    feed.poll()
    assert strips() == [[2, 3, 4]]  # the newest frames at the start
    place(5, 6, 7)
    feed.poll()  # within KEYFRAMES_S of the last move: not yet
    assert strips() == [[2, 3, 4]]
    feed._keyframes_t -= KEYFRAMES_S
    feed.poll()  # then the newest frame joins: one new thumbnail per page
    assert strips()[-1] == [3, 4, 7]
    place(8)
    record["state"] = "interrupted"  # an ended run's last frame is shown at once
    feed._last_run_poll -= RUN_POLL_S  # (once the feed has asked for the run again)
    feed.poll()
    assert strips()[-1] == [4, 7, 8]


def test_event_streams_wait_for_the_poll_that_has_news(run_dir: Path) -> None:
    record = {"id": "r", "state": "running", "run_dir": str(run_dir), "stages": {}}
    feed = RunFeed("r", lambda _id: dict(record), run_dir, run_dir)
    feed.poll()
    n = feed.seq

    async def waits() -> tuple[float, float]:
        t0 = time.monotonic()
        await feed.wait_newer(n, timeout=0.2)  # nothing new: the timeout
        t1 = time.monotonic()
        threading.Timer(0.1, feed.poll).start()  # its stats sample (the run is active)
        await feed.wait_newer(n, timeout=30.0)
        return t1 - t0, time.monotonic() - t1

    quiet, woken = asyncio.run(waits())
    assert 0.15 < quiet < 5.0 and woken < 5.0
    assert feed.seq > n and not feed._waiters
    asyncio.run(feed.wait_newer(n, timeout=30.0))  # already newer: at once


def test_encoded_images_are_made_once_however_many_ask() -> None:
    cache = BytesCache(2)
    calls: list[int] = []
    start = threading.Barrier(4)

    def make() -> bytes:
        calls.append(1)
        time.sleep(0.2)  # long enough for every caller to ask meanwhile
        return b"png"

    def ask() -> None:
        start.wait()
        got.append(cache.get("a", make))

    got: list[bytes] = []
    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [b"png"] * 4 and len(calls) == 1 and cache.made == 1

    # What make raises goes to its caller; the next one tries again.
    def fail() -> bytes:
        raise TileError("broken")

    with pytest.raises(TileError):
        cache.get("b", fail)
    assert cache.get("b", lambda: b"ok") == b"ok"
    cache.get("c", lambda: b"c")  # bounded: the least recently used ("a") goes
    assert cache.get("a", lambda: b"again") == b"again"
    # The encoding is lossless.
    image = np.random.default_rng(1).integers(0, 256, (96, 128), np.uint8)
    image[:, :40] = 0
    back = cv2.imdecode(np.frombuffer(encode_png(image), np.uint8), cv2.IMREAD_UNCHANGED)
    assert back is not None and np.array_equal(back, image)
