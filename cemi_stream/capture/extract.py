"""``extract``: keyframes of a recorded source written as an image folder.

``OUT/frames/NNNNNN.png`` holds each kept frame, named by its source index,
and ``OUT/keyframes.csv`` one line per input frame:
``src_index,kept,reason,dx_px,dy_px`` (displacement from the previous
keyframe in pixels, empty when it could not be estimated).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2

import drivers

from ..config import CaptureConfig
from ..errors import CemiError, SourceError
from ..progress import Progress
from .frontend import FrontEnd
from .keyframes import Decision, format_decision

log = logging.getLogger(__name__)

KEYFRAMES_HEADER = "src_index,kept,reason,dx_px,dy_px\n"


@dataclass(slots=True)
class ExtractSummary:
    """Counts of an extraction, and the grey-level window (:mod:`cemi_stream.capture.levels`)."""

    frames_in: int = 0
    kept: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    overlaps: list[float] = field(default_factory=list)
    levels: dict[str, Any] = field(default_factory=dict)


def run_extract(
    source_uri: str, out_dir: Path, config: CaptureConfig, progress: bool = True
) -> ExtractSummary:
    """Select keyframes from ``source_uri`` and write them under ``out_dir``.

    Parameters
    ----------
    source_uri : str
        Video file, image folder, TIFF stack, device or ``sim:`` source.
    out_dir : Path
        Output folder; its ``frames/`` subfolder must not already hold images.
    config : CaptureConfig
        Crop, fault and keyframe settings.
    progress : bool
        Show a progress counter on stderr.

    Returns
    -------
    ExtractSummary
        Frame counts and the overlap of each keyframe with its predecessor.
    """
    out_dir = Path(out_dir)
    frames_dir = out_dir / "frames"
    if frames_dir.is_dir() and any(frames_dir.iterdir()):
        raise CemiError(f"{frames_dir}: already holds frames; choose a new output folder")
    source = drivers.open_source(source_uri, pace="max")
    summary = ExtractSummary()
    try:
        info = source.info
        front = FrontEnd(config, video_like=info.video_like, significant_bits=info.significant_bits)
        frames_dir.mkdir(parents=True, exist_ok=True)
        bar = Progress("extract", source.info.frame_count, enabled=progress)
        with open(out_dir / "keyframes.csv", "w", encoding="utf-8") as csv:
            csv.write(KEYFRAMES_HEADER)

            def commit(decisions: list[Decision]) -> None:
                for d in decisions:
                    if d.kept:
                        path = frames_dir / f"{d.frame.meta.src_index:06d}.png"
                        if not cv2.imwrite(str(path), d.frame.image):
                            raise CemiError(f"{path}: could not write image")
                        if d.overlap is not None and d.reason != "first":
                            summary.overlaps.append(d.overlap)
                    csv.write(format_decision(d) + "\n")

            while (frame := source.read()) is not None:
                commit(front.process(frame))
                bar.update(front.stats.frames_in, f"{front.stats.kept} kept")
            commit(front.finish())
            bar.close()
    finally:
        source.close()
    if front.stats.frames_in == 0:
        raise SourceError(f"{source_uri}: source delivered no frames")
    failure = front.failure()
    if failure is not None:
        raise SourceError(f"{source_uri}: {failure}")
    summary.frames_in = front.stats.frames_in
    summary.kept = front.stats.kept
    summary.reasons = dict(front.stats.reasons)
    summary.levels = front.levels.describe()
    return summary
