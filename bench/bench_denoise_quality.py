"""Denoiser quality on the real KRISS validation pairs (033-040 of both sets).

Runs :func:`cemi_stream.denoise.evaluate.evaluate` (the ``eval-denoiser``
engine: pairs registered, data bar stripped) for raw LD, tuned non-local
means and each model given (default: the shipped model, plus the synthetic-
and self-supervised-mode models when their files are given), and checks the
issue's targets for the shipped model: >= 6 dB PSNR over raw LD, >= 1.5 dB
PSNR and a higher SSIM than NLM, dark-phase fraction error <= 1 percentage
point.  Writes ``bench/results/denoise_quality.json`` and keeps the
evaluation's CSV/PNG in ``bench/results/denoise_eval/``.

Usage: ``python -m bench.bench_denoise_quality [--model M]... [--ids 33-40] [--backend B]``
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from bench.common import RESULTS, write_result
from cemi_stream.denoise.evaluate import evaluate
from cemi_stream.denoise.pairs import select_ids

DATA = Path(os.environ.get("CEMI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    """Evaluate and write the result file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="model name or path (repeat)")
    ap.add_argument("--ids", default="33-40")
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    kriss = DATA / "kriss-sem-pairs"
    sets = [(kriss / "time" / "low", kriss / "time" / "high"),
            (kriss / "line" / "noisy", kriss / "line" / "clean")]  # fmt: skip
    models: list[str | Path] = list(args.model) or ["semnet-compact-kriss"]
    out = RESULTS / "denoise_eval"
    result = evaluate(sets, models, ids=select_ids(args.ids), backend=args.backend, out_dir=out)
    overall: dict[str, Any] = result["methods"]
    raw, nlm = overall["raw-ld"], overall["nlm"]
    first = next(k for k in overall if k not in ("raw-ld", "nlm"))
    best = overall[first]
    targets = {
        "model": first,
        "gain_over_raw_db": best["psnr_db"] - raw["psnr_db"],
        "gain_over_nlm_db": best["psnr_db"] - nlm["psnr_db"],
        "ssim_over_nlm": best["ssim"] - nlm["ssim"],
        "dark_fraction_error_pp": best["dark_fraction_error_pp"],
    }
    targets["met"] = {
        "raw_6db": targets["gain_over_raw_db"] >= 6.0,
        "nlm_1_5db": targets["gain_over_nlm_db"] >= 1.5,
        "nlm_ssim": targets["ssim_over_nlm"] > 0.0,
        "dark_1pp": targets["dark_fraction_error_pp"] <= 1.0,
    }
    path = write_result(
        "denoise_quality",
        {
            "what": "KRISS validation pairs (time + line sets), registered, data bar stripped",
            "ids": args.ids,
            "overall": overall,
            "nlm_h": result.get("nlm_h"),
            "lpips": result.get("lpips"),
            "targets": targets,
            "csv": str((out / "eval.csv").relative_to(RESULTS.parent.parent)),
        },
    )
    for name, row in overall.items():
        print(f"{name:28s} PSNR {row['psnr_db']:6.2f} dB  SSIM {row['ssim']:.3f}  "
              f"dark-fraction error {row['dark_fraction_error_pp']:.2f} pp")  # fmt: skip
    print(f"targets: {targets}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
