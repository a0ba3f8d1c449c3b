"""``replay``: capture and stitch a recorded source as two real processes.

The capture process (``run_daemon.py capture``) reads the source at full
speed, spools and publishes keyframes; the stitch process
(``run_daemon.py stitch``) consumes them over the bus and builds the mosaic.
This process only starts both, shows progress, and writes ``run.json``.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zmq

from . import __version__
from .errors import CemiError
from .progress import Progress
from .spool import SPOOL_DIR

RUN_SUMMARY = "run.json"


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return max(sum(1 for _ in f) - 1, 0)
    except OSError:
        return 0


def run_replay(
    source: str,
    run_dir: Path,
    *,
    keyframes: str | None = None,
    pixel_size_um: float | None = None,
    layout: str | None = None,
    config_file: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Capture and stitch ``source`` into ``run_dir``; returns the run summary.

    Raises
    ------
    CemiError
        When ``run_dir`` already holds a run, or a process fails (its last
        error line is quoted).
    """
    run_dir = Path(run_dir)
    if (run_dir / SPOOL_DIR).exists():
        raise CemiError(
            f"{run_dir}: already holds a run; choose a new folder "
            "(or resume its stitching with: run_daemon.py stitch --run-dir)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    common = ["-q"] + (["--config", config_file] if config_file else [])
    capture_cmd = [sys.executable, "-m", "cemi_stream", "capture", source, "--run-dir",
                   str(run_dir), "--pace", "max", *common]  # fmt: skip
    if keyframes:
        capture_cmd += ["--keyframes", keyframes]
    stitch_cmd = [sys.executable, "-m", "cemi_stream", "stitch", "--run-dir", str(run_dir), *common]
    if pixel_size_um is not None:
        stitch_cmd += ["--pixel-size-um", str(pixel_size_um)]
    if layout:
        stitch_cmd += ["--layout", layout]
    started = time.monotonic()
    with (
        open(run_dir / "capture.stderr", "w", encoding="utf-8") as capture_log,
        open(run_dir / "stitch.stderr", "w", encoding="utf-8") as stitch_log,
    ):
        capture = subprocess.Popen(capture_cmd, stdout=subprocess.DEVNULL, stderr=capture_log)
        stitch = subprocess.Popen(stitch_cmd, stdout=subprocess.DEVNULL, stderr=stitch_log)
        bar = Progress("replay", enabled=progress)
        while capture.poll() is None or stitch.poll() is None:
            time.sleep(0.2)
            captured = _count_lines(run_dir / "capture.csv")
            stitched = _count_lines(run_dir / "stitch.journal") + 1
            bar.update(stitched, f"{captured} frames read")
            if capture.poll() not in (None, 0) and stitch.poll() is None:
                stitch.terminate()  # nothing more will come
        bar.close()
    for name, proc in (("capture", capture), ("stitch", stitch)):
        if proc.returncode != 0:
            lines = (run_dir / f"{name}.stderr").read_text(encoding="utf-8").strip().splitlines()
            raise CemiError(
                f"{name} process failed (exit {proc.returncode}): {' '.join(lines[-1:])}"
            )
    seconds = time.monotonic() - started
    summary = _run_summary(run_dir, source, seconds)
    (run_dir / RUN_SUMMARY).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _run_summary(run_dir: Path, source: str, seconds: float) -> dict[str, Any]:
    capture = json.loads((run_dir / "capture.json").read_text(encoding="utf-8"))
    stitch = json.loads((run_dir / "stitch.json").read_text(encoding="utf-8"))
    cap, st = capture["summary"], stitch["summary"]
    return {
        "source": source,
        "versions": {
            "cemi_stream": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "zarr": zarr.__version__,
            "pyzmq": zmq.__version__,
        },
        "config": stitch["config"],
        "counts": {
            "frames_read": cap["frames_in"],
            "frames_kept": cap["kept"],
            "capture_reasons": cap["reasons"],
            "stitched": st["frames"],
            "statuses": st["statuses"],
            "rows": st["rows"],
        },
        "timings": {
            "wall_s": round(seconds, 2),
            "capture_frames_per_s": round(cap["input_fps"], 1),
            "stitch_frames_per_s": round(st["frames_per_s"], 1),
            "stitch_ms_per_frame": st["timings_ms_per_frame"],
        },
        "mosaic": {
            "shape": st["mosaic_shape"],
            "levels": st["mosaic_levels"],
            "pixel_size_um": st["pixel_size_um"],
            "layout": st["layout"],
        },
        "residuals": st["residuals"],
    }
