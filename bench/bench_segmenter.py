"""Lamellar segmenters: the trained U-Net++ beside the classical detector, in one run.

- ``uhcs``: per-image lamellar fraction of every image of
  ``$CEMI_DATA/uhcs-steel`` (pearlite 40, spheroidite 10, network 10), whole
  645 x 475 images, for each segmenter; ROC AUC of pearlite (positive)
  against spheroidite and against network, with a bootstrap 95 % interval.
  The shipped model was trained on simulated specimens plus half of these
  images (every 2nd of each class, ``--weak-fold 0/2``) with the classical
  detector's masks as weak labels: ``heldout`` is the AUC on the other half
  (both segmenters, the same images), ``all`` on all 60 (half of them seen
  by the model).  With ``--crossfit MODEL`` (the same recipe on the other
  fold, ``--weak-fold 1/2``) each image is scored by the model that did not
  see it: ``crossfit`` is that pooled AUC over all 60, the honest estimate
  of the recipe.  The classical detector's thresholds were chosen on all 60.
- ``sim``: pixel IoU / Dice on held-out simulated specimens
  (:mod:`cemi_stream.analysis.simlabels`, series seed 1000, never used in
  training), and the lamellar fraction error per specimen.
- ``speed``: ms per 508 x 413 uint8 tile, one torch / OpenCV thread, best of
  5 per tile, on UHCS crops.

Writes ``bench/results/segmenter.json`` and prints a table.

Usage: ``python -m bench.bench_segmenter [--model NAME|PATH] [--quick]``
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

from bench.bench_lamellae import auc, auc_interval
from bench.common import write_result
from cemi_stream.analysis.segment import DEFAULT_SEGMENTER, Segmenter, load_segmenter
from cemi_stream.analysis.simlabels import sim_sample
from cemi_stream.analysis.train import mask_scores

DATA = Path(os.environ.get("CEMI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
H, W = 413, 508  # the paper's tile
SIM_SEED = 1000  # held-out simulated series (training uses seed 0)


def uhcs_images() -> dict[str, list[tuple[str, np.ndarray]]] | None:
    root = DATA / "uhcs-steel"
    if not root.is_dir():
        return None
    out: dict[str, list[tuple[str, np.ndarray]]] = {}
    for cls in ("pearlite", "spheroidite", "network"):
        out[cls] = []
        for f in sorted((root / cls).glob("*.jpg")):
            img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
            if img is not None:
                out[cls].append((f.name, img))
    return out


def fractions(
    seg: Segmenter, images: dict[str, list[tuple[str, np.ndarray]]]
) -> dict[str, dict[str, float]]:
    """Per class, per image name: the lamellar fraction ``seg`` finds."""
    return {
        cls: {name: float(seg.predict(img).mean()) for name, img in items}
        for cls, items in images.items()
    }


def weak_fold(seg: Segmenter) -> tuple[int, int] | None:
    """The ``--weak-fold I/K`` the model's card says it was trained with, if any."""
    card = getattr(seg, "card", None)
    weak = (card.training.get("data", {}) if card is not None else {}).get("weak") or {}
    fold = weak.get("fold")
    if not fold:
        return None
    i, k = (int(v) for v in str(fold).split("/"))
    return i, k


def select(frac: dict[str, dict[str, float]], keep: Any) -> dict[str, dict[str, float]]:
    """The images at sorted positions ``p`` of each class with ``keep(p)``."""
    return {
        c: {n: v for p, (n, v) in enumerate(sorted(d.items())) if keep(p)} for c, d in frac.items()
    }


def uhcs(frac: dict[str, dict[str, float]]) -> dict[str, Any]:
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


def sim(seg: Segmenter, samples: list[Any]) -> dict[str, Any]:
    preds = [seg.predict(s.image) for s in samples]
    scores = mask_scores(preds, [s.mask for s in samples])
    err = [abs(float(p.mean()) - float(s.mask.mean())) for p, s in zip(preds, samples, strict=True)]
    return {
        **{k: round(v, 4) for k, v in scores.items()},
        "fraction_abs_err_mean": round(float(np.mean(err)), 4),
        "specimens": len(samples),
    }


