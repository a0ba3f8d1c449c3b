"""Calibrate the virtual SEM's noise presets against real fast/slow SEM scans.

Measures the statistics of :mod:`drivers.sim.calibration` (noise/contrast,
Poisson exponent, lag-1 autocorrelation along x, and noise against a clean
partner) on

* the real KRISS pairs (``time``: 100 ns vs 30 us dwell; ``line``: no vs 50x
  line integration), image area rows 1..440, cols 1..510;
* simulated frames of each preset with the same content: the specimen is the
  clean (30 us) frame of each pair, lightly smoothed to drop its own noise;
* simulated frames of the procedural eutectic (for information: its dense
  lamellae leak into the single-image estimators, so the pair estimator is
  the meaningful one there);

and the render time of a 1024x768 frame per preset (tiles warm).  Writes
``bench/results/sim_calibration.json`` and prints a table.

Usage: ``python bench/calibrate_sim.py [--pairs N]``; the data folder is
``$CEMI_DATA`` (default ``../shared/data`` beside the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drivers.sim.calibration import (  # noqa: E402
    NoiseStats,
    kriss_pairs,
    noise_stats,
    pair_noise_contrast,
    read_kriss,
)
from drivers.sim.scanner import PRESETS, Scanner  # noqa: E402
from drivers.sim.specimen import ImageSpecimen, ProceduralSpecimen  # noqa: E402

TOLERANCE = 0.20
KEYS = ("noise_contrast", "noise_sd", "poisson_exponent", "rho_x")
# Which real set each preset is calibrated against.
TARGETS = {"ld": "time/low", "hd": "time/high"}


def summarize(stats: list[NoiseStats], pair: list[float] | None = None) -> dict[str, float]:
    """Medians over frames of every statistic."""
    out = {k: float(np.median([getattr(s, k) for s in stats])) for k in KEYS}
    out["contrast"] = float(np.median([s.contrast for s in stats]))
    if pair:
        out["pair_noise_contrast"] = float(np.median(pair))
    out["frames"] = float(len(stats))
    return out


def measure_real(data: Path, n_pairs: int) -> dict[str, dict[str, float]]:
    """Statistics of the real noisy and clean KRISS frames."""
    result: dict[str, dict[str, float]] = {}
    for subset, noisy_name, clean_name in (("time", "low", "high"), ("line", "noisy", "clean")):
        pairs = kriss_pairs(data, subset)[:n_pairs]
        noisy = [read_kriss(a) for a, _ in pairs]
        clean = [read_kriss(b) for _, b in pairs]
        pair = [pair_noise_contrast(a, b) for a, b in zip(noisy, clean, strict=True)]
        result[f"{subset}/{noisy_name}"] = summarize([noise_stats(a) for a in noisy], pair)
        result[f"{subset}/{clean_name}"] = summarize([noise_stats(b) for b in clean])
    return result


def measure_sim_like_real(data: Path, n_pairs: int) -> dict[str, dict[str, float]]:
    """Statistics of simulated frames whose specimen is each pair's clean frame."""
    specimens = [
        ImageSpecimen(cv2.GaussianBlur(read_kriss(b), (0, 0), 1.5) / np.float32(255.0))
        for _, b in kriss_pairs(data, "time")[:n_pairs]
    ]
    reference = Scanner("hd")
    result: dict[str, dict[str, float]] = {}
    for name in PRESETS:
        scanner = Scanner(name)
        stats, pair = [], []
        for k, spec in enumerate(specimens):
            rng = np.random.default_rng([k, 17])
            frame = scanner.render(spec, 0.0, 0.0, 510, 440, rng).astype(np.float32)
            clean = reference.render(spec, 0.0, 0.0, 510, 440, rng).astype(np.float32)
            stats.append(noise_stats(frame))
            pair.append(pair_noise_contrast(frame, clean))
        result[name] = summarize(stats, pair)
    return result


def measure_sim_procedural(n_fields: int) -> dict[str, dict[str, float]]:
    """Statistics of simulated frames of the procedural eutectic."""
    specimen = ProceduralSpecimen(seed=0)
    reference = Scanner("hd")
    fields = [(300.0 + 900.0 * k + 0.37, 200.0 + 500.0 * k + 0.61) for k in range(n_fields)]
    result: dict[str, dict[str, float]] = {}
    for name in PRESETS:
        scanner = Scanner(name)
        stats, pair = [], []
        for k, (x, y) in enumerate(fields):
            rng = np.random.default_rng([k, 29])
            frame = scanner.render(specimen, x, y, 510, 440, rng).astype(np.float32)
            clean = reference.render(specimen, x, y, 510, 440, rng).astype(np.float32)
            stats.append(noise_stats(frame))
            pair.append(pair_noise_contrast(frame, clean))
        result[name] = summarize(stats, pair)
    return result


