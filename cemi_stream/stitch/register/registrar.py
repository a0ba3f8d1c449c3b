"""The translation estimator: prepare frames once, register pairs (coarse, fine, accept)."""

from __future__ import annotations

import dataclasses
import logging
import math

import cv2
import numpy as np

from cemi_stream.errors import ConfigError

from .accept import agreement, ambiguous, band_image, noise_variance, trustworthy
from .coarse import Candidate, coarse_candidates, coarse_spectrum
from .fine import noise_adapted, residual
from .spectral import MIN_WINDOW, detail_image, ncc, overlap, reduce_blocks, window_size
from .types import IDENTICAL, Prepared, RegisterConfig, RegistrationError, Shift

log = logging.getLogger(__name__)

_MIN_SIDE = 16  # smallest frame side accepted, pixels
_MIN_SMALL_SIDE = 16  # smallest low-resolution side the coarse stage works on
_FLAT_STD = 0.25  # grey levels: below this a frame has no usable contrast
_RUNNER_UP = 0.1  # low-resolution NCC gap under which the second candidate is refined too
_DEFAULT = RegisterConfig()  # frozen: sharing one instance is safe


class Registrar:
    """Estimates the translation between overlapping frames.

    Parameters
    ----------
    config : RegisterConfig
        Resolution, thresholds, filters and methods.

    Notes
    -----
    Filters and pass bands are cached per size at module level (read-only
    arrays); prepared frames carry their own spectra.  Use one instance per
    thread all the same: :class:`Prepared` caches are not locked.
    """

    def __init__(self, config: RegisterConfig = _DEFAULT) -> None:
        if not isinstance(config, RegisterConfig):
            raise ConfigError(f"register: config must be a RegisterConfig, not {config!r}")
        self.config = config

    # -- public ------------------------------------------------------------

    def prepare(self, image: np.ndarray) -> Prepared:
        """Do the per-frame work once: reduce the frame, measure its noise, its spectrum.

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
        small = reduce_blocks(image, f)
        # Block averaging divides the noise, not a real contrast: compare
        # against the threshold scaled the same way.
        flat = float(small.std()) < _FLAT_STD / f
        noise = noise_variance(view)
        # Every 4th pixel each way is plenty for the variance of the frame.
        variance = float(cv2.meanStdDev(np.ascontiguousarray(view[::4, ::4]))[1][0, 0]) ** 2
        reliability = max(1.0 - noise / variance, 0.0) if variance > 0 else 0.0
        prep = Prepared(
            view, small, detail_image(small), f, flat, self.config,
            noise=noise, band=band_image(view, small, f), reliability=reliability,
        )  # fmt: skip
        if not flat:
            coarse_spectrum(prep, f, small.shape, self.config)
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
            ``ok=False`` (with ``why``) when no trustworthy translation was found.

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
            return IDENTICAL
        if ref.flat or mov.flat:
            log.debug("register: blank frame, nothing to match")
            return self._failed(ref, mov, predicted, "blank")
        candidates = coarse_candidates(ref, mov, predicted, search_px, cfg)
        if not candidates:
            log.debug("register: no coarse candidate with enough overlap and correlation")
            return self._failed(ref, mov, predicted, "no_candidate")
        best = self._fine(ref, mov, candidates[0], predicted, search_px)
        if len(candidates) > 1 and candidates[0].rank - candidates[1].rank < _RUNNER_UP:
            # A close runner-up (repeated structure) is settled at full resolution.
            other = self._fine(ref, mov, candidates[1], predicted, search_px)
            distinct = math.hypot(other.dx - best.dx, other.dy - best.dy) > 1.0
            if (distinct or not best.ok) and (other.ok, other.signal) > (best.ok, best.signal):
                best = other
        return self._against_rivals(ref, mov, best, candidates)

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
            shift = self._fine(ref, mov, Candidate(guess[0], guess[1], 0.0, 0.0), guess, bound)
            if shift.ok:
                return shift
        return self.register(ref, mov, guess, search_px)

    # -- internals ---------------------------------------------------------

    def _check_prepared(self, *frames: Prepared) -> None:
        for prep in frames:
            if not isinstance(prep, Prepared) or prep.owner != self.config:
                raise RegistrationError(
                    "register: frames must come from prepare() of a registrar with this "
                    "configuration"
                )

    def _fine(
        self,
        ref: Prepared,
        mov: Prepared,
        cand: Candidate,
        predicted: tuple[float, float] | None,
        search_px: float | None,
    ) -> Shift:
        """Refine a coarse candidate at full resolution, measure and judge it."""
        cfg = self.config
        ix, iy = round(cand.dx), round(cand.dy)
        (hr, wr), (hm, wm) = ref.shape, mov.shape
        x0, x1 = max(0, ix), min(wr, ix + wm)
        y0, y1 = max(0, iy), min(hr, iy + hm)
        lowpass, whitening, side = noise_adapted(min(ref.reliability, mov.reliability), cfg)
        win_w, win_h = window_size(x1 - x0, y1 - y0, side)
        res = None
        if win_w >= MIN_WINDOW and win_h >= MIN_WINDOW:
            cx = x0 + (x1 - x0 - win_w) // 2
            cy = y0 + (y1 - y0 - win_h) // 2
            ra = ref.image[cy : cy + win_h, cx : cx + win_w]
            ma = mov.image[cy - iy : cy - iy + win_h, cx - ix : cx - ix + win_w]
            res = residual(ra, ma, max(ref.factor, mov.factor) + 2, cfg, lowpass, whitening)
        fx, fy = (ix + res[0], iy + res[1]) if res is not None else (cand.dx, cand.dy)
        rx, ry = round(fx), round(fy)
        if rx == 0 and ry == 0 and np.array_equal(ref.image, mov.image):
            # A repeated frame: say so exactly rather than to float rounding.
            return IDENTICAL
        factor = min(ref.factor, mov.factor)
        detail = ncc(
            ref.small_at(factor)[1], mov.small_at(factor)[1], round(fx / factor), round(fy / factor)
        )
        ov = overlap(fx, fy, ref.shape, mov.shape)
        agree = agreement(ref, mov, rx, ry, cfg.fine_window)
        why = trustworthy(agree, cfg)
        if res is None:
            why = "not_refined"
        elif ov < cfg.min_overlap:
            why = "small_overlap"
        elif (
            not why
            and predicted is not None
            and search_px is not None
            and math.hypot(fx - predicted[0], fy - predicted[1]) > search_px + 1.0
        ):
            why = "off_prediction"
        if why:
            log.debug(
                "register: rejected (%.2f, %.2f), %s: signal %.3f, band_z %.1f, "
                "reliability %.3f, overlap %.3f",
                fx, fy, why, agree.signal, agree.band_z, agree.reliability, ov,
            )  # fmt: skip
        return Shift(
            float(fx), float(fy), agree.ncc, not why, float(ov),
            float(detail), agree.signal, agree.band_z, agree.reliability, 0.0, why,
        )  # fmt: skip

    def _against_rivals(
        self, ref: Prepared, mov: Prepared, best: Shift, candidates: list[Candidate]
    ) -> Shift:
        """Record the best competing candidate's agreement; reject a match that is not unique.

        Look-alike structures (spheres on a substrate, lamellae) let a wrong
        shift agree nearly as well as the right one; a true match stands
        clear of every other candidate, an ambiguous one does not.
        """
        cfg = self.config
        factor = min(ref.factor, mov.factor)
        rival = 0.0
        for c in candidates[: cfg.peaks] if best.ok else []:
            if math.hypot(c.dx - best.dx, c.dy - best.dy) > 2 * factor:
                other = agreement(ref, mov, round(c.dx), round(c.dy), cfg.fine_window, band=False)
                rival = max(rival, other.signal)
        twofold = best.ok and ambiguous(best.signal, rival, best.reliability, cfg)
        if twofold:
            log.debug("register: ambiguous: signal %.3f, rival %.3f", best.signal, rival)
        return dataclasses.replace(
            best,
            rival=float(rival),
            ok=best.ok and not twofold,
            why="ambiguous" if twofold else best.why,
        )

    def _failed(
        self, ref: Prepared, mov: Prepared, predicted: tuple[float, float] | None, why: str
    ) -> Shift:
        dx, dy = predicted if predicted is not None else (0.0, 0.0)
        return Shift(dx, dy, 0.0, False, overlap(dx, dy, ref.shape, mov.shape), why=why)
