"""Training of the denoiser: SEMNET (L1), SEMGAN (L1 + perceptual + GAN) and
self-supervised Neighbor2Neighbor.

The CEMI paper trains an ESRGAN generator (RRDBNet at scale 1) in two stages:
SEMNET with the L1 loss alone (fine-tuned from a pre-trained ESRGAN), then
SEMGAN initialised from SEMNET with L1 + perceptual + adversarial losses
against a U-Net discriminator with spectral normalisation; Adam, learning
rate 1e-4, batch 18, 40 000 iterations; everything else as in ESRGAN/BasicSR.
:func:`train` runs one stage on a :mod:`~cemi_stream.denoise.data` sampler:

- stage ``"l1"``: L1 loss for ``mode`` ``"pairs"`` (real LD/HD pairs) and
  ``"hd"`` (LD synthesised from HD); the Neighbor2Neighbor loss for ``mode``
  ``"noisy"`` (noisy frames only);
- stage ``"gan"``: generator ``l1 * L1 + perceptual * VGG19 + gan * BCE``,
  discriminator BCE on real/fake, both Adam.

It validates on whole aligned pairs every ``val_every`` iterations (PSNR/SSIM
of the denoised LD image against HD) keeping the best generator, writes
resumable checkpoints, and saves the final (best) generator with its model
card through :func:`models.weights.save_model`.  :func:`run_training` builds
the data from folders (the command line's entry point).

Output folder layout::

    OUT/NAME.safetensors, OUT/NAME.json      final model and card
    OUT/train_log.jsonl                      one JSON line per iteration / validation
    OUT/checkpoints/iter_NNNNNNN.json        checkpoint index (written last)
    OUT/checkpoints/iter_NNNNNNN.g.safetensors, .d.safetensors, .state.pt
    OUT/checkpoints/best_NNNNNNN.safetensors best generator so far
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional

from models.discriminator import UNetDiscriminatorSN
from models.rrdbnet import ARCHS, RRDBNet, arch_dict, build_generator, load_basicsr_state_dict
from models.weights import ModelCard, load_model, model_hash, save_model

from ..capture.crop import detect_crop
from ..errors import ConfigError, DenoiseError, ModelError
from ..progress import Progress
from .data import NoisyPatches, PairPatches, PatchSampler, SyntheticPatches, check_patch_px
from .degrade import DegradeConfig
from .losses import FeatureExtractor, GANLoss, PerceptualLoss, n2n_loss, vgg19_extractor
from .metrics import psnr, ssim
from .pairs import (
    IMAGE_SUFFIXES,
    AlignedPair,
    load_aligned_pairs,
    load_gray,
    pair_key,
    select_ids,
)

log = logging.getLogger(__name__)

MODES = ("pairs", "hd", "noisy")
STAGES = ("l1", "gan")
DEVICES = ("cpu", "cuda")
VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".mov", ".mkv", ".wmv", ".m4v", ".mpg", ".mpeg"})

#: Learning-rate halvings as fractions of the iterations: BasicSR's ESRGAN
#: schedule (50k, 100k, 200k, 300k of 400k iterations).
DEFAULT_MILESTONES: tuple[float, ...] = (0.125, 0.25, 0.5, 0.75)

CHECKPOINT_DIR = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT_FORMAT = 1
# Checkpoints kept on disk (the newest ones); older ones are deleted.
_KEEP_CHECKPOINTS = 2
# Config fields that may change when a run is resumed: how long it runs, how
# often it reports, where it runs and how it is named.  Every other field
# must match the checkpoint's.
_RESUMABLE_CHANGES = frozenset(
    {
        "iters",
        "val_every",
        "checkpoint_every",
        "device",
        "threads",
        "name",
        "command",
        "vgg_weights",
    }
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# The generator needs sides that are multiples of 4 (pixel-unshuffle by 4).
_SIDE_MULTIPLE = 4


@dataclass(frozen=True)
class TrainConfig:
    """One training stage.

    Attributes
    ----------
    mode : {"pairs", "hd", "noisy"}
        Training data: real LD/HD pairs, HD images with synthesised LD, or
        noisy frames only (self-supervised Neighbor2Neighbor).
    arch : str
        Generator architecture, a name in :data:`models.rrdbnet.ARCHS`.
    stage : {"l1", "gan"}
        SEMNET (L1, or N2N in mode "noisy") or SEMGAN (needs ``init``).
    iters : int
        Total generator iterations (the paper: 40 000).
    batch : int
        Patches per iteration (the paper: 18).
    patch_px : int
        Patch side in pixels, a multiple of 8.
    lr : float
        Adam learning rate of generator and discriminator (the paper: 1e-4).
    betas : tuple of float
        Adam betas (BasicSR's ESRGAN: 0.9, 0.99).
    milestones : tuple of float
        Fractions of ``iters`` at which the learning rate halves (ESRGAN's
        50k/100k/200k/300k of 400k iterations).
    seed : int
        Seed of weight initialisation, patch sampling and N2N sub-sampling.
    device : {"cpu", "cuda"}
        Where to train.
    threads : int
        CPU threads for torch on device "cpu"; 0: all cores this process
        may use.  (On a machine shared with other busy processes 1 can be
        several times faster: the threads of one operation wait for each other.)
    val_every : int
        Validate every this many iterations (and at the end); 0: only at the end.
    checkpoint_every : int
        Write a checkpoint every this many iterations; 0: never.
    init : Path or None
        Generator to start from: a model written by :func:`train`
        (``.safetensors`` with its card; required for stage "gan": the L1
        model) or a BasicSR/ESRGAN ``.pth`` to fine-tune from.
    vgg_weights : Path or None
        torchvision's ``vgg19-dcbb9e9d.pth``; ``None``: torch hub's cache.
    l1_weight, perceptual_weight, gan_weight : float
        Generator loss weights of stage "gan" (Real-ESRGAN: 1, 1, 0.1).
    n2n_gamma : float
        Weight of the Neighbor2Neighbor regulariser.
    disc_feat : int
        Base width of the U-Net discriminator (Real-ESRGAN: 64).
    name : str
        Model name: the final file is ``out_dir/NAME.safetensors``.
    data_dirs : tuple of str
        Folders the data came from (recorded in the model card).
    train_ids, val_ids : tuple of str
        Pair ids used for training / validation (recorded in the card).
    command : str
        Exact command line that started the run (recorded in the card).
    """

    mode: str = "pairs"
    arch: str = "compact"
    stage: str = "l1"
    iters: int = 40_000
    batch: int = 18
    patch_px: int = 128
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    milestones: tuple[float, ...] = DEFAULT_MILESTONES
    seed: int = 0
    device: str = "cpu"
    threads: int = 0
    val_every: int = 1000
    checkpoint_every: int = 1000
    init: Path | None = None
    vgg_weights: Path | None = None
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    gan_weight: float = 0.1
    n2n_gamma: float = 2.0
    disc_feat: int = 64
    name: str = "semnet-compact"
    data_dirs: tuple[str, ...] = field(default_factory=tuple)
    train_ids: tuple[str, ...] = field(default_factory=tuple)
    val_ids: tuple[str, ...] = field(default_factory=tuple)
    command: str = ""

    def __post_init__(self) -> None:
        def fail(what: str) -> ConfigError:
            return ConfigError(f"training config: {what}")

        if self.mode not in MODES:
            raise fail(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.arch not in ARCHS:
            raise fail(f"arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.stage not in STAGES:
            raise fail(f"stage {self.stage!r} is not one of {', '.join(STAGES)}")
        if self.device not in DEVICES:
            raise fail(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        for key in ("iters", "batch", "disc_feat"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(f"{key} must be a positive integer (got {value!r})")
        for key in ("val_every", "checkpoint_every", "seed", "threads"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise fail(f"{key} must be a non-negative integer (got {value!r})")
        check_patch_px(self.patch_px)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise fail(f"lr must be positive (got {self.lr!r})")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise fail(f"betas must be two numbers in [0, 1) (got {self.betas!r})")
        if any(not 0.0 < m < 1.0 for m in self.milestones) or list(self.milestones) != sorted(
            self.milestones
        ):
            raise fail(
                f"milestones must be increasing fractions of iters in (0, 1) "
                f"(got {self.milestones!r})"
            )
        for key in ("l1_weight", "perceptual_weight", "gan_weight", "n2n_gamma"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise fail(f"{key} must be a non-negative number (got {value!r})")
        if not _NAME_RE.match(self.name):
            raise fail(
                f"name {self.name!r} must start with a letter or digit and hold only "
                "letters, digits, '.', '_' and '-'"
            )
        if self.stage == "gan" and self.mode == "noisy":
            raise fail(
                "stage gan needs clean targets; mode noisy trains only stage l1 (Neighbor2Neighbor)"
            )
        if self.stage == "gan" and self.init is None:
            raise fail("stage gan needs init: the L1 (SEMNET) model to start the generator from")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (paths as strings, tuples as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def lr_at(config: TrainConfig, iteration: int) -> float:
    """Learning rate for the step that starts at ``iteration`` (0-based)."""
    halvings = sum(iteration >= round(m * config.iters) for m in config.milestones)
    return config.lr * 0.5**halvings


# --- helpers ---------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _save_state_dict(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def _load_state_dict(module: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
        module.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors and load_state_dict raise several types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DenoiseError(f"{path}: cannot restore checkpoint weights ({first})") from exc


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad the bottom/right of ``x`` (N, C, H, W) to sides multiple of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return functional.pad(x, (0, pw, 0, ph), mode=mode)


def denoise_image(model: nn.Module, image: np.ndarray, device: torch.device) -> np.ndarray:
    """Denoise one whole uint8 image ``(y, x)`` with ``model`` (no tiling).

    The image is padded to sides that are multiples of 4 for the generator
    and the output cropped back, clamped to [0, 1] and rounded to uint8.
    """
    x = torch.from_numpy(image.astype(np.float32) / 255.0)[None, None].to(device)
    with torch.no_grad():
        out = model(_pad_to_multiple(x, _SIDE_MULTIPLE))
    out = out[..., : image.shape[0], : image.shape[1]].clamp(0.0, 1.0)
    result: np.ndarray = (out[0, 0].cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return result


def validate(
    model: nn.Module, pairs: Sequence[AlignedPair], device: torch.device
) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM of the denoised LD images against their HD images."""
    was_training = model.training
    model.eval()
    try:
        scores = []
        for pair in pairs:
            out = denoise_image(model, pair.ld, device)
            scores.append((psnr(out, pair.hd), ssim(out, pair.hd)))
    finally:
        model.train(was_training)
    return float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores]))


