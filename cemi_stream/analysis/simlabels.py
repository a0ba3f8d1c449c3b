"""Simulated training data for the lamellar segmenter (``train-segmenter --sim N``).

Each specimen is a square field of signal yield in which a random **region
mask** (smooth blobs or Voronoi colonies, sometimes none or all) holds
lamellae and the rest holds non-lamellar texture; the yield is then imaged
by the virtual SEM (:class:`drivers.sim.scanner.Scanner`: beam blur,
scan-line jitter, shot and detector noise, detector bandwidth, 8-bit
rounding) at one of several doses.  The mask is exact: it is the region the
lamellar texture was put in (the scanner keeps frame pixel ``(i, j)`` on
specimen pixel ``(i, j)``).

Lamellae come from the procedural eutectic of :mod:`drivers.sim.eutectic`
(colonies of bent lamellae with terminations, boundary bands) at a random
magnification (periods of about 3-22 px), or straight parallel lamellae
(sine, square or thin lines) of one period and direction.  Non-lamellar
textures: isotropic blobs, particles / spheroids on a matrix (like
spheroidite), grains with dark boundaries, a carbide-like network of
bands, smooth mottled matrix, and a few isolated scratches (oriented but not
periodic).  A random appearance (grey levels, gamma, inversion, secondary
electron edge contrast, slow shading) is applied to the whole field, so
that neither grey level nor contrast tells lamellar from non-lamellar.

Arrays are ``(y, x)``; lengths are pixels.  Everything is a pure function
of ``(seed, index)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from drivers.sim.eutectic import EutecticParams, render_eutectic
from drivers.sim.fields import fbm_noise, value_noise
from drivers.sim.scanner import Scanner, scaled_preset

from ..errors import AnalysisError

#: Side of a simulated specimen by default, px.
DEFAULT_SIZE = 288
#: Margin rendered around the field for the scanner's blur and bandwidth filter, px.
_MARGIN = 32
#: Imaging conditions drawn per specimen: (preset, noise scale), a dose series from
#: the slow scan to twice the fast scan's noise; in this order, cleanest first.
DOSES: tuple[tuple[str, float], ...] = (
    ("none", 1.0),
    ("hd", 1.0),
    ("ld", 0.5),
    ("ld", 1.0),
    ("ld", 1.6),
    ("ld", 2.0),
)
_DOSE_WEIGHTS = (0.15, 0.3, 0.2, 0.15, 0.1, 0.1)
#: Lamellae finer than this (px) are imaged at most at the third dose (ld x 0.5): at
#: the fast scan's noise they are invisible, and their mask would be label noise.
_FINE_PERIOD_PX = 6.0
BACKGROUNDS = ("blobs", "particles", "spheroidite", "grains", "network", "smooth")
_BACKGROUND_WEIGHTS = (0.15, 0.2, 0.25, 0.15, 0.15, 0.1)


@dataclass(frozen=True)
class SimSample:
    """One simulated specimen.

    Attributes
    ----------
    image : ndarray
        ``(y, x)`` uint8 frame from the virtual SEM.
    mask : ndarray
        ``(y, x)`` bool, True where the lamellar texture was placed.
    info : dict
        How it was made (region kind, lamellae kind and period, background,
        dose), JSON-serialisable.
    """

    image: np.ndarray
    mask: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


class _ArraySpecimen:
    """A yield array with a margin, as a :class:`drivers.sim.specimen.Specimen`."""

    def __init__(self, field_: np.ndarray, margin: int) -> None:
        self.field = np.ascontiguousarray(field_, dtype=np.float32)
        self.margin = margin

    def region(self, x0: float, y0: float, width: int, height: int) -> np.ndarray:
        h, w = self.field.shape
        iy = np.arange(height) + math.floor(y0) + self.margin
        ix = np.arange(width) + math.floor(x0) + self.margin
        out: np.ndarray = self.field[np.clip(iy, 0, h - 1)[:, None], np.clip(ix, 0, w - 1)[None]]
        return out


# --------------------------------------------------------------------------- regions


def _region_mask(rng: np.random.Generator, n: int, seed: int) -> tuple[np.ndarray, str]:
    """Lamellar region of an ``n`` x ``n`` field (bool) and its kind."""
    u = rng.uniform()
    if u < 0.14:
        return np.zeros((n, n), bool), "none"
    if u < 0.24:
        return np.ones((n, n), bool), "all"
    x0, y0 = (int(v) for v in rng.integers(0, 1 << 20, 2))
    if u < 0.62:
        scale = float(rng.uniform(40, 180))
        noise = fbm_noise(x0, y0, n, n, scale, 2, seed, 7)
        level = float(np.quantile(noise, rng.uniform(0.2, 0.8)))
        return noise > level, "blobs"
    # Voronoi colonies, a random subset lamellar.
    cells = int(rng.integers(3, 12))
    pts = rng.uniform(0, n, (cells, 2)).astype(np.float32)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    d = (xx[None] - pts[:, 0, None, None]) ** 2 + (yy[None] - pts[:, 1, None, None]) ** 2
    label = np.argmin(d, axis=0)
    chosen = rng.uniform(size=cells) < rng.uniform(0.3, 0.7)
    if not chosen.any():
        chosen[int(rng.integers(cells))] = True
    return chosen[label], "colonies"


# --------------------------------------------------------------------------- lamellae


def _eutectic(rng: np.random.Generator, n: int, seed: int) -> tuple[np.ndarray, float]:
    scale = float(np.exp(rng.uniform(math.log(0.25), math.log(1.4))))
    colony = float(rng.uniform(90, 420)) / scale
    params = EutecticParams(
        colony_px=colony,
        colony_warp_px=float(rng.uniform(0.05, 0.2)) * colony,
        period_px=(10.0, 16.0),
        orientation_spread_deg=float(rng.uniform(20, 90)),
        bend_px=float(rng.uniform(1.0, 14.0)),
        boundary_px=float(rng.uniform(1.0, 5.0)),
        particle_cell_px=max(52.0, 14.0 / scale),
        particle_probability=float(rng.uniform(0.0, 0.25)),
        particle_radius_px=(4.0, 10.0),
        scale=scale,
    )
    x0, y0 = (int(v) for v in rng.integers(-(1 << 20), 1 << 20, 2))
    out = render_eutectic(x0, y0, n, n, seed, params)
    return out, 13.0 * scale


def _straight(rng: np.random.Generator, n: int) -> tuple[np.ndarray, float]:
    period = float(np.exp(rng.uniform(math.log(3.0), math.log(24.0))))
    angle = float(rng.uniform(-math.pi / 2, math.pi / 2))
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    bend = (
        value_noise(0, 0, n, n, float(rng.uniform(40, 120)), int(rng.integers(1 << 30)), 3) - 0.5
    ) * np.float32(rng.uniform(0, 2.5) * period)
    u = xx * math.cos(angle) + yy * math.sin(angle) + bend
    phase = (u / period + rng.uniform()) % 1.0
    wave = rng.choice(["sine", "square", "lines"])
    if wave == "sine":
        lam = 0.5 + 0.5 * np.cos(2 * np.pi * phase)
    else:
        duty = 0.5 if wave == "square" else float(rng.uniform(0.15, 0.35))
        lam = (phase < duty).astype(np.float32)
        lam = cv2.GaussianBlur(lam, (0, 0), 0.6)
    lo, hi = sorted(rng.uniform(0.05, 0.95, 2))
    if hi - lo < 0.25:
        hi = min(1.0, lo + 0.25)
    return (lo + (hi - lo) * lam).astype(np.float32), period


# --------------------------------------------------------------------------- backgrounds


def _blobs(rng: np.random.Generator, n: int) -> np.ndarray:
    sigma = float(rng.uniform(1.2, 8.0))
    noise = cv2.GaussianBlur(rng.standard_normal((n, n)).astype(np.float32), (0, 0), sigma)
    level = float(np.quantile(noise, rng.uniform(0.3, 0.8)))
    soft = cv2.GaussianBlur((noise > level).astype(np.float32), (0, 0), 0.7)
    lo, hi = sorted(rng.uniform(0.05, 0.95, 2))
    return lo + (hi - lo) * soft


def _ellipses(rng: np.random.Generator, n: int, r_lo: float, r_hi: float, cover: float,
              elongation: float) -> np.ndarray:  # fmt: skip
    """Filled ellipses (radii ``r_lo..r_hi`` px, aspect up to ``elongation``) covering
    about ``cover`` of an ``n`` x ``n`` float image (1 inside, antialiased)."""
    count = int(cover * n * n / (math.pi * (0.5 * (r_lo + r_hi)) ** 2))
    img = np.zeros((n, n), np.float32)
    for y, x, r, e, a in zip(
        rng.uniform(0, n, count),
        rng.uniform(0, n, count),
        rng.uniform(r_lo, r_hi, count),
        rng.uniform(1.0, elongation, count),
        rng.uniform(0, 180, count),
        strict=True,
    ):
        axes = (max(1, round(r * e)), max(1, round(r)))
        cv2.ellipse(img, (int(x), int(y)), axes, float(a), 0, 360, 1.0, -1, cv2.LINE_AA)
    return img


def _particles(rng: np.random.Generator, n: int) -> np.ndarray:
    matrix = float(rng.uniform(0.05, 0.6))
    bright = float(rng.uniform(matrix + 0.2, 1.0)) if matrix < 0.8 else 1.0
    r_lo = float(rng.uniform(0.8, 4.0))
    r_hi = r_lo * float(rng.uniform(1.2, 3.0))
    cover = float(rng.uniform(0.04, 0.35))
    img = _ellipses(rng, n, r_lo, r_hi, cover, 1.8)
    img = np.clip(img, 0, 1)
    return matrix + (bright - matrix) * img


def _spheroidite(rng: np.random.Generator, n: int, seed: int) -> np.ndarray:
    """Dense small carbide particles (r 1-3.5 px, some elongated) on a textured matrix."""
    matrix = _smooth(rng, n, seed)
    r_lo = float(rng.uniform(0.8, 2.0))
    r_hi = r_lo * float(rng.uniform(1.3, 2.5))
    cover = float(rng.uniform(0.12, 0.45))
    img = _ellipses(rng, n, r_lo, r_hi, cover, 2.5)
    level = float(rng.uniform(0.6, 1.0))
    out: np.ndarray = matrix + (level - matrix) * np.clip(img, 0, 1)
    return out


def _voronoi(rng: np.random.Generator, n: int, size: float) -> tuple[np.ndarray, np.ndarray]:
    """Cell labels and distance to the nearest cell boundary (px) of a random Voronoi diagram."""
    count = max(4, int((n / size) ** 2))
    pts = rng.uniform(-size, n + size, (count, 2)).astype(np.float32)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    d1 = np.full((n, n), np.inf, np.float32)
    d2 = np.full((n, n), np.inf, np.float32)
    lab = np.zeros((n, n), np.int32)
    p1 = np.zeros((n, n, 2), np.float32)
    for k, (px, py) in enumerate(pts):
        d = (xx - px) ** 2 + (yy - py) ** 2
        closer = d < d1
        d2 = np.where(closer, d1, np.minimum(d2, d))
        d1 = np.where(closer, d, d1)
        lab = np.where(closer, k, lab)
        p1[closer] = (px, py)
    # (d2 - d1) / (2 |p2 - p1|) is the bisector distance; |p2 - p1| >= sqrt(d2) - sqrt(d1).
    dist = (np.sqrt(d2) - np.sqrt(d1)) / 2.0
    return lab, dist


def _grains(rng: np.random.Generator, n: int) -> np.ndarray:
    lab, dist = _voronoi(rng, n, float(rng.uniform(12, 90)))
    greys = rng.uniform(0.3, 0.9, lab.max() + 1).astype(np.float32)
    spread = float(rng.uniform(0.02, 0.3))
    base = float(rng.uniform(0.3, 0.8))
    img = base + (greys[lab] - 0.6) * spread * 3
    width = float(rng.uniform(0.5, 2.5))
    edge = np.clip(width + 0.5 - dist, 0, 1)
    boundary = float(rng.uniform(0.0, 0.25)) if rng.uniform() < 0.7 else float(rng.uniform(0.8, 1))
    out: np.ndarray = img * (1 - edge) + boundary * edge
    return out


def _network(rng: np.random.Generator, n: int, seed: int) -> np.ndarray:
    x0, y0 = (int(v) for v in rng.integers(0, 1 << 20, 2))
    ridge = np.abs(fbm_noise(x0, y0, n, n, float(rng.uniform(50, 200)), 3, seed, 9) - 0.5)
    width = float(rng.uniform(0.01, 0.05))
    band = np.clip((width - ridge) / 0.01, 0, 1)
    matrix = _smooth(rng, n, seed)
    level = float(rng.uniform(0.6, 1.0)) if rng.uniform() < 0.6 else float(rng.uniform(0, 0.3))
    out: np.ndarray = matrix * (1 - band) + level * band
    return out


def _smooth(rng: np.random.Generator, n: int, seed: int) -> np.ndarray:
    x0, y0 = (int(v) for v in rng.integers(0, 1 << 20, 2))
    mottle = fbm_noise(x0, y0, n, n, float(rng.uniform(6, 60)), 3, seed, 5) - 0.5
    out: np.ndarray = float(rng.uniform(0.2, 0.8)) + float(rng.uniform(0.02, 0.2)) * mottle
    return out


def _scratches(rng: np.random.Generator, img: np.ndarray) -> None:
    n = img.shape[0]
    for _ in range(int(rng.integers(1, 4))):
        p0 = tuple(int(v) for v in rng.uniform(0, n, 2))
        p1 = tuple(int(v) for v in rng.uniform(0, n, 2))
        cv2.line(img, p0, p1, float(rng.uniform(0, 1)), int(rng.integers(1, 3)), cv2.LINE_AA)


def _background(rng: np.random.Generator, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    kinds = [str(rng.choice(BACKGROUNDS, p=_BACKGROUND_WEIGHTS))]
    if rng.uniform() < 0.3:
        kinds.append(str(rng.choice(BACKGROUNDS, p=_BACKGROUND_WEIGHTS)))
    layers = []
    for kind in kinds:
        if kind == "blobs":
            layers.append(_blobs(rng, n))
        elif kind == "particles":
            layers.append(_particles(rng, n))
        elif kind == "spheroidite":
            layers.append(_spheroidite(rng, n, seed))
        elif kind == "grains":
            layers.append(_grains(rng, n))
        elif kind == "network":
            layers.append(_network(rng, n, seed))
        else:
            layers.append(_smooth(rng, n, seed))
    if len(layers) == 2:  # the two textures side by side along a smooth boundary
        x0, y0 = (int(v) for v in rng.integers(0, 1 << 20, 2))
        w = np.clip((fbm_noise(x0, y0, n, n, 120.0, 2, seed, 8) - 0.5) * 8 + 0.5, 0, 1)
        bg = layers[0] * (1 - w) + layers[1] * w
    else:
        bg = layers[0]
    bg = np.ascontiguousarray(bg, dtype=np.float32)
    if rng.uniform() < 0.15:
        _scratches(rng, bg)
        kinds.append("scratches")
    return bg, kinds


# --------------------------------------------------------------------------- appearance


def _appearance(rng: np.random.Generator, img: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """Random grey-level appearance of a whole field (both classes alike)."""
    n = img.shape[0]
    look = "plain"
    u = rng.uniform()
    if u < 0.35:  # secondary electrons, topographic: relief lit from one side (etched phases)
        height = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.7, 2.0)))
        gx = cv2.Sobel(height, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(height, cv2.CV_32F, 0, 1, ksize=3)
        phi = float(rng.uniform(0, 2 * math.pi))
        relief = gx * math.cos(phi) + gy * math.sin(phi)
        relief /= max(float(np.percentile(np.abs(relief), 99)), 1e-3)
        img = float(rng.uniform(0.0, 0.6)) * img + float(rng.uniform(0.3, 0.8)) * relief
        look = "se-relief"
    elif u < 0.65:  # secondary electrons: overshooting, bright edges (etched, in SE)
        wide = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(1.5, 5.0)))
        img = img + float(rng.uniform(0.5, 2.5)) * (img - wide)
        if rng.uniform() < 0.5:  # plus a little edge brightness (doubles fine periods: weak)
            gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3)
            gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3)
            edge = np.sqrt(gx * gx + gy * gy)
            edge /= max(float(np.percentile(edge, 99)), 1e-3)
            img = img + float(rng.uniform(0.1, 0.3)) * np.clip(edge, 0, 1.5)
        look = "se-edges"
    if rng.uniform() < 0.25:
        img = 1.0 - img
        look += "+inverted"
    lo, hi = np.percentile(img, [1, 99])
    img = (img - lo) / max(float(hi - lo), 1e-3)
    img = np.clip(img, 0, 1) ** np.float32(np.exp(rng.uniform(-0.6, 0.6)))
    a, b = sorted(rng.uniform(0.0, 1.0, 2))
    if b - a < 0.3:
        a, b = max(0.0, a - 0.15), min(1.0, b + 0.15)
    x0, y0 = (int(v) for v in rng.integers(0, 1 << 20, 2))
    shade = fbm_noise(x0, y0, n, n, float(rng.uniform(150, 600)), 2, seed, 6) - 0.5
    img = a + (b - a) * img + float(rng.uniform(0, 0.25)) * shade
    return np.clip(img, 0, 1).astype(np.float32), look


# --------------------------------------------------------------------------- specimen


def sim_sample(index: int, seed: int = 0, size: int = DEFAULT_SIZE) -> SimSample:
    """Simulated specimen ``index`` of the series ``seed``: an SEM frame and its lamellar mask.

    Parameters
    ----------
    index : int
        Specimen number (>= 0); each gives a different specimen.
    seed : int
        Series seed; the same ``(seed, index)`` always gives the same sample.
    size : int
        Side of the square frame, px (>= 32).

    Returns
    -------
    SimSample
        ``image`` uint8 ``(size, size)``, ``mask`` bool ``(size, size)``, ``info``.

    Raises
    ------
    AnalysisError
        A negative index or seed or a size below 32.
    """
    for name, value, least in (("index", index, 0), ("seed", seed, 0), ("size", size, 32)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
            raise AnalysisError(f"sim {name}: expected an integer >= {least}, got {value!r}")
    rng = np.random.default_rng([int(seed), int(index), 0x5E6])
    sub_seed = int(rng.integers(0, 1 << 31))
    n = int(size) + 2 * _MARGIN
    region, region_kind = _region_mask(rng, n, sub_seed)
    info: dict[str, Any] = {"index": int(index), "seed": int(seed), "region": region_kind}
    if region.any():
        if rng.uniform() < 0.65:
            lam, period = _eutectic(rng, n, sub_seed)
            info["lamellae"] = "eutectic"
        else:
            lam, period = _straight(rng, n)
            info["lamellae"] = "straight"
        info["period_px"] = round(float(period), 2)
    else:
        lam = np.zeros((n, n), np.float32)
    if region.all():
        bg = np.zeros((n, n), np.float32)
        info["background"] = []
    else:
        bg, kinds = _background(rng, n, sub_seed)
        info["background"] = kinds
    soft = cv2.GaussianBlur(region.astype(np.float32), (0, 0), 0.6)
    yield_ = lam * soft + bg * (1 - soft)
    if rng.uniform() < 0.4:  # fine isotropic texture over both classes (etching, grain)
        x0, y0 = (int(v) for v in rng.integers(0, 1 << 20, 2))
        fine = fbm_noise(x0, y0, n, n, float(rng.uniform(1.5, 4.0)), 2, sub_seed, 4) - 0.5
        yield_ = yield_ + float(rng.uniform(0.05, 0.3)) * fine
        info["fine_texture"] = True
    yield_, info["look"] = _appearance(rng, yield_, sub_seed)
    weights = np.array(_DOSE_WEIGHTS)
    if info.get("period_px", np.inf) < _FINE_PERIOD_PX:
        weights[3:] = 0.0
    preset, noise_scale = DOSES[int(rng.choice(len(DOSES), p=weights / weights.sum()))]
    info["dose"] = f"{preset}x{noise_scale:g}"
    scanner = Scanner(scaled_preset(preset, noise_scale))
    frame = scanner.render(
        _ArraySpecimen(yield_, _MARGIN),
        0.0,
        0.0,
        int(size),
        int(size),
        np.random.default_rng(int(rng.integers(0, 1 << 31))),
    )
    mask = region[_MARGIN : _MARGIN + size, _MARGIN : _MARGIN + size].copy()
    info["lamellar_fraction"] = round(float(mask.mean()), 4)
    return SimSample(frame, mask, info)


def sim_samples(
    count: int, seed: int = 0, size: int = DEFAULT_SIZE, start: int = 0
) -> list[SimSample]:
    """Specimens ``start .. start + count - 1`` of series ``seed`` (:func:`sim_sample`)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise AnalysisError(f"--sim: expected a non-negative number of specimens, got {count!r}")
    return [sim_sample(start + i, seed, size) for i in range(count)]


__all__ = ["BACKGROUNDS", "DEFAULT_SIZE", "DOSES", "SimSample", "sim_sample", "sim_samples"]
