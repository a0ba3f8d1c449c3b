"""The SEM imaging model: specimen signal yield -> one 8-bit frame.

Steps, in the order the physics applies them:

1. beam spot: Gaussian blur of the specimen (sigma ``blur_sigma_px``);
2. scanning: the frame is sampled at its sub-pixel specimen position, each
   scan line shifted by its own small random amount (scan-line jitter);
3. signal: the yield is mapped (brightness/contrast) to a mean number of
   detected electrons per pixel, ``dose_e * (base + (1 - base) * yield)``;
4. shot noise plus detector noise: ``N = lam + sqrt(lam + read_e**2) * z``,
   ``z`` standard normal.  This Gaussian approximation of Poisson noise has
   exactly the Poisson mean and variance; it ignores only the skew
   (``1/sqrt(lam)``), which the detector bandwidth filter below averages down.
   It is taken because numpy's Poisson sampler costs ~60 ms per 1024x768
   frame here against ~3 ms for this; the normals come from an inverse-CDF
   table indexed by 16-bit uniform integers (tails cut at 4.3 sigma);
5. detector bandwidth: a causal exponential filter along each scan line,
   which smears edges in the scan direction and makes neighbouring pixels'
   noise correlated (as measured on real fast scans); its centroid lag is
   compensated in the sampling so the true frame position is unchanged;
6. conversion to grey levels, 8-bit rounding with clipping;
7. optionally a burned-in data bar over the bottom rows.

Presets ``ld``/``hd`` are calibrated against the real KRISS fast (100 ns) and
slow (30 us) scans by ``bench/calibrate_sim.py``; ``none`` is blur only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cache
from statistics import NormalDist

import cv2
import numpy as np

from cemi_stream.errors import ConfigError

from .databar import burn_databar
from .specimen import Specimen


@dataclass(frozen=True, slots=True)
class ScanPreset:
    """Imaging conditions of one scan speed.

    Attributes
    ----------
    name : str
        Preset name (``"ld"``, ``"hd"``, ``"none"``).
    blur_sigma_px : float
        Beam spot Gaussian sigma in pixels.
    dose_e : float
        Mean detected electrons per pixel at signal yield 1; 0 disables shot
        and detector noise.
    base_yield : float
        Brightness: fraction of the full signal detected at yield 0.
    white_grey : float
        Mean grey level (0..255) of yield 1.
    read_noise_e : float
        Detector/amplifier noise in electrons rms, added before the
        bandwidth filter.
    line_jitter_px : float
        Rms horizontal displacement of each scan line in pixels.
    bandwidth_pole : float
        Pole ``a`` of the causal detector filter ``(1 - a) a**k``; 0 = none.
        The lag-1 autocorrelation of white noise after it is about ``a``.
    dwell : str
        Dwell time printed in the data bar.
    """

    name: str
    blur_sigma_px: float
    dose_e: float
    base_yield: float
    white_grey: float
    read_noise_e: float
    line_jitter_px: float
    bandwidth_pole: float
    dwell: str


PRESETS: dict[str, ScanPreset] = {
    # Fast scan (100 ns dwell): 25 electrons at full signal, pure shot noise
    # (real variance is proportional to grey level with no offset) and a
    # detector bandwidth giving the measured lag-1 noise correlation of 0.48.
    # Calibrated on kriss-sem-pairs time/low (bench/calibrate_sim.py).
    "ld": ScanPreset(
        name="ld",
        blur_sigma_px=0.8,
        dose_e=25.0,
        base_yield=0.02,
        white_grey=245.0,
        read_noise_e=0.0,
        line_jitter_px=0.15,
        bandwidth_pole=0.50,
        dwell="100 ns",
    ),
    # Slow scan (30 us dwell; 380x the LD dose, close to the 300x dwell
    # ratio): shot noise now comparable to the detector's own noise (variance
    # grows only as grey**0.5), and a weaker bandwidth correlation (0.19).
    # Calibrated on kriss-sem-pairs time/high.
    "hd": ScanPreset(
        name="hd",
        blur_sigma_px=0.8,
        dose_e=9500.0,
        base_yield=0.02,
        white_grey=245.0,
        read_noise_e=42.0,
        line_jitter_px=0.05,
        bandwidth_pole=0.19,
        dwell="30 us",
    ),
    # Noise-free: beam blur only (ground-truth and registration tests).
    "none": ScanPreset(
        name="none",
        blur_sigma_px=0.8,
        dose_e=0.0,
        base_yield=0.02,
        white_grey=245.0,
        read_noise_e=0.0,
        line_jitter_px=0.0,
        bandwidth_pole=0.0,
        dwell="0 ns",
    ),
}

_MARGIN_PX = 8


def scaled_preset(name: str, noise_scale: float = 1.0) -> ScanPreset:
    """Preset ``name`` with its relative shot noise multiplied by ``noise_scale``.

    Shot noise relative to the signal goes as ``1 / sqrt(dose)``, so the dose
    is divided by ``noise_scale ** 2`` and the detector noise (electrons) kept;
    ``noise_scale`` 4 is "4x noisier".  The noise-free preset stays noise-free.

    Raises
    ------
    ConfigError
        An unknown preset or a non-positive scale.
    """
    if name not in PRESETS:
        raise ConfigError(f"sim.noise: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    if not noise_scale > 0:
        raise ConfigError(f"sim.noise_scale: {noise_scale!r} must be > 0")
    preset = PRESETS[name]
    if noise_scale == 1.0 or preset.dose_e == 0:
        return preset
    return dataclasses.replace(
        preset, name=f"{name}x{noise_scale:g}", dose_e=preset.dose_e / noise_scale**2
    )


@cache
def _normal_table() -> np.ndarray:
    """Standard normal quantiles at the centres of 65536 equal-probability bins."""
    dist = NormalDist()
    probs = (np.arange(65536) + 0.5) / 65536.0
    return np.array([dist.inv_cdf(float(p)) for p in probs], dtype=np.float32)


def standard_normal(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Fast float32 standard normal samples (16-bit inverse-CDF table).

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    shape : (int, int)
        Output shape ``(y, x)``.

    Returns
    -------
    ndarray of float32
        Samples with mean 0 and variance 1 (to 1e-4), tails cut at 4.3 sigma.
    """
    index = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    out: np.ndarray = np.take(_normal_table(), index)
    return out


