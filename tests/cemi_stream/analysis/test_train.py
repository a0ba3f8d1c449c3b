"""train-segmenter: tiny real runs on simulated specimens, folders and labelme files;
checkpoints, a resume that continues exactly, the card, and the refusals."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cemi_stream.analysis.labelme import encode_image
from cemi_stream.analysis.segment import load_segmenter
from cemi_stream.analysis.train import (
    SegTrainConfig,
    add_parser,
    cmd_train_segmenter,
    latest_checkpoint,
    main,
    mask_scores,
    read_train_log,
)
from cemi_stream.errors import AnalysisError, ConfigError
from models.unetpp import KIND, PHASE_KIND

TINY = ["--decoder-channels", "16,8,8", "--tile", "64", "--batch", "2", "--threads", "1", "-q"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["train-segmenter", *argv])
    args.argv = ["train-segmenter", *argv]
    return args


def sim_args(out: Path, epochs: int, *extra: str) -> argparse.Namespace:
    return parse(
        "--sim",
        "4",
        "--sim-size",
        "64",
        "--val-fraction",
        "0.5",
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        *TINY,
        *extra,
    )


def test_sim_run_writes_card_checkpoints_and_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert cmd_train_segmenter(sim_args(out, 1, "--name", "tiny")) == 0
    model = out / "tiny.safetensors"
    assert capsys.readouterr().out.strip() == str(model)
    card = json.loads((out / "tiny.json").read_text())
    assert card["kind"] == KIND and card["iterations"] == 2  # 4 crops, batch 2
    assert card["training"]["command"].startswith("python run_daemon.py train-segmenter --sim 4")
    assert card["training"]["data"] == {
        "source": "sim",
        "specimens": 4,
        "val_specimens": 2,
        "size_px": 64,
        "seed": 0,
    }
    assert card["training"]["loss"].startswith("dice") and card["training"]["tile_px"] == 64
    assert {"val_iou", "val_dice", "best_epoch"} <= set(card["metrics"])
    assert latest_checkpoint(out) == out / "checkpoints" / "epoch_0001.json"
    log = read_train_log(out)
    assert [e["step"] for e in log if "step" in e] == [1, 2]
    assert log[-1]["epoch"] == 1 and "val_iou" in log[-1]
    seg = load_segmenter(str(model))
    tile = np.random.default_rng(0).integers(0, 255, (70, 90), dtype=np.uint8)
    assert seg.predict(tile).shape == (70, 90)


def test_resume_continues_exactly_where_it_stopped(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cmd_train_segmenter(sim_args(straight, 2, "--name", "m"))
    cmd_train_segmenter(sim_args(resumed, 1, "--name", "m"))
    first = load_file(str(resumed / "checkpoints" / "epoch_0001.safetensors"))
    cmd_train_segmenter(sim_args(resumed, 2, "--name", "m"))  # resumes at epoch 1
    log = read_train_log(resumed)
    assert [e["step"] for e in log if "step" in e] == [1, 2, 3, 4]
    assert [e["epoch"] for e in log if "train_loss" in e] == [1, 2]
    a = load_file(str(straight / "checkpoints" / "epoch_0002.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "epoch_0002.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(first[k], b[k]) for k in first)  # it did train on
    # Other settings in the same folder are refused; fewer epochs than done too.
    with pytest.raises(ConfigError, match="different training run"):
        cmd_train_segmenter(sim_args(resumed, 3, "--name", "m", "--lr", "1e-3"))
    with pytest.raises(ConfigError, match="past --epochs"):
        cmd_train_segmenter(sim_args(resumed, 1, "--name", "m"))


def test_images_and_masks_and_labelme_sources(tmp_path: Path) -> None:
    from cemi_stream.analysis.lamellae import synthetic_lamellae

    images, masks, lm = tmp_path / "images", tmp_path / "masks", tmp_path / "labelme"
    for d in (images, masks, lm):
        d.mkdir()
    region = np.zeros((64, 96), bool)
    region[:, :48] = True
    for i in range(3):
        img, _ = synthetic_lamellae((64, 96), 8.0, 0.3 * i, region, seed=i)
        u8 = np.clip(img * 160 + 40, 0, 255).astype(np.uint8)
        cv2.imwrite(str(images / f"a{i}.png"), u8)
        cv2.imwrite(str(masks / f"a{i}_label.png"), region.astype(np.uint8) * 2)
        shape = {"label": "lamellar", "points": [[0, 0], [47, 63]], "shape_type": "rectangle"}
        (lm / f"a{i}.json").write_text(
            json.dumps({"shapes": [shape], "imageData": encode_image(u8), "imagePath": None})
        )
    out = tmp_path / "folders"
    cmd_train_segmenter(
        parse(
            "--images",
            str(images),
            "--masks",
            str(masks),
            "--mask-values",
            "2",
            "--out",
            str(out),
            "--epochs",
            "1",
            *TINY,
        )
    )
    card = json.loads((out / "lamellar-unetpp-small.json").read_text())
    data = card["training"]["data"]
    assert data["source"] == "images+masks" and len(data["val_images"]) == 1
    assert sorted(data["train_images"] + data["val_images"]) == ["a0", "a1", "a2"]
    out2 = tmp_path / "lm"
    cmd_train_segmenter(
        parse(
            "--labelme", str(lm), "--out", str(out2), "--epochs", "1", "--val-fraction", "0", *TINY
        )
    )
    card2 = json.loads((out2 / "lamellar-unetpp-small.json").read_text())
    assert card2["training"]["data"]["source"] == "labelme" and card2["metrics"] == {
        "train_loss_last_epoch": card2["metrics"]["train_loss_last_epoch"]
    }  # no validation
    other = tmp_path / "other"
    other.mkdir()
    cv2.imwrite(str(other / "b0.png"), region.astype(np.uint8))
    with pytest.raises(AnalysisError, match=r"a0\.png: no mask for it"):
        cmd_train_segmenter(
            parse(
                "--images", str(images), "--masks", str(other), "--out", str(tmp_path / "x"), *TINY
            )
        )


def test_phase_task_writes_a_phase_segmenter_with_named_validation(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        dark = rng.random((64, 64)) < 0.5
        u8 = np.where(dark, 60, 180).astype(np.uint8)
        cv2.imwrite(str(images / f"p{i}.png"), u8)
        cv2.imwrite(str(masks / f"p{i}_label.png"), dark.astype(np.uint8))
    out = tmp_path / "phase"
    base = ("--images", str(images), "--masks", str(masks), "--out", str(out), "--epochs", "1")
    cmd_train_segmenter(parse(*base, "--task", "phase", "--val-names", "p1", *TINY))
    card = json.loads((out / "phase-unetpp-small.json").read_text())
    assert card["kind"] == PHASE_KIND
    assert card["training"]["data"]["val_images"] == ["p1"]
    assert card["training"]["data"]["train_images"] == ["p0", "p2"]
    seg = load_segmenter(str(out / "phase-unetpp-small.safetensors"), kind=PHASE_KIND)
    assert seg.predict(np.zeros((64, 64), np.uint8) + 100).shape == (64, 64)
    with pytest.raises(ConfigError, match="--task phase: --sim and --weak make lamellar masks"):
        cmd_train_segmenter(sim_args(tmp_path / "s", 1, "--task", "phase"))
    with pytest.raises(ConfigError, match="--val-names: no image named zz"):
        cmd_train_segmenter(parse(*base, "--val-names", "zz", *TINY))


def test_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(AnalysisError, match="no CUDA GPU"):
            cmd_train_segmenter(sim_args(tmp_path / "c", 1, "--device", "cuda"))
    with pytest.raises(ConfigError, match="--sim 0: need at least one specimen"):
        cmd_train_segmenter(parse("--sim", "0", "--out", str(tmp_path / "s")))
    with pytest.raises(ConfigError, match="--loss l1: choose dice or dice"):
        SegTrainConfig(arch={"encoder": "x"}, loss="l1")
    with pytest.raises(ConfigError, match="--tile 100"):
        cmd_train_segmenter(parse("--sim", "2", "--out", str(tmp_path / "t"), "--tile", "100"))
    assert main(["--sim", "2", "--out", str(tmp_path / "u"), "--tile", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_mask_scores() -> None:
    a = np.zeros((4, 4), bool)
    b = a.copy()
    a[:2] = True
    b[1:3] = True
    s = mask_scores([a, np.zeros_like(a)], [b, np.zeros_like(b)])
    assert s["iou"] == pytest.approx(4 / 12) and s["dice"] == pytest.approx(8 / 16)
    assert s["mean_image_iou"] == pytest.approx((4 / 12 + 1) / 2)
