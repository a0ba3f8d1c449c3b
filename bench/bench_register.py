"""Pairwise registration accuracy and speed (the live stitcher's measurement).

Cases, 1024 x 768 frames of the virtual SEM (``ld`` and ``hd`` presets):
raster neighbours overlapping 30-60 % horizontally with +-10 px stage jitter,
and row neighbours overlapping 40-50 % vertically, over the procedural
eutectic and over the real Al-Cu-Mg eutectic micrograph as specimen.  The
error is the distance between the ESTIMATED shift and the TRUE difference of
the two frames' ground-truth positions (the LD smear biases every frame
alike, so it cancels).  Every case is also run with the alternative sub-pixel
methods and spectral weightings, which is how the defaults were chosen.
Then real data: the BSE tiles of ``bse-tiles-stitch2d`` against their
reference offsets, and real fast-scan crops against slow-scan crops of the
same fields (``kriss-sem-pairs``, a consistency check); and the time of
``prepare`` and ``register`` on 1024 x 768 frames.
Writes ``bench/results/register.json``.

Usage: ``python -m bench.bench_register [--traversals N] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import write_result
from cemi_stream.stitch.register import RegisterConfig, Registrar
from drivers.sim import Scanner, SimConfig, SimSource
from drivers.sim.source import frame_rng

DATA = Path(os.environ.get("CEMI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
EUTECTIC = DATA / "eutectic-alcumg" / "3000X_Al-Cu_Mg_EXP9_S7.tif"
TILES = DATA / "bse-tiles-stitch2d"
KRISS = DATA / "kriss-sem-pairs" / "time"
CROP_OFFSETS = ((190, 0), (0, 180), (150, 120))  # (x, y) of the fast-scan crop, pixels
OVERLAPS = (0.3, 0.4, 0.5, 0.6, 0.45, 0.35, 0.55, 0.4)  # x overlap of each traversal
ROW_OVERLAPS = (0.4, 0.45, 0.5)  # traversals whose row neighbours are measured too
FRAMES_PER_ROW = 8

METHODS: dict[str, RegisterConfig] = {
    "default (dft, whiten 0.5)": RegisterConfig(),
    "parabola, whiten 0.5": RegisterConfig(subpixel="parabola"),
    "gauss, whiten 0.5": RegisterConfig(subpixel="gauss"),
    "dft, whiten 1 (pure phase corr.)": RegisterConfig(fine_whiten=1.0),
    "parabola, whiten 1 (classic)": RegisterConfig(fine_whiten=1.0, subpixel="parabola"),
    "dft, whiten 0 (cross-corr.)": RegisterConfig(fine_whiten=0.0),
    "dft, Tukey window": RegisterConfig(fine_edges="tukey"),
    "dft, fine window 384": RegisterConfig(fine_window=384),
}

Pair = tuple[np.ndarray, np.ndarray, float, float, str]


def render_case(noise: str, source: str | None, traversals: int) -> list[Pair]:
    """Neighbour pairs ``(ref, mov, true_dx, true_dy, kind)`` of several traversals."""
    pairs: list[Pair] = []
    for k in range(traversals):
        overlap = OVERLAPS[k % len(OVERLAPS)]
        config = SimConfig(
            rows=2,
            frames_per_row=FRAMES_PER_ROW,
            overlap=overlap,
            noise="ld",
            seed=100 + k,
            source=source,
        )
        sim = SimSource(config)
        sim.open()
        scanner = Scanner(noise)
        frames = []
        truth = []
        for i in range(len(sim.traversal)):
            t = sim.truth_for(i)
            rng = frame_rng(config.seed, i)
            w, h = config.frame_size
            frames.append(scanner.render(sim.specimen, t.x_px, t.y_px, w, h, rng))
            truth.append((t.x_px, t.y_px))
        for r in range(2):
            for c in range(FRAMES_PER_ROW):
                i = r * FRAMES_PER_ROW + c
                links = [(i + 1, "horizontal")] if c < FRAMES_PER_ROW - 1 else []
                if r == 0 and overlap in ROW_OVERLAPS:
                    links.append((i + FRAMES_PER_ROW, "vertical"))
                for j, kind in links:
                    dx, dy = truth[j][0] - truth[i][0], truth[j][1] - truth[i][1]
                    pairs.append((frames[i], frames[j], dx, dy, kind))
        sim.close()
    return pairs


def summarise(errors: list[float], failed: int) -> dict[str, Any]:
    """Median / p99 / max of absolute errors in pixels, and the refusals."""
    e = np.array(errors) if errors else np.array([math.nan])
    return {
        "pairs": len(errors) + failed,
        "refused": failed,
        "median_px": round(float(np.median(e)), 3),
        "p99_px": round(float(np.percentile(e, 99)), 3),
        "max_px": round(float(np.max(e)), 3),
    }


def evaluate(config: RegisterConfig, pairs: list[Pair]) -> dict[str, Any]:
    """Accuracy of one configuration on a case, overall and per direction."""
    reg = Registrar(config)
    errors: dict[str, list[float]] = {"horizontal": [], "vertical": []}
    failed = {"horizontal": 0, "vertical": 0}
    for a, b, tx, ty, kind in pairs:
        shift = reg.register(reg.prepare(a), reg.prepare(b))
        if not shift.ok:
            failed[kind] += 1
            continue
        errors[kind].append(math.hypot(shift.dx - tx, shift.dy - ty))
    out = {"all": summarise(errors["horizontal"] + errors["vertical"], sum(failed.values()))}
    for kind in errors:
        out[kind] = summarise(errors[kind], failed[kind])
    return out


def timing(pairs: list[Pair], repeats: int) -> dict[str, Any]:
    """Median and p90 of prepare / register on 1024 x 768 frames, milliseconds.

    Wall-clock time, and the process's CPU time (all threads), which the
    other users of a shared machine disturb much less.
    """
    reg = Registrar()
    wall: dict[str, list[float]] = {"prepare": [], "register": []}
    cpu: dict[str, list[float]] = {"prepare": [], "register": []}
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for a, b, _, _, _ in pairs:
            w0, c0 = time.perf_counter(), time.process_time()
            pa = reg.prepare(a)
            w1, c1 = time.perf_counter(), time.process_time()
            pb = reg.prepare(b)
            w2, c2 = time.perf_counter(), time.process_time()
            reg.register(pa, pb)
            w3, c3 = time.perf_counter(), time.process_time()
            wall["prepare"] += [w1 - w0, w2 - w1]
            cpu["prepare"] += [c1 - c0, c2 - c1]
            wall["register"].append(w3 - w2)
            cpu["register"].append(c3 - c2)
    out: dict[str, Any] = {}
    for clock, samples in (("wall", wall), ("cpu", cpu)):
        prep = float(np.median(samples["prepare"])) * 1e3
        regt = float(np.median(samples["register"])) * 1e3
        out[clock] = {
            "prepare_ms": {
                "median": round(prep, 3),
                "p90": round(float(np.percentile(samples["prepare"], 90)) * 1e3, 3),
            },
            "register_ms": {
                "median": round(regt, 3),
                "p90": round(float(np.percentile(samples["register"], 90)) * 1e3, 3),
            },
            "pair_ms (2 prepare + register)": round(2 * prep + regt, 3),
            "per_frame_ms (prepare + 1.5 register)": round(prep + 1.5 * regt, 3),
        }
    out["samples"] = len(wall["register"])
    out["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return out


def real_tiles() -> dict[str, Any] | None:
    """Pairwise offsets of the real BSE tiles against their reference positions."""
    if not TILES.is_dir():
        return None
    reference = json.loads((TILES / "reference_offsets.json").read_text())["coords_yx_pixels"]

    def name(col: int, row: int) -> str:
        return f"stitch2d_ex[Grid@{col} {row}].jpg"

    reg = Registrar()
    prepared = {}
    for col in range(2):
        for row in range(3):
            image = cv2.imread(str(TILES / name(col, row)), cv2.IMREAD_GRAYSCALE)
            prepared[col, row] = reg.prepare(image)
    out: dict[str, Any] = {}
    for mode in ("blind", "predicted (+25, -20 px off, search 60 px)"):
        rows = []
        for (col, row), pa in prepared.items():
            for other, guess in (((col + 1, row), (385.0, 0.0)), ((col, row + 1), (0.0, 396.0))):
                if other not in prepared:
                    continue
                predicted = None if mode == "blind" else (guess[0] + 25.0, guess[1] - 20.0)
                search = None if mode == "blind" else 60.0
                shift = reg.register(pa, prepared[other], predicted, search)
                ya, xa = reference[name(col, row)]
                yb, xb = reference[name(*other)]
                rows.append(
                    {
                        "pair": f"{name(col, row)} -> {name(*other)}",
                        "reference_dx_dy": [round(xb - xa, 2), round(yb - ya, 2)],
                        "estimated_dx_dy": [round(shift.dx, 2), round(shift.dy, 2)],
                        "error_px": round(
                            math.hypot(shift.dx - (xb - xa), shift.dy - (yb - ya)), 2
                        ),
                        "ok": shift.ok,
                        "score": round(shift.score, 3),
                        "overlap": round(shift.overlap, 3),
                    }
                )
        out[mode] = {
            "max_error_px": max(r["error_px"] for r in rows),
            "all_ok": all(r["ok"] for r in rows),
            "pairs": rows,
        }
    return out


def real_fast_vs_slow(fields: int) -> dict[str, Any] | None:
    """Real noise: a fast-scan (100 ns) crop against an overlapping slow-scan (30 us) crop.

    The two scans of a field drift by a few pixels between them; that drift is
    measured on the whole frames, and each pair of crops must agree with it
    plus the crop offset.  Not a ground truth (slow scans have their own
    distortion), a consistency check on real fast-scan noise.
    """
    if not KRISS.is_dir():
        return None
    reg = Registrar()
    errors: list[float] = []
    refused = 0
    for k in range(1, fields + 1):
        # Image area only: rows 1..440, cols 1..510 (data bar and UI frame cropped).
        fast = cv2.imread(str(KRISS / "low" / f"low_100ns_{k:03d}.png"), 0)[1:441, 1:511]
        slow = cv2.imread(str(KRISS / "high" / f"high_30us_{k:03d}.png"), 0)[1:441, 1:511]
        drift = reg.register(reg.prepare(slow), reg.prepare(fast))
        for ox, oy in CROP_OFFSETS:
            a = slow[: 440 - oy, : 510 - ox]
            b = fast[oy:, ox:]
            shift = reg.register(reg.prepare(a), reg.prepare(b))
            if not (shift.ok and drift.ok):
                refused += 1
                continue
            errors.append(math.hypot(shift.dx - ox - drift.dx, shift.dy - oy - drift.dy))
    return {
        "what": "fast-scan crop vs slow-scan crop of the same field, 37-63 % overlap, "
        "against crop offset + whole-frame drift",
        "fields": fields,
        **summarise(errors, refused),
    }


def main() -> None:
    """Render the cases, measure every method on them, time the default, report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traversals", type=int, default=6, help="traversals per case")
    parser.add_argument("--quick", action="store_true", help="2 traversals, default method only")
    args = parser.parse_args()
    traversals = 2 if args.quick else args.traversals
    methods = {k: METHODS[k] for k in list(METHODS)[:1]} if args.quick else METHODS
    cases: list[tuple[str, str, str | None]] = [
        ("procedural, ld", "ld", None),
        ("procedural, hd", "hd", None),
    ]
    if EUTECTIC.is_file():
        cases += [("eutectic micrograph, ld", "ld", str(EUTECTIC))]
        cases += [("eutectic micrograph, hd", "hd", str(EUTECTIC))]
    accuracy: dict[str, dict[str, Any]] = {}
    speed: dict[str, Any] = {}
    for label, noise, source in cases:
        t0 = time.perf_counter()
        pairs = render_case(noise, source, traversals)
        print(f"{label}: {len(pairs)} pairs rendered in {time.perf_counter() - t0:.0f} s")
        accuracy[label] = {}
        for method, config in methods.items():
            accuracy[label][method] = evaluate(config, pairs)
            print(f"  {method:34s} {json.dumps(accuracy[label][method]['all'])}")
        if label == "procedural, ld":
            speed = timing(pairs, repeats=1 if args.quick else 3)
            print("  timing", json.dumps(speed))
    kriss = real_fast_vs_slow(5 if args.quick else 20)
    if kriss is not None:
        print("real fast vs slow scans:", json.dumps(kriss))
    tiles = real_tiles()
    if tiles is not None:
        for mode, res in tiles.items():
            print(f"real tiles, {mode}: max error {res['max_error_px']} px, all ok {res['all_ok']}")
    path = write_result(
        "register",
        {
            "frames": "1024 x 768 virtual SEM; x overlap 30-60 % (+-10 px jitter), rows 40-50 %",
            "error": "|estimated - true shift| (Euclidean), pixels; refused = ok False",
            "targets": {
                "median_px": 0.15,
                "p99_px": 0.5,
                "max_px": 1.0,
                "real_tiles_px": 2.0,
                "pair_ms": 5.0,
            },
            "traversals_per_case": traversals,
            "accuracy": accuracy,
            "timing": speed,
            "real_tiles": tiles,
            "real_fast_vs_slow_scans": kriss,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