def bandwidth_kernel(pole: float) -> tuple[np.ndarray, float]:
    """Causal exponential detector filter as an OpenCV correlation kernel.

    Parameters
    ----------
    pole : float
        Filter pole ``a`` in ``[0, 1)``.

    Returns
    -------
    (kernel, lag)
        ``kernel`` is ``(1, 2K-1)`` float32 for :func:`cv2.filter2D` with the
        default (centre) anchor, non-zero only on the "past" side, so that
        ``out[x] = sum_k h[k] in[x - k]``; ``lag`` is the filter centroid in
        pixels (how far it moves features along the scan direction).
    """
    if pole <= 0.0:
        return np.ones((1, 1), dtype=np.float32), 0.0
    taps = max(2, math.ceil(math.log(1e-3) / math.log(pole)))
    h = (1.0 - pole) * pole ** np.arange(taps)
    h /= h.sum()
    lag = float((np.arange(taps) * h).sum())
    kernel = np.zeros((1, 2 * taps - 1), dtype=np.float32)
    kernel[0, :taps][::-1] = h
    return kernel, lag


class Scanner:
    """Renders frames of a specimen with one preset.

    Parameters
    ----------
    preset : ScanPreset or str
        Imaging conditions or a key of :data:`PRESETS`.
    databar : bool
        Burn a data bar into the bottom rows.
    pixel_size_nm : float
        Pixel size in nanometres (only used for the data bar text).
    """

    def __init__(
        self, preset: ScanPreset | str = "ld", databar: bool = False, pixel_size_nm: float = 220.0
    ) -> None:
        if isinstance(preset, str):
            if preset not in PRESETS:
                known = ", ".join(PRESETS)
                raise ConfigError(f"sim.noise: unknown preset {preset!r} (known: {known})")
            preset = PRESETS[preset]
        self.preset = preset
        self.databar = databar
        self.pixel_size_nm = pixel_size_nm
        self._kernel, self._lag = bandwidth_kernel(preset.bandwidth_pole)
        # Columns rendered left of the frame so the causal filter has a real
        # past at the left edge instead of a reflected one.
        self._lead = self._kernel.shape[1] // 2
        self._grids: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _grid(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        key = (width, height)
        if key not in self._grids:
            start = _MARGIN_PX - self._lead
            xs = np.arange(start, start + width + self._lead, dtype=np.float32)
            ys = np.arange(height, dtype=np.float32) + np.float32(_MARGIN_PX)
            self._grids = {key: (xs, ys)}
        return self._grids[key]

    def mean_grey(self, signal: np.ndarray) -> np.ndarray:
        """Noise-free grey level (float32, not rounded) of a yield array."""
        p = self.preset
        a = np.float32(p.white_grey * (1.0 - p.base_yield))
        b = np.float32(p.white_grey * p.base_yield)
        out: np.ndarray = signal * a + b
        return out

    def render(
        self,
        specimen: Specimen,
        x0: float,
        y0: float,
        width: int,
        height: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Acquire one frame.

        Parameters
        ----------
        specimen : Specimen
            What is imaged.
        x0, y0 : float
            True specimen position of the frame's top-left pixel, in pixels.
        width, height : int
            Frame size in pixels.
        rng : numpy.random.Generator
            Randomness of this frame (noise and scan-line jitter).

        Returns
        -------
        ndarray of uint8
            ``(y, x)`` frame of shape ``(height, width)``.
        """
        p = self.preset
        m = _MARGIN_PX
        lead = self._lead
        ix, iy = math.floor(x0), math.floor(y0)
        fx, fy = x0 - ix, y0 - iy
        patch = specimen.region(
            float(ix - m - lead), float(iy - m), width + 2 * m + lead, height + 2 * m
        )
        if p.blur_sigma_px > 0:
            patch = cv2.GaussianBlur(patch, (0, 0), p.blur_sigma_px)

        xs, ys = self._grid(width, height)
        # The patch starts ``lead`` columns further left, hence ``+ lead``.
        shift_x = np.float32(fx + self._lag + lead)
        full_w = width + lead
        if p.line_jitter_px > 0:
            jitter = rng.normal(0.0, p.line_jitter_px, height).astype(np.float32)
            jitter = np.clip(jitter, -4.0 * p.line_jitter_px, 4.0 * p.line_jitter_px)
            map_x = (xs + shift_x)[None, :] + jitter[:, None]
        else:
            map_x = np.broadcast_to((xs + shift_x)[None, :], (height, full_w))
        map_x = np.ascontiguousarray(map_x, dtype=np.float32)
        map_y = np.ascontiguousarray(
            np.broadcast_to((ys + np.float32(fy))[:, None], (height, full_w)), dtype=np.float32
        )
        signal = cv2.remap(patch, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

        if p.dose_e > 0:
            lam = signal * np.float32(p.dose_e * (1.0 - p.base_yield))
            lam += np.float32(p.dose_e * p.base_yield)
            sd = np.sqrt(lam + np.float32(p.read_noise_e**2))
            sd *= standard_normal(rng, (height, full_w))
            lam += sd
            # Grey conversion folded into the bandwidth filter (one pass).
            kernel = self._kernel * np.float32(p.white_grey / p.dose_e)
            grey: np.ndarray = cv2.filter2D(lam, -1, kernel, borderType=cv2.BORDER_REFLECT)
        elif lead:
            grey = cv2.filter2D(self.mean_grey(signal), -1, self._kernel)
        else:
            grey = self.mean_grey(signal)
        if lead:
            grey = grey[:, lead:]

        grey += np.float32(0.5)
        np.clip(grey, 0.0, 255.0, out=grey)
        frame = grey.astype(np.uint8)
        if self.databar:
            burn_databar(frame, self.pixel_size_nm, p.dwell)
        return frame
