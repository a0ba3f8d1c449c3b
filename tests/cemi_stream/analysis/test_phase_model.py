"""Phase fraction by a trained segmenter (``--method model``): the mask contract, the
kind check, the option checks, and the shipped model against the superalloy labels."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cemi_stream.analysis.analyze import Settings, resolve_settings
from cemi_stream.analysis.phase import phase_fraction, phase_mask
from cemi_stream.analysis.segment import (
    DEFAULT_PHASE_MODEL,
    LAMELLAR_KIND,
    PHASE_KIND,
    clear_cache,
    load_segmenter,
    resolve_segmenter,
)
from cemi_stream.errors import AnalysisError, ModelError
from models.unetpp import KIND, SMALL_ENCODER, build_segmenter, save_segmenter
from models.unetpp import PHASE_KIND as MODEL_PHASE_KIND
from models.weights import ModelCard

REPO = Path(__file__).resolve().parents[3]
TINY = {"encoder": SMALL_ENCODER, "encoder_depth": 3, "decoder_channels": [16, 8, 8]}
DATA = Path(os.environ.get("CEMI_DATA", Path(__file__).resolve().parents[4] / "shared" / "data"))
SUPERALLOY = DATA / "superalloy-gamma-prime"


def _save(folder: Path, name: str, kind: str) -> Path:
    torch.manual_seed(1)
    card = ModelCard(name=name, arch={}, training={}, iterations=0, metrics={})
    return save_segmenter(build_segmenter(TINY), folder / f"{name}.safetensors", card, kind=kind)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("phase-models")
    return {"phase": _save(folder, "tiny-phase", PHASE_KIND),
            "lamellar": _save(folder, "tiny-lam", LAMELLAR_KIND)}  # fmt: skip


def test_the_kinds_agree_with_the_models_package() -> None:
    assert (LAMELLAR_KIND, PHASE_KIND) == (KIND, MODEL_PHASE_KIND)


def test_model_mask_is_boolean_inside_valid_and_bright_is_its_complement(
    models: dict[str, Path],
) -> None:
    rng = np.random.default_rng(0)
    tile = rng.integers(20, 230, (90, 130), dtype=np.uint8)
    valid = np.ones(tile.shape, bool)
    valid[:, :30] = False
    dark = phase_mask(tile, valid, method="model", model=str(models["phase"]))
    bright = phase_mask(tile, valid, method="model", phase="bright", model=str(models["phase"]))
    assert dark.dtype == bool and dark.shape == tile.shape
    assert not dark[~valid].any() and not bright[~valid].any()
    assert not (dark & bright).any() and ((dark | bright) == valid).all()
    f = phase_fraction(tile, valid, method="model", model=str(models["phase"]))
    assert f == pytest.approx(dark.sum() / valid.sum())


def test_a_lamellar_model_is_refused_as_a_phase_model(models: dict[str, Path]) -> None:
    tile = np.full((64, 64), 100, np.uint8)
    tile[::2] = 50
    with pytest.raises(AnalysisError, match="not a phase-segmenter") as info:
        phase_mask(tile, method="model", model=str(models["lamellar"]))
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match="not a lamellar-segmenter"):
        load_segmenter(str(models["phase"]))  # and the other way round


def test_options_of_the_model_method(models: dict[str, Path], tmp_path: Path) -> None:
    s = resolve_settings(Settings(method="model", phase_model=str(models["phase"])), 508, 1)
    assert s.method == "model" and s.phase_model == str(models["phase"].resolve())
    with pytest.raises(AnalysisError, match=r"--phase-model .*only with --method model"):
        resolve_settings(Settings(method="otsu", phase_model="x"), 508, 1)
    with pytest.raises(AnalysisError, match=r"--phase-model .*nothing"):
        resolve_settings(Settings(method="model", phase_model=str(tmp_path / "nothing")), 508, 1)


def test_default_phase_model_is_shipped() -> None:
    path = resolve_segmenter(None, PHASE_KIND)
    assert path.name == f"{DEFAULT_PHASE_MODEL}.safetensors" and path.is_file()
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["kind"] == PHASE_KIND
    # trained on the train split only, validated on val: test was never seen
    data = card["training"]["data"]
    assert not {n for n in data["train_images"] + data["val_images"] if n.startswith("spot2_")}


def _split(split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    if not (SUPERALLOY / "index.csv").is_file():
        pytest.skip(f"superalloy labels not found under {SUPERALLOY} (set CEMI_DATA)")
    out = []
    with open(SUPERALLOY / "index.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["split"].split("/")[-1] != split:
                continue
            img = cv2.imread(str(SUPERALLOY / row["image"]), cv2.IMREAD_GRAYSCALE)
            lab = cv2.imread(str(SUPERALLOY / row["label"]), cv2.IMREAD_UNCHANGED)
            if img is not None and lab is not None:
                out.append((img, lab > 0))
    if not out:
        pytest.skip(f"no {split} images in {SUPERALLOY}")
    return out


def test_shipped_phase_model_meets_3pp_on_the_held_out_test_split() -> None:
    clear_cache()
    errors = [abs(phase_fraction(img, method="model") - lab.mean()) * 100
              for img, lab in _split("test")]  # fmt: skip
    assert float(np.mean(errors)) <= 3.0, errors


def test_analyze_command_with_the_shipped_phase_model(tmp_path: Path) -> None:
    # A two-phase image: dark discs covering a known fraction on a bright, noisy matrix.
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:413, 0:508]
    dark = np.zeros((413, 508), bool)
    for cy, cx in rng.uniform((20, 20), (393, 488), (60, 2)):
        dark |= (yy - cy) ** 2 + (xx - cx) ** 2 < 18**2
    img = np.where(dark, 90, 160) + rng.normal(0, 6, dark.shape)
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "discs.png"), np.clip(img, 0, 255).astype(np.uint8))
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "run_daemon.py", "analyze", str(folder), "--out", str(out),
         "--method", "model", "--segmenter", "none", "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["settings"]["method"] == "model"
    assert summary["phase_model"]["name"] == DEFAULT_PHASE_MODEL
    assert summary["phase_model"]["kind"] == PHASE_KIND
    with open(out / "tiles.csv", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    # gamma' of the superalloys is not discs, but a dark phase on a bright matrix is one
    assert abs(float(row["phase_fraction"]) - dark.mean()) < 0.1, (row, dark.mean())
    bad = subprocess.run(
        [sys.executable, "run_daemon.py", "analyze", str(folder), "--out", str(tmp_path / "o"),
         "--method", "otsu", "--phase-model", "x", "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert bad.returncode == 2 and "only with --method model" in bad.stderr
