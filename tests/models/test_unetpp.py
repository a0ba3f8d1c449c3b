"""U-Net++ segmenter: building offline, shapes, architectures, weights files, encoder weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cemi_stream.errors import ModelError
from models.rrdbnet import build_generator
from models.unetpp import (
    KIND,
    PAPER_ENCODER,
    SEGMENTER_ARCHS,
    SMALL_ENCODER,
    arch_of,
    build_segmenter,
    build_unetpp,
    load_encoder_weights,
    load_segmenter_model,
    normalize_segmenter_arch,
    parameter_count,
    save_segmenter,
    size_multiple,
)
from models.weights import ModelCard, card_path, load_model, save_model

TINY = {"encoder": SMALL_ENCODER, "encoder_depth": 3, "decoder_channels": [16, 8, 8]}


def test_small_unetpp_maps_grey_tiles_to_one_logit_channel() -> None:
    torch.manual_seed(0)
    model = build_unetpp().eval()
    assert arch_of(model) == normalize_segmenter_arch("small")
    assert parameter_count(model) < 2_000_000  # a few MB of float32
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 96))
    assert out.shape == (2, 1, 64, 96)
    assert size_multiple(arch_of(model)) == 32


def test_paper_encoder_builds_offline() -> None:
    model = build_unetpp(PAPER_ENCODER)
    arch = arch_of(model)
    assert arch["encoder"] == "se_resnext50_32x4d"
    assert arch["decoder_channels"] == [256, 128, 64, 32, 16]  # the paper's (smp default)
    assert parameter_count(model) > 40_000_000


def test_arch_names_and_validation() -> None:
    assert set(SEGMENTER_ARCHS) == {"paper", "small"}
    assert normalize_segmenter_arch("paper")["encoder"] == PAPER_ENCODER
    assert normalize_segmenter_arch("mobilenet_v2")["decoder_channels"] == [64, 32, 24, 16, 8]
    assert normalize_segmenter_arch(TINY)["encoder_depth"] == 3
    with pytest.raises(ModelError, match="decoder_channels must be 5"):
        normalize_segmenter_arch({"encoder": SMALL_ENCODER, "decoder_channels": [8, 8]})
    with pytest.raises(ModelError, match="unknown segmenter arch keys: colour"):
        normalize_segmenter_arch({"encoder": SMALL_ENCODER, "colour": 1})
    with pytest.raises(ModelError, match="unsupported segmenter type"):
        normalize_segmenter_arch({"type": "RRDBNet"})
    with pytest.raises(ModelError, match="cannot build U-Net\\+\\+ with encoder 'no-such-net'"):
        build_unetpp("no-such-net")


def _card() -> ModelCard:
    return ModelCard(
        name="tiny-seg",
        arch={},
        training={"command": "test"},
        iterations=3,
        metrics={"val_iou": 0.5},
    )


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_segmenter(TINY).eval()
    path = save_segmenter(model, tmp_path / "tiny-seg.safetensors", _card())
    card = json.loads(card_path(path).read_text())
    assert card["kind"] == KIND and card["arch"] == normalize_segmenter_arch(TINY)
    loaded, lcard = load_segmenter_model(path)
    assert lcard.kind == KIND and lcard.metrics == {"val_iou": 0.5}
    assert not loaded.training
    x = torch.randn(1, 1, 32, 40)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_kinds_are_not_confused(tmp_path: Path) -> None:
    seg = save_segmenter(build_segmenter(TINY), tmp_path / "seg.safetensors", _card())
    with pytest.raises(ModelError, match="is a lamellar-segmenter model, not a denoiser"):
        load_model(seg)
    gen = build_generator({"num_feat": 4, "num_block": 1, "num_grow_ch": 4})
    den = save_model(
        gen,
        tmp_path / "den.safetensors",
        ModelCard(name="den", arch={}, training={}, iterations=0, metrics={}),
    )
    with pytest.raises(ModelError, match="is a denoiser model, not a lamellar-segmenter"):
        load_segmenter_model(den)
    # The denoiser's card layout is unchanged (no kind key).
    assert "kind" not in json.loads(card_path(den).read_text())


def test_weights_that_do_not_fit_the_card(tmp_path: Path) -> None:
    path = save_segmenter(build_segmenter(TINY), tmp_path / "a.safetensors", _card())
    data = json.loads(card_path(path).read_text())
    data["arch"]["decoder_channels"] = [32, 8, 8]
    card_path(path).write_text(json.dumps(data))
    with pytest.raises(ModelError, match="weights do not match the card's arch"):
        load_segmenter_model(path)
    with pytest.raises(ModelError, match="no such model file"):
        load_segmenter_model(tmp_path / "missing.safetensors")


def test_local_encoder_weights_rgb_folded_to_grey(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(2)
    rgb = build_segmenter({**TINY, "in_channels": 3})
    state = {f"encoder.{k}": v.contiguous() for k, v in rgb.encoder.state_dict().items()}
    state["fc.weight"] = torch.zeros(3, 3)  # a classifier head the encoder lacks: ignored
    save_file(state, str(tmp_path / "enc.safetensors"))
    grey = build_segmenter(TINY, encoder_weights=tmp_path / "enc.safetensors")
    stem = "model.conv_stem.weight"
    folded = rgb.encoder.state_dict()[stem].sum(1, keepdim=True)
    assert torch.equal(grey.encoder.state_dict()[stem], folded)
    other = "model.blocks.0.0.conv_dw.weight"
    assert torch.equal(grey.encoder.state_dict()[other], rgb.encoder.state_dict()[other])
    # The same weights as a torch .pth without smp's "model." prefix (a timm checkpoint).
    plain = {k.removeprefix("model."): v for k, v in rgb.encoder.state_dict().items()}
    torch.save(plain, tmp_path / "enc.pth")
    again = build_segmenter(TINY)
    load_encoder_weights(again, tmp_path / "enc.pth")
    assert torch.equal(again.encoder.state_dict()[stem], folded)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ModelError, match="encoder weights missing"):
        build_segmenter(TINY, encoder_weights=tmp_path / "wrong.safetensors")
    with pytest.raises(ModelError, match="no such encoder weights file"):
        build_segmenter(TINY, encoder_weights=tmp_path / "nope.pth")
