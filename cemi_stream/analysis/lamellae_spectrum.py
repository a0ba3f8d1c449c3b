"""Local power spectrum of square windows: period, direction and lamellar features.

Each window (mean removed, Hann-tapered) is Fourier transformed; its
gradient-weighted power spectrum (``|k|^2 P(k)``, so that shading and single
edges do not dominate) gives: the peak's period and direction; within an octave
of the peak, the structure tensor (by Parseval, that of the band-passed window)
and its coherence, and the periodicity, the autocorrelation of the band-passed
gradient at one period along the wave vector (~1 for lamellae, ~0 for isotropic
texture, <= 0.3 for a single edge, line or bar); and the amplitude of the
sinusoid at the peak.  :func:`local_period` returns them (:class:`LocalPeriod`);
:func:`~cemi_stream.analysis.lamellae.lamellar_mask` thresholds them.

Conventions as in :mod:`cemi_stream.analysis.lamellae`: arrays are ``(y, x)``,
lengths are pixels of the tile, angles are radians in ``[-pi/2, pi/2)`` from +x
towards +y (down) and give the direction across the lamellae (their normal).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft

from ..errors import AnalysisError
from .lamellae_common import (
    _angle_coherence,
    _as_float,
    _as_mask,
    _check_number,
    _check_window,
    _normalised,
    _wrap,
)

__all__ = ["LocalPeriod", "local_period"]

#: Shortest period looked for, px (Nyquist is 2).
MIN_PERIOD_PX = 2.5
#: Windows hold at least this many periods (the longest period is ``window / this``).
MIN_CYCLES = 3.0


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


# --------------------------------------------------------------------------- windows


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
            taper, scipy.fft.rfft2(taper).ravel().astype(np.complex64), ref, wref.astype(f32),
            ky[ref].astype(f32),
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
    img: np.ndarray, window: int, step: int, min_p: float, max_p: float,
    min_amplitude: float | None = None,
) -> _Features:  # fmt: skip
    """Spectral features of the windows of ``img`` (see :class:`LocalPeriod`).

    Periodicity, coherence and tensor direction are computed only for windows
    whose amplitude reaches ``min_amplitude`` (all when ``None``); nan elsewhere.
    """
    (taper, ftaper, ref, wref, rky, rkx, dirs, band, nb_idx, nb_ky, nb_kx,
     acf) = _spectral_tables(window, min_p, max_p)  # fmt: skip
    wins, ys, xs = _windows(img, window, step)
    shape = wins.shape[:2]
    w = wins.reshape(-1, window, window)
    n = w.shape[0]
    mean = w.reshape(n, -1).mean(axis=1, dtype=np.float32)
    spec = scipy.fft.rfft2(w * taper).reshape(n, -1)

    def power(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
        # The window's mean removed in the spectrum: minus mean x spectrum of the taper.
        z = spec[rows[:, None], idx] - mean[rows, None] * ftaper[idx]
        return z.real**2 + z.imag**2

    every = np.arange(n)
    z = spec[:, ref] - mean[:, None] * ftaper[ref][None, :]
    pr = (z.real**2 + z.imag**2) * wref  # gradient-weighted power, reference band
    tot = pr.sum(axis=1) + 1e-12
    peak = np.argmax(pr[:, band], axis=1)
    raw = power(every, nb_idx[peak])
    s_raw = raw.sum(axis=1) + 1e-12
    cy = (raw * nb_ky[peak]).sum(axis=1) / s_raw
    cx = (raw * nb_kx[peak]).sum(axis=1) / s_raw
    k2 = np.maximum(cy * cy + cx * cx, 1e-12)
    strength = s_raw * k2 / tot
    amplitude = _AMPLITUDE_GAIN * (64.0 / window) ** 2 * np.sqrt(s_raw)
    periodicity = np.full(n, np.nan, np.float32)
    coh = np.full(n, np.nan, np.float32)
    t_angle = np.full(n, np.nan, np.float32)
    sel = every if min_amplitude is None else np.flatnonzero(amplitude >= min_amplitude)
    if sel.size:
        prs, q2, qy, qx = pr[sel], k2[sel], cy[sel], cx[sel]
        rr2 = rky * rky + rkx * rkx

        def octave(kk2: np.ndarray) -> np.ndarray:
            """The power within an octave either side of ``|k|``: the peak's scale."""
            inside = (rr2[None, :] >= kk2[:, None] / 4.0) & (rr2[None, :] <= 4.0 * kk2[:, None])
            return prs * inside

        def acorr(local: np.ndarray, ty: np.ndarray, tx: np.ndarray) -> np.ndarray:
            """Autocorrelation of the octave-band gradient at lag ``(ty, tx)`` px."""
            c = np.cos(2 * np.pi * (rky[None, :] * ty[:, None] + rkx[None, :] * tx[:, None]))
            num = (local * c).sum(axis=1)
            return num / (local.sum(axis=1) + 1e-12) / _taper_acf(acf, ty, tx)

        # At one period along the wave vector (lag k / |k|^2), and at two: thin lines put
        # more gradient power in the 2nd harmonic than in the fundamental ...
        ty, tx = qy / q2, qx / q2
        local = octave(q2)
        p1 = acorr(local, ty, tx)
        can_double = q2 * max_p * max_p >= 4.0 * 0.9
        if can_double.any():
            # ... when the sub-harmonic k / 2 holds at least a quarter of the peak's power.
            sub = power(sel, _bins_around(qy / 2.0, qx / 2.0, window)).sum(axis=1)
            can_double &= sub >= s_raw[sel]
        if can_double.any():
            local2 = octave(q2 / 4.0)
            p2 = acorr(local2, 2 * ty, 2 * tx)
            double = can_double & (p2 > p1 + 0.15)
            local = np.where(double[:, None], local2, local)
            p1 = np.where(double, p2, p1)
            k2[sel] = np.where(double, q2 / 4.0, q2)
        periodicity[sel] = p1
        j = local @ dirs.T  # (n, 3): the structure tensor at the peak's scale (Parseval)
        t_angle[sel], coh[sel] = _angle_coherence(j[:, 0], j[:, 1], j[:, 2])
    f32 = np.float32
    return _Features(
        (1.0 / np.sqrt(k2)).reshape(shape).astype(f32),
        _wrap(np.arctan2(cy, cx)).reshape(shape),
        np.clip(strength, 0, 1).reshape(shape).astype(f32),
        periodicity.reshape(shape),
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
