"""Saving and loading trained denoisers: safetensors weights + a JSON model card.

A model is two files side by side::

    NAME.safetensors   the RRDBNet state dict (contiguous float tensors, CPU)
    NAME.json          the model card (:class:`ModelCard`)

The card holds what is needed to rebuild the network (``arch``, see
:func:`models.rrdbnet.arch_dict`) and what is worth knowing about it
(training settings, iterations, evaluation metrics, creation time)::

    {"format_version": 1, "name": "semnet-compact-kriss",
     "arch": {"type": "RRDBNet", "num_in_ch": 1, "num_out_ch": 1, "scale": 1,
              "num_feat": 16, "num_block": 3, "num_grow_ch": 16},
     "training": {...}, "iterations": 20000, "metrics": {...},
     "created": "2025-01-01T12:00:00+00:00"}

The same two-file layout holds the lamellar segmenters (:mod:`models.unetpp`):
their cards carry ``"kind": "lamellar-segmenter"`` (denoiser cards have no
``kind``, or ``"denoiser"``); :func:`write_model_files` / :func:`read_model_files`
are the architecture-free halves of :func:`save_model` / :func:`load_model`.

Loading never executes code from either file: safetensors is a plain tensor
container and the card is JSON.  Both files are written atomically (a
temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cemi_stream.errors import ModelError

from .rrdbnet import RRDBNet, arch_dict, build_generator, normalize_arch, state_dict_mismatch

log = logging.getLogger(__name__)

#: Card format written by this version; cards with a newer one are refused.
FORMAT_VERSION = 1
WEIGHTS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"
#: ``ModelCard.kind`` of the denoisers ("" in cards written before kinds existed).
DENOISER_KIND = "denoiser"


def utc_timestamp() -> str:
    """The current time as an ISO 8601 UTC string (for :attr:`ModelCard.created`)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class ModelCard:
    """What a trained model is and how it was made.

    Attributes
    ----------
    name : str
        Model name (the file stem in the model zoo).
    arch : dict
        Generator architecture, as :func:`models.rrdbnet.arch_dict` gives it.
    training : dict
        Training settings (data, losses, schedule ...), JSON-serialisable.
    iterations : int
        Optimiser steps the weights were trained for.
    metrics : dict
        Evaluation results (e.g. PSNR in dB, SSIM), JSON-serialisable.
    created : str
        ISO 8601 creation time (see :func:`utc_timestamp`).
    format_version : int
        Card format (1).
    kind : str
        What the model is for: ``""`` (a denoiser; the key is then not
        written, as in the cards before kinds existed), ``"denoiser"`` or
        ``"lamellar-segmenter"``.
    """

    name: str
    arch: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    iterations: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION
    kind: str = ""

    @property
    def model_kind(self) -> str:
        """``kind``, with the denoisers' empty kind spelled :data:`DENOISER_KIND`."""
        return self.kind or DENOISER_KIND

    def to_dict(self) -> dict[str, Any]:
        """The card as a JSON-ready dict (``format_version`` first, ``kind`` after ``name``)."""
        out: dict[str, Any] = {"format_version": self.format_version, "name": self.name}
        if self.kind:
            out["kind"] = self.kind
        out.update(
            {
                "arch": dict(self.arch),
                "training": dict(self.training),
                "iterations": self.iterations,
                "metrics": dict(self.metrics),
                "created": self.created,
            }
        )
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Parse and validate a card; :class:`ModelError` (no path) when invalid.

        Unknown keys are ignored so that newer writers can add fields.
        """
        if not isinstance(data, Mapping):
            raise ModelError(f"card is a {type(data).__name__}, not an object")
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ModelError(f"format_version must be an integer (got {version!r})")
        if version > FORMAT_VERSION or version < 1:
            raise ModelError(f"unsupported format_version {version} (this reader: 1)")
        expected: dict[str, type | tuple[type, ...]] = {
            "name": str,
            "arch": dict,
            "training": dict,
            "iterations": int,
            "metrics": dict,
            "created": str,
        }
        for key, kind in expected.items():
            if key not in data:
                raise ModelError(f"missing key {key!r}")
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ModelError(f"{key} must be a {getattr(kind, '__name__', kind)}")
        model_kind = data.get("kind", "")
        if not isinstance(model_kind, str):
            raise ModelError("kind must be a str")
        return cls(
            name=data["name"],
            arch=dict(data["arch"]),
            training=dict(data["training"]),
            iterations=data["iterations"],
            metrics=dict(data["metrics"]),
            created=data["created"],
            format_version=version,
            kind=model_kind,
        )


def card_path(path: Path) -> Path:
    """The card file next to weights file ``path`` (same stem, ``.json``)."""
    return Path(path).with_suffix(CARD_SUFFIX)


def _tmp_path(path: Path) -> Path:
    # Same folder, so os.replace is an atomic rename on the same file system.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model_files(path: Path, tensors: Mapping[str, torch.Tensor], card: ModelCard) -> Path:
    """Write ``tensors`` to ``path`` and ``card`` beside it, atomically (any architecture).

    Parameters
    ----------
    path : Path
        Weights file, ending in ``.safetensors``; the card goes to the same
        stem with ``.json``.  Missing parent folders are created.
    tensors : mapping of str to Tensor
        The state dict; copied to contiguous CPU tensors.
    card : ModelCard
        The card, written as given except ``created`` (default now) and
        ``format_version``.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ModelError
        A wrong suffix or a file that cannot be written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != WEIGHTS_SUFFIX:
        raise ModelError(f"{path}: model weights file must end in {WEIGHTS_SUFFIX}")
    card = dataclasses.replace(
        card, created=card.created or utc_timestamp(), format_version=FORMAT_VERSION
    )
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_weights, tmp_card = _tmp_path(path), _tmp_path(card_path(path))
    try:
        # One metadata key only: safetensors writes the metadata map in arbitrary
        # order, and the file's bytes must be reproducible for model_hash.
        save_file(cpu, str(tmp_weights), metadata={"format": "pt"})
        # safetensors creates the file owner-only; a shipped model must be readable.
        os.chmod(tmp_weights, 0o666 & ~_umask())
        _fsync(tmp_weights)
        with open(tmp_card, "w", encoding="utf-8") as fh:
            json.dump(card.to_dict(), fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        # Weights first: a crash between the two renames leaves new weights with
        # the old card, which the loaders reject if the arch changed.
        os.replace(tmp_weights, path)
        os.replace(tmp_card, card_path(path))
    except OSError as exc:
        raise ModelError(f"{path}: cannot write model ({exc})") from None
    finally:
        for tmp in (tmp_weights, tmp_card):
            tmp.unlink(missing_ok=True)
    return path


def save_model(model: RRDBNet, path: Path, card: ModelCard) -> Path:
    """Write ``model``'s weights to ``path`` and ``card`` beside it, atomically.

    Parameters
    ----------
    model : RRDBNet
        The network; its weights are copied to contiguous CPU tensors.
    path : Path
        Weights file, ending in ``.safetensors``; the card goes to the same
        stem with ``.json``.  Missing parent folders are created.
    card : ModelCard
        The card.  An empty ``arch`` is filled in from the model; a non-empty
        one must describe the model.  ``created`` defaults to now.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    if path.suffix != WEIGHTS_SUFFIX:
        raise ModelError(f"{path}: model weights file must end in {WEIGHTS_SUFFIX}")
    actual = arch_dict(model)
    if card.arch:
        try:
            stated = normalize_arch(card.arch)
        except ModelError as exc:
            raise ModelError(f"{path}: invalid card arch ({exc})") from None
        if stated != actual:
            raise ModelError(
                f"{path}: card arch {card.arch} does not describe the model ({actual})"
            )
    card = dataclasses.replace(card, arch=actual)
    write_model_files(path, model.state_dict(), card)
    log.info("saved model %s (%s) to %s", card.name, actual, path)
    return path


def read_card(path: Path) -> ModelCard:
    """Read the card of weights file ``path`` (:class:`ModelError` if missing/invalid)."""
    path = Path(path)
    cpath = card_path(path)
    if not cpath.is_file():
        raise ModelError(f"{path}: missing model card {cpath}")
    try:
        data = json.loads(cpath.read_text(encoding="utf-8"))
        return ModelCard.from_dict(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ModelError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: invalid model card {cpath} ({reason})") from None


def read_model_files(path: Path) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """The state dict (CPU tensors) and card of weights file ``path`` (any architecture).

    Raises
    ------
    ModelError
        Missing file, not a safetensors file, missing or invalid card.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    card = read_card(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own (Rust-side) error types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: not a valid safetensors file ({reason})") from None
    return state, card


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[RRDBNet, ModelCard]:
    """Load a denoiser written by :func:`save_model`.

    Parameters
    ----------
    path : Path
        The ``.safetensors`` weights file (its ``.json`` card must be beside it).
    device : str or torch.device
        Where to put the model.

    Returns
    -------
    (RRDBNet, ModelCard)
        The network in eval mode on ``device``, and its card.

    Raises
    ------
    ModelError
        Missing file, not a safetensors file, missing or invalid card, a card
        of another kind of model (e.g. a lamellar segmenter), or weights that
        do not match the card's arch.
    """
    path = Path(path)
    state, card = read_model_files(path)
    if card.model_kind != DENOISER_KIND:
        raise ModelError(f"{path}: is a {card.model_kind} model, not a denoiser")
    try:
        model = build_generator(card.arch)
    except ModelError as exc:
        raise ModelError(f"{path}: invalid model card {card_path(path)} ({exc})") from None
    problem = state_dict_mismatch(model, state)
    if problem:
        raise ModelError(f"{path}: weights do not match the card's arch {card.arch}: {problem}")
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return model, card


def model_hash(path: Path) -> str:
    """SHA-256 (hex) of weights file ``path``; identifies the exact weights."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such model file") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model file ({exc})") from None
    return digest.hexdigest()


__all__ = [
    "CARD_SUFFIX",
    "DENOISER_KIND",
    "FORMAT_VERSION",
    "WEIGHTS_SUFFIX",
    "ModelCard",
    "card_path",
    "load_model",
    "model_hash",
    "read_card",
    "read_model_files",
    "save_model",
    "utc_timestamp",
    "write_model_files",
]
