"""Padding and overlapping tiles for running the denoiser on large frames.

RRDBNet at scale 1 folds each 4 x 4 pixel block into channels, so both frame
sides must be multiples of 4: :func:`pad_to_multiple` reflect-pads the bottom
and right edges and returns the original size to crop back to.  Frames too
large for the accelerator's memory are cut into overlapping tiles
(:func:`tile_boxes`); :class:`TileBlender` pastes the denoised tiles back with
linear (feathered) weights across each overlap, so no seam shows where one
tile's edge effects meet the next tile's.

Everything here is numpy only.  Units are pixels, axes are ``(y, x)``; arrays
may carry leading axes (``(..., y, x)``), which are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


def pad_to_multiple(image: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad the last two axes up to multiples of ``multiple``.

    Parameters
    ----------
    image : ndarray
        Array ``(..., y, x)`` of any dtype, at least 1 x 1 pixels.
    multiple : int
        Both sides of the result are multiples of this (pixels, >= 1).

    Returns
    -------
    padded : ndarray
        ``image`` extended at the bottom and right by mirroring the last rows
        and columns (without repeating the edge pixel); ``image`` itself when
        no padding is needed.
    size : tuple of int
        The original ``(height, width)`` in pixels: crop with
        ``padded[..., :height, :width]``.

    Raises
    ------
    ConfigError
        If ``multiple`` is below 1 or ``image`` has fewer than two axes or an
        empty side.
    """
    if multiple < 1:
        raise ConfigError(f"pad multiple: expected at least 1, got {multiple}")
    if image.ndim < 2 or image.shape[-1] == 0 or image.shape[-2] == 0:
        raise ConfigError(f"pad_to_multiple: expected an array (..., y, x), got {image.shape}")
    height, width = image.shape[-2:]
    pad_y = -height % multiple
    pad_x = -width % multiple
    if pad_y == 0 and pad_x == 0:
        return image, (height, width)
    # Mirroring continues the image's texture and noise statistics, so the
    # network sees no artificial edge; a zero or edge pad would print a
    # border artefact into the last rows that we keep.  numpy reflects
    # repeatedly when the pad exceeds the side (1- to 3-pixel frames).
    widths = [(0, 0)] * (image.ndim - 2) + [(0, pad_y), (0, pad_x)]
    return np.pad(image, widths, mode="reflect"), (height, width)


