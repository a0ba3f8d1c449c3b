"""Procedural lamellar eutectic, rendered block by block from global coordinates.

The microstructure imitates a directionally solidified ternary eutectic seen in
backscattered electrons (compare ``shared/data/eutectic-alcumg``):

* colonies (hashed Voronoi cells of a domain-warped plane, a few hundred
  pixels across), each with its own lamellar orientation, period and phase;
* inside a colony, parallel dark/grey lamellae with a period of ~10-18 px,
  gently bent, with width fluctuations and terminations;
* thin, irregular boundary bands between colonies;
* rounded bright particles of a third phase (hashed per lattice cell);
* fine speckle, mottling of the phases and a slow brightness variation.

Values are the electron signal yield in ``0..1`` (float32).  Everything is a
pure function of the global pixel position and the seed, so any block of the
plane can be rendered on its own and blocks join without seams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .fields import fbm_noise, lattice_uniform, value_noise

# Field salts: one per independent random quantity.
_S_WARP_X, _S_WARP_Y = 11, 12
_S_BEND_X, _S_BEND_Y = 13, 14
_S_SITE_X, _S_SITE_Y = 21, 22
_S_THETA, _S_PERIOD, _S_PHASE, _S_FRACTION = 23, 24, 25, 26
_S_WIDTH, _S_BREAK, _S_BAND, _S_BAND_GREY = 31, 32, 33, 34
_S_PART_ON, _S_PART_X, _S_PART_Y, _S_PART_R = 41, 42, 43, 44
_S_PART_A2, _S_PART_P2, _S_PART_A3, _S_PART_P3 = 45, 46, 47, 48
_S_SPECKLE, _S_MOTTLE, _S_SLOW, _S_GLOBAL = 51, 52, 53, 54


@dataclass(frozen=True, slots=True)
class EutecticParams:
    """Geometry and contrast of the procedural eutectic.

    Attributes
    ----------
    colony_px : float
        Voronoi lattice spacing of the colonies in pixels.
    colony_warp_px : float
        Amplitude of the domain warp that makes colony boundaries irregular.
    period_px : (float, float)
        Range of the lamellar period (dark + grey pair) in pixels.
    orientation_spread_deg : float
        Colony orientations are uniform within +- this angle of a preferred
        growth direction drawn from the seed.
    bend_px : float
        Amplitude of the lamella bending warp in pixels.
    boundary_px : float
        Mean half-width of the colony boundary bands in pixels.
    particle_cell_px : float
        Lattice spacing for third-phase particles in pixels (at most one per cell).
    particle_probability : float
        Fraction of lattice cells holding a particle.
    particle_radius_px : (float, float)
        Range of the mean particle radius in pixels.
    dark, grey, bright : float
        Signal yields (0..1) of the three phases.
    scale : float
        Magnification: multiplies every length above and every texture scale.
    """

    colony_px: float = 320.0
    colony_warp_px: float = 45.0
    period_px: tuple[float, float] = (10.0, 18.0)
    orientation_spread_deg: float = 40.0
    bend_px: float = 4.0
    boundary_px: float = 4.0
    particle_cell_px: float = 52.0
    particle_probability: float = 0.75
    particle_radius_px: tuple[float, float] = (6.0, 16.0)
    dark: float = 0.07
    grey: float = 0.50
    bright: float = 0.86
    scale: float = 1.0


def _smooth_edge(signed_distance: np.ndarray) -> np.ndarray:
    """Anti-aliased indicator of ``signed_distance > 0`` (1 px wide ramp)."""
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def _colonies(
    x0: int, y0: int, w: int, h: int, seed: int, p: EutecticParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nearest-site labels and boundary distance of the colony Voronoi diagram.

    Returns ``(label, boundary_distance, site_i, site_j)`` where ``label``
    indexes the candidate-site arrays and ``site_i/j`` are the sites' global
    lattice indices.
    """
    c = p.colony_px * p.scale
    amp = p.colony_warp_px * p.scale
    warp_scale = c * 0.45
    wx = value_noise(x0, y0, w, h, warp_scale, seed, _S_WARP_X)
    wy = value_noise(x0, y0, w, h, warp_scale, seed, _S_WARP_Y)
    X = np.arange(w, dtype=np.float32)[None, :] + (wx - 0.5) * np.float32(2.0 * amp)
    Y = np.arange(h, dtype=np.float32)[:, None] + (wy - 0.5) * np.float32(2.0 * amp)

    # Candidate sites: every lattice cell near the (warp-expanded) block.
    i_lo = math.floor((x0 - amp) / c) - 2
    i_hi = math.floor((x0 + w + amp) / c) + 2
    j_lo = math.floor((y0 - amp) / c) - 2
    j_hi = math.floor((y0 + h + amp) / c) + 2
    jj, ii = np.mgrid[j_lo : j_hi + 1, i_lo : i_hi + 1]
    ii = ii.ravel()
    jj = jj.ravel()
    sx = (ii + lattice_uniform(ii, jj, seed, _S_SITE_X)) * c - x0
    sy = (jj + lattice_uniform(ii, jj, seed, _S_SITE_Y)) * c - y0

    # Keep only sites that can be first or second nearest somewhere in the block.
    lo_x, hi_x, lo_y, hi_y = -amp, w + amp, -amp, h + amp
    dmin = np.hypot(np.clip(sx, lo_x, hi_x) - sx, np.clip(sy, lo_y, hi_y) - sy)
    far_x = np.maximum(np.abs(sx - lo_x), np.abs(sx - hi_x))
    far_y = np.maximum(np.abs(sy - lo_y), np.abs(sy - hi_y))
    dmax = np.hypot(far_x, far_y)
    bound = np.sort(dmax)[1]
    keep = np.flatnonzero(dmin <= bound)
    sx, sy, ii, jj = sx[keep], sy[keep], ii[keep], jj[keep]

    # Second, finer pruning on a coarse sample grid: the warped distance to a
    # site changes by at most ``lipschitz * step`` between a pixel and its
    # nearest sample, so a site further than twice that beyond the second
    # nearest at every sample can be second nearest nowhere in the block.
    step = 8
    rows = np.unique(np.append(np.arange(0, h, step), h - 1))
    cols = np.unique(np.append(np.arange(0, w, step), w - 1))
    Xc = X[:, cols][rows] if X.shape[0] > 1 else X[:, cols]
    Yc = Y[rows][:, cols] if Y.shape[1] > 1 else Y[rows]
    Xc, Yc = np.broadcast_arrays(Xc, Yc)
    dist = np.sqrt(
        np.square(Xc[None] - sx[:, None, None].astype(np.float32))
        + np.square(Yc[None] - sy[:, None, None].astype(np.float32))
    )
    if len(sx) > 2:
        second = np.partition(dist, 1, axis=0)[1]
        # Quintic value noise changes by at most 1.875/scale per pixel along
        # each axis; bound the warp's Jacobian norm by the Frobenius norm.
        lipschitz = 1.0 + 2.0 * amp * 3.75 / warp_scale
        slack = 2.0 * lipschitz * step
        keep = np.flatnonzero(((dist - second[None]) <= slack).any(axis=(1, 2)))
        sx, sy, ii, jj = sx[keep], sy[keep], ii[keep], jj[keep]

    big = np.float32(1e30)
    d1 = np.full((h, w), big, dtype=np.float32)
    d2 = np.full((h, w), big, dtype=np.float32)
    l1 = np.zeros((h, w), dtype=np.int32)
    l2 = np.zeros((h, w), dtype=np.int32)
    for k in range(len(sx)):
        d = np.square(X - np.float32(sx[k])) + np.square(Y - np.float32(sy[k]))
        closer = d < d1
        second = ~closer & (d < d2)
        d2 = np.where(closer, d1, np.where(second, d, d2))
        l2 = np.where(closer, l1, np.where(second, k, l2))
        d1 = np.where(closer, d, d1)
        l1 = np.where(closer, k, l1)

    # Distance to the bisector of the two nearest sites: exact for a Voronoi
    # diagram, so boundary bands get a uniform width.
    sxf = sx.astype(np.float32)
    syf = sy.astype(np.float32)
    sep = np.hypot(sxf[l2] - sxf[l1], syf[l2] - syf[l1])
    boundary = (d2 - d1) / (2.0 * np.maximum(sep, np.float32(1e-3)))
    return l1, boundary, ii, jj


