"""Training losses of the denoiser.

- pixel loss: L1 (:func:`l1_loss`), the only loss of the SEMNET stage;
- :class:`PerceptualLoss`: L1 between VGG19 feature maps (the "content
  perception loss" of SEMGAN), with Real-ESRGAN's layers and weights;
- :class:`GANLoss`: vanilla (binary cross-entropy on logits) adversarial loss;
- :func:`n2n_loss`: Neighbor2Neighbor (Huang et al., CVPR 2021) for
  self-supervised training on noisy frames only.

The perceptual loss takes its feature extractor as an argument so tests can
run it with :func:`random_extractor` (a small random conv stack) instead of
VGG19, whose ImageNet weights (548 MB) are never downloaded by this module:
:func:`vgg19_extractor` loads them from torchvision's cache or a given file,
and raises :class:`~cemi_stream.errors.DenoiseError` when they are absent
rather than silently using random weights.

Tensors are ``(N, C, H, W)`` float32; images in ``[0, 1]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from ..errors import DenoiseError

log = logging.getLogger(__name__)

#: torchvision's file name and URL of the ImageNet VGG19 weights.
VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"

#: Index in ``torchvision.models.vgg19().features`` of each convolution whose
#: output (before its ReLU) the perceptual loss compares.
VGG19_LAYERS: dict[str, int] = {
    "conv1_2": 2,
    "conv2_2": 7,
    "conv3_4": 16,
    "conv4_4": 25,
    "conv5_4": 34,
}
#: Real-ESRGAN's perceptual layer weights.
VGG19_LAYER_WEIGHTS: dict[str, float] = {
    "conv1_2": 0.1,
    "conv2_2": 0.1,
    "conv3_4": 1.0,
    "conv4_4": 1.0,
    "conv5_4": 1.0,
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def l1_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference (the pixel loss)."""
    return functional.l1_loss(output, target)


# --- perceptual loss ----------------------------------------------------------


class FeatureExtractor(nn.Module):
    """A frozen network returning named feature maps of an RGB batch.

    Subclasses implement :meth:`forward` taking ImageNet-normalised
    ``(N, 3, H, W)`` input and returning ``{layer name: (N, C, h, w)}``.

    Attributes
    ----------
    name : str
        What the extractor is (recorded in model cards).
    layer_weights : dict of str to float
        Weight of each returned layer in the perceptual loss.
    """

    name: str = "features"

    def __init__(self, layer_weights: Mapping[str, float]) -> None:
        super().__init__()
        self.layer_weights = dict(layer_weights)

    def freeze(self) -> FeatureExtractor:
        """Disable gradients of the parameters and switch to eval mode."""
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Always stays in eval mode: it is a fixed measuring instrument.
        return super().train(False)


class _SequentialTaps(FeatureExtractor):
    """Runs a Sequential and returns the outputs of selected layers."""

    def __init__(
        self,
        body: nn.Sequential,
        taps: Mapping[str, int],
        layer_weights: Mapping[str, float],
        name: str,
    ) -> None:
        super().__init__(layer_weights)
        last = max(taps.values())
        self.body = nn.Sequential(*list(body.children())[: last + 1])
        self.taps = {index: layer for layer, index in taps.items()}
        self.name = name
        self.freeze()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for index, module in enumerate(self.body):
            x = module(x)
            if index in self.taps:
                out[self.taps[index]] = x
        return out


