"""Measures of one lamellar region: period and direction, width and count across the lamellae.

What :func:`~cemi_stream.analysis.lamellae.lamellar_stats` measures per region:
the period and direction from the region's power spectrum
(``_region_spectrum``), the width and the count of dark lamellae from the
band-passed, demodulated profile along the segment across the lamellae
through its centroid (``_region_profile``).  The definitions are in
:mod:`cemi_stream.analysis.lamellae`.

Conventions as in :mod:`cemi_stream.analysis.lamellae`: arrays are ``(y, x)``,
lengths are pixels of the tile, angles are radians in ``[-pi/2, pi/2)`` from +x
towards +y (down) and give the direction across the lamellae (their normal).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import scipy.fft

from .lamellae_spectrum import MIN_PERIOD_PX

#: How far the segment across a region may run past the region's outline, px (the outline
#: of :func:`~.lamellae.lamellar_mask` follows its 64-px windows, refined by only 8 px).
PROFILE_REACH_PX = 32.0


_FREQ: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]] = {}


def _frequency_tables(
    ph: int, pw: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """``fy (ph, 1)``, ``fx (1, m)``, ``|k|^2`` and the structure-tensor weights
    ``kx^2, ky^2, kx ky`` (halved at ``kx = 0``) of an ``rfft2`` of ``ph x pw`` (cached)."""
    key = (ph, pw)
    if key not in _FREQ:
        if len(_FREQ) > 64:
            _FREQ.clear()
        fy = np.fft.fftfreq(ph).astype(np.float32)[:, None]
        fx = np.fft.rfftfreq(pw).astype(np.float32)[None, :]
        half = np.where(fx == 0, 0.5, 1.0).astype(np.float32)
        r2 = fy * fy + fx * fx
        tw = [np.ascontiguousarray(np.broadcast_to(a, r2.shape), dtype=np.float32)
              for a in (fx * fx * half, fy * fy * half, fx * fy * half)]  # fmt: skip
        _FREQ[key] = (fy, fx, r2, tw)
    return _FREQ[key]


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
    fy, fx, r2, tensor_w = _frequency_tables(ph, pw)
    pb = power * ((r2 >= 1.0 / max_p**2) & (r2 <= 1.0 / MIN_PERIOD_PX**2))
    if not np.any(pb > 0):
        return math.nan, math.nan
    jxx, jyy, jxy = (float(np.vdot(pb, tw)) for tw in tensor_w)
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

    # Gradient-weighted (|k|^2) like the windows: large features and shading do not win.
    iy, ix = np.unravel_index(int(np.argmax(pb * r2)), pb.shape)
    cy, cx, s = centroid(int(iy), int(ix))
    k = math.hypot(cy, cx)
    rk = np.sqrt(r2)
    nb = (2 * hy + 1) * (2 * hx + 1)
    # Harmonics (thin lines, square waves) can outweigh the fundamental there: prefer the
    # largest sub-harmonic k / d that is strong (raw power >= 0.35 of the peak's) and is a
    # peak in its direction (>= 4 x the mean power of its ring), not isotropic texture.
    for d in (5, 3, 2):
        if k / d < 1.0 / max_p:
            continue
        jy, jx = round(cy / d * ph), round(cx / d * pw)
        if jx < 0:
            jy, jx = -jy, -jx
        cy2, cx2, s2 = centroid(jy % ph, jx)
        ring = np.abs(rk - k / d) <= 1.5 / min(ph, pw)
        if s2 >= 0.35 * s and s2 >= 4.0 * nb * float(power[ring].mean()):
            k = math.hypot(cy2, cx2)
            break
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


def _ends(ok: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` samples at each end of every run of ``ok`` (what a dilation by ``n`` added)."""
    out = np.zeros_like(ok)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], ok.astype(np.int8), [0]))))
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        if a > 0:
            out[a : a + n] = True
        if b < ok.size:
            out[max(a, b - n) : b] = True
    return out


def _dilate1d(x: np.ndarray, r: int) -> np.ndarray:
    """``out[i] = any(x[i - r : i + r + 1])``, for any length (``np.convolve(..., "same")``
    returns the kernel's length when the kernel is the longer)."""
    c = np.concatenate(([0], np.cumsum(x.astype(np.int64))))
    i = np.arange(x.size)
    return (c[np.minimum(i + r + 1, x.size)] - c[np.maximum(i - r, 0)]) > 0


