"""Classical lamellar detector (no training) and the paper's lamellar width and count.

A baseline beside a trained segmenter and a source of weak labels: a region is
*lamellar* where the texture is **oriented** (coherence of the structure
tensor), **periodic** (a peak in the local power spectrum whose
autocorrelation at one period is high) and has **contrast**.

All arrays are ``(y, x)`` (rows, columns); lengths are pixels of the tile;
angles are radians in ``[-pi/2, pi/2)`` from the +x axis (columns) towards +y
(rows, i.e. *downwards* on screen) and always give the direction **across**
the lamellae (their normal, the wave vector): the direction along which width
and count are measured.

Definitions.  The paper (CEMI, Lang et al. 2025, section on the analysis of
cross-scale images): "the widths of the lamellar structures have been
quantified ... by determining the minimum bounding rectangle for each lamellar
region within the smaller images.  The width of each lamellar region
(represented by the length of the green line segment) and the count of
lamellar structures (indicated by the number of black lines intersected by the
green line segment) were computed ... the width of lamellar structures was
calculated separately for each region, and the average value was considered as
the lamellar width within the respective smaller image."  Per region (8-connected
component of the mask) :func:`lamellar_stats` measures:

``width_px`` (the paper's lamellar width)
    The extent of the region **across the lamellae**: the side, perpendicular
    to the lamellae, of the region's bounding rectangle aligned with them.  The
    direction is the region's structure tensor (its dominant gradient
    direction), never ``cv2.minAreaRect``'s angle, whose convention changed
    between OpenCV versions and whose rectangle follows the region's outline,
    not the lamellae.
``count`` (the paper's count)
    The number of dark lamellae ("black lines") crossed by that segment, drawn
    through the region's centroid: dark runs of a band-passed profile along it
    (averaged over a few parallel lines, hysteresis at 0.3 of its spread).
``spacing_px`` (the lamellar period; not in the paper)
    ``1 / |k|`` at the peak of the region's power spectrum (power-weighted
    centroid of the peak; a strong sub-harmonic, as of thin lines, wins).
    ``width_px / count`` approximates it.  The paper's measure is the region
    width, but the values it reports ("550 to 750 nanometers") are of the order
    of the eutectic's lamellar spacing, not of a region's extent (many µm); so
    both are given and the integrator may choose.

Tile values are plain means over the tile's regions, as in the paper.

Detection (:func:`lamellar_mask`).  On square windows of ``window_px`` (the
tile, non-overlapping) and on windows of twice that (its 2x-downsampled copy,
half-overlapping, for long periods), the gradient-weighted power spectrum
(``|k|^2 P(k)``, so that shading and single edges do not dominate) gives: the
peak's period and direction; the band's structure tensor (by Parseval, the
tensor of the band-passed window) and its coherence; the periodicity, the
autocorrelation of the band-passed gradient at one period along the wave vector
(~1 for lamellae, ~0 for a single edge, line or bar and for isotropic texture);
and the amplitude of the sinusoid at the peak.  A window is lamellar when
coherence, periodicity and amplitude (relative to the tile's 1-99 % grey-level
range) pass their thresholds and the peak agrees with the tensor's direction.
Around the lamellar windows, pixels are kept where the structure tensor
(averaged over about one period) is past the midpoint between the windows'
coherence and energy and the rest's (pixel-accurate boundaries), then small
pieces are dropped.

Thresholds: chosen by ``bench/bench_lamellae.py`` on the UHCS steel
micrographs (per-image lamellar fraction, pearlite against spheroidite) and
on simulated lamellae; see that bench's results for the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import scipy.fft

from ..errors import AnalysisError

__all__ = [
    "AnalysisError",
    "LamellarStats",
    "LocalPeriod",
    "lamellar_mask",
    "lamellar_stats",
    "local_period",
    "orientation_coherence",
    "synthetic_lamellae",
]

#: Default least coherence of a lamellar window (band-limited structure tensor, 0..1).
MIN_COHERENCE = 0.3
#: Default least periodicity (autocorrelation at one period, -1..1) of a lamellar window.
MIN_PERIODICITY = 0.1
#: Default least lamellar amplitude relative to the tile's 1-99 % grey-level range.
MIN_CONTRAST = 0.03
#: Shortest period looked for, px (Nyquist is 2).
MIN_PERIOD_PX = 2.5
#: Windows hold at least this many periods (the longest period is ``window / this``).
MIN_CYCLES = 3.0
#: Largest angle between the spectral peak and the tensor's direction, rad.
MAX_ANGLE_DIFF = math.radians(25.0)
#: Smallest region measured by :func:`lamellar_stats`, px.
MIN_REGION_PX = 64


@dataclass(frozen=True)
class LamellarStats:
    """Lamellar measures of one tile (means over its regions, as the paper).

    Attributes
    ----------
    lamellar_fraction : float
        Lamellar pixels over valid pixels, in ``[0, 1]``.
    width_px : float
        Mean region width across the lamellae, px (the paper's "lamellar
        width"); nan when there is no region.
    spacing_px : float
        Mean lamellar period, px; nan when there is no region.
    count : float
        Mean number of dark lamellae crossed across a region (the paper's
        count); nan when there is no region.
    regions : int
        Regions measured (components of at least :data:`MIN_REGION_PX` pixels
        with a measurable period).
    """

    lamellar_fraction: float
    width_px: float
    spacing_px: float
    count: float
    regions: int


@dataclass(frozen=True)
class LocalPeriod:
    """Dominant period of square windows of a tile (:func:`local_period`).

    All arrays are ``(ny, nx)`` float32, one value per window.

    Attributes
    ----------
    period_px : ndarray
        Period at the window's spectral peak, px.
    angle_rad : ndarray
        Direction of the peak's wave vector (across the lamellae), rad in
        ``[-pi/2, pi/2)``.
    strength : ndarray
        Share of the band's gradient-weighted power in the 3 x 3 peak, 0..1.
    periodicity : ndarray
        Autocorrelation of the band-passed gradient at a lag of one period
        along the wave vector (corrected for the taper): ~1 for lamellae, ~0
        for a single edge, line or bar, for noise and for isotropic texture.
    amplitude : ndarray
        Amplitude of the sinusoid at the peak, in units of the tile's
        standard deviation.
    coherence : ndarray
        Coherence of the window's band-limited structure tensor, 0..1.
    y_px, x_px : ndarray
        ``(ny,)`` and ``(nx,)``: window centres, px.
    window_px : int
        Window side, px.
    """

    period_px: np.ndarray
    angle_rad: np.ndarray
    strength: np.ndarray
    periodicity: np.ndarray
    amplitude: np.ndarray
    coherence: np.ndarray
    y_px: np.ndarray
    x_px: np.ndarray
    window_px: int


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


# --------------------------------------------------------------------------- local spectrum


def _windows(img: np.ndarray, window: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows ``(ny, nx, window, window)`` (a copy) and their origins; the last reach the edge."""
    h, w = img.shape
    ys = np.arange(0, h - window + 1, step)
    xs = np.arange(0, w - window + 1, step)
    if ys[-1] + window < h:
        ys = np.append(ys, h - window)
    if xs[-1] + window < w:
        xs = np.append(xs, w - window)
    view = np.lib.stride_tricks.sliding_window_view(img, (window, window))
    return view[ys[:, None], xs[None, :]], ys, xs


_SPECTRAL: dict[tuple[int, float, float], tuple[np.ndarray, ...]] = {}


def _spectral_tables(window: int, min_p: float, max_p: float) -> tuple[np.ndarray, ...]:
    """Taper and gather tables on the ``rfft2`` half plane of a window (cached).

    Returns the 2-D Hann taper and its spectrum (flat); for the reference
    band's bins (periods ``MIN_PERIOD_PX .. window / MIN_CYCLES`` and the
    search band) their flat indices, weights ``|k|^2`` (halved at ``kx = 0``,
    which holds both ``+k`` and ``-k``), ``(ky, kx)`` and ``(cos^2, sin^2,
    cos sin)`` of their direction (``(3, n)``, the structure tensor by
    Parseval); the positions in it of the search band's bins (periods ``min_p
    .. max_p``); per search bin, its 3 x 3 neighbours' flat indices and
    ``(ky, kx)`` (neighbours left of ``kx = 0`` read from their mirror); and
    the 1-D taper's normalised autocorrelation by lag (px).
    """
    key = (window, min_p, max_p)
    if key not in _SPECTRAL:
        n, m = window, window // 2 + 1
        han = np.hanning(n + 2)[1:-1]
        taper = np.outer(han, han).astype(np.float32)
        fy = np.fft.fftfreq(n)
        iy, ix = np.meshgrid(np.arange(n), np.arange(m), indexing="ij")
        ky, kx = fy[iy].ravel(), (ix / n).ravel()
        r = np.hypot(ky, kx)
        r_lo = min(1.0 / max_p, MIN_CYCLES / window)
        r_hi = max(1.0 / min_p, 1.0 / MIN_PERIOD_PX)
        ref = np.flatnonzero((r >= r_lo) & (r <= r_hi))
        wref = (r * r)[ref] * np.where(ix.ravel()[ref] == 0, 0.5, 1.0)
        c, s = kx[ref] / r[ref], ky[ref] / r[ref]
        dirs = np.stack([c * c, s * s, c * s])
        band = np.flatnonzero((r[ref] >= 1.0 / max_p) & (r[ref] <= 1.0 / min_p))
        by, bx = iy.ravel()[ref[band]], ix.ravel()[ref[band]]
        d = np.array([-1, 0, 1])
        ny, nx = np.broadcast_arrays((by[:, None, None] + d[None, :, None]) % n,
                                     bx[:, None, None] + d[None, None, :])  # fmt: skip
        neg = nx < 0
        ny = np.where(neg, (-ny) % n, ny).reshape(len(band), 9)
        sign = np.where(neg, -1.0, 1.0).reshape(len(band), 9)
        nx = np.abs(nx).reshape(len(band), 9)
        acf = np.array([float(han[: n - k] @ han[k:]) for k in range(n)]) / float(han @ han)
        f32 = np.float32
        _SPECTRAL[key] = (
            taper, scipy.fft.rfft2(taper).ravel(), ref, wref.astype(f32), ky[ref].astype(f32),
            kx[ref].astype(f32), dirs.astype(f32), band, ny * m + nx,
            (fy[ny] * sign).astype(f32), (nx / n * sign).astype(f32), acf.astype(f32),
        )  # fmt: skip
    return _SPECTRAL[key]


#: Amplitude of a sinusoid from the raw power of its 3 x 3 peak in a 64-px window:
#: ``A = this * sqrt(power)``, scaled by ``(64 / window) ** 2`` (calibrated on sinusoids).
_AMPLITUDE_GAIN = 2.0 / (64 * 64 * 0.375 * 0.94) * 0.926


@dataclass(frozen=True)
class _Features:
    """Per-window features of one set of windows (arrays ``(ny, nx)``), see :class:`LocalPeriod`."""

    period: np.ndarray
    angle: np.ndarray
    strength: np.ndarray
    periodicity: np.ndarray
    amplitude: np.ndarray
    coherence: np.ndarray
    tensor_angle: np.ndarray
    ys: np.ndarray
    xs: np.ndarray


def _bins_around(ky: np.ndarray, kx: np.ndarray, window: int) -> np.ndarray:
    """``(n, 9)`` flat ``rfft2`` indices of the 3 x 3 bins around frequencies ``(ky, kx)``."""
    n, m = window, window // 2 + 1
    d = np.array([-1, 0, 1])
    iy = np.rint(ky * n).astype(int)[:, None, None] + d[None, :, None]
    ix = np.rint(kx * n).astype(int)[:, None, None] + d[None, None, :]
    iy, ix = np.broadcast_arrays(iy, ix)
    neg = ix < 0  # left of kx = 0: the mirror (-ky, -kx)
    iy = np.where(neg, -iy, iy) % n
    ix = np.minimum(np.abs(ix), m - 1)
    return (iy * m + ix).reshape(-1, 9)


def _taper_acf(acf: np.ndarray, ty: np.ndarray, tx: np.ndarray) -> np.ndarray:
    """The 2-D taper's normalised autocorrelation at lags ``(ty, tx)`` px (floored at 0.05)."""
    n = acf.size
    lag_y = np.minimum(np.rint(np.abs(ty)).astype(int), n - 1)
    lag_x = np.minimum(np.rint(np.abs(tx)).astype(int), n - 1)
    return np.maximum(acf[lag_y] * acf[lag_x], 0.05)


def _spectrum_features(
    img: np.ndarray, window: int, step: int, min_p: float, max_p: float
) -> _Features:
    """Spectral features of the windows of ``img`` (see :class:`LocalPeriod`)."""
    (taper, ftaper, ref, wref, rky, rkx, dirs, band, nb_idx, nb_ky, nb_kx,
     acf) = _spectral_tables(window, min_p, max_p)  # fmt: skip
    wins, ys, xs = _windows(img, window, step)
    shape = wins.shape[:2]
    w = wins.reshape(-1, window, window)
    n = w.shape[0]
    rows = np.arange(n)[:, None]
    mean = w.reshape(n, -1).mean(axis=1)[:, None]
    spec = scipy.fft.rfft2(w * taper).reshape(n, -1)

    def power(idx: np.ndarray) -> np.ndarray:
        # The window's mean removed in the spectrum: minus mean x spectrum of the taper.
        z = spec[rows, idx] - mean * ftaper[idx]
        return z.real**2 + z.imag**2

    pr = power(ref[None, :]) * wref  # gradient-weighted power of the reference band
    tot = pr.sum(axis=1) + 1e-12
    peak = np.argmax(pr[:, band], axis=1)
    raw = power(nb_idx[peak])
    s_raw = raw.sum(axis=1) + 1e-12
    cy = (raw * nb_ky[peak]).sum(axis=1) / s_raw
    cx = (raw * nb_kx[peak]).sum(axis=1) / s_raw
    k2 = np.maximum(cy * cy + cx * cx, 1e-12)
    strength = s_raw * k2 / tot
    rr2 = rky * rky + rkx * rkx

    def octave(kk2: np.ndarray) -> np.ndarray:
        """The power within an octave either side of ``|k|``: the peak's scale."""
        sel = (rr2[None, :] >= kk2[:, None] / 4.0) & (rr2[None, :] <= 4.0 * kk2[:, None])
        return pr * sel

    def acorr(local: np.ndarray, ty: np.ndarray, tx: np.ndarray) -> np.ndarray:
        """Autocorrelation of the octave-band gradient at lag ``(ty, tx)`` px."""
        c = np.cos(2 * np.pi * (rky[None, :] * ty[:, None] + rkx[None, :] * tx[:, None]))
        return (local * c).sum(axis=1) / (local.sum(axis=1) + 1e-12) / _taper_acf(acf, ty, tx)

    # At one period along the wave vector (lag k / |k|^2), and at two: thin lines put
    # more gradient power in the 2nd harmonic than in the fundamental.
    ty, tx = cy / k2, cx / k2
    local = octave(k2)
    p1 = acorr(local, ty, tx)
    can_double = k2 * max_p * max_p >= 4.0 * 0.9
    if can_double.any():
        # ... when the sub-harmonic k / 2 holds at least a quarter of the peak's power.
        half_idx = _bins_around(cy / 2.0, cx / 2.0, window)
        sub = power(half_idx).sum(axis=1) * (k2 / 4.0)
        can_double &= sub >= 0.25 * s_raw * k2
    if can_double.any():
        local2 = octave(k2 / 4.0)
        p2 = acorr(local2, 2 * ty, 2 * tx)
        double = can_double & (p2 > p1 + 0.15)
        local = np.where(double[:, None], local2, local)
        p1 = np.where(double, p2, p1)
        k2 = np.where(double, k2 / 4.0, k2)
    periodicity = p1
    j = local @ dirs.T  # (n, 3): the structure tensor at the peak's scale (Parseval)
    t_angle, coh = _angle_coherence(j[:, 0], j[:, 1], j[:, 2])
    amplitude = _AMPLITUDE_GAIN * (64.0 / window) ** 2 * np.sqrt(s_raw)
    f32 = np.float32
    return _Features(
        (1.0 / np.sqrt(k2)).reshape(shape).astype(f32),
        _wrap(np.arctan2(cy, cx)).reshape(shape),
        np.clip(strength, 0, 1).reshape(shape).astype(f32),
        periodicity.reshape(shape).astype(f32),
        amplitude.reshape(shape).astype(f32),
        coh.reshape(shape),
        t_angle.reshape(shape),
        ys,
        xs,
    )


def local_period(
    tile: np.ndarray,
    window_px: int,
    *,
    step_px: int | None = None,
    min_period_px: float = MIN_PERIOD_PX,
    max_period_px: float | None = None,
    valid: np.ndarray | None = None,
) -> LocalPeriod:
    """Dominant period of the texture in square windows, from the local power spectrum.

    Each window (mean removed, Hann-tapered) is Fourier transformed; the peak of
    its gradient-weighted power (``|k|^2 P(k)``, so that shading and single
    edges do not dominate) between periods ``min_period_px`` and
    ``max_period_px`` gives the period (power-weighted centroid of the 3 x 3
    peak, sub-bin accurate) and the direction across the lamellae; see
    :class:`LocalPeriod` for the other features.

    Parameters
    ----------
    tile : ndarray
        2-D ``(y, x)`` uint8, uint16 or float pixels, at least ``window_px`` each way.
    window_px : int
        Window side, px (>= 16).
    step_px : int, optional
        Distance between windows, px (default ``window_px // 2``); the last
        row and column of windows reach the tile's edges.
    min_period_px, max_period_px : float
        Periods looked for, px (default :data:`MIN_PERIOD_PX` ..
        ``window_px / MIN_CYCLES``; ``2 <= min < max <= window_px``).
    valid : ndarray, optional
        Boolean ``(y, x)`` specimen pixels; the others are set to the valid mean.

    Returns
    -------
    LocalPeriod
        Per-window period, direction and features.

    Raises
    ------
    AnalysisError
        Bad tile, mask, window or periods, or a tile smaller than the window.
    """
    window = _check_window(window_px)
    img = _as_float(tile)
    vmask = _as_mask(valid, img.shape, "valid")
    if min(img.shape) < window:
        raise AnalysisError(f"tile: {img.shape[0]} x {img.shape[1]} px is smaller than "
                            f"window_px {window}")  # fmt: skip
    step = window // 2 if step_px is None else step_px
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise AnalysisError(f"step_px: expected a positive integer, got {step_px!r}")
    max_p = window / MIN_CYCLES if max_period_px is None else max_period_px
    min_p = _check_number("min_period_px", min_period_px, 2.0, window)
    max_p = _check_number("max_period_px", max_p, 2.0, window)
    if min_p >= max_p:
        raise AnalysisError(f"min_period_px {min_p:g} must be below max_period_px {max_p:g}")
    f = _spectrum_features(_normalised(img, vmask), window, int(step), min_p, max_p)
    half = window / 2.0
    return LocalPeriod(f.period, f.angle, f.strength, f.periodicity, f.amplitude, f.coherence,
                       f.ys + half, f.xs + half, window)  # fmt: skip


# --------------------------------------------------------------------------- detection


def _levels(norm: np.ndarray, window: int, min_p: float, two_scales: bool) -> list[
    tuple[_Features, int]
]:  # fmt: skip
    """Window features of the tile (non-overlapping windows) and of its half-size copy.

    Level 0 looks for periods ``min_p .. window / MIN_CYCLES``; level 1
    (``two_scales``, half-overlapping windows) for ``window / (2 MIN_CYCLES) ..
    window / MIN_CYCLES`` of its own pixels, i.e. up to twice that in the tile's.
    """
    max_p = window / MIN_CYCLES
    out = [(_spectrum_features(norm, window, window, min_p, max_p), 1)]
    if two_scales and min(norm.shape) >= 2 * window:
        half = cv2.pyrDown(norm)
        out.append((_spectrum_features(half, window, window // 2, max(min_p, max_p / 2), max_p),
                    2))  # fmt: skip
    return out


def _decision(
    f: _Features, min_coherence: float, min_periodicity: float, min_amplitude: float
) -> np.ndarray:
    """Boolean ``(ny, nx)``: the lamellar windows."""
    ok = (f.coherence >= min_coherence) & (f.periodicity >= min_periodicity)
    ok &= f.amplitude >= min_amplitude
    ok &= np.abs(_wrap(f.angle - f.tensor_angle)) <= MAX_ANGLE_DIFF
    return ok


def _robust_range(norm: np.ndarray, vmask: np.ndarray | None) -> float:
    """1st to 99th percentile of the (normalised) valid pixels, on a 1/16 sample."""
    sub = norm[::4, ::4] if vmask is None else norm[::4, ::4][vmask[::4, ::4]]
    if sub.size < 64:
        sub = norm if vmask is None else norm[vmask]
    lo, hi = np.percentile(sub, [1.0, 99.0])
    return float(hi - lo)


def lamellar_mask(
    tile: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    window_px: int = 64,
    min_coherence: float = MIN_COHERENCE,
    min_periodicity: float = MIN_PERIODICITY,
    min_contrast: float = MIN_CONTRAST,
    min_period_px: float = MIN_PERIOD_PX,
    min_area_px: int | None = None,
    two_scales: bool = True,
) -> np.ndarray:
    """Boolean ``(y, x)`` mask of lamellar regions (oriented, periodic texture).

    Parameters
    ----------
    tile : ndarray
        2-D ``(y, x)`` uint8, uint16 or float pixels.  A tile smaller than
        ``window_px`` either way has no measurable lamellae (all ``False``).
    valid : ndarray, optional
        Boolean ``(y, x)`` specimen pixels; the others are never lamellar.
    window_px : int
        Side of the analysis windows, px (>= 16).  Periods from
        ``min_period_px`` to ``window_px / 3`` are looked for on the tile, and
        up to ``2 window_px / 3`` on its half-size copy when ``two_scales``.
    min_coherence : float
        Least coherence of a lamellar window's band-limited structure tensor, 0..1.
    min_periodicity : float
        Least autocorrelation at one period along the wave vector, -1..1:
        rejects edges, lines and bars, which are oriented but not periodic.
    min_contrast : float
        Least amplitude of the lamellae relative to the tile's 1-99 % grey-level
        range, 0..1: rejects faint scratches and compression artefacts.
    min_period_px : float
        Shortest period looked for, px (2 .. ``window_px / 3``).
    min_area_px : int, optional
        Regions with fewer pixels are dropped (default ``(window_px // 2) ** 2``).
    two_scales : bool
        Also look for long periods at half resolution.

    Returns
    -------
    ndarray
        Boolean ``(y, x)`` mask, the shape of ``tile``.

    Raises
    ------
    AnalysisError
        Bad tile, mask or settings (the message names which, on one line).
    """
    img = _as_float(tile)
    vmask = _as_mask(valid, img.shape, "valid")
    window = _check_window(window_px)
    min_coherence = _check_number("min_coherence", min_coherence, 0.0, 1.0)
    min_periodicity = _check_number("min_periodicity", min_periodicity, -1.0, 1.0)
    min_contrast = _check_number("min_contrast", min_contrast, 0.0, 1.0)
    min_p = _check_number("min_period_px", min_period_px, 2.0, window / MIN_CYCLES - 1e-6)
    if min_area_px is not None and (
        isinstance(min_area_px, bool) or not isinstance(min_area_px, (int, np.integer))
        or min_area_px < 0
    ):  # fmt: skip
        raise AnalysisError(f"min_area_px: expected a non-negative integer, got {min_area_px!r}")
    h, w = img.shape
    empty = np.zeros((h, w), dtype=bool)
    if min(h, w) < window or (vmask is not None and not vmask.any()):
        return empty
    norm = _normalised(img, vmask)
    amp_min = min_contrast * _robust_range(norm, vmask)
    seed = np.zeros((h, w), dtype=bool)
    periods = []
    for f, scale in _levels(norm, window, min_p, two_scales):
        ok = _decision(f, min_coherence, min_periodicity, amp_min)
        # Paint each lamellar window's own cell (its stride) in the tile's pixels.
        cell = window // 2 if scale > 1 else window
        for i, j in zip(*np.nonzero(ok), strict=True):
            y0 = int(f.ys[i]) * scale + (window * scale - cell * scale) // 2
            x0 = int(f.xs[j]) * scale + (window * scale - cell * scale) // 2
            seed[y0 : y0 + cell * scale, x0 : x0 + cell * scale] = True
        periods.append(scale * f.period[ok])
    if vmask is not None:
        seed &= vmask
    if not seed.any():
        return empty
    p_dom = float(np.median(np.concatenate(periods)))
    area = (window // 2) ** 2 if min_area_px is None else int(min_area_px)
    return _refine(norm, seed, vmask, p_dom, window, area)


def _band_tensor(norm: np.ndarray, period: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Coherence and energy of the structure tensor of ``norm`` band-passed around ``period``.

    A difference of Gaussians (sigma ``period / 8`` and ``period / 2``) keeps
    the lamellae's scale, the tensor is averaged over about ``1.5 period``.
    Works on the pyramid level ``f`` (1, 2 or 4) that the period allows and
    returns the maps there with ``f``.
    """
    f = 1
    img = norm
    while period / (2 * f) >= 4.0 and f < 4 and min(img.shape) >= 128:
        img = cv2.pyrDown(img)
        f *= 2
    p = period / f
    band = cv2.GaussianBlur(img, (0, 0), max(p / 8.0, 0.5)) - cv2.GaussianBlur(img, (0, 0), p / 2.0)
    prod = cv2.GaussianBlur(_gradient_products(band), (0, 0), 1.5 * p)
    _, coh = _angle_coherence(prod[..., 0], prod[..., 1], prod[..., 2])
    return coh, prod[..., 0] + prod[..., 1], f


def _refine(
    norm: np.ndarray, seed: np.ndarray, vmask: np.ndarray | None, p_dom: float, window: int,
    min_area: int,
) -> np.ndarray:  # fmt: skip
    """Pixel-accurate regions around the lamellar windows ``seed``.

    Within half a window of the seed, a pixel is lamellar where the structure
    tensor of the tile band-passed at the lamellae's period ``p_dom`` has a
    coherence past the midpoint between the seed's (upper quartile: the seed
    cells may overhang the region) and the rest's (median), and, where the
    rest is much flatter, an energy past their midpoint too.
    """
    h, w = norm.shape
    coh, energy, f = _band_tensor(norm, p_dom)
    lh, lw = coh.shape
    small = cv2.resize(seed.astype(np.uint8), (lw, lh), interpolation=cv2.INTER_NEAREST) > 0
    inside = None
    if vmask is not None:
        inside = cv2.resize(vmask.astype(np.uint8), (lw, lh), interpolation=cv2.INTER_NEAREST) > 0
    reach = window // (2 * f) + 1
    near = cv2.dilate(small.astype(np.uint8), np.ones((reach, reach), np.uint8)) > 0
    rest = ~near if inside is None else ~near & inside
    c_in = float(np.percentile(coh[small], 75))
    e_in = float(np.percentile(energy[small], 75))
    c_out = float(np.median(coh[rest])) if rest.any() else 0.0
    e_out = float(np.median(energy[rest])) if rest.any() else 0.0
    fine = near & (coh >= 0.5 * (c_in + min(c_out, c_in)))
    if e_out < 0.5 * e_in:
        fine &= energy >= 0.5 * (e_in + e_out)
    # Close gaps, drop slivers.
    k = int(np.clip(round(p_dom / f), 3, max(3, window // (4 * f)))) | 1
    ell = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    fine_u8 = cv2.morphologyEx(fine.astype(np.uint8), cv2.MORPH_CLOSE, ell)
    fine_u8 = cv2.morphologyEx(fine_u8, cv2.MORPH_OPEN, ell)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fine_u8, connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] * (f * f) >= min_area
    keep &= np.bincount(labels[small], minlength=n) > 0  # overlaps a lamellar window
    keep[0] = False
    out = keep[labels].astype(np.float32)
    if f > 1:
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
    mask = out >= 0.5
    if vmask is not None:
        mask &= vmask
    return mask


# --------------------------------------------------------------------------- synthetic


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
        Outside the region: ``blobs`` (isotropic random texture of the same
        contrast), ``flat`` (mid grey) or ``noise`` only.
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
    if background == "blobs":
        blobs = cv2.GaussianBlur(rng.standard_normal((h, w)), (0, 0), max(period_px / 4, 1.0))
        bg = (blobs > 0).astype(np.float64)
        bg = cv2.GaussianBlur(bg, (0, 0), 0.7)
    elif background == "flat":
        bg = np.full((h, w), 0.5)
    elif background == "noise":
        bg = np.zeros((h, w))
    else:
        raise AnalysisError(f"background: {background!r} is not blobs, flat or noise")
    img = np.where(region, lam, bg) + noise * rng.standard_normal((h, w))
    return img.astype(np.float32), region


# --------------------------------------------------------------------------- measures


def _region_spectrum(img: np.ndarray, region: np.ndarray, max_p: float) -> tuple[float, float]:
    """Period (px) and direction across the lamellae (rad) of one region; nan if none.

    The region's pixels (mean removed, soft-edged) are Fourier transformed.
    The direction is that of the band's structure tensor (by Parseval, the
    tensor of the band-passed region); the period ``1 / |k|`` at the power
    peak's centroid, or at its sub-harmonic ``k / 2`` when that is strong
    (thin lines have strong harmonics).
    """
    data = np.where(region, img - float(img[region].mean()), 0.0).astype(np.float32)
    data *= cv2.GaussianBlur(region.astype(np.float32), (0, 0), 2.0)  # soft edge
    h, w = data.shape
    ph, pw = cv2.getOptimalDFTSize(max(h, 64)), cv2.getOptimalDFTSize(max(w, 64))
    spec = scipy.fft.rfft2(data, s=(ph, pw))
    power = spec.real**2 + spec.imag**2
    fy = np.fft.fftfreq(ph).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(pw).astype(np.float32)[None, :]
    r2 = fy * fy + fx * fx
    inband = (r2 >= 1.0 / max_p**2) & (r2 <= 1.0 / 2.5**2)
    pb = np.where(inband, power, 0.0)
    if not np.any(pb > 0):
        return math.nan, math.nan
    half = np.where(fx == 0, 0.5, 1.0)
    jxx = float((pb * (fx * fx) * half).sum())
    jyy = float((pb * (fy * fy) * half).sum())
    jxy = float((pb * (fx * fy) * half).sum())
    theta = 0.5 * math.atan2(2.0 * jxy, jxx - jyy)
    hy, hx = max(1, math.ceil(ph / h)), max(1, math.ceil(pw / w))

    def centroid(iy: int, ix: int) -> tuple[float, float, float]:
        xs = np.arange(ix - hx, ix + hx + 1)
        yy = (np.arange(iy - hy, iy + hy + 1) % ph)[:, None]
        neg = xs[None, :] < 0  # left of kx = 0: the mirror (-ky, -kx)
        yy = np.where(neg, (-yy) % ph, yy)
        xx = np.minimum(np.abs(xs), pw - 1)[None, :]
        p = power[yy, xx]
        sign = np.where(neg, -1.0, 1.0)
        s = float(p.sum()) + 1e-30
        return float((p * fy[yy, 0] * sign).sum()) / s, float((p * fx[0, xx] * sign).sum()) / s, s

    iy, ix = np.unravel_index(int(np.argmax(pb * r2)), pb.shape)
    cy, cx, s = centroid(int(iy), int(ix))
    k = math.hypot(cy, cx)
    if k / 2.0 >= 1.0 / max_p:
        jy, jx = round(cy / 2.0 * ph), round(cx / 2.0 * pw)
        if jx < 0:
            jy, jx = -jy, -jx
        cy2, cx2, s2 = centroid(jy % ph, jx)
        k2 = math.hypot(cy2, cx2)
        if s2 >= 0.35 * s and abs(2.0 * k2 - k) < 0.2 * k:
            k = k2
    return (1.0 / k if k > 0 else math.nan), theta


def _dark_runs(profile: np.ndarray) -> int:
    """Dark runs of a zero-mean profile, with hysteresis at 0.3 of its spread."""
    if profile.size < 3:
        return 0
    h = 0.3 * float(profile.std())
    if h <= 0:
        return 0
    state = np.zeros(profile.size, dtype=np.int8)
    state[profile < -h] = -1
    state[profile > h] = 1
    s = state[state != 0]  # hysteresis: the last decided side holds in between
    if s.size == 0:
        return 0
    return int((s[0] == -1) + np.count_nonzero((s[1:] == -1) & (s[:-1] == 1)))


def _gauss1d(x: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    xp = np.pad(x, r, mode="reflect" if x.size > r else "edge")
    return np.convolve(xp, k / k.sum(), mode="valid")


def _region_count(
    img: np.ndarray, region: np.ndarray, theta: float, period: float, cy: float, cx: float
) -> int:
    """Dark lamellae crossed by the segment across the lamellae through ``(cy, cx)``."""
    c, sn = math.cos(theta), math.sin(theta)
    h, w = img.shape
    reach = math.hypot(h, w)
    t = np.arange(-reach, reach, 0.5, dtype=np.float32)  # samples 0.5 px apart
    xi = np.rint(cx + t * c).astype(int)
    yi = np.rint(cy + t * sn).astype(int)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    inside[inside] = region[yi[inside], xi[inside]]
    if not inside.any():
        return 0
    m = int(np.clip(round(period / 2.0), 1, 4))
    offs = np.arange(-m, m + 1, dtype=np.float32)
    # Along the normal (c, sn); parallel lines offset along the lamellae (-sn, c), averaged.
    mx = (cx + t[None, :] * c - offs[:, None] * sn).astype(np.float32)
    my = (cy + t[None, :] * sn + offs[:, None] * c).astype(np.float32)
    prof = cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT).mean(axis=0)
    # Band-pass along the line (in samples of 0.5 px): noise and background off.
    band = _gauss1d(prof, max(period / 4.0, 1.2)) - _gauss1d(prof, 2.0 * period)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], inside.astype(np.int8), [0]))))
    return sum(_dark_runs(band[a:b]) for a, b in zip(edges[::2], edges[1::2], strict=True))


def lamellar_stats(
    tile: np.ndarray, mask: np.ndarray, valid: np.ndarray | None = None
) -> LamellarStats:
    """Lamellar fraction, width, spacing and count of a tile, from its lamellar mask.

    Parameters
    ----------
    tile : ndarray
        2-D ``(y, x)`` uint8, uint16 or float pixels.
    mask : ndarray
        Boolean ``(y, x)`` lamellar regions (:func:`lamellar_mask`); each
        8-connected component is one region.
    valid : ndarray, optional
        Boolean ``(y, x)`` specimen pixels; the fraction is over these, and
        mask pixels outside them are ignored.

    Returns
    -------
    LamellarStats
        Fraction of valid pixels; per region the width across the lamellae (px),
        the period (px) and the count of dark lamellae crossed, averaged over
        the regions as in the paper (nan when there is none).  See the module
        docstring for the definitions.

    Raises
    ------
    AnalysisError
        Bad tile or masks (the message names which, on one line).
    """
    img = _as_float(tile)
    vmask = _as_mask(valid, img.shape, "valid")
    lam = _as_mask(mask, img.shape, "mask")
    if lam is None:
        raise AnalysisError("mask: expected a boolean array, got None")
    if vmask is not None:
        lam = lam & vmask
        n_valid = int(vmask.sum())
    else:
        n_valid = lam.size
    frac = float(lam.sum()) / n_valid if n_valid else 0.0
    none = LamellarStats(frac, math.nan, math.nan, math.nan, 0)
    if not lam.any():
        return none
    norm = _normalised(img, vmask)
    n, labels, stats, cents = cv2.connectedComponentsWithStats(lam.astype(np.uint8),
                                                               connectivity=8)  # fmt: skip
    widths: list[float] = []
    spacings: list[float] = []
    counts: list[float] = []
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] < MIN_REGION_PX:
            continue
        x0, y0 = int(stats[i, cv2.CC_STAT_LEFT]), int(stats[i, cv2.CC_STAT_TOP])
        bw, bh = int(stats[i, cv2.CC_STAT_WIDTH]), int(stats[i, cv2.CC_STAT_HEIGHT])
        sl = (slice(y0, y0 + bh), slice(x0, x0 + bw))
        region = labels[sl] == i
        crop = norm[sl]
        # Extent along the normal bounds the period; the outline's points give the extent.
        contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)  # fmt: skip
        pts = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
        period, theta = _region_spectrum(crop, region, max(math.hypot(bh, bw) / 2.0, 3.0))
        if not math.isfinite(period):
            continue
        u = pts[:, 0] * math.cos(theta) + pts[:, 1] * math.sin(theta)
        width = float(u.max() - u.min()) + 1.0
        if period > width / 2.0:  # fewer than two periods across: no lamellae to measure
            continue
        cx, cy = float(cents[i, 0]) - x0, float(cents[i, 1]) - y0
        widths.append(width)
        spacings.append(period)
        counts.append(float(_region_count(crop, region, theta, period, cy, cx)))
    if not widths:
        return none
    return LamellarStats(frac, float(np.mean(widths)), float(np.mean(spacings)),
                         float(np.mean(counts)), len(widths))  # fmt: skip
