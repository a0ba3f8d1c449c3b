"""Fault injection: ``kill -9`` of a run's stages at random moments, through the supervisor.

Each of ``--runs`` runs (20 by default) of the same source is disturbed once:
one stage (in turn ``capture``, ``stitch`` and, with ``--denoise``,
``denoise``) is sent SIGKILL when its progress (frames spooled, denoised or
journaled) reaches a random point of the run.  The supervisor restarts it and
it resumes from its own record.  For every run the bench checks what the
issue asks: the run finishes, no frame is lost (every frame placed),
``positions.csv`` is identical to an undisturbed run of the same source and
the mosaic is bit-identical, and no process of the run is left afterwards
(the process table, by the run mark :data:`~cemi_stream.daemon.lifecycle.RUN_ENV`).
It also times how long after its death the killed stage processes a frame
again (target < 3 s).

Usage::

    python -m bench.bench_faults [--runs 20] [--denoise cpu] [--seed 1]

Writes ``bench/results/faults.json`` and prints a short table.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from bench.common import write_result
from cemi_stream.daemon.lifecycle import run_processes
from cemi_stream.daemon.options import RunOptions
from cemi_stream.daemon.supervisor import Supervisor

SOURCE = "sim:?rows=3&frames_per_row=8&frame_size=512x384&seed=5"
FRAMES = 24
# Frames/s of the capture: slow enough that every stage is mid-run for a while.
PACE = "8"


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def progress(run_dir: Path, stage: str) -> int:
    """Frames a stage has committed so far."""
    if stage == "capture":
        return max(_lines(run_dir / "frames.zarr" / "table.csv") - 1, 0)
    if stage == "denoise":
        return max(_lines(run_dir / "denoised" / "frames.zarr" / "table.csv") - 1, 0)
    return _lines(run_dir / "stitch.journal")


def mosaic(run_dir: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(run_dir / "mosaic.ome.zarr" / "0"), mode="r")[:])


def wait_state(sup: Supervisor, run_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = sup.get(run_id)
        if info["state"] in ("finished", "failed", "interrupted"):
            return info
        time.sleep(0.05)
    return sup.get(run_id)


def disturbed_run(
    sup: Supervisor, options: RunOptions, stage: str, at: int, ref: Path
) -> dict[str, Any]:
    """One run with ``stage`` killed once its progress reaches ``at`` frames."""
    run_id = sup.start(options)
    run_dir = sup.runs_dir / run_id
    out: dict[str, Any] = {"run": run_id, "stage": stage, "kill_at_frame": at}
    deadline = time.monotonic() + 300
    killed_at: float | None = None
    done_at_kill = 0
    while time.monotonic() < deadline:
        info = sup.get(run_id)
        if info["state"] not in ("starting", "running"):
            break
        pid = info["stages"].get(stage, {}).get("pid")
        if pid and progress(run_dir, stage) >= at:
            done_at_kill = progress(run_dir, stage)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            killed_at = time.monotonic()
            break
        time.sleep(0.005)
    again_s = None
    if killed_at is not None:
        while time.monotonic() - killed_at < 120:
            if progress(run_dir, stage) > done_at_kill:
                again_s = time.monotonic() - killed_at
                break
            if sup.get(run_id)["state"] in ("finished", "failed", "interrupted"):
                break
            time.sleep(0.005)
    info = wait_state(sup, run_id, 300)
    leftover = run_processes(run_dir)
    t_end = time.monotonic() + 5
    while leftover and time.monotonic() < t_end:
        time.sleep(0.05)
        leftover = run_processes(run_dir)
    same_positions = (run_dir / "positions.csv").is_file() and (
        (run_dir / "positions.csv").read_text() == (ref / "positions.csv").read_text()
    )
    same_mosaic = info["state"] == "finished" and bool(np.array_equal(mosaic(run_dir), mosaic(ref)))
    out.update(
        killed=killed_at is not None,
        killed_after_frames=done_at_kill,
        processing_again_s=None if again_s is None else round(again_s, 3),
        state=info["state"],
        restarts=info["stages"].get(stage, {}).get("restarts"),
        placed=info["counts"].get("placed"),
        frames_lost=FRAMES - sum(info["counts"].values()),
        positions_identical=same_positions,
        mosaic_identical=same_mosaic,
        orphans=len(leftover),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="disturbed runs (default 20)")
    p.add_argument("--denoise", default="off", help="denoise backend, or off (default)")
    p.add_argument("--seed", type=int, default=1, help="seed of the kill moments")
    p.add_argument("--data-dir", type=Path, default=None, help="keep the runs here")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    stages = ["capture", "stitch"] + (["denoise"] if args.denoise != "off" else [])
    with tempfile.TemporaryDirectory(prefix="cemi-faults-") as tmp:
        root = args.data_dir or Path(tmp)
        sup = Supervisor(root, max_restarts=5, restart_window_s=60)
        try:
            options = RunOptions(source=SOURCE, pace=PACE, denoise=args.denoise)
            t0 = time.monotonic()
            ref_id = sup.start(options)
            ref_info = wait_state(sup, ref_id, 300)
            if ref_info["state"] != "finished":
                print(
                    f"bench_faults: the undisturbed run ended {ref_info['state']}", file=sys.stderr
                )
                return 1
            ref = sup.runs_dir / ref_id
            print(f"undisturbed run: {time.monotonic() - t0:.1f} s, {ref_info['counts']}")
            results = []
            for i in range(args.runs):
                stage = stages[i % len(stages)]
                at = rng.randint(1, FRAMES - 3)
                r = disturbed_run(sup, options, stage, at, ref)
                results.append(r)
                ok = r["state"] == "finished" and r["positions_identical"] and r["mosaic_identical"]
                print(
                    f"[{i + 1:2d}/{args.runs}] kill -9 {stage:8s} "
                    f"after {r['killed_after_frames']:2d} frames: {r['state']}, "
                    f"again {r['processing_again_s']} s, "
                    f"{'identical' if ok else 'DIFFERENT'}, orphans {r['orphans']}",
                    flush=True,
                )
        finally:
            sup.shutdown(10)
    again = [r["processing_again_s"] for r in results if r["processing_again_s"] is not None]
    by_stage = {
        s: sorted(r["processing_again_s"] for r in results
                  if r["stage"] == s and r["processing_again_s"] is not None)
        for s in stages
    }  # fmt: skip
    passed = [
        r for r in results
        if r["killed"] and r["state"] == "finished" and r["frames_lost"] == 0
        and r["positions_identical"] and r["mosaic_identical"] and r["orphans"] == 0
    ]  # fmt: skip
    data = {
        "source": SOURCE,
        "pace": PACE,
        "denoise": args.denoise,
        "runs": results,
        "passed": len(passed),
        "total": len(results),
        "processing_again_s": {
            "median": statistics.median(again) if again else None,
            "max": max(again) if again else None,
            "by_stage_max": {s: (v[-1] if v else None) for s, v in by_stage.items()},
        },
        "load_average": os.getloadavg(),
        "targets": {"all_identical_no_orphans": len(passed) == len(results),
                    "processing_again_lt_3s": bool(again) and max(again) < 3.0},
    }  # fmt: skip
    path = write_result("faults", data)
    print(
        f"bench_faults: {len(passed)}/{len(results)} runs finished identical with no orphan; "
        f"processing again after kill -9: median {data['processing_again_s']['median']} s, "
        f"max {data['processing_again_s']['max']} s (target < 3 s) -> {path}"
    )
    return 0 if len(passed) == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
