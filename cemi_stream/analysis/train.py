"""``train-segmenter``: train a U-Net++ lamellar segmenter (the paper: Dice loss, Adam 1e-4).

Data (one of): labelme JSON files (``--labelme DIR``), images with masks
(``--images DIR --masks DIR``), or simulated specimens from the virtual SEM
(``--sim N``); optionally plus images weak-labelled by the classical detector
(``--weak DIR``).  A share of the images (``--val-fraction``; for ``--sim``
extra specimens) validates after every epoch: pixel IoU and Dice of the
thresholded whole-image predictions (as :mod:`~cemi_stream.analysis.segment`
makes them); the best epoch's weights become the model.

Output folder layout (as ``train-denoiser``'s)::

    OUT/NAME.safetensors, OUT/NAME.json      final model and card
    OUT/train_log.jsonl                      one JSON line per step / epoch
    OUT/checkpoints/epoch_NNNN.json          checkpoint index (written last)
    OUT/checkpoints/epoch_NNNN.safetensors, epoch_NNNN.state.pt
    OUT/checkpoints/best.safetensors         best weights so far

Rerunning the same command resumes from the newest checkpoint (``--epochs``
may be raised); a folder holding a checkpoint of other settings is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AnalysisError, ConfigError
from .trainseg_data import (
    CropSampler,
    SegSample,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT_FORMAT = 1
_KEEP = 2
# Settings that may change when a run is resumed.
_RESUMABLE = frozenset({"epochs", "device", "threads", "name", "command"})
LOSSES = ("dice", "dice+bce")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SegTrainConfig:
    """One training run of a segmenter.

    Attributes
    ----------
    arch : dict
        Network (:func:`models.unetpp.normalize_segmenter_arch` output).
    epochs : int
        Passes over the training images (the paper: 80).
    batch : int
        Crops per step.
    tile_px : int
        Crop side, px (multiple of 32).
    lr : float
        Adam learning rate (the paper: 1e-4).
    seed : int
        Seed of initialisation, split and crops.
    device : {"cpu", "cuda"}
    threads : int
        torch CPU threads; 0: all cores this process may use.
    crops_per_image : int
        Crops per image per epoch; 0: about its area over the tile's.
    augment : bool
        Random flips, rot90, contrast, inversion.
    encoder_weights : str or None
        Local encoder weights file the network started from.
    loss : {"dice", "dice+bce"}
        Dice loss (the paper), or Dice plus binary cross-entropy (calibrates
        the logits on images with little or no foreground).
    name : str
        Model name (``OUT/NAME.safetensors``).
    kind : str
        What the mask is: ``"lamellar-segmenter"`` (lamellar regions) or
        ``"phase-segmenter"`` (the dark phase; ``--method model``).
    data : dict
        What the images are (recorded in the card).
    command : str
        The exact command line.
    """

    arch: dict[str, Any]
    epochs: int = 80
    batch: int = 8
    tile_px: int = 256
    lr: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    threads: int = 0
    crops_per_image: int = 0
    augment: bool = True
    encoder_weights: str | None = None
    loss: str = "dice"
    name: str = "lamellar-unetpp"
    kind: str = "lamellar-segmenter"
    data: dict[str, Any] = field(default_factory=dict)
    command: str = ""

    def __post_init__(self) -> None:
        for key in ("epochs", "batch", "tile_px"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{key.replace('_px', '')} {v!r}: must be a positive integer")
        if self.tile_px % 32:
            raise ConfigError(f"--tile {self.tile_px}: must be a multiple of 32")
        for key in ("seed", "threads", "crops_per_image"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"--{key.replace('_', '-')} {v!r}: must be >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr {self.lr!r}: must be positive")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss {self.loss}: choose {' or '.join(LOSSES)}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device}: choose cpu or cuda")
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"--name {self.name!r}: letters, digits, '.', '_' and '-' only")
        if self.kind not in ("lamellar-segmenter", "phase-segmenter"):
            raise ConfigError(f"kind {self.kind!r}: choose lamellar-segmenter or phase-segmenter")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(self)))
        return out


# --------------------------------------------------------------------------- metrics


def mask_scores(pred: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> dict[str, float]:
    """Pixel IoU and Dice over all images together, and the mean per-image IoU.

    An image with empty prediction and truth counts as IoU 1 in the mean.
    """
    inter = union = total = 0
    per_image = []
    for p, t in zip(pred, truth, strict=True):
        i = int(np.count_nonzero(p & t))
        u = int(np.count_nonzero(p | t))
        inter, union = inter + i, union + u
        total += int(np.count_nonzero(p)) + int(np.count_nonzero(t))
        per_image.append(i / u if u else 1.0)
    return {
        "iou": inter / union if union else 1.0,
        "dice": 2 * inter / total if total else 1.0,
        "mean_image_iou": float(np.mean(per_image)) if per_image else math.nan,
    }


# --------------------------------------------------------------------------- the run


def _device(name: str) -> Any:
    import torch

    if name == "cuda":
        if not torch.cuda.is_available():
            raise AnalysisError(
                "--device cuda: no CUDA GPU is available to torch (use --device cpu)"
            )
        return torch.device("cuda")
    return torch.device("cpu")


def _threads(requested: int) -> int:
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _save_weights(model: Any, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def _load_weights(model: Any, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except Exception as exc:  # safetensors / load_state_dict raise several types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AnalysisError(f"{path}: cannot restore checkpoint weights ({first})") from None


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint index of ``out_dir`` (``epoch_NNNN.json``)."""
    found = sorted((Path(out_dir) / CHECKPOINT_DIR).glob("epoch_*.json"))
    return found[-1] if found else None


