"""The pipeline with and without the denoise stage: frames, order, throughput, quality.

A simulated low-definition traversal (image folder, 1024 x 768, 3 rows) is
replayed twice with ``run_daemon.py replay``: ``--denoise off`` and
``--denoise BACKEND`` (default ``auto``).  For the denoised run the bench
checks that the denoised spool holds every captured frame once, in order,
with the same sequence numbers and source indices; it reports each run's
wall time and per-stage frames/s, the position error against the
simulator's ground truth, and the denoiser's PSNR against the same
traversal rendered without noise (``noise=none``, same seed: the clean
truth).  Writes ``bench/results/denoise_pipeline.json``.

Usage: ``python -m bench.bench_denoise_pipeline [--frames-per-row N] [--backend B]``
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_stitch import position_errors
from bench.common import write_result
from cemi_stream.capture.spool import SpoolReader
from cemi_stream.denoise.metrics import psnr
from cemi_stream.denoise.pairs import load_gray
from cemi_stream.stitch.feed import DENOISED_DIR
from drivers.sim import config_from_options, write_simulation

REPO = Path(__file__).resolve().parents[1]


def _replay(frames: Path, run_dir: Path, denoise: str) -> float:
    cmd = [sys.executable, str(REPO / "run_daemon.py"), "replay", str(frames), "--out",
           str(run_dir), "--denoise", denoise, "-q"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"replay --denoise {denoise} failed: {proc.stderr.strip()[-300:]}")
    return time.perf_counter() - t0


def main() -> None:
    """Simulate, replay twice, compare."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames-per-row", type=int, default=12)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    options = {"rows": "3", "frames_per_row": str(args.frames_per_row),
               "frame_size": "1024x768", "noise": "ld", "seed": "11"}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cemi-bench-") as tmp:
        work = Path(tmp)
        write_simulation(config_from_options(options), work / "ld")
        write_simulation(config_from_options({**options, "noise": "none"}), work / "clean")
        with open(work / "ld" / "ground_truth.csv") as f:
            truth = {int(r["src_index"]): (float(r["x_px"]), float(r["y_px"]))
                     for r in csv.DictReader(f)}  # fmt: skip
        runs: dict[str, Any] = {}
        for denoise in ("off", args.backend):
            run_dir = work / f"run-{denoise}"
            wall = _replay(work / "ld" / "frames", run_dir, denoise)
            summary = json.loads((run_dir / "run.json").read_text())
            runs[denoise] = {
                "wall_s": round(wall, 2),
                "frames": summary["counts"]["stitched"],
                "stitch_frames_per_s": summary["timings"]["stitch_frames_per_s"],
                "error_px": position_errors(run_dir, truth),
                "denoise": summary.get("denoise"),
            }
        den_dir = work / f"run-{args.backend}"
        raw, den = SpoolReader(den_dir), SpoolReader(den_dir / DENOISED_DIR)
        raw_meta = [(raw.meta(i).src_index) for i in range(len(raw))]
        den_meta = [(den.meta(i).src_index) for i in range(len(den))]
        clean_dir = work / "clean" / "frames"
        clean_files = sorted(clean_dir.iterdir())
        gains = []
        for i in range(len(den)):
            clean = load_gray(clean_files[raw_meta[i]])
            gains.append((psnr(raw.image(i), clean), psnr(den.image(i), clean)))
        g = np.array(gains)
    result = {
        "what": "replay of a simulated LD traversal, 3 rows x N frames of 1024 x 768, "
        "with and without the denoise stage",
        "frames_per_row": args.frames_per_row,
        "runs": runs,
        "order_kept": raw_meta == den_meta,
        "frames_captured": len(raw_meta),
        "frames_denoised": len(den_meta),
        "psnr_vs_clean_db": {
            "raw_ld": round(float(g[:, 0].mean()), 2),
            "denoised": round(float(g[:, 1].mean()), 2),
        },
    }
    path = write_result("denoise_pipeline", result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
