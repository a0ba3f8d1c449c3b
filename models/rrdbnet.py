"""RRDBNet: the ESRGAN generator used as the SEM denoiser (SEMNET / SEMGAN).

The network follows BasicSR / Real-ESRGAN layer for layer, and its parameter
names are BasicSR's (``conv_first``, ``body.{i}.rdb{1,2,3}.conv{1..5}``,
``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``), so
their checkpoints load with :func:`load_basicsr_state_dict`.

At ``scale`` 1 and 2 the input is first pixel-unshuffled by 4 and 2: the trunk
then runs at a quarter (half) of the resolution, and the two nearest x2
upsamplings at the end bring the output to ``scale`` times the input size.  A
denoiser therefore uses ``scale=1``: output size == input size, and H, W must be
multiples of 4.

Tensors are ``(N, C, H, W)`` float32, intensities in [0, 1] (the network does
not clamp its output).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cemi_stream.errors import ModelError

log = logging.getLogger(__name__)

#: Named architectures: the paper's full-size ESRGAN generator and a compact
#: variant fast enough for the live stage on a CPU.
ARCHS: dict[str, dict[str, int]] = {
    "paper": {"num_feat": 64, "num_block": 23, "num_grow_ch": 32},
    "compact": {"num_feat": 16, "num_block": 3, "num_grow_ch": 16},
}

#: Keys of an architecture mapping (besides ``"type"``) and their defaults.
ARCH_DEFAULTS: dict[str, int] = {
    "num_in_ch": 1,
    "num_out_ch": 1,
    "scale": 1,
    "num_feat": 64,
    "num_block": 23,
    "num_grow_ch": 32,
}

#: Pixel-unshuffle factor in front of the trunk, per output scale.
UNSHUFFLE: dict[int, int] = {1: 4, 2: 2, 4: 1}

# ESRGAN's residual scaling: each dense block and each RRDB adds 0.2 x its branch.
_RES_SCALE = 0.2
_LRELU_SLOPE = 0.2
# Residual branches start small (Kaiming init x 0.1) so the deep trunk starts
# close to the identity; BasicSR does the same.
_RDB_INIT_SCALE = 0.1


def _conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, 1, 1)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convolutions with dense connections and a scaled residual.

    Parameters
    ----------
    num_feat : int
        Channels in and out.
    num_grow_ch : int
        Channels added by each of the first four convolutions (growth).
    """

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = _conv3x3(num_feat, num_grow_ch)
        self.conv2 = _conv3x3(num_feat + num_grow_ch, num_grow_ch)
        self.conv3 = _conv3x3(num_feat + 2 * num_grow_ch, num_grow_ch)
        self.conv4 = _conv3x3(num_feat + 3 * num_grow_ch, num_grow_ch)
        self.conv5 = _conv3x3(num_feat + 4 * num_grow_ch, num_feat)
        self.lrelu = nn.LeakyReLU(_LRELU_SLOPE, inplace=True)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            nn.init.kaiming_normal_(conv.weight)
            with torch.no_grad():
                conv.weight.mul_(_RDB_INIT_SCALE)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * _RES_SCALE + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks and a scaled skip."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: Tensor) -> Tensor:
        out = self.rdb3(self.rdb2(self.rdb1(x)))
        return out * _RES_SCALE + x


