"""Classical lamellar detector: UHCS separation, simulated width / spacing, cost per tile.

- ``uhcs``: per-image lamellar fraction (:func:`lamellar_mask` with its
  defaults) of every image of ``$CEMI_DATA/uhcs-steel`` (pearlite 40,
  spheroidite 10, network 10); ROC AUC of pearlite (positive) against
  spheroidite, and separately against network, with a bootstrap 95 % interval
  (images resampled within each class).  The defaults were chosen on these
  same images (a small grid, a plateau of ~0.95-0.97), so this AUC is
  in-sample; the 30 images the data README keeps aside were not available.
- ``uhcs_heldout``: the honest version of that AUC.  The pearlite and
  spheroidite images are split in two folds (alternate images of each class,
  by name); for each fold the (min_coherence, min_periodicity) of a 3 x 3 grid
  around the defaults with the best AUC on the *other* fold is applied to
  this one.  Reported: each fold's held-out AUC, their mean, and the pooled
  AUC of all held-out scores.
- ``simulated``: lamellae of known period (6-40 px) and direction inside a
  220 px wide band (so width, period and count are known), for three waves
  (sine, square, thin dark lines), three surroundings (particles like
  spheroidite, isotropic blobs, flat) and noise 0.1 / 0.2 / 0.4 of the
  lamellae's contrast; the relative error of ``width_px`` and ``spacing_px``,
  the count's error against ``width / period``, and the share of cases within
  5 %.  Isotropic tiles (blobs, particles; no lamellae) give the false
  lamellar fraction.
- ``speed``: ms per 508 x 413 uint8 tile of ``lamellar_mask`` +
  ``lamellar_stats``, one thread (``cv2.setNumThreads(1)``, as each Dask
  worker thread of ``analyze`` runs), on UHCS crops and simulated tiles.

Writes ``bench/results/lamellae.json`` and prints a table.

Usage: ``python -m bench.bench_lamellae [--quick]``
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import write_result
from cemi_stream.analysis import lamellae as lam

DATA = Path(os.environ.get("CEMI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
H, W = 413, 508  # the paper's tile
WIDTH = 220.0  # px across the lamellae of the simulated band


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney): P(score of a positive > score of a negative), ties half."""
    gt = (pos[:, None] > neg[None, :]).mean()
    eq = (pos[:, None] == neg[None, :]).mean()
    return float(gt + 0.5 * eq)


