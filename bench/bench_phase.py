"""Phase-fraction methods on the labelled Ni-superalloy gamma/gamma' images.

For every image of ``$CEMI_DATA/superalloy-gamma-prime`` whose file is present
(index.csv lists 23: Super1 train 10 / val 4 / test 4 and 5 ``different_test``),
the gamma' (dark: label 1 or 2) area fraction of each method is compared with
the labels' and the mean absolute error (percentage points) is reported per
split and overall, with the pixel accuracy against the labels:

- ``bradley_paper``: the paper's Bradley-Roth (window = width // 8, t = 0.15);
- ``bradley_tuned``: the Bradley-Roth (window divisor, t) with the lowest MAE on
  train + val (a grid; test is never used to choose), then reported on test;
- ``otsu`` and ``multiotsu`` as shipped in :mod:`cemi_stream.analysis.phase`,
  and multi-Otsu with the other dark-class choice ({0}) for the record;
- ``auto``: ``phase_fraction(method="auto")`` as shipped (must equal the tuned row);
- ``constant_50``: no measurement, always 0.5 (what a method must beat);
- ``model``: ``phase_mask(method="model")`` with the shipped phase segmenter
  (``phase-unetpp-small``: U-Net++ trained on train, best epoch by val; its
  train row is in-sample, its test row is not);
- ``trained_rf``: a reference random forest on scikit-image multiscale features,
  fitted on train pixels only (its train row is in-sample); not shipped.

Writes ``bench/results/phase.json`` and prints a table.

Usage: ``python -m bench.bench_phase [--no-rf] [--no-model]``
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import write_result
from cemi_stream.analysis.phase import (
    AUTO_T,
    AUTO_WINDOW_DIVISOR,
    MULTIOTSU_DARK_CLASSES,
    _check_tile,
    _prepared,
    bradley_roth,
    phase_mask,
)

DATA = Path(os.environ.get("CEMI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SPLITS = ("train", "val", "test", "different_test")
GRID_DIVISORS = (2, 4, 8, 16, 32)
GRID_T = (-0.02, -0.01, -0.005, 0.0, 0.005, 0.01, 0.02, 0.05, 0.15)


def load(root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Images present (name, split, image, dark-phase label) and the index rows missing."""
    items: list[dict[str, Any]] = []
    missing: list[str] = []
    with open(root / "index.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            img_p, lab_p = root / row["image"], root / row["label"]
            if not (img_p.is_file() and lab_p.is_file()):
                missing.append(row["image"])
                continue
            img = cv2.imread(str(img_p), cv2.IMREAD_UNCHANGED)
            lab = cv2.imread(str(lab_p), cv2.IMREAD_UNCHANGED)
            if img is None or lab is None:
                missing.append(row["image"])
                continue
            if img.ndim == 3:
                img = img[..., 0]
            items.append({
                "name": Path(row["image"]).stem,
                "split": row["split"].split("/")[-1],
                "image": img,
                "truth": lab > 0,
            })  # fmt: skip
    return items, missing


def score(items: list[dict[str, Any]], masks: list[np.ndarray | float]) -> dict[str, Any]:
    """MAE (pp) and pixel accuracy per split and overall; per-image fractions (%)."""
    per: dict[str, list[tuple[float, float]]] = {}
    images = {}
    for it, m in zip(items, masks, strict=True):
        truth = float(it["truth"].mean())
        if isinstance(m, np.ndarray):
            frac, acc = float(m.mean()), float((m == it["truth"]).mean())
        else:
            frac, acc = float(m), float("nan")
        per.setdefault(it["split"], []).append((abs(frac - truth) * 100.0, acc))
        images[it["name"]] = round(frac * 100.0, 2)
    out: dict[str, Any] = {}
    for split in (*SPLITS, "all"):
        rows = [r for v in per.values() for r in v] if split == "all" else per.get(split, [])
        if rows:
            err = [e for e, _ in rows]
            acc = [a for _, a in rows]
            out[split] = {
                "mae_pp": round(float(np.mean(err)), 2),
                "max_pp": round(float(np.max(err)), 2),
                "pixel_accuracy": None if np.isnan(acc).all() else round(float(np.mean(acc)), 3),
                "n": len(rows),
            }
    out["fraction_percent"] = images
    return out


def train_val_mae(items: list[dict[str, Any]], masks: list[np.ndarray]) -> float:
    """MAE (pp) over the train and val images only (the tuning criterion)."""
    err = [
        abs(float(m.mean()) - float(it["truth"].mean())) * 100.0
        for it, m in zip(items, masks, strict=True)
        if it["split"] in ("train", "val")
    ]
    return float(np.mean(err))


def multiotsu_classes(
    items: list[dict[str, Any]], dark_classes: tuple[int, ...]
) -> list[np.ndarray]:
    """Multi-Otsu (shipped preprocessing) with a given set of dark classes."""
    from skimage.filters import threshold_multiotsu

    out = []
    for it in items:
        data, ok = _check_tile(it["image"], None)
        values = _prepared(data, ok)
        th = threshold_multiotsu(values[ok], classes=3)
        out.append(values <= th[max(dark_classes)])
    return out


def trained_rf(items: list[dict[str, Any]], seed: int = 0) -> list[np.ndarray]:
    """Reference random forest on multiscale features, fitted on train pixels only."""
    from skimage.feature import multiscale_basic_features
    from sklearn.ensemble import RandomForestClassifier

    def feats(img: np.ndarray) -> np.ndarray:
        g = img.astype(np.float32)
        g = (g - g.mean()) / max(float(g.std()), 1e-6)
        f: np.ndarray = multiscale_basic_features(g, sigma_min=1, sigma_max=16, channel_axis=None)
        return f.reshape(-1, f.shape[-1])

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for it in items:
        if it["split"] == "train":
            f = feats(it["image"])
            idx = rng.choice(f.shape[0], 10000, replace=False)
            xs.append(f[idx])
            ys.append(it["truth"].ravel()[idx])
    clf = RandomForestClassifier(30, max_depth=12, n_jobs=1, random_state=seed)
    clf.fit(np.concatenate(xs), np.concatenate(ys))
    return [clf.predict(feats(it["image"])).reshape(it["truth"].shape).astype(bool)
            for it in items]  # fmt: skip


def main() -> None:
    """Measure, choose the tuned Bradley-Roth on train + val, write the result file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-rf", action="store_true", help="skip the trained reference segmenter")
    ap.add_argument("--no-model", action="store_true", help="skip the shipped phase model")
    args = ap.parse_args()
    root = DATA / "superalloy-gamma-prime"
    if not (root / "index.csv").is_file():
        raise SystemExit(f"superalloy data not found at {root}: set CEMI_DATA")
    items, missing = load(root)
    t0 = time.perf_counter()
    methods: dict[str, dict[str, Any]] = {}

    def run(name: str, fn: Callable[[dict[str, Any]], np.ndarray], note: str) -> list[np.ndarray]:
        masks = [fn(it) for it in items]
        methods[name] = {"note": note, **score(items, list(masks))}
        return masks

    run("bradley_paper", lambda it: phase_mask(it["image"], method="bradley"),
        "paper: window = width // 8, t = 0.15")  # fmt: skip

    grid = []
    for div in GRID_DIVISORS:
        for t in GRID_T:
            masks = [bradley_roth(it["image"], it["image"].shape[1] // div, t) for it in items]
            grid.append({"window_divisor": div, "t": t,
                         "train_val_mae_pp": round(train_val_mae(items, masks), 3)})  # fmt: skip
    best = min(grid, key=lambda g: g["train_val_mae_pp"])
    run("bradley_tuned",
        lambda it: bradley_roth(it["image"], it["image"].shape[1] // best["window_divisor"],
                                best["t"]),
        f"best of the grid on train + val: window = width // {best['window_divisor']}, "
        f"t = {best['t']}")  # fmt: skip
    run("otsu", lambda it: phase_mask(it["image"], method="otsu"), "as shipped")
    run("multiotsu", lambda it: phase_mask(it["image"], method="multiotsu"),
        f"as shipped: dark = classes {set(MULTIOTSU_DARK_CLASSES)}")  # fmt: skip
    other = (0,) if MULTIOTSU_DARK_CLASSES != (0,) else (0, 1)
    methods[f"multiotsu_dark{''.join(map(str, other))}"] = {
        "note": f"multi-Otsu, dark = classes {set(other)} (the other choice)",
        **score(items, list(multiotsu_classes(items, other))),
    }
    run("auto", lambda it: phase_mask(it["image"], method="auto"), "phase_mask(method='auto')")
    methods["constant_50"] = {"note": "no measurement: always 50 %",
                              **score(items, [0.5] * len(items))}  # fmt: skip
    if not args.no_model:
        from cemi_stream.analysis.segment import PHASE_KIND, load_segmenter

        seg = load_segmenter(None, kind=PHASE_KIND).describe()
        tm = time.perf_counter()
        run("model", lambda it: phase_mask(it["image"], method="model"),
            f"shipped phase segmenter {seg['name']} (sha256 {str(seg['sha256'])[:12]}); "
            "fitted on train, best epoch by val: its train row is in-sample")  # fmt: skip
        methods["model"]["seconds"] = round(time.perf_counter() - tm, 1)
    if not args.no_rf:
        tr = time.perf_counter()
        methods["trained_rf"] = {
            "note": "reference, not shipped: random forest (30 trees, depth 12) on multiscale "
            "features, fitted on 10k train pixels per train image; its train row is in-sample",
            **score(items, list(trained_rf(items))),
            "seconds": round(time.perf_counter() - tr, 1),
        }
    shipped_ok = (best["window_divisor"], best["t"]) == (AUTO_WINDOW_DIVISOR, AUTO_T)
    result = {
        "data": str(root),
        "images": len(items),
        "missing_from_index": missing,
        "splits": {s: sum(it["split"] == s for it in items) for s in SPLITS},
        "truth_percent": {it["name"]: round(float(it["truth"].mean()) * 100, 2) for it in items},
        "methods": methods,
        "bradley_grid": grid,
        "tuned_bradley": best,
        "auto_matches_tuned": shipped_ok,
        "target": "MAE <= 3 pp on the labelled images",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = write_result("phase", result)
    cols = [s for s in (*SPLITS, "all") if any(s in m for m in methods.values())]
    print(f"{len(items)} images ({', '.join(f'{k} {v}' for k, v in result['splits'].items())});"
          f" missing: {len(missing)}")  # fmt: skip
    print("MAE, percentage points (pixel accuracy)")
    print(f"{'method':18s}" + "".join(f"{c:>16s}" for c in cols))
    for name, m in methods.items():
        cells = []
        for c in cols:
            if c in m:
                acc = m[c]["pixel_accuracy"]
                tail = f" ({acc:.3f})" if acc is not None else " " * 8
                cells.append(f"{m[c]['mae_pp']:7.2f}{tail}")
            else:
                cells.append(" " * 15)
        print(f"{name:18s}" + "".join(f"{c:>16s}" for c in cells))
    print(f"tuned Bradley (train + val): window = width // {best['window_divisor']}, "
          f"t = {best['t']}; shipped auto matches: {shipped_ok}")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
