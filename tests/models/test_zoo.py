"""Model resolution: default, names, files, folders, and the helpful refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from cemi_stream.errors import ModelError
from models import zoo
from models.zoo import DEFAULT_MODEL, WEIGHTS_DIR, list_models, resolve_model


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_weights_dir_is_the_package_folder() -> None:
    assert Path(zoo.__file__).resolve().parent / "weights" == WEIGHTS_DIR
    assert (WEIGHTS_DIR / "README.md").is_file()


def test_default_and_names(tmp_path: Path) -> None:
    default = _touch(tmp_path / f"{DEFAULT_MODEL}.safetensors")
    other = _touch(tmp_path / "semnet-paper.safetensors")
    _touch(tmp_path / "notes.json")
    assert resolve_model(None, weights_dir=tmp_path) == default
    assert resolve_model("semnet-paper", weights_dir=tmp_path) == other
    assert list_models(tmp_path) == [DEFAULT_MODEL, "semnet-paper"]


def test_module_weights_dir_is_used_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    path = _touch(tmp_path / f"{DEFAULT_MODEL}.safetensors")
    assert resolve_model(None) == path
    assert list_models() == [DEFAULT_MODEL]


def test_file_and_folder(tmp_path: Path) -> None:
    f = _touch(tmp_path / "runs" / "a" / "model.safetensors")
    assert resolve_model(f) == f
    assert resolve_model(str(f)) == f
    assert resolve_model(f.parent) == f  # the only one in the folder
    run = tmp_path / "runs" / "b"
    _touch(run / "b.safetensors")
    _touch(run / "b-iter1000.safetensors")
    assert resolve_model(run) == run / "b.safetensors"  # named like the folder


def test_refusals(tmp_path: Path) -> None:
    zoo_dir = tmp_path / "zoo"
    _touch(zoo_dir / "alpha.safetensors")
    with pytest.raises(ModelError) as info:
        resolve_model("beta", weights_dir=zoo_dir)
    msg = str(info.value)
    assert "no such model 'beta'" in msg and "alpha" in msg and "train-denoiser" in msg
    assert "\n" not in msg

    with pytest.raises(ModelError, match=f"default model {DEFAULT_MODEL} not found.*alpha"):
        resolve_model(None, weights_dir=zoo_dir)
    with pytest.raises(ModelError, match=r"available models in .*: none"):
        resolve_model(None, weights_dir=tmp_path / "empty")

    pth = _touch(tmp_path / "net.pth")
    with pytest.raises(ModelError, match="not a model weights file"):
        resolve_model(pth, weights_dir=zoo_dir)
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    with pytest.raises(ModelError, match=r"holds no \.safetensors model"):
        resolve_model(empty_run, weights_dir=zoo_dir)
    two = tmp_path / "two"
    _touch(two / "x.safetensors")
    _touch(two / "y.safetensors")
    with pytest.raises(ModelError, match=r"holds 2 \.safetensors models"):
        resolve_model(two, weights_dir=zoo_dir)