def auc_interval(pos: np.ndarray, neg: np.ndarray, n: int = 2000) -> list[float]:
    rng = np.random.default_rng(0)
    boots = [auc(rng.choice(pos, pos.size), rng.choice(neg, neg.size)) for _ in range(n)]
    return [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def uhcs() -> dict[str, Any] | None:
    root = DATA / "uhcs-steel"
    if not root.is_dir():
        print(f"skip uhcs: {root} not found")
        return None
    frac: dict[str, dict[str, float]] = {}
    for cls in ("pearlite", "spheroidite", "network"):
        frac[cls] = {}
        for f in sorted((root / cls).glob("*.jpg")):
            img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
            if img is not None:
                frac[cls][f.name] = float(lam.lamellar_mask(img).mean())
    arr = {k: np.array(list(v.values())) for k, v in frac.items()}
    out: dict[str, Any] = {"images": {k: len(v) for k, v in frac.items()}}
    for neg in ("spheroidite", "network"):
        if arr["pearlite"].size and arr[neg].size:
            out[f"auc_pearlite_vs_{neg}"] = auc(arr["pearlite"], arr[neg])
            out[f"auc_pearlite_vs_{neg}_ci95"] = auc_interval(arr["pearlite"], arr[neg])
    out["fraction_median"] = {k: float(np.median(v)) for k, v in arr.items() if v.size}
    out["fraction_range"] = {k: [float(v.min()), float(v.max())] for k, v in arr.items() if v.size}
    out["per_image"] = frac
    return out


GRID_COHERENCE = (0.25, 0.35, 0.45)
GRID_PERIODICITY = (0.0, 0.1, 0.2)


def uhcs_heldout() -> dict[str, Any] | None:
    """Two-fold AUC of pearlite vs spheroidite with the settings chosen on the other fold."""
    root = DATA / "uhcs-steel"
    if not root.is_dir():
        return None
    images: dict[str, list[np.ndarray]] = {}
    for cls in ("pearlite", "spheroidite"):
        files = sorted((root / cls).glob("*.jpg"))
        images[cls] = [im for f in files if (im := cv2.imread(str(f), cv2.IMREAD_GRAYSCALE))
                       is not None]  # fmt: skip
    grid = [(c, p) for c in GRID_COHERENCE for p in GRID_PERIODICITY]
    # fraction[setting][class] = per-image lamellar fraction, in name order
    fraction = {
        g: {cls: np.array([lam.lamellar_mask(im, min_coherence=g[0], min_periodicity=g[1]).mean()
                           for im in ims]) for cls, ims in images.items()}
        for g in grid
    }  # fmt: skip

    def fold_auc(g: tuple[float, float], k: int) -> float:
        f = fraction[g]
        return auc(f["pearlite"][k::2], f["spheroidite"][k::2])

    default = (lam.MIN_COHERENCE, lam.MIN_PERIODICITY)
    folds = []
    pooled_pos, pooled_neg = [], []
    for k in (0, 1):
        other = 1 - k

        # best on the other fold; ties go to the setting nearest the defaults
        def rank(g: tuple[float, float], other: int = other) -> tuple[float, float]:
            return fold_auc(g, other), -abs(g[0] - default[0]) - abs(g[1] - default[1])

        chosen = max(grid, key=rank)
        pooled_pos += list(fraction[chosen]["pearlite"][k::2])
        pooled_neg += list(fraction[chosen]["spheroidite"][k::2])
        folds.append({
            "fold": k,
            "images": {cls: len(v[k::2]) for cls, v in images.items()},
            "chosen_on_other_fold": {"min_coherence": chosen[0], "min_periodicity": chosen[1]},
            "other_fold_auc": round(fold_auc(chosen, other), 4),
            "heldout_auc": round(fold_auc(chosen, k), 4),
            "defaults_auc": round(fold_auc(default, k), 4),
        })  # fmt: skip
    return {
        "grid": {"min_coherence": list(GRID_COHERENCE), "min_periodicity": list(GRID_PERIODICITY)},
        "folds": folds,
        "heldout_auc_mean": round(float(np.mean([f["heldout_auc"] for f in folds])), 4),
        "heldout_auc_pooled": round(auc(np.array(pooled_pos), np.array(pooled_neg)), 4),
        "grid_auc_all_images": {
            f"{g[0]},{g[1]}": round(auc(fraction[g]["pearlite"], fraction[g]["spheroidite"]), 4)
            for g in grid
        },
    }


def band(angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    u = (xx - W / 2) * math.cos(angle) + (yy - H / 2) * math.sin(angle)
    v = -(xx - W / 2) * math.sin(angle) + (yy - H / 2) * math.cos(angle)
    return (np.abs(u) < WIDTH / 2) & (np.abs(v) < 140)


def to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 160 + 40, 0, 255).astype(np.uint8)


def simulated(quick: bool) -> dict[str, Any]:
    periods = (6, 10, 25, 40) if quick else (6, 8, 10, 16, 25, 32, 40)
    noises = (0.2,) if quick else (0.1, 0.2, 0.4)
    angles = (0.3, -1.0)
    cases: list[dict[str, Any]] = []
    seed = 0
    for p in periods:
        for noise in noises:
            for wave in ("sine", "square", "lines"):
                for bg in ("particles", "blobs", "flat"):
                    for a in angles:
                        seed += 1
                        img, region = lam.synthetic_lamellae(
                            (H, W), p, a, band(a), noise=noise, wave=wave, background=bg, seed=seed
                        )
                        tile = to_u8(img)
                        mask = lam.lamellar_mask(tile)
                        st = lam.lamellar_stats(tile, mask)
                        union = (mask | region).sum()
                        # The region itself: the mask's component that overlaps it most.
                        n, labels = cv2.connectedComponents(mask.astype(np.uint8))
                        hits = np.bincount(labels[region], minlength=n)
                        hits[0] = 0
                        own = lam.lamellar_stats(tile, labels == int(np.argmax(hits)))
                        cases.append(
                            {
                                "period": p,
                                "noise": noise,
                                "wave": wave,
                                "background": bg,
                                "angle": a,
                                "regions": st.regions,
                                "width_err": st.width_px / WIDTH - 1,
                                "spacing_err": st.spacing_px / p - 1,
                                "count_err": st.count - WIDTH / p,
                                "region_width_err": own.width_px / WIDTH - 1,
                                "region_spacing_err": own.spacing_px / p - 1,
                                "region_count_err": own.count - WIDTH / p,
                                "iou": float((mask & region).sum() / union) if union else 0.0,
                            }
                        )

    def summary(rows: list[dict[str, Any]], pre: str = "") -> dict[str, Any]:
        we = np.array([r[pre + "width_err"] for r in rows], float)
        se = np.array([r[pre + "spacing_err"] for r in rows], float)
        ce = np.array([r[pre + "count_err"] for r in rows], float)
        found = np.isfinite(we) & np.isfinite(se)
        wf, sf = np.abs(we[found]), np.abs(se[found])
        return {
            "cases": len(rows),
            "found": int(found.sum()),
            "one_region": int(sum(r["regions"] == 1 for r in rows)),
            "width_abs_err_mean": float(wf.mean()) if wf.size else math.nan,
            "width_abs_err_max": float(wf.max()) if wf.size else math.nan,
            "width_within_5pct": float((wf <= 0.05).sum() / len(rows)),
            "spacing_abs_err_mean": float(sf.mean()) if sf.size else math.nan,
            "spacing_abs_err_max": float(sf.max()) if sf.size else math.nan,
            "spacing_within_5pct": float((sf <= 0.05).sum() / len(rows)),
            "count_abs_err_mean": float(np.nanmean(np.abs(ce))) if found.any() else math.nan,
            "iou_median": float(np.median([r["iou"] for r in rows])),
        }

    iso = []
    for bg in ("blobs", "particles"):
        for s in range(5):
            img, _ = lam.synthetic_lamellae(
                (H, W), 10.0, 0.0, np.zeros((H, W), bool), noise=0.2, background=bg, seed=100 + s
            )
            iso.append({"background": bg, "fraction": float(lam.lamellar_mask(to_u8(img)).mean())})
    return {
        "width_px": WIDTH,
        "note": "tile values average all regions (as the paper), false ones in textured "
        "surroundings included; region_* measure the simulated region's own component",
        "all": summary(cases),
        "region_all": summary(cases, "region_"),
        "by_period": {str(p): summary([c for c in cases if c["period"] == p]) for p in periods},
        "region_by_period": {
            str(p): summary([c for c in cases if c["period"] == p], "region_") for p in periods
        },
        "by_noise": {str(n): summary([c for c in cases if c["noise"] == n]) for n in noises},
        "by_background": {
            b: summary([c for c in cases if c["background"] == b])
            for b in ("particles", "blobs", "flat")
        },
        "isotropic_fraction_max": max(r["fraction"] for r in iso),
        "isotropic": iso,
        "cases": cases,
    }


def speed() -> dict[str, Any]:
    cv2.setNumThreads(1)
    tiles: list[tuple[str, np.ndarray]] = []
    root = DATA / "uhcs-steel"
    for cls in ("pearlite", "spheroidite", "network"):
        for f in sorted((root / cls).glob("*.jpg"))[:8] if root.is_dir() else []:
            img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
            if img is not None and img.shape[0] >= H and img.shape[1] >= W:
                tiles.append(("uhcs", np.ascontiguousarray(img[:H, :W])))
    for i, p in enumerate((6, 10, 16, 25)):
        img, _ = lam.synthetic_lamellae((H, W), p, 0.3 * i, band(0.3 * i), seed=i)
        tiles.append(("simulated", to_u8(img)))
    for _, t in tiles[:3]:
        lam.lamellar_stats(t, lam.lamellar_mask(t))
    rows = []
    for kind, t in tiles:
        best_mask = best_all = math.inf
        for _ in range(5):
            a = time.perf_counter()
            m = lam.lamellar_mask(t)
            b = time.perf_counter()
            lam.lamellar_stats(t, m)
            c = time.perf_counter()
            best_mask, best_all = min(best_mask, b - a), min(best_all, c - a)
        rows.append((kind, best_mask * 1e3, best_all * 1e3))
    out: dict[str, Any] = {"threads": 1, "tile": [H, W], "timing": "best of 5 per tile"}
    for kind in ("uhcs", "simulated", "all"):
        sel = [r for r in rows if kind in ("all", r[0])]
        if sel:
            out[kind] = {
                "tiles": len(sel),
                "mask_ms_mean": float(np.mean([r[1] for r in sel])),
                "total_ms_mean": float(np.mean([r[2] for r in sel])),
                "total_ms_max": float(np.max([r[2] for r in sel])),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer simulated cases")
    args = ap.parse_args()
    t0 = time.time()
    result: dict[str, Any] = {
        "settings": {
            "window_px": 64,
            "min_coherence": lam.MIN_COHERENCE,
            "min_periodicity": lam.MIN_PERIODICITY,
            "min_contrast": lam.MIN_CONTRAST,
            "min_period_px": lam.MIN_PERIOD_PX,
            "two_scales": True,
        },
        "uhcs": uhcs(),
        "uhcs_heldout": uhcs_heldout(),
        "simulated": simulated(args.quick),
        "speed": speed(),
    }
    result["elapsed_s"] = round(time.time() - t0, 1)
    path = write_result("lamellae", result)

    u = result["uhcs"]
    if u:
        print(
            f"UHCS ({u['images']}): lamellar fraction median "
            + ", ".join(f"{k} {v:.2f}" for k, v in u["fraction_median"].items())
        )
        for neg in ("spheroidite", "network"):
            k = f"auc_pearlite_vs_{neg}"
            if k in u:
                lo, hi = u[k + "_ci95"]
                print(f"  ROC AUC pearlite vs {neg:11s} {u[k]:.3f}  (95 % {lo:.2f}-{hi:.2f})")
    h = result["uhcs_heldout"]
    if h:
        print(
            "  held out (settings chosen on the other fold): AUC "
            + ", ".join(f"fold {f['fold']} {f['heldout_auc']:.3f}" for f in h["folds"])
            + f"; mean {h['heldout_auc_mean']:.3f}, pooled {h['heldout_auc_pooled']:.3f}"
        )
    s = result["simulated"]
    print(f"simulated lamellae, band {WIDTH:.0f} px wide: {s['all']['cases']} cases")
    print(
        f"{'period':>9s} {'width |err|':>15s} {'<=5%':>6s} {'spacing |err|':>16s} {'<=5%':>6s}"
        f" {'count |err|':>12s} {'IoU':>5s}"
    )
    rows = [(f"{k} tile", v) for k, v in s["by_period"].items()] + [("all tile", s["all"])]
    rows += [(f"{k} own", v) for k, v in s["region_by_period"].items()]
    rows += [("all own", s["region_all"])]
    for name, r in rows:
        print(
            f"{name:>9s} {100 * r['width_abs_err_mean']:6.1f}% / "
            f"{100 * r['width_abs_err_max']:5.1f}%"
            f" {100 * r['width_within_5pct']:5.0f}% {100 * r['spacing_abs_err_mean']:6.1f}% / "
            f"{100 * r['spacing_abs_err_max']:5.1f}% {100 * r['spacing_within_5pct']:5.0f}%"
            f" {r['count_abs_err_mean']:12.2f} {r['iou_median']:5.2f}"
        )
    print(
        "  (mean / max over cases; by noise: "
        + ", ".join(
            f"{k}: width {100 * v['width_abs_err_mean']:.1f}%" for k, v in s["by_noise"].items()
        )
        + ")"
    )
    print(
        "isotropic tiles (blobs, particles): lamellar fraction <= "
        f"{s['isotropic_fraction_max']:.3f}"
    )
    sp = result["speed"]
    for kind in ("uhcs", "simulated", "all"):
        if kind in sp:
            r = sp[kind]
            print(
                f"speed {kind:9s}: {r['total_ms_mean']:.1f} ms / 508 x 413 tile "
                f"(mask {r['mask_ms_mean']:.1f}, max {r['total_ms_max']:.1f}), 1 thread"
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
