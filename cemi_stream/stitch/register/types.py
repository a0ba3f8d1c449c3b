"""The registration contracts: its configuration, its answer, a prepared frame.

Convention (as in :mod:`cemi_stream.capture.keyframes`): ``(dx, dy)`` is the top-left
corner of ``mov`` minus that of ``ref`` in shared (mosaic) pixels, so
``mov[y, x]`` shows what ``ref[y + dy, x + dx]`` shows; images are ``(y, x)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cemi_stream.errors import CemiError, ConfigError

from .spectral import MIN_WINDOW, detail_image, reduce_blocks

Subpixel = Literal["dft", "parabola", "gauss"]
Edges = Literal["periodic", "hann", "tukey", "none"]


class RegistrationError(CemiError):
    """A frame cannot be registered (wrong type, shape or size)."""


@dataclass(frozen=True, slots=True)
class RegisterConfig:
    """Settings of the translation estimator.

    The acceptance thresholds (``min_reliability`` to ``min_margin``) are
    calibrated by ``bench/bench_accept.py`` over true pairs and hard
    negatives cut from real micrographs, from the HD dose down to 4x the LD
    preset's noise; see :mod:`cemi_stream.stitch.register.accept`.

    Attributes
    ----------
    downsample : int
        Resolution divisor of the coarse stage (4: 1024 x 768 -> 256 x 192).
    search_px : float or None
        Default bound on the distance between the answer and the predicted
        shift, pixels; None searches every shift with enough overlap.
    min_overlap : float
        Smallest overlap accepted, as a fraction of the smaller frame's area.
    min_reliability : float
        Smallest noise-limited NCC ``sqrt(R_ref R_mov)`` of the overlap (``R``:
        the fraction of a side's variance that is signal, not pixel noise)
        for which the overlap's agreement can be judged at all.
    min_band_z : float
        Smallest significance of the band-passed agreement (NCC of the
        band-passed overlaps times the square root of their pixel count).
    signal_tolerance, noise_tolerance : float
        A true match has noise-normalised NCC ``signal`` ~1; accepted are
        ``1 - tol <= signal <= 1 + 3 tol`` with
        ``tol = min(signal_tolerance + noise_tolerance * (1 - rel) / rel, 1)``
        (``rel`` the reliability): tight where the measurement is precise
        (high dose), wider where noise makes it scatter.
    strong_band_z : float
        ``band_z`` beyond which the signal tolerance widens (as the square
        root of ``band_z / strong_band_z``).
    min_margin : float
        How far the answer's ``signal`` must stand above that of any
        competing candidate that would pass as a match itself (periodic and
        look-alike structures: lamellae, spheres); closer is ``ambiguous``.
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
    search_px: float | None = None
    min_overlap: float = 0.05
    min_reliability: float = 0.05
    min_band_z: float = 14.0
    signal_tolerance: float = 0.12
    noise_tolerance: float = 0.1
    min_margin: float = 0.15
    strong_band_z: float = 30.0
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

        for name in ("downsample", "peaks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "must be an integer")
        if not 1 <= self.downsample <= 32:
            raise bad("downsample", "is outside 1..32")
        if not 1 <= self.peaks <= 64:
            raise bad("peaks", "is outside 1..64")
        if self.search_px is not None and not self.search_px >= 0:
            raise bad("search_px", "must be >= 0 or None")
        if not 0.0 < self.min_overlap <= 1.0:
            raise bad("min_overlap", "is outside (0, 1]")
        if not 0.0 < self.min_reliability <= 1.0:
            raise bad("min_reliability", "is outside (0, 1]")
        if not (isinstance(self.strong_band_z, int | float) and self.strong_band_z > 0):
            raise bad("strong_band_z", "must be > 0")
        for name in ("min_band_z", "signal_tolerance", "noise_tolerance"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise bad(name, "must be a finite number >= 0")
        if not -1.0 <= self.min_margin <= 1.0:
            raise bad("min_margin", "is outside -1..1")
        if not MIN_WINDOW <= self.fine_window <= 4096:
            raise bad("fine_window", f"is outside {MIN_WINDOW}..4096")
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
    """A translation estimate and the evidence it was judged on.

    Attributes
    ----------
    dx, dy : float
        Top-left of ``mov`` minus top-left of ``ref``, pixels (x right, y
        down): ``mov[y, x]`` shows ``ref[y + dy, x + dx]``.  When nothing was
        found at all: the predicted shift, or (0, 0).
    score : float
        Zero-mean NCC of the two frames on their overlap at this shift
        (rounded to whole pixels), full resolution; 0 when nothing was found.
        Its scale depends on the noise: use ``signal`` to judge.
    ok : bool
        True when the estimate can be trusted (see
        :func:`cemi_stream.stitch.register.accept.trustworthy`), refined to
        sub-pixel precision, inside the search region.
    overlap : float
        Overlap area as a fraction of the smaller frame's area.
    detail : float
        NCC of the detail (high-passed, reduced) images on the overlap.
    signal : float
        ``score`` divided by the NCC two noisy views of one signal reach
        (~1 for a true match whatever the dose).
    band_z : float
        Significance of the band-passed agreement.
    reliability : float
        The noise-limited NCC ``sqrt(R_ref R_mov)`` of the overlap.
    rival : float
        ``signal`` of the best competing candidate shift (0: none).
    why : str
        Why ``ok`` is False (``""`` when it is True): ``blank``,
        ``no_candidate``, ``not_refined``, ``small_overlap``, ``noise``
        (too little signal to judge), ``insignificant``, ``disagree``,
        ``ambiguous`` or ``off_prediction``.
    """

    dx: float
    dy: float
    score: float
    ok: bool
    overlap: float
    detail: float = 0.0
    signal: float = 0.0
    band_z: float = 0.0
    reliability: float = 0.0
    rival: float = 0.0
    why: str = ""


IDENTICAL = Shift(0.0, 0.0, 1.0, True, 1.0, 1.0, 1.0, math.inf, 1.0)


@dataclass(eq=False, slots=True)
class Prepared:
    """One frame with its per-frame work done, reused by every pair it is in.

    Belongs to the registrar that made it (the cached spectrum carries that
    registrar's filter).

    Attributes
    ----------
    image : ndarray of uint8
        The full-resolution frame ``(y, x)`` (a read-only view, not a copy:
        do not modify the array it came from while it is in use).
    small : ndarray of float32
        The frame reduced ``factor`` times by block averaging, zero mean.
    detail : ndarray of float32
        ``small`` less its Gaussian blur: the fine structure that ranks
        coarse candidates (coarse shapes correlate by chance far too easily).
    factor : int
        Resolution divisor of ``small``.
    flat : bool
        True when the frame has no usable contrast (blank).
    owner : RegisterConfig
        Configuration of the registrar that prepared it.
    noise : float
        Pixel noise variance measured in the frame, grey levels squared
        (:func:`~cemi_stream.stitch.register.accept.noise_variance`).
    band : ndarray of float32 or None
        The frame band-passed at half resolution
        (:func:`~cemi_stream.stitch.register.accept.band_image`).
    reliability : float
        Fraction of the frame's variance that is signal, ``1 - noise / var``.
    """

    image: np.ndarray
    small: np.ndarray
    detail: np.ndarray
    factor: int
    flat: bool
    owner: RegisterConfig = field(repr=False)
    noise: float = 0.0
    band: np.ndarray | None = field(default=None, repr=False)
    reliability: float = 1.0
    # Whitened, filtered low-resolution spectra keyed by (factor, height,
    # width) of the transform; frames of another size need another one.
    spectra: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict, repr=False)
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
            small = reduce_blocks(self.image, factor)
            pair = (small, detail_image(small))
            self._smalls[factor] = pair
        return pair
