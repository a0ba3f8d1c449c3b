"""Tests of the eval-denoiser engine on real KRISS pairs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cemi_stream.denoise.evaluate import ALL_IMAGES, CSV_COLUMNS, LPIPS_UNAVAILABLE, evaluate
from cemi_stream.errors import DenoiseError

HS = (10.0, 20.0)


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_raw_and_nlm_rows_on_real_pairs(kriss: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = evaluate(
        [(kriss / "time/low", kriss / "time/high")],
        [],
        ids={"001", "002"},
        out_dir=out,
        nlm_hs=HS,
        progress=False,
    )
    raw, nlm = result["methods"]["raw-ld"], result["methods"]["nlm"]
    assert result["images"] == 2
    assert result["nlm_h_tuned"] is True and result["nlm_h"] in HS
    assert nlm["h"] == result["nlm_h"]
    # NLM must beat the raw LD image on real SEM noise.
    assert nlm["psnr_db"] > raw["psnr_db"] + 2.0
    assert nlm["ssim"] > raw["ssim"]
    assert 15.0 < raw["psnr_db"] < 30.0 and 0.0 < raw["ssim"] < 1.0
    assert result["lpips"] == LPIPS_UNAVAILABLE or isinstance(result["lpips"], dict)

    columns, rows = read_rows(out / "eval.csv")
    assert tuple(columns) == CSV_COLUMNS
    assert [(r["image"], r["method"]) for r in rows] == [
        ("001", "raw-ld"),
        ("001", "nlm"),
        ("002", "raw-ld"),
        ("002", "nlm"),
        (ALL_IMAGES, "raw-ld"),
        (ALL_IMAGES, "nlm"),
    ]
    for method in ("raw-ld", "nlm"):
        per_image = [r for r in rows if r["method"] == method and r["image"] != ALL_IMAGES]
        mean_row = next(r for r in rows if r["method"] == method and r["image"] == ALL_IMAGES)
        for key in CSV_COLUMNS[2:]:
            mean = np.mean([float(r[key]) for r in per_image])
            assert float(mean_row[key]) == pytest.approx(mean, abs=1e-3)
            assert float(mean_row[key]) == pytest.approx(result["methods"][method][key], abs=1e-3)
        assert all(float(r["dark_fraction_error_pp"]) >= 0.0 for r in per_image)
        assert all(float(r["psnr_db"]) > 0.0 for r in per_image)
    nlm_rows = [r for r in rows if r["method"] == "nlm" and r["image"] != ALL_IMAGES]
    raw_rows = [r for r in rows if r["method"] == "raw-ld" and r["image"] != ALL_IMAGES]
    for a, b in zip(nlm_rows, raw_rows, strict=True):
        assert float(a["psnr_db"]) > float(b["psnr_db"]), a["image"]

    saved = json.loads((out / "eval.json").read_text())
    assert saved["methods"]["nlm"]["psnr_db"] == pytest.approx(nlm["psnr_db"])
    assert saved["nlm_h"] == result["nlm_h"] and saved["lpips"] == result["lpips"]
    assert [p["image"] for p in saved["pairs"]] == ["001", "002"]
    figure = cv2.imread(str(out / "eval.png"), cv2.IMREAD_GRAYSCALE)
    assert figure is not None
    # LD | NLM | HD panels of 192 px plus 4-px gaps, a label band on top.
    assert figure.shape[1] == 3 * 192 + 4 * 4 and figure.shape[0] > 192


def test_several_folders_get_distinct_labels_and_fixed_h(kriss: Path) -> None:
    result = evaluate(
        [(kriss / "time/low", kriss / "time/high"), (kriss / "line/noisy", kriss / "line/clean")],
        [],
        ids={"003"},
        nlm_h=20.0,
        progress=False,
    )
    assert result["nlm_h"] == 20.0 and result["nlm_h_tuned"] is False
    assert [p["image"] for p in result["pairs"]] == ["low/003", "noisy/003"]
    assert result["files"] == {}
    assert result["methods"]["nlm"]["psnr_db"] > result["methods"]["raw-ld"]["psnr_db"]


def test_no_selected_pairs_is_an_error(kriss: Path) -> None:
    with pytest.raises(DenoiseError, match="no LD/HD pairs selected"):
        evaluate([(kriss / "time/low", kriss / "time/high")], [], ids={"999"}, progress=False)
    with pytest.raises(DenoiseError, match="does not exist"):
        evaluate([(kriss / "nope", kriss / "time/high")], [], progress=False)


def test_model_rows(kriss: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from models.rrdbnet import build_generator
    from models.weights import ModelCard, load_model, save_model

    # A tiny random-initialised generator: the engine is under test, not the model.
    arch = {"num_feat": 4, "num_block": 1, "num_grow_ch": 4}
    path = save_model(
        build_generator(arch), tmp_path / "tiny.safetensors", ModelCard(name="tiny", arch={})
    )
    assert load_model(path)[1].name == "tiny"
    out = tmp_path / "eval"
    result = evaluate(
        [(kriss / "time/low", kriss / "time/high")],
        [path, path],
        ids={"004"},
        backend="cpu",
        out_dir=out,
        nlm_h=20.0,
        progress=False,
    )
    assert list(result["methods"]) == ["raw-ld", "nlm", "tiny", "tiny#2"]
    tiny = result["methods"]["tiny"]
    assert tiny["backend"] == "cpu" and tiny["model_path"] == str(path)
    # Same weights, same backend: the same numbers.
    for key in CSV_COLUMNS[2:]:
        assert result["methods"]["tiny#2"][key] == pytest.approx(tiny[key])
    assert np.isfinite(tiny["psnr_db"]) and -1.0 <= tiny["ssim"] <= 1.0
    _, rows = read_rows(out / "eval.csv")
    assert {r["method"] for r in rows} == {"raw-ld", "nlm", "tiny", "tiny#2"}
    figure = cv2.imread(str(out / "eval.png"), cv2.IMREAD_GRAYSCALE)
    assert figure is not None and figure.shape[1] == 5 * 192 + 6 * 4
