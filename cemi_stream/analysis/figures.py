"""The analysis pictures: one heatmap per quantity, the x-profiles, the correlations.

Drawn with matplotlib's Agg backend (no display needed).  Maps have
physical axes (mm when the pixel size is known, else pixels), a colour bar
with the quantity's unit, and invalid tiles in grey.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

#: Label and unit of each quantity in the pictures.
QUANTITIES = {
    "phase_fraction": ("phase fraction", "%", 100.0),
    "lamellar_fraction": ("lamellar fraction", "%", 100.0),
    "lamellar_width_um": ("lamellar width", "µm", 1.0),
    "lamellar_width_px": ("lamellar width", "px", 1.0),
    "lamella_count": ("lamellae per region", "", 1.0),
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Save as PNG under a temporary name and rename: a reader never sees half an image."""
    import os

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def draw_map(
    values: np.ndarray,
    quantity: str,
    path: Path,
    *,
    tile_w: int,
    tile_h: int,
    pixel_size_um: float | None,
    title: str,
) -> None:
    """A ``(rows, cols)`` grid of tile values as a heatmap (nan = invalid, grey)."""
    plt = _plt()
    label, unit, scale = QUANTITIES[quantity]
    rows, cols = values.shape
    if pixel_size_um:
        sx, sy, axis_unit = tile_w * pixel_size_um / 1000, tile_h * pixel_size_um / 1000, "mm"
    else:
        sx, sy, axis_unit = tile_w, tile_h, "px"
    extent = (0, cols * sx, rows * sy, 0)
    aspect_w = min(max(cols * sx / max(rows * sy, 1e-9), 0.5), 40)
    fig_w = min(4 + 0.25 * aspect_w * 4, 24)
    fig, ax = plt.subplots(figsize=(fig_w, max(2.6, min(fig_w / aspect_w + 1.6, 10))), dpi=110)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#bbbbbb")
    image = ax.imshow(np.ma.masked_invalid(values * scale), cmap=cmap, extent=extent,
                      aspect="equal", interpolation="nearest")  # fmt: skip
    ax.set_xlabel(f"x ({axis_unit})")
    ax.set_ylabel(f"y ({axis_unit})")
    ax.set_title(title)
    bar = fig.colorbar(image, ax=ax, fraction=0.046 if aspect_w < 4 else 0.02, pad=0.02)
    bar.set_label(f"{label} ({unit})" if unit else label)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def draw_profiles(
    x: np.ndarray,
    means: dict[str, np.ndarray],
    spreads: dict[str, np.ndarray],
    path: Path,
    *,
    x_unit: str,
    title: str,
) -> None:
    """Mean along y (line) and its spread (band: one standard deviation) against x."""
    plt = _plt()
    names = [q for q in means if np.isfinite(means[q]).any()]
    if not names:
        names = list(means)[:1]
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.4 * len(names)), dpi=110,
                             sharex=True, squeeze=False)  # fmt: skip
    for ax, q in zip(axes[:, 0], names, strict=True):
        label, unit, scale = QUANTITIES[q]
        m, s = means[q] * scale, spreads[q] * scale
        ax.plot(x, m, color="#1f77b4", lw=1.2)
        ax.fill_between(x, m - s, m + s, color="#1f77b4", alpha=0.25, lw=0)
        ax.set_ylabel(f"{label}\n({unit})" if unit else label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(f"x ({x_unit})")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def draw_correlation(result: dict[str, Any], path: Path) -> None:
    """Scatter of each quantity against each property, with r and its interval."""
    plt = _plt()
    panels = [(name, q, r) for name, per in result.items() for q, r in per.items() if r["pairs"]]
    if not panels:
        panels = [("property", "none", {"pairs": [], "r": math.nan, "ci95": [math.nan] * 2})]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), dpi=110,
                             squeeze=False)  # fmt: skip
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    for ax, (name, q, r) in zip(axes.ravel(), panels, strict=False):
        pairs = np.array(r["pairs"], float).reshape(-1, 3)
        label, unit, scale = QUANTITIES.get(q, (q, "", 1.0))
        ax.scatter(pairs[:, 1] * scale, pairs[:, 2], s=12)
        lo, hi = r["ci95"]
        ax.set_title(f"r = {r['r']:.2f} [{lo:.2f}, {hi:.2f}], n = {len(pairs)}", fontsize=9)
        ax.set_xlabel(f"{label} ({unit})" if unit else label)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
