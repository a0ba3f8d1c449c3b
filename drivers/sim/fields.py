"""Deterministic random fields of global specimen coordinates.

Every random quantity of the procedural specimen is a pure function of integer
lattice coordinates and the seed (a stateless hash), never of a per-tile random
generator.  That is what makes independently rendered tiles join seamlessly:
the same global pixel always sees the same lattice values.
"""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_K_X = np.uint64(0x9E3779B97F4A7C15)
_K_Y = np.uint64(0xC2B2AE3D27D4EB4F)
_K_S = np.uint64(0x165667B19E3779F9)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def lattice_hash(ix: np.ndarray, iy: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Hash integer lattice coordinates to 64-bit values.

    Parameters
    ----------
    ix, iy : ndarray of int
        Lattice coordinates (broadcast against each other); may be negative.
    seed : int
        Specimen seed.
    salt : int
        Distinguishes independent fields built on the same lattice.

    Returns
    -------
    ndarray of uint64
        SplitMix64-finalised hash, same shape as the broadcast inputs.
    """
    key = np.uint64((int(seed) * 0x2545F4914F6CDD1D + int(salt) * 0x9E3779B1) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        hx = np.atleast_1d(np.asarray(ix, dtype=np.int64)).astype(np.uint64)
        hy = np.atleast_1d(np.asarray(iy, dtype=np.int64)).astype(np.uint64)
        h = hx * _K_X + hy * _K_Y + key * _K_S
        h = h ^ (h >> np.uint64(30))
        h = (h * _M1) & _MASK64
        h = h ^ (h >> np.uint64(27))
        h = (h * _M2) & _MASK64
        h = h ^ (h >> np.uint64(31))
    return h


def lattice_uniform(ix: np.ndarray, iy: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Uniform numbers in ``[0, 1)`` attached to lattice points.

    Parameters
    ----------
    ix, iy : ndarray of int
        Lattice coordinates (broadcast against each other).
    seed, salt : int
        See :func:`lattice_hash`.

    Returns
    -------
    ndarray of float64
        One value per lattice point.
    """
    h = lattice_hash(ix, iy, seed, salt)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / float(1 << 53))


def _interp_matrix(origin: int, count: int, scale: float) -> tuple[np.ndarray, int, int]:
    """Sparse-as-dense interpolation weights from lattice nodes to pixels.

    Returns ``(weights, first_node, n_nodes)``; ``weights`` is ``(count,
    n_nodes)`` float32 with two non-zero entries per row (quintic fade), so a
    value-noise tile is ``Wy @ V @ Wx.T``: two small matrix products instead
    of four gathers per pixel.
    """
    u = (origin + np.arange(count, dtype=np.float64)) / scale
    cell = np.floor(u)
    f = u - cell
    fade = f * f * f * (f * (f * 6.0 - 15.0) + 10.0)
    first = int(cell[0])
    n_nodes = int(cell[-1]) - first + 2
    weights = np.zeros((count, n_nodes), dtype=np.float32)
    rows = np.arange(count)
    col = (cell - first).astype(np.int64)
    weights[rows, col] = (1.0 - fade).astype(np.float32)
    weights[rows, col + 1] = fade.astype(np.float32)
    return weights, first, n_nodes


def value_noise(
    x0: int, y0: int, width: int, height: int, scale: float, seed: int, salt: int
) -> np.ndarray:
    """Smooth value noise in ``[0, 1]`` on a block of the global pixel grid.

    Parameters
    ----------
    x0, y0 : int
        Global pixel coordinates of the block's top-left pixel.
    width, height : int
        Block size in pixels.
    scale : float
        Lattice spacing in pixels (the feature size of the noise).
    seed, salt : int
        See :func:`lattice_hash`.

    Returns
    -------
    ndarray of float32
        ``(y, x)`` block of shape ``(height, width)``.
    """
    wx, fx, nx = _interp_matrix(x0, width, scale)
    wy, fy, ny = _interp_matrix(y0, height, scale)
    iy = np.arange(fy, fy + ny, dtype=np.int64)[:, None]
    ix = np.arange(fx, fx + nx, dtype=np.int64)[None, :]
    nodes = lattice_uniform(ix, iy, seed, salt).astype(np.float32)
    out: np.ndarray = (wy @ nodes) @ wx.T
    return out


def fbm_noise(
    x0: int,
    y0: int,
    width: int,
    height: int,
    scale: float,
    octaves: int,
    seed: int,
    salt: int,
) -> np.ndarray:
    """Sum of value-noise octaves (fractal noise), normalised to ``[0, 1]``.

    Parameters
    ----------
    x0, y0 : int
        Global pixel coordinates of the block's top-left pixel.
    width, height : int
        Block size in pixels.
    scale : float
        Feature size of the coarsest octave in pixels; each further octave
        halves it and halves its amplitude.
    octaves : int
        Number of octaves (>= 1).
    seed, salt : int
        See :func:`lattice_hash`.

    Returns
    -------
    ndarray of float32
        ``(y, x)`` block of shape ``(height, width)``.
    """
    total = np.zeros((height, width), dtype=np.float32)
    weight_sum = 0.0
    amplitude = 1.0
    for octave in range(octaves):
        total += amplitude * value_noise(
            x0, y0, width, height, scale / (2.0**octave), seed, salt * 31 + octave
        )
        weight_sum += amplitude
        amplitude *= 0.5
    total *= np.float32(1.0 / weight_sum)
    return total