@dataclass(frozen=True)
class TileBox:
    """One tile of a frame, in pixels: rows ``y0:y1``, columns ``x0:x1``."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, columns)`` slices that cut this tile out of a ``(y, x)`` array."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def _starts(length: int, tile: int, step: int) -> list[int]:
    """Tile start offsets along one axis; the last tile ends exactly at ``length``."""
    if tile >= length:
        return [0]
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)  # every tile has the full size: one batch shape
    return starts


def tile_boxes(
    shape: tuple[int, int], tile_px: int, overlap_px: int, align: int = 1
) -> list[TileBox]:
    """Cover a frame with equal, overlapping square tiles.

    Parameters
    ----------
    shape : tuple of int
        Frame ``(height, width)`` in pixels.
    tile_px : int
        Tile side in pixels; clipped to the frame side, so a frame smaller
        than one tile is one tile.  Must be a multiple of ``align``.
    overlap_px : int
        Minimum overlap between neighbouring tiles, pixels (``0 <= overlap_px
        < tile_px``).  The last tile of each row/column is moved back to end
        at the frame edge, so its overlap can be larger.
    align : int
        Tile starts are multiples of this many pixels (the network's 4 x 4
        pixel folding then sees the same grid in a tile as in the whole
        frame, which keeps tiled and whole-frame outputs close).  The frame
        sides must be multiples of it too (see :func:`pad_to_multiple`).

    Returns
    -------
    list of TileBox
        Row-major order (top row first, left to right); all tiles have the
        same size ``min(tile_px, height) x min(tile_px, width)``.

    Raises
    ------
    ConfigError
        On a tile that is not positive or not a multiple of ``align``, an
        overlap outside ``[0, tile_px)``, or a frame side that is not a
        multiple of ``align``.
    """
    height, width = shape
    if align < 1:
        raise ConfigError(f"tile align: expected at least 1, got {align}")
    if tile_px < 1 or tile_px % align:
        raise ConfigError(f"tile size {tile_px} px: expected a positive multiple of {align} pixels")
    if not 0 <= overlap_px < tile_px:
        raise ConfigError(
            f"tile overlap {overlap_px} px: expected 0 <= overlap < tile size ({tile_px} px)"
        )
    if height < 1 or width < 1 or height % align or width % align:
        raise ConfigError(f"frame {height} x {width} px: sides must be multiples of {align} px")
    # Round the step down to the alignment: the overlap only ever grows.
    step = max((tile_px - overlap_px) // align * align, align)
    tile_y, tile_x = min(tile_px, height), min(tile_px, width)
    return [
        TileBox(y0, y0 + tile_y, x0, x0 + tile_x)
        for y0 in _starts(height, tile_y, step)
        for x0 in _starts(width, tile_x, step)
    ]


def _ramp(length: int, ramp_px: int, rise: bool, fall: bool) -> np.ndarray:
    """1-D tile weight: 0 -> 1 ramps over ``ramp_px`` at the start / end, 1 between.

    The first quarter of a ramp is 0 (the network's output next to a tile
    edge, where it saw padding instead of image, is not used at all), the
    middle half rises linearly, the last quarter is 1.  Sample ``i`` weighs
    ``clip((i + 0.5 - q) / (ramp_px - 2 q), 0, 1)`` with ``q = ramp_px // 4``:
    two ramps crossing over the same ``ramp_px`` pixels sum to exactly 1.
    """
    w = np.ones(length, np.float32)
    n = min(ramp_px, length // 2)
    if n > 0:
        dead = n // 4
        r = np.clip((np.arange(n, dtype=np.float32) + 0.5 - dead) / (n - 2 * dead), 0.0, 1.0)
        if rise:
            w[:n] = np.minimum(w[:n], r)
        if fall:
            w[length - n :] = np.minimum(w[length - n :], r[::-1])
    return w


class TileBlender:
    """Accumulates denoised tiles into one frame with feathered overlaps.

    On the sides a tile shares with a neighbour (not on the frame's own
    edges) its weight is 0 over the first quarter of ``overlap_px``, rises
    linearly over the middle half and is 1 beyond: the poorer outputs next to
    a tile's edge, where the network saw padding instead of image, are
    replaced by the neighbour's interior, and the hand-over is gradual, so no
    seam shows.  The result divides by the summed weights, so uneven overlaps
    (the last tile of a row) still blend to a proper average, and every pixel
    keeps a positive total weight as long as neighbours overlap by at least
    ``overlap_px``.

    Parameters
    ----------
    shape : tuple of int
        Frame ``(height, width)`` in pixels.
    overlap_px : int
        Ramp length in pixels; use the overlap given to :func:`tile_boxes`.
    """

    def __init__(self, shape: tuple[int, int], overlap_px: int) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.overlap_px = int(overlap_px)
        self._sum = np.zeros(self.shape, np.float64)
        self._weight = np.zeros(self.shape, np.float64)

    def add(self, box: TileBox, tile: np.ndarray) -> None:
        """Add one tile's output ``(y1 - y0, x1 - x0)`` at ``box``.

        Raises
        ------
        ConfigError
            If the tile's shape does not match the box or the box leaves the frame.
        """
        height, width = self.shape
        th, tw = box.y1 - box.y0, box.x1 - box.x0
        if tile.shape != (th, tw):
            raise ConfigError(f"tile {box}: expected shape {(th, tw)}, got {tile.shape}")
        if box.y0 < 0 or box.x0 < 0 or box.y1 > height or box.x1 > width:
            raise ConfigError(f"tile {box}: outside the {height} x {width} px frame")
        wy = _ramp(th, self.overlap_px, rise=box.y0 > 0, fall=box.y1 < height)
        wx = _ramp(tw, self.overlap_px, rise=box.x0 > 0, fall=box.x1 < width)
        weight = np.outer(wy, wx)
        rows, cols = box.slices
        self._sum[rows, cols] += weight * tile
        self._weight[rows, cols] += weight

    def result(self) -> np.ndarray:
        """The blended frame ``(y, x)`` float32.

        Raises
        ------
        ConfigError
            If some pixel was covered by no tile.
        """
        if not np.all(self._weight > 0):
            raise ConfigError("tile blend: some pixels were not covered by any tile")
        return (self._sum / self._weight).astype(np.float32)
