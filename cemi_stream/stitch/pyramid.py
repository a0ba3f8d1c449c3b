"""The mosaic pyramid: 2x block-mean levels built unit by unit from level 0.

Level ``k`` is the array ``"k"`` of the mosaic group (see
:mod:`cemi_stream.stitch.chunks`); one of its pixels spans ``2**k`` level-0
pixels and its element ``(j, i)`` is the rounded mean of the previous level's
elements ``(2j .. 2j + 1, 2i .. 2i + 1)`` (arrays indexed ``(y, x)``, shapes
``(height, width)`` in pixels).  Levels are added until the longest side is at
most ``max_side`` pixels.  Only units under data of the previous level are
read and written: the rest stays unwritten (fill value 0).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from .chunks import ChunkStore

DOWNSAMPLING = "2x2 block mean of the previous level, rounded half up; odd edges replicated"


def downsample_mean(block: np.ndarray) -> np.ndarray:
    """2x2 block mean of a uint8 ``(y, x)`` image, rounded half up.

    An odd last row/column is replicated first, so it is averaged with
    itself.  Output shape ``(ceil(h / 2), ceil(w / 2))``.
    """
    h, w = block.shape
    if h % 2 or w % 2:
        block = cv2.copyMakeBorder(block, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
    s = block[0::2, 0::2].astype(np.uint16)
    s += block[1::2, 0::2]
    s += block[0::2, 1::2]
    s += block[1::2, 1::2]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


def build_level(
    store: ChunkStore, level: int, prev_shape: tuple[int, int], prev_units: set[tuple[int, int]]
) -> set[tuple[int, int]]:
    """Level ``level`` as the 2x block mean of the previous one, unit by unit.

    Returns the unit indices of the new level that hold data.
    """
    u = store.unit
    prev: Any = store.group[str(level - 1)]
    shape = ((prev_shape[0] + 1) // 2, (prev_shape[1] + 1) // 2)
    target = store.create_level(str(level), shape)
    out_units = sorted({(ty // 2, tx // 2) for ty, tx in prev_units})
    written: set[tuple[int, int]] = set()
    for ty, tx in out_units:
        y0, x0 = ty * u, tx * u
        y1, x1 = min(y0 + u, shape[0]), min(x0 + u, shape[1])
        src = np.asarray(
            prev[2 * y0 : min(2 * y1, prev_shape[0]), 2 * x0 : min(2 * x1, prev_shape[1])]
        )
        down = downsample_mean(src)
        if down.any():
            target[y0:y1, x0:x1] = down
            written.add((ty, tx))
    return written


def build_pyramid(
    store: ChunkStore, shape: tuple[int, int], units: set[tuple[int, int]], max_side: int
) -> list[tuple[int, int]]:
    """Add levels 1, 2, ... until the longest side is <= ``max_side`` pixels.

    Parameters
    ----------
    store : ChunkStore
        The mosaic's storage, level 0 already tight.
    shape : (int, int)
        Level-0 shape ``(height, width)``.
    units : set of (int, int)
        Level-0 units that hold data.
    max_side : int
        Longest side of the coarsest level, in pixels.

    Returns
    -------
    list of (int, int)
        ``(height, width)`` of every level, level 0 first.
    """
    shapes = [shape]
    level = 1
    while max(shapes[-1]) > max_side:
        units = build_level(store, level, shapes[-1], units)
        shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
        level += 1
    return shapes
