"""Pairwise translation between overlapping SEM frames, to sub-pixel accuracy.

The live stitcher's measurement: given two frames that overlap (by as little
as ~5 %), how far apart are they?  The estimate is built in two stages:

1. **coarse**, at reduced resolution over the whole frames: phase correlation
   of the periodic components of both frames (edge artefacts removed without
   a window, so even a narrow overlap at a frame edge keeps its full weight),
   band-pass filtered (shot noise at high and illumination at very low
   frequencies), several correlation peaks and the wrap-around aliases of
   each checked by zero-mean NCC on their actual overlap;
2. **fine**, at full resolution on the overlap only: a window of bounded size
   cut from the overlap at the coarse shift, phase-correlated the same way,
   the peak located to sub-pixel precision by maximising the band-limited
   correlation surface itself (Newton steps on its DFT interpolation).

The answer is scored by zero-mean NCC on the full-resolution overlap; an
implausible one (too little overlap, a low score, outside the search
region) comes back with ``ok=False`` rather than as a wrong translation.

Convention (as in :mod:`cemi_stream.keyframes`): ``(dx, dy)`` is the top-left
corner of ``mov`` minus that of ``ref`` in shared (mosaic) pixels, so
``mov[y, x]`` shows what ``ref[y + dy, x + dx]`` shows; images are ``(y, x)``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from cemi_stream.errors import CemiError, ConfigError

log = logging.getLogger(__name__)

Subpixel = Literal["dft", "parabola", "gauss"]
Edges = Literal["periodic", "hann", "tukey", "none"]

_MIN_SIDE = 16  # smallest frame side accepted, pixels
_MIN_SMALL_SIDE = 16  # smallest low-resolution side the coarse stage works on
_FLAT_STD = 0.25  # grey levels: below this a frame has no usable contrast
_NEWTON_STEPS = 4


class RegistrationError(CemiError):
    """A frame cannot be registered (wrong type, shape or size)."""


@dataclass(frozen=True, slots=True)
class RegisterConfig:
    """Settings of the translation estimator.

    Attributes
    ----------
    downsample : int
        Resolution divisor of the coarse stage (4: 1024 x 768 -> 256 x 192).
    min_score : float
        Zero-mean NCC (full resolution, on the overlap) below which a result
        is not trusted (``ok=False``).
    search_px : float or None
        Default bound on the distance between the answer and the predicted
        shift, pixels; None searches every shift with enough overlap.
    min_overlap : float
        Smallest overlap accepted, as a fraction of the smaller frame's area.
    peaks : int
        Coarse correlation peaks checked by NCC (each with its aliases).
    fine_window : int
        Largest side of the full-resolution window of the fine stage, pixels
        (bounds its cost whatever the overlap).
    coarse_lowpass : float
        Gaussian high-frequency cut of the coarse stage, sigma in cycles per
        low-resolution pixel.
    fine_lowpass : float
        Gaussian high-frequency cut of the fine stage, sigma in cycles per
        full-resolution pixel (where shot noise dominates).
    highpass : float
        Gaussian low-frequency cut (illumination, brightness gradients),
        sigma in cycles per full-resolution pixel.
    coarse_whiten, fine_whiten : float
        Exponent of the spectral normalisation of each stage: 1 is pure
        phase correlation (sharpest peak, robust to repeated structure), 0
        plain cross-correlation (weights frequencies by their energy, more
        precise under noise).
    subpixel : {"dft", "parabola", "gauss"}
        Sub-pixel peak location: maximise the DFT-interpolated surface, or a
        3-point parabola / Gaussian fit per axis.
    edges : {"periodic", "hann", "tukey", "none"}
        How frame edges are kept out of the spectra: periodic-plus-smooth
        decomposition (no window) or a window.
    prior_weight : float
        NCC handicap of a coarse candidate lying half a frame diagonal (or
        more) from the predicted shift: a tie-break, not a constraint.
    """

    downsample: int = 4
    min_score: float = 0.3
    search_px: float | None = None
    min_overlap: float = 0.05
    peaks: int = 4
    fine_window: int = 256
    coarse_lowpass: float = 0.3
    fine_lowpass: float = 0.07
    highpass: float = 0.005
    coarse_whiten: float = 1.0
    fine_whiten: float = 0.5
    subpixel: Subpixel = "dft"
    edges: Edges = "periodic"
    prior_weight: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.downsample, bool) or not isinstance(self.downsample, int):
            raise ConfigError(f"register.downsample: must be an integer, not {self.downsample!r}")
        if not 1 <= self.downsample <= 32:
            raise ConfigError(f"register.downsample: {self.downsample} is outside 1..32")
        if not -1.0 <= self.min_score <= 1.0:
            raise ConfigError(f"register.min_score: {self.min_score} is outside -1..1")
        if self.search_px is not None and not self.search_px >= 0:
            raise ConfigError(f"register.search_px: {self.search_px} must be >= 0 or None")
        if not 0.0 < self.min_overlap <= 1.0:
            raise ConfigError(f"register.min_overlap: {self.min_overlap} is outside (0, 1]")
        if not 1 <= self.peaks <= 64:
            raise ConfigError(f"register.peaks: {self.peaks} is outside 1..64")
        if not 16 <= self.fine_window <= 4096:
            raise ConfigError(f"register.fine_window: {self.fine_window} is outside 16..4096")
        for name in ("coarse_lowpass", "fine_lowpass"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"register.{name}: {value} is outside (0, 1]")
        if not 0.0 <= self.highpass < 0.5:
            raise ConfigError(f"register.highpass: {self.highpass} is outside [0, 0.5)")
        for name in ("coarse_whiten", "fine_whiten"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"register.{name}: {value} is outside [0, 1]")
        if self.subpixel not in ("dft", "parabola", "gauss"):
            raise ConfigError(f"register.subpixel: unknown method {self.subpixel!r}")
        if self.edges not in ("periodic", "hann", "tukey", "none"):
            raise ConfigError(f"register.edges: unknown method {self.edges!r}")
        if not self.prior_weight >= 0.0:
            raise ConfigError(f"register.prior_weight: {self.prior_weight} must be >= 0")


@dataclass(frozen=True, slots=True)
class Shift:
    """A translation estimate.

    Attributes
    ----------
    dx, dy : float
        Top-left of ``mov`` minus top-left of ``ref``, pixels (x right, y
        down): ``mov[y, x]`` shows ``ref[y + dy, x + dx]``.  When nothing was
        found, the predicted shift (or 0, 0).
    score : float
        Zero-mean NCC of the two frames on their overlap at this shift, full
        resolution (0 when nothing was found).
    ok : bool
        True when the estimate can be trusted: score >= ``min_score``, overlap
        >= ``min_overlap`` and inside the search region.
    overlap : float
        Overlap area as a fraction of the smaller frame's area.
    """

    dx: float
    dy: float
    score: float
    ok: bool
    overlap: float


@dataclass(eq=False, slots=True)
class Prepared:
    """One frame with its per-frame work done (reused by every pair it is in).

    Attributes
    ----------
    image : ndarray of uint8
        The full-resolution frame ``(y, x)`` (a read-only view, not a copy).
    small : ndarray of float32
        The frame reduced ``factor`` times by area averaging, zero mean.
    factor : int
        Resolution divisor of ``small``.
    flat : bool
        True when the frame has no usable contrast (blank).
    """

    image: np.ndarray
    small: np.ndarray
    factor: int
    flat: bool
    _spectra: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the full-resolution frame, pixels."""
        h, w = self.image.shape
        return int(h), int(w)


