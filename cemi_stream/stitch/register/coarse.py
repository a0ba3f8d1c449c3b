"""Coarse stage: candidate shifts from phase correlation at reduced resolution.

Phase correlation over the whole (reduced) frames, of their periodic
components (edge artefacts removed without a window, so a narrow overlap at
a frame border keeps its full weight), band-pass filtered (shot noise at
high and illumination at very low frequencies).  Several correlation peaks,
and the wrap-around aliases of each, become candidates ranked by the NCC of
the frames' detail images on their actual overlap, less a handicap for
lying far from a predicted shift.  Shifts are full-resolution pixels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .spectral import (
    bandpass,
    dft,
    idft,
    local_maxima,
    ncc,
    overlap,
    parabola_offset,
    periodic_spectrum,
    whiten,
    window,
)
from .types import Prepared, RegisterConfig

_SURE = 0.5  # detail NCC of a clear match (unrelated frames: <= 0.19 measured)
_DOMINANT = 0.5  # peaks below this fraction of the highest cannot rival a clear match


@dataclass(slots=True)
class Candidate:
    """One coarse answer."""

    dx: float  # full-resolution pixels
    dy: float
    ncc: float  # low-resolution NCC of the detail images on the overlap
    rank: float  # ncc, less the prior's handicap


def coarse_candidates(
    ref: Prepared,
    mov: Prepared,
    predicted: tuple[float, float] | None,
    search_px: float | None,
    cfg: RegisterConfig,
) -> list[Candidate]:
    """Candidate shifts in full-resolution pixels, best first."""
    factor = min(ref.factor, mov.factor)
    a, b = ref.small_at(factor)[1], mov.small_at(factor)[1]
    (ha, wa), (hb, wb) = a.shape, b.shape
    shape = (max(ha, hb), max(wa, wb))
    cross = coarse_spectrum(ref, factor, shape, cfg) * np.conj(
        coarse_spectrum(mov, factor, shape, cfg)
    )
    surface = idft(cross)
    H, W = shape
    if predicted is not None and search_px is not None:
        slack = search_px / factor + 1.5
        px, py = predicted[0] / factor, predicted[1] / factor
        allow_y = _alias_mask(H, py, slack, -hb, ha)
        allow_x = _alias_mask(W, px, slack, -wb, wa)
        surface[~allow_y, :] = -np.inf
        surface[:, ~allow_x] = -np.inf
    diag = math.hypot(max(ref.shape[1], mov.shape[1]), max(ref.shape[0], mov.shape[0]))
    seen: set[tuple[int, int]] = set()
    out: list[Candidate] = []

    def consider(dx_s: int, dy_s: int, dx: float, dy: float) -> bool:
        if (dx_s, dy_s) in seen:
            return False
        seen.add((dx_s, dy_s))
        if overlap(dx, dy, ref.shape, mov.shape) < cfg.min_overlap:
            return False
        rank = 0.0
        if predicted is not None:
            dist = math.hypot(dx - predicted[0], dy - predicted[1])
            if search_px is not None and dist > search_px + 1.5 * factor:
                return False
            rank = -cfg.prior_weight * min(dist / (0.5 * diag), 1.0)
        agree = ncc(a, b, dx_s, dy_s)
        out.append(Candidate(dx, dy, agree, agree + rank))
        return True

    n_peaks = 0
    peaks = local_maxima(surface, 4 * cfg.peaks)
    for py_i, px_i in peaks:
        if (
            out
            and max(c.ncc for c in out) >= _SURE
            and (surface[py_i, px_i] < _DOMINANT * surface[peaks[0]])
        ):
            break  # a clear match already, and no peak left that could rival it
        oy, ox = parabola_offset(surface, py_i, px_i)
        found = False
        for dy_s in (py_i, py_i - H):
            for dx_s in (px_i, px_i - W):
                found |= consider(dx_s, dy_s, (dx_s + ox) * factor, (dy_s + oy) * factor)
        n_peaks += found
        if n_peaks == cfg.peaks:
            break
    if predicted is not None:
        # The prediction itself competes: a small overlap can hide its peak
        # among noise peaks, and the fine stage reaches a few pixels round it.
        dx_s, dy_s = round(predicted[0] / factor), round(predicted[1] / factor)
        consider(dx_s, dy_s, predicted[0], predicted[1])
    out.sort(key=lambda c: c.rank, reverse=True)
    return out


def coarse_spectrum(
    prep: Prepared, factor: int, shape: tuple[int, int], cfg: RegisterConfig
) -> np.ndarray:
    """Whitened, filtered spectrum of ``prep`` reduced ``factor`` times, ``shape`` transform.

    Stored as ``phase * sqrt(weight)``, so that the product of two
    frames' spectra is directly the filtered cross-power spectrum.
    """
    key = (factor, shape[0], shape[1])
    spec = prep.spectra.get(key)
    if spec is not None:
        return spec
    small = prep.small_at(factor)[0]
    if small.shape == shape:
        spec = periodic_spectrum(small, copy=False)
    else:
        # Padding (frames of different sizes) needs a window: zeros around
        # a periodic component would make new edges.
        padded = np.zeros(shape, np.float32)
        padded[: small.shape[0], : small.shape[1]] = small * window(small.shape, "hann")
        spec = dft(padded)
    spec = whiten(spec, cfg.coarse_whiten)
    spec *= _coarse_weight(shape, factor, cfg.coarse_lowpass, cfg.highpass)
    prep.spectra[key] = spec
    return spec


@functools.lru_cache(maxsize=16)
def _coarse_weight(
    shape: tuple[int, int], factor: int, lowpass: float, highpass: float
) -> np.ndarray:
    """Square root of the coarse band-pass weight (one factor per frame), cached."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    weight = np.sqrt(bandpass(fx**2 + fy**2, lowpass, highpass * factor)).astype(np.float32)
    weight.flags.writeable = False
    return weight


def _alias_mask(n: int, centre: float, slack: float, lo: int, hi: int) -> np.ndarray:
    """Indices ``0..n-1`` with an alias ``i + k n`` in ``centre +- slack`` and in ``(lo, hi)``."""
    idx = np.arange(n, dtype=np.float64)
    mask = np.zeros(n, bool)
    k_lo = math.floor((min(centre - slack, lo) - n) / n)
    k_hi = math.ceil((max(centre + slack, hi) + n) / n)
    for k in range(k_lo, k_hi + 1):
        v = idx + k * n
        mask |= (np.abs(v - centre) <= slack) & (v > lo) & (v < hi)
    return mask