def _lamellae(
    x0: int,
    y0: int,
    w: int,
    h: int,
    seed: int,
    p: EutecticParams,
    label: np.ndarray,
    ii: np.ndarray,
    jj: np.ndarray,
) -> np.ndarray:
    """Grey-phase fraction (0..1) of the lamellar pattern of each colony."""
    spread = math.radians(p.orientation_spread_deg)
    preferred = float(lattice_uniform(np.array([0]), np.array([0]), seed, _S_GLOBAL)[0]) * math.pi
    theta = preferred + (lattice_uniform(ii, jj, seed, _S_THETA) * 2.0 - 1.0) * spread
    lo, hi = p.period_px[0] * p.scale, p.period_px[1] * p.scale
    period = lo + (hi - lo) * lattice_uniform(ii, jj, seed, _S_PERIOD)
    phase = lattice_uniform(ii, jj, seed, _S_PHASE)
    fraction = 0.47 + 0.16 * lattice_uniform(ii, jj, seed, _S_FRACTION)
    # Per-colony constant part of the phase, in float64 so that far-away
    # blocks (x ~ 1e5 px) keep sub-pixel lamella positions.
    cos_t = np.cos(theta)
    sin_t = np.sin(theta)
    anchor_x = x0 - (ii + 0.5) * p.colony_px * p.scale
    anchor_y = y0 - (jj + 0.5) * p.colony_px * p.scale
    offset = phase + (anchor_x * cos_t + anchor_y * sin_t) / period

    bx = value_noise(x0, y0, w, h, 70.0 * p.scale, seed, _S_BEND_X)
    by = value_noise(x0, y0, w, h, 70.0 * p.scale, seed, _S_BEND_Y)
    bend = np.float32(2.0 * p.bend_px * p.scale)
    X = np.arange(w, dtype=np.float32)[None, :] + (bx - 0.5) * bend
    Y = np.arange(h, dtype=np.float32)[:, None] + (by - 0.5) * bend

    kx = (cos_t / period).astype(np.float32)[label]
    ky = (sin_t / period).astype(np.float32)[label]
    s = X * kx + Y * ky + (offset % 1.0).astype(np.float32)[label]
    wave = np.cos(np.float32(2.0 * math.pi) * s)

    # Local width fluctuation and occasional terminations of lamellae.
    width = value_noise(x0, y0, w, h, 35.0 * p.scale, seed, _S_WIDTH)
    breaks = value_noise(x0, y0, w, h, 22.0 * p.scale, seed, _S_BREAK)
    frac = fraction.astype(np.float32)[label] + (width - 0.5) * np.float32(0.25)
    frac = frac - np.clip(breaks - 0.80, 0.0, 1.0) * np.float32(3.0)
    threshold = np.cos(np.float32(math.pi) * np.clip(frac, 0.0, 1.0))
    # Convert the cosine level difference into pixels across the lamella edge.
    slope = np.float32(2.0 * math.pi) * np.sqrt(np.square(kx) + np.square(ky))
    edge = np.maximum(slope * np.sqrt(np.clip(1.0 - np.square(threshold), 0.05, 1.0)), 1e-3)
    out: np.ndarray = _smooth_edge((wave - threshold) / edge)
    return out