@dataclass(slots=True)
class _Candidate:
    dx: float  # full-resolution pixels
    dy: float
    ncc: float  # low-resolution NCC
    rank: float


class Registrar:
    """Estimates the translation between overlapping frames (see the module docstring).

    Parameters
    ----------
    config : RegisterConfig
        Resolution, thresholds, filters and methods.

    Notes
    -----
    Not thread-safe: filters and windows are cached per size.  Use one
    instance per thread.
    """

    def __init__(self, config: RegisterConfig = RegisterConfig()) -> None:  # noqa: B008
        if not isinstance(config, RegisterConfig):
            raise ConfigError(f"register: config must be a RegisterConfig, not {config!r}")
        self.config = config
        self._filters: dict[tuple[str, int, int], np.ndarray] = {}

    # -- public ------------------------------------------------------------

    def prepare(self, image: np.ndarray) -> Prepared:
        """Do the per-frame work once: reduce the frame and compute its spectrum.

        Parameters
        ----------
        image : ndarray of uint8
            The frame, 2-D ``(y, x)``, at least 16 pixels on each side.

        Returns
        -------
        Prepared
            Pass it to :meth:`register` as often as needed.

        Raises
        ------
        RegistrationError
            When ``image`` is not a 2-D uint8 array of sufficient size.
        """
        if not isinstance(image, np.ndarray) or image.ndim != 2 or image.dtype != np.uint8:
            what = (
                f"{image.dtype} array of shape {image.shape}"
                if isinstance(image, np.ndarray)
                else type(image).__name__
            )
            raise RegistrationError(f"register: frames must be 2-D uint8 arrays, not a {what}")
        h, w = image.shape
        if min(h, w) < _MIN_SIDE:
            raise RegistrationError(
                f"register: frame {w}x{h} is too small (at least {_MIN_SIDE} px per side)"
            )
        view = image.view()
        view.flags.writeable = False
        f = max(1, min(self.config.downsample, min(h, w) // _MIN_SMALL_SIDE))
        small = _reduce(image, f)
        flat = float(small.std()) < _FLAT_STD / f
        prep = Prepared(view, small, f, flat)
        if not flat:
            self._spectrum(prep, small.shape)
        return prep

    def register(
        self,
        ref: Prepared,
        mov: Prepared,
        predicted: tuple[float, float] | None = None,
        search_px: float | None = None,
    ) -> Shift:
        """Translation of ``mov`` relative to ``ref``.

        Parameters
        ----------
        ref, mov : Prepared
            Frames from :meth:`prepare` (any shapes).
        predicted : (dx, dy) or None
            Expected shift in pixels (motion model); breaks ties between
            similar candidates and centres the search region.
        search_px : float or None
            Largest distance in pixels between the answer and ``predicted``;
            None uses the configured default (None there: no bound).
            Ignored without ``predicted``.

        Returns
        -------
        Shift
            ``ok=False`` when no trustworthy translation was found.
        """
        cfg = self.config
        if search_px is None:
            search_px = cfg.search_px
        if predicted is not None:
            predicted = (float(predicted[0]), float(predicted[1]))
            if not all(math.isfinite(v) for v in predicted):
                raise RegistrationError(f"register: predicted shift {predicted} is not finite")
        if predicted is None:
            search_px = None
        if ref.flat or mov.flat:
            log.debug("register: blank frame, nothing to match")
            return self._failed(ref, mov, predicted)
        factor = min(ref.factor, mov.factor)
        candidates = self._coarse(ref, mov, factor, predicted, search_px)
        if not candidates:
            log.debug("register: no coarse candidate with enough overlap")
            return self._failed(ref, mov, predicted)
        best: Shift | None = None
        top = candidates[0].rank
        for cand in candidates[:2]:
            # A close runner-up (periodic lamellae) is settled at full resolution.
            if cand is not candidates[0] and top - cand.rank > 0.1:
                break
            shift = self._fine(ref, mov, cand.dx, cand.dy, predicted, search_px)
            if best is None or shift.score > best.score:
                best = shift
        assert best is not None  # noqa: S101
        return best

    # -- coarse stage --------------------------------------------------------

    def _coarse(
        self,
        ref: Prepared,
        mov: Prepared,
        factor: int,
        predicted: tuple[float, float] | None,
        search_px: float | None,
    ) -> list[_Candidate]:
        """Candidate shifts (full-resolution pixels), best first."""
        cfg = self.config
        a = _small_at(ref, factor)
        b = _small_at(mov, factor)
        (ha, wa), (hb, wb) = a.shape, b.shape
        shape = (max(ha, hb), max(wa, wb))
        sa = self._spectrum(ref, shape, factor)
        sb = self._spectrum(mov, shape, factor)
        bp = self._bandpass(shape, cfg.coarse_lowpass, cfg.highpass * factor, "coarse")
        surface = _idft(_cross_power(sa, sb, bp, cfg.coarse_whiten))
        H, W = shape
        if predicted is not None and search_px is not None:
            slack = search_px / factor + 1.5
            px, py = predicted[0] / factor, predicted[1] / factor
            allow_y = _alias_mask(H, py, slack, -hb, ha)
            allow_x = _alias_mask(W, px, slack, -wb, wa)
            surface = np.where(allow_y[:, None] & allow_x[None, :], surface, -np.inf)
        peaks = _local_maxima(surface, 4 * cfg.peaks)
        hf, wf = ref.shape
        hm, wm = mov.shape
        diag = math.hypot(max(wf, wm), max(hf, hm))
        seen: set[tuple[int, int]] = set()
        out: list[_Candidate] = []
        n_peaks = 0
        for py_i, px_i in peaks:
            if n_peaks == cfg.peaks:
                break
            oy, ox = _parabola_offset(surface, py_i, px_i)
            any_alias = False
            for dy_s in (py_i, py_i - H):
                for dx_s in (px_i, px_i - W):
                    if (dx_s, dy_s) in seen:
                        continue
                    seen.add((dx_s, dy_s))
                    dx = (dx_s + ox) * factor
                    dy = (dy_s + oy) * factor
                    if _overlap(dx, dy, ref.shape, mov.shape) < cfg.min_overlap:
                        continue
                    dist = math.inf
                    if predicted is not None:
                        dist = math.hypot(dx - predicted[0], dy - predicted[1])
                        if search_px is not None and dist > search_px + 1.5 * factor:
                            continue
                    ncc = _ncc(a, b, dx_s, dy_s)
                    rank = ncc
                    if predicted is not None:
                        rank -= cfg.prior_weight * min(dist / (0.5 * diag), 1.0)
                    out.append(_Candidate(dx, dy, ncc, rank))
                    any_alias = True
            n_peaks += any_alias
        out.sort(key=lambda c: c.rank, reverse=True)
        return out

    def _spectrum(
        self, prep: Prepared, shape: tuple[int, int], factor: int | None = None
    ) -> np.ndarray:
        """Edge-treated spectrum of ``prep``'s low-resolution image padded to ``shape``."""
        f = prep.factor if factor is None else factor
        key = (f, shape[0], shape[1]) if f != prep.factor else shape
        cached = prep._spectra.get(key)  # type: ignore[call-overload]
        if cached is not None:
            return cached
        small = _small_at(prep, f)
        spec = self._edge_spectrum(small, shape)
        prep._spectra[key] = spec  # type: ignore[index]
        return spec

    def _edge_spectrum(self, img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Complex spectrum of ``img`` (zero mean float32) with its edges neutralised."""
        edges = self.config.edges
        if img.shape == shape and edges == "periodic":
            return _periodic_spectrum(img)
        if edges == "none" and img.shape == shape:
            return _dft(img)
        # Padding (frames of different sizes) needs a window: zeros around a
        # periodic component would make new edges.
        kind = "hann" if edges in ("periodic", "none") else edges
        win = self._window(img.shape, kind)
        out = np.zeros(shape, np.float32)
        out[: img.shape[0], : img.shape[1]] = img * win
        return _dft(out)

    # -- fine stage ----------------------------------------------------------

    def _fine(
        self,
        ref: Prepared,
        mov: Prepared,
        dx: float,
        dy: float,
        predicted: tuple[float, float] | None,
        search_px: float | None,
    ) -> Shift:
        cfg = self.config
        ix, iy = round(dx), round(dy)
        (hr, wr), (hm, wm) = ref.shape, mov.shape
        x0, x1 = max(0, ix), min(wr, ix + wm)
        y0, y1 = max(0, iy), min(hr, iy + hm)
        win_w = _fft_size_at_most(min(cfg.fine_window, x1 - x0))
        win_h = _fft_size_at_most(min(cfg.fine_window, y1 - y0))
        fx, fy = dx, dy
        if win_w >= 16 and win_h >= 16:
            cx = x0 + (x1 - x0 - win_w) // 2
            cy = y0 + (y1 - y0 - win_h) // 2
            ra = ref.image[cy : cy + win_h, cx : cx + win_w]
            ma = mov.image[cy - iy : cy - iy + win_h, cx - ix : cx - ix + win_w]
            res = self._residual(ra, ma, max(ref.factor, mov.factor) + 2)
            if res is not None:
                fx, fy = ix + res[0], iy + res[1]
        ov = _overlap(fx, fy, ref.shape, mov.shape)
        score = _ncc(ref.image, mov.image, round(fx), round(fy))
        if score >= cfg.min_score and round(fx) == 0 and round(fy) == 0:
            if ref.image.shape == mov.image.shape and np.array_equal(ref.image, mov.image):
                # A repeated frame: the correlation is exactly symmetric, say so exactly.
                return Shift(0.0, 0.0, 1.0, True, 1.0)
        ok = score >= cfg.min_score and ov >= cfg.min_overlap
        if ok and predicted is not None and search_px is not None:
            ok = math.hypot(fx - predicted[0], fy - predicted[1]) <= search_px + 1.0
        return Shift(float(fx), float(fy), float(score), bool(ok), float(ov))

    def _residual(self, ra: np.ndarray, ma: np.ndarray, reach: int) -> tuple[float, float] | None:
        """Sub-pixel shift of window ``ma`` against ``ra`` (same shape), within +-``reach`` px."""
        cfg = self.config
        h, w = ra.shape
        a = ra.astype(np.float32)
        b = ma.astype(np.float32)
        a -= float(a.mean())
        b -= float(b.mean())
        sa = self._edge_spectrum(a, (h, w))
        sb = self._edge_spectrum(b, (h, w))
        bp = self._bandpass((h, w), cfg.fine_lowpass, cfg.highpass, "fine")
        cross = _cross_power(sa, sb, bp, cfg.fine_whiten)
        surface = _idft(cross)
        r = min(reach, h // 2 - 1, w // 2 - 1)
        rows = np.r_[0 : r + 1, h - r : h]
        cols = np.r_[0 : r + 1, w - r : w]
        patch = surface[np.ix_(rows, cols)]
        k = int(np.argmax(patch))
        py, px = int(rows[k // len(cols)]), int(cols[k % len(cols)])
        if cfg.subpixel == "dft":
            oy, ox = _parabola_offset(surface, py, px)
            sy, sx = _dft_peak(cross, py + oy, px + ox)
        elif cfg.subpixel == "gauss":
            oy, ox = _gauss_offset(surface, py, px)
            sy, sx = py + oy, px + ox
        else:
            oy, ox = _parabola_offset(surface, py, px)
            sy, sx = py + oy, px + ox
        sy = sy - h if sy > h / 2 else sy
        sx = sx - w if sx > w / 2 else sx
        if abs(sx) > reach + 1 or abs(sy) > reach + 1:
            return None
        return float(sx), float(sy)

    # -- helpers -------------------------------------------------------------

    def _failed(self, ref: Prepared, mov: Prepared, predicted: tuple[float, float] | None) -> Shift:
        dx, dy = predicted if predicted is not None else (0.0, 0.0)
        return Shift(dx, dy, 0.0, False, _overlap(dx, dy, ref.shape, mov.shape))

    def _bandpass(self, shape: tuple[int, int], low: float, high: float, tag: str) -> np.ndarray:
        """Band-pass weight of a full complex spectrum ``shape`` (cycles per pixel)."""
        key = (f"{tag}:{low}:{high}", shape[0], shape[1])
        bp = self._filters.get(key)
        if bp is None:
            fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
            fx = np.fft.fftfreq(shape[1]).astype(np.float32)[None, :]
            f2 = fx * fx + fy * fy
            bp = np.exp(-f2 / np.float32(2 * low * low))
            if high > 0:
                bp *= 1.0 - np.exp(-f2 / np.float32(2 * high * high))
            bp = bp.astype(np.float32)
            self._filters[key] = bp
        return bp

    def _window(self, shape: tuple[int, int], kind: str) -> np.ndarray:
        key = (kind, shape[0], shape[1])
        win = self._filters.get(key)
        if win is None:
            if kind == "tukey":
                win = np.outer(_tukey(shape[0]), _tukey(shape[1])).astype(np.float32)
            else:
                win = cv2.createHanningWindow((shape[1], shape[0]), cv2.CV_32F)
            self._filters[key] = win
        return win


# -- module helpers -----------------------------------------------------------


def _reduce(image: np.ndarray, f: int) -> np.ndarray:
    """Area-average ``f`` x ``f`` blocks (the partial last ones dropped), zero mean float32.

    Dropping the partial blocks keeps the low-resolution grid aligned with
    the full one: low-resolution pixel ``j`` covers pixels ``f*j .. f*j+f-1``.
    """
    h, w = image.shape
    hs, ws = h // f, w // f
    img = image[: hs * f, : ws * f]
    if f & (f - 1) == 0:
        # Halving with bilinear sampling at exact 2x averages 2 x 2 blocks,
        # and is several times faster than INTER_AREA.
        while f > 1:
            f //= 2
            img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), cv2.INTER_LINEAR)
    else:
        img = cv2.resize(img, (ws, hs), interpolation=cv2.INTER_AREA)
    small = img.astype(np.float32)
    small -= float(small.mean())
    return small


def _small_at(prep: Prepared, f: int) -> np.ndarray:
    if f == prep.factor:
        return prep.small
    key = (-f, 0)  # a reduced image at another factor, cached beside the spectra
    cached = prep._spectra.get(key)
    if cached is None:
        cached = _reduce(prep.image, f)
        prep._spectra[key] = cached
    return cached


def _dft(img: np.ndarray) -> np.ndarray:
    out = cv2.dft(np.ascontiguousarray(img, dtype=np.float32), flags=cv2.DFT_COMPLEX_OUTPUT)
    # A fresh contiguous complex array: numpy's matrix products on OpenCV's
    # buffer viewed as complex run three times slower.
    spec: np.ndarray = out.view(np.complex64)[..., 0].copy()
    return spec


def _idft(spec: np.ndarray) -> np.ndarray:
    packed = np.ascontiguousarray(spec, dtype=np.complex64)[..., None].view(np.float32)
    out: np.ndarray = cv2.idft(packed, flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE)
    return out


def _periodic_spectrum(img: np.ndarray) -> np.ndarray:
    """Spectrum of the periodic component of ``img`` (Moisan's periodic + smooth split).

    The smooth component carries the jumps between opposite edges that a
    DFT sees as sharp edges (a cross of false energy through the origin);
    removing it spares a window, which would silence the frame borders where
    a narrow overlap lies.  The boundary image is non-zero on its border only,
    so its spectrum is assembled from two 1-D transforms.
    """
    h, w = img.shape
    jump_rows = (img[-1, :] - img[0, :]).astype(np.complex64)  # v[0, :], and -v[-1, :]
    jump_cols = (img[:, -1] - img[:, 0]).astype(np.complex64)  # v[:, 0], and -v[:, -1]
    gy, gx = _smooth_factors(h, w)
    smooth = np.fft.fft(jump_rows)[None, :] * gy
    smooth += np.fft.fft(jump_cols)[:, None] * gx
    return _dft(img) - smooth


@functools.lru_cache(maxsize=16)
def _smooth_factors(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """``(1 - e^{2 pi i ky / h}) / D`` and ``(1 - e^{2 pi i kx / w}) / D``, ``D`` the Laplacian symbol."""
    ky = 2 * np.pi * np.fft.fftfreq(h)[:, None]
    kx = 2 * np.pi * np.fft.fftfreq(w)[None, :]
    denom = 2 * np.cos(kx) + 2 * np.cos(ky) - 4
    denom[0, 0] = 1.0
    gy = (1 - np.exp(1j * ky)) / denom
    gx = (1 - np.exp(1j * kx)) / denom
    gy[0, 0] = gx[0, 0] = 0
    return gy.astype(np.complex64), gx.astype(np.complex64)


def _tukey(n: int, taper: float = 0.25) -> np.ndarray:
    x = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    w = np.ones(n)
    edge = taper / 2
    lo = x < edge
    hi = x > 1 - edge
    w[lo] = 0.5 * (1 - np.cos(np.pi * x[lo] / edge))
    w[hi] = 0.5 * (1 - np.cos(np.pi * (1 - x[hi]) / edge))
    return w


def _cross_power(sa: np.ndarray, sb: np.ndarray, bp: np.ndarray, whiten: float) -> np.ndarray:
    """Band-passed, (partly) whitened cross-power spectrum of ``a`` and ``b``.

    Its inverse transform peaks at the shift of ``b`` relative to ``a``
    (``b[y, x] = a[y + dy, x + dx]``).
    """
    cross = sa * np.conj(sb)
    if whiten > 0:
        mag = np.abs(cross)
        mag += np.float32(1e-6 * float(mag.mean()) + 1e-20)
        if whiten == 0.5:
            np.sqrt(mag, out=mag)
        elif whiten != 1.0:
            np.power(mag, np.float32(whiten), out=mag)
        cross /= mag
    cross *= bp
    return cross


def _alias_mask(n: int, centre: float, slack: float, lo: int, hi: int) -> np.ndarray:
    """Surface indices 0..n-1 with an alias ``i + k*n`` in ``centre +- slack`` and ``(lo, hi)``."""
    idx = np.arange(n, dtype=np.float64)
    mask = np.zeros(n, bool)
    k_lo = math.floor((min(centre - slack, lo) - n) / n)
    k_hi = math.ceil((max(centre + slack, hi) + n) / n)
    for k in range(k_lo, k_hi + 1):
        v = idx + k * n
        mask |= (np.abs(v - centre) <= slack) & (v > lo) & (v < hi)
    return mask


def _local_maxima(surface: np.ndarray, count: int) -> list[tuple[int, int]]:
    """Up to ``count`` strongest 3x3 local maxima of ``surface`` (wrap-around), strongest first."""
    padded = np.pad(surface, 1, mode="wrap")
    dil = cv2.dilate(padded, np.ones((3, 3), np.uint8))[1:-1, 1:-1]
    finite = np.isfinite(surface)
    idx = np.flatnonzero((surface >= dil) & finite)
    if idx.size == 0:
        return []
    vals = surface.ravel()[idx]
    if idx.size > count:
        part = np.argpartition(vals, -count)[-count:]
        idx, vals = idx[part], vals[part]
    order = np.argsort(vals)[::-1]
    w = surface.shape[1]
    return [(int(i) // w, int(i) % w) for i in idx[order]]


def _parabola_offset(surface: np.ndarray, py: int, px: int) -> tuple[float, float]:
    """3-point parabola vertex per axis around ``(py, px)`` (wrap-around), within +-0.5."""
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


def _gauss_offset(surface: np.ndarray, py: int, px: int) -> tuple[float, float]:
    """3-point Gaussian (log-parabola) vertex per axis; parabola where values are not positive."""
    h, w = surface.shape
    c = float(surface[py, px])
    fallback = _parabola_offset(surface, py, px)

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


def _dft_peak(cross: np.ndarray, y: float, x: float) -> tuple[float, float]:
    """Maximise the DFT interpolation of ``ifft2(cross)`` from ``(y, x)`` by Newton steps.

    ``s(y, x) = Re sum_k cross[k] exp(2 pi i (ky y / h + kx x / w))`` is the
    band-limited surface the discrete one samples; its maximum is the exact
    centre of a symmetric peak whatever the peak's shape (which a parabola
    or Gaussian fit only approximates).  Each step costs a few matrix-vector
    products, no transform.
    """
    h, w = cross.shape
    ky = (2 * np.pi * np.fft.fftfreq(h)).astype(np.float32)
    kx = (2 * np.pi * np.fft.fftfreq(w)).astype(np.float32)
    y0, x0 = y, x
    for _ in range(_NEWTON_STEPS):
        ex = np.exp(1j * kx * np.float32(x)).astype(np.complex64)
        ey = np.exp(1j * ky * np.float32(y)).astype(np.complex64)
        basis = np.stack([ex, 1j * kx * ex, -(kx * kx) * ex], axis=1)
        u = cross @ basis  # (h, 3)
        vy = np.stack([ey, 1j * ky * ey, -(ky * ky) * ey], axis=0)  # (3, h)
        m = (vy @ u).real  # m[i, j]: i-th y derivative, j-th x derivative
        gx, gy = float(m[0, 1]), float(m[1, 0])
        hxx, hyy, hxy = float(m[0, 2]), float(m[2, 0]), float(m[1, 1])
        det = hxx * hyy - hxy * hxy
        if not (hxx < 0 and det > 0):
            break  # not in a maximum's basin: keep the last point
        step_x = -(hyy * gx - hxy * gy) / det
        step_y = -(hxx * gy - hxy * gx) / det
        x += float(np.clip(step_x, -0.5, 0.5))
        y += float(np.clip(step_y, -0.5, 0.5))
        if abs(step_x) < 1e-4 and abs(step_y) < 1e-4:
            break
    if abs(x - x0) > 1.0 or abs(y - y0) > 1.0:
        return y0, x0  # wandered off to another peak: trust the start
    return y, x


def _ncc(a: np.ndarray, b: np.ndarray, dx: int, dy: int) -> float:
    """Zero-mean NCC of ``a`` and ``b`` on their overlap when ``b`` sits at ``(dx, dy)`` in ``a``.

    ``b[y, x]`` is compared with ``a[y + dy, x + dx]``; shapes may differ.
    The cross term comes from ``|a|^2 + |b|^2 - |a - b|^2``: three OpenCV
    norms on the raw pixels, with no float copy of the overlap.
    """
    ha, wa = a.shape
    hb, wb = b.shape
    x0, x1 = max(0, dx), min(wa, dx + wb)
    y0, y1 = max(0, dy), min(ha, dy + hb)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return 0.0
    pa = a[y0:y1, x0:x1]
    pb = b[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
    ma, sa = cv2.meanStdDev(pa)
    mb, sb = cv2.meanStdDev(pb)
    sa_f, sb_f = float(sa[0, 0]), float(sb[0, 0])
    if sa_f < 1e-3 or sb_f < 1e-3:
        return 0.0
    n = pa.size
    cross = 0.5 * (
        cv2.norm(pa, cv2.NORM_L2SQR)
        + cv2.norm(pb, cv2.NORM_L2SQR)
        - cv2.norm(pa, pb, cv2.NORM_L2SQR)
    )
    cov = cross / n - float(ma[0, 0]) * float(mb[0, 0])
    return float(np.clip(cov / (sa_f * sb_f), -1.0, 1.0))


def _overlap(dx: float, dy: float, shape_a: tuple[int, int], shape_b: tuple[int, int]) -> float:
    """Overlap area of ``b`` at ``(dx, dy)`` in ``a``, as a fraction of the smaller area."""
    (ha, wa), (hb, wb) = shape_a, shape_b
    ox = max(0.0, min(wa, dx + wb) - max(0.0, dx))
    oy = max(0.0, min(ha, dy + hb) - max(0.0, dy))
    return float(ox * oy / min(ha * wa, hb * wb))


_SMOOTH_SIZES = sorted(
    {2**a * 3**b * 5**c for a in range(1, 14) for b in range(0, 8) for c in range(0, 6)}
)


def _fft_size_at_most(n: int) -> int:
    """Largest even 5-smooth size <= ``n`` (fast DFT), or ``n`` when below 16."""
    if n < 16:
        return n
    lo, hi = 0, len(_SMOOTH_SIZES)
    while lo < hi:
        mid = (lo + hi) // 2
        if _SMOOTH_SIZES[mid] <= n:
            lo = mid + 1
        else:
            hi = mid
    return _SMOOTH_SIZES[lo - 1]
