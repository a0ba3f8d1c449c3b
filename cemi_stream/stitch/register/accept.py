"""Is a registration trustworthy?  Statistics whose scale does not depend on the dose.

The plain zero-mean NCC of an overlap cannot decide it: two noisy views of
the same place reach only ``R = S / (S + N)`` (signal and noise variances),
0.1-0.3 on real low-definition frames, while coarse shapes of unrelated
places agree by chance up to ~0.45.  Three measurements are used instead:

* **reliability** ``rel = sqrt(R_ref R_mov)``: the NCC a perfect match would
  reach, with each side's noise variance measured in the frame itself
  (:func:`noise_variance`); below ``min_reliability`` the overlap holds too
  little signal to judge;
* **signal** ``NCC / rel``: ~1 for a true match at any dose, well below for
  a wrong one; its scatter grows as ``rel`` falls, so the accepted band
  widens with it (``signal_tolerance``, ``noise_tolerance``), and with the
  square root of ``band_z / strong_band_z`` for overwhelmingly significant
  agreement;
* **band_z**: the NCC of the overlaps band-passed at 2-16 px (no pixel
  noise, no shading or large grains) times the square root of their pixel
  count, the significance of the agreement, which unrelated frames do not
  reach by chance (``min_band_z``);

and no other candidate may agree about as well (within ``min_margin``) and
pass as a match itself (periodic and look-alike structures).  The thresholds are calibrated by
``bench/bench_accept.py`` (true pairs and hard negatives cut from real
micrographs, doses from HD to 4x the LD preset's noise, overlaps 5-60 %).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .spectral import ncc_with_spread, window_size
from .types import Prepared, RegisterConfig

_BAND_LOW = 1.0  # full-resolution px: finer detail is mostly pixel noise
_BAND_HIGH = 8.0  # full-resolution px: coarser structure agrees by chance too easily
_NOISE_SAMPLES = 25_000  # second differences the noise estimate is made from
_NOISE_BANDS = 8  # brightness bands of the noise estimate (shot noise grows with the signal)
_MIN_RELIABILITY = 0.02  # floor of R per side: keeps the division finite


@dataclass(frozen=True, slots=True)
class Agreement:
    """How well an overlap agrees at one whole-pixel shift (see the module docstring)."""

    signal: float
    band_z: float
    reliability: float
    ncc: float = 0.0  # the plain zero-mean NCC of the (windowed) overlap


def noise_variance(image: np.ndarray) -> float:
    """Mean variance of the frame's pixel noise, grey levels squared, from the frame alone.

    SEM frames are scanned line by line, so noise is independent between
    lines (not along them: the detector bandwidth correlates neighbouring
    pixels of a line) while the imaged signal, blurred by the beam, changes
    smoothly across them.  The second difference across lines,
    ``I[y] - (I[y-1] + I[y+1]) / 2``, holds ``1.5`` times the noise variance
    plus the signal's curvature; its median absolute deviation ignores the
    sparse edges where the curvature is large.  Shot noise grows with the
    brightness, so the estimate is made per brightness band (octiles of the
    local mean) and averaged over them: a single median would report the
    noise of the median grey level and miss the brighter phase's.  About
    25,000 samples are used, whatever the frame size.

    Parameters
    ----------
    image : ndarray of uint8
        The frame ``(y, x)``.

    Returns
    -------
    float
        Noise variance estimate (0 for frames of fewer than 4 lines).
    """
    h, w = image.shape
    if h < 4:
        return 0.0
    # About 25,000 samples whatever the frame size: every other line triple,
    # columns strided to fit.  Integer histograms instead of sorting: the
    # estimate costs ~1 ms per frame.
    step = max(1, round(w * (h // 2) / _NOISE_SAMPLES))
    img = image[:, ::step].astype(np.int16)
    above, mid, below = img[1:-2:2], img[2:-1:2], img[3::2]
    twice_d = np.abs(2 * mid - above - below).ravel()  # 0..510
    level = (above + mid + below).ravel()  # 0..765
    cdf = np.cumsum(np.bincount(level, minlength=766))
    edges = np.searchsorted(cdf, cdf[-1] * np.arange(1, _NOISE_BANDS) / _NOISE_BANDS)
    band = np.searchsorted(edges, np.arange(766), side="right")[level]
    hist = np.bincount(band * 511 + twice_d, minlength=_NOISE_BANDS * 511)
    hist = hist.reshape(_NOISE_BANDS, 511)
    counts = hist.sum(axis=1)
    keep = counts >= 16
    if not keep.any():
        return 0.0
    # Median |d| per band (d's own median is ~0: a second difference of a
    # smooth signal), as a robust standard deviation.
    medians = np.argmax(np.cumsum(hist[keep], axis=1) >= (counts[keep, None] + 1) / 2, axis=1)
    sigma = 1.4826 * (medians.astype(np.float64) + 0.5) / 2.0
    return float(np.mean(sigma**2) / 1.5)


def band_image(image: np.ndarray, small: np.ndarray | None = None, factor: int = 4) -> np.ndarray:
    """The frame at half resolution, band-passed (difference of Gaussians, 2 to 16 px).

    Parameters
    ----------
    image : ndarray of uint8
        The frame ``(y, x)``.
    small : ndarray of float32 or None
        The frame already reduced ``factor`` times (the coarse stage's); the
        wide Gaussian is taken there and brought back to half resolution,
        which costs a fifth of blurring the half-resolution frame itself.
    factor : int
        Reduction of ``small``.

    Returns
    -------
    ndarray of float32
        ``(y // 2, x // 2)``; half-resolution pixel ``j`` covers full
        pixels ``2j, 2j + 1``.
    """
    h, w = image.shape
    hh, hw = h // 2, w // 2
    half = cv2.resize(image, (hw, hh), interpolation=cv2.INTER_AREA).astype(np.float32)
    fine: np.ndarray = cv2.GaussianBlur(half, (0, 0), _BAND_LOW / 2)
    if small is not None and factor in (2, 4):
        wide = cv2.GaussianBlur(small, (0, 0), _BAND_HIGH / factor)
        if factor == 4:
            wide = cv2.resize(wide, (hw, hh), interpolation=cv2.INTER_LINEAR)
        # ``small`` is zero-mean, so the result keeps the frame's mean: harmless,
        # the band image is only compared by zero-mean NCC (subtracting the
        # scalar too cost 15x the subtraction itself).
        fine -= wide[:hh, :hw]
        return fine
    fine -= cv2.GaussianBlur(half, (0, 0), _BAND_HIGH / 2)
    return fine


def agreement(
    ref: Prepared, mov: Prepared, dx: int, dy: int, side: int, band: bool = True
) -> Agreement:
    """Measure the agreement of ``ref`` and ``mov`` at whole-pixel shift ``(dx, dy)``.

    Parameters
    ----------
    ref, mov : Prepared
        The frames.
    dx, dy : int
        ``mov``'s top-left minus ``ref``'s, pixels.
    side : int
        The statistics use a centred window of the overlap of at most
        ``side`` x ``side`` pixels of area (longer for a narrow strip), at
        full and at half resolution, which bounds their cost.
    band : bool
        Measure ``band_z`` too (not needed to compare rival candidates).

    Returns
    -------
    Agreement
        Zeros where the overlap is too small to measure.
    """
    a, b = ref.image, mov.image
    (ha, wa), (hb, wb) = a.shape, b.shape
    x0, x1 = max(0, dx), min(wa, dx + wb)
    y0, y1 = max(0, dy), min(ha, dy + hb)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return Agreement(0.0, 0.0, 0.0)
    cw, ch = window_size(x1 - x0, y1 - y0, side)
    cx = x0 + (x1 - x0 - cw) // 2
    cy = y0 + (y1 - y0 - ch) // 2
    pa = a[cy : cy + ch, cx : cx + cw]
    pb = b[cy - dy : cy - dy + ch, cx - dx : cx - dx + cw]
    plain, sa, sb = ncc_with_spread(pa, pb)
    signal = rel = 0.0
    if sa > 1e-3 and sb > 1e-3:
        ra = max(1.0 - ref.noise / (sa * sa), _MIN_RELIABILITY)
        rb = max(1.0 - mov.noise / (sb * sb), _MIN_RELIABILITY)
        rel = math.sqrt(ra * rb)
        signal = plain / rel
    band_z = 0.0
    if band and ref.band is not None and mov.band is not None:
        hx, hy = round(dx / 2), round(dy / 2)
        (bha, bwa), (bhb, bwb) = ref.band.shape, mov.band.shape
        x0, x1 = max(0, hx), min(bwa, hx + bwb)
        y0, y1 = max(0, hy), min(bha, hy + bhb)
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            cw, ch = window_size(x1 - x0, y1 - y0, side)
            cx = x0 + (x1 - x0 - cw) // 2
            cy = y0 + (y1 - y0 - ch) // 2
            qa = ref.band[cy : cy + ch, cx : cx + cw]
            qb = mov.band[cy - hy : cy - hy + ch, cx - hx : cx - hx + cw]
            band_z = ncc_with_spread(qa, qb)[0] * math.sqrt(qa.size)
    return Agreement(float(signal), float(band_z), float(rel), float(plain))


def trustworthy(agree: Agreement, cfg: RegisterConfig) -> str:
    """Judge an agreement: ``""`` when trusted, else the reason (``noise``, ...).

    Parameters
    ----------
    agree : Agreement
        From :func:`agreement` at the answer's shift.
    cfg : RegisterConfig
        The thresholds.

    Returns
    -------
    str
        ``""``, ``noise`` (too little signal in the overlap to judge),
        ``insignificant`` (band-passed agreement within chance) or
        ``disagree`` (the overlap does not show the same thing).
    """
    if agree.reliability < cfg.min_reliability:
        return "noise"
    if agree.band_z < cfg.min_band_z:
        return "insignificant"
    # Overwhelming significance buys tolerance: the noise estimate behind
    # ``signal`` is biased by some textures (sharp edges), and a detector's
    # response or shading differs between exposures; chance agreement that
    # strong is what the significance test rules out.
    strength = max(1.0, math.sqrt(agree.band_z / cfg.strong_band_z))
    tol = tolerance(agree.reliability, cfg) * strength
    if not 1.0 - tol <= agree.signal <= 1.0 + 3.0 * tol:
        return "disagree"
    return ""


def tolerance(reliability: float, cfg: RegisterConfig) -> float:
    """How far below 1 a true match's ``signal`` may fall at this reliability.

    Tight where the measurement is precise (high dose), wider as noise
    makes it scatter (~ 1 / reliability).
    """
    rel = max(reliability, 1e-6)
    # Capped: beyond it the NCC says nothing either way, and significance decides.
    return min(cfg.signal_tolerance + cfg.noise_tolerance * (1.0 - rel) / rel, 1.0)


def ambiguous(signal: float, rival: float, reliability: float, cfg: RegisterConfig) -> bool:
    """Whether another candidate shift agrees about as well as the answer does.

    It does when its ``signal`` is within ``min_margin`` of the answer's and
    would itself pass as a match (within the tolerance of 1): a periodic or
    look-alike structure then offers two answers, and neither is trusted.
    """
    return rival >= signal - cfg.min_margin and rival >= 1.0 - tolerance(reliability, cfg)