class RRDBNet(nn.Module):
    """The ESRGAN generator (BasicSR layout).

    Parameters
    ----------
    num_in_ch, num_out_ch : int
        Image channels in and out (1 for SEM grey images).
    scale : int
        Output size / input size: 1 (denoiser), 2 or 4.
    num_feat : int
        Feature channels of the trunk.
    num_block : int
        Number of RRDB blocks in the trunk.
    num_grow_ch : int
        Growth channels of the dense blocks.

    Notes
    -----
    ``forward`` maps ``(N, num_in_ch, H, W)`` to ``(N, num_out_ch, H*scale,
    W*scale)``; H and W must be multiples of :attr:`unshuffle` (4 at scale 1,
    2 at scale 2), else :class:`~cemi_stream.errors.ModelError`.
    """

    def __init__(
        self,
        num_in_ch: int = 1,
        num_out_ch: int = 1,
        scale: int = 1,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ) -> None:
        super().__init__()
        if scale not in UNSHUFFLE:
            raise ModelError(f"RRDBNet: scale must be 1, 2 or 4 (got {scale})")
        for key, value in (
            ("num_in_ch", num_in_ch),
            ("num_out_ch", num_out_ch),
            ("num_feat", num_feat),
            ("num_block", num_block),
            ("num_grow_ch", num_grow_ch),
        ):
            if value < 1:
                raise ModelError(f"RRDBNet: {key} must be >= 1 (got {value})")
        self.num_in_ch = num_in_ch
        self.num_out_ch = num_out_ch
        self.scale = scale
        self.num_feat = num_feat
        self.num_block = num_block
        self.num_grow_ch = num_grow_ch
        self.unshuffle = UNSHUFFLE[scale]

        f = self.unshuffle
        self.conv_first = _conv3x3(num_in_ch * f * f, num_feat)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = _conv3x3(num_feat, num_feat)
        self.conv_up1 = _conv3x3(num_feat, num_feat)
        self.conv_up2 = _conv3x3(num_feat, num_feat)
        self.conv_hr = _conv3x3(num_feat, num_feat)
        self.conv_last = _conv3x3(num_feat, num_out_ch)
        self.lrelu = nn.LeakyReLU(_LRELU_SLOPE, inplace=True)

    def check_input_size(self, height: int, width: int) -> None:
        """Raise :class:`ModelError` unless ``height`` and ``width`` (px) fit the net."""
        f = self.unshuffle
        if height % f or width % f:
            raise ModelError(
                f"RRDBNet scale {self.scale}: input {height}x{width} px (HxW) must have "
                f"height and width multiples of {f}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Denoise / upscale ``x`` (N, num_in_ch, H, W) -> (N, num_out_ch, H*s, W*s)."""
        # Under tracing/export the sizes may be symbolic; the check is for eager
        # callers (pixel_unshuffle itself rejects bad sizes in any case).
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input_size(int(x.shape[-2]), int(x.shape[-1]))
        if self.unshuffle > 1:
            x = nn.functional.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(
            self.conv_up1(nn.functional.interpolate(feat, scale_factor=2.0, mode="nearest"))
        )
        feat = self.lrelu(
            self.conv_up2(nn.functional.interpolate(feat, scale_factor=2.0, mode="nearest"))
        )
        out: Tensor = self.conv_last(self.lrelu(self.conv_hr(feat)))
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in arch_dict(self).items() if k != "type")


def normalize_arch(arch: str | Mapping[str, Any]) -> dict[str, Any]:
    """Complete and validate an architecture: a name in :data:`ARCHS` or a mapping.

    Returns
    -------
    dict
        ``{"type": "RRDBNet", "num_in_ch", "num_out_ch", "scale", "num_feat",
        "num_block", "num_grow_ch"}``; missing keys take :data:`ARCH_DEFAULTS`.

    Raises
    ------
    ModelError
        Unknown name, unknown key, a type other than ``"RRDBNet"``, or a value
        that is not a positive integer / a supported scale.
    """
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise ModelError(f"unknown generator arch {arch!r} (known: {', '.join(ARCHS)})")
        spec: Mapping[str, Any] = ARCHS[arch]
    else:
        spec = arch
    kind = spec.get("type", "RRDBNet")
    if kind != "RRDBNet":
        raise ModelError(f"unsupported generator type {kind!r} (expected 'RRDBNet')")
    unknown = sorted(set(spec) - set(ARCH_DEFAULTS) - {"type"})
    if unknown:
        raise ModelError(f"unknown generator arch keys: {', '.join(map(str, unknown))}")
    out: dict[str, Any] = {"type": "RRDBNet"}
    for key, default in ARCH_DEFAULTS.items():
        value = spec.get(key, default)
        # bool is an int subclass; a JSON true/false here is a broken card.
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"generator arch {key} must be a positive integer (got {value!r})")
        out[key] = value
    if out["scale"] not in UNSHUFFLE:
        raise ModelError(f"generator arch scale must be 1, 2 or 4 (got {out['scale']})")
    return out


