"""``demo``: the pipeline on the embedded virtual SEM.

A simulated stage traversal recorded as video (3 raster rows, low-definition
noise, FEI-style data bar) is replayed through the real capture, denoise and
stitch processes (``replay``); then the demo checks the mosaic against the
simulator's ground truth and reports what happened.  The run directory holds
the mosaic (``mosaic.ome.zarr``), ``positions.csv``, ``run.json``,
``preview.png``, ``keyframes.png`` (a contact sheet of the keyframes) and,
when denoising ran, ``denoise.png`` (a raw keyframe beside its denoised
version).

Denoising uses the shipped default model; it is on when the ``ml`` extra
(torch) is installed and off, with a note saying how to turn it on, when not.
"""

from __future__ import annotations

import csv
import importlib.util
import time
from pathlib import Path

import cv2
import numpy as np

from .capture.spool import SpoolReader
from .errors import CemiError
from .replay import run_replay
from .stitch.feed import DENOISED_DIR

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


def demo_denoise(requested: str) -> tuple[str, str]:
    """The demo's denoise backend and a note on the choice.

    Parameters
    ----------
    requested : str
        ``auto`` (on when torch and the default model are there), ``off``, or
        a backend name.
    """
    if requested != "auto":
        return requested, ""
    if importlib.util.find_spec("torch") is None:
        return "off", "off (install the ml extra for it: pip install -e '.[ml]')"
    from models.zoo import resolve_model

    try:
        resolve_model(None)
    except CemiError as exc:
        return "off", f"off ({exc})"
    return "auto", ""


def run_demo(out: Path, quiet: bool = False, denoise: str = "auto") -> int:
    """Run the demo into a fresh folder under ``out``; returns the exit code.

    Parameters
    ----------
    out : Path
        Parent folder of the run directory.
    quiet : bool
        No progress or report.
    denoise : str
        ``auto``, ``off`` or a denoise backend (see :func:`demo_denoise`).
    """
    run_dir = Path(out) / time.strftime("run-%Y%m%d-%H%M%S")
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(out) / time.strftime(f"run-%Y%m%d-%H%M%S-{suffix}")
    source = demo_source()
    say = (lambda *a: None) if quiet else print
    denoise, note = demo_denoise(denoise)
    stages = "capture -> bus -> " + ("stitch" if denoise == "off" else "denoise -> stitch")
    say(f"cemi-stream demo: virtual SEM video -> {stages} -> {run_dir}")
    say(f"  source: {source}")
    summary = run_replay(source, run_dir, denoise=denoise, progress=not quiet)
    counts, timings, mosaic = summary["counts"], summary["timings"], summary["mosaic"]
    errors = position_errors(run_dir)
    spool = SpoolReader(run_dir)
    cv2.imwrite(str(run_dir / "keyframes.png"), _contact_sheet(spool))

    say(f"  capture: {counts['frames_read']} video frames -> {counts['frames_kept']} keyframes "
        f"({_counts(counts['capture_reasons'])})")  # fmt: skip
    if denoise != "off":
        den = summary["denoise"]
        frames = SpoolReader(run_dir / DENOISED_DIR)
        cv2.imwrite(str(run_dir / "denoise.png"), _before_after(spool, frames))
        say(f"  denoise: {den['frames']} frames with {den['model']} on {den['backend']}, "
            f"{den['frames_per_s']:.1f} frames/s -> {run_dir / 'denoise.png'}")  # fmt: skip
    else:
        say(f"  denoise: {note or 'off'}")
    say(f"  stitch: {counts['stitched']} frames in {counts['rows']} rows "
        f"({_counts(counts['statuses'])}), "
        f"{timings['stitch_frames_per_s']:.0f} frames/s, layout {mosaic['layout']}")  # fmt: skip
    say(f"  position error vs ground truth: median {errors['median']:.2f} px, "
        f"max {errors['max']:.2f} px over {errors['frames']} frames")  # fmt: skip
    res = summary["residuals"]
    say(f"  global solve: {res['constraints']} constraints, rms {res['rms_px']:.2f} px, "
        f"{res['rejected']} rejected")  # fmt: skip
    say(f"  mosaic: {mosaic['shape'][1]} x {mosaic['shape'][0]} px, {mosaic['levels']} levels "
        f"-> {run_dir / 'mosaic.ome.zarr'}")  # fmt: skip
    say(f"  preview: {run_dir / 'preview.png'}   wall time {timings['wall_s']:.1f} s")
    ok = counts["stitched"] == counts["frames_kept"] == len(spool) and errors["max"] <= 3.0
    say("  result: " + ("OK" if ok else "CHECK FAILED"))
    return 0 if ok else 1


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()))


def position_errors(run_dir: Path) -> dict[str, float]:
    """Stitched positions vs the simulator's truth, after removing the global offset."""
    from drivers.sim import config_from_options, plan_traversal

    steps = plan_traversal(config_from_options(dict(DEMO_SIM)))
    est, true = [], []
    with open(run_dir / "positions.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["x_px"]:
                step = steps[int(row["src_index"])]
                est.append((float(row["x_px"]), float(row["y_px"])))
                true.append((step.x_px, step.y_px))
    diff = np.array(est) - np.array(true)
    diff -= np.median(diff, axis=0)
    err = np.hypot(diff[:, 0], diff[:, 1])
    return {"frames": len(err), "median": float(np.median(err)), "max": float(err.max())}


def _before_after(raw: SpoolReader, denoised: SpoolReader, side: int = 384) -> np.ndarray:
    """A centre crop of the middle keyframe, raw (left) and denoised (right), 1:1 pixels."""
    seq = len(raw) // 2
    a, b = raw.image(seq), denoised.image(seq)
    h, w = a.shape
    y0, x0 = max((h - side) // 2, 0), max((w - side) // 2, 0)
    crops = [img[y0 : y0 + side, x0 : x0 + side] for img in (a, b)]
    gap = np.full((crops[0].shape[0], 8), 255, np.uint8)
    return np.hstack([crops[0], gap, crops[1]])


def _contact_sheet(spool: SpoolReader) -> np.ndarray:
    """Keyframe thumbnails, one line per traversal row, 4 px gaps."""
    lines: list[list[np.ndarray]] = []
    last_row: int | None = -1
    for seq in range(len(spool)):
        frame = spool.read(seq)
        h, w = frame.image.shape
        thumb = cv2.resize(frame.image, (w // _THUMB, h // _THUMB), interpolation=cv2.INTER_AREA)
        if frame.meta.row != last_row:
            lines.append([])
            last_row = frame.meta.row
        lines[-1].append(thumb)
    if not lines:
        return np.zeros((8, 8), np.uint8)
    th, tw = lines[0][0].shape
    gap = 4
    sheet = np.full(
        (len(lines) * (th + gap) + gap, max(len(ln) for ln in lines) * (tw + gap) + gap),
        255,
        np.uint8,
    )
    for i, line in enumerate(lines):
        for j, image in enumerate(line):
            y, x = gap + i * (th + gap), gap + j * (tw + gap)
            sheet[y : y + th, x : x + tw] = image
    return sheet
