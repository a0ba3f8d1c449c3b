"""``demo``: the acquisition front end on the embedded virtual SEM.

A simulated stage traversal recorded as video (3 raster rows, low-definition
noise, FEI-style data bar) is captured by a real ``capture`` child process;
this process receives the keyframes over the frame bus like a downstream
stage would, then reports what happened and writes ``keyframes.png``, a
contact sheet of the keyframes (one line per traversal row).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .errors import CemiError
from .keyframes import overlap_fraction
from .protocol import Message
from .spool import SpoolReader
from .tap import tap

DEMO_SIM = {
    "video": "1",
    "rows": "3",
    "frames_per_row": "6",
    "frame_size": "1024x768",
    "noise": "ld",
    "databar": "1",
    "seed": "7",
}
_THUMB = 8  # contact-sheet downsampling


def demo_source() -> str:
    """The demo's source string."""
    return "sim:?" + "&".join(f"{k}={v}" for k, v in DEMO_SIM.items())


def run_demo(out: Path, quiet: bool = False) -> int:
    """Run the demo into a fresh folder under ``out``; returns the exit code."""
    run_dir = Path(out) / time.strftime("run-%Y%m%d-%H%M%S")
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(out) / time.strftime(f"run-%Y%m%d-%H%M%S-{suffix}")
    run_dir.mkdir(parents=True)
    source = demo_source()
    say = (lambda *a: None) if quiet else print
    say(f"cemi-stream demo: virtual SEM video -> capture process -> frame bus -> {run_dir}")
    say(f"  source: {source}")
    cmd = [sys.executable, "-m", "cemi_stream", "capture", source, "--run-dir", str(run_dir)]
    with open(run_dir / "capture.stderr", "w", encoding="utf-8") as err:
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        thumbs: list[tuple[int | None, np.ndarray]] = []

        def keep_thumb(message: Message) -> None:
            frame = message.frame
            if frame is not None:
                h, w = frame.image.shape
                small = cv2.resize(
                    frame.image, (w // _THUMB, h // _THUMB), interpolation=cv2.INTER_AREA
                )
                thumbs.append((frame.meta.row, small))

        try:
            report = tap(run_dir, "stitch", timeout_s=60, on_frame=keep_thumb)
        finally:
            code = child.wait(timeout=120)
    if code != 0:
        tail = (run_dir / "capture.stderr").read_text(encoding="utf-8").strip().splitlines()[-1:]
        raise CemiError(f"capture process failed with exit code {code}: {' '.join(tail)}")
    summary = json.loads((run_dir / "capture.json").read_text(encoding="utf-8"))["summary"]
    spool = SpoolReader(run_dir)
    spooled = len(spool)
    overlaps = _true_overlaps(run_dir, spool.frame_shape)
    sheet = _contact_sheet(thumbs)
    cv2.imwrite(str(run_dir / "keyframes.png"), sheet)

    say(f"  capture: {summary['frames_in']} video frames in {summary['seconds']:.1f} s "
        f"({summary['input_fps']:.0f} frames/s incl. simulation)")  # fmt: skip
    crop = summary["crop"]
    say(f"  crop: data bar of {crop.get('databar_rows', 0)} rows stripped -> frames "
        f"{crop['rect'][2]}x{crop['rect'][3]}")  # fmt: skip
    say(f"  keyframes kept: {summary['kept']}  (reasons: "
        + ", ".join(f"{k} {v}" for k, v in sorted(summary["reasons"].items())) + ")")  # fmt: skip
    if overlaps:
        say(f"  true overlap of consecutive keyframes (ground truth): min {min(overlaps):.2f}, "
            f"median {float(np.median(overlaps)):.2f}, max {max(overlaps):.2f} "
            "(target 0.50)")  # fmt: skip
    say(f"  bus: {report['frames']} frames received over {report['pipe']!r}, "
        f"{report['missing']} missing, {sum(report['rejected'].values())} rejected, "
        f"end of stream {'seen' if report['ended'] else 'NOT seen'}")  # fmt: skip
    say(f"  spool: {spooled} frames in {run_dir / 'frames.zarr'}")
    say(f"  contact sheet: {run_dir / 'keyframes.png'}")
    ok = (
        report["ended"]
        and report["missing"] == 0
        and report["frames"] == summary["kept"] == spooled
    )
    say("  result: " + ("OK, every keyframe spooled and delivered" if ok else "FRAMES LOST"))
    return 0 if ok else 1


def _true_overlaps(run_dir: Path, frame_shape: tuple[int, int]) -> list[float]:
    """Overlap of consecutive keyframes in the same row, from the simulator's ground truth."""
    from drivers.sim import SimConfig, config_from_options, plan_traversal

    config: SimConfig = config_from_options(dict(DEMO_SIM))
    steps = plan_traversal(config)
    kept = []
    with open(run_dir / "capture.csv", encoding="utf-8") as csv:
        next(csv)
        for line in csv:
            fields = line.rstrip("\n").split(",")
            if fields[1] == "1":
                kept.append(steps[int(fields[0])])
    h, w = frame_shape  # after the data bar crop
    return [
        overlap_fraction(b.x_px - a.x_px, b.y_px - a.y_px, w, h)
        for a, b in itertools.pairwise(kept)
        if a.row == b.row
    ]


def _contact_sheet(thumbs: list[tuple[int | None, Any]]) -> np.ndarray:
    """Thumbnails in lines, one line per traversal row, 4 px gaps."""
    if not thumbs:
        return np.zeros((8, 8), np.uint8)
    lines: list[list[np.ndarray]] = []
    last_row: int | None = -1
    for row, image in thumbs:
        if row != last_row:
            lines.append([])
            last_row = row
        lines[-1].append(image)
    th, tw = thumbs[0][1].shape
    gap = 4
    width = max(len(line) for line in lines) * (tw + gap) + gap
    sheet = np.full((len(lines) * (th + gap) + gap, width), 255, np.uint8)
    for i, line in enumerate(lines):
        for j, image in enumerate(line):
            y, x = gap + i * (th + gap), gap + j * (tw + gap)
            sheet[y : y + th, x : x + tw] = image
    return sheet
