"""Per-frame preprocessing shared by ``extract`` and ``capture``.

Order: grey levels (16-bit and float input mapped to 8 bits with one window
for the run, :mod:`cemi_stream.capture.levels`) -> crop (data bar and UI borders,
decided once on the first usable frame) -> fault check (corrupt, blank,
saturated, frozen, changed size) -> keyframe selection.  Every input frame
gets exactly one :class:`Decision`, in input order; a frame the source could
not decode (a fault frame, :func:`cemi_stream.frame.fault_frame`) gets one
with its fault as the reason (``corrupt``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..config import CaptureConfig
from ..frame import Frame
from .crop import CropRect, detect_crop, parse_crop
from .faults import FaultDetector
from .keyframes import Decision, KeyframeSelector
from .levels import LevelsGate, rejected_all_message

log = logging.getLogger(__name__)

SIZE_CHANGED = "size_changed"


@dataclass(slots=True)
class FrontEndStats:
    """Counts of what the front end did."""

    frames_in: int = 0
    kept: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


class FrontEnd:
    """Crop, reject faults and select keyframes.

    Parameters
    ----------
    config : CaptureConfig
        Crop specification, fault thresholds, keyframe settings.
    video_like : bool
        Whether the source is video-like; with keyframe mode ``auto`` this
        decides between keyframe selection and keeping every frame.
    significant_bits : int or None
        Significant bits the source declares (for ``levels = "auto"``).
    """

    def __init__(
        self, config: CaptureConfig, video_like: bool, significant_bits: int | None = None
    ) -> None:
        self.config = config
        self.levels = LevelsGate(config.levels, significant_bits)
        mode = config.keyframes.mode
        self.select_keyframes = video_like if mode == "auto" else mode == "on"
        self.selector = KeyframeSelector(config.keyframes, keep_all=not self.select_keyframes)
        self.faults = FaultDetector(config.faults)
        spec = parse_crop(config.crop)
        self.crop: CropRect | None = spec if isinstance(spec, CropRect) else None
        self._auto_crop = spec == "auto"
        self._input_shape: tuple[int, int] | None = None
        self.crop_info: dict[str, object] = {"mode": config.crop}
        self.stats = FrontEndStats()

    def process(self, frame: Frame) -> list[Decision]:
        """Handle one input frame; returns the decisions that became final.

        The first few frames of 16-bit or float input are held until the
        levels window is known; their decisions come with a later call (or
        :meth:`finish`), still in input order.
        """
        self.stats.frames_in += 1
        decisions: list[Decision] = []
        for ready in self.levels.push(frame):
            decisions += self._process_gray8(ready)
        return decisions

    def finish(self) -> list[Decision]:
        """End of stream (or stop): decide every frame still held, in input order."""
        decisions: list[Decision] = []
        for ready in self.levels.flush():
            decisions += self._process_gray8(ready)
        return decisions + self._count(self.selector.flush())

    def failure(self) -> str | None:
        """One line when every frame so far was rejected as blank or saturated, else None."""
        return rejected_all_message(
            self.stats.frames_in, self.stats.kept, dict(self.stats.reasons), self.levels.describe()
        )

    def _process_gray8(self, frame: Frame) -> list[Decision]:
        if frame.fault is not None:
            return self._count(self.selector.reject(frame, frame.fault))
        shape = frame.shape
        if self._input_shape is None:
            if self._auto_crop and float(np.std(frame.image)) < self.config.faults.blank_std:
                # Too little signal to find a data bar: wait for a usable frame.
                return self._count(self.selector.reject(frame, "blank"))
            self._input_shape = shape
            self._choose_crop(frame)
        elif shape != self._input_shape:
            return self._count(self.selector.reject(frame, SIZE_CHANGED))
        if self.crop is not None:
            frame = Frame(self.crop.apply(frame.image), frame.meta)
        fault = self.faults.check(frame.image)
        if fault is not None:
            return self._count(self.selector.reject(frame, fault))
        return self._count(self.selector.push(frame))

    def _choose_crop(self, frame: Frame) -> None:
        if self._auto_crop:
            found = detect_crop(frame.image)
            h, w = frame.shape
            rect = found.rect
            if (rect.x, rect.y, rect.width, rect.height) != (0, 0, w, h):
                self.crop = rect
            self.crop_info = {
                "mode": "auto",
                "rect": [rect.x, rect.y, rect.width, rect.height],
                "databar_rows": found.databar_rows,
                "databar_side": found.databar_side,
                "border": list(found.border),
            }
            log.info(
                "crop: %dx%d+%d+%d (data bar %d rows %s, border %s)",
                rect.width, rect.height, rect.x, rect.y,
                found.databar_rows, found.databar_side, found.border,
            )  # fmt: skip
        elif self.crop is not None:
            self.crop.apply(frame.image)  # raises ConfigError when it does not fit
            c = self.crop
            self.crop_info = {"mode": "explicit", "rect": [c.x, c.y, c.width, c.height]}

    def _count(self, decisions: list[Decision]) -> list[Decision]:
        for d in decisions:
            self.stats.reasons[d.reason] += 1
            if d.kept:
                self.stats.kept += 1
            elif d.reason != "redundant":
                n = self.stats.reasons[d.reason]
                # A paused SEM can freeze thousands of frames: log the first few, then 1 in 100.
                if n <= 5 or n % 100 == 0:
                    log.info(
                        "frame %d rejected: %s (%d so far)", d.frame.meta.src_index, d.reason, n
                    )
        return decisions