def _resolve_device(name: str) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DenoiseError("device cuda: no CUDA GPU is available to torch (use --device cpu)")
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_threads(requested: int = 0) -> int:
    """Threads to train with on the CPU: ``requested``, or all usable cores for 0."""
    if requested > 0:
        return requested
    # Training is compute-bound: use every core this process may run on.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def _init_generator(config: TrainConfig, generator: RRDBNet) -> dict[str, Any]:
    """Load ``config.init`` into ``generator``; returns provenance for the card."""
    if config.init is None:
        return {}
    path = Path(config.init)
    if not path.is_file():
        raise ConfigError(f"{path}: init model file not found")
    if path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
        model, card = load_model(path)
        if arch_dict(model) != arch_dict(generator):
            raise ConfigError(
                f"{path}: init model arch {arch_dict(model)} does not match arch "
                f"{config.arch!r} {arch_dict(generator)}"
            )
        generator.load_state_dict(model.state_dict(), strict=True)
        return {"init": str(path), "init_sha256": model_hash(path), "init_name": card.name}
    if config.stage == "gan":
        raise ConfigError(
            f"{path}: stage gan starts from an L1 model written by train-denoiser "
            "(.safetensors with its .json card)"
        )
    try:
        load_basicsr_state_dict(generator, path)
    except ModelError as exc:
        raise ConfigError(f"init {exc}") from exc
    return {"init": str(path), "init_format": "basicsr"}


