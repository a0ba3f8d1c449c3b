"""The shipped default model: it loads, its card is complete, and it denoises real frames."""

from __future__ import annotations

from pathlib import Path

from cemi_stream.capture.crop import detect_crop
from cemi_stream.denoise.infer import Denoiser
from cemi_stream.denoise.metrics import psnr
from cemi_stream.denoise.pairs import load_gray
from models.rrdbnet import ARCHS
from models.weights import load_model
from models.zoo import DEFAULT_MODEL, resolve_model


def test_default_model_loads_with_a_complete_card() -> None:
    path = resolve_model(None)
    assert path.name == f"{DEFAULT_MODEL}.safetensors"
    # Small enough to live in the repository.
    assert path.stat().st_size < 5 * 2**20
    model, card = load_model(path)
    assert {k: card.arch[k] for k in ARCHS["compact"]} == ARCHS["compact"]
    assert "train-denoiser" in card.training["command"]
    assert card.training["train_ids"] and card.training["val_ids"]
    assert set(card.training["train_ids"]).isdisjoint(card.training["val_ids"])
    assert card.metrics["val_psnr_db"] > 28.0
    assert not model.training


def test_default_model_denoises_a_real_validation_frame(data_dir: Path) -> None:
    # Pair 033 is a validation pair: never seen in training.  Compared on the
    # data-bar-free area after the known drift is cut away (within 6 px).
    k = data_dir / "kriss-sem-pairs"
    ld = load_gray(k / "time/low/low_100ns_033.png")
    hd = load_gray(k / "time/high/high_30us_033.png")
    rect = detect_crop(hd).rect
    denoised = Denoiser(None, "cpu").denoise(ld)
    assert denoised.shape == ld.shape
    # The data bar is passed through only by `denoise_files`; compare the image area.
    area = (slice(rect.y + 8, rect.y + rect.height - 8), slice(rect.x + 8, rect.x + rect.width - 8))
    raw_db = psnr(ld[area], hd[area])
    den_db = psnr(denoised[area], hd[area])
    assert den_db > raw_db + 4.0, (raw_db, den_db)
