"""Noise statistics used to calibrate the imaging presets against real SEM frames.

The same estimators run on real frames (``shared/data/kriss-sem-pairs``) and
on simulated ones, so the comparison is like for like:

* **noise/contrast** - noise standard deviation at the median grey level
  divided by the image contrast (5-95 percentile range of the lightly
  smoothed image), both in grey levels;
* **Poisson exponent** - slope of log(noise variance) against log(mean grey):
  1 for pure shot noise, 0 for signal-independent noise;
* **lag-1 autocorrelation along x** of the noise (detector bandwidth);
* **pair noise/contrast** - with a noisy/clean pair of the same field: the
  standard deviation of ``noisy - fit(clean)`` at the median grey level over
  the clean image's 5-95 percentile range, after registering the pair.

Single-image noise is read from the vertical second difference
``I[y-1] - 2 I[y] + I[y+1]`` in flat areas: scan noise is independent from
line to line, so its variance there is 6 sigma^2, while smooth signal cancels.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from cemi_stream.errors import SourceError

_SMOOTH_SIGMA = 2.0
_FLAT_PERCENTILE = 40.0
_MIN_BIN_PIXELS = 200


@dataclass(frozen=True, slots=True)
class NoiseStats:
    """Noise statistics of one frame (grey levels of 0..255).

    Attributes
    ----------
    noise_contrast : float
        Noise sd at the median grey level / contrast.
    noise_sd : float
        Noise sd at the median grey level.
    contrast : float
        5-95 percentile range of the smoothed image.
    median : float
        Median grey level of the smoothed image.
    poisson_exponent : float
        d log(variance) / d log(mean grey).
    rho_x : float
        Lag-1 autocorrelation of the noise along x (the scan direction).
    """

    noise_contrast: float
    noise_sd: float
    contrast: float
    median: float
    poisson_exponent: float
    rho_x: float

    def as_dict(self) -> dict[str, float]:
        """Plain ``dict`` for JSON output."""
        return {k: float(v) for k, v in asdict(self).items()}


def kriss_image_area(frame: np.ndarray) -> np.ndarray:
    """Image area of a KRISS frame: rows 1..440, cols 1..510 as float32 ``(y, x)``.

    Strips the 29-row FEI data bar and the 1-px UI frame.
    """
    return np.ascontiguousarray(frame[1:441, 1:511], dtype=np.float32)


def _flat_mask(smooth: np.ndarray) -> np.ndarray:
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1)
    grad = np.hypot(gx, gy)
    mask: np.ndarray = grad < np.percentile(grad, _FLAT_PERCENTILE)
    return mask


def _robust_var(values: np.ndarray) -> float:
    mad = float(np.median(np.abs(values - np.median(values))))
    return (1.4826 * mad) ** 2


def _variance_curve(
    level: np.ndarray, residual: np.ndarray, mask: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Robust noise variance of ``residual / scale`` in bins of ``level`` (masked)."""
    lo, hi = np.percentile(level[mask], [2.0, 98.0])
    edges = np.linspace(lo, hi, 13)
    means, variances = [], []
    for a, b in itertools.pairwise(edges):
        sel = mask & (level >= a) & (level < b)
        if int(sel.sum()) >= _MIN_BIN_PIXELS:
            means.append(float(level[sel].mean()))
            variances.append(_robust_var(residual[sel]) / scale)
    return np.array(means), np.array(variances)


def _at_median(means: np.ndarray, variances: np.ndarray, median: float) -> tuple[float, float]:
    """Noise sd at ``median`` (linear fit of variance vs mean) and log-log slope."""
    if len(means) < 2:
        raise SourceError("noise statistics: too few flat pixels to fit a noise curve")
    c1, c0 = np.polyfit(means, variances, 1)
    var_med = max(float(c0 + c1 * median), 1e-9)
    positive = (means > 0) & (variances > 0)
    exponent = (
        float(np.polyfit(np.log(means[positive]), np.log(variances[positive]), 1)[0])
        if positive.sum() >= 2
        else float("nan")
    )
    return float(np.sqrt(var_med)), exponent


