"""Spectral and image helpers of the registration stages (no state, no policy).

Block reduction, detail images, DFTs through OpenCV viewed as complex64,
spectral whitening and Gaussian band-passes, Moisan's periodic-plus-smooth
decomposition, windows, correlation peak finding with 3-point sub-pixel fits,
zero-mean NCC on an overlap and overlap geometry.  Images are ``(y, x)``;
frequencies in cycles per pixel unless named angular.
"""

from __future__ import annotations

import bisect
import functools
import math

import cv2
import numpy as np

MIN_WINDOW = 16  # smallest fine-stage window side, pixels
DETAIL_SIGMA = 1.5  # low-resolution pixels: the high-pass that makes the detail images


def reduce_blocks(image: np.ndarray, f: int) -> np.ndarray:
    """Average ``f`` x ``f`` blocks (partial last ones dropped), zero mean float32 ``(y, x)``.

    Dropping the partial blocks keeps the low-resolution grid aligned with
    the full one: low-resolution pixel ``j`` covers pixels ``f*j .. f*j+f-1``.
    """
    h, w = image.shape
    hs, ws = h // f, w // f
    img = image[: hs * f, : ws * f]
    if f & (f - 1) == 0:
        # Bilinear sampling at exactly half size averages 2 x 2 blocks, and
        # repeated halving is ~7x faster than INTER_AREA here.
        while f > 1:
            f //= 2
            img = cv2.resize(
                img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_LINEAR
            )
    else:
        img = cv2.resize(img, (ws, hs), interpolation=cv2.INTER_AREA)
    small = img.astype(np.float32)
    small -= float(small.mean())
    return small


def detail_image(small: np.ndarray) -> np.ndarray:
    """``small`` less its Gaussian blur (sigma ``DETAIL_SIGMA`` low-resolution pixels)."""
    out: np.ndarray = small - cv2.GaussianBlur(small, (0, 0), DETAIL_SIGMA)
    return out


def dft_view(img: np.ndarray) -> np.ndarray:
    """Complex spectrum of a float32 image, as a complex64 view of OpenCV's buffer."""
    out = cv2.dft(np.ascontiguousarray(img, dtype=np.float32), flags=cv2.DFT_COMPLEX_OUTPUT)
    spec: np.ndarray = out.view(np.complex64)[..., 0]
    return spec


def dft(img: np.ndarray) -> np.ndarray:
    # A fresh complex array: numpy's arithmetic and matrix products on
    # OpenCV's buffer viewed as complex run up to three times slower.
    return dft_view(img).copy()


def idft(spec: np.ndarray) -> np.ndarray:
    """Real inverse transform of a (Hermitian) complex spectrum, scaled."""
    packed = np.ascontiguousarray(spec, dtype=np.complex64)[..., None].view(np.float32)
    out: np.ndarray = cv2.idft(packed, flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE)
    return out


def whiten(spec: np.ndarray, power: float) -> np.ndarray:
    """``spec / |spec| ** power`` in place (complex64), with a floor keeping empty bins at zero."""
    if power <= 0:
        return spec
    # |z|^2 from the interleaved float pairs, then one power: twice as fast
    # as abs() and a division.
    parts = spec.view(np.float32)
    mag2 = np.square(parts[..., 0::2])
    mag2 += np.square(parts[..., 1::2])
    mag2 += np.float32(1e-12 * float(mag2.mean()) + 1e-30)
    if power == 1.0:
        scale = np.sqrt(mag2, out=mag2)
        np.reciprocal(scale, out=scale)
    elif power == 0.5:
        scale = np.sqrt(np.sqrt(mag2, out=mag2), out=mag2)
        np.reciprocal(scale, out=scale)
    else:
        scale = np.power(mag2, np.float32(-0.5 * power), out=mag2)
    spec *= scale
    return spec


def bandpass(f2: np.ndarray, low: float, high: float) -> np.ndarray:
    """Gaussian low-pass ``low`` times Gaussian high-pass ``high`` (sigmas, cycles per px).

    ``f2`` is the squared radial frequency in cycles per pixel.
    """
    weight = np.exp(-f2 / (2 * low * low))
    if high > 0:
        weight *= 1.0 - np.exp(-f2 / (2 * high * high))
    out: np.ndarray = weight
    return out


