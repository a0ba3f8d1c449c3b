"""The virtual SEM as a frame source, with the ground truth it knows."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cemi_stream.errors import SourceError
from cemi_stream.frame import Frame, FrameMeta, utc_now_ns
from drivers.base import SourceInfo

from .config import SimConfig
from .scanner import Scanner, scaled_preset
from .specimen import Specimen, load_specimen
from .traversal import Traversal, plan_traversal

log = logging.getLogger(__name__)

_NOISE_SALT = 0x5E11


@dataclass(frozen=True, slots=True)
class TruthRecord:
    """Where one produced frame really is.

    Attributes
    ----------
    src_index : int
        Frame index in the stream.
    row : int
        Traversal row.
    x_px, y_px : float
        True specimen position of the frame's top-left pixel, in pixels.
    """

    src_index: int
    row: int
    x_px: float
    y_px: float


def frame_rng(seed: int, index: int) -> np.random.Generator:
    """Random generator of frame ``index``: independent of read order and of other frames."""
    return np.random.default_rng([seed, index, _NOISE_SALT])


class SimSource:
    """A scanning electron microscope simulated end to end.

    Satisfies :class:`drivers.base.FrameSource`: ``open`` builds the specimen,
    the traversal and the imaging model; ``read`` acquires the next frame.

    Parameters
    ----------
    config : SimConfig
        Traversal, imaging and specimen settings.
    uri : str
        Source string shown in messages and logs.

    Attributes
    ----------
    truth : list of TruthRecord
        One record per frame produced so far, in order.
    """

    def __init__(self, config: SimConfig | None = None, uri: str = "sim:") -> None:
        self.config = config or SimConfig()
        self.uri = uri
        self.truth: list[TruthRecord] = []
        self._traversal: Traversal | None = None
        self._specimen: Specimen | None = None
        self._scanner: Scanner | None = None
        self._next = 0

    @property
    def info(self) -> SourceInfo:
        """Static properties (the traversal is planned on first use, so all are known)."""
        c = self.config
        return SourceInfo(
            kind="sim",
            frame_size=(c.frame_width, c.frame_height),
            fps=c.fps if c.video else None,
            pixel_size_nm=c.pixel_size_nm,
            frame_count=len(self.traversal),
            live=False,
            video_like=c.video,
        )

    @property
    def traversal(self) -> Traversal:
        """The planned traversal (all frames, including those not yet read)."""
        if self._traversal is None:
            self._traversal = plan_traversal(self.config)
        return self._traversal

    @property
    def specimen(self) -> Specimen:
        """The specimen being imaged (built on first use)."""
        if self._specimen is None:
            c = self.config
            self._specimen = load_specimen(c.source, seed=c.seed, scale=c.specimen_scale)
        return self._specimen

    def open(self) -> None:
        """Build specimen, traversal and scanner and rewind to the first frame."""
        c = self.config
        specimen = self.specimen
        traversal = self.traversal
        self._scanner = Scanner(
            scaled_preset(c.noise, c.noise_scale), databar=c.databar, pixel_size_nm=c.pixel_size_nm
        )
        self._next = 0
        self.truth = []
        log.info(
            "%s: %d frames in %d rows (%s, %s, noise %s), %s specimen %s",
            self.uri,
            len(traversal),
            c.rows,
            "video" if c.video else "images",
            "serpentine" if c.serpentine else "raster",
            c.noise if c.noise_scale == 1.0 else f"{c.noise} x{c.noise_scale:g}",
            type(specimen).__name__,
            c.source or f"seed {c.seed}",
        )

    def truth_for(self, src_index: int) -> TruthRecord:
        """Ground truth of any frame of the traversal, read or not."""
        step = self.traversal[src_index]
        return TruthRecord(step.index, step.row, step.x_px, step.y_px)

    def render(self, src_index: int) -> np.ndarray:
        """Image of frame ``src_index`` (uint8 ``(y, x)``), without advancing the stream.

        The same index always gives the same image, whatever was read before.
        """
        if self._scanner is None:
            raise SourceError(f"{self.uri}: read before open")
        c = self.config
        step = self.traversal[src_index]
        return self._scanner.render(
            self.specimen,
            step.x_px,
            step.y_px,
            c.frame_width,
            c.frame_height,
            frame_rng(c.seed, step.index),
        )

    def read(self) -> Frame | None:
        """Acquire the next frame, or return None after the last one."""
        if self._scanner is None:
            raise SourceError(f"{self.uri}: read before open")
        traversal = self.traversal
        if self._next >= len(traversal):
            return None
        index = self._next
        image = self.render(index)
        step = traversal[index]
        c = self.config
        to_um = c.pixel_size_nm * 1e-3
        meta = FrameMeta(
            src_index=index,
            capture_time_ns=utc_now_ns(),
            pixel_size_nm=c.pixel_size_nm,
            stage_x_um=step.stage_x_px * to_um if c.report_stage else None,
            stage_y_um=step.stage_y_px * to_um if c.report_stage else None,
            row=step.row,
        )
        self.truth.append(TruthRecord(index, step.row, step.x_px, step.y_px))
        self._next = index + 1
        return Frame(image=image, meta=meta)

    def close(self) -> None:
        """Release the scanner and the specimen's tile cache (idempotent)."""
        self._scanner = None
        self._specimen = None
