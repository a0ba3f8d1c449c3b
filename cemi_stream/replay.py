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

It is a client of the daemon's own process code: the stage command lines come
from :mod:`cemi_stream.daemon.stages` and the processes are started, watched
and stopped by one :class:`~cemi_stream.daemon.supervisor.Run` driven in the
foreground (without restarts: a stage that fails fails the replay), so every
stage stops when this process dies, even by ``kill -9``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zmq

from . import __version__
from .capture.spool import SPOOL_DIR, TABLE_NAME
from .daemon.options import RunOptions
from .daemon.run import Run, new_run_id
from .daemon.stages import ANALYSIS_DIR, ANALYZE, DENOISE, check_denoise
from .errors import CemiError, ConfigError
from .progress import Progress
from .stitch.feed import DENOISED_DIR

__all__ = ["DENOISE_SUMMARY", "RUN_SUMMARY", "check_denoise", "run_replay"]

RUN_SUMMARY = "run.json"
DENOISE_SUMMARY = "denoise.json"


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return max(sum(1 for _ in f) - 1, 0)
    except OSError:
        return 0


def _grid_options(stitch_args: list[str]) -> dict[str, Any]:
    """``--grid``, ``--order``, ``--overlap``, ``--serpentine`` as RunOptions fields."""
    out: dict[str, Any] = {}
    names = {"--grid": "grid", "--order": "order", "--overlap": "overlap"}
    it = iter(stitch_args)
    for arg in it:
        if arg == "--serpentine":
            out["serpentine"] = True
        elif arg in names:
            value = next(it, None)
            if value is None:
                raise ConfigError(f"{arg}: a value is required")
            out[names[arg]] = value
        else:
            raise ConfigError(f"{arg}: not a stitch option replay passes on")
    return out


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
    denoise_workers: int | None = None,
    denoise_listen: str | None = None,
    progress: bool = True,
    levels: str | None = None,
    stitch_args: list[str] | None = None,
    analyze: bool = False,
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
    denoise_workers, denoise_listen : optional
        Local denoise worker processes and the address for remote ones
        (``denoise.workers``, ``denoise.listen``).
    progress : bool
        Show progress on stderr.
    levels : str or None
        ``--levels`` of the capture process (``auto``, ``full`` or ``LO,HI``;
        None: ``capture.levels`` of the configuration).
    stitch_args : list of str or None
        Further options of the stitch process (``--grid``, ``--order``,
        ``--serpentine``, ``--overlap``).
    analyze : bool
        Add the analysis stage (:mod:`cemi_stream.analysis.live`): tiles are
        measured as the mosaic settles, into ``run_dir/analysis``.

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
    options = RunOptions(
        source=source, pace="max", denoise=denoise, model=model,
        denoise_workers=denoise_workers, denoise_listen=denoise_listen,
        keyframes=keyframes,  # type: ignore[arg-type]
        levels=levels, pixel_size_um=pixel_size_um,
        layout=layout,  # type: ignore[arg-type]
        config_file=config_file, analyze=analyze, **_grid_options(stitch_args or []),
    )  # fmt: skip
    denoised = run_dir / DENOISED_DIR
    if (run_dir / SPOOL_DIR).exists() or (denoised / SPOOL_DIR).exists():
        raise CemiError(
            f"{run_dir}: already holds a run; choose a new folder "
            "(or resume its stitching with: run_daemon.py stitch --run-dir)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    # Left by a denoise process that failed before capturing: not this run's endpoints.
    (denoised / "bus.json").unlink(missing_ok=True)
    run = Run(
        new_run_id(), run_dir.resolve(), options, model_path=model_path,
        max_restarts=0, heartbeat_timeout_s=None, record=False,
    )  # fmt: skip
    bar = Progress("replay", enabled=progress)
    started = time.monotonic()
    try:
        run.drive(tick=lambda r: _show_progress(bar, r))
    finally:
        bar.close()
    if run.state != "finished":
        raise CemiError(run.reason or f"replay ended {run.state}")
    seconds = time.monotonic() - started
    summary = _run_summary(run_dir, source, seconds, denoise=model_path is not None)
    if analyze:
        summary["analysis"] = _analysis_summary(run_dir)
    (run_dir / RUN_SUMMARY).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _show_progress(bar: Progress, run: Run) -> None:
    """One progress update: frames stitched, read, denoised."""
    run_dir = run.run_dir
    captured = _count_lines(run_dir / "capture.csv")
    stitched = _count_lines(run_dir / "stitch.journal") + 1
    extra = f"{captured} frames read"
    if DENOISE in run.stages:
        denoised = _count_lines(run_dir / DENOISED_DIR / SPOOL_DIR / TABLE_NAME)
        extra += f", {denoised} denoised"
    if ANALYZE in run.stages:
        extra += f", {_count_lines(run_dir / ANALYSIS_DIR / 'tiles.jsonl') + 1} tiles analysed"
    bar.update(stitched, extra)


def _analysis_summary(run_dir: Path) -> dict[str, Any]:
    """The analysis stage's outcome, for ``run.json`` and the closing lines."""
    path = run_dir / ANALYSIS_DIR / "analysis.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return {
        "dir": str(path.parent),
        "tiles": data["tiles"],
        "valid_tiles": sum(im["valid_tiles"] for im in data["images"]),
        "measured_live": data["live"]["tiles_measured_live"],
        "measured_at_the_end": data["live"]["tiles_measured_at_the_end"],
        "settings": data["settings"],
        "means": {k: v for k, v in data["images"][0].items() if k.startswith("mean_")},
    }


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