def noise_stats(image: np.ndarray) -> NoiseStats:
    """Noise statistics of one frame, without a clean reference.

    Parameters
    ----------
    image : ndarray
        ``(y, x)`` grey image (any real dtype, 0..255 scale), without data bar.

    Returns
    -------
    NoiseStats
    """
    img = np.ascontiguousarray(image, dtype=np.float32)
    smooth = cv2.GaussianBlur(img, (0, 0), _SMOOTH_SIGMA)
    flat = _flat_mask(smooth)[1:-1]
    d2 = img[:-2] - 2.0 * img[1:-1] + img[2:]
    level = smooth[1:-1]
    p5, p95 = np.percentile(smooth, [5.0, 95.0])
    median = float(np.median(smooth))
    means, variances = _variance_curve(level, d2, flat, 6.0)
    sd, exponent = _at_median(means, variances, median)
    both = flat[:, :-1] & flat[:, 1:]
    rho = float(np.corrcoef(d2[:, :-1][both], d2[:, 1:][both])[0, 1])
    contrast = float(p95 - p5)
    return NoiseStats(sd / contrast, sd, contrast, median, exponent, rho)


def register_integer(moving: np.ndarray, fixed: np.ndarray) -> tuple[int, int]:
    """Integer shift ``(dx, dy)`` with ``moving(y, x) ~ fixed(y - dy, x - dx)``."""
    window = cv2.createHanningWindow((fixed.shape[1], fixed.shape[0]), cv2.CV_32F)
    # Copies: OpenCV 5.0 multiplies the inputs by the window in place when
    # their size is already DFT-optimal (e.g. 384 or 256 wide).
    (dx, dy), _ = cv2.phaseCorrelate(
        np.array(fixed, dtype=np.float32, copy=True),
        np.array(moving, dtype=np.float32, copy=True),
        window,
    )
    return round(dx), round(dy)


def pair_noise_contrast(noisy: np.ndarray, clean: np.ndarray) -> float:
    """Noise of a noisy frame against a clean frame of the same field.

    Parameters
    ----------
    noisy, clean : ndarray
        ``(y, x)`` grey images of the same size, without data bar; they may
        be misregistered by a few pixels (found by phase correlation).

    Returns
    -------
    float
        Robust sd of ``noisy - (a * clean + b)`` (least-squares ``a, b``) at
        the median grey level, over the 5-95 percentile range of ``clean``.
    """
    lo = np.ascontiguousarray(noisy, dtype=np.float32)
    hi = np.ascontiguousarray(clean, dtype=np.float32)
    dx, dy = register_integer(lo, hi)
    h, w = lo.shape
    lo = lo[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)]
    hi = hi[max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    design = np.stack([hi.ravel(), np.ones(hi.size, dtype=np.float32)], axis=1)
    coef = np.linalg.lstsq(design, lo.ravel(), rcond=None)[0]
    predicted = hi * np.float32(coef[0]) + np.float32(coef[1])
    residual = lo - predicted
    flat = _flat_mask(cv2.GaussianBlur(hi, (0, 0), _SMOOTH_SIGMA))
    means, variances = _variance_curve(predicted, residual, flat, 1.0)
    sd, _ = _at_median(means, variances, float(np.median(predicted)))
    p5, p95 = np.percentile(hi, [5.0, 95.0])
    return sd / float(p95 - p5)


def kriss_pairs(data_dir: Path, subset: str = "time") -> list[tuple[Path, Path]]:
    """Noisy/clean file pairs of the KRISS data set.

    Parameters
    ----------
    data_dir : Path
        The ``shared/data`` folder.
    subset : {"time", "line"}
        ``time``: 100 ns vs 30 us dwell; ``line``: no vs 50x line integration.

    Returns
    -------
    list of (noisy, clean) paths, in pair order.
    """
    base = Path(data_dir) / "kriss-sem-pairs" / subset
    noisy_dir, clean_dir = ("low", "high") if subset == "time" else ("noisy", "clean")
    noisy = sorted((base / noisy_dir).glob("*.png"))
    clean = sorted((base / clean_dir).glob("*.png"))
    if not noisy or len(noisy) != len(clean):
        raise SourceError(f"{base}: expected matching {noisy_dir}/ and {clean_dir}/ PNG pairs")
    return list(zip(noisy, clean, strict=True))


def read_kriss(path: Path) -> np.ndarray:
    """Image area (float32 ``(y, x)``) of one KRISS PNG."""
    frame = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if frame is None:
        raise SourceError(f"{path}: cannot decode image")
    return kriss_image_area(frame)
