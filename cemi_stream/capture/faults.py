"""Fault frames: blank, saturated or frozen frames carry no usable specimen signal.

:class:`FaultDetector` rejects blank frames (beam blanked, detector off),
saturated ones (contrast/brightness far off) and frozen ones (a capture card
repeating its last buffer).  All images are 2-D ``uint8`` arrays with axes
``(y, x)``.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from ..config import FaultConfig
from .crop import check_gray8

logger = logging.getLogger(__name__)


class FaultDetector:
    """Reject fault frames: blank, saturated or frozen.

    Parameters
    ----------
    config : FaultConfig
        Thresholds (grey levels on 0..255).

    Notes
    -----
    The detector remembers the previous input frame (at 1/4 resolution) for
    the frozen test and updates it on every call, rejected frames included,
    so a run of repeated buffers is rejected after its first frame.  A frame
    of a different shape restarts the comparison.  Only pixels at 255 count
    as saturated: large regions at 0 are legitimate in contrast-stretched
    images of multi-phase specimens.
    """

    def __init__(self, config: FaultConfig) -> None:
        self._config = config
        self._previous: np.ndarray | None = None
        self._previous_shape: tuple[int, int] | None = None

    def reset(self) -> None:
        """Forget the previous frame (e.g. when the source restarts)."""
        self._previous = None
        self._previous_shape = None

    def check(self, image: np.ndarray) -> str | None:
        """Classify one frame.

        Parameters
        ----------
        image : ndarray
            ``uint8`` frame ``(y, x)``.

        Returns
        -------
        str or None
            ``"blank"``, ``"saturated"`` or ``"frozen"`` for a fault frame,
            None for a good one.

        Raises
        ------
        SourceError
            If ``image`` is not a 2-D ``uint8`` array.
        """
        check_gray8(image, "fault check")
        height, width = image.shape
        small = cv2.resize(
            image, (max(1, width // 4), max(1, height // 4)), interpolation=cv2.INTER_AREA
        )
        previous, self._previous = self._previous, small
        same_shape = self._previous_shape == (height, width)
        self._previous_shape = (height, width)
        cfg = self._config

        # Saturation first: a frame that is all 255 is also flat, but "saturated"
        # tells the operator to turn the brightness down, "blank" does not.
        saturated = np.count_nonzero(image == 255) / image.size
        if saturated > cfg.saturated_fraction:
            return self._reject("saturated", f"{saturated:.1%} of pixels at 255")
        _, std = cv2.meanStdDev(image)
        if float(std[0, 0]) < cfg.blank_std:
            return self._reject("blank", f"std {float(std[0, 0]):.2f}")
        if previous is not None and same_shape:
            mad = cv2.norm(small, previous, cv2.NORM_L1) / small.size
            if mad < cfg.frozen_mad:
                return self._reject("frozen", f"mean abs difference {mad:.3f}")
        return None

    @staticmethod
    def _reject(kind: str, why: str) -> str:
        logger.debug("fault frame: %s (%s)", kind, why)
        return kind
