"""Keyframe selection speed and the overlaps it produces on a simulated video.

A virtual-SEM video (1024 x 768, 25 frames/s, consecutive frames overlapping
~95 %, low-definition noise) is rendered once into memory; the selector is
then timed on it alone, and the true overlap of consecutive keyframes is
read from the simulator's ground truth.  Writes ``bench/results/keyframes.json``.

Usage: ``python -m bench.bench_keyframes [--rows R] [--frames-per-row N]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np

from bench.common import write_result
from cemi_stream.capture.crop import detect_crop
from cemi_stream.capture.faults import FaultDetector
from cemi_stream.capture.keyframes import KeyframeSelector, overlap_fraction
from cemi_stream.config import FaultConfig, KeyframeConfig
from drivers.sim import SimConfig, SimSource


def main() -> None:
    """Render the video, time the selector, report overlaps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--frames-per-row", type=int, default=10)
    parser.add_argument("--overlap", type=float, default=0.5)
    args = parser.parse_args()
    sim = SimConfig(rows=args.rows, frames_per_row=args.frames_per_row, video=True, noise="ld")
    source = SimSource(sim)
    source.open()
    frames = []
    t0 = time.perf_counter()
    while (frame := source.read()) is not None:
        frames.append(frame)
    render_s = time.perf_counter() - t0

    results = {}
    for overlap in sorted({args.overlap, 0.3, 0.6}):
        selector = KeyframeSelector(KeyframeConfig(overlap=overlap))
        decisions = []
        t0 = time.perf_counter()
        for frame in frames:
            decisions += selector.push(frame)
        decisions += selector.flush()
        select_s = time.perf_counter() - t0
        kept = [d for d in decisions if d.kept]
        w, h = sim.frame_width, sim.frame_height
        true = []  # steady stage motion: keyframes chosen for their overlap
        row_end = []  # extra frames that cover the end of a row
        for a, b in itertools.pairwise(kept):
            ta = source.truth_for(a.frame.meta.src_index)
            tb = source.truth_for(b.frame.meta.src_index)
            if ta.row == tb.row:
                ov = overlap_fraction(tb.x_px - ta.x_px, tb.y_px - ta.y_px, w, h)
                (true if b.reason == "overlap" else row_end).append(ov)
        est_err = [
            abs(d.dx_px - (source.truth_for(d.frame.meta.src_index).x_px - prev.x_px))
            for d, prev in _kept_with_previous(decisions, source)
            if d.dx_px is not None
        ]
        results[f"{overlap:.2f}"] = {
            "ms_per_input_frame": round(select_s / len(frames) * 1e3, 3),
            "keyframes": len(kept),
            "true_overlap": {
                "min": round(min(true), 3),
                "p05": round(float(np.percentile(true, 5)), 3),
                "median": round(float(np.median(true)), 3),
                "p95": round(float(np.percentile(true, 95)), 3),
                "max": round(max(true), 3),
                "inside_30_60_percent": round(sum(0.3 <= t <= 0.6 for t in true) / len(true), 3),
            },
            "row_end_frames": len(row_end),
            "row_end_overlap_max": round(max(row_end), 3) if row_end else None,
            "dx_error_px": {
                "median": round(float(np.median(est_err)), 2),
                "max": round(float(np.max(est_err)), 2),
            },
        }
        print(overlap, json.dumps(results[f"{overlap:.2f}"]))

    faults = FaultDetector(FaultConfig())
    t0 = time.perf_counter()
    for frame in frames:
        faults.check(frame.image)
    fault_ms = (time.perf_counter() - t0) / len(frames) * 1e3
    t0 = time.perf_counter()
    for frame in frames[:50]:
        detect_crop(frame.image)
    crop_ms = (time.perf_counter() - t0) / min(len(frames), 50) * 1e3

    path = write_result(
        "keyframes",
        {
            "video": {
                "frames": len(frames),
                "frame_size": [sim.frame_width, sim.frame_height],
                "fps": sim.fps,
                "video_overlap": sim.video_overlap,
                "rows": sim.rows,
                "noise": sim.noise,
                "render_ms_per_frame": round(render_s / len(frames) * 1e3, 2),
            },
            "target": "<= 3 ms per input frame at 1024 x 768; overlaps inside 30-60 %",
            "by_target_overlap": results,
            "fault_check_ms_per_frame": round(fault_ms, 3),
            "crop_detect_ms_per_frame": round(crop_ms, 3),
        },
    )
    print(f"wrote {path}")


def _kept_with_previous(decisions: list, source: SimSource) -> list:  # type: ignore[type-arg]
    """(decision, truth of the previous keyframe) for keyframes after the first of a row."""
    out = []
    prev = None
    for d in decisions:
        if not d.kept:
            continue
        truth = source.truth_for(d.frame.meta.src_index)
        if prev is not None and prev.row == truth.row:
            out.append((d, prev))
        prev = truth
    return out


if __name__ == "__main__":
    main()
