"""RRDBNet: shapes, sizes, FLOP count, BasicSR checkpoint loading and RGB folding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cemi_stream.errors import ModelError
from models.rrdbnet import (
    ARCHS,
    RRDBNet,
    arch_dict,
    build_generator,
    count_parameters,
    fold_rgb_state_dict,
    generator_flops,
    load_basicsr_state_dict,
)

SMALL = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}


def _measured_flops(model: nn.Module, x: torch.Tensor) -> float:
    """2 x multiply-accumulates of all convolutions, counted with forward hooks."""
    total = [0]

    def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        assert isinstance(module, nn.Conv2d)
        k = module.kernel_size[0] * module.kernel_size[1]
        total[0] += output.numel() * module.in_channels // module.groups * k

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return 2.0 * total[0]


@pytest.mark.parametrize(("scale", "factor"), [(1, 4), (2, 2)])
def test_output_shape_and_unshuffle(scale: int, factor: int) -> None:
    model = build_generator({"scale": scale, **SMALL})
    assert model.conv_first.in_channels == factor * factor
    y = model(torch.rand(2, 1, 32, 48))
    assert y.shape == (2, 1, 32 * scale, 48 * scale)
    assert y.dtype == torch.float32


def test_basicsr_parameter_names() -> None:
    names = set(build_generator({"num_block": 2, "num_feat": 8, "num_grow_ch": 4}).state_dict())
    for stem in ("conv_first", "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"):
        assert {f"{stem}.weight", f"{stem}.bias"} <= names
    for i in range(2):
        for r in (1, 2, 3):
            for c in range(1, 6):
                assert f"body.{i}.rdb{r}.conv{c}.weight" in names
    assert "body.2.rdb1.conv1.weight" not in names
    # 6 outer convs + 2 blocks x 3 dense blocks x 5 convs, each a weight and a bias
    assert len(names) == 2 * (6 + 2 * 3 * 5)


def test_channels_last_matches_contiguous() -> None:
    model = build_generator({**SMALL, "num_block": 2}).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.inference_mode():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(30, 32), (32, 34), (33, 33)])
def test_size_not_multiple_of_4_is_model_error(shape: tuple[int, int]) -> None:
    model = build_generator(SMALL)
    with pytest.raises(ModelError, match=r"multiples of 4") as info:
        model(torch.rand(1, 1, *shape))
    assert "\n" not in str(info.value)


def test_parameter_counts() -> None:
    paper = build_generator("paper")
    n_paper = count_parameters(paper)
    assert 16.5e6 < n_paper < 16.9e6
    assert arch_dict(paper) == {
        "type": "RRDBNet",
        "num_in_ch": 1,
        "num_out_ch": 1,
        "scale": 1,
        **ARCHS["paper"],
    }
    compact = build_generator("compact")
    n_compact = count_parameters(compact)
    assert n_compact == sum(p.numel() for p in compact.parameters())
    assert n_compact < n_paper / 20
    # conv_first of the 1-channel scale-1 paper net sees 16 unshuffled channels
    assert paper.conv_first.weight.shape == (64, 16, 3, 3)


def test_flops_paper_frame() -> None:
    flops = generator_flops("paper", 768, 1024)
    assert 1.7e12 <= flops <= 1.85e12
    assert generator_flops("compact", 768, 1024) < flops / 20


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_flops_match_counted_convolutions(scale: int) -> None:
    arch = {
        "scale": scale,
        "num_in_ch": 3,
        "num_out_ch": 2,
        "num_feat": 8,
        "num_block": 2,
        "num_grow_ch": 4,
    }
    model = build_generator(arch)
    assert generator_flops(arch, 16, 24) == _measured_flops(model, torch.rand(1, 3, 16, 24))


def test_flops_reject_bad_size() -> None:
    with pytest.raises(ModelError, match="multiples of 4"):
        generator_flops("compact", 770, 1024)


def test_arch_round_trip_and_errors() -> None:
    model = build_generator({"scale": 2, "num_in_ch": 3, **SMALL})
    again = build_generator(arch_dict(model))
    assert arch_dict(again) == arch_dict(model)
    with pytest.raises(ModelError, match="unknown generator arch 'huge'"):
        build_generator("huge")
    with pytest.raises(ModelError, match="scale"):
        build_generator({"scale": 3})
    with pytest.raises(ModelError, match="num_feat"):
        build_generator({"num_feat": 0})
    with pytest.raises(ModelError, match="unknown generator arch keys: depth"):
        build_generator({"depth": 3})
    with pytest.raises(ModelError, match="unsupported generator type"):
        build_generator({"type": "SwinIR"})


def _rgb_model(scale: int = 1) -> RRDBNet:
    torch.manual_seed(0)
    model = RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, **SMALL).eval()
    # Non-zero biases everywhere, so that averaging conv_last's bias is exercised.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(-0.1, 0.1)
    return model


def _check_grey_equals_rgb_mean(rgb: RRDBNet, grey: RRDBNet, size: int = 32) -> None:
    torch.manual_seed(1)
    image = torch.rand(2, 1, size, size)
    with torch.no_grad():
        expected = rgb(image.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True)
        got = grey(image)
    assert got.shape == expected.shape
    assert expected.abs().max() > 1e-3  # the comparison is not trivially 0 == 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scale", [1, 2])
def test_load_basicsr_pth_folds_rgb(tmp_path: Path, scale: int) -> None:
    rgb = _rgb_model(scale)
    ckpt = tmp_path / "net_g.pth"
    # BasicSR saves both; params_ema must win.
    decoy = {k: torch.zeros_like(v) for k, v in rgb.state_dict().items()}
    torch.save({"params": decoy, "params_ema": rgb.state_dict()}, ckpt)
    grey = RRDBNet(scale=scale, **SMALL).eval()
    load_basicsr_state_dict(grey, ckpt)
    _check_grey_equals_rgb_mean(rgb, grey)


def test_load_module_prefixed_mapping_and_safetensors(tmp_path: Path) -> None:
    rgb = _rgb_model()
    prefixed = {f"module.{k}": v for k, v in rgb.state_dict().items()}
    grey = RRDBNet(**SMALL).eval()
    load_basicsr_state_dict(grey, {"state_dict": prefixed})
    _check_grey_equals_rgb_mean(rgb, grey)

    path = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(path))
    grey2 = RRDBNet(**SMALL).eval()
    load_basicsr_state_dict(grey2, path)
    _check_grey_equals_rgb_mean(rgb, grey2)


def test_load_same_channels_is_exact() -> None:
    src = _rgb_model()
    dst = RRDBNet(num_in_ch=3, num_out_ch=3, **SMALL)
    load_basicsr_state_dict(dst, {"params": src.state_dict()})
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_fold_rgb_state_dict_shapes_and_input_untouched() -> None:
    state = _rgb_model().state_dict()
    before = state["conv_first.weight"].clone()
    folded = fold_rgb_state_dict(state, scale=1)
    assert folded["conv_first.weight"].shape == (8, 16, 3, 3)
    assert folded["conv_last.weight"].shape == (1, 8, 3, 3)
    assert folded["conv_last.bias"].shape == (1,)
    assert torch.equal(state["conv_first.weight"], before)
    # channel-major: offset k of the grey net = colours at k, 16 + k, 32 + k
    torch.testing.assert_close(
        folded["conv_first.weight"][:, 5], before[:, 5] + before[:, 21] + before[:, 37]
    )
    with pytest.raises(ModelError, match="conv_first has 48 input channels"):
        fold_rgb_state_dict(state, scale=2)


def test_load_mismatch_is_one_line_model_error(tmp_path: Path) -> None:
    src = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, num_grow_ch=4)
    dst = RRDBNet(**SMALL)
    with pytest.raises(ModelError) as info:
        load_basicsr_state_dict(dst, {"params_ema": src.state_dict()})
    msg = str(info.value)
    assert "\n" not in msg
    assert "unexpected: body.1.rdb1.conv1.weight" in msg

    wide = RRDBNet(num_feat=16, num_block=1, num_grow_ch=4)
    with pytest.raises(ModelError, match=r"shape: conv_first\.weight \(16, 16, 3, 3\)"):
        load_basicsr_state_dict(dst, wide.state_dict())

    partial = {k: v for k, v in dst.state_dict().items() if not k.startswith("conv_hr")}
    with pytest.raises(ModelError, match=r"missing: conv_hr\.weight, conv_hr\.bias"):
        load_basicsr_state_dict(dst, partial)


def test_load_bad_files(tmp_path: Path) -> None:
    model = RRDBNet(**SMALL)
    with pytest.raises(ModelError, match="no such checkpoint file"):
        load_basicsr_state_dict(model, tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="not a loadable weights-only checkpoint"):
        load_basicsr_state_dict(model, junk)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickled code ran",))


def test_pth_with_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"params": {"x": _Evil()}}, path)
    with pytest.raises(ModelError, match="weights-only"):
        load_basicsr_state_dict(RRDBNet(**SMALL), path)
    assert "pickled code ran" not in capsys.readouterr().out
