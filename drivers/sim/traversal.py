"""Stage traversals of the virtual SEM: where each frame really is.

A traversal is planned once, as arrays, from the configuration and the seed
(about 48 bytes per frame, so even a 10^6-frame plan is small).  It holds,
for every frame, the row, the commanded (nominal) stage position and the true
top-left position of the frame on the specimen, all in specimen pixels.

Mechanics modelled
------------------
* image mode: one frame per stage step of ``(1 - overlap) * width`` along x,
  rows ``(1 - overlap) * height`` apart; +-``jitter_px`` uniform positioning
  error per frame in x and y;
* video mode: the stage moves continuously, ``(1 - video_overlap) * width``
  pixels per video frame; a row spans what ``frames_per_row`` image-mode
  frames would; vibration of ``0.03 * jitter_px`` px rms and a slow velocity
  fluctuation of 3 % rms; one stream holds all rows, with an abrupt jump at
  each row change;
* raster (every row starts at the left, the stage returns between rows) or
  serpentine (alternate rows run backwards);
* backlash as a play of ``backlash_px`` between lead screw and carriage: after
  every reversal of the x motion (each raster row return, each serpentine
  turn) the carriage lags until the slack is taken up;
* drift of ``drift_px_per_frame`` pixels per frame whose direction wanders
  slowly (a bounded random walk: never more than ``drift * n`` after ``n``
  frames).

Everything is finally translated so that no true position is closer than a
small margin to the specimen origin: positions are never negative.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cemi_stream.errors import ConfigError

if TYPE_CHECKING:
    from .config import SimConfig

_MARGIN_PX = 16.0
_TRAVERSAL_SALT = 0x7A5E
_VIBRATION_PER_JITTER = 0.03
_VELOCITY_RMS = 0.03
_VELOCITY_CORR_FRAMES = 25.0


@dataclass(frozen=True, slots=True)
class TraversalStep:
    """One frame of a traversal.

    Attributes
    ----------
    index : int
        Frame index in the stream (0-based).
    row : int
        Traversal row (0-based).
    x_px, y_px : float
        True specimen position of the frame's top-left pixel, in pixels.
    stage_x_px, stage_y_px : float
        Commanded (nominal) stage position of that pixel, in pixels; what the
        stage controller reports, without jitter, backlash, drift or
        velocity error.
    """

    index: int
    row: int
    x_px: float
    y_px: float
    stage_x_px: float
    stage_y_px: float


class Traversal:
    """A planned traversal: arrays of rows and positions, one entry per frame.

    Attributes
    ----------
    row : ndarray of int32
        Row of each frame.
    x, y : ndarray of float64
        True top-left specimen positions in pixels.
    stage_x, stage_y : ndarray of float64
        Commanded stage positions in pixels.
    frame_size : (int, int)
        ``(width, height)`` of the frames in pixels.
    video : bool
        True for a continuous (video) traversal.
    """

    def __init__(
        self,
        row: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        stage_x: np.ndarray,
        stage_y: np.ndarray,
        frame_size: tuple[int, int],
        video: bool,
    ) -> None:
        self.row = row.astype(np.int32)
        self.x = x.astype(np.float64)
        self.y = y.astype(np.float64)
        self.stage_x = stage_x.astype(np.float64)
        self.stage_y = stage_y.astype(np.float64)
        self.frame_size = frame_size
        self.video = video

    def __len__(self) -> int:
        return int(self.row.shape[0])

    def __getitem__(self, index: int) -> TraversalStep:
        if not -len(self) <= index < len(self):
            raise IndexError(f"traversal has {len(self)} frames, no index {index}")
        i = index % len(self)
        return TraversalStep(
            index=i,
            row=int(self.row[i]),
            x_px=float(self.x[i]),
            y_px=float(self.y[i]),
            stage_x_px=float(self.stage_x[i]),
            stage_y_px=float(self.stage_y[i]),
        )

    def __iter__(self) -> Iterator[TraversalStep]:
        for i in range(len(self)):
            yield self[i]

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)`` of the area covered, in pixels."""
        w, h = self.frame_size
        return (
            float(self.x.min()),
            float(self.y.min()),
            float(self.x.max() + w),
            float(self.y.max() + h),
        )


def _play(commanded: np.ndarray, backlash: float) -> np.ndarray:
    """Carriage positions of a lead screw with ``backlash`` pixels of play.

    The carriage only moves when the screw pushes it: it stays within
    ``+-backlash/2`` of the commanded position, on the side it was dragged
    from.  The first frame is taken as approached from +x (after a return).
    """
    half = 0.5 * backlash
    out = np.empty_like(commanded)
    carriage = math.inf
    for i, s in enumerate(commanded):
        carriage = min(max(carriage, s - half), s + half)
        out[i] = carriage
    return out