def _particles(x0: int, y0: int, w: int, h: int, seed: int, p: EutecticParams) -> np.ndarray:
    """Coverage (0..1) of the rounded third-phase particles."""
    cell = p.particle_cell_px * p.scale
    r_lo, r_hi = p.particle_radius_px[0] * p.scale, p.particle_radius_px[1] * p.scale
    reach = r_hi * 1.45 + 2.0
    i_lo = math.floor((x0 - reach) / cell)
    i_hi = math.floor((x0 + w + reach) / cell)
    j_lo = math.floor((y0 - reach) / cell)
    j_hi = math.floor((y0 + h + reach) / cell)
    jj, ii = np.mgrid[j_lo : j_hi + 1, i_lo : i_hi + 1]
    ii = ii.ravel()
    jj = jj.ravel()
    present = lattice_uniform(ii, jj, seed, _S_PART_ON) < p.particle_probability
    ii, jj = ii[present], jj[present]
    cx = (ii + lattice_uniform(ii, jj, seed, _S_PART_X)) * cell - x0
    cy = (jj + lattice_uniform(ii, jj, seed, _S_PART_Y)) * cell - y0
    radius = r_lo + (r_hi - r_lo) * lattice_uniform(ii, jj, seed, _S_PART_R) ** 1.5
    a2 = 0.30 * lattice_uniform(ii, jj, seed, _S_PART_A2)
    p2 = 2.0 * math.pi * lattice_uniform(ii, jj, seed, _S_PART_P2)
    a3 = 0.12 * lattice_uniform(ii, jj, seed, _S_PART_A3)
    p3 = 2.0 * math.pi * lattice_uniform(ii, jj, seed, _S_PART_P3)

    cover = np.zeros((h, w), dtype=np.float32)
    for k in range(len(cx)):
        r_max = radius[k] * (1.0 + a2[k] + a3[k]) + 1.0
        xa = max(0, math.floor(cx[k] - r_max))
        xb = min(w, math.ceil(cx[k] + r_max) + 1)
        ya = max(0, math.floor(cy[k] - r_max))
        yb = min(h, math.ceil(cy[k] + r_max) + 1)
        if xa >= xb or ya >= yb:
            continue
        dx = (np.arange(xa, xb, dtype=np.float32) - np.float32(cx[k]))[None, :]
        dy = (np.arange(ya, yb, dtype=np.float32) - np.float32(cy[k]))[:, None]
        dist = np.sqrt(dx * dx + dy * dy)
        angle = np.arctan2(dy, dx)
        rim = np.float32(radius[k]) * (
            1.0
            + np.float32(a2[k]) * np.cos(2.0 * angle - np.float32(p2[k]))
            + np.float32(a3[k]) * np.cos(3.0 * angle - np.float32(p3[k]))
        )
        np.maximum(cover[ya:yb, xa:xb], _smooth_edge(rim - dist), out=cover[ya:yb, xa:xb])
    return cover