def periodic_spectrum(img: np.ndarray, copy: bool = True) -> np.ndarray:
    """Spectrum of the periodic component of ``img`` (Moisan's periodic + smooth split).

    The smooth component carries the jumps between opposite edges, which a
    DFT sees as sharp edges (a cross of false energy through the origin);
    removing it spares a window, which would silence the frame borders where
    a narrow overlap lies.  The boundary image is non-zero on its border
    only, so its spectrum comes from two 1-D transforms.  ``copy=False``
    returns a view of OpenCV's buffer (slower in matrix products).
    """
    h, w = img.shape
    gy, gx = smooth_factors(h, w)
    spec = dft(img) if copy else dft_view(img)
    spec -= np.fft.fft(img[-1, :] - img[0, :]).astype(np.complex64)[None, :] * gy
    spec -= np.fft.fft(img[:, -1] - img[:, 0]).astype(np.complex64)[:, None] * gx
    return spec


@functools.lru_cache(maxsize=256)
def smooth_factors(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Spectra of the smooth component per unit row / column jump (complex64 ``(h, w)``).

    With ``D = 2 cos(ky) + 2 cos(kx) - 4`` (the discrete Laplacian), the
    smooth component of jumps ``r`` (last row minus first) and ``c`` (last
    column minus first) has spectrum ``R(kx) gy + C(ky) gx`` with
    ``gy = (1 - e^{i ky}) / D`` and ``gx = (1 - e^{i kx}) / D``.
    """
    ky = 2 * np.pi * np.fft.fftfreq(h)[:, None]
    kx = 2 * np.pi * np.fft.fftfreq(w)[None, :]
    denom = 2 * np.cos(kx) + 2 * np.cos(ky) - 4
    denom[0, 0] = 1.0
    gy = (1 - np.exp(1j * ky)) / denom
    gx = (1 - np.exp(1j * kx)) / denom
    gy[0, 0] = gx[0, 0] = 0
    return gy.astype(np.complex64), gx.astype(np.complex64)


def tukey(n: int, taper: float = 0.25) -> np.ndarray:
    """Tukey window of ``n`` points, cosine tapers over ``taper / 2`` at each end."""
    x = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    w = np.ones(n)
    edge = taper / 2
    lo, hi = x < edge, x > 1 - edge
    w[lo] = 0.5 * (1 - np.cos(np.pi * x[lo] / edge))
    w[hi] = 0.5 * (1 - np.cos(np.pi * (1 - x[hi]) / edge))
    return w


@functools.lru_cache(maxsize=32)
def window(shape: tuple[int, int], kind: str) -> np.ndarray:
    """A ``hann`` or ``tukey`` window of ``shape`` ``(h, w)``, float32, cached (read-only)."""
    win: np.ndarray
    if kind == "tukey":
        win = np.outer(tukey(shape[0]), tukey(shape[1])).astype(np.float32)
    else:
        win = np.asarray(cv2.createHanningWindow((shape[1], shape[0]), cv2.CV_32F))
    win.flags.writeable = False
    return win


def local_maxima(surface: np.ndarray, count: int) -> list[tuple[int, int]]:
    """Up to ``count`` strongest 3 x 3 local maxima ``(y, x)`` of ``surface``, strongest first."""
    dil = cv2.dilate(surface, np.ones((3, 3), np.uint8))
    idx = np.flatnonzero((surface >= dil) & np.isfinite(surface))
    if idx.size == 0:
        return []
    vals = surface.ravel()[idx]
    if idx.size > count:
        part = np.argpartition(vals, -count)[-count:]
        idx, vals = idx[part], vals[part]
    order = np.argsort(vals)[::-1]
    w = surface.shape[1]
    return [(int(i) // w, int(i) % w) for i in idx[order]]


def parabola_offset(surface: np.ndarray, py: int, px: int) -> tuple[float, float]:
    """3-point parabola vertex ``(oy, ox)`` per axis around ``(py, px)``, wrapping, within +-0.5."""
    h, w = surface.shape
    c = float(surface[py, px])

    def vertex(m: float, p: float) -> float:
        denom = m - 2 * c + p
        if not (math.isfinite(denom) and denom < 0):
            return 0.0
        return float(np.clip(0.5 * (m - p) / denom, -0.5, 0.5))

    oy = vertex(float(surface[(py - 1) % h, px]), float(surface[(py + 1) % h, px]))
    ox = vertex(float(surface[py, (px - 1) % w]), float(surface[py, (px + 1) % w]))
    return oy, ox


def gauss_offset(surface: np.ndarray, py: int, px: int) -> tuple[float, float]:
    """3-point Gaussian (log-parabola) vertex per axis; the parabola's where values are <= 0."""
    h, w = surface.shape
    c = float(surface[py, px])
    fallback = parabola_offset(surface, py, px)

    def vertex(m: float, p: float, fb: float) -> float:
        if min(m, c, p) <= 0:
            return fb
        lm, lc, lp = math.log(m), math.log(c), math.log(p)
        denom = lm - 2 * lc + lp
        if denom >= 0:
            return fb
        return float(np.clip(0.5 * (lm - lp) / denom, -0.5, 0.5))

    oy = vertex(float(surface[(py - 1) % h, px]), float(surface[(py + 1) % h, px]), fallback[0])
    ox = vertex(float(surface[py, (px - 1) % w]), float(surface[py, (px + 1) % w]), fallback[1])
    return oy, ox


def ncc_with_spread(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Zero-mean NCC of same-shape ``a`` and ``b``, with their standard deviations.

    Returns ``(ncc, std_a, std_b)``; the NCC is 0 when either is flat.  One
    pass of three OpenCV reductions, the images never copied.
    """
    ma, sa = (float(v[0, 0]) for v in cv2.meanStdDev(a))
    mb, sb = (float(v[0, 0]) for v in cv2.meanStdDev(b))
    if sa < 1e-3 or sb < 1e-3:
        return 0.0, sa, sb
    # mean(a b) = (mean(a^2) + mean(b^2) - mean((a - b)^2)) / 2
    squares = sa * sa + ma * ma + sb * sb + mb * mb
    mean_ab = 0.5 * (squares - cv2.norm(a, b, cv2.NORM_L2SQR) / a.size)
    return min(max((mean_ab - ma * mb) / (sa * sb), -1.0), 1.0), sa, sb


def ncc(a: np.ndarray, b: np.ndarray, dx: int, dy: int) -> float:
    """Zero-mean NCC of ``a`` and ``b`` on their overlap when ``b`` sits at ``(dx, dy)`` in ``a``.

    ``b[y, x]`` is compared with ``a[y + dy, x + dx]``; shapes may differ.
    The cross term comes from ``|a|^2 + |b|^2 - |a - b|^2``, so the overlap
    is read by three OpenCV reductions and never copied.
    """
    ha, wa = a.shape
    hb, wb = b.shape
    x0, x1 = max(0, dx), min(wa, dx + wb)
    y0, y1 = max(0, dy), min(ha, dy + hb)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return 0.0
    pa = a[y0:y1, x0:x1]
    pb = b[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
    return ncc_with_spread(pa, pb)[0]


def overlap(dx: float, dy: float, shape_a: tuple[int, int], shape_b: tuple[int, int]) -> float:
    """Overlap area of ``b`` at ``(dx, dy)`` in ``a``, as a fraction of the smaller area."""
    (ha, wa), (hb, wb) = shape_a, shape_b
    ox = max(0.0, min(wa, dx + wb) - max(0.0, dx))
    oy = max(0.0, min(ha, dy + hb) - max(0.0, dy))
    return float(ox * oy / min(ha * wa, hb * wb))


def window_size(ow: int, oh: int, side: int) -> tuple[int, int]:
    """Fine window ``(width, height)`` inside an ``ow`` x ``oh`` overlap, fast DFT sizes.

    At most ``side`` x ``side`` pixels of area; a narrow overlap strip gets
    a longer window (up to ``4 * side``), since precision grows with the
    pixels correlated.
    """
    budget = side * side
    w, h = min(ow, side), min(oh, side)
    if w < side:
        h = min(oh, max(side, budget // max(w, 1)), 4 * side)
    elif h < side:
        w = min(ow, max(side, budget // max(h, 1)), 4 * side)
    return fft_size_at_most(w), fft_size_at_most(h)


_SMOOTH_SIZES = sorted(
    {2**i * 3**j * 5**k for i in range(1, 14) for j in range(8) for k in range(6)}
)


def fft_size_at_most(n: int) -> int:
    """Largest even 5-smooth size <= ``n`` (a fast DFT size), or ``n`` below 16."""
    if n < MIN_WINDOW:
        return n
    # bisect on the list: np.searchsorted converts it to an array on every call.
    return _SMOOTH_SIZES[bisect.bisect_right(_SMOOTH_SIZES, n) - 1]