# --- checkpoints -------------------------------------------------------------------


def _checkpoint_stem(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint index (``iter_NNNNNNN.json``) in ``out_dir``."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = sorted(folder.glob("iter_*.json"))
    return found[-1] if found else None


def _config_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in _RESUMABLE_CHANGES:
            continue
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}: {saved.get(key)!r} vs {current.get(key)!r}")
    return diffs


class _Run:
    """State of one training run (models, optimisers, losses, bookkeeping)."""

    def __init__(
        self,
        config: TrainConfig,
        data: PatchSampler,
        val_pairs: Sequence[AlignedPair],
        out_dir: Path,
        extractor: FeatureExtractor | None,
    ) -> None:
        self.config = config
        self.data = data
        self.val_pairs = list(val_pairs)
        self.out_dir = out_dir
        self.ckpt_dir = out_dir / CHECKPOINT_DIR
        self.device = _resolve_device(config.device)
        gan = config.stage == "gan"
        # Weight initialisation from the run's seed, without touching the
        # caller's global RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.g = build_generator(config.arch)
            self.d: nn.Module | None = (
                UNetDiscriminatorSN(num_in_ch=1, num_feat=config.disc_feat) if gan else None
            )
        self.init_info = _init_generator(config, self.g)
        self.g.to(self.device).train()
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=config.lr, betas=config.betas)
        self.opt_d: torch.optim.Optimizer | None = None
        if self.d is not None:
            self.d.to(self.device).train()
            self.opt_d = torch.optim.Adam(self.d.parameters(), lr=config.lr, betas=config.betas)
        self.perceptual: PerceptualLoss | None = None
        self.extractor_name = ""
        if gan and config.perceptual_weight > 0:
            ext = extractor if extractor is not None else vgg19_extractor(config.vgg_weights)
            self.extractor_name = ext.name
            self.perceptual = PerceptualLoss(ext).to(self.device)
        self.gan_loss = GANLoss(config.gan_weight)
        # N2N sub-sampling randomness (CPU generator: its state is portable).
        self.torch_gen = torch.Generator().manual_seed(config.seed)
        self.iteration = 0
        self.best: dict[str, Any] | None = None  # iteration, psnr, ssim, file
        self.last_val: tuple[float, float] | None = None

    # -- one iteration ----------------------------------------------------------
    def step(self) -> dict[str, float]:
        config = self.config
        lr = lr_at(config, self.iteration)
        for opt in (self.opt_g, self.opt_d):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr
        inp, target = self.data.sample(config.batch)
        inp = inp.to(self.device, non_blocking=True)
        if config.mode == "noisy":
            self.opt_g.zero_grad(set_to_none=True)
            loss = n2n_loss(self.g, inp, gamma=config.n2n_gamma, generator=self.torch_gen)
            loss.backward()
            self.opt_g.step()
            return {"loss": float(loss.detach()), "lr": lr}
        if target is None:
            raise DenoiseError(f"mode {config.mode}: the patch sampler gave no targets")
        target = target.to(self.device, non_blocking=True)
        if config.stage == "l1":
            self.opt_g.zero_grad(set_to_none=True)
            loss = functional.l1_loss(self.g(inp), target)
            loss.backward()
            self.opt_g.step()
            value = float(loss.detach())
            return {"loss": value, "l1": value, "lr": lr}
        return self._gan_step(inp, target, lr)

    def _gan_step(self, inp: torch.Tensor, target: torch.Tensor, lr: float) -> dict[str, float]:
        config = self.config
        d, opt_d = self.d, self.opt_d
        if d is None or opt_d is None:
            raise DenoiseError("stage gan: discriminator missing")
        # Generator: the discriminator is a fixed judge during this update.
        for p in d.parameters():
            p.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        out = self.g(inp)
        l_pix = functional.l1_loss(out, target) * config.l1_weight
        l_percep = (
            self.perceptual(out, target) * config.perceptual_weight
            if self.perceptual is not None
            else out.new_zeros(())
        )
        l_gan = self.gan_loss(d(out), target_is_real=True)
        l_g = l_pix + l_percep + l_gan
        l_g.backward()
        self.opt_g.step()
        # Discriminator: real HD patches vs the generator's (detached) output.
        for p in d.parameters():
            p.requires_grad_(True)
        opt_d.zero_grad(set_to_none=True)
        l_real = self.gan_loss(d(target), target_is_real=True, for_discriminator=True)
        l_real.backward()
        l_fake = self.gan_loss(d(out.detach()), target_is_real=False, for_discriminator=True)
        l_fake.backward()
        opt_d.step()
        return {
            "loss": float(l_g.detach()),
            "l1": float(l_pix.detach()),
            "perceptual": float(l_percep.detach()),
            "gan": float(l_gan.detach()),
            "d_real": float(l_real.detach()),
            "d_fake": float(l_fake.detach()),
            "lr": lr,
        }

    # -- validation ---------------------------------------------------------------
    def run_validation(self) -> tuple[float, float] | None:
        if not self.val_pairs:
            return None
        val_psnr, val_ssim = validate(self.g, self.val_pairs, self.device)
        self.last_val = (val_psnr, val_ssim)
        if self.best is None or val_psnr > self.best["psnr"]:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            name = f"best_{self.iteration:07d}.safetensors"
            _save_state_dict(self.g, self.ckpt_dir / name)
            old = self.best["file"] if self.best else None
            self.best = {
                "iteration": self.iteration,
                "psnr": val_psnr,
                "ssim": val_ssim,
                "file": name,
            }
            # Keep the previous best file while a checkpoint still refers to it.
            if old and old != name and not self._referenced_by_checkpoint(old):
                (self.ckpt_dir / old).unlink(missing_ok=True)
        return val_psnr, val_ssim

    def _referenced_by_checkpoint(self, best_file: str) -> bool:
        for index in self.ckpt_dir.glob("iter_*.json"):
            try:
                best = json.loads(index.read_text(encoding="utf-8")).get("best") or {}
            except (OSError, ValueError):
                continue
            if best.get("file") == best_file:
                return True
        return False

    # -- checkpoints --------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        stem = _checkpoint_stem(self.iteration)
        _save_state_dict(self.g, self.ckpt_dir / f"{stem}.g.safetensors")
        if self.d is not None:
            _save_state_dict(self.d, self.ckpt_dir / f"{stem}.d.safetensors")
        state: dict[str, Any] = {
            "opt_g": self.opt_g.state_dict(),
            "torch_generator": self.torch_gen.get_state(),
        }
        if self.opt_d is not None:
            state["opt_d"] = self.opt_d.state_dict()
        tmp = self.ckpt_dir / f"{stem}.state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_dir / f"{stem}.state.pt")
        index = {
            "format_version": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "config": self.config.to_dict(),
            "best": self.best,
            "last_val": list(self.last_val) if self.last_val else None,
            "seed": self.config.seed,
            "sampler_state": self.data.get_state(),
            "files": {
                "generator": f"{stem}.g.safetensors",
                "discriminator": f"{stem}.d.safetensors" if self.d is not None else None,
                "state": f"{stem}.state.pt",
            },
            "saved": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        path = self.ckpt_dir / f"{stem}.json"
        # The index is written last: its presence marks a complete checkpoint.
        _atomic_write_text(path, json.dumps(index, indent=2))
        self._prune_checkpoints()
        log.info("checkpoint at iteration %d: %s", self.iteration, path)
        return path

    def _prune_checkpoints(self) -> None:
        indexes = sorted(self.ckpt_dir.glob("iter_*.json"))
        for index in indexes[:-_KEEP_CHECKPOINTS]:
            stem = index.name[: -len(".json")]
            index.unlink(missing_ok=True)
            for suffix in (".g.safetensors", ".d.safetensors", ".state.pt"):
                (self.ckpt_dir / f"{stem}{suffix}").unlink(missing_ok=True)
        current = self.best["file"] if self.best else None
        for best_file in self.ckpt_dir.glob("best_*.safetensors"):
            if best_file.name != current and not self._referenced_by_checkpoint(best_file.name):
                best_file.unlink(missing_ok=True)

    def resume(self, index_path: Path) -> None:
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DenoiseError(f"{index_path}: unreadable checkpoint index ({exc})") from exc
        if index.get("format_version") != CHECKPOINT_FORMAT:
            raise DenoiseError(
                f"{index_path}: checkpoint format {index.get('format_version')!r} is not "
                f"{CHECKPOINT_FORMAT}"
            )
        diffs = _config_mismatch(index.get("config", {}), self.config.to_dict())
        if diffs:
            raise ConfigError(
                f"{self.out_dir}: holds a checkpoint of a different training run "
                f"({'; '.join(diffs[:3])}); use a new output folder or the same settings"
            )
        iteration = int(index["iteration"])
        if iteration > self.config.iters:
            raise ConfigError(
                f"{self.out_dir}: its checkpoint is at iteration {iteration}, past iters "
                f"{self.config.iters}; raise iters or use a new output folder"
            )
        files = index["files"]
        _load_state_dict(self.g, self.ckpt_dir / files["generator"])
        if self.d is not None:
            _load_state_dict(self.d, self.ckpt_dir / files["discriminator"])
        state_path = self.ckpt_dir / files["state"]
        try:
            state = torch.load(state_path, map_location=self.device, weights_only=True)
            self.opt_g.load_state_dict(state["opt_g"])
            if self.opt_d is not None:
                self.opt_d.load_state_dict(state["opt_d"])
            self.torch_gen.set_state(state["torch_generator"].cpu())
        except Exception as exc:  # unpickling and load_state_dict raise many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DenoiseError(f"{state_path}: cannot restore optimiser state ({first})") from exc
        self.data.set_state(index["sampler_state"])
        self.iteration = iteration
        self.best = index.get("best")
        last_val = index.get("last_val")
        self.last_val = (float(last_val[0]), float(last_val[1])) if last_val else None
        # Best files written after this checkpoint belong to iterations that
        # will be trained again.
        keep = self.best["file"] if self.best else None
        for best_file in self.ckpt_dir.glob("best_*.safetensors"):
            if best_file.name != keep and not self._referenced_by_checkpoint(best_file.name):
                best_file.unlink(missing_ok=True)
        _truncate_log(self.out_dir / TRAIN_LOG, iteration)
        log.info("resuming %s from iteration %d (%s)", self.config.name, iteration, index_path)


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop log lines of iterations after ``iteration`` (they will be redone)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if int(entry.get("iter", 0)) <= iteration:
            kept.append(line)
    _atomic_write_text(path, "".join(k + "\n" for k in kept))


def read_train_log(out_dir: Path) -> list[dict[str, Any]]:
    """Entries of ``out_dir/train_log.jsonl`` (iteration losses and validations)."""
    path = Path(out_dir) / TRAIN_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# --- the training loop -------------------------------------------------------------


def train(
    config: TrainConfig,
    train_data: PatchSampler,
    val_pairs: Sequence[AlignedPair],
    out_dir: Path,
    progress: bool = True,
    extractor: FeatureExtractor | None = None,
) -> Path:
    """Run one training stage and write the final model.

    Parameters
    ----------
    config : TrainConfig
        What to train.
    train_data : PatchSampler
        Patch source: :class:`PairPatches` / :class:`SyntheticPatches` for
        modes "pairs" / "hd", :class:`NoisyPatches` for mode "noisy"; its
        ``patch_px`` must equal ``config.patch_px``.
    val_pairs : sequence of AlignedPair
        Whole aligned pairs for validation (may be empty: the last weights
        are then the final model).
    out_dir : Path
        Output folder; a run already checkpointed there (same settings) is
        resumed from its newest checkpoint.
    progress : bool
        Show the iteration counter with loss and last validation PSNR.
    extractor : FeatureExtractor or None
        Perceptual-loss features for stage "gan"; ``None`` loads VGG19
        (:func:`~cemi_stream.denoise.losses.vgg19_extractor` with
        ``config.vgg_weights``).

    Returns
    -------
    Path
        ``out_dir/NAME.safetensors`` (its card beside it as ``NAME.json``).

    Raises
    ------
    ConfigError
        Data that does not fit the config, or a checkpoint of another run.
    DenoiseError
        Missing VGG weights, no CUDA device, unreadable checkpoint.
    """
    out_dir = Path(out_dir)
    if train_data.patch_px != config.patch_px:
        raise ConfigError(
            f"patch sampler draws {train_data.patch_px} px patches but the config says "
            f"{config.patch_px} px"
        )
    if train_data.has_target == (config.mode == "noisy"):
        kind = "has" if train_data.has_target else "has no"
        raise ConfigError(f"mode {config.mode}: the patch sampler {kind} clean targets")
    out_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if config.device == "cpu":
        torch.set_num_threads(cpu_threads(config.threads))
    try:
        return _train(config, train_data, val_pairs, out_dir, progress, extractor)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    config: TrainConfig,
    train_data: PatchSampler,
    val_pairs: Sequence[AlignedPair],
    out_dir: Path,
    progress: bool,
    extractor: FeatureExtractor | None,
) -> Path:
    run = _Run(config, train_data, val_pairs, out_dir, extractor)
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None:
        run.resume(checkpoint)
    else:
        # A fresh run: nothing of an earlier, uncheckpointed run may leak in.
        (out_dir / TRAIN_LOG).unlink(missing_ok=True)
        for stale in run.ckpt_dir.glob("best_*.safetensors"):
            stale.unlink()
    log.info(
        "training %s: mode %s, stage %s, arch %s (%d parameters), %d iterations of %d x %d px "
        "patches, batch %d, on %s; %d training images, %d validation pairs",
        config.name,
        config.mode,
        config.stage,
        config.arch,
        sum(p.numel() for p in run.g.parameters()),
        config.iters,
        config.patch_px,
        config.patch_px,
        config.batch,
        run.device,
        len(train_data),
        len(run.val_pairs),
    )
    bar = Progress("train", total=config.iters, enabled=progress, unit="iterations")
    smoothed: float | None = None
    started = time.monotonic()
    start_iteration = run.iteration
    with open(out_dir / TRAIN_LOG, "a", encoding="utf-8") as train_log:
        while run.iteration < config.iters:
            losses = run.step()
            run.iteration += 1
            if not math.isfinite(losses["loss"]):
                raise DenoiseError(
                    f"training {config.name}: loss became {losses['loss']} at iteration "
                    f"{run.iteration} (lower lr or check the data)"
                )
            train_log.write(json.dumps({"iter": run.iteration, **losses}) + "\n")
            smoothed = losses["loss"] if smoothed is None else 0.9 * smoothed + 0.1 * losses["loss"]
            done = run.iteration == config.iters
            if (config.val_every and run.iteration % config.val_every == 0) or done:
                val = run.run_validation()
                if val is not None:
                    train_log.write(
                        json.dumps({"iter": run.iteration, "val_psnr": val[0], "val_ssim": val[1]})
                        + "\n"
                    )
                    best = run.best or {}
                    log.info(
                        "iteration %d: loss %.4f, validation PSNR %.2f dB, SSIM %.4f "
                        "(best %.2f dB at %d)",
                        run.iteration,
                        smoothed,
                        val[0],
                        val[1],
                        best.get("psnr", float("nan")),
                        best.get("iteration", 0),
                    )
            if config.checkpoint_every and (run.iteration % config.checkpoint_every == 0 or done):
                train_log.flush()
                run.save_checkpoint()
            extra = f"loss {smoothed:.4f}"
            if run.last_val is not None:
                extra += f", val PSNR {run.last_val[0]:.2f} dB"
            bar.update(run.iteration, extra)
    bar.close()
    seconds = time.monotonic() - started
    done_iters = run.iteration - start_iteration
    if done_iters:
        log.info(
            "trained %d iterations in %.1f s (%.3f s/iteration)",
            done_iters,
            seconds,
            seconds / done_iters,
        )
    return _write_final(run, out_dir)


