"""Pairwise translation between overlapping SEM frames, to sub-pixel accuracy.

The live stitcher's measurement: given two frames that overlap (by as little
as ~5 %), how far apart are they?  The estimate is made in two stages:

1. **coarse**, at reduced resolution over the whole frames: phase correlation
   of the frames' periodic components (edge artefacts removed without a
   window, so a narrow overlap at a frame border keeps its full weight),
   band-pass filtered (shot noise at high and illumination at very low
   frequencies); several correlation peaks, and the wrap-around aliases of
   each, are checked by zero-mean NCC on their actual overlap;
2. **fine**, at full resolution on the overlap only: a window of bounded size
   cut from the overlap at the coarse shift, correlated in the filter's pass
   band with partial whitening (more precise under noise than pure phase
   correlation); the correlation peak is looked for within a few pixels of
   the coarse shift and located to sub-pixel precision by Newton steps on
   the DFT interpolation of the correlation itself (the limit of an
   upsampled DFT; unbiased for any symmetric peak, where a parabola fitted to
   three samples of a broad peak is not).

The answer is scored by zero-mean NCC on the full-resolution overlap and
checked by the NCC of the frames' fine detail (reduced, high-passed), which
unrelated frames with large smooth structures cannot fake; an implausible
answer (too little overlap, a low score or detail, outside the search
region) comes back with ``ok=False`` rather than as a wrong translation.
Measured accuracy and speed: ``bench/bench_register.py``.

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
_MIN_WINDOW = 16  # smallest fine-stage window side, pixels
_FLAT_STD = 0.25  # grey levels: below this a frame has no usable contrast
_BAND_SIGMAS = 3.0  # the fine pass band ends where the low-pass weight is ~1 %
_NEWTON_STEPS = 3  # from a parabola's start on a 2-pixel grid: < 1e-3 px
_RUNNER_UP = 0.1  # low-resolution NCC gap under which the second candidate is refined too
_SURE = 0.5  # detail NCC of a clear match (unrelated frames: <= 0.19 measured)
_DOMINANT = 0.5  # peaks below this fraction of the highest cannot rival a clear match
_DETAIL_SIGMA = 1.5  # low-resolution pixels: the high-pass that makes the detail images
# Detail NCC times sqrt(overlap pixels at low resolution): <= 11.9 measured
# for 532 unrelated pairs, >= 29.8 for true matches with 5-30 % overlap.
_DETAIL_Z = 18.0


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
    min_detail : float
        Smallest NCC of the detail (high-passed, reduced) images on the
        overlap accepted.  Coarse shapes (large grains, phases) correlate by
        chance up to NCC ~0.45 on small overlaps of unrelated frames; their
        detail does not (measured <= 0.19, against >= 0.5 for true matches).
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
        full-resolution pixel (above it shot noise dominates).
    highpass : float
        Gaussian low-frequency cut (illumination, brightness gradients,
        detector drift), sigma in cycles per full-resolution pixel.
    coarse_whiten, fine_whiten : float
        Exponent of the spectral normalisation of each stage: 1 is pure
        phase correlation (sharpest peak, robust to repeated structure), 0
        plain cross-correlation (weights frequencies by their energy, more
        precise under noise).
    subpixel : {"dft", "parabola", "gauss"}
        Sub-pixel peak location: maximise the DFT-interpolated correlation,
        or fit a 3-point parabola / Gaussian per axis.
    fine_edges : {"periodic", "hann", "tukey", "none"}
        How the edges of the fine window are kept out of its spectrum:
        periodic-plus-smooth decomposition (no window) or a window.
    prior_weight : float
        NCC handicap of a coarse candidate lying half a frame diagonal (or
        more) from the predicted shift: a tie-break, not a constraint.
    """

    downsample: int = 4
    min_score: float = 0.3
    search_px: float | None = None
    min_detail: float = 0.25
    min_overlap: float = 0.05
    peaks: int = 4
    fine_window: int = 256
    coarse_lowpass: float = 0.3
    fine_lowpass: float = 0.07
    highpass: float = 0.005
    coarse_whiten: float = 1.0
    fine_whiten: float = 0.5
    subpixel: Subpixel = "dft"
    fine_edges: Edges = "periodic"
    prior_weight: float = 0.1

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"register.{name}: {getattr(self, name)!r} {why}")

        if isinstance(self.downsample, bool) or not isinstance(self.downsample, int):
            raise bad("downsample", "must be an integer")
        if not 1 <= self.downsample <= 32:
            raise bad("downsample", "is outside 1..32")
        if not -1.0 <= self.min_score <= 1.0:
            raise bad("min_score", "is outside -1..1")
        if not -1.0 <= self.min_detail <= 1.0:
            raise bad("min_detail", "is outside -1..1")
        if self.search_px is not None and not self.search_px >= 0:
            raise bad("search_px", "must be >= 0 or None")
        if not 0.0 < self.min_overlap <= 1.0:
            raise bad("min_overlap", "is outside (0, 1]")
        if isinstance(self.peaks, bool) or not isinstance(self.peaks, int):
            raise bad("peaks", "must be an integer")
        if not 1 <= self.peaks <= 64:
            raise bad("peaks", "is outside 1..64")
        if not _MIN_WINDOW <= self.fine_window <= 4096:
            raise bad("fine_window", f"is outside {_MIN_WINDOW}..4096")
        for name in ("coarse_lowpass", "fine_lowpass"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise bad(name, "is outside (0, 1]")
        if not 0.0 <= self.highpass < 0.5:
            raise bad("highpass", "is outside [0, 0.5)")
        for name in ("coarse_whiten", "fine_whiten"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "is outside [0, 1]")
        if self.subpixel not in ("dft", "parabola", "gauss"):
            raise bad("subpixel", "is not one of dft, parabola, gauss")
        if self.fine_edges not in ("periodic", "hann", "tukey", "none"):
            raise bad("fine_edges", "is not one of periodic, hann, tukey, none")
        if not self.prior_weight >= 0.0:
            raise bad("prior_weight", "must be >= 0")


@dataclass(frozen=True, slots=True)
class Shift:
    """A translation estimate.

    Attributes
    ----------
    dx, dy : float
        Top-left of ``mov`` minus top-left of ``ref``, pixels (x right, y
        down): ``mov[y, x]`` shows ``ref[y + dy, x + dx]``.  When nothing was
        found at all: the predicted shift, or (0, 0).
    score : float
        Zero-mean NCC of the two frames on their overlap at this shift
        (rounded to whole pixels), full resolution; 0 when nothing was found.
    ok : bool
        True when the estimate can be trusted: score >= ``min_score``,
        detail >= ``min_detail``, overlap >= ``min_overlap``, inside the
        search region and refined to sub-pixel precision.
    overlap : float
        Overlap area as a fraction of the smaller frame's area.
    detail : float
        NCC of the detail (high-passed, reduced) images on the overlap: the
        check that fine structure agrees too.
    """

    dx: float
    dy: float
    score: float
    ok: bool
    overlap: float
    detail: float = 0.0


@dataclass(eq=False, slots=True)
class Prepared:
    """One frame with its per-frame work done, reused by every pair it is in.

    Belongs to the :class:`Registrar` that made it (the cached spectrum
    carries that registrar's filter).

    Attributes
    ----------
    image : ndarray of uint8
        The full-resolution frame ``(y, x)`` (a read-only view, not a copy:
        do not modify the array it came from while it is in use).
    small : ndarray of float32
        The frame reduced ``factor`` times by block averaging, zero mean.
    detail : ndarray of float32
        ``small`` less its Gaussian blur: the fine structure that validates
        a match (coarse shapes correlate by chance far too easily).
    factor : int
        Resolution divisor of ``small``.
    flat : bool
        True when the frame has no usable contrast (blank).
    owner : RegisterConfig
        Configuration of the registrar that prepared it.
    """

    image: np.ndarray
    small: np.ndarray
    detail: np.ndarray
    factor: int
    flat: bool
    owner: RegisterConfig = field(repr=False)
    # Whitened, filtered low-resolution spectra keyed by (factor, height,
    # width) of the transform; frames of another size need another one.
    _spectra: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict, repr=False)
    _smalls: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the full-resolution frame, pixels."""
        h, w = self.image.shape
        return int(h), int(w)

    def small_at(self, factor: int) -> tuple[np.ndarray, np.ndarray]:
        """``(small, detail)`` reduced ``factor`` times (cached), float32 ``(y, x)``."""
        if factor == self.factor:
            return self.small, self.detail
        pair = self._smalls.get(factor)
        if pair is None:
            small = _reduce(self.image, factor)
            pair = (small, _detail(small))
            self._smalls[factor] = pair
        return pair


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


@dataclass(slots=True)
class _Candidate:
    dx: float  # full-resolution pixels
    dy: float
    ncc: float  # low-resolution NCC of the detail images on the overlap
    rank: float  # ncc, less the prior's handicap


class Registrar:
    """Estimates the translation between overlapping frames (see the module docstring).

    Parameters
    ----------
    config : RegisterConfig
        Resolution, thresholds, filters and methods.

    Notes
    -----
    Not thread-safe (filters and pass bands are cached per size): use one
    instance per thread.
    """

    # A frozen dataclass: sharing the default instance is safe.
    def __init__(self, config: RegisterConfig = RegisterConfig()) -> None:
        if not isinstance(config, RegisterConfig):
            raise ConfigError(f"register: config must be a RegisterConfig, not {config!r}")
        self.config = config
        self._filters: dict[tuple[str, int, int], np.ndarray] = {}
        self._bands: dict[tuple[int, int], _Band] = {}

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
        if image.strides[1] != 1:
            image = np.ascontiguousarray(image)  # OpenCV needs contiguous rows
        view = image.view()
        view.flags.writeable = False
        f = max(1, min(self.config.downsample, min(h, w) // _MIN_SMALL_SIDE))
        small = _reduce(image, f)
        # Block averaging divides the noise, not a real contrast: compare
        # against the threshold scaled the same way.
        flat = float(small.std()) < _FLAT_STD / f
        prep = Prepared(view, small, _detail(small), f, flat, self.config)
        if not flat:
            self._coarse_spectrum(prep, f, small.shape)
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
            Frames from this registrar's :meth:`prepare` (any shapes).
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

        Raises
        ------
        RegistrationError
            For frames prepared by a registrar with another configuration,
            or a non-finite prediction.
        """
        cfg = self.config
        self._check_prepared(ref, mov)
        if predicted is not None:
            predicted = (float(predicted[0]), float(predicted[1]))
            if not all(math.isfinite(v) for v in predicted):
                raise RegistrationError(f"register: predicted shift {predicted} is not finite")
            if search_px is None:
                search_px = cfg.search_px
        else:
            search_px = None
        if ref is mov:
            return Shift(0.0, 0.0, 1.0, True, 1.0, 1.0)
        if ref.flat or mov.flat:
            log.debug("register: blank frame, nothing to match")
            return self._failed(ref, mov, predicted)
        candidates = self._coarse(ref, mov, predicted, search_px)
        if not candidates:
            log.debug("register: no coarse candidate with enough overlap and correlation")
            return self._failed(ref, mov, predicted)
        best = self._fine(ref, mov, candidates[0], predicted, search_px)
        if len(candidates) > 1 and candidates[0].rank - candidates[1].rank < _RUNNER_UP:
            # A close runner-up (repeated structure) is settled at full resolution.
            other = self._fine(ref, mov, candidates[1], predicted, search_px)
            distinct = math.hypot(other.dx - best.dx, other.dy - best.dy) > 1.0
            if (distinct or not best.ok) and (other.ok, other.score) > (best.ok, best.score):
                best = other
        return best

    def _check_prepared(self, *frames: Prepared) -> None:
        for prep in frames:
            if not isinstance(prep, Prepared) or prep.owner != self.config:
                raise RegistrationError(
                    "register: frames must come from prepare() of a registrar with this "
                    "configuration"
                )

    def refine(
        self,
        ref: Prepared,
        mov: Prepared,
        predicted: tuple[float, float],
        search_px: float | None = None,
    ) -> Shift:
        """Translation near a trusted prediction: the fine stage alone, else :meth:`register`.

        For a prediction that is already good to a few pixels (a row-to-row
        link predicted from the frame's placement along its row), the coarse
        search only confirms it.  The full-resolution stage is run at the
        prediction directly (it finds the peak within ``downsample + 2`` px of
        it, with the same sub-pixel refinement and the same checks); only when
        that is not trusted does the full search run.  Saves about a third
        of a registration where it holds.

        Parameters and result as :meth:`register` (``predicted`` required).
        """
        cfg = self.config
        self._check_prepared(ref, mov)
        guess = (float(predicted[0]), float(predicted[1]))
        if not all(math.isfinite(v) for v in guess):
            raise RegistrationError(f"register: predicted shift {guess} is not finite")
        bound = cfg.search_px if search_px is None else search_px
        if ref is not mov and not (ref.flat or mov.flat):
            shift = self._fine(ref, mov, _Candidate(guess[0], guess[1], 0.0, 0.0), guess, bound)
            if shift.ok:
                return shift
        return self.register(ref, mov, guess, search_px)

    # -- coarse stage --------------------------------------------------------

    def _coarse(
        self,
        ref: Prepared,
        mov: Prepared,
        predicted: tuple[float, float] | None,
        search_px: float | None,
    ) -> list[_Candidate]:
        """Candidate shifts in full-resolution pixels, best first."""
        cfg = self.config
        factor = min(ref.factor, mov.factor)
        a, b = ref.small_at(factor)[1], mov.small_at(factor)[1]
        (ha, wa), (hb, wb) = a.shape, b.shape
        shape = (max(ha, hb), max(wa, wb))
        cross = self._coarse_spectrum(ref, factor, shape) * np.conj(
            self._coarse_spectrum(mov, factor, shape)
        )
        surface = _idft(cross)
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
        out: list[_Candidate] = []

        def consider(dx_s: int, dy_s: int, dx: float, dy: float) -> bool:
            if (dx_s, dy_s) in seen:
                return False
            seen.add((dx_s, dy_s))
            if _overlap(dx, dy, ref.shape, mov.shape) < cfg.min_overlap:
                return False
            rank = 0.0
            if predicted is not None:
                dist = math.hypot(dx - predicted[0], dy - predicted[1])
                if search_px is not None and dist > search_px + 1.5 * factor:
                    return False
                rank = -cfg.prior_weight * min(dist / (0.5 * diag), 1.0)
            ncc = _ncc(a, b, dx_s, dy_s)
            out.append(_Candidate(dx, dy, ncc, ncc + rank))
            return True

        n_peaks = 0
        peaks = _local_maxima(surface, 4 * cfg.peaks)
        for py_i, px_i in peaks:
            if (
                out
                and max(c.ncc for c in out) >= _SURE
                and (surface[py_i, px_i] < _DOMINANT * surface[peaks[0]])
            ):
                break  # a clear match already, and no peak left that could rival it
            oy, ox = _parabola_offset(surface, py_i, px_i)
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

    def _coarse_spectrum(self, prep: Prepared, factor: int, shape: tuple[int, int]) -> np.ndarray:
        """Whitened, filtered spectrum of ``prep`` reduced ``factor`` times, ``shape`` transform.

        Stored as ``phase * sqrt(weight)``, so that the product of two
        frames' spectra is directly the filtered cross-power spectrum.
        """
        key = (factor, shape[0], shape[1])
        spec = prep._spectra.get(key)
        if spec is not None:
            return spec
        cfg = self.config
        small = prep.small_at(factor)[0]
        if small.shape == shape:
            spec = _periodic_spectrum(small, copy=False)
        else:
            # Padding (frames of different sizes) needs a window: zeros around
            # a periodic component would make new edges.
            padded = np.zeros(shape, np.float32)
            padded[: small.shape[0], : small.shape[1]] = small * self._window(small.shape, "hann")
            spec = _dft(padded)
        spec = _whiten(spec, cfg.coarse_whiten)
        spec *= self._coarse_weight(shape, factor)
        prep._spectra[key] = spec
        return spec

    def _coarse_weight(self, shape: tuple[int, int], factor: int) -> np.ndarray:
        """Square root of the coarse band-pass weight (one factor per frame)."""
        key = (f"coarse{factor}", shape[0], shape[1])
        weight = self._filters.get(key)
        if weight is None:
            cfg = self.config
            fy = np.fft.fftfreq(shape[0])[:, None]
            fx = np.fft.fftfreq(shape[1])[None, :]
            weight = np.sqrt(_bandpass(fx**2 + fy**2, cfg.coarse_lowpass, cfg.highpass * factor))
            weight = weight.astype(np.float32)
            self._filters[key] = weight
        return weight

    # -- fine stage ----------------------------------------------------------

    def _fine(
        self,
        ref: Prepared,
        mov: Prepared,
        cand: _Candidate,
        predicted: tuple[float, float] | None,
        search_px: float | None,
    ) -> Shift:
        """Refine a coarse candidate at full resolution and score it."""
        cfg = self.config
        ix, iy = round(cand.dx), round(cand.dy)
        (hr, wr), (hm, wm) = ref.shape, mov.shape
        x0, x1 = max(0, ix), min(wr, ix + wm)
        y0, y1 = max(0, iy), min(hr, iy + hm)
        win_w, win_h = _window_size(x1 - x0, y1 - y0, cfg.fine_window)
        res = None
        if win_w >= _MIN_WINDOW and win_h >= _MIN_WINDOW:
            cx = x0 + (x1 - x0 - win_w) // 2
            cy = y0 + (y1 - y0 - win_h) // 2
            ra = ref.image[cy : cy + win_h, cx : cx + win_w]
            ma = mov.image[cy - iy : cy - iy + win_h, cx - ix : cx - ix + win_w]
            res = self._residual(ra, ma, max(ref.factor, mov.factor) + 2)
        refined = res is not None
        fx, fy = (ix + res[0], iy + res[1]) if res is not None else (cand.dx, cand.dy)
        rx, ry = round(fx), round(fy)
        if rx == 0 and ry == 0 and np.array_equal(ref.image, mov.image):
            # A repeated frame: say so exactly rather than to float rounding.
            return Shift(0.0, 0.0, 1.0, True, 1.0, 1.0)
        score = _ncc(ref.image, mov.image, rx, ry)
        factor = min(ref.factor, mov.factor)
        detail = _ncc(
            ref.small_at(factor)[1], mov.small_at(factor)[1], round(fx / factor), round(fy / factor)
        )
        ov = _overlap(fx, fy, ref.shape, mov.shape)
        # Chance agreement of detail shrinks as 1/sqrt(samples): a small
        # overlap must show more of it to count.
        n_small = ov * min(ref.shape[0] * ref.shape[1], mov.shape[0] * mov.shape[1]) / factor**2
        min_detail = max(cfg.min_detail, _DETAIL_Z / math.sqrt(max(n_small, 1.0)))
        ok = refined and score >= cfg.min_score and detail >= min_detail and ov >= cfg.min_overlap
        if ok and predicted is not None and search_px is not None:
            ok = math.hypot(fx - predicted[0], fy - predicted[1]) <= search_px + 1.0
        if not ok:
            log.debug(
                "register: rejected (%.2f, %.2f): score %.3f, detail %.3f, overlap %.3f, "
                "refined %s", fx, fy, score, detail, ov, refined,
            )  # fmt: skip
        return Shift(float(fx), float(fy), float(score), bool(ok), float(ov), float(detail))

    def _residual(self, ra: np.ndarray, ma: np.ndarray, reach: int) -> tuple[float, float] | None:
        """Sub-pixel shift ``(dx, dy)`` of window ``ma`` against ``ra`` (same shape), px.

        Only the filter's pass band is kept (frequencies where its weight
        exceeds ~1 %), so the work after the two forward transforms is on a
        fraction of the spectrum.  The correlation's highest sample within
        ``+-reach`` of zero (every pixel; every other one for the DFT method,
        whose Newton steps need only a start) is refined to sub-pixel; None
        when the peak lies at or beyond the reach (not this candidate's).
        """
        cfg = self.config
        h, w = ra.shape
        band = self._band(h, w)
        sa = self._band_spectrum(ra, band)
        sb = self._band_spectrum(ma, band)
        cross = _whiten(sa * np.conj(sb), cfg.fine_whiten)
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
        surface = _idft(full)
        # The +-r neighbourhood of zero shift, rolled so that shift -r is at index 0.
        rows = np.r_[hq - r : hq, 0 : r + 1]
        cols = np.r_[wq - r : wq, 0 : r + 1]
        grid = surface[np.ix_(rows, cols)]
        k = int(np.argmax(grid))
        iy, ix = divmod(k, grid.shape[1])
        if not (0 < iy < 2 * r and 0 < ix < 2 * r):
            return None  # the peak is at or beyond the reach: not this candidate's
        if cfg.subpixel == "gauss":
            oy, ox = _gauss_offset(grid, iy, ix)
        else:
            oy, ox = _parabola_offset(grid, iy, ix)
        sy, sx = (iy - r + oy) * q, (ix - r + ox) * q
        if cfg.subpixel == "dft":
            sy, sx = _dft_peak(cross, band.ky, band.kx, sy, sx)
        r *= q
        if abs(sx) > r - 0.5 or abs(sy) > r - 0.5:
            return None
        return float(sx), float(sy)

    def _band_spectrum(self, crop: np.ndarray, band: _Band) -> np.ndarray:
        """Pass-band block of the edge-treated spectrum of a full-resolution window."""
        edges = self.config.fine_edges
        img = crop.astype(np.float32)
        if edges in ("hann", "tukey"):
            img -= float(img.mean())  # a windowed mean leaks into low frequencies
            img *= self._window(img.shape, edges)
        full = _dft_view(img)
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

    def _band(self, h: int, w: int) -> _Band:
        """Frequencies of an ``h`` x ``w`` spectrum inside the fine pass band (cached)."""
        band = self._bands.get((h, w))
        if band is not None:
            return band
        cfg = self.config
        fmax = min(0.5, _BAND_SIGMAS * cfg.fine_lowpass)
        ny, nx = min(int(fmax * h), (h - 1) // 2), min(int(fmax * w), (w - 1) // 2)
        # Frequencies 0..n and -n..-1: two slices of the unshifted spectrum.
        rows = (slice(0, ny + 1), slice(h - ny, h))
        cols = (slice(0, nx + 1), slice(w - nx, w))
        fy = np.r_[0 : ny + 1, h - ny : h]
        fx = np.r_[0 : nx + 1, w - nx : w]
        freq_y, freq_x = np.fft.fftfreq(h)[fy], np.fft.fftfreq(w)[fx]
        f2 = freq_y[:, None] ** 2 + freq_x[None, :] ** 2
        gy, gx = _smooth_factors(h, w)
        band = _Band(
            rows=rows,
            cols=cols,
            ky=(2 * np.pi * freq_y).astype(np.float32),
            kx=(2 * np.pi * freq_x).astype(np.float32),
            weight=_bandpass(f2, cfg.fine_lowpass, cfg.highpass).astype(np.float32),
            gy=np.ascontiguousarray(gy[np.ix_(fy, fx)]),
            gx=np.ascontiguousarray(gx[np.ix_(fy, fx)]),
            fy=fy,
            fx=fx,
        )
        self._bands[(h, w)] = band
        return band

    # -- helpers -------------------------------------------------------------

    def _failed(self, ref: Prepared, mov: Prepared, predicted: tuple[float, float] | None) -> Shift:
        dx, dy = predicted if predicted is not None else (0.0, 0.0)
        return Shift(dx, dy, 0.0, False, _overlap(dx, dy, ref.shape, mov.shape))

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


def _detail(small: np.ndarray) -> np.ndarray:
    """``small`` less its Gaussian blur (sigma ``_DETAIL_SIGMA`` low-resolution pixels)."""
    out: np.ndarray = small - cv2.GaussianBlur(small, (0, 0), _DETAIL_SIGMA)
    return out


def _dft_view(img: np.ndarray) -> np.ndarray:
    """Complex spectrum of a float32 image, as a complex64 view of OpenCV's buffer."""
    out = cv2.dft(np.ascontiguousarray(img, dtype=np.float32), flags=cv2.DFT_COMPLEX_OUTPUT)
    spec: np.ndarray = out.view(np.complex64)[..., 0]
    return spec


def _dft(img: np.ndarray) -> np.ndarray:
    # A fresh complex array: numpy's arithmetic and matrix products on
    # OpenCV's buffer viewed as complex run up to three times slower.
    return _dft_view(img).copy()


def _idft(spec: np.ndarray) -> np.ndarray:
    """Real inverse transform of a (Hermitian) complex spectrum, scaled."""
    packed = np.ascontiguousarray(spec, dtype=np.complex64)[..., None].view(np.float32)
    out: np.ndarray = cv2.idft(packed, flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE)
    return out


def _whiten(spec: np.ndarray, power: float) -> np.ndarray:
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


def _bandpass(f2: np.ndarray, low: float, high: float) -> np.ndarray:
    """Gaussian low-pass ``low`` times Gaussian high-pass ``high`` (sigmas, cycles per px).

    ``f2`` is the squared radial frequency in cycles per pixel.
    """
    weight = np.exp(-f2 / (2 * low * low))
    if high > 0:
        weight *= 1.0 - np.exp(-f2 / (2 * high * high))
    out: np.ndarray = weight
    return out


def _periodic_spectrum(img: np.ndarray, copy: bool = True) -> np.ndarray:
    """Spectrum of the periodic component of ``img`` (Moisan's periodic + smooth split).

    The smooth component carries the jumps between opposite edges, which a
    DFT sees as sharp edges (a cross of false energy through the origin);
    removing it spares a window, which would silence the frame borders where
    a narrow overlap lies.  The boundary image is non-zero on its border
    only, so its spectrum comes from two 1-D transforms.  ``copy=False``
    returns a view of OpenCV's buffer (slower in matrix products).
    """
    h, w = img.shape
    gy, gx = _smooth_factors(h, w)
    spec = _dft(img) if copy else _dft_view(img)
    spec -= np.fft.fft(img[-1, :] - img[0, :]).astype(np.complex64)[None, :] * gy
    spec -= np.fft.fft(img[:, -1] - img[:, 0]).astype(np.complex64)[:, None] * gx
    return spec


@functools.lru_cache(maxsize=16)
def _smooth_factors(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
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


def _tukey(n: int, taper: float = 0.25) -> np.ndarray:
    """Tukey window of ``n`` points, cosine tapers over ``taper / 2`` at each end."""
    x = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    w = np.ones(n)
    edge = taper / 2
    lo, hi = x < edge, x > 1 - edge
    w[lo] = 0.5 * (1 - np.cos(np.pi * x[lo] / edge))
    w[hi] = 0.5 * (1 - np.cos(np.pi * (1 - x[hi]) / edge))
    return w


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


def _local_maxima(surface: np.ndarray, count: int) -> list[tuple[int, int]]:
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


def _parabola_offset(surface: np.ndarray, py: int, px: int) -> tuple[float, float]:
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


def _gauss_offset(surface: np.ndarray, py: int, px: int) -> tuple[float, float]:
    """3-point Gaussian (log-parabola) vertex per axis; the parabola's where values are <= 0."""
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


def _ncc(a: np.ndarray, b: np.ndarray, dx: int, dy: int) -> float:
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
    ma, sa = (float(v[0, 0]) for v in cv2.meanStdDev(pa))
    mb, sb = (float(v[0, 0]) for v in cv2.meanStdDev(pb))
    if sa < 1e-3 or sb < 1e-3:
        return 0.0
    # mean(a b) = (mean(a^2) + mean(b^2) - mean((a - b)^2)) / 2
    mean_ab = 0.5 * (
        sa * sa + ma * ma + sb * sb + mb * mb - cv2.norm(pa, pb, cv2.NORM_L2SQR) / pa.size
    )
    return float(np.clip((mean_ab - ma * mb) / (sa * sb), -1.0, 1.0))


def _overlap(dx: float, dy: float, shape_a: tuple[int, int], shape_b: tuple[int, int]) -> float:
    """Overlap area of ``b`` at ``(dx, dy)`` in ``a``, as a fraction of the smaller area."""
    (ha, wa), (hb, wb) = shape_a, shape_b
    ox = max(0.0, min(wa, dx + wb) - max(0.0, dx))
    oy = max(0.0, min(ha, dy + hb) - max(0.0, dy))
    return float(ox * oy / min(ha * wa, hb * wb))


def _window_size(ow: int, oh: int, side: int) -> tuple[int, int]:
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
    return _fft_size_at_most(w), _fft_size_at_most(h)


_SMOOTH_SIZES = sorted(
    {2**i * 3**j * 5**k for i in range(1, 14) for j in range(8) for k in range(6)}
)


def _fft_size_at_most(n: int) -> int:
    """Largest even 5-smooth size <= ``n`` (a fast DFT size), or ``n`` below 16."""
    if n < _MIN_WINDOW:
        return n
    i = int(np.searchsorted(_SMOOTH_SIZES, n, side="right"))
    return _SMOOTH_SIZES[i - 1]
