"""``replay``: capture, (denoise,) and stitch a recorded source as real processes.

The capture process (``run_daemon.py capture``) reads the source at full
speed, spools and publishes keyframes; the stitch process
(``run_daemon.py stitch``) consumes them over the bus and builds the mosaic.
With ``--denoise BACKEND`` a denoise process (``run_daemon.py denoise-stage``)
sits between them: the capture feeds its pipe ``denoise``, and the stitcher
reads the denoised frames from ``RUN_DIR/denoised`` (``--frames-dir``).  The
denoise process is started first and the others only once it has loaded its
model and bound its bus, so a model or backend that cannot run fails before
anything is captured.  This process only starts them, shows progress, and
writes ``run.json``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import zarr
import zmq

from . import __version__
from .capture.spool import SPOOL_DIR, TABLE_NAME
from .config import DENOISE_BACKENDS, load_config
from .errors import CemiError, ConfigError, DenoiseError
from .progress import Progress
from .stitch.feed import DENOISED_DIR

RUN_SUMMARY = "run.json"
DENOISE_SUMMARY = "denoise.json"
# Longest wait for the denoise process to load its model and bind its bus, seconds.
DENOISE_READY_S = 300.0
# After a process failed, the others get this long to stop on SIGTERM before SIGKILL.
TERMINATE_GRACE_S = 10.0


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return max(sum(1 for _ in f) - 1, 0)
    except OSError:
        return 0


def check_denoise(denoise: str, model: str | None, config_file: str | None) -> Path | None:
    """Validate ``--denoise`` and ``--model`` without starting anything.

    Parameters
    ----------
    denoise : str
        ``off`` or a backend name (:data:`~cemi_stream.config.DENOISE_BACKENDS`).
    model : str or None
        Model name or path; None takes ``denoise.model`` of the configuration
        (None there too: the default model).
    config_file : str or None
        TOML configuration file.

    Returns
    -------
    Path or None
        The model's weights file, or None when denoising is off.

    Raises
    ------
    ConfigError
        Unknown backend, or ``--model`` without denoising.
    ModelError
        No such model.
    DenoiseError
        A backend whose runtime is not installed.
    """
    if denoise not in ("off", *DENOISE_BACKENDS):
        raise ConfigError(
            f"--denoise {denoise}: unknown (choose from off, {', '.join(DENOISE_BACKENDS)})"
        )
    if denoise == "off":
        if model is not None:
            raise ConfigError(f"--model {model}: only used with --denoise (it is off)")
        return None
    from models.zoo import resolve_model

    name = model if model is not None else load_config(config_file).denoise.model
    path = resolve_model(name).resolve()
    # Cheap checks only (no torch import here); the denoise process checks the rest
    # (CUDA device, model contents) before the capture starts.
    needs = {"onnx": "onnxruntime", "tensorrt": "torch_tensorrt"}.get(denoise)
    if needs and importlib.util.find_spec(needs) is None:
        raise DenoiseError(f"--denoise {denoise}: {needs} is not installed")
    return path


def run_replay(
    source: str,
    run_dir: Path,
    *,
    keyframes: str | None = None,
    pixel_size_um: float | None = None,
    layout: str | None = None,
    config_file: str | None = None,
    denoise: str = "off",
    model: str | None = None,
    progress: bool = True,
    levels: str | None = None,
    stitch_args: list[str] | None = None,
) -> dict[str, Any]:
    """Capture, denoise (optionally) and stitch ``source`` into ``run_dir``.

    Parameters
    ----------
    source : str
        Frame source (see :mod:`drivers.registry`).
    run_dir : Path
        New run directory.
    keyframes, pixel_size_um, layout : optional
        Passed to the capture / stitch processes.
    config_file : str or None
        TOML configuration for every process.
    denoise : str
        ``off``, or the backend of a denoise process between capture and stitch.
    model : str or None
        Denoiser model name or path (default: ``denoise.model`` of the
        configuration, else the shipped default model).
    progress : bool
        Show progress on stderr.
    levels : str or None
        ``--levels`` of the capture process (``auto``, ``full`` or ``LO,HI``;
        None: ``capture.levels`` of the configuration).
    stitch_args : list of str or None
        Further options of the stitch process (``--grid``, ``--order``,
        ``--serpentine``, ``--overlap``).

    Returns
    -------
    dict
        The run summary, also written to ``run_dir/run.json``.

    Raises
    ------
    CemiError
        Bad ``denoise``/``model`` (before anything starts), a ``run_dir``
        that already holds a run, or a failed process (its last error line
        is quoted).
    """
    run_dir = Path(run_dir)
    model_path = check_denoise(denoise, model, config_file)
    denoised = run_dir / DENOISED_DIR
    if (run_dir / SPOOL_DIR).exists() or (denoised / SPOOL_DIR).exists():
        raise CemiError(
            f"{run_dir}: already holds a run; choose a new folder "
            "(or resume its stitching with: run_daemon.py stitch --run-dir)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    # Left by a denoise process that failed before capturing: not this run's endpoints.
    (denoised / "bus.json").unlink(missing_ok=True)
    common = ["-q"] + (["--config", config_file] if config_file else [])
    module = [sys.executable, "-m", "cemi_stream"]
    capture_cmd = [*module, "capture", source, "--run-dir", str(run_dir), "--pace", "max",
                   *common]  # fmt: skip
    if keyframes:
        capture_cmd += ["--keyframes", keyframes]
    if levels:
        capture_cmd += ["--levels", levels]
    # The stitch process never fails on predicted frames: replay judges the run.
    stitch_cmd = [*module, "stitch", "--run-dir", str(run_dir), "--allow-predicted", *common,
                  *(stitch_args or [])]  # fmt: skip
    if pixel_size_um is not None:
        stitch_cmd += ["--pixel-size-um", str(pixel_size_um)]
    if layout:
        stitch_cmd += ["--layout", layout]
    commands: dict[str, list[str]] = {}
    if model_path is not None:
        commands["denoise"] = [*module, "denoise-stage", "--run-dir", str(run_dir), "--backend",
                               denoise, "--model", str(model_path), *common]  # fmt: skip
        capture_cmd += ["--pipe", "denoise"]
        stitch_cmd += ["--frames-dir", str(denoised)]
    commands["capture"] = capture_cmd
    commands["stitch"] = stitch_cmd
    started = time.monotonic()
    procs, culprit = _run_processes(run_dir, commands, progress)
    failed = _failure(run_dir, procs, culprit)
    if failed:
        raise CemiError(failed)
    seconds = time.monotonic() - started
    summary = _run_summary(run_dir, source, seconds, denoise=model_path is not None)
    (run_dir / RUN_SUMMARY).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _run_processes(
    run_dir: Path, commands: dict[str, list[str]], progress: bool
) -> tuple[dict[str, subprocess.Popen[bytes]], str | None]:
    """Start the processes, follow them to their end, and stop the rest when one fails.

    The denoise process (when there is one) is started first; the others once
    it is ready (``RUN_DIR/denoised/bus.json``) - or not at all if it fails.
    Each process's stderr goes to ``RUN_DIR/NAME.stderr``.

    Returns
    -------
    (dict, str or None)
        The finished processes by name, and the name of the one that failed
        first (None when none did).
    """
    procs: dict[str, subprocess.Popen[bytes]] = {}
    culprit: str | None = None
    with contextlib.ExitStack() as files:
        logs = {
            name: files.enter_context(open(run_dir / f"{name}.stderr", "w", encoding="utf-8"))
            for name in commands
        }
        try:
            culprit = _follow(run_dir, commands, procs, logs, progress)
        finally:
            # On errors and Ctrl-C: let the processes stop cleanly (the spools and
            # journal are safe either way), then make sure none is left behind.
            _stop_all(procs, signal_first=True)
    return procs, culprit


def _stop_all(procs: dict[str, subprocess.Popen[bytes]], signal_first: bool) -> None:
    """SIGTERM the running processes, wait up to ``TERMINATE_GRACE_S``, then SIGKILL."""
    running = [p for p in procs.values() if p.poll() is None]
    if signal_first:
        for p in running:
            p.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for p in running:
        try:
            p.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            p.kill()  # e.g. a stitcher still waiting for frames that will never come
            p.wait()


def _follow(
    run_dir: Path,
    commands: dict[str, list[str]],
    procs: dict[str, subprocess.Popen[bytes]],
    logs: Mapping[str, TextIO],
    progress: bool,
) -> str | None:
    """Start the processes into ``procs`` and wait for them; returns the first failed one."""
    culprit: str | None = None

    def start(name: str) -> None:
        procs[name] = subprocess.Popen(commands[name], stdout=subprocess.DEVNULL, stderr=logs[name])

    if "denoise" in commands:
        start("denoise")
        ready = run_dir / DENOISED_DIR / "bus.json"
        deadline = time.monotonic() + DENOISE_READY_S
        while not ready.exists() and procs["denoise"].poll() is None:
            if time.monotonic() > deadline:
                raise DenoiseError(
                    f"denoise process not ready after {DENOISE_READY_S:.0f} s "
                    f"(see {run_dir / 'denoise.stderr'})"
                )
            time.sleep(0.1)
        if procs["denoise"].poll() is not None:
            return "denoise"  # failed before anything was captured
    for name in commands:
        if name not in procs:
            start(name)
    bar = Progress("replay", enabled=progress)
    while any(p.poll() is None for p in procs.values()):
        time.sleep(0.2)
        captured = _count_lines(run_dir / "capture.csv")
        stitched = _count_lines(run_dir / "stitch.journal") + 1
        extra = f"{captured} frames read"
        if "denoise" in procs:
            denoised = _count_lines(run_dir / DENOISED_DIR / SPOOL_DIR / TABLE_NAME)
            extra += f", {denoised} denoised"
        bar.update(stitched, extra)
        culprit = next((n for n, p in procs.items() if p.poll() not in (None, 0)), None)
        if culprit is not None:
            # Nothing more will come through the pipeline: stop the others.
            _stop_all(procs, signal_first=True)
    bar.close()
    return culprit


def _failure(
    run_dir: Path, procs: dict[str, subprocess.Popen[bytes]], culprit: str | None
) -> str | None:
    """One line about the process that failed first, or None when all succeeded."""
    if culprit is None:
        culprit = next((n for n, p in procs.items() if p.returncode != 0), None)
        if culprit is None:
            return None
    proc = procs[culprit]
    stderr = run_dir / f"{culprit}.stderr"
    lines = stderr.read_text(encoding="utf-8").strip().splitlines()
    code = proc.returncode
    how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
    last = lines[-1] if lines else f"no error output (see {stderr})"
    return f"{culprit} process failed ({how}): {last}"


def _run_summary(run_dir: Path, source: str, seconds: float, denoise: bool) -> dict[str, Any]:
    capture = json.loads((run_dir / "capture.json").read_text(encoding="utf-8"))
    stitch = json.loads((run_dir / "stitch.json").read_text(encoding="utf-8"))
    cap, st = capture["summary"], stitch["summary"]
    summary = {
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
        # Why each frame placed by a motion model was not registered.
        "predicted": st.get("predicted", []),
        "levels": cap.get("levels"),  # the capture's grey-level window (input -> 8 bits)
        "denoise": {"backend": "off"},
    }
    if denoise:
        path = run_dir / DENOISED_DIR / DENOISE_SUMMARY
        data = json.loads(path.read_text(encoding="utf-8"))
        dn = data["summary"]
        # The stitch process's configuration does not know the replay's denoise options.
        summary["config"]["denoise"] = data["config"]["denoise"]
        summary["denoise"] = {
            "backend": dn["backend"],
            "model": dn["model_name"],
            "model_path": dn["model"],
            "model_sha256": dn["model_sha256"],
            "frames": dn["frames"],
            "frames_per_s": round(dn["frames_per_s"], 2),
            "ms_per_frame": dn["ms_per_frame"],
            "batch": dn["batch"],
        }
        summary["counts"]["denoised"] = dn["frames"]
        summary["timings"]["denoise_frames_per_s"] = round(dn["frames_per_s"], 2)
        summary["timings"]["denoise_ms_per_frame"] = dn["ms_per_frame"]
    return summary