def _write_final(run: _Run, out_dir: Path) -> Path:
    config = run.config
    if run.best is not None:
        _load_state_dict(run.g, run.ckpt_dir / run.best["file"])
    run.g.to("cpu").eval()
    metrics: dict[str, Any] = {}
    if run.best is not None:
        metrics = {
            "val_psnr_db": round(float(run.best["psnr"]), 4),
            "val_ssim": round(float(run.best["ssim"]), 5),
            "best_iteration": int(run.best["iteration"]),
            "val_pairs": len(run.val_pairs),
        }
    tail = [e["loss"] for e in read_train_log(out_dir) if "loss" in e][-100:]
    if tail:
        metrics["train_loss_last100"] = round(float(np.mean(tail)), 6)
    training: dict[str, Any] = {
        "mode": config.mode,
        "stage": config.stage,
        "data": list(config.data_dirs),
        "train_ids": list(config.train_ids),
        "val_ids": list(config.val_ids),
        "sampler": run.data.describe(),
        "iters": config.iters,
        "batch": config.batch,
        "patch_px": config.patch_px,
        "lr": config.lr,
        "betas": list(config.betas),
        "lr_milestones": list(config.milestones),
        "seed": config.seed,
        "device": config.device,
        "init": str(config.init) if config.init else None,
        **{k: v for k, v in run.init_info.items() if k != "init"},
        "command": config.command,
        "torch": torch.__version__,
    }
    if config.mode == "noisy":
        training["loss"] = {"neighbor2neighbor": {"gamma": config.n2n_gamma}}
    elif config.stage == "l1":
        training["loss"] = {"l1": 1.0}
    else:
        training["loss"] = {
            "l1": config.l1_weight,
            "perceptual": config.perceptual_weight,
            "perceptual_features": run.extractor_name,
            "gan": config.gan_weight,
            "gan_type": "vanilla",
            "discriminator": {"type": "UNetDiscriminatorSN", "num_feat": config.disc_feat},
        }
    card = ModelCard(
        name=config.name,
        arch=arch_dict(run.g),
        training=training,
        iterations=run.iteration,
        metrics=metrics,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    path = save_model(run.g, out_dir / f"{config.name}.safetensors", card)
    log.info("model written: %s", path)
    return path


# --- data from folders ----------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DenoiseError(f"{folder}: image folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DenoiseError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _strip(image: np.ndarray) -> np.ndarray:
    """Cut a frame to its specimen area (data bar and UI borders removed)."""
    return detect_crop(image).rect.apply(image)


def load_images(
    folder: Path, keep: set[str] | None = None, drop: set[str] | None = None
) -> list[np.ndarray]:
    """The images of a folder as uint8 ``(y, x)``, data bar and borders stripped.

    Parameters
    ----------
    folder : Path
        Folder of images (natural order).
    keep, drop : set of str, optional
        Image keys (:func:`~cemi_stream.denoise.pairs.pair_key`: the trailing
        number, e.g. ``"007"``) to keep only, or to leave out - so that images
        of the validation pairs never train a model in modes ``hd``/``noisy``.

    Raises
    ------
    DenoiseError
        When no image is left.
    """
    files = [
        p
        for p in _image_files(Path(folder))
        if (keep is None or pair_key(p) in keep) and (drop is None or pair_key(p) not in drop)
    ]
    if not files:
        raise DenoiseError(f"{folder}: no images left after the id selection")
    return [_strip(load_gray(p)) for p in files]


def load_video_frames(path: Path, max_frames: int = 500) -> list[np.ndarray]:
    """Up to ``max_frames`` frames spread evenly over a video file, grey uint8 ``(y, x)``.

    The data bar / border crop is found on the first frame and applied to all
    (like the capture stage).
    """
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise DenoiseError(f"{path}: OpenCV cannot open the video")
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        step = max(1, total // max_frames) if total > 0 else 1
        frames: list[np.ndarray] = []
        rect = None
        index = 0
        while len(frames) < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            if index % step == 0:
                grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
                if rect is None:
                    rect = detect_crop(grey).rect
                frames.append(rect.apply(grey))
            index += 1
    finally:
        cap.release()
    if not frames:
        raise DenoiseError(f"{path}: no frames could be read")
    return frames


def _load_pair_sets(
    pair_dirs: Sequence[tuple[Path, Path]], ids: set[str] | None
) -> list[AlignedPair]:
    pairs: list[AlignedPair] = []
    for ld_dir, hd_dir in pair_dirs:
        pairs.extend(load_aligned_pairs(Path(ld_dir), Path(hd_dir), names=ids))
    return pairs


def run_training(
    out_dir: Path,
    *,
    mode: str = "pairs",
    pair_dirs: Sequence[tuple[Path, Path]] = (),
    hd_dir: Path | None = None,
    noisy_source: Path | None = None,
    arch: str = "compact",
    stage: str = "l1",
    iters: int = 40_000,
    batch: int = 18,
    patch_px: int = 128,
    device: str = "cpu",
    threads: int = 0,
    lr: float = 1e-4,
    milestones: tuple[float, ...] | None = None,
    train_ids: str | None = None,
    val_ids: str | None = None,
    init: Path | None = None,
    vgg_weights: Path | None = None,
    seed: int = 0,
    name: str | None = None,
    val_every: int = 1000,
    checkpoint_every: int = 1000,
    max_frames: int = 500,
    degrade_config: DegradeConfig | None = None,
    command: str = "",
    progress: bool = True,
    extractor: FeatureExtractor | None = None,
) -> Path:
    """Build the training data from folders and run :func:`train`.

    Parameters
    ----------
    out_dir : Path
        Output folder (see :func:`train`).
    mode : {"pairs", "hd", "noisy"}
        ``"pairs"``: train on the pairs of ``pair_dirs`` selected by
        ``train_ids``; ``"hd"``: HD images of ``hd_dir`` with synthesised LD;
        ``"noisy"``: LD frames of ``noisy_source`` (a folder of images or a
        video file) with Neighbor2Neighbor.
    pair_dirs : sequence of (Path, Path)
        ``(LD_DIR, HD_DIR)`` folders of real pairs (the default model uses
        both KRISS sets).  The pairs selected by ``val_ids`` validate in
        every mode; in modes "hd" and "noisy" all of them when ``val_ids`` is
        None.
    train_ids, val_ids : str or None
        Pair-id selections such as ``"1-32"`` (:func:`pairs.select_ids`);
        ``train_ids`` None: every pair trains (mode "pairs").
    name : str or None
        Model name; default ``semnet-ARCH`` (stage l1), ``semgan-ARCH``
        (stage gan) or ``n2n-ARCH`` (mode noisy).
    milestones : tuple of float or None
        Learning-rate halving points as fractions of ``iters``; ``None``:
        :class:`TrainConfig`'s default.
    max_frames : int
        Frames taken from a video in mode "noisy".
    Other parameters: see :class:`TrainConfig`.

    Returns
    -------
    Path
        The final model file.
    """
    if mode not in MODES:
        raise ConfigError(f"training mode {mode!r} is not one of {', '.join(MODES)}")
    train_set = select_ids(train_ids) if train_ids else None
    val_set = select_ids(val_ids) if val_ids else None
    if train_set is not None and val_set is not None and train_set & val_set:
        log.warning(
            "%d pair id(s) are both in training and validation: validation is optimistic",
            len(train_set & val_set),
        )
    if name is None:
        prefix = "n2n" if mode == "noisy" else ("semgan" if stage == "gan" else "semnet")
        name = f"{prefix}-{arch}"
    data_dirs: list[str] = []
    val_pairs: list[AlignedPair] = []
    sampler: PatchSampler
    if mode == "pairs":
        if not pair_dirs:
            raise ConfigError("mode pairs needs at least one (LD folder, HD folder) pair set")
        train_pairs = _load_pair_sets(pair_dirs, train_set)
        if val_set is not None:
            val_pairs = _load_pair_sets(pair_dirs, val_set)
        # Without an explicit training selection the validation pairs stay out of training.
        if train_set is None and val_set is not None:
            train_pairs = [p for p in train_pairs if p.name not in val_set]
        if not train_pairs:
            raise ConfigError("mode pairs: no training pairs left after the id selection")
        sampler = PairPatches(train_pairs, patch_px, seed=seed)
        train_names = sorted({p.name for p in train_pairs})
    else:
        if pair_dirs:
            val_pairs = _load_pair_sets(pair_dirs, val_set)
        # As in mode pairs: without an explicit selection, validation ids stay out.
        exclude = val_set if train_set is None else None
        if mode == "hd":
            if hd_dir is None:
                raise ConfigError("mode hd needs a folder of HD images")
            images = load_images(Path(hd_dir), keep=train_set, drop=exclude)
            sampler = SyntheticPatches(images, patch_px, degrade_config, seed)
            data_dirs.append(str(hd_dir))
        else:
            if noisy_source is None:
                raise ConfigError("mode noisy needs a folder of LD frames or a video file")
            source = Path(noisy_source)
            if source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES:
                frames = load_video_frames(source, max_frames)
            elif source.is_dir():
                frames = load_images(source, keep=train_set, drop=exclude)
            else:
                raise DenoiseError(f"{source}: neither a folder of images nor a video file")
            sampler = NoisyPatches(frames, patch_px, seed=seed)
            data_dirs.append(str(source))
        train_names = []
    for ld_dir, hd_dir_ in pair_dirs:
        data_dirs.append(f"{ld_dir} | {hd_dir_}")
    config = TrainConfig(
        mode=mode,
        arch=arch,
        stage=stage,
        iters=iters,
        batch=batch,
        patch_px=patch_px,
        seed=seed,
        device=device,
        threads=threads,
        lr=lr,
        milestones=tuple(milestones) if milestones is not None else DEFAULT_MILESTONES,
        val_every=val_every,
        checkpoint_every=checkpoint_every,
        init=Path(init) if init is not None else None,
        vgg_weights=Path(vgg_weights) if vgg_weights is not None else None,
        name=name,
        data_dirs=tuple(data_dirs),
        train_ids=tuple(train_names),
        val_ids=tuple(sorted({p.name for p in val_pairs})),
        command=command,
    )
    return train(config, sampler, val_pairs, Path(out_dir), progress=progress, extractor=extractor)


__all__ = [
    "MODES",
    "STAGES",
    "TrainConfig",
    "denoise_image",
    "latest_checkpoint",
    "load_images",
    "load_video_frames",
    "lr_at",
    "read_train_log",
    "run_training",
    "train",
    "validate",
]
