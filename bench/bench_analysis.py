"""The paper-sized mosaic through ``analyze``: wall time, tiles/s, peak RSS vs length and workers.

The paper's mosaic is ~112,000 x 7,500 px, analysed as 19 x 243 tiles of
508 x 413 px.  This bench writes OME-Zarr mosaics of that height and
lengths 28,000 / 56,000 / 112,000 px with the stitcher's own chunk store and
NGFF metadata (1024 px chunks, zstd), their pixels cut from real micrographs
of ``$CEMI_DATA`` (UHCS pearlite, spheroidite and network, the Al-Cu-Mg
eutectic; a random crop, flip and transpose per chunk, the mix drifting
along x like a gradient), with a ragged uncovered (0) margin top and bottom
as a real traversal leaves.  Each case is the real command
``run_daemon.py analyze MOSAIC --out DIR --scheduler S --workers N`` in a
subprocess (classical methods: auto phase fraction + the structure-tensor
lamellar detector); the peak RSS is the sum over the command's process tree,
sampled every 0.1 s.

Target (issue 11): >= 50 tiles/s, peak RSS < 2 GB, flat in the length.

Writes ``bench/results/analysis.json`` and prints a table.

Usage: ``python -m bench.bench_analysis [--quick] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import write_result
from cemi_stream.stitch.chunks import ChunkStore
from cemi_stream.stitch.omezarr import image_attributes

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CEMI_DATA", ROOT.parent / "shared" / "data"))
HEIGHT = 7500
CHUNK = 1024
PIXEL_UM = 0.067  # the paper's ~67 nm px


def _bank() -> dict[str, list[np.ndarray]]:
    """Real micrographs by kind, their data bars cut off (bottom 10 %)."""
    bank: dict[str, list[np.ndarray]] = {}
    folders = {"pearlite": "uhcs-steel/pearlite", "spheroidite": "uhcs-steel/spheroidite",
               "network": "uhcs-steel/network", "eutectic": "eutectic-alcumg"}  # fmt: skip
    for kind, folder in folders.items():
        images = []
        for f in sorted((DATA / folder).glob("*")):
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
                continue
            im = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
            if im is not None and min(im.shape) >= 256:
                images.append(im[: int(im.shape[0] * 0.9)])
        if images:
            bank[kind] = images
    if not bank:
        raise SystemExit(f"bench_analysis: no micrographs under {DATA} (set CEMI_DATA)")
    return bank


def _chunk(bank: dict[str, list[np.ndarray]], frac_x: float, rng: np.random.Generator
           ) -> np.ndarray:  # fmt: skip
    kinds = list(bank)
    # the mix drifts along x: lamellar early, spheroidised late (a gradient to profile)
    weights = np.array([1.0 - frac_x if k in ("pearlite", "eutectic") else 0.3 + frac_x
                        for k in kinds])  # fmt: skip
    kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
    src = bank[kind][rng.integers(len(bank[kind]))]
    while min(src.shape) < CHUNK:
        src = cv2.resize(src, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_LINEAR)
    y = rng.integers(src.shape[0] - CHUNK + 1)
    x = rng.integers(src.shape[1] - CHUNK + 1)
    out = src[y : y + CHUNK, x : x + CHUNK]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out.T
    return np.maximum(np.ascontiguousarray(out), 1)  # 0 means "outside the mosaic"


def make_mosaic(path: Path, width: int, bank: dict[str, list[np.ndarray]], seed: int = 0) -> Path:
    """Write a ``HEIGHT`` x ``width`` OME-Zarr mosaic at ``path``, one chunk at a time."""
    rng = np.random.default_rng(seed)
    store = ChunkStore(path, chunk=CHUNK, shard=None, compression="zstd")
    store.prepare_dir(overwrite=True)
    import zarr

    store.group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    arr = store.create_level("0", (HEIGHT, width))
    top = 60 + 40 * np.sin(np.arange(width) / 3000.0)  # ragged uncovered margins
    bottom = HEIGHT - 80 - 50 * np.cos(np.arange(width) / 2500.0)
    for cy in range(0, HEIGHT, CHUNK):
        band = np.zeros((min(CHUNK, HEIGHT - cy), width), np.uint8)
        for cx in range(0, width, CHUNK):
            tile = _chunk(bank, cx / width, rng)
            w = min(CHUNK, width - cx)
            band[:, cx : cx + w] = tile[: band.shape[0], :w]
        ys = np.arange(cy, cy + band.shape[0])[:, None]
        band[(ys < top[None, :]) | (ys >= bottom[None, :])] = 0
        arr[cy : cy + band.shape[0], :] = band
    attrs = image_attributes(1, pixel_size_um=PIXEL_UM)
    attrs["cemi_stream"] = {"mosaic": {"state": "final", "pixel_size_um": PIXEL_UM,
                                       "origin_xy_px": [0, 0], "chunk_px": CHUNK}}  # fmt: skip
    store.group.attrs.update(attrs)
    return path


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
        rss[int(d.name)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def run_case(mosaic: Path, out: Path, scheduler: str, workers: int) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "run_daemon.py"), "analyze", str(mosaic), "--out", str(out),
           "--scheduler", scheduler, "--workers", str(workers), "--quiet"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    cpu0 = os.times()

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.join()
    cpu1 = os.times()
    if proc.returncode != 0:
        tail = stderr.strip()[-500:]
        raise SystemExit(f"bench_analysis: analyze failed ({proc.returncode}): {tail}")
    summary = json.loads((out / "analysis.json").read_text())
    return {
        "scheduler": scheduler,
        "workers": workers,
        "tiles": summary["tiles"],
        "valid_tiles": sum(im["valid_tiles"] for im in summary["images"]),
        "wall_s": round(wall, 2),
        "compute_s": summary["seconds"],
        "tiles_per_s": summary["tiles_per_s"],
        "tiles_per_s_wall": round(summary["tiles"] / wall, 2),
        "peak_rss_mb": round(peak[0] / 2**20, 1),
        "cpu_s": round(
            cpu1.children_user + cpu1.children_system - cpu0.children_user - cpu0.children_system, 2
        ),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "mean_phase_fraction": summary["images"][0].get("mean_phase_fraction"),
        "mean_lamellar_fraction": summary["images"][0].get("mean_lamellar_fraction"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="lengths 14,000 and 28,000 px only")
    ap.add_argument("--keep", type=Path, help="write the mosaics here and keep them")
    args = ap.parse_args()
    lengths = [14_000, 28_000] if args.quick else [28_000, 56_000, 112_000]
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-analysis-"))
    work.mkdir(parents=True, exist_ok=True)
    bank = _bank()
    cases: list[dict[str, Any]] = []
    try:
        for length in lengths:
            mosaic = work / f"mosaic-{length}.ome.zarr"
            if not (mosaic / "zarr.json").is_file():
                t0 = time.perf_counter()
                make_mosaic(mosaic, length, bank)
                took = time.perf_counter() - t0
                print(f"wrote {mosaic.name} ({HEIGHT} x {length} px) in {took:.0f} s", flush=True)
            plans = [("threads", 1)]
            if length == lengths[-1]:
                plans += [("threads", 2), ("processes", 2)]
            for scheduler, workers in plans:
                out = work / f"out-{length}-{scheduler}-{workers}"
                res = run_case(mosaic, out, scheduler, workers)
                res["mosaic_px"] = [HEIGHT, length]
                cases.append(res)
                print(f"{length:>7} px  {scheduler:<9} x{workers}  {res['tiles']:>5} tiles  "
                      f"{res['tiles_per_s']:>6.1f} tiles/s  wall {res['wall_s']:>6.1f} s  "
                      f"peak RSS {res['peak_rss_mb']:>6.0f} MB  load {res['load_avg_1min']}",
                      flush=True)  # fmt: skip
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    one = [c for c in cases if c["scheduler"] == "threads" and c["workers"] == 1]
    rss = [c["peak_rss_mb"] for c in one]
    best = max(c["tiles_per_s"] for c in cases if c["mosaic_px"][1] == lengths[-1])
    result = {
        "cases": cases,
        "targets": {
            "tiles_per_s_min": 50,
            "tiles_per_s_best_full_length": best,
            "peak_rss_mb_max": 2048,
            "peak_rss_mb_all": max(c["peak_rss_mb"] for c in cases),
            "rss_growth_first_to_last_length": round(rss[-1] / rss[0], 3) if rss else None,
        },
        "quick": args.quick,
    }
    path = write_result("analysis", result)
    print(f"best {best:.1f} tiles/s on the longest mosaic; peak RSS "
          f"{result['targets']['peak_rss_mb_all']:.0f} MB; results in {path}")  # fmt: skip


if __name__ == "__main__":
    main()
