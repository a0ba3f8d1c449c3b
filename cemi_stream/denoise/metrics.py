"""Image-quality metrics for the denoiser, and the non-local-means baseline.

* :func:`psnr` and :func:`ssim` compare a denoised image with its clean
  reference (SSIM as in Wang et al. 2004: 11 x 11 Gaussian window, sigma 1.5,
  K1 = 0.01, K2 = 0.03, mean over the positions where the window fits).
* :func:`dark_fraction` is the CEMI paper's phase-fraction measurement (the
  BCC phase is the dark phase): Bradley-Roth adaptive thresholding with an
  integral image, then the share of dark pixels.  The denoiser is judged by how
  close this fraction comes to the HD image's.
* :func:`nlm` / :func:`tune_nlm` are the classical baseline a trained model
  must beat: OpenCV's fast non-local means with the strength ``h`` tuned on
  the evaluated pairs.

All images are 2-D ``uint8`` arrays with axes ``(y, x)``; metrics accept any
real dtype but compare values on the 0..255 scale.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ..errors import DenoiseError

if TYPE_CHECKING:
    from .pairs import AlignedPair

logger = logging.getLogger(__name__)

# SSIM constants of Wang et al. (2004).
_SSIM_WIN = 11
_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
# Non-local means patch and search window sizes (OpenCV's recommended values).
NLM_TEMPLATE_PX = 7
NLM_SEARCH_PX = 21
#: Filter strengths tried by :func:`tune_nlm` (grey levels, OpenCV's ``h``).
#: Dense around the optimum measured on the KRISS pairs (20-25; PSNR falls
#: steeply below 15 and slowly above 30).
NLM_HS: tuple[float, ...] = (10.0, 15.0, 17.5, 20.0, 22.5, 25.0, 30.0, 40.0)


def _pair_as_float(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise DenoiseError(f"{what}: image shapes differ ({a.shape} vs {b.shape})")
    if a.ndim != 2 or a.size == 0:
        raise DenoiseError(f"{what}: need non-empty 2-D images, got shape {a.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio of two images.

    Parameters
    ----------
    a, b : ndarray
        Images ``(y, x)`` of equal shape.
    data_range : float
        Peak value (255 for 8-bit images).

    Returns
    -------
    float
        ``10 log10(data_range**2 / MSE)`` in dB; ``inf`` for identical images.

    Raises
    ------
    DenoiseError
        If the shapes differ or the images are not 2-D.
    """
    fa, fb = _pair_as_float(a, b, "psnr")
    mse = float(np.mean((fa - fb) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean structural similarity index (Wang et al. 2004).

    Parameters
    ----------
    a, b : ndarray
        Images ``(y, x)`` of equal shape, at least 11 x 11 pixels.
    data_range : float
        Peak value (255 for 8-bit images).

    Returns
    -------
    float
        Mean SSIM over all positions where the 11 x 11 Gaussian window
        (sigma 1.5) lies inside the image; 1 for identical images.  Equals
        ``skimage.metrics.structural_similarity(a, b, data_range=255,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.

    Raises
    ------
    DenoiseError
        If the shapes differ or an image is smaller than the window.
    """
    fa, fb = _pair_as_float(a, b, "ssim")
    if min(fa.shape) < _SSIM_WIN:
        raise DenoiseError(f"ssim: images {fa.shape} are smaller than the {_SSIM_WIN}-px window")
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return np.asarray(cv2.GaussianBlur(x, (_SSIM_WIN, _SSIM_WIN), _SSIM_SIGMA))

    mu_a, mu_b = blur(fa), blur(fb)
    var_a = blur(fa * fa) - mu_a * mu_a
    var_b = blur(fb * fb) - mu_b * mu_b
    cov = blur(fa * fb) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    )
    # Only positions where the whole window lies inside the image: the
    # border values depend on the padding rule and would bias the mean.
    pad = (_SSIM_WIN - 1) // 2
    return float(ssim_map[pad:-pad, pad:-pad].mean())


def dark_fraction(image: np.ndarray, window_frac: float = 1 / 8, t: float = 0.15) -> float:
    """Share of dark-phase pixels by Bradley-Roth adaptive thresholding.

    Parameters
    ----------
    image : ndarray
        Greyscale image ``(y, x)`` (any real dtype, e.g. ``uint8``).
    window_frac : float
        Side of the square averaging window as a fraction of the image width
        (Bradley and Roth use 1/8).
    t : float
        A pixel is dark when it lies below ``(1 - t)`` times the mean of the
        window centred on it (Bradley and Roth use 0.15).

    Returns
    -------
    float
        Fraction (0..1) of dark pixels.

    Raises
    ------
    DenoiseError
        If the image is not 2-D or a parameter is out of range.

    Notes
    -----
    Bradley, D.; Roth, G. Adaptive thresholding using the integral image.
    J. Graph. Tools 2007, 12, 13-21 (ref. 53 of the CEMI paper, used there for
    the BCC phase fraction).  The local mean comes from an integral image in
    O(1) per pixel; windows are clipped at the image border and averaged over
    the pixels they cover.
    """
    img = np.asarray(image)
    if img.ndim != 2 or img.size == 0:
        raise DenoiseError(f"dark_fraction: need a non-empty 2-D image, got shape {img.shape}")
    if not 0.0 < window_frac <= 1.0:
        raise DenoiseError(f"dark_fraction: window_frac {window_frac} is not in (0, 1]")
    if not 0.0 <= t < 1.0:
        raise DenoiseError(f"dark_fraction: t {t} is not in [0, 1)")
    height, width = img.shape
    half = max(1, round(width * window_frac) // 2)
    integral = cv2.integral(img.astype(np.float64), sdepth=cv2.CV_64F)
    ys = np.arange(height)
    xs = np.arange(width)
    y0 = np.clip(ys - half, 0, height)[:, None]
    y1 = np.clip(ys + half + 1, 0, height)[:, None]
    x0 = np.clip(xs - half, 0, width)[None, :]
    x1 = np.clip(xs + half + 1, 0, width)[None, :]
    window_sum = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    count = (y1 - y0) * (x1 - x0)
    # Compare sums rather than means: I * count < sum * (1 - t) avoids a
    # division per pixel and is exact in float64 for 8-bit data.
    dark = img.astype(np.float64) * count < window_sum * (1.0 - t)
    return float(dark.mean())


def nlm(image: np.ndarray, h: float) -> np.ndarray:
    """Non-local-means denoising (OpenCV ``fastNlMeansDenoising``).

    Parameters
    ----------
    image : ndarray
        ``uint8`` image ``(y, x)``.
    h : float
        Filter strength in grey levels; larger removes more noise and detail.

    Returns
    -------
    ndarray
        ``uint8`` image of the same shape (7 x 7 patches, 21 x 21 search).

    Raises
    ------
    DenoiseError
        If the image is not 2-D ``uint8`` or ``h`` is not positive.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 2 or image.dtype != np.uint8:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise DenoiseError(f"nlm: need a 2-D uint8 image, got {got}")
    if not h > 0:
        raise DenoiseError(f"nlm: filter strength h must be positive, got {h}")
    return np.asarray(
        cv2.fastNlMeansDenoising(
            np.ascontiguousarray(image), None, float(h), NLM_TEMPLATE_PX, NLM_SEARCH_PX
        )
    )


def tune_nlm(pairs: Sequence[AlignedPair], hs: Sequence[float] = NLM_HS) -> float:
    """Pick the NLM strength that maximises the mean PSNR against HD.

    Parameters
    ----------
    pairs : sequence of AlignedPair
        Registered pairs; NLM runs on each ``ld`` and is compared with ``hd``.
    hs : sequence of float
        Candidate strengths in grey levels.

    Returns
    -------
    float
        The best ``h`` (the smaller one on a tie).

    Raises
    ------
    DenoiseError
        If ``pairs`` or ``hs`` is empty.
    """
    if not pairs:
        raise DenoiseError("tune_nlm: no pairs to tune on")
    if not hs:
        raise DenoiseError("tune_nlm: no candidate strengths")
    best_h, best_psnr = float(hs[0]), -np.inf
    for h in hs:
        score = float(np.mean([psnr(nlm(p.ld, h), p.hd) for p in pairs]))
        logger.debug("NLM h=%.1f: mean PSNR %.2f dB over %d pairs", h, score, len(pairs))
        if score > best_psnr:
            best_h, best_psnr = float(h), score
    logger.info("NLM tuned on %d pairs: h=%.1f (mean PSNR %.2f dB)", len(pairs), best_h, best_psnr)
    return best_h
