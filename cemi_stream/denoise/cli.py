"""The denoiser's subcommands: ``train-denoiser``, ``denoise``, ``eval-denoiser``.

Registered on the main parser by :func:`add_commands`; the handlers import
torch lazily, so the acquisition commands never pay for it.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Callable
from pathlib import Path

from ..config import DENOISE_BACKENDS
from ..errors import ConfigError


def _milestones(text: str) -> tuple[float, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of fractions, e.g. 0.5,0.75"
        ) from None
    if any(not 0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text}: milestones must lie strictly between 0 and 1")
    return values


def add_commands(
    sub: argparse._SubParsersAction,
    add_common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add the denoiser's subcommands to the ``run_daemon.py`` parser.

    Parameters
    ----------
    sub : argparse subparsers
        The main parser's subcommand set.
    add_common : callable
        Adds ``--config``/``-q``/``-v`` to a subparser.
    """
    p = sub.add_parser(
        "train-denoiser",
        help="train a denoising network (SEMNET L1 / SEMGAN) on pairs, HD images or noisy frames",
        description="Train an RRDBNet denoiser. Data: real LD/HD pairs (registered and "
        "data-bar-stripped automatically; --pairs may be repeated), HD images only (LD "
        "synthesised by the second-order degradation), or noisy frames only "
        "(self-supervised Neighbor2Neighbor). Checkpoints go to MODEL_DIR/checkpoints and a "
        "rerun of the same command resumes from the newest one.",
    )
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--pairs", nargs=2, action="append", metavar=("LD_DIR", "HD_DIR"), type=Path,
        help="folders of low- and high-definition images matched by name (repeatable)",
    )  # fmt: skip
    data.add_argument("--hd", type=Path, metavar="HD_DIR", help="clean HD images only")
    data.add_argument(
        "--noisy", type=Path, metavar="LD_DIR", help="noisy LD frames only (folder or video)"
    )
    p.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR")
    p.add_argument("--arch", choices=["paper", "compact"], default="compact")
    p.add_argument("--stage", choices=["l1", "gan"], default="l1")
    p.add_argument("--iters", type=int, default=40_000, help="iterations (paper: 40000)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=18, help="patches per iteration (paper: 18)")
    p.add_argument("--patch", type=int, default=128, help="patch side, pixels (multiple of 8)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4)")
    p.add_argument(
        "--milestones", type=_milestones, default=None, metavar="F,F",
        help="learning-rate halving points as fractions of --iters ('none': constant)",
    )  # fmt: skip
    p.add_argument(
        "--train-ids", metavar="IDS", help="pair numbers to train on, e.g. 1-32 (pairs mode)"
    )
    p.add_argument(
        "--val-ids", metavar="IDS", help="pair numbers to validate on, e.g. 33-40 (any mode)"
    )
    p.add_argument(
        "--val-pairs", nargs=2, action="append", metavar=("LD_DIR", "HD_DIR"), type=Path,
        help="validation pairs for --hd/--noisy training (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--init", type=Path, metavar="MODEL",
        help="start from this model (--stage gan: the L1 model; or a BasicSR/ESRGAN .pth)",
    )  # fmt: skip
    p.add_argument("--vgg-weights", type=Path, metavar="PTH",
                   help="VGG19 ImageNet weights for the perceptual loss (--stage gan)")  # fmt: skip
    p.add_argument("--name", help="model name (file name of the weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=1000, metavar="N")
    p.add_argument("--checkpoint-every", type=int, default=1000, metavar="N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "denoise",
        help="denoise an image or a folder of images with a trained model",
        description="Write the denoised images under the same file names and sizes in OUT_DIR; "
        "a detected data bar is passed through untouched.",
    )
    p.add_argument("input", type=Path, metavar="INPUT", help="an image file or a folder")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")
    p.add_argument(
        "--model", metavar="NAME|PATH", help="model name or .safetensors file (default: shipped)"
    )
    p.add_argument("--backend", choices=DENOISE_BACKENDS, default="auto")
    p.add_argument(
        "--tile", type=int, default=0, metavar="PX", help="denoise in tiles of PX (0: whole)"
    )
    p.add_argument("--overlap", type=int, default=32, metavar="PX", help="tile overlap, pixels")
    p.add_argument("--cache-dir", type=Path, help="where compiled ONNX/TensorRT models are kept")
    add_common(p)
    p.set_defaults(func=cmd_denoise)

    p = sub.add_parser(
        "eval-denoiser",
        help="score raw LD, non-local means and models against HD on real pairs",
        description="PSNR, SSIM and the dark-phase area fraction error (Bradley-Roth) per "
        "image and overall, after registering each pair and stripping the data bar; writes "
        "eval.csv, eval.json and eval.png to --out.",
    )
    p.add_argument(
        "--pairs", nargs=2, action="append", metavar=("LD_DIR", "HD_DIR"), type=Path,
        required=True, help="folders of LD and HD images matched by name (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--model", action="append", default=[], metavar="NAME|PATH",
        help="model to score (repeatable; default: the shipped model)",
    )  # fmt: skip
    p.add_argument("--ids", metavar="IDS", help="pair numbers to score, e.g. 33-40 (default all)")
    p.add_argument("--backend", choices=DENOISE_BACKENDS, default="auto")
    p.add_argument("--nlm-h", type=float, help="non-local means strength (default: tuned)")
    p.add_argument("--out", type=Path, default=Path("eval-denoiser"), metavar="DIR")
    add_common(p)
    p.set_defaults(func=cmd_eval)


def _positive(value: int, option: str) -> None:
    if value <= 0:
        raise ConfigError(f"{option} {value}: must be positive")


def cmd_train(args: argparse.Namespace) -> int:
    """``train-denoiser``."""
    from .train import run_training

    _positive(args.iters, "--iters")
    _positive(args.batch, "--batch")
    if args.val_pairs and args.pairs:
        raise ConfigError("--val-pairs: only for --hd/--noisy training (--pairs validates on "
                          "its own --val-ids)")  # fmt: skip
    mode = "pairs" if args.pairs else "hd" if args.hd else "noisy"
    pair_dirs = [tuple(p) for p in (args.pairs or args.val_pairs or [])]
    path = run_training(
        args.out,
        mode=mode,
        pair_dirs=pair_dirs,
        hd_dir=args.hd,
        noisy_source=args.noisy,
        arch=args.arch,
        stage=args.stage,
        iters=args.iters,
        batch=args.batch,
        patch_px=args.patch,
        device=args.device,
        threads=args.threads,
        lr=args.lr,
        milestones=args.milestones,
        train_ids=args.train_ids,
        val_ids=args.val_ids,
        init=args.init,
        vgg_weights=args.vgg_weights,
        seed=args.seed,
        name=args.name,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        command=shlex.join(["python", "run_daemon.py", *args.argv]),
        progress=not args.quiet,
    )
    print(path)
    return 0


def cmd_denoise(args: argparse.Namespace) -> int:
    """``denoise``."""
    from .infer import denoise_files

    summary = denoise_files(
        args.input,
        args.out,
        model=args.model,
        backend=args.backend,
        tile_px=args.tile,
        progress=not args.quiet,
        overlap_px=args.overlap,
        cache_dir=args.cache_dir,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``eval-denoiser``."""
    from .evaluate import evaluate
    from .pairs import select_ids

    ids = select_ids(args.ids) if args.ids else None
    models: list[str | Path] = list(args.model) or [None]  # type: ignore[list-item]
    result = evaluate(
        [tuple(p) for p in args.pairs],
        models,
        ids=ids,
        backend=args.backend,
        out_dir=args.out,
        nlm_h=args.nlm_h,
        progress=not args.quiet,
    )
    print(json.dumps(result["methods"], indent=2, default=str))
    return 0
