"""Fine stage: the sub-pixel shift between two full-resolution windows.

A window of bounded size cut from the overlap at a coarse shift is
correlated in the filter's pass band with partial whitening (more precise
under noise than pure phase correlation); the correlation peak is looked
for within a few pixels of zero and located to sub-pixel precision by
Newton steps on the DFT interpolation of the correlation itself (the limit
of an upsampled DFT; unbiased for any symmetric peak, where a parabola
fitted to three samples of a broad peak is not).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .spectral import (
    bandpass,
    dft_view,
    gauss_offset,
    idft,
    parabola_offset,
    smooth_factors,
    whiten,
    window,
)
from .types import RegisterConfig

_NOISY = 0.5  # frame reliability below which the fine filter adapts to the noise
_BAND_SIGMAS = 3.0  # the fine pass band ends where the low-pass weight is ~1 %
_NEWTON_STEPS = 3  # from a parabola's start on a 2-pixel grid: < 1e-3 px


@dataclass(frozen=True, slots=True)
class _Band:
    """The pass band of the fine stage for one window size."""

    rows: tuple[slice, slice]  # spectrum rows kept: low positive, then negative frequencies
    cols: tuple[slice, slice]
    ky: np.ndarray  # their angular frequencies, radians per pixel
    kx: np.ndarray
    weight: np.ndarray  # band-pass weight on the kept block
    gy: np.ndarray  # periodic-component factors on the kept block
    gx: np.ndarray
    fy: np.ndarray  # 1-D DFT indices of the kept rows / columns
    fx: np.ndarray


def residual(
    ra: np.ndarray,
    ma: np.ndarray,
    reach: int,
    cfg: RegisterConfig,
    lowpass: float | None = None,
    whitening: float | None = None,
) -> tuple[float, float] | None:
    """Sub-pixel shift ``(dx, dy)`` of window ``ma`` against ``ra`` (same shape), px.

    ``lowpass`` and ``whitening`` override ``cfg.fine_lowpass`` and
    ``cfg.fine_whiten`` (the noise-adapted filter of :func:`noise_adapted`).

    Only the filter's pass band is kept (frequencies where its weight
    exceeds ~1 %), so the work after the two forward transforms is on a
    fraction of the spectrum.  The correlation's highest sample within
    ``+-reach`` of zero (every pixel; every other one for the DFT method,
    whose Newton steps need only a start) is refined to sub-pixel; None
    when the peak lies at or beyond the reach (not this candidate's).
    """
    lowpass = cfg.fine_lowpass if lowpass is None else lowpass
    whitening = cfg.fine_whiten if whitening is None else whitening
    h, w = ra.shape
    band = _band(h, w, lowpass, cfg.highpass)
    sa = _band_spectrum(ra, band, cfg.fine_edges)
    sb = _band_spectrum(ma, band, cfg.fine_edges)
    cross = whiten(sa * np.conj(sb), whitening)
    cross *= band.weight
    (r0, r1), (c0, c1) = band.rows, band.cols
    ny, nx = r0.stop, c0.stop
    # The correlation is band-limited below a quarter cycle per pixel, so
    # an inverse transform of half the size samples it exactly at every
    # other pixel: enough for a start that Newton steps refine.
    halve = cfg.subpixel == "dft" and h % 2 == w % 2 == 0 and max(ny / h, nx / w) < 0.25
    q = 2 if halve else 1
    hq, wq = h // q, w // q
    # One sample beyond the reach, so that a peak inside it has both
    # neighbours for the sub-pixel fit.
    r = min(-(-reach // q), hq // 2 - 2, wq // 2 - 2) + 1
    full = np.zeros((hq, wq), np.complex64)
    full[:ny, :nx] = cross[:ny, :nx]
    full[:ny, wq - (w - c1.start) :] = cross[:ny, nx:]
    full[hq - (h - r1.start) :, :nx] = cross[ny:, :nx]
    full[hq - (h - r1.start) :, wq - (w - c1.start) :] = cross[ny:, nx:]
    surface = idft(full)
    # The +-r neighbourhood of zero shift, rolled so that shift -r is at index 0.
    rows = np.r_[hq - r : hq, 0 : r + 1]
    cols = np.r_[wq - r : wq, 0 : r + 1]
    grid = surface[np.ix_(rows, cols)]
    k = int(np.argmax(grid))
    iy, ix = divmod(k, grid.shape[1])
    if not (0 < iy < 2 * r and 0 < ix < 2 * r):
        return None  # the peak is at or beyond the reach: not this candidate's
    if cfg.subpixel == "gauss":
        oy, ox = gauss_offset(grid, iy, ix)
    else:
        oy, ox = parabola_offset(grid, iy, ix)
    sy, sx = (iy - r + oy) * q, (ix - r + ox) * q
    if cfg.subpixel == "dft":
        sy, sx = _dft_peak(cross, band.ky, band.kx, sy, sx)
    r *= q
    if abs(sx) > r - 0.5 or abs(sy) > r - 0.5:
        return None
    return float(sx), float(sy)


def _band_spectrum(crop: np.ndarray, band: _Band, edges: str) -> np.ndarray:
    """Pass-band block of the edge-treated spectrum of a full-resolution window."""
    img = crop.astype(np.float32)
    if edges in ("hann", "tukey"):
        img -= float(img.mean())  # a windowed mean leaks into low frequencies
        img *= window(img.shape, edges)
    full = dft_view(img)
    (r0, r1), (c0, c1) = band.rows, band.cols
    # The four corner blocks, assembled by slicing (np.block's checks cost
    # more than the copies at this size).
    ny, nx = r0.stop, c0.stop
    spec = np.empty((len(band.fy), len(band.fx)), np.complex64)
    spec[:ny, :nx] = full[r0, c0]
    spec[:ny, nx:] = full[r0, c1]
    spec[ny:, :nx] = full[r1, c0]
    spec[ny:, nx:] = full[r1, c1]
    if edges == "periodic":
        jump_rows = np.fft.fft(img[-1, :] - img[0, :])[band.fx]
        jump_cols = np.fft.fft(img[:, -1] - img[:, 0])[band.fy]
        spec -= jump_rows.astype(np.complex64)[None, :] * band.gy
        spec -= jump_cols.astype(np.complex64)[:, None] * band.gx
    return spec


@functools.lru_cache(maxsize=256)
def _band(h: int, w: int, lowpass: float, highpass: float) -> _Band:
    """Frequencies of an ``h`` x ``w`` spectrum inside the fine pass band (cached)."""
    fmax = min(0.5, _BAND_SIGMAS * lowpass)
    ny, nx = min(int(fmax * h), (h - 1) // 2), min(int(fmax * w), (w - 1) // 2)
    # Frequencies 0..n and -n..-1: two slices of the unshifted spectrum.
    rows = (slice(0, ny + 1), slice(h - ny, h))
    cols = (slice(0, nx + 1), slice(w - nx, w))
    fy = np.r_[0 : ny + 1, h - ny : h]
    fx = np.r_[0 : nx + 1, w - nx : w]
    freq_y, freq_x = np.fft.fftfreq(h)[fy], np.fft.fftfreq(w)[fx]
    f2 = freq_y[:, None] ** 2 + freq_x[None, :] ** 2
    gy, gx = smooth_factors(h, w)
    band = _Band(
        rows=rows,
        cols=cols,
        ky=(2 * np.pi * freq_y).astype(np.float32),
        kx=(2 * np.pi * freq_x).astype(np.float32),
        weight=bandpass(f2, lowpass, highpass).astype(np.float32),
        gy=np.ascontiguousarray(gy[np.ix_(fy, fx)]),
        gx=np.ascontiguousarray(gx[np.ix_(fy, fx)]),
        fy=fy,
        fx=fx,
    )
    return band


def _dft_peak(
    cross: np.ndarray, ky: np.ndarray, kx: np.ndarray, y: float, x: float
) -> tuple[float, float]:
    """Maximise the DFT interpolation of a correlation spectrum from ``(y, x)`` (Newton).

    ``s(y, x) = Re sum_ij cross[i, j] exp(i (ky[i] y + kx[j] x))`` (angular
    frequencies in radians per pixel) is the band-limited surface the
    discrete one samples; its maximum is the exact centre of a symmetric
    peak whatever the peak's shape, which a parabola or Gaussian fit only
    approximates.  Each step costs a few matrix-vector products.
    """
    y0, x0 = y, x
    for _ in range(_NEWTON_STEPS):
        ex = np.exp(1j * kx * np.float32(x)).astype(np.complex64)
        ey = np.exp(1j * ky * np.float32(y)).astype(np.complex64)
        # Sums over x of cross * ex and of its first two x derivatives, then
        # over y likewise; elementwise, because a BLAS product here collides
        # with OpenCV's threads (see _residual).
        p = cross * ex[None, :]
        u = (p.sum(axis=1), (p * (1j * kx)).sum(axis=1), (p * -(kx * kx)).sum(axis=1))
        vy = (ey, 1j * ky * ey, -(ky * ky) * ey)
        # m[i][j]: the i-th y and j-th x derivative of s at (y, x).
        m = [[float((vy[i] * u[j]).sum().real) for j in range(3)] for i in range(2)]
        m.append([float((vy[2] * u[0]).sum().real)])
        gx, gy = m[0][1], m[1][0]
        hxx, hyy, hxy = m[0][2], m[2][0], m[1][1]
        det = hxx * hyy - hxy * hxy
        if not (hxx < 0 and det > 0):
            break  # not in a maximum's basin: keep the last point
        step_x = -(hyy * gx - hxy * gy) / det
        step_y = -(hxx * gy - hxy * gx) / det
        x += float(np.clip(step_x, -0.5, 0.5))
        y += float(np.clip(step_y, -0.5, 0.5))
        if abs(step_x) < 1e-3 and abs(step_y) < 1e-3:
            break
    if abs(x - x0) > 1.5 or abs(y - y0) > 1.5:
        return y0, x0  # wandered off towards another peak: keep the start
    return y, x


def noise_adapted(reliability: float, cfg: RegisterConfig) -> tuple[float, float, int]:
    """Fine-stage ``(lowpass, whitening, window side)`` for frames of this reliability.

    Under heavy noise (little of a frame's variance is signal) the
    high frequencies carry noise only: the pass band narrows (down to half
    the configured cut, in three steps so that the cached filters stay
    few), whitening weakens (plain cross-correlation weights frequencies by
    their energy) and the window grows by half (precision grows with the
    pixels correlated).  Measured on LD frames of a low-contrast superalloy
    (reliability ~0.1): pairwise error 1.0 -> 0.3 px.

    Parameters
    ----------
    reliability : float
        The lower of the two frames' signal fraction of variance, 0..1.
    cfg : RegisterConfig
        The configured filter.
    """
    if reliability >= _NOISY:
        return cfg.fine_lowpass, cfg.fine_whiten, cfg.fine_window
    level = 0.75 if reliability >= _NOISY / 2 else 0.5
    return cfg.fine_lowpass * level, 0.0, cfg.fine_window * 3 // 2