def speed(seg: Segmenter, tiles: list[np.ndarray]) -> dict[str, Any]:
    for t in tiles[:2]:
        seg.predict(t)
    times = []
    for t in tiles:
        best = math.inf
        for _ in range(5):
            a = time.perf_counter()
            seg.predict(t)
            best = min(best, time.perf_counter() - a)
        times.append(best * 1e3)
    return {
        "tiles": len(tiles),
        "ms_mean": round(float(np.mean(times)), 1),
        "ms_max": round(float(np.max(times)), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_SEGMENTER, help="segmenter NAME or PATH")
    ap.add_argument("--quick", action="store_true", help="fewer simulated specimens")
    ap.add_argument("--out", default="segmenter", help="result name (bench/results/NAME.json)")
    ap.add_argument("--crossfit", help="the same recipe trained on the other --weak-fold")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    t0 = time.time()
    segs: dict[str, Segmenter] = {
        "model": load_segmenter(args.model),
        "classical": load_segmenter("classical"),
    }
    images = uhcs_images()
    specimens = [sim_sample(i, SIM_SEED, 384) for i in range(40 if args.quick else 120)]
    tiles = []
    for cls in ("pearlite", "spheroidite", "network"):
        for _, img in (images or {}).get(cls, [])[:4]:
            tiles.append(np.ascontiguousarray(img[:H, :W]))
    if not tiles:
        tiles = [sim_sample(i, SIM_SEED, 512).image[:H, :W].copy() for i in range(6)]
    result: dict[str, Any] = {"segmenters": {k: s.describe() for k, s in segs.items()}}
    fold = weak_fold(segs["model"])
    fracs = {key: fractions(seg, images) for key, seg in segs.items()} if images else {}
    for key, seg in segs.items():
        u: dict[str, Any] | None = None
        if images:
            u = {"all": uhcs(fracs[key])}
            if fold is not None:
                i, k = fold
                u["heldout"] = uhcs(select(fracs[key], lambda p, i=i, k=k: p % k != i))
                u["heldout_fold"] = f"images at positions != {i} mod {k} of each class"
        result[key] = {
            "uhcs": u,
            "sim": sim(seg, specimens),
            "speed": {
                "threads": 1,
                "tile": [H, W],
                "timing": "best of 5 per tile",
                **speed(seg, tiles),
            },
        }
    if args.crossfit and images and fold is not None:
        other = fractions(load_segmenter(args.crossfit), images)
        i, k = fold
        pooled = {
            c: {
                n: (fracs["model"][c][n] if p % k != i else other[c][n])
                for p, n in enumerate(sorted(fracs["model"][c]))
            }
            for c in fracs["model"]
        }
        result["model"]["uhcs"]["crossfit"] = uhcs(pooled)
        result["model"]["uhcs"]["crossfit_model"] = load_segmenter(args.crossfit).describe()
    path = Path(segs["model"].describe().get("path") or "")
    if path.is_file():
        result["model_size_bytes"] = path.stat().st_size
    result["sim_seed"] = SIM_SEED
    result["elapsed_s"] = round(time.time() - t0, 1)
    out = write_result(args.out, result)
    print(f"{'':18s} {'AUC p/s':>8s} {'95 %':>11s} {'AUC p/n':>8s} {'sim IoU':>8s} {'ms/tile':>8s}")
    rows = []
    for key in segs:
        for part in ("all", "heldout", "crossfit"):
            u = (result[key]["uhcs"] or {}).get(part)
            if u:
                rows.append((f"{key} {part}", u, result[key]))
    for label, u, r in rows:
        ci = u.get("auc_pearlite_vs_spheroidite_ci95", [math.nan, math.nan])
        print(
            f"{label:18s} {u.get('auc_pearlite_vs_spheroidite', math.nan):8.3f} "
            f"{ci[0]:5.2f}-{ci[1]:4.2f} {u.get('auc_pearlite_vs_network', math.nan):8.3f} "
            f"{r['sim']['iou']:8.3f} {r['speed']['ms_mean']:8.1f}"
        )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