def _gauss1d(x: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    xp = np.pad(x, r, mode="reflect" if x.size > r else "edge")
    return np.convolve(xp, k / k.sum(), mode="valid")


def _region_profile(
    img: np.ndarray, labels: np.ndarray, label: int, theta: float, period: float, cy: float,
    cx: float, t_range: tuple[float, float], reach: float = PROFILE_REACH_PX,
) -> tuple[float, int]:  # fmt: skip
    """Width (px) and dark-lamella count along the segment across the lamellae through ``(cy, cx)``.

    The profile along the normal (averaged over a few parallel lines) is
    band-passed at ``period`` and demodulated (its local amplitude at that
    period, smoothed over one period).  The segment is the run of samples
    around the centroid where that amplitude is at least midway between its
    median over the region's samples and its median outside (0 when there are
    too few samples outside); it may extend up to ``reach`` px beyond the region
    (whose outline is only as fine as the analysis windows).  Its length is the
    width; the count is the dark runs of the band-passed profile within it.
    ``t_range`` is the region's extent along the normal from ``(cy, cx)``, px.
    """
    c, sn = math.cos(theta), math.sin(theta)
    h, w = img.shape
    step = float(np.clip(period / 8.0, 0.5, 2.0))  # px between samples
    margin = reach + 3.0 * period
    t = np.arange(t_range[0] - margin, t_range[1] + margin, step, dtype=np.float32)
    xf, yf = cx + t * c, cy + t * sn
    on = (xf >= 0) & (xf <= w - 1) & (yf >= 0) & (yf <= h - 1)
    if not on.any():
        return math.nan, 0
    t = t[on]
    xi, yi = np.rint(xf[on]).astype(int), np.rint(yf[on]).astype(int)
    inside = labels[yi, xi] == label
    if not inside.any():
        return math.nan, 0
    # Along the normal (c, sn); parallel lines offset along the lamellae (-sn, c), averaged
    # over two periods either side (texture that is not lamellae of this direction averages out).
    span = float(np.clip(2.0 * period, 4.0, 32.0))
    offs = np.linspace(-span, span, int(np.clip(round(span), 3, 24)) | 1, dtype=np.float32)
    mx = (cx + t[None, :] * c - offs[:, None] * sn).astype(np.float32)
    my = (cy + t[None, :] * sn + offs[:, None] * c).astype(np.float32)
    prof = cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT).mean(axis=0)
    ps = period / step  # the period in samples
    band = _gauss1d(prof, max(ps / 8.0, 1.2)) - _gauss1d(prof, ps)
    carrier = np.exp(-2j * np.pi * np.arange(band.size) / ps)
    z = band * carrier
    es = 0.5 * ps
    env = 2.0 * np.abs(_gauss1d(z.real, es) + 1j * _gauss1d(z.imag, es))
    # Samples allowed: the region's, widened by ``reach`` along the line.
    r = round(reach / step)
    allowed = _dilate1d(inside, r)
    ref = float(np.median(env[inside]))
    if ref <= 0:
        return math.nan, 0
    out = ~allowed
    floor = float(np.median(env[out])) if out.sum() > 2 * ps else 0.0
    ok = allowed & (env >= 0.5 * (ref + min(floor, ref)))
    # Bridge dips shorter than two periods (noise), not the region's end.
    gap = max(1, round(2 * ps))
    grown = _dilate1d(ok, gap)
    ok = allowed & grown & ~_ends(grown, gap)  # a closing
    # The run of ``ok`` holding the inside sample nearest the centroid.
    centre = int(np.flatnonzero(inside)[np.argmin(np.abs(t[inside]))])
    if not ok[centre]:
        return math.nan, 0
    lo = centre - int(np.argmin(ok[centre::-1])) + 1 if not ok[: centre + 1].all() else 0
    hi = centre + int(np.argmin(ok[centre:])) if not ok[centre:].all() else ok.size
    seg = band[lo:hi]
    return (hi - lo) * step, _dark_runs(seg - float(seg.mean()))
