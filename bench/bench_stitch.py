"""Stitching accuracy against ground truth and stitch-stage speed.

Each case simulates an image-folder traversal with the virtual SEM (or takes
real tiles), captures it (spool only), then runs the stitch stage in this
process on the finished capture and compares ``positions.csv`` with the
truth.  Accuracy is the distance between stitched and true positions after
removing the one global translation that any mosaic is free to have.
Writes ``bench/results/stitch.json``.

Usage: ``python -m bench.bench_stitch [--frames-per-row 40] [--cases ld,hd,...]``
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, write_result
from cemi_stream.capture.stage import run_capture
from cemi_stream.config import load_config
from cemi_stream.stitch.stage import run_stitch
from drivers.sim import SimConfig, write_simulation

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EUTECTIC = DATA / "eutectic-alcumg" / "3000X_Al-Cu_Mg_EXP9_S7.tif"
BSE = DATA / "bse-tiles-stitch2d"


def _cases(frames_per_row: int) -> dict[str, dict[str, Any]]:
    base = {"rows": 3, "frames_per_row": frames_per_row, "seed": 11}
    return {
        "ld_raster": {**base, "noise": "ld"},
        "ld_serpentine": {**base, "noise": "ld", "serpentine": True},
        "hd_raster": {**base, "noise": "hd"},
        "hd_serpentine": {**base, "noise": "hd", "serpentine": True},
        "eutectic_ld_raster": {**base, "noise": "ld", "source": str(EUTECTIC)},
    }


def position_errors(run_dir: Path, truth: dict[int, tuple[float, float]]) -> dict[str, Any]:
    """``positions.csv`` against true positions, after removing the global offset."""
    with open(run_dir / "positions.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["x_px"]]
    est = np.array([(float(r["x_px"]), float(r["y_px"])) for r in rows])
    tru = np.array([truth[int(r["src_index"])] for r in rows])
    diff = est - tru
    diff -= np.median(diff, axis=0)
    err = np.hypot(diff[:, 0], diff[:, 1])
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {
        "frames": len(rows),
        "median_px": round(float(np.median(err)), 3),
        "p99_px": round(float(np.percentile(err, 99)), 3),
        "max_px": round(float(err.max()), 3),
        "statuses": statuses,
    }


def _stitch(source: str, work: Path, truth: dict[int, tuple[float, float]]) -> dict[str, Any]:
    config = load_config(overrides={"bus.pipes": [], "bus.monitor": False})
    run_dir = work / "run"
    run_capture(source, run_dir, config, progress=False)
    t0 = time.perf_counter()
    summary = run_stitch(run_dir, config, progress=False)
    wall = time.perf_counter() - t0
    result = position_errors(run_dir, truth)
    result.update(
        {
            "stitch_wall_s": round(wall, 2),
            "stitch_frames_per_s": round(summary.frames / wall, 1),
            "ms_per_frame": summary.timings_ms_per_frame,
            "residual_rms_px": round(float(summary.residuals.get("rms_px", 0.0)), 3),
            "mosaic_shape": summary.mosaic_shape,
            "layout": summary.layout,
        }
    )
    return result


def main() -> None:
    """Run the cases and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames-per-row", type=int, default=40)
    parser.add_argument("--cases", default="")
    args = parser.parse_args()
    cases = _cases(args.frames_per_row)
    wanted = [c for c in args.cases.split(",") if c] or [*cases, "bse_tiles"]
    results: dict[str, Any] = {}
    for name in wanted:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            if name == "bse_tiles":
                ref = json.loads((BSE / "reference_offsets.json").read_text())["coords_yx_pixels"]
                names = sorted(ref)
                truth = {i: (ref[n][1], ref[n][0]) for i, n in enumerate(names)}
                results[name] = _stitch(str(BSE), work, truth)
                results[name]["reference"] = "stitch2d's own offsets (not independent truth)"
            else:
                if "source" in cases[name] and not EUTECTIC.is_file():
                    continue
                config = SimConfig(**cases[name])
                write_simulation(config, work / "sim")
                with open(work / "sim" / "ground_truth.csv") as f:
                    truth = {
                        int(r["src_index"]): (float(r["x_px"]), float(r["y_px"]))
                        for r in csv.DictReader(f)
                    }
                results[name] = _stitch(str(work / "sim" / "frames"), work, truth)
                results[name]["traversal"] = cases[name]
        print(name, json.dumps(results[name]))
    previous = RESULTS / "stitch.json"
    if args.cases and previous.is_file():
        # A partial run updates its cases and keeps the others.
        results = {**json.loads(previous.read_text()).get("cases", {}), **results}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path = write_result(
        "stitch",
        {
            "frame_size": [1024, 768],
            "targets": {
                "median_px": 0.3,
                "p99_px": 1.0,
                "max_px": 3.0,
                "bse_tiles_max_px": 2.0,
                "stitch_frames_per_s": 100,
            },
            "cases": results,
            "peak_rss_mb_whole_bench": round(peak_mb, 1),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
