"""Command line of ``train-segmenter`` (:mod:`cemi_stream.analysis.train` trains).

``add_parser(subparsers, add_common)`` registers the subcommand and
``cmd_train_segmenter(args)`` runs it: it builds the data (``--sim``,
``--labelme``, ``--images/--masks``, plus ``--weak``), the
:class:`~cemi_stream.analysis.train.SegTrainConfig` and calls
:func:`~cemi_stream.analysis.train.train_segmenter`.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .train import LOSSES, SegTrainConfig, _device, train_segmenter
from .trainseg_data import (
    SegSample,
    load_image_mask_dirs,
    load_labelme,
    load_sim,
    load_weak,
    parse_fold,
    parse_values,
    split_names,
)


def _data(args: argparse.Namespace) -> tuple[list[SegSample], list[SegSample], dict[str, Any]]:
    seed = args.seed
    if args.task == "phase" and (args.sim is not None or args.weak is not None):
        # both make lamellar-region masks, which are not a phase
        raise ConfigError(
            "--task phase: --sim and --weak make lamellar masks; give --images/--masks or --labelme"
        )
    if args.val_names and args.sim is not None:
        raise ConfigError("--val-names: only with --images/--masks or --labelme")
    if args.sim is not None:
        if args.sim < 1 and args.weak is None:
            raise ConfigError(f"--sim {args.sim}: need at least one specimen")
        if args.sim < 0:
            raise ConfigError(f"--sim {args.sim}: must be >= 0")
        n_val = round(args.sim * args.val_fraction) if args.val_fraction > 0 else 0
        train = load_sim(args.sim, seed, args.sim_size)
        val = load_sim(n_val, seed, args.sim_size, start=args.sim) if n_val else []
        data: dict[str, Any] = {
            "source": "sim",
            "specimens": args.sim,
            "val_specimens": n_val,
            "size_px": args.sim_size,
            "seed": seed,
        }
    else:
        if args.labelme is not None:
            samples = load_labelme(args.labelme, args.label or None)
            data = {"source": "labelme", "dir": str(args.labelme), "labels": args.label or "all"}
        else:
            if args.images is None or args.masks is None:
                raise ConfigError("--images and --masks go together")
            samples = load_image_mask_dirs(
                args.images,
                args.masks,
                parse_values(args.mask_values),
                args.names.split(",") if args.names else None,
            )
            data = {
                "source": "images+masks",
                "images": str(args.images),
                "masks": str(args.masks),
                "mask_values": args.mask_values or "non-zero",
            }
        if args.val_names:
            wanted = set(args.val_names.split(","))
            unknown = sorted(wanted - {s.name for s in samples})
            if unknown:
                raise ConfigError(f"--val-names: no image named {', '.join(unknown)}")
            train = [s for s in samples if s.name not in wanted]
            val = [s for s in samples if s.name in wanted]
        else:
            tr, va = split_names([s.name for s in samples], args.val_fraction, seed)
            train, val = [samples[i] for i in tr], [samples[i] for i in va]
        data.update({"train_images": [s.name for s in train], "val_images": [s.name for s in val]})
    if args.weak is not None:
        names = args.weak_names.split(",") if args.weak_names else None
        fold = parse_fold(args.weak_fold)
        weak = load_weak(args.weak, names, fold)
        train = [*train, *weak]
        data["weak"] = {
            "dir": str(args.weak),
            "labels": "classical lamellar_mask defaults",
            "fold": args.weak_fold,
            "names": args.weak_names,
            "images": [s.name for s in weak],
        }
    return train, val, data


def add_parser(
    subparsers: Any, add_common: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.ArgumentParser:
    """Add ``train-segmenter`` to the ``run_daemon.py`` subcommands; returns its parser."""
    p = subparsers.add_parser(
        "train-segmenter",
        help="train a U-Net++ lamellar segmenter (labelme, image+mask folders or simulated)",
        description="Train a U-Net++ (segmentation-models-pytorch; Dice loss, Adam) to segment "
        "lamellar regions. Checkpoints go to MODEL_DIR/checkpoints after every epoch and a "
        "rerun of the same command resumes from the newest one; the final model is "
        "MODEL_DIR/NAME.safetensors with its NAME.json card.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labelme", type=Path, metavar="DIR", help="folder of labelme JSON files")
    src.add_argument("--images", type=Path, metavar="DIR", help="images (with --masks)")
    src.add_argument("--sim", type=int, metavar="N", help="N simulated specimens (virtual SEM)")
    p.add_argument("--masks", type=Path, metavar="DIR", help="masks matched to --images by name")
    p.add_argument(
        "--mask-values", metavar="V,V", help="mask values that are foreground (default: non-zero)"
    )
    p.add_argument("--names", metavar="A,B", help="only these image stems of --images")
    p.add_argument(
        "--label",
        action="append",
        metavar="NAME",
        help="labelme label meaning lamellar (repeatable; default: all labels)",
    )
    p.add_argument(
        "--weak",
        type=Path,
        metavar="DIR",
        help="also train on these images, labelled by the classical detector",
    )
    p.add_argument("--weak-names", metavar="A,B", help="only these stems / class/stem of --weak")
    p.add_argument(
        "--weak-fold",
        metavar="I/K",
        help="only every K-th image of each --weak sub-folder from the I-th (a split)",
    )
    p.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR")
    p.add_argument(
        "--encoder",
        default="small",
        metavar="NAME",
        help="'small' (MobileNetV3, CPU), 'paper' (se_resnext50_32x4d) or an smp encoder name",
    )
    p.add_argument("--decoder-channels", metavar="C,C,C,C,C", help="decoder widths")
    p.add_argument(
        "--encoder-weights",
        type=Path,
        metavar="FILE",
        help="local encoder weights (.safetensors/.pth); never downloaded",
    )
    p.add_argument("--epochs", type=int, default=80, help="epochs (paper: 80)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tile", type=int, default=256, help="crop side, px (multiple of 32)")
    p.add_argument("--crops-per-image", type=int, default=0, help="0: area / tile area")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4)")
    p.add_argument("--loss", choices=LOSSES, default="dice", help="dice (paper) or dice+bce")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument(
        "--val-names", metavar="A,B", help="these image stems are the validation set (not random)"
    )
    p.add_argument("--sim-size", type=int, default=288, help="side of a simulated specimen, px")
    p.add_argument("--no-augment", action="store_true", help="crops only: no flips/rotations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    p.add_argument(
        "--task",
        choices=["lamellar", "phase"],
        default="lamellar",
        help="what the masks mark: lamellar regions (--segmenter) or the dark phase "
        "(analyze --method model)",
    )
    p.add_argument("--name", help="model name (default TASK-unetpp-ENCODER)")
    if add_common is not None:
        add_common(p)
    else:
        p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_train_segmenter)
    return p


def _arch(args: argparse.Namespace) -> dict[str, Any]:
    from models.unetpp import normalize_segmenter_arch

    arch: dict[str, Any] = normalize_segmenter_arch(args.encoder)
    if args.decoder_channels:
        try:
            channels = [int(c) for c in args.decoder_channels.split(",")]
        except ValueError:
            raise ConfigError(f"--decoder-channels {args.decoder_channels!r}: integers") from None
        arch = normalize_segmenter_arch(
            {**arch, "decoder_channels": channels, "encoder_depth": len(channels)}
        )
    return arch


def cmd_train_segmenter(args: argparse.Namespace) -> int:
    """``train-segmenter``: prints the model file; returns the exit code (0)."""
    from models.unetpp import SEGMENTER_ARCHS

    arch = _arch(args)
    _device(args.device)  # fail early, before the data is built
    train, val, data = _data(args)
    short = args.encoder if args.encoder in SEGMENTER_ARCHS else arch["encoder"].split("-", 1)[-1]
    argv = getattr(args, "argv", None)
    prefix = getattr(args, "invoked_as", None) or ["python", "run_daemon.py"]
    command = shlex.join([*prefix, *argv]) if argv else ""
    config = SegTrainConfig(
        arch=arch,
        epochs=args.epochs,
        batch=args.batch,
        tile_px=args.tile,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        crops_per_image=args.crops_per_image,
        augment=not args.no_augment,
        encoder_weights=str(args.encoder_weights) if args.encoder_weights else None,
        loss=args.loss,
        name=args.name or f"{args.task}-unetpp-{short}",
        kind=f"{args.task}-segmenter",
        data=data,
        command=command,
    )
    path = train_segmenter(config, train, val, args.out, progress=not args.quiet)
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cemi_stream.analysis.train ...`` (the same options as ``train-segmenter``)."""
    import sys

    from ..errors import CemiError

    parser = argparse.ArgumentParser(prog="python -m cemi_stream.analysis.train")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    raw = list(sys.argv[1:] if argv is None else argv)
    if not raw or raw[0] != "train-segmenter":
        raw = ["train-segmenter", *raw]
    args = parser.parse_args(raw)
    args.argv = raw[1:]
    args.invoked_as = ["python", "-m", "cemi_stream.analysis.train"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except CemiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


__all__ = ["add_parser", "cmd_train_segmenter", "main"]
