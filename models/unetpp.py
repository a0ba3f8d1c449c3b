"""U-Net++ lamellar segmenter (segmentation-models-pytorch) and its weights.

The CEMI paper segments lamellar regions with a U-Net++ (Zhou et al. 2018)
with a ``se_resnext50_32x4d`` encoder; :data:`SEGMENTER_ARCHS` names that
network (``paper``) and a small one for CPUs (``small``: a MobileNetV3-small
encoder from timm with narrow decoder channels).  Input is one grey channel,
output one channel of lamellar logits, both ``(N, 1, H, W)`` with ``H`` and
``W`` multiples of ``2 ** encoder_depth`` (32 at the default depth 5).

Nothing is ever downloaded: encoders are built with ``encoder_weights=None``
and, when asked, initialised from a *local* weights file
(:func:`load_encoder_weights`: a ``.safetensors`` or torch ``.pth`` state dict,
ImageNet RGB first convolutions folded to one grey channel as smp does).

A trained segmenter is stored like the denoisers (:mod:`models.weights`):
``NAME.safetensors`` + ``NAME.json``, the card's ``kind`` being
:data:`KIND` and its ``arch``::

    {"type": "UnetPlusPlus", "encoder": "tu-mobilenetv3_small_100",
     "encoder_depth": 5, "decoder_channels": [64, 32, 24, 16, 8],
     "in_channels": 1, "classes": 1}
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cemi_stream.errors import ModelError

from .rrdbnet import state_dict_mismatch
from .weights import ModelCard, card_path, read_model_files, write_model_files

log = logging.getLogger(__name__)

#: ``ModelCard.kind`` of a lamellar segmenter (foreground = lamellar regions).
KIND = "lamellar-segmenter"
#: ``ModelCard.kind`` of a phase segmenter (foreground = the dark phase, e.g. gamma').
PHASE_KIND = "phase-segmenter"
#: The kinds of model this network is used for.
KINDS = (KIND, PHASE_KIND)
#: ``arch["type"]`` of the network.
ARCH_TYPE = "UnetPlusPlus"
#: The paper's encoder.
PAPER_ENCODER = "se_resnext50_32x4d"
#: The small CPU encoder (timm's MobileNetV3-small, built by smp's timm-universal encoder).
SMALL_ENCODER = "tu-mobilenetv3_small_100"
#: Named architectures (keyword arguments of :func:`build_unetpp`).
SEGMENTER_ARCHS: dict[str, dict[str, Any]] = {
    "paper": {
        "encoder": PAPER_ENCODER,
        "encoder_depth": 5,
        "decoder_channels": [256, 128, 64, 32, 16],
    },
    "small": {
        "encoder": SMALL_ENCODER,
        "encoder_depth": 5,
        "decoder_channels": [64, 32, 24, 16, 8],
    },
}
_ARCH_KEYS = ("encoder", "encoder_depth", "decoder_channels", "in_channels", "classes")


def normalize_segmenter_arch(arch: str | Mapping[str, Any]) -> dict[str, Any]:
    """Complete and validate a segmenter architecture: a name of :data:`SEGMENTER_ARCHS`,
    an encoder name, or a mapping.

    Returns
    -------
    dict
        ``{"type": "UnetPlusPlus", "encoder", "encoder_depth", "decoder_channels",
        "in_channels", "classes"}``.  An encoder name alone gets the small
        decoder of :data:`SEGMENTER_ARCHS` (the paper's for the paper's encoder).

    Raises
    ------
    ModelError
        Unknown key or type, or a value of the wrong kind.
    """
    if isinstance(arch, str):
        if arch in SEGMENTER_ARCHS:
            spec: Mapping[str, Any] = SEGMENTER_ARCHS[arch]
        else:
            base = SEGMENTER_ARCHS["paper" if arch == PAPER_ENCODER else "small"]
            spec = {**base, "encoder": arch}
    else:
        spec = arch
    kind = spec.get("type", ARCH_TYPE)
    if kind != ARCH_TYPE:
        raise ModelError(f"unsupported segmenter type {kind!r} (expected {ARCH_TYPE!r})")
    unknown = sorted(set(spec) - set(_ARCH_KEYS) - {"type"})
    if unknown:
        raise ModelError(f"unknown segmenter arch keys: {', '.join(map(str, unknown))}")
    encoder = spec.get("encoder", SMALL_ENCODER)
    if not isinstance(encoder, str) or not encoder:
        raise ModelError(f"segmenter encoder must be a name, not {encoder!r}")
    out: dict[str, Any] = {"type": ARCH_TYPE, "encoder": encoder}
    for key, default in (("encoder_depth", 5), ("in_channels", 1), ("classes", 1)):
        value = spec.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"segmenter {key} must be a positive integer (got {value!r})")
        out[key] = value
    if not 3 <= out["encoder_depth"] <= 5:
        raise ModelError(f"segmenter encoder_depth must be 3, 4 or 5 (got {out['encoder_depth']})")
    channels = spec.get("decoder_channels", SEGMENTER_ARCHS["small"]["decoder_channels"])
    if (
        not isinstance(channels, Sequence)
        or isinstance(channels, str)
        or len(channels) != out["encoder_depth"]
        or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels)
    ):
        raise ModelError(
            f"segmenter decoder_channels must be {out['encoder_depth']} positive integers "
            f"(one per encoder stage; got {channels!r})"
        )
    out["decoder_channels"] = [int(c) for c in channels]
    return {"type": ARCH_TYPE, **{k: out[k] for k in _ARCH_KEYS}}


def size_multiple(arch: Mapping[str, Any]) -> int:
    """Input height and width must be multiples of this (``2 ** encoder_depth``)."""
    return int(2 ** int(arch.get("encoder_depth", 5)))


def build_unetpp(
    encoder: str = SMALL_ENCODER,
    in_channels: int = 1,
    classes: int = 1,
    decoder_channels: Sequence[int] | None = None,
    *,
    encoder_depth: int = 5,
    encoder_weights: Path | str | None = None,
) -> nn.Module:
    """A U-Net++ with randomly initialised (or locally loaded) encoder weights.

    Parameters
    ----------
    encoder : str
        smp encoder name: :data:`PAPER_ENCODER`, :data:`SMALL_ENCODER`, any
        smp encoder or ``tu-`` timm encoder that builds without downloading.
    in_channels, classes : int
        Input channels (1: grey) and output channels (1: lamellar logit).
    decoder_channels : sequence of int, optional
        One width per decoder stage (default: the small decoder, or the
        paper's 256..16 for the paper's encoder).
    encoder_depth : int
        Encoder stages, 3..5; inputs must be multiples of ``2 ** depth`` px.
    encoder_weights : Path or str, optional
        A local file of encoder weights (see :func:`load_encoder_weights`);
        ``None``: random initialisation.  Never a download.

    Returns
    -------
    torch.nn.Module
        ``segmentation_models_pytorch.UnetPlusPlus`` in training mode;
        ``forward`` maps ``(N, in_channels, H, W)`` float to
        ``(N, classes, H, W)`` logits.

    Raises
    ------
    ModelError
        A bad architecture, an encoder smp cannot build offline, or unusable
        encoder weights.
    """
    spec: dict[str, Any] = {
        "encoder": encoder,
        "encoder_depth": encoder_depth,
        "in_channels": in_channels,
        "classes": classes,
    }
    if decoder_channels is not None:
        spec["decoder_channels"] = list(decoder_channels)
    else:
        base = SEGMENTER_ARCHS["paper" if encoder == PAPER_ENCODER else "small"]
        spec["decoder_channels"] = list(base["decoder_channels"])[:encoder_depth]
        while len(spec["decoder_channels"]) < encoder_depth:
            spec["decoder_channels"].insert(0, spec["decoder_channels"][0] * 2)
    return build_segmenter(spec, encoder_weights=encoder_weights)


def build_segmenter(
    arch: str | Mapping[str, Any], *, encoder_weights: Path | str | None = None
) -> nn.Module:
    """The U-Net++ an architecture (name or card ``arch`` mapping) describes.

    See :func:`build_unetpp` for the network and :func:`normalize_segmenter_arch`
    for ``arch``.
    """
    import segmentation_models_pytorch as smp

    a = normalize_segmenter_arch(arch)
    try:
        model: nn.Module = smp.UnetPlusPlus(
            encoder_name=a["encoder"],
            encoder_depth=a["encoder_depth"],
            encoder_weights=None,
            decoder_channels=tuple(a["decoder_channels"]),
            in_channels=a["in_channels"],
            classes=a["classes"],
        )
    except Exception as exc:  # smp raises KeyError/ValueError/RuntimeError/timm errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot build U-Net++ with encoder {a['encoder']!r} ({reason})") from None
    if encoder_weights is not None:
        load_encoder_weights(model, Path(encoder_weights))
    # Remembered for arch_of / save_segmenter (nn.Module allows plain attributes).
    setattr(model, "cemi_arch", a)  # noqa: B010  (nn.Module's __setattr__ types say Tensor)
    return model


def arch_of(model: nn.Module) -> dict[str, Any]:
    """The card ``arch`` of a network made by :func:`build_segmenter` (or :func:`build_unetpp`)."""
    arch = getattr(model, "cemi_arch", None)
    if not isinstance(arch, dict):
        raise ModelError("model was not built by models.unetpp.build_segmenter")
    return dict(arch)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"{path}: no such encoder weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / unpickling raise many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: cannot read encoder weights ({reason})") from None
    for key in ("state_dict", "model", "params"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ModelError(f"{path}: not a state dict of tensors")
    return dict(state)


def load_encoder_weights(model: nn.Module, path: Path) -> None:
    """Initialise ``model.encoder`` from a local state-dict file.

    Parameters
    ----------
    model : torch.nn.Module
        A network from :func:`build_segmenter`.
    path : Path
        ``.safetensors`` or torch ``.pth``/``.pt`` file holding the encoder's
        weights (keys as the encoder's, optionally prefixed ``encoder.``; timm
        checkpoints without smp's ``model.`` prefix are accepted).  Keys the
        encoder does not have (a classifier head) are ignored; a first
        convolution with 3 input channels is summed over them for a grey
        input (smp's rule for ``in_channels=1``).

    Raises
    ------
    ModelError
        Unreadable file, or encoder weights missing or of the wrong shape.
    """
    path = Path(path)
    state = _read_state(path)
    encoder: nn.Module = model.encoder  # type: ignore[assignment]
    own = encoder.state_dict()
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    if not set(own) & set(state) and any(k.startswith("model.") for k in own):
        state = {f"model.{k}": v for k, v in state.items()}
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise ModelError(
            f"{path}: {len(missing)} encoder weights missing (first: {missing[0]}); "
            "is it a checkpoint of this encoder?"
        )
    loaded: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        value = state[key]
        rgb_to_grey = value.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1
        if value.shape != target.shape and rgb_to_grey:  # folded as smp does
            value = value.sum(1, keepdim=True)
        if value.shape != target.shape:
            raise ModelError(
                f"{path}: encoder weight {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(target.shape)}"
            )
        loaded[key] = value.to(target.dtype)
    encoder.load_state_dict(loaded, strict=True)
    ignored = len(set(state) - set(own))
    log.info("encoder initialised from %s (%d tensors, %d ignored)", path, len(loaded), ignored)


def save_segmenter(model: nn.Module, path: Path, card: ModelCard, kind: str = KIND) -> Path:
    """Write a segmenter and its card (``kind``, one of :data:`KINDS`) atomically.

    Parameters
    ----------
    model : torch.nn.Module
        A network from :func:`build_segmenter` (or :func:`load_segmenter_model`).
    path : Path
        ``NAME.safetensors``; the card goes to ``NAME.json``.
    card : ModelCard
        The card; its ``arch`` and ``kind`` are filled in from the model.
    kind : str
        :data:`KIND` (lamellar regions) or :data:`PHASE_KIND` (a phase).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ModelError
        ``kind`` is not one of :data:`KINDS`.
    """
    if kind not in KINDS:
        raise ModelError(f"segmenter kind {kind!r}: choose {' or '.join(KINDS)}")
    card = dataclasses.replace(card, arch=arch_of(model), kind=kind)
    write_model_files(Path(path), model.state_dict(), card)
    log.info("saved segmenter %s (%s) to %s", card.name, card.arch, path)
    return Path(path)


def load_segmenter_model(
    path: Path, device: str | torch.device = "cpu", kind: str = KIND
) -> tuple[nn.Module, ModelCard]:
    """Load a segmenter of ``kind`` written by :func:`save_segmenter`.

    Returns
    -------
    (torch.nn.Module, ModelCard)
        The network in eval mode on ``device``, and its card.

    Raises
    ------
    ModelError
        Missing or unreadable file, a missing or invalid card, a card of
        another kind of model, or weights that do not fit the card's arch.
    """
    path = Path(path)
    state, card = read_model_files(path)
    if card.kind != kind:
        raise ModelError(f"{path}: is a {card.model_kind} model, not a {kind}")
    try:
        model = build_segmenter(card.arch)
    except ModelError as exc:
        raise ModelError(f"{path}: invalid model card {card_path(path)} ({exc})") from None
    problem = state_dict_mismatch(model, state)
    if problem:
        raise ModelError(f"{path}: weights do not match the card's arch ({problem})")
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return model, card


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "ARCH_TYPE",
    "KIND",
    "KINDS",
    "PAPER_ENCODER",
    "PHASE_KIND",
    "SEGMENTER_ARCHS",
    "SMALL_ENCODER",
    "arch_of",
    "build_segmenter",
    "build_unetpp",
    "load_encoder_weights",
    "load_segmenter_model",
    "normalize_segmenter_arch",
    "parameter_count",
    "save_segmenter",
    "size_multiple",
]
