"""Feather blending of frames into accumulation tiles: weights, sub-pixel shift, sums.

Coordinates follow :mod:`cemi_stream.stitch.mosaic`: arrays are indexed
``(y, x)``, distances and positions are in pixels.  A *tile* is a pair of
float32 ``(unit, unit)`` arrays ``(sum(w * image), sum(w))`` covering one
write unit; tiles are keyed by the unit index ``(ty, tx)``, and the unit
``(ty, tx)`` spans live-array pixels ``[ty * unit, (ty + 1) * unit)`` x
``[tx * unit, (tx + 1) * unit)``.

Weights
-------
Each frame is weighted by a separable feather ``w(u, v) = r_x(u) * r_y(v)``
where ``r(d) = clip((d + 0.5) / feather_px, 0, 1)`` and ``d`` is the distance
(pixels) from the pixel centre to the nearest border pixel centre of the
frame: a weight of ``0.5 / feather_px`` at the border rising to 1 at
``feather_px`` inside.  The canvas accumulates ``sum(w * image)`` and
``sum(w)`` (float32) and stores their ratio, rounded to uint8
(:func:`normalise`).  Overlapping frames thus fade into each other over
``feather_px`` (no seam, even between frames of different brightness), and
where frames overlap fully their mean is taken (which also averages the SEM
noise down).

Sub-pixel positions
-------------------
A sub-pixel position shifts the frame (and its feather, analytically) by the
fractional part with a separable bilinear (or Keys cubic) filter
(:func:`shift_subpixel`), then adds it at the integer part; integer positions
are copied exactly.

Re-opened units
---------------
Weights depend on geometry only, so the weight sum of a written unit is
rebuilt exactly from the placements of the frames that touched it
(:func:`unit_weight_sum`); the weighted sum is then the stored uint8 value x
that weight sum (:func:`restore_sum`), exact up to the uint8 rounding of the
write.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

Tile = tuple[np.ndarray, np.ndarray]  # (sum(w * image), sum(w)), float32 (unit, unit)
# One frame's placement in live-array pixels: integer top-left (gx0, gy0) and
# its 1-D feather ramps along y and x (sub-pixel shift already applied).
Placement = tuple[int, int, np.ndarray, np.ndarray]


def feather_ramp(n: int, frac: float, feather_px: float) -> np.ndarray:
    """1-D feather weights of a frame side shifted by a sub-pixel fraction.

    Parameters
    ----------
    n : int
        Frame side in pixels.
    frac : float
        Sub-pixel shift in ``[0, 1)``; the output has ``n + 1`` samples when it
        is non-zero (the shifted frame straddles one more pixel), else ``n``.
    feather_px : float
        Distance from the border, in pixels, at which the weight reaches 1.

    Returns
    -------
    numpy.ndarray
        float32 weights; sample ``j`` is at frame coordinate ``j - frac``.
    """
    m = n + 1 if frac > 0 else n
    u = np.arange(m, dtype=np.float64) - frac
    d = np.minimum(u, (n - 1) - u)
    return np.clip((d + 0.5) / feather_px, 0.0, 1.0).astype(np.float32)


def _keys(t: float) -> float:
    """Keys cubic convolution kernel (a = -0.5) at distance ``t``."""
    t = abs(t)
    if t <= 1.0:
        return 1.5 * t**3 - 2.5 * t**2 + 1.0
    if t < 2.0:
        return -0.5 * t**3 + 2.5 * t**2 - 4.0 * t + 2.0
    return 0.0


def _shift_kernel(frac: float, interpolation: str) -> tuple[np.ndarray, int]:
    """Correlation kernel (anchor 0) and border padding for a shift by ``frac``.

    Output sample ``j`` is the frame interpolated at ``j - frac``; on the
    frame padded by ``pad`` pixels that reads padded samples ``j .. j + len - 1``.
    """
    if frac == 0:
        return np.ones(1, np.float32), 0
    if interpolation == "linear":
        return np.array([frac, 1.0 - frac], np.float32), 1
    t = 1.0 - frac  # distance from sample j-1 to the interpolated point
    taps = [_keys(t + 1.0), _keys(t), _keys(1.0 - t), _keys(2.0 - t)]
    return np.array(taps, np.float32), 2


def shift_subpixel(image: np.ndarray, fx: float, fy: float, interpolation: str) -> np.ndarray:
    """Shift a frame right/down by ``(fx, fy)`` in ``[0, 1)`` pixels.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 ``(y, x)`` frame.
    fx, fy : float
        Fractional shifts in pixels.
    interpolation : {"linear", "cubic"}
        Bilinear or Keys cubic (a = -0.5) interpolation; borders replicated.

    Returns
    -------
    numpy.ndarray
        float32 ``(h + (fy > 0), w + (fx > 0))``: output ``(j, i)`` is the frame
        at ``(j - fy, i - fx)``.
    """
    h, w = image.shape
    kx, px = _shift_kernel(fx, interpolation)
    ky, py = _shift_kernel(fy, interpolation)
    padded = cv2.copyMakeBorder(image, py, py, px, px, cv2.BORDER_REPLICATE)
    # One separable pass does the shift and the uint8 -> float32 conversion.
    out = cv2.sepFilter2D(
        padded, cv2.CV_32F, kx, ky, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE
    )
    return out[: h + (fy > 0), : w + (fx > 0)]


def units_touched(unit: int, gx0: int, gy0: int, fw: int, fh: int) -> list[tuple[int, int]]:
    """Unit indices ``(ty, tx)`` an ``fh`` x ``fw`` frame at live pixel ``(gx0, gy0)`` touches."""
    u = unit
    return [
        (ty, tx)
        for ty in range(gy0 // u, (gy0 + fh - 1) // u + 1)
        for tx in range(gx0 // u, (gx0 + fw - 1) // u + 1)
    ]


def accumulate(
    tiles: dict[tuple[int, int], Tile],
    unit: int,
    keys: list[tuple[int, int]],
    gx0: int,
    gy0: int,
    shifted: np.ndarray,
    weight: np.ndarray,
) -> None:
    """Add ``weight * shifted`` and ``weight`` into the tiles of ``keys``, in place.

    Parameters
    ----------
    tiles : dict
        Accumulation tiles by unit index ``(ty, tx)``; a missing one is
        created (zeros).
    unit : int
        Tile side in pixels.
    keys : list of (int, int)
        The units the frame touches.
    gx0, gy0 : int
        Live-array pixel of the frame's (shifted) top-left sample.
    shifted, weight : numpy.ndarray
        float32 ``(y, x)`` frame and its feather weights, of the same shape.
    """
    u = unit
    fh, fw = weight.shape
    for key in keys:
        tile = tiles.get(key)
        if tile is None:
            # np.zeros maps fresh zero pages lazily: a new tile costs ~nothing.
            tile = (np.zeros((u, u), np.float32), np.zeros((u, u), np.float32))
            tiles[key] = tile
        ty, tx = key
        y0, x0 = max(gy0, ty * u), max(gx0, tx * u)
        y1, x1 = min(gy0 + fh, (ty + 1) * u), min(gx0 + fw, (tx + 1) * u)
        dst = (slice(y0 - ty * u, y1 - ty * u), slice(x0 - tx * u, x1 - tx * u))
        src = (slice(y0 - gy0, y1 - gy0), slice(x0 - gx0, x1 - gx0))
        s, wsum = tile[0][dst], tile[1][dst]
        # OpenCV writes through the views (rows contiguous); the product and
        # the sum in one pass cost ~35 % less than cv2.multiply, cv2.add.
        cv2.accumulateProduct(shifted[src], weight[src], s)
        cv2.accumulate(weight[src], wsum)


def unit_weight_sum(
    key: tuple[int, int], unit: int, count: int, placements: Iterable[Placement]
) -> np.ndarray:
    """The exact float32 ``(unit, unit)`` weight sum of ``count`` frames on one unit.

    Parameters
    ----------
    key : (int, int)
        Unit index ``(ty, tx)``.
    unit : int
        Unit side in pixels.
    count : int
        Number of placements.
    placements : iterable of (gx0, gy0, ramp_y, ramp_x)
        The frames that touched the unit: live-array top-left pixel and
        feather ramps (see :func:`feather_ramp`).
    """
    u = unit
    ty, tx = key
    # The weight sum is sum_i outer(ry_i, rx_i) over the frames i that touched
    # the unit (ramps clipped to it, zero outside): one product Ry^T Rx.
    # einsum, not matmul: multi-threaded BLAS stalled re-opens to 15-20 ms
    # on the busy 2-core machine (its threads compete with zarr's and
    # blosc's); einsum is single-threaded, ~1.3 ms for 10 frames.
    ry = np.zeros((count, u), np.float32)
    rx = np.zeros((count, u), np.float32)
    for row, (gx0, gy0, ramp_y, ramp_x) in enumerate(placements):
        y0, x0 = max(gy0, ty * u), max(gx0, tx * u)
        y1, x1 = min(gy0 + len(ramp_y), (ty + 1) * u), min(gx0 + len(ramp_x), (tx + 1) * u)
        ry[row, y0 - ty * u : y1 - ty * u] = ramp_y[y0 - gy0 : y1 - gy0]
        rx[row, x0 - tx * u : x1 - tx * u] = ramp_x[x0 - gx0 : x1 - gx0]
    return np.einsum("ki,kj->ij", ry, rx, optimize=False)


def normalise(total: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The blended uint8 ``(y, x)`` pixels of a tile: ``total / weight``."""
    # Rounds, saturates to 0..255 (cubic overshoot) and gives 0 where nothing landed.
    return cv2.divide(total, weight, dtype=cv2.CV_8U)


def restore_sum(stored: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The float32 weighted sum of a written unit: stored uint8 value x weight sum."""
    return cv2.multiply(stored, weight, dtype=cv2.CV_32F)
