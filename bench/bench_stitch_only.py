"""The stitch stage alone on a finished capture: steady-state frames/s.

Takes the run directory of a finished ``replay`` (e.g. the paper-sized run of
``bench/bench_paper_run.py``), links its capture (spool, ``capture.csv``,
``capture.json``) into a fresh run directory, runs ``run_daemon.py stitch``
there and reports frames/s over the whole stitch (registration, rendering,
Zarr writes and finalisation) plus the per-stage milliseconds.  Repeated
``--repeats`` times; writes ``bench/results/paper_stitch_only.json``.

Usage: ``python -m bench.bench_stitch_only REPLAY_RUN_DIR WORK_DIR [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import write_result
from cemi_stream.capture.spool import SPOOL_DIR

REPO = Path(__file__).resolve().parents[1]
CAPTURE_FILES = ("capture.csv", "capture.json")


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link ``src`` into ``dst`` (copies when links are impossible)."""
    shutil.copytree(src, dst, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main() -> None:
    """Stitch the capture ``--repeats`` times and write the result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("replay_run", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs = []
    for i in range(args.repeats):
        run_dir = args.work / f"stitch-{i}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        _link_tree(args.replay_run / SPOOL_DIR, run_dir / SPOOL_DIR)
        for name in CAPTURE_FILES:
            shutil.copy2(args.replay_run / name, run_dir / name)
        cmd = [sys.executable, str(REPO / "run_daemon.py"), "stitch", "--run-dir", str(run_dir),
               "-q"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"stitch failed: {proc.stderr.strip()[-300:]}")
        summary = json.loads((run_dir / "stitch.json").read_text())["summary"]
        runs.append(
            {
                "wall_s": round(wall, 2),
                "seconds": round(summary["seconds"], 2),
                "frames": summary["frames"],
                "frames_per_s": round(summary["frames_per_s"], 1),
                "ms_per_frame": summary["timings_ms_per_frame"],
                "statuses": summary["statuses"],
            }
        )
        print(json.dumps(runs[-1]))
        shutil.rmtree(run_dir)
    rates = [r["frames_per_s"] for r in runs]
    path = write_result(
        "paper_stitch_only",
        {
            "what": "run_daemon.py stitch alone on the finished paper-sized capture "
            "(bench/make_paper_run.py + bench/bench_paper_run.py replay spool)",
            "frames": runs[0]["frames"],
            "frames_per_s_median": statistics.median(rates),
            "frames_per_s_runs": rates,
            "runs": runs,
            "target_frames_per_s": 100,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
