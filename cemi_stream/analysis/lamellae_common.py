"""Shared pieces of the lamellar detector: input checks, normalisation, structure tensor.

Conventions as in :mod:`cemi_stream.analysis.lamellae`: arrays are ``(y, x)``,
lengths are pixels of the tile, angles are radians in ``[-pi/2, pi/2)`` from +x
towards +y (down) and give the direction across the lamellae (their normal).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ..errors import AnalysisError

__all__ = ["orientation_coherence"]


# --------------------------------------------------------------------------- input


def _as_float(tile: np.ndarray, name: str = "tile") -> np.ndarray:
    """``tile`` as float32, checked: a 2-D numeric finite array."""
    if not isinstance(tile, np.ndarray):
        raise AnalysisError(f"{name}: expected a numpy array, got {type(tile).__name__}")
    if tile.ndim != 2:
        raise AnalysisError(f"{name}: expected a 2-D (y, x) array, got shape {tile.shape}")
    if tile.dtype.kind not in "uif" or tile.size == 0:
        raise AnalysisError(f"{name}: expected non-empty integer or float pixels, got "
                            f"dtype {tile.dtype}, shape {tile.shape}")  # fmt: skip
    out = tile.astype(np.float32, copy=False)
    if tile.dtype.kind == "f" and not np.isfinite(out).all():
        raise AnalysisError(f"{name}: contains nan or inf")
    return out


def _as_mask(m: np.ndarray | None, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    if m is None:
        return None
    if not isinstance(m, np.ndarray) or m.shape != shape:
        got = m.shape if isinstance(m, np.ndarray) else type(m).__name__
        raise AnalysisError(f"{name}: expected a boolean array of shape {shape}, got {got}")
    return m.astype(bool, copy=False)


def _check_window(window_px: object) -> int:
    if isinstance(window_px, bool) or not isinstance(window_px, (int, np.integer)):
        raise AnalysisError(f"window_px: expected an integer >= 16, got {window_px!r}")
    if window_px < 16:
        raise AnalysisError(f"window_px: expected an integer >= 16, got {window_px!r}")
    return int(window_px)


def _check_number(name: str, v: object, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise AnalysisError(f"{name}: expected a number in [{lo:g}, {hi:g}], got {v!r}")
    f = float(v)
    if not (math.isfinite(f) and lo <= f <= hi):
        raise AnalysisError(f"{name}: expected a number in [{lo:g}, {hi:g}], got {v!r}")
    return f


def _normalised(img: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Zero mean, unit standard deviation over valid pixels; invalid pixels 0."""
    pix = img if valid is None else img[valid]
    if pix.size == 0:
        return np.zeros_like(img)
    mean = float(pix.mean())
    std = float(pix.std())
    out = (img - mean) * (1.0 / std if std > 0 else 1.0)
    if valid is not None:
        out[~valid] = 0.0
    return out


# --------------------------------------------------------------------------- structure tensor


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angles modulo pi into ``[-pi/2, pi/2)``."""
    return ((angle + np.pi / 2) % np.pi - np.pi / 2).astype(np.float32)


def _angle_coherence(
    jxx: np.ndarray, jyy: np.ndarray, jxy: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    diff = jxx - jyy
    angle = 0.5 * np.arctan2(2.0 * jxy, diff)
    coh = np.sqrt(diff * diff + 4.0 * jxy * jxy) / (jxx + jyy + 1e-12)
    return _wrap(angle), np.clip(coh, 0.0, 1.0).astype(np.float32)


def _gradient_products(img: np.ndarray) -> np.ndarray:
    """``(y, x, 3)`` float32: ``gx^2, gy^2, gx gy`` (Sobel, unit gain)."""
    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3, scale=0.125)
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3, scale=0.125)
    return cv2.merge([gx * gx, gy * gy, gx * gy])


def orientation_coherence(tile: np.ndarray, sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Local orientation and coherence from the structure tensor.

    Parameters
    ----------
    tile : ndarray
        2-D ``(y, x)`` uint8, uint16 or float pixels.
    sigma_px : float
        Standard deviation of the Gaussian that averages the tensor, px (> 0).

    Returns
    -------
    angle : ndarray
        ``(y, x)`` float32: direction of the dominant gradient, i.e. **across**
        the lamellae, rad in ``[-pi/2, pi/2)`` from +x towards +y (down).
    coherence : ndarray
        ``(y, x)`` float32: ``(l1 - l2) / (l1 + l2)`` of the tensor's
        eigenvalues, 0 (isotropic or flat) .. 1 (perfectly oriented).

    Raises
    ------
    AnalysisError
        Bad tile or ``sigma_px``.
    """
    sigma = _check_number("sigma_px", sigma_px, 1e-3, 1e4)
    prod = cv2.GaussianBlur(_gradient_products(_as_float(tile)), (0, 0), sigma)
    return _angle_coherence(prod[..., 0], prod[..., 1], prod[..., 2])