def render_eutectic(
    x0: int, y0: int, width: int, height: int, seed: int, params: EutecticParams | None = None
) -> np.ndarray:
    """Render a block of the procedural eutectic.

    Parameters
    ----------
    x0, y0 : int
        Global specimen coordinates (pixels) of the block's top-left pixel.
    width, height : int
        Block size in pixels.
    seed : int
        Specimen seed; the same seed always gives the same specimen.
    params : EutecticParams or None
        Microstructure parameters (defaults when None).

    Returns
    -------
    ndarray of float32
        ``(y, x)`` signal yield in ``0..1``, shape ``(height, width)``.
    """
    p = params or EutecticParams()
    w, h = int(width), int(height)
    label, boundary, ii, jj = _colonies(x0, y0, w, h, seed, p)
    grey_cover = _lamellae(x0, y0, w, h, seed, p, label, ii, jj)

    # Colony boundaries: a dark band of varying width with grey islands.
    s = p.scale
    band_noise = value_noise(x0, y0, w, h, 60.0 * s, seed, _S_BAND)
    band_w = np.float32(p.boundary_px * s) * (0.4 + 1.2 * band_noise)
    band = _smooth_edge(band_w - boundary)
    island_noise = value_noise(x0, y0, w, h, 9.0 * s, seed, _S_BAND_GREY)
    islands = _smooth_edge((island_noise - 0.62) * np.float32(25.0 * s))
    grey_cover = grey_cover * (1.0 - band) + islands * band

    mottle = value_noise(x0, y0, w, h, 16.0 * s, seed, _S_MOTTLE) - np.float32(0.5)
    dark = np.float32(p.dark) + np.float32(0.03) * mottle
    grey = np.float32(p.grey) + np.float32(0.08) * mottle
    signal = dark + (grey - dark) * grey_cover

    bright_cover = _particles(x0, y0, w, h, seed, p)
    bright = np.float32(p.bright) - np.float32(0.05) * mottle
    signal += (bright - signal) * bright_cover

    speckle = fbm_noise(x0, y0, w, h, 3.0 * s, 2, seed, _S_SPECKLE) - np.float32(0.5)
    slow = fbm_noise(x0, y0, w, h, 1500.0 * s, 2, seed, _S_SLOW) - np.float32(0.5)
    signal = signal * (1.0 + np.float32(0.16) * slow) + np.float32(0.05) * speckle
    out: np.ndarray = np.clip(signal, 0.0, 1.0).astype(np.float32, copy=False)
    return out
