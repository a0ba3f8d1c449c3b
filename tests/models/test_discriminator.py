"""UNetDiscriminatorSN: output shape, spectral norm, size check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cemi_stream.errors import ModelError
from models.discriminator import UNetDiscriminatorSN


def test_logits_shape_and_gradient() -> None:
    net = UNetDiscriminatorSN(num_feat=8)
    x = torch.rand(2, 1, 48, 64, requires_grad=True)
    logits = net(x)
    assert logits.shape == (2, 1, 48, 64)
    logits.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert net.conv0.weight.grad is not None and net.conv9.weight.grad is not None


def test_spectral_norm_on_conv1_to_conv8() -> None:
    net = UNetDiscriminatorSN(num_feat=8)
    names = set(net.state_dict())
    for i in range(1, 9):
        assert {f"conv{i}.weight_orig", f"conv{i}.weight_u", f"conv{i}.weight_v"} <= names
        assert f"conv{i}.bias" not in names
    for i in (0, 9):
        assert {f"conv{i}.weight", f"conv{i}.bias"} <= names
        assert f"conv{i}.weight_orig" not in names
    # after some power iterations the normalised weight has spectral norm ~1
    net.train()
    for _ in range(30):
        net(torch.rand(1, 1, 16, 16))
    conv = net.conv2
    assert isinstance(conv, nn.Conv2d)
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert abs(float(sigma) - 1.0) < 0.05


def test_no_skip_and_three_channels() -> None:
    net = UNetDiscriminatorSN(num_in_ch=3, num_feat=4, skip_connection=False)
    assert net(torch.rand(1, 3, 16, 24)).shape == (1, 1, 16, 24)


@pytest.mark.parametrize("shape", [(20, 32), (32, 36)])
def test_size_not_multiple_of_8(shape: tuple[int, int]) -> None:
    with pytest.raises(ModelError, match="multiples of 8"):
        UNetDiscriminatorSN(num_feat=4)(torch.rand(1, 1, *shape))