def build_generator(arch: str | Mapping[str, Any]) -> RRDBNet:
    """Build an :class:`RRDBNet` from a name in :data:`ARCHS` or an arch mapping.

    A mapping may be a full :func:`arch_dict` (as stored in a model card) or
    a partial one (missing keys take :data:`ARCH_DEFAULTS`: 1 channel, scale 1).
    """
    spec = normalize_arch(arch)
    spec.pop("type")
    return RRDBNet(**spec)


def arch_dict(model: RRDBNet) -> dict[str, Any]:
    """The keyword arguments that rebuild ``model``, with ``"type": "RRDBNet"``."""
    return {
        "type": "RRDBNet",
        "num_in_ch": model.num_in_ch,
        "num_out_ch": model.num_out_ch,
        "scale": model.scale,
        "num_feat": model.num_feat,
        "num_block": model.num_block,
        "num_grow_ch": model.num_grow_ch,
    }


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def generator_flops(arch: str | Mapping[str, Any], height: int, width: int) -> float:
    """Floating-point operations of one forward pass, computed analytically.

    Counts 2 x the multiply-accumulates of all convolutions (biases,
    activations, additions and resampling are negligible and left out).

    Parameters
    ----------
    arch : str or Mapping
        As for :func:`build_generator`.
    height, width : int
        Input size in px; multiples of the unshuffle factor.

    Returns
    -------
    float
        FLOP per input image (e.g. about 1.76e12 for the paper arch on a
        1024x768 frame).
    """
    spec = normalize_arch(arch)
    f = UNSHUFFLE[spec["scale"]]
    if height % f or width % f:
        raise ModelError(
            f"RRDBNet scale {spec['scale']}: input {height}x{width} px (HxW) must have "
            f"height and width multiples of {f}"
        )
    nf, gc = spec["num_feat"], spec["num_grow_ch"]
    k2 = 9  # 3x3 kernels everywhere
    trunk_px = (height // f) * (width // f)
    rdb_macs = k2 * (sum((nf + i * gc) * gc for i in range(4)) + (nf + 4 * gc) * nf)
    trunk_macs = (
        k2 * spec["num_in_ch"] * f * f * nf  # conv_first
        + spec["num_block"] * 3 * rdb_macs
        + k2 * nf * nf  # conv_body
    ) * trunk_px
    up1_px = trunk_px * 4
    up2_px = up1_px * 4
    tail_macs = k2 * nf * nf * up1_px + (2 * k2 * nf * nf + k2 * nf * spec["num_out_ch"]) * up2_px
    return 2.0 * float(trunk_macs + tail_macs)


def _fold_first(weight: Tensor, f: int) -> Tensor:
    # (out, c * f*f + offset, kh, kw) -> (out, offset, kh, kw), summed over colour c
    return weight.reshape(weight.shape[0], 3, f * f, *weight.shape[2:]).sum(dim=1)


def fold_rgb_state_dict(state: Mapping[str, Tensor], scale: int = 1) -> dict[str, Tensor]:
    """Fold an RGB (3-channel) RRDBNet state dict to grey (1 channel).

    ``conv_first``: with pixel-unshuffled input the input channels are ordered
    channel-major (``c * f*f + offset``); the weights of the three colours are
    summed per offset, so a grey image gives the response the RGB net gives to
    that image replicated to three channels.  ``conv_last``: the three output
    channels' weights and biases are averaged (the grey output is the mean of
    the RGB outputs).  Each end is folded only if it is 3-channel; everything
    else is passed through.

    Parameters
    ----------
    state : Mapping[str, Tensor]
        A BasicSR-named RRDBNet state dict (no ``module.`` prefixes).
    scale : int
        The network's scale (1, 2 or 4), which fixes the unshuffle factor.

    Returns
    -------
    dict[str, Tensor]
        A new state dict; the input is not modified.
    """
    if scale not in UNSHUFFLE:
        raise ModelError(f"RGB state dict: scale must be 1, 2 or 4 (got {scale})")
    f = UNSHUFFLE[scale]
    out = dict(state)
    try:
        w_first = state["conv_first.weight"]
        w_last, b_last = state["conv_last.weight"], state["conv_last.bias"]
    except KeyError as exc:
        raise ModelError(f"RGB state dict lacks {exc.args[0]}") from None
    in_ch = w_first.shape[1]
    if in_ch == 3 * f * f:
        out["conv_first.weight"] = _fold_first(w_first, f)
    elif in_ch != f * f:
        raise ModelError(
            f"RGB state dict: conv_first has {in_ch} input channels; expected "
            f"{3 * f * f} (RGB) or {f * f} (grey) at scale {scale}"
        )
    if w_last.shape[0] == 3:
        out["conv_last.weight"] = w_last.mean(dim=0, keepdim=True)
        out["conv_last.bias"] = b_last.mean(dim=0, keepdim=True)
    elif w_last.shape[0] != 1:
        raise ModelError(
            f"RGB state dict: conv_last has {w_last.shape[0]} output channels; expected 3 or 1"
        )
    return out


def _unwrap(state: Any, where: str) -> dict[str, Tensor]:
    if isinstance(state, Mapping):
        for key in ("params_ema", "params", "state_dict"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise ModelError(f"{where}: not a state dict (got {type(state).__name__})")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ModelError(f"{where}: entry {key!r} is not a tensor ({type(value).__name__})")
        name = str(key)
        # DataParallel / DistributedDataParallel checkpoints prefix every name.
        while name.startswith("module."):
            name = name[len("module.") :]
        out[name] = value
    return out


def _read_checkpoint(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"{path}: not a valid safetensors file ({exc})") from None
    try:
        # weights_only: tensors and plain containers only, never pickled code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a loadable weights-only checkpoint ({reason})") from None


def state_dict_mismatch(model: nn.Module, state: Mapping[str, Tensor], limit: int = 3) -> str:
    """Describe how ``state`` fails to match ``model`` ("" when it matches).

    Lists the first ``limit`` missing, unexpected and mis-shaped keys.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_basicsr_state_dict(model: RRDBNet, source: Path | str | Mapping[str, Any]) -> None:
    """Load BasicSR / Real-ESRGAN generator weights into ``model`` in place.

    Parameters
    ----------
    model : RRDBNet
        The target network (its arch must match the checkpoint's, up to RGB vs grey).
    source : Path, str or Mapping
        A ``.pth`` file (read with ``torch.load(weights_only=True)``, so no
        pickled code runs), a ``.safetensors`` file, or a state dict.  Wrappers
        ``params_ema`` (preferred), ``params`` and ``state_dict`` are unwrapped
        and ``module.`` prefixes stripped.  A 3-channel checkpoint loaded into
        a 1-channel model is folded with :func:`fold_rgb_state_dict`.

    Raises
    ------
    ModelError
        Unreadable file, not a state dict, or keys / shapes that do not match.
    """
    if isinstance(source, str | Path):
        where = str(source)
        raw = _read_checkpoint(Path(source))
    else:
        where = "state dict"
        raw = source
    state = _unwrap(raw, where)
    f = model.unshuffle
    first = state.get("conv_first.weight")
    last, bias = state.get("conv_last.weight"), state.get("conv_last.bias")
    fold_in = False
    fold_out = False
    if (
        model.num_in_ch == 1
        and first is not None
        and first.ndim == 4
        and first.shape[1] == 3 * f**2
    ):
        state["conv_first.weight"] = _fold_first(first, f)
        fold_in = True
    rgb_out = last is not None and last.ndim == 4 and last.shape[0] == 3
    if model.num_out_ch == 1 and rgb_out and last is not None and bias is not None:
        state["conv_last.weight"] = last.mean(dim=0, keepdim=True)
        state["conv_last.bias"] = bias.mean(dim=0, keepdim=True)
        fold_out = True
    if fold_in or fold_out:
        log.info(
            "%s: folded RGB checkpoint to grey (input %s, output %s)", where, fold_in, fold_out
        )
    problem = state_dict_mismatch(model, state)
    if problem:
        arch = ", ".join(f"{k}={v}" for k, v in arch_dict(model).items() if k != "type")
        raise ModelError(f"{where}: does not match RRDBNet({arch}): {problem}")
    model.load_state_dict(state, strict=True)


__all__ = [
    "ARCHS",
    "ARCH_DEFAULTS",
    "RRDB",
    "UNSHUFFLE",
    "RRDBNet",
    "ResidualDenseBlock",
    "arch_dict",
    "build_generator",
    "count_parameters",
    "fold_rgb_state_dict",
    "generator_flops",
    "load_basicsr_state_dict",
    "normalize_arch",
    "state_dict_mismatch",
]