def read_train_log(out_dir: Path) -> list[dict[str, Any]]:
    """Entries of ``OUT/train_log.jsonl``."""
    path = Path(out_dir) / TRAIN_LOG
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return out


class _Run:
    """Model, optimiser and bookkeeping of one training run."""

    def __init__(self, config: SegTrainConfig, out_dir: Path) -> None:
        import torch

        from models.unetpp import build_segmenter

        self.config = config
        self.out_dir = out_dir
        self.ckpt = out_dir / CHECKPOINT_DIR
        self.device = _device(config.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = build_segmenter(config.arch, encoder_weights=config.encoder_weights)
        self.model.to(self.device).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        from segmentation_models_pytorch.losses import DiceLoss

        dice = DiceLoss(mode="binary", from_logits=True)
        if config.loss == "dice":
            self.loss_fn: Callable[[Any, Any], Any] = dice
        else:
            bce = torch.nn.BCEWithLogitsLoss()
            self.loss_fn = lambda logits, target: dice(logits, target) + bce(logits, target)
        self.epoch = 0
        self.steps = 0
        self.best: dict[str, Any] | None = None  # epoch, iou, dice
        self.history: list[dict[str, Any]] = []

    def forward_np(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out: np.ndarray = (
                self.model(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()
            )
        return out

    def validate(self, val: Sequence[SegSample]) -> dict[str, float] | None:
        from .segment import normalise_tile, windowed_logits

        if not val:
            return None
        self.model.eval()
        try:
            preds = [windowed_logits(self.forward_np, normalise_tile(s.image)) > 0 for s in val]
        finally:
            self.model.train()
        return mask_scores(preds, [s.mask for s in val])

    def save_checkpoint(self) -> None:
        import torch

        self.ckpt.mkdir(parents=True, exist_ok=True)
        stem = f"epoch_{self.epoch:04d}"
        _save_weights(self.model, self.ckpt / f"{stem}.safetensors")
        tmp = self.ckpt / f"{stem}.state.pt.tmp"
        torch.save({"opt": self.opt.state_dict()}, tmp)
        os.replace(tmp, self.ckpt / f"{stem}.state.pt")
        index = {
            "format_version": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "steps": self.steps,
            "config": self.config.to_dict(),
            "best": self.best,
            "history": self.history,
            "saved": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _atomic_text(self.ckpt / f"{stem}.json", json.dumps(index, indent=2))
        for old in sorted(self.ckpt.glob("epoch_*.json"))[:-_KEEP]:
            old.unlink(missing_ok=True)
            for suffix in (".safetensors", ".state.pt"):
                old.with_suffix(suffix).unlink(missing_ok=True)

    def resume(self, index_path: Path) -> None:
        import torch

        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AnalysisError(f"{index_path}: unreadable checkpoint index ({exc})") from None
        if index.get("format_version") != CHECKPOINT_FORMAT:
            raise AnalysisError(f"{index_path}: checkpoint format {index.get('format_version')!r}")
        saved, current = index.get("config", {}), self.config.to_dict()
        diffs = [
            f"{k}: {saved.get(k)!r} vs {current.get(k)!r}"
            for k in sorted(set(saved) | set(current))
            if k not in _RESUMABLE and saved.get(k) != current.get(k)
        ]
        if diffs:
            raise ConfigError(
                f"{self.out_dir}: holds a checkpoint of a different training run "
                f"({'; '.join(diffs[:2])}); use a new --out or the same settings"
            )
        epoch = int(index["epoch"])
        if epoch > self.config.epochs:
            raise ConfigError(
                f"{self.out_dir}: its checkpoint is at epoch {epoch}, past --epochs "
                f"{self.config.epochs}; raise --epochs or use a new --out"
            )
        stem = index_path.with_suffix("")
        _load_weights(self.model, stem.with_suffix(".safetensors"))
        state_path = stem.with_suffix(".state.pt")
        try:
            state = torch.load(state_path, map_location=self.device, weights_only=True)
            self.opt.load_state_dict(state["opt"])
        except Exception as exc:  # unpickling / load_state_dict raise many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AnalysisError(f"{state_path}: cannot restore optimiser state ({first})") from None
        self.epoch, self.steps = epoch, int(index.get("steps", 0))
        self.best, self.history = index.get("best"), list(index.get("history", []))
        log_path = self.out_dir / TRAIN_LOG
        kept = [e for e in read_train_log(self.out_dir) if int(e.get("epoch", 0)) <= epoch]
        _atomic_text(log_path, "".join(json.dumps(e) + "\n" for e in kept))
        log.info("resuming %s from epoch %d (%s)", self.config.name, epoch, index_path)


def train_segmenter(
    config: SegTrainConfig,
    train: Sequence[SegSample],
    val: Sequence[SegSample],
    out_dir: Path,
    *,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> Path:
    """Train and write ``OUT/NAME.safetensors`` + card; resumes a checkpointed run.

    Parameters
    ----------
    config : SegTrainConfig
        What to train.
    train, val : sequence of SegSample
        Training and validation images (``val`` may be empty: the last
        epoch's weights are then the model).
    out_dir : Path
        Output folder (see the module docstring).
    progress : bool
        Show the step counter with loss and the last validation IoU.
    on_epoch : callable, optional
        Called with ``(epoch, summary)`` after each epoch.

    Returns
    -------
    Path
        The model file.

    Raises
    ------
    AnalysisError
        No CUDA, unreadable checkpoint, loss not finite.
    ConfigError
        A checkpoint of other settings in ``out_dir``.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sampler = CropSampler(train, config.tile_px, config.crops_per_image, config.augment)
    previous = torch.get_num_threads()
    if config.device == "cpu":
        torch.set_num_threads(_threads(config.threads))
    try:
        run = _Run(config, out_dir)
        index = latest_checkpoint(out_dir)
        if index is not None:
            run.resume(index)
        else:
            (out_dir / TRAIN_LOG).unlink(missing_ok=True)
            (out_dir / CHECKPOINT_DIR / "best.safetensors").unlink(missing_ok=True)
        return _loop(run, sampler, list(val), progress, on_epoch)
    finally:
        torch.set_num_threads(previous)


def _loop(
    run: _Run,
    sampler: CropSampler,
    val: list[SegSample],
    progress: bool,
    on_epoch: Callable[[int, dict[str, Any]], None] | None,
) -> Path:
    import torch

    from ..progress import Progress

    config, out_dir = run.config, run.out_dir
    per_epoch = math.ceil(sampler.epoch_size() / config.batch)
    log.info(
        "training %s: %s, %d training images (%d crops of %d px per epoch), %d validation "
        "images, %d epochs, batch %d, on %s",
        config.name,
        config.arch["encoder"],
        len(sampler),
        sampler.epoch_size(),
        config.tile_px,
        len(val),
        config.epochs,
        config.batch,
        run.device,
    )
    bar = Progress(
        "train-segmenter", total=config.epochs * per_epoch, enabled=progress, unit="steps"
    )
    started = time.monotonic()
    with open(out_dir / TRAIN_LOG, "a", encoding="utf-8") as tlog:
        while run.epoch < config.epochs:
            t0 = time.monotonic()
            epoch = run.epoch + 1
            losses = []
            for x, y in sampler.epoch(config.seed, epoch, config.batch):
                xb = torch.from_numpy(x).to(run.device)
                yb = torch.from_numpy(y).to(run.device)
                run.opt.zero_grad(set_to_none=True)
                loss = run.loss_fn(run.model(xb), yb)
                loss.backward()
                run.opt.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise AnalysisError(
                        f"training {config.name}: loss became {value} in epoch "
                        f"{epoch} (lower --lr or check the data)"
                    )
                run.steps += 1
                losses.append(value)
                tlog.write(json.dumps({"epoch": epoch, "step": run.steps, "loss": value}) + "\n")
                done = (epoch - 1) * per_epoch + len(losses)
                extra = f"epoch {epoch}/{config.epochs}, loss {np.mean(losses[-20:]):.4f}"
                if run.best is not None:
                    extra += f", best val IoU {run.best['iou']:.3f}"
                bar.update(done, extra)
            run.epoch = epoch
            summary: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "seconds": round(time.monotonic() - t0, 2),
            }
            scores = run.validate(val)
            if scores is not None:
                summary.update({f"val_{k}": v for k, v in scores.items()})
                if run.best is None or scores["iou"] > run.best["iou"]:
                    run.ckpt.mkdir(parents=True, exist_ok=True)
                    _save_weights(run.model, run.ckpt / "best.safetensors")
                    run.best = {"epoch": epoch, **scores}
            run.history.append(summary)
            tlog.write(json.dumps(summary) + "\n")
            tlog.flush()
            log.info(
                "epoch %d: train loss %.4f%s (%.1f s)",
                epoch,
                summary["train_loss"],
                f", val IoU {scores['iou']:.3f}, Dice {scores['dice']:.3f}" if scores else "",
                summary["seconds"],
            )
            run.save_checkpoint()
            if on_epoch is not None:
                on_epoch(epoch, summary)
    bar.close()
    log.info("trained to epoch %d in %.1f s", run.epoch, time.monotonic() - started)
    return _write_final(run, sampler, val)


def _write_final(run: _Run, sampler: CropSampler, val: list[SegSample]) -> Path:
    import segmentation_models_pytorch as smp
    import torch

    from models.unetpp import parameter_count, save_segmenter
    from models.weights import ModelCard

    config = run.config
    if run.best is not None and (run.ckpt / "best.safetensors").is_file():
        _load_weights(run.model, run.ckpt / "best.safetensors")
    run.model.to("cpu").eval()
    metrics: dict[str, Any] = {}
    if run.best is not None:
        metrics = {
            "val_iou": round(float(run.best["iou"]), 4),
            "val_dice": round(float(run.best["dice"]), 4),
            "val_mean_image_iou": round(float(run.best["mean_image_iou"]), 4),
            "best_epoch": int(run.best["epoch"]),
            "val_images": len(val),
        }
    if run.history:
        metrics["train_loss_last_epoch"] = round(float(run.history[-1]["train_loss"]), 5)
    training = {
        "data": config.data,
        "command": config.command,
        "epochs": run.epoch,
        "batch": config.batch,
        "tile_px": config.tile_px,
        "crops_per_epoch": sampler.epoch_size(),
        "sampler": sampler.describe(),
        "optimizer": {"type": "Adam", "lr": config.lr},
        "loss": {
            "dice": "dice (smp DiceLoss, binary, from logits)",
            "dice+bce": "dice (smp DiceLoss, binary) + binary cross-entropy, from logits",
        }[config.loss],
        "seed": config.seed,
        "device": config.device,
        "encoder_weights": config.encoder_weights,
        "parameters": parameter_count(run.model),
        "input": "grey (y, x) tile, 0.5-99.5 % of its levels -> -1..1; sides padded to 32",
        "torch": torch.__version__,
        "segmentation_models_pytorch": smp.__version__,
        "history": run.history,
    }
    card = ModelCard(
        name=config.name, arch={}, training=training, iterations=run.steps, metrics=metrics
    )
    path = save_segmenter(
        run.model, run.out_dir / f"{config.name}.safetensors", card, kind=config.kind
    )
    log.info("segmenter written: %s", path)
    return path


# --------------------------------------------------------------------------- command line
# (in trainseg_cli; imported lazily so that either module can be imported first)


def add_parser(
    subparsers: Any, add_common: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.ArgumentParser:
    """Add ``train-segmenter`` to the ``run_daemon.py`` subcommands (see :mod:`.trainseg_cli`)."""
    from .trainseg_cli import add_parser as add

    return add(subparsers, add_common)


def cmd_train_segmenter(args: argparse.Namespace) -> int:
    """``train-segmenter``: prints the model file; returns the exit code (0)."""
    from .trainseg_cli import cmd_train_segmenter as cmd

    return cmd(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cemi_stream.analysis.train ...`` (the options of ``train-segmenter``)."""
    from .trainseg_cli import main as run

    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "SegTrainConfig",
    "add_parser",
    "cmd_train_segmenter",
    "latest_checkpoint",
    "main",
    "mask_scores",
    "read_train_log",
    "train_segmenter",
]
