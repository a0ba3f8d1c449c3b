"""Simulated lamellae of known period and direction inside a region, for tests and benches."""

from __future__ import annotations

import math

import cv2
import numpy as np

from ..errors import AnalysisError

__all__ = ["synthetic_lamellae"]


def synthetic_lamellae(
    shape: tuple[int, int],
    period_px: float,
    angle_rad: float,
    region: np.ndarray | None = None,
    *,
    noise: float = 0.1,
    wave: str = "sine",
    background: str = "blobs",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Lamellae of known period and direction inside a region, for tests and benches.

    Parameters
    ----------
    shape : (int, int)
        ``(height, width)``, px.
    period_px : float
        Lamellar period, px.
    angle_rad : float
        Direction across the lamellae (wave vector), rad from +x towards +y.
    region : ndarray, optional
        Boolean ``(y, x)`` where the lamellae are (default: everywhere).
    noise : float
        Standard deviation of added Gaussian noise, relative to the lamellae's
        peak-to-peak contrast (1).
    wave : str
        ``sine``, ``square`` (duty 0.5) or ``lines`` (dark lines, duty 0.25).
    background : str
        Outside the region: ``blobs`` (thresholded smooth noise, isotropic
        features of ~5 px), ``particles`` (bright discs of radius 1.5-4 px on a
        dark matrix, ~20 % of the area, like spheroidite), both of the
        lamellae's contrast; ``flat`` (mid grey) or ``noise`` (only the noise).
    seed : int
        Random seed.

    Returns
    -------
    image : ndarray
        ``(y, x)`` float32 in about 0..1.
    region : ndarray
        Boolean ``(y, x)`` true lamellar region.
    """
    h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u = xx * math.cos(angle_rad) + yy * math.sin(angle_rad)
    phase = (u / period_px + rng.uniform()) % 1.0
    lam: np.ndarray
    if wave == "sine":
        lam = 0.5 + 0.5 * np.cos(2 * np.pi * phase)
    elif wave == "square":
        lam = (phase < 0.5).astype(np.float64)
    elif wave == "lines":
        lam = (phase >= 0.25).astype(np.float64)
    else:
        raise AnalysisError(f"wave: {wave!r} is not sine, square or lines")
    if wave != "sine":  # the optics' blur: soft edges
        lam = cv2.GaussianBlur(lam, (0, 0), 0.7)
    if region is None:
        region = np.ones((h, w), dtype=bool)
    bg: np.ndarray
    if background == "blobs":  # thresholded smooth noise: isotropic, ~5 px features
        blobs = cv2.GaussianBlur(rng.standard_normal((h, w)), (0, 0), 2.0)
        bg = cv2.GaussianBlur((blobs > 0).astype(np.float64), (0, 0), 0.7)
    elif background == "particles":  # bright discs (r 1.5-4 px) on a dark matrix, ~20 %
        bg = np.zeros((h, w))
        n = int(0.2 * h * w / (np.pi * 2.75**2))
        for y, x, r in zip(rng.uniform(0, h, n), rng.uniform(0, w, n), rng.uniform(1.5, 4, n),
                           strict=True):  # fmt: skip
            cv2.circle(bg, (int(x), int(y)), round(r), 1.0, -1)
        bg = cv2.GaussianBlur(bg, (0, 0), 0.7)
    elif background == "flat":
        bg = np.full((h, w), 0.5)
    elif background == "noise":
        bg = np.zeros((h, w))
    else:
        raise AnalysisError(f"background: {background!r} is not blobs, particles, flat or noise")
    img = np.where(region, lam, bg) + noise * rng.standard_normal((h, w))
    return img.astype(np.float32), region