def vgg19_weights_path(weights_path: Path | None = None) -> Path:
    """Where the ImageNet VGG19 weights are: the given file or torchvision's cache.

    Raises
    ------
    DenoiseError
        If the given file, or without one the cached file, does not exist.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise DenoiseError(
                f"{path}: VGG19 weights file not found (download {VGG19_URL} on a connected "
                "machine and pass its path with --vgg-weights)"
            )
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE
    if not cached.is_file():
        raise DenoiseError(
            f"VGG19 ImageNet weights for the perceptual loss not found at {cached}: download "
            f"{VGG19_URL} on a connected machine and pass --vgg-weights PATH or put it in "
            f"{cached.parent}"
        )
    return cached


#: VGG19's feature layers ("E" configuration): output channels, "M" = max pooling.
_VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip


def vgg19_features() -> nn.Sequential:
    """VGG19's ``features`` stack, indexed exactly like torchvision's.

    The ReLUs are not in-place, so a convolution's output tapped before its
    ReLU stays the pre-activation (torchvision's in-place ReLUs would
    overwrite it).
    """
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG19_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out = int(item)
            layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = out
    return nn.Sequential(*layers)


def vgg19_extractor(weights_path: Path | None = None) -> FeatureExtractor:
    """VGG19 with ImageNet weights, tapped before the ReLUs of Real-ESRGAN's layers.

    Parameters
    ----------
    weights_path : Path or None
        torchvision's ``vgg19-dcbb9e9d.pth`` (a state dict; only its
        ``features.*`` entries are used); ``None`` looks in
        ``torch.hub.get_dir()/checkpoints``.  Loaded with
        ``weights_only=True``: the file cannot run code.

    Raises
    ------
    DenoiseError
        If the weights are absent or are not VGG19's feature weights.
    """
    path = vgg19_weights_path(weights_path)
    features = vgg19_features()
    prefix = "features."
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise TypeError(f"holds a {type(state).__name__}, not a state dict")
        wanted = {k[len(prefix) :]: v for k, v in state.items() if str(k).startswith(prefix)}
        features.load_state_dict(wanted, strict=True)
    except Exception as exc:  # unpickling and load_state_dict raise many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DenoiseError(f"{path}: not torchvision VGG19 weights ({first})") from exc
    log.info("perceptual loss: VGG19 weights from %s", path)
    return _SequentialTaps(features, VGG19_LAYERS, VGG19_LAYER_WEIGHTS, name="vgg19")


def random_extractor(seed: int = 0) -> FeatureExtractor:
    """FOR TESTS ONLY: a small conv stack with random (seeded) weights.

    It makes :class:`PerceptualLoss` runnable without VGG19's ImageNet
    weights; a loss computed with it measures nothing meaningful.
    """
    gen = torch.Generator().manual_seed(seed)
    body = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
    )
    with torch.no_grad():
        for param in body.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return _SequentialTaps(
        body, {"a": 2, "b": 5}, {"a": 0.5, "b": 1.0}, name="random-test-extractor"
    )


class PerceptualLoss(nn.Module):
    """Weighted L1 distance between feature maps of output and target.

    Grey ``(N, 1, H, W)`` images in ``[0, 1]`` are replicated to 3 channels
    and ImageNet-normalised before the extractor (VGG19 was trained on
    normalised RGB).

    Parameters
    ----------
    extractor : FeatureExtractor
        The frozen feature network (:func:`vgg19_extractor` for training).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor.freeze()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise DenoiseError(f"perceptual loss: expected 1 or 3 channels, got {x.shape[1]}")
        return (x - self.mean) / self.std

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss (scalar tensor); gradients flow to ``output`` only."""
        out_feats = self.extractor(self._prepare(output))
        with torch.no_grad():
            tgt_feats = self.extractor(self._prepare(target.detach()))
        loss = output.new_zeros(())
        for layer, weight in self.extractor.layer_weights.items():
            loss = loss + weight * functional.l1_loss(out_feats[layer], tgt_feats[layer])
        return loss


# --- adversarial loss ---------------------------------------------------------


class GANLoss(nn.Module):
    """Vanilla GAN loss: binary cross-entropy on discriminator logits.

    Parameters
    ----------
    generator_weight : float
        Factor applied to the generator's adversarial term (Real-ESRGAN: 0.1);
        the discriminator's loss is never weighted.
    """

    def __init__(self, generator_weight: float = 0.1) -> None:
        super().__init__()
        self.generator_weight = float(generator_weight)

    def forward(
        self, logits: torch.Tensor, target_is_real: bool, for_discriminator: bool = False
    ) -> torch.Tensor:
        """BCE of ``logits`` against all-real (1) or all-fake (0) labels."""
        labels = torch.full_like(logits, 1.0 if target_is_real else 0.0)
        loss = functional.binary_cross_entropy_with_logits(logits, labels)
        return loss if for_discriminator else loss * self.generator_weight


# --- Neighbor2Neighbor ----------------------------------------------------------

# Ordered pairs of horizontally or vertically adjacent positions in a 2x2 cell
# (row-major 0 1 / 2 3), as in Huang et al.: the two sub-images take different,
# neighbouring pixels of every cell.
_N2N_PAIRS = torch.tensor(
    [[0, 1], [0, 2], [1, 3], [2, 3], [1, 0], [2, 0], [3, 1], [3, 2]], dtype=torch.long
)


def neighbor_indices(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positions (0..3 in each 2x2 cell) of the two sub-images.

    Parameters
    ----------
    shape : tuple
        ``(N, C, H, W)`` of the batch; H and W even.
    generator : torch.Generator or None
        Source of randomness (CPU generator).

    Returns
    -------
    idx1, idx2 : Tensor
        ``(N, 1, H/2, W/2)`` long, different in every cell.
    """
    n, _, h, w = shape
    if h % 2 or w % 2:
        raise DenoiseError(f"Neighbor2Neighbor: image sides {h} x {w} must be even")
    choice = torch.randint(0, len(_N2N_PAIRS), (n, 1, h // 2, w // 2), generator=generator)
    pair = _N2N_PAIRS[choice]
    return pair[..., 0], pair[..., 1]


def subsample(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Take pixel ``idx`` (0..3, row-major) of every 2x2 cell of ``x``.

    Parameters
    ----------
    x : Tensor
        ``(N, C, H, W)``, H and W even.
    idx : Tensor
        ``(N, 1, H/2, W/2)`` long from :func:`neighbor_indices` (the same
        position is used for every channel).

    Returns
    -------
    Tensor
        ``(N, C, H/2, W/2)``.
    """
    n, c, h, w = x.shape
    cells = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5)
    cells = cells.reshape(n, c, h // 2, w // 2, 4)
    index = idx.to(x.device).unsqueeze(-1).expand(n, c, h // 2, w // 2, 1)
    return cells.gather(-1, index).squeeze(-1)


def neighbor_subsample(
    noisy: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two half-size sub-images of ``noisy`` from neighbouring pixels of each 2x2 cell.

    Returns
    -------
    g1, g2 : Tensor
        ``(N, C, H/2, W/2)``; in every cell they take two different pixels.
    """
    idx1, idx2 = neighbor_indices(noisy.shape, generator)
    return subsample(noisy, idx1), subsample(noisy, idx2)


def n2n_loss(
    model: Callable[[torch.Tensor], torch.Tensor],
    noisy: torch.Tensor,
    gamma: float = 2.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Neighbor2Neighbor loss (Huang et al. 2021).

    ``mean((f(g1) - g2)^2) + gamma * mean((f(g1) - g2 - (g1(f(y)) - g2(f(y))))^2)``
    where ``g1, g2`` are the neighbour sub-samplers and ``f(y)`` is computed
    without gradient.

    Parameters
    ----------
    model : callable
        The denoiser ``f``; gets ``(N, C, H/2, W/2)`` and ``(N, C, H, W)``
        batches (for RRDBNet: H, W multiples of 8).
    noisy : Tensor
        ``(N, C, H, W)`` noisy batch in ``[0, 1]``.
    gamma : float
        Weight of the regulariser.
    generator : torch.Generator or None
        Source of the sub-sampling randomness.
    """
    idx1, idx2 = neighbor_indices(noisy.shape, generator)
    with torch.no_grad():
        full = model(noisy)
    g1, g2 = subsample(noisy, idx1), subsample(noisy, idx2)
    out = model(g1)
    diff = out - g2
    exp_diff = subsample(full, idx1) - subsample(full, idx2)
    return torch.mean(diff**2) + gamma * torch.mean((diff - exp_diff) ** 2)
