"""The command lines of a run's stage processes (capture, denoise, stitch).

One place builds them, for ``replay`` and the daemon alike.  Each stage is
``python -m cemi_stream STAGE ...`` with ``-q`` (no progress bar: its stderr
goes to ``RUN_DIR/STAGE.stderr``):

* ``capture SOURCE --run-dir RUN_DIR --pace PACE`` (plus ``--pipe denoise``
  when a denoise stage sits behind it);
* ``denoise-stage --run-dir RUN_DIR --backend B --model PATH``;
* ``stitch --run-dir RUN_DIR --allow-predicted`` (plus ``--frames-dir
  RUN_DIR/denoised``): the stitch process never fails on predicted frames,
  the caller judges the run;
* ``analyze-stage --run-dir RUN_DIR`` with the ``analyze`` option: tiles
  measured as the stitcher settles them (:mod:`cemi_stream.analysis.live`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ..config import DENOISE_BACKENDS, load_config
from ..errors import ConfigError, DenoiseError
from ..stitch.feed import DENOISED_DIR
from .options import RunOptions

CAPTURE, DENOISE, STITCH, ANALYZE = "capture", "denoise", "stitch", "analyze"
# The analysis stage's folder in a run directory (cemi_stream.analysis.live).
ANALYSIS_DIR = "analysis"
# Every stage a run can have, in the order they are started.
STAGES = (DENOISE, CAPTURE, STITCH, ANALYZE)


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
        The model's weights file (absolute), or None when denoising is off.

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


def stage_commands(
    options: RunOptions,
    run_dir: Path,
    *,
    model_path: Path | None = None,
    python: str = sys.executable,
) -> dict[str, list[str]]:
    """The stage command lines of a run, in start order.

    Parameters
    ----------
    options : RunOptions
        The run's options.
    run_dir : Path
        The run directory (absolute paths are best: the stages may run with
        another working directory).
    model_path : Path or None
        The denoiser's resolved weights file (:func:`check_denoise`); None
        resolves it here when ``options.denoise`` is not ``off``.
    python : str
        The Python interpreter of the stage processes.

    Returns
    -------
    dict of str to list of str
        ``denoise`` (when on), ``capture``, ``stitch``, ``analyze`` (when on).
    """
    run_dir = Path(run_dir)
    if options.denoise != "off" and model_path is None:
        model_path = check_denoise(options.denoise, options.model, options.config_file)
    common = ["-q"] + (["--config", options.config_file] if options.config_file else [])
    module = [python, "-m", "cemi_stream"]
    capture = [*module, "capture", options.source, "--run-dir", str(run_dir),
               "--pace", options.pace, *common]  # fmt: skip
    if options.keyframes:
        capture += ["--keyframes", options.keyframes]
    if options.keyframe_overlap is not None:
        capture += ["--overlap", repr(float(options.keyframe_overlap))]
    if options.crop is not None:
        capture += ["--crop", options.crop]
    if options.levels:
        capture += ["--levels", options.levels]
    stitch = [*module, "stitch", "--run-dir", str(run_dir), "--allow-predicted", *common,
              *options.grid_args()]  # fmt: skip
    if options.pixel_size_um is not None:
        stitch += ["--pixel-size-um", repr(float(options.pixel_size_um))]
    if options.layout:
        stitch += ["--layout", options.layout]
    commands: dict[str, list[str]] = {}
    if options.denoise != "off":
        commands[DENOISE] = [*module, "denoise-stage", "--run-dir", str(run_dir), "--backend",
                             options.denoise, "--model", str(model_path), *common]  # fmt: skip
        if options.denoise_workers is not None:
            commands[DENOISE] += ["--workers", str(options.denoise_workers)]
        if options.denoise_listen is not None:
            commands[DENOISE] += ["--listen", options.denoise_listen]
        capture += ["--pipe", "denoise"]
        stitch += ["--frames-dir", str(run_dir / DENOISED_DIR)]
    commands[CAPTURE] = capture
    commands[STITCH] = stitch
    if options.analyze:
        commands[ANALYZE] = [*module, "analyze-stage", "--run-dir", str(run_dir), *common]
    return commands
