"""Losses: perceptual (VGG19 loading rules), GAN, Neighbor2Neighbor."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from cemi_stream.denoise.losses import (
    VGG19_FILE,
    VGG19_LAYERS,
    GANLoss,
    PerceptualLoss,
    l1_loss,
    n2n_loss,
    neighbor_indices,
    neighbor_subsample,
    random_extractor,
    subsample,
    vgg19_extractor,
    vgg19_features,
)
from cemi_stream.errors import DenoiseError


@pytest.fixture
def empty_hub(tmp_path: Path) -> Iterator[Path]:
    """Point torch hub at an empty folder so the real weight cache is not found."""
    previous = torch.hub.get_dir()
    hub = tmp_path / "hub"
    torch.hub.set_dir(str(hub))
    try:
        yield hub
    finally:
        torch.hub.set_dir(previous)


def _images(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_l1_loss_is_mean_absolute_difference() -> None:
    a = torch.zeros(1, 1, 4, 4)
    b = torch.full((1, 1, 4, 4), 0.25)
    b[0, 0, 0, 0] = 1.25
    assert float(l1_loss(a, b)) == pytest.approx((15 * 0.25 + 1.25) / 16)


def test_perceptual_loss_is_zero_only_for_identical_images() -> None:
    loss = PerceptualLoss(random_extractor(seed=0))
    x = _images(1)
    assert float(loss(x, x.clone())) == 0.0
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert float(loss(y, x)) > 0.0
    assert float(loss(_images(3), x)) > float(loss(y, x))


def test_perceptual_loss_grey_equals_replicated_rgb_and_trains_only_the_output() -> None:
    extractor = random_extractor(seed=1)
    loss = PerceptualLoss(extractor)
    out = _images(4).requires_grad_(True)
    target = _images(5)
    grey = loss(out, target)
    rgb = loss(out.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1))
    assert float(grey.detach()) == pytest.approx(float(rgb.detach()), rel=1e-6)
    grey.backward()
    assert out.grad is not None and float(out.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in extractor.parameters())
    assert not extractor.training
    loss.train()
    assert not extractor.training  # a measuring instrument stays in eval mode


def test_missing_vgg_weights_raise_with_instructions(empty_hub: Path) -> None:
    with pytest.raises(DenoiseError) as info:
        vgg19_extractor(None)
    message = str(info.value)
    assert "\n" not in message
    assert VGG19_FILE in message
    assert "--vgg-weights" in message
    assert str(empty_hub / "checkpoints") in message
    assert "download.pytorch.org" in message


def test_missing_explicit_vgg_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / VGG19_FILE
    with pytest.raises(DenoiseError, match="VGG19 weights file not found"):
        vgg19_extractor(path)


def test_corrupt_vgg_file_raises(tmp_path: Path) -> None:
    bad = tmp_path / VGG19_FILE
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DenoiseError, match="not torchvision VGG19 weights"):
        vgg19_extractor(bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, wrong)
    with pytest.raises(DenoiseError, match="not torchvision VGG19 weights"):
        vgg19_extractor(wrong)


def test_vgg_weights_load_from_the_hub_cache(empty_hub: Path) -> None:
    # A file in torchvision's layout ("features.N.weight" ...) with random values.
    torch.manual_seed(0)
    features = vgg19_features()
    cache = empty_hub / "checkpoints"
    cache.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, cache / VGG19_FILE)
    extractor = vgg19_extractor(None)
    assert extractor.name == "vgg19"
    assert extractor.layer_weights == {
        "conv1_2": 0.1,
        "conv2_2": 0.1,
        "conv3_4": 1.0,
        "conv4_4": 1.0,
        "conv5_4": 1.0,
    }
    body = extractor.body
    assert isinstance(body, nn.Sequential) and len(body) == max(VGG19_LAYERS.values()) + 1
    first, source = body[0], features[0]
    assert isinstance(first, nn.Conv2d) and isinstance(source, nn.Conv2d)
    assert torch.equal(first.weight, source.weight)
    for index in VGG19_LAYERS.values():
        assert isinstance(body[index], nn.Conv2d)
    feats = extractor(torch.randn(1, 3, 32, 32))
    sizes = {name: (f.shape[1], f.shape[2]) for name, f in feats.items()}
    assert sizes == {
        "conv1_2": (64, 32),
        "conv2_2": (128, 16),
        "conv3_4": (256, 8),
        "conv4_4": (512, 4),
        "conv5_4": (512, 2),
    }
    # Taken before the ReLU: pre-activations keep their negative values.
    assert all(float(f.min()) < 0 for f in feats.values())


def test_gan_loss_weights_only_the_generator_term() -> None:
    gan = GANLoss(generator_weight=0.1)
    zeros = torch.zeros(2, 1, 8, 8)
    assert float(gan(zeros, True)) == pytest.approx(0.1 * math.log(2))
    assert float(gan(zeros, False, for_discriminator=True)) == pytest.approx(math.log(2))
    sure = torch.full((1, 1, 8, 8), 20.0)
    assert float(gan(sure, True, for_discriminator=True)) < 1e-6
    assert float(gan(sure, False, for_discriminator=True)) == pytest.approx(20.0, rel=1e-4)


def test_neighbor_subsample_takes_adjacent_different_pixels() -> None:
    n, c, h, w = 2, 3, 8, 12
    x = torch.arange(n * c * h * w, dtype=torch.float32).reshape(n, c, h, w)
    g1, g2 = neighbor_subsample(x, torch.Generator().manual_seed(0))
    assert g1.shape == g2.shape == (n, c, h // 2, w // 2)
    assert bool((g1 != g2).all())
    for g in (g1, g2):
        flat = g.long() % (h * w)
        y, xx = flat // w, flat % w
        rows = torch.arange(h // 2).view(1, 1, -1, 1)
        cols = torch.arange(w // 2).view(1, 1, 1, -1)
        assert bool(((y // 2) == rows).all() and ((xx // 2) == cols).all())  # own 2x2 cell
    p1, p2 = g1.long() % (h * w), g2.long() % (h * w)
    dist = (p1 // w - p2 // w).abs() + (p1 % w - p2 % w).abs()
    assert bool((dist == 1).all())  # horizontal or vertical neighbours, never diagonal
    # Every channel samples the same position.
    assert bool(((p1[:, 1:] - p1[:, :1]) == 0).all())
    again = neighbor_subsample(x, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], g1) and torch.equal(again[1], g2)
    other = neighbor_subsample(x, torch.Generator().manual_seed(1))
    assert not torch.equal(other[0], g1)


def test_neighbor_subsample_needs_even_sides() -> None:
    with pytest.raises(DenoiseError, match="must be even"):
        neighbor_subsample(torch.zeros(1, 1, 7, 8))


def test_n2n_loss_with_identity_model_is_the_neighbour_difference() -> None:
    x = _images(7, n=2, size=16)
    loss = n2n_loss(lambda t: t, x, gamma=2.0, generator=torch.Generator().manual_seed(3))
    idx1, idx2 = neighbor_indices(x.shape, torch.Generator().manual_seed(3))
    g1, g2 = subsample(x, idx1), subsample(x, idx2)
    # Identity: f(g1) - g2 equals g1(f(y)) - g2(f(y)), so the regulariser vanishes.
    assert float(loss) == pytest.approx(float(((g1 - g2) ** 2).mean()), rel=1e-6)


def test_n2n_loss_trains_a_model() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(1, 1, 3, padding=1)
    x = _images(8, n=2, size=16)
    loss = n2n_loss(model, x, gamma=2.0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert model.weight.grad is not None and float(model.weight.grad.abs().sum()) > 0
    plain = n2n_loss(model, x, gamma=0.0, generator=torch.Generator().manual_seed(0))
    assert float(loss.detach()) > float(plain.detach()) > 0
