"""Model files: safetensors + JSON card round trip, hash, and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cemi_stream.errors import ModelError
from models.rrdbnet import RRDBNet, arch_dict, build_generator
from models.weights import ModelCard, card_path, load_model, model_hash, save_model

SMALL = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}


def _card(name: str = "tiny", arch: dict | None = None) -> ModelCard:
    return ModelCard(
        name=name,
        arch=arch or {},
        training={"lr": 2e-4, "losses": ["l1"]},
        iterations=123,
        metrics={"psnr_db": 27.5},
        created="2025-01-01T00:00:00+00:00",
    )


def _saved(tmp_path: Path, name: str = "tiny") -> tuple[RRDBNet, Path]:
    torch.manual_seed(3)
    model = build_generator(SMALL)
    # channels_last weights are not contiguous: save_model must cope.
    model = model.to(memory_format=torch.channels_last)
    path = save_model(model, tmp_path / f"{name}.safetensors", _card(name))
    return model.eval(), path


def test_round_trip_outputs_identical(tmp_path: Path) -> None:
    model, path = _saved(tmp_path)
    assert path.is_file() and card_path(path).is_file()
    loaded, card = load_model(path)
    assert not loaded.training
    assert arch_dict(loaded) == arch_dict(model)
    assert card.name == "tiny" and card.arch == arch_dict(model)
    assert card.training == {"lr": 2e-4, "losses": ["l1"]}
    assert card.iterations == 123 and card.metrics == {"psnr_db": 27.5}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # Same memory format on both sides: the same kernels run, so bitwise equal.
    model = model.to(memory_format=torch.contiguous_format)
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json", "tiny.safetensors"]


def test_card_json_layout(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    data = json.loads(card_path(path).read_text())
    assert list(data) == [
        "format_version",
        "name",
        "arch",
        "training",
        "iterations",
        "metrics",
        "created",
    ]
    assert data["format_version"] == 1
    assert data["arch"] == {"type": "RRDBNet", "num_in_ch": 1, "num_out_ch": 1, "scale": 1, **SMALL}
    assert ModelCard.from_dict(data).to_dict() == data


def test_created_filled_in_and_arch_checked(tmp_path: Path) -> None:
    model = build_generator(SMALL)
    card = ModelCard(name="t", arch={}, training={}, iterations=0, metrics={}, created="")
    path = save_model(model, tmp_path / "t.safetensors", card)
    assert load_model(path)[1].created.startswith("20")
    # a card arch that states the model (partially, defaults filled) is accepted ...
    save_model(model, tmp_path / "u.safetensors", _card("u", dict(SMALL)))
    # ... one that contradicts it is not
    with pytest.raises(ModelError, match="does not describe the model"):
        save_model(model, tmp_path / "v.safetensors", _card("v", {**SMALL, "num_block": 2}))
    with pytest.raises(ModelError, match=r"must end in \.safetensors"):
        save_model(model, tmp_path / "w.pt", _card("w"))


def test_model_hash_stable_and_specific(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    h = model_hash(path)
    assert len(h) == 64 and int(h, 16) >= 0
    assert model_hash(path) == h
    # same weights saved again (another folder): same bytes, same hash
    model, _ = _saved(tmp_path / "again")
    assert model_hash(tmp_path / "again" / "tiny.safetensors") == h
    with torch.no_grad():
        model.conv_last.weight.add_(1.0)
    other = save_model(model, tmp_path / "other.safetensors", _card("other"))
    assert model_hash(other) != h
    with pytest.raises(ModelError, match="no such model file"):
        model_hash(tmp_path / "absent.safetensors")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"absent\.safetensors: no such model file"):
        load_model(tmp_path / "absent.safetensors")


def test_corrupt_file(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelError, match="not a valid safetensors file") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_truncated_file(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a valid safetensors file"):
        load_model(path)


def test_card_missing(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    card_path(path).unlink()
    with pytest.raises(ModelError, match=r"missing model card .*tiny\.json"):
        load_model(path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "Expecting property name"),
        ('{"format_version": 1}', "missing key 'name'"),
        ('{"format_version": 2}', "unsupported format_version 2"),
        ("[1, 2]", "card is a list"),
    ],
)
def test_card_invalid(tmp_path: Path, content: str, reason: str) -> None:
    _, path = _saved(tmp_path)
    card_path(path).write_text(content)
    with pytest.raises(ModelError, match="invalid model card") as info:
        load_model(path)
    assert reason in str(info.value)


def test_card_with_bad_arch(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    data = json.loads(card_path(path).read_text())
    data["arch"]["scale"] = 3
    card_path(path).write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"invalid model card .*scale"):
        load_model(path)


def test_arch_mismatch(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    data = json.loads(card_path(path).read_text())
    data["arch"]["num_block"] = 2
    card_path(path).write_text(json.dumps(data))
    with pytest.raises(ModelError, match="weights do not match the card's arch") as info:
        load_model(path)
    assert "missing: body.1.rdb1.conv1.weight" in str(info.value)
