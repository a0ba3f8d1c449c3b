"""Denoise throughput with 1 and 2 local workers (CPU backend, the shipped compact model).

One capture of a simulated LD traversal is spooled once; the denoise stage
then denoises that raw spool (no bus consumer) with ``denoise.workers`` = 1
(the in-process path: the stage denoises itself) and 2 (a
:class:`~cemi_stream.denoise.workers.DenoisePool` of two local worker
processes, each with half the cores' torch threads).  Reports wall time and
frames/s of the denoising (model loading excluded, as the stage measures it:
``denoise.json`` ``seconds - load_s``), checks that both outputs hold every
frame in order and agree (max grey-level difference).  Writes
``bench/results/denoise_workers.json``.

Usage: ``python -m bench.bench_denoise_workers [--frames N] [--size WxH] [--backend cpu]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write_result
from cemi_stream.capture.spool import SpoolReader
from cemi_stream.capture.stage import run_capture
from cemi_stream.config import load_config
from cemi_stream.denoise.stage import DENOISED_DIR, run_denoise_stage


def _run(raw: Path, dest: Path, workers: int, backend: str, batch: int) -> dict[str, Any]:
    shutil.copytree(raw, dest)
    config = load_config(
        overrides={
            "denoise.backend": backend,
            "denoise.workers": workers,
            "denoise.batch": batch,
            "denoise.pipes": [],
            "bus.monitor": False,
        }
    )
    t0 = time.perf_counter()
    summary = run_denoise_stage(dest, config, progress=False)
    wall = time.perf_counter() - t0
    data = json.loads((dest / DENOISED_DIR / "denoise.json").read_text())["summary"]
    work_s = data["seconds"] - data["load_s"]
    return {
        "workers": workers,
        "frames": summary.frames,
        "wall_s": round(wall, 2),
        "denoise_s": round(work_s, 2),
        "frames_per_s": round(summary.denoised / work_s, 3) if work_s > 0 else None,
        "per_worker": data.get("workers") or {"in-process": summary.denoised},
        "ms_per_frame_inference": data["ms_per_frame"]["denoise"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", default="512x384")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        raw = Path(tmp) / "raw"
        source = f"sim:?rows=1&frames_per_row={args.frames}&frame_size={args.size}&noise=ld&seed=3"
        run_capture(
            source, raw, load_config(overrides={"bus.pipes": [], "bus.monitor": False}),
            pace="max", progress=False,
        )  # fmt: skip
        runs = [_run(raw, Path(tmp) / f"w{n}", n, args.backend, args.batch) for n in (1, 2)]
        one = [f.image for f in SpoolReader(Path(tmp) / "w1" / DENOISED_DIR)]
        two = [f.image for f in SpoolReader(Path(tmp) / "w2" / DENOISED_DIR)]
        assert len(one) == len(two) == len(SpoolReader(raw))
        max_diff = max(
            int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(one, two, strict=True)
        )
    fps1, fps2 = runs[0]["frames_per_s"], runs[1]["frames_per_s"]
    result = {
        "source": source,
        "backend": args.backend,
        "model": "semnet-compact-kriss (default)",
        "batch": args.batch,
        "runs": runs,
        "speedup_2_vs_1": round(fps2 / fps1, 3) if fps1 and fps2 else None,
        "max_grey_difference_1_vs_2": max_diff,
        "note": "2-core machine: one in-process worker already uses both cores (torch threads), "
        "so two workers with one thread each can gain little; the pool's value is remote/GPU "
        "workers and hosts with more cores.",
    }
    path = write_result("denoise_workers", result)
    for r in runs:
        print(
            f"workers {r['workers']}: {r['frames']} frames, {r['frames_per_s']} frames/s "
            f"(denoise {r['denoise_s']} s, wall {r['wall_s']} s) {r['per_worker']}"
        )
    print(f"speed-up 2 vs 1: {result['speedup_2_vs_1']}, max grey diff {max_diff} -> {path}")


if __name__ == "__main__":
    main()
