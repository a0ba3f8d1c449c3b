"""Correlation of the x-profiles with a measured property (e.g. nanoindentation hardness).

The property is a CSV of ``x_um,value[,name]`` rows.  Each property point is
paired with the profile's column whose centre is nearest in x (within one
tile width; farther points are left out), and Pearson's r is computed per
quantity and per property name.

Neighbouring x-columns are not independent (a microstructure varies slowly
along x, and the tiles of one column share the traversal), so the
confidence interval is a *moving-block bootstrap* over the x-ordered pairs:
blocks of ``L`` consecutive pairs are drawn with replacement until ``n``
pairs are collected, r is recomputed, and the 2.5-97.5 % percentiles of 2,000
resamples are the 95 % interval.  ``L`` is ``ceil(n ** (1/3))`` grown to twice
the lag at which the series' autocorrelation falls below 1/e (at most n/4);
the Fisher-z interval that assumes independence is reported beside it, to
show the difference.  On pairs of independent series smoothed over 20
samples (n = 200) the bootstrap interval covered r = 0 in 78 % of trials,
the Fisher interval in 40 %: better, still short of the nominal 95 % for
strongly dependent series (``tests/cemi_stream/analysis/test_correlate.py``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AnalysisError

BOOTSTRAP = 2000


@dataclass(frozen=True, slots=True)
class PropertyPoint:
    """One measurement: position along x (µm), value, and the property's name."""

    x_um: float
    value: float
    name: str


def read_property(path: Path) -> list[PropertyPoint]:
    """Read ``x_um,value[,name]`` (header optional; name defaults to ``property``).

    Raises
    ------
    AnalysisError
        A missing file, a row that does not parse, or fewer than 3 points.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise AnalysisError(f"--property {path}: cannot read ({exc.strerror})") from None
    points = []
    for k, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip():
            continue
        if k == 1 and row[0].strip().lower() in ("x_um", "x"):
            continue
        if len(row) < 2:
            raise AnalysisError(f"--property {path}: line {k}: expected x_um,value[,name]")
        try:
            x, v = float(row[0]), float(row[1])
        except ValueError:
            raise AnalysisError(f"--property {path}: line {k}: {row[:2]} are not numbers") from None
        if not (math.isfinite(x) and math.isfinite(v)):
            raise AnalysisError(f"--property {path}: line {k}: values must be finite")
        name = row[2].strip() if len(row) > 2 and row[2].strip() else "property"
        points.append(PropertyPoint(x, v, name))
    if len(points) < 3:
        raise AnalysisError(f"--property {path}: {len(points)} points; at least 3 are needed")
    return points


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def block_length(a: np.ndarray, b: np.ndarray) -> int:
    """Bootstrap block length for x-ordered pairs (see the module docstring)."""
    n = len(a)
    base = max(1, math.ceil(n ** (1 / 3)))
    lag = 1
    for series in (a, b):
        s = series - series.mean()
        denom = float(np.dot(s, s))
        if denom == 0:
            continue
        for k in range(1, n // 2):
            if float(np.dot(s[:-k], s[k:])) / denom < 1 / math.e:
                lag = max(lag, k)
                break
        else:
            lag = max(lag, n // 2)
    # Twice the 1/e lag: blocks must hold most of the dependence, or the interval is
    # still too narrow (checked on series of known correlation length in the tests).
    return max(base, min(2 * lag, max(n // 4, 1)))


def pearson_with_ci(
    a: np.ndarray, b: np.ndarray, *, seed: int = 0, resamples: int = BOOTSTRAP
) -> dict[str, Any]:
    """r, n, the block-bootstrap 95 % interval, the block length and the Fisher interval."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    n = len(a)
    r = _pearson(a, b)
    out: dict[str, Any] = {"r": r, "n": n, "ci95": [math.nan, math.nan], "block": None,
                           "ci95_independent": [math.nan, math.nan]}  # fmt: skip
    if n < 4 or not math.isfinite(r):
        return out
    L = block_length(a, b)
    rng = np.random.default_rng(seed)
    starts_max = n - L + 1
    draws = []
    for _ in range(resamples):
        starts = rng.integers(0, starts_max, size=math.ceil(n / L))
        idx = (starts[:, None] + np.arange(L)[None, :]).ravel()[:n]
        value = _pearson(a[idx], b[idx])
        if math.isfinite(value):
            draws.append(value)
    if draws:
        lo, hi = np.percentile(draws, [2.5, 97.5])
        out["ci95"] = [float(lo), float(hi)]
    out["block"] = L
    z = math.atanh(max(min(r, 0.999999), -0.999999))
    half = 1.96 / math.sqrt(n - 3)
    out["ci95_independent"] = [math.tanh(z - half), math.tanh(z + half)]
    return out


def correlate(
    profile_x_um: np.ndarray,
    profiles: dict[str, np.ndarray],
    points: list[PropertyPoint],
    max_dx_um: float,
) -> dict[str, Any]:
    """Pearson r of every profile against every property name.

    Parameters
    ----------
    profile_x_um : ndarray
        Centre of each x-column, µm.
    profiles : dict of str to ndarray
        Mean value per x-column for each quantity (nan where no valid tile).
    points : list of PropertyPoint
        The property measurements.
    max_dx_um : float
        Largest distance from a point to its column's centre, µm.

    Returns
    -------
    dict
        ``{name: {quantity: {r, n, ci95, block, ci95_independent, pairs}}}``.
    """
    out: dict[str, Any] = {}
    xs = np.asarray(profile_x_um, float)
    for name in sorted({p.name for p in points}):
        pts = sorted((p for p in points if p.name == name), key=lambda p: p.x_um)
        out[name] = {}
        for quantity, values in profiles.items():
            pa, pb, px = [], [], []
            for p in pts:
                if not len(xs):
                    break
                k = int(np.argmin(np.abs(xs - p.x_um)))
                if abs(xs[k] - p.x_um) <= max_dx_um and math.isfinite(values[k]):
                    pa.append(values[k])
                    pb.append(p.value)
                    px.append(p.x_um)
            result = pearson_with_ci(np.array(pa), np.array(pb))
            result["pairs"] = [[x, a, b] for x, a, b in zip(px, pa, pb, strict=True)]
            out[name][quantity] = result
    return out
