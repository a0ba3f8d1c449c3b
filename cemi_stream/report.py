"""The short human summary ``replay`` and ``stitch`` end with, and their exit code.

A run that placed most of its frames by a motion model instead of by
registration produced a mosaic nobody should trust, and must say so loudly:
more than :data:`WARN_FRACTION` of the frames predicted is a warning, more
than :data:`FAIL_FRACTION` makes the command exit with :data:`EXIT_PREDICTED`
(unless ``--allow-predicted``).  The details stay in ``run.json`` /
``stitch.json``; the terminal gets a few lines.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

EXIT_PREDICTED = 3
WARN_FRACTION = 0.02
FAIL_FRACTION = 0.5
_SHOWN = 3  # predicted frames named in the warning


def stitch_report(
    *,
    run_dir: Path,
    frames: int,
    statuses: dict[str, int],
    rows: int,
    skipped: int,
    residuals: dict[str, Any],
    mosaic_shape: list[int],
    levels: int,
    predicted: list[dict[str, Any]],
    seconds: float,
    allow_predicted: bool,
    what: str,
) -> tuple[list[str], int]:
    """Lines to print and the exit code for a finished stitch.

    Parameters
    ----------
    run_dir : Path
        The run directory (paths are shown inside it).
    frames : int
        Frames stitched.
    statuses : dict
        Final counts per status (``placed``, ``predicted``).
    rows : int
        Traversal rows (or grid lines).
    skipped : int
        Frames the capture rejected as faults (blank, corrupt, ...).
    residuals : dict
        The global solve's residual statistics (``rms_px``, ``max_px``,
        ``constraints``, ``rejected``).
    mosaic_shape : list of int
        ``(height, width)`` of level 0, pixels.
    levels : int
        Pyramid levels.
    predicted : list of dict
        ``{"seq", "src_index", "reason"}`` per predicted frame.
    seconds : float
        Wall time.
    allow_predicted : bool
        Do not fail however many frames were predicted.
    what : str
        Command name for the first line.

    Returns
    -------
    (list of str, int)
        The lines (warnings and errors prefixed), and 0 or :data:`EXIT_PREDICTED`.
    """
    placed = statuses.get("placed", 0)
    n_pred = statuses.get("predicted", 0)
    h, w = [*mosaic_shape, 0, 0][:2]
    lines = [
        f"{what}: {frames} frames in {rows} rows: placed {placed}, predicted {n_pred}, "
        f"skipped {skipped}",
        f"  global solve: {residuals.get('constraints', 0)} constraints, rms "
        f"{residuals.get('rms_px', 0.0):.2f} px, max {residuals.get('max_px', 0.0):.2f} px, "
        f"{residuals.get('rejected', 0)} rejected",
        f"  mosaic: {w} x {h} px, {levels} levels -> {run_dir / 'mosaic.ome.zarr'}",
        f"  preview: {run_dir / 'preview.png'}   wall time {seconds:.1f} s   details: "
        f"{run_dir / 'run.json'}",
    ]
    code = 0
    fraction = n_pred / frames if frames else 0.0
    if n_pred and fraction > WARN_FRACTION:
        why = Counter(p["reason"].split(":")[0] for p in predicted)
        named = ", ".join(f"frame {p['src_index']} ({p['reason']})" for p in predicted[:_SHOWN])
        more = f" and {n_pred - _SHOWN} more" if n_pred > _SHOWN else ""
        lines.append(
            f"warning: {n_pred} of {frames} frames ({100 * fraction:.0f} %) were placed by a "
            f"motion model, not registered ({', '.join(f'{k} {v}' for k, v in why.items())}): "
            f"{named}{more}"
        )
        if fraction > FAIL_FRACTION and not allow_predicted:
            lines.append(
                f"error: most frames could not be registered, so the mosaic is not trustworthy; "
                f"check the overlap and focus, try --denoise auto, or accept it with "
                f"--allow-predicted (exit {EXIT_PREDICTED})"
            )
            code = EXIT_PREDICTED
    return lines, code


def skipped_count(capture_reasons: dict[str, int], kept: int, frames_in: int) -> int:
    """Frames rejected as faults (every rejection but ``redundant`` keyframe thinning)."""
    return max(frames_in - kept - capture_reasons.get("redundant", 0), 0)