def _drift(n: int, per_frame: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative drift ``(dx, dy)`` in pixels with a wandering direction."""
    if per_frame == 0.0 or n == 0:
        return np.zeros(n), np.zeros(n)
    angle = rng.uniform(0.0, 2.0 * math.pi) + np.cumsum(rng.normal(0.0, 0.05, n))
    dx = np.concatenate(([0.0], np.cumsum(per_frame * np.cos(angle[:-1]))))
    dy = np.concatenate(([0.0], np.cumsum(per_frame * np.sin(angle[:-1]))))
    return dx, dy


def _ar1(n: int, rms: float, corr_frames: float, rng: np.random.Generator) -> np.ndarray:
    """Stationary AR(1) noise: ``rms`` standard deviation, ``corr_frames`` memory."""
    if n == 0 or rms == 0.0:
        return np.zeros(n)
    a = math.exp(-1.0 / corr_frames)
    shocks = rng.normal(0.0, rms * math.sqrt(1.0 - a * a), n)
    out = np.empty(n)
    value = rng.normal(0.0, rms)
    for i in range(n):
        value = a * value + shocks[i]
        out[i] = value
    # A 4-sigma cap keeps the velocity strictly positive and the path bounded.
    return np.clip(out, -4.0 * rms, 4.0 * rms)


def plan_traversal(config: SimConfig) -> Traversal:
    """Plan the traversal a configuration describes.

    Parameters
    ----------
    config : SimConfig
        Rows, frames per row, frame size, overlaps, mode, seed and stage
        imperfections.

    Returns
    -------
    Traversal
        Deterministic for a given configuration (seeded).

    Raises
    ------
    ConfigError
        When the configuration describes an empty traversal.
    """
    w, h = config.frame_width, config.frame_height
    rows, per_row = config.rows, config.frames_per_row
    if rows < 1 or per_row < 1:
        raise ConfigError(f"sim: rows and frames_per_row must be >= 1, not {rows}, {per_row}")
    rng = np.random.default_rng([config.seed, _TRAVERSAL_SALT])
    step_x = (1.0 - config.overlap) * w
    step_y = (1.0 - config.overlap) * h
    span = (per_row - 1) * step_x

    if config.video:
        advance = (1.0 - config.video_overlap) * w
        n_row = math.floor(span / advance + 1e-9) + 1
        k = np.arange(n_row, dtype=np.float64)
        row_list: list[np.ndarray] = []
        cmd_x: list[np.ndarray] = []
        screw_x: list[np.ndarray] = []
        # A perfect stage (jitter_px = 0) also moves at a perfectly steady speed.
        fluctuation = _VELOCITY_RMS if config.jitter_px > 0 else 0.0
        speed = 1.0 + _ar1(n_row * rows, fluctuation, _VELOCITY_CORR_FRAMES, rng)
        for r in range(rows):
            factor = speed[r * n_row : (r + 1) * n_row]
            travelled = np.concatenate(([0.0], np.cumsum(advance * factor[:-1])))
            backwards = config.serpentine and r % 2 == 1
            nominal = k * advance
            if backwards:
                cmd_x.append(span - nominal)
                screw_x.append(span - travelled)
            else:
                cmd_x.append(nominal)
                screw_x.append(travelled)
            row_list.append(np.full(n_row, r))
        row = np.concatenate(row_list)
        stage_x = np.concatenate(cmd_x)
        true_x = _play(np.concatenate(screw_x), config.backlash_px)
        n = len(row)
        vib = _VIBRATION_PER_JITTER * config.jitter_px
        jitter_x = np.clip(rng.normal(0.0, 1.0, n), -4.0, 4.0) * vib
        jitter_y = np.clip(rng.normal(0.0, 1.0, n), -4.0, 4.0) * vib
    else:
        cols = np.arange(per_row, dtype=np.float64)
        row = np.repeat(np.arange(rows), per_row)
        col = np.tile(cols, rows)
        if config.serpentine:
            odd = row % 2 == 1
            col[odd] = per_row - 1 - col[odd]
        stage_x = col * step_x
        true_x = _play(stage_x, config.backlash_px)
        n = len(row)
        jitter_x = rng.uniform(-config.jitter_px, config.jitter_px, n)
        jitter_y = rng.uniform(-config.jitter_px, config.jitter_px, n)

    stage_y = row * step_y
    drift_x, drift_y = _drift(n, config.drift_px_per_frame, rng)
    x = true_x + jitter_x + drift_x
    y = stage_y + jitter_y + drift_y

    # Shift the whole plan (commanded and true alike) by a whole number of
    # pixels so that nothing is closer than the margin to the origin.
    shift_x = float(math.ceil(max(0.0, _MARGIN_PX - float(x.min()))))
    shift_y = float(math.ceil(max(0.0, _MARGIN_PX - float(y.min()))))
    return Traversal(
        row=row,
        x=x + shift_x,
        y=y + shift_y,
        stage_x=stage_x + shift_x,
        stage_y=stage_y + shift_y,
        frame_size=(w, h),
        video=config.video,
    )