def measure_speed(repeats: int = 30) -> dict[str, dict[str, float]]:
    """Milliseconds per 1024x768 frame per preset with the specimen tiles warm."""
    specimen = ProceduralSpecimen(seed=0)
    result: dict[str, dict[str, float]] = {}
    for name in PRESETS:
        scanner = Scanner(name)
        rng = np.random.default_rng(0)
        scanner.render(specimen, 500.25, 400.5, 1024, 768, rng)
        times = []
        for k in range(repeats):
            started = time.perf_counter()
            scanner.render(specimen, 500.25 + 0.1 * k, 400.5, 1024, 768, rng)
            times.append((time.perf_counter() - started) * 1000.0)
        result[name] = {"ms_median": float(np.median(times)), "ms_min": float(np.min(times))}
    cold = ProceduralSpecimen(seed=1)
    started = time.perf_counter()
    cold.region(0.0, 0.0, 1024, 768)
    result["cold_specimen_1024x768"] = {
        "ms": (time.perf_counter() - started) * 1000.0,
        "tiles": float(cold.tiles_rendered),
    }
    return result


def compare(real: dict[str, float], sim: dict[str, float]) -> dict[str, float]:
    """Relative difference ``sim / real - 1`` of each statistic present in both."""
    return {
        k: sim[k] / real[k] - 1.0 for k in (*KEYS, "pair_noise_contrast") if k in sim and k in real
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=40, help="KRISS pairs per set (max 40)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "sim_calibration.json"
    )
    args = parser.parse_args()
    data = Path(os.environ.get("CEMI_DATA", REPO.parent / "shared" / "data")).resolve()
    if not (data / "kriss-sem-pairs").is_dir():
        print(f"error: {data}/kriss-sem-pairs not found (set CEMI_DATA)", file=sys.stderr)
        return 2

    started = time.perf_counter()
    real = measure_real(data, args.pairs)
    like = measure_sim_like_real(data, min(args.pairs, 12))
    procedural = measure_sim_procedural(8)
    speed = measure_speed()
    checks = {name: compare(real[target], like[name]) for name, target in TARGETS.items()}
    within = {
        name: all(abs(v) <= TOLERANCE for k, v in diffs.items() if k != "noise_sd")
        for name, diffs in checks.items()
    }
    report = {
        "data": str(data),
        "pairs": args.pairs,
        "presets": {name: {k: getattr(p, k) for k in p.__slots__} for name, p in PRESETS.items()},
        "real": real,
        "sim_kriss_content": like,
        "sim_procedural": procedural,
        "relative_difference": checks,
        "tolerance": TOLERANCE,
        "within_tolerance": within,
        "render_ms_1024x768": speed,
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    header = f"{'set':<22}{'noise/contr':>12}{'sd':>8}{'poisson':>9}{'rho_x':>8}{'pair':>8}"
    print(header)
    print("-" * len(header))
    rows = [(f"real {k}", v) for k, v in real.items()]
    rows += [(f"sim {k} (kriss)", v) for k, v in like.items()]
    rows += [(f"sim {k} (eutectic)", v) for k, v in procedural.items()]
    for label, s in rows:
        pair = s.get("pair_noise_contrast")
        pair_text = f"{pair:8.4f}" if pair is not None else f"{'-':>8}"
        print(
            f"{label:<22}{s['noise_contrast']:12.4f}{s['noise_sd']:8.2f}"
            f"{s['poisson_exponent']:9.2f}{s['rho_x']:8.3f}{pair_text}"
        )
    for name, diffs in checks.items():
        text = "  ".join(f"{k} {v:+.0%}" for k, v in diffs.items())
        verdict = "ok" if within[name] else "OUT OF TOLERANCE"
        print(f"{name} vs real {TARGETS[name]}: {text}  -> {verdict}")
    for name, t in speed.items():
        print(f"render {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    print(f"wrote {args.out}")
    return 0 if all(within.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
