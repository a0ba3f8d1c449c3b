"""The paper-sized run end to end: ``replay`` of 3,906 frames of 1024 x 768.

Times the whole ``run_daemon.py replay`` command (capture and stitch
processes, finalisation, pyramid, preview) on the folder written by
``bench/make_paper_run.py``, samples the peak resident memory of each
process, and checks the positions against the ground truth.  Writes
``bench/results/paper_run.json``.

Usage: ``python -m bench.bench_paper_run FRAMES_DIR RUN_DIR``
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.bench_stitch import position_errors
from bench.common import write_result

REPO = Path(__file__).resolve().parents[1]


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def main() -> None:
    """Run the replay, sample memory, compare with the truth."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sim_dir", type=Path, help="folder written by make_paper_run")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    cmd = [sys.executable, str(REPO / "run_daemon.py"), "replay", str(args.sim_dir / "frames"),
           "--out", str(args.run_dir), "-q"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak: dict[int, float] = {}
    while proc.poll() is None:
        todo = _children(proc.pid)
        while todo:  # every descendant: capture, stitch and the stitcher's renderer
            pid = todo.pop()
            peak[pid] = max(peak.get(pid, 0.0), _rss_mb(pid))
            todo += _children(pid)
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"replay failed: {err.strip().splitlines()[-1:]}")
    with open(args.sim_dir / "ground_truth.csv") as f:
        truth = {
            int(r["src_index"]): (float(r["x_px"]), float(r["y_px"])) for r in csv.DictReader(f)
        }
    errors = position_errors(args.run_dir, truth)
    run = json.loads((args.run_dir / "run.json").read_text())
    result = {
        "frames": len(truth),
        "wall_s": round(wall, 1),
        "target_wall_s": 60,
        "peak_rss_mb_per_process": sorted(round(v, 1) for v in peak.values()),
        "error_px": {k: errors[k] for k in ("median_px", "p99_px", "max_px")},
        "statuses": run["counts"]["statuses"],
        "timings": run["timings"],
        "mosaic": run["mosaic"],
        "residuals": run["residuals"],
    }
    print(json.dumps(result, indent=2))
    print(f"wrote {write_result('paper_run', result)}")


if __name__ == "__main__":
    main()
