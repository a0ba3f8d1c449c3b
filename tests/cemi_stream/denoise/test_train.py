"""Training loops on real KRISS pairs: L1, GAN, Neighbor2Neighbor, resume, config checks."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cemi_stream.capture.crop import detect_crop
from cemi_stream.denoise.data import NoisyPatches, PairPatches
from cemi_stream.denoise.losses import random_extractor
from cemi_stream.denoise.pairs import AlignedPair, load_aligned_pairs, load_gray
from cemi_stream.denoise.train import (
    TrainConfig,
    denoise_image,
    latest_checkpoint,
    load_video_frames,
    lr_at,
    read_train_log,
    run_training,
    train,
)
from cemi_stream.errors import ConfigError, DenoiseError
from models.rrdbnet import build_generator
from models.weights import load_model, model_hash

# One thread: on a machine shared with other busy processes, two threads of one
# small convolution wait for each other and run several times slower.
FAST = {"threads": 1, "val_every": 0, "checkpoint_every": 0}


@pytest.fixture(scope="module")
def kriss_time(data_dir: Path) -> tuple[Path, Path]:
    root = data_dir / "kriss-sem-pairs" / "time"
    return root / "low", root / "high"


@pytest.fixture(scope="module")
def real_pairs(kriss_time: tuple[Path, Path]) -> list[AlignedPair]:
    return load_aligned_pairs(*kriss_time, names={"001", "002", "003"})


def _losses(out_dir: Path) -> list[float]:
    return [e["loss"] for e in read_train_log(out_dir) if "loss" in e]


def _config(**kw: object) -> TrainConfig:
    base: dict[str, object] = {"batch": 2, "patch_px": 32, "iters": 6, "milestones": (), **FAST}
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


# --- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mode": "video"}, "mode 'video'"),
        ({"arch": "huge"}, "arch 'huge'"),
        ({"stage": "ssim"}, "stage 'ssim'"),
        ({"device": "tpu"}, "device 'tpu'"),
        ({"iters": 0}, "iters must be a positive integer"),
        ({"batch": 2.5}, "batch must be a positive integer"),
        ({"patch_px": 60}, "multiple of 8"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"milestones": (0.75, 0.5)}, "milestones"),
        ({"milestones": (1.5,)}, "milestones"),
        ({"gan_weight": -0.1}, "gan_weight"),
        ({"name": "../evil"}, "name"),
        ({"stage": "gan"}, "needs init"),
        ({"stage": "gan", "mode": "noisy", "init": Path("x.safetensors")}, "clean targets"),
    ],
)
def test_config_validation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)  # type: ignore[arg-type]


def test_config_defaults_follow_the_paper() -> None:
    config = TrainConfig()
    assert (config.lr, config.betas, config.batch, config.iters) == (1e-4, (0.9, 0.99), 18, 40_000)
    assert (config.l1_weight, config.perceptual_weight, config.gan_weight) == (1.0, 1.0, 0.1)
    assert json.loads(json.dumps(config.to_dict()))["betas"] == [0.9, 0.99]


def test_learning_rate_halves_at_the_milestones() -> None:
    config = TrainConfig(iters=100, milestones=(0.5, 0.75))
    assert [lr_at(config, i) for i in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5, 2.5e-5]
    )


@pytest.mark.realdata
def test_sampler_must_fit_the_config(real_pairs: list[AlignedPair], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="64 px patches"):
        train(_config(), PairPatches(real_pairs, 64), [], tmp_path, progress=False)
    noisy = NoisyPatches([p.ld for p in real_pairs], 32)
    with pytest.raises(ConfigError, match="has no clean targets"):
        train(_config(), noisy, [], tmp_path, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_refused(real_pairs: list[AlignedPair], tmp_path: Path) -> None:
    with pytest.raises(DenoiseError, match="no CUDA GPU"):
        train(_config(device="cuda"), PairPatches(real_pairs, 32), [], tmp_path, progress=False)


# --- training runs ------------------------------------------------------------------------


@pytest.mark.realdata
def test_l1_training_on_real_pairs_lowers_the_loss(
    kriss_time: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    path = run_training(
        out,
        pair_dirs=[kriss_time],
        train_ids="1-3",
        val_ids="4",
        arch="compact",
        iters=40,
        batch=4,
        patch_px=64,
        milestones=(),
        threads=1,
        val_every=20,
        checkpoint_every=0,
        command="cemi-stream train-denoiser --test",
        progress=False,
    )
    assert path == out / "semnet-compact.safetensors"
    losses = _losses(out)
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])

    model, card = load_model(path)
    assert card.iterations == 40
    assert card.training["mode"] == "pairs" and card.training["stage"] == "l1"
    assert card.training["train_ids"] == ["001", "002", "003"]
    assert card.training["val_ids"] == ["004"]
    assert card.training["command"] == "cemi-stream train-denoiser --test"
    assert str(kriss_time[0]) in card.training["data"][0]
    assert (card.training["batch"], card.training["patch_px"]) == (4, 64)
    vals = [e for e in read_train_log(out) if "val_psnr" in e]
    assert [e["iter"] for e in vals] == [20, 40]
    best = max(vals, key=lambda e: e["val_psnr"])
    assert card.metrics["best_iteration"] == best["iter"]
    assert card.metrics["val_psnr_db"] == pytest.approx(best["val_psnr"], abs=1e-3)
    # The saved model is the best one: it reproduces the best validation PSNR.
    (val_pair,) = load_aligned_pairs(*kriss_time, names={"004"})
    out_img = denoise_image(model, val_pair.ld, torch.device("cpu"))
    assert out_img.shape == val_pair.ld.shape and out_img.dtype == np.uint8
    mse = np.mean((out_img.astype(float) - val_pair.hd.astype(float)) ** 2)
    assert 10 * np.log10(255.0**2 / mse) == pytest.approx(best["val_psnr"], abs=1e-3)


@pytest.mark.realdata
def test_gan_stage_smoke(real_pairs: list[AlignedPair], tmp_path: Path) -> None:
    l1_path = train(
        _config(iters=2, name="l1"), PairPatches(real_pairs[:2], 32), [], tmp_path / "l1", False
    )
    config = _config(
        stage="gan", init=l1_path, iters=3, name="gan", disc_feat=8, checkpoint_every=3
    )
    path = train(
        config,
        PairPatches(real_pairs[:2], 32, seed=1),
        real_pairs[2:],
        tmp_path / "gan",
        progress=False,
        extractor=random_extractor(seed=0),
    )
    model, card = load_model(path)
    assert card.training["stage"] == "gan"
    assert card.training["init_sha256"] == model_hash(l1_path)
    assert card.training["loss"]["perceptual_features"] == "random-test-extractor"
    assert card.training["loss"]["gan"] == 0.1
    assert card.metrics["val_pairs"] == 1 and np.isfinite(card.metrics["val_psnr_db"])
    entries = [e for e in read_train_log(tmp_path / "gan") if "loss" in e]
    assert len(entries) == 3
    assert all(e["perceptual"] > 0 and e["d_real"] > 0 and e["d_fake"] > 0 for e in entries)
    assert (tmp_path / "gan" / "checkpoints" / "iter_0000003.d.safetensors").is_file()
    init_model, _ = load_model(l1_path)
    assert not torch.equal(model.conv_last.weight, init_model.conv_last.weight)


@pytest.mark.realdata
def test_resume_continues_from_the_latest_checkpoint(
    real_pairs: list[AlignedPair], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "resumed"
    train(_config(iters=6, checkpoint_every=3), PairPatches(real_pairs, 32), [], out, False)
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == "iter_0000006.json"
    with caplog.at_level(logging.INFO, logger="cemi_stream.denoise.train"):
        path = train(_config(iters=9, checkpoint_every=3), PairPatches(real_pairs, 32), [], out)
    assert "from iteration 6" in caplog.text
    entries = read_train_log(out)
    assert [e["iter"] for e in entries] == list(range(1, 10))
    assert load_model(path)[1].iterations == 9

    # The resumed run draws the same patches and takes the same steps as an
    # uninterrupted one.
    straight = tmp_path / "straight"
    train(_config(iters=9), PairPatches(real_pairs, 32), [], straight, False)
    np.testing.assert_allclose(_losses(out), _losses(straight), rtol=1e-4)


@pytest.mark.realdata
def test_resume_refuses_another_config(real_pairs: list[AlignedPair], tmp_path: Path) -> None:
    train(_config(iters=2, checkpoint_every=2), PairPatches(real_pairs, 32), [], tmp_path, False)
    with pytest.raises(ConfigError, match=r"different training run.*batch: 2 vs 4"):
        train(_config(iters=4, batch=4), PairPatches(real_pairs, 32), [], tmp_path, False)
    with pytest.raises(ConfigError, match="past iters 1"):
        train(_config(iters=1), PairPatches(real_pairs, 32), [], tmp_path, False)


@pytest.mark.realdata
def test_fine_tune_from_a_basicsr_checkpoint(real_pairs: list[AlignedPair], tmp_path: Path) -> None:
    torch.manual_seed(123)
    source = build_generator("compact")
    pth = tmp_path / "esrgan_compact.pth"
    torch.save({"params_ema": source.state_dict()}, pth)
    config = _config(iters=1, init=pth, lr=1e-6)
    path = train(config, PairPatches(real_pairs, 32), [], tmp_path / "ft", progress=False)
    model, card = load_model(path)
    assert card.training["init_format"] == "basicsr"
    # One Adam step moves each weight by about lr at most: still the source weights.
    for name, value in source.state_dict().items():
        assert torch.allclose(model.state_dict()[name], value, atol=1e-5), name


@pytest.mark.realdata
def test_init_with_another_arch_is_refused(real_pairs: list[AlignedPair], tmp_path: Path) -> None:
    pth = tmp_path / "paper.pth"
    torch.save(build_generator({"num_feat": 8, "num_block": 1}).state_dict(), pth)
    with pytest.raises(ConfigError, match="does not match"):
        train(_config(init=pth), PairPatches(real_pairs, 32), [], tmp_path / "x", False)


@pytest.mark.realdata
def test_noisy_mode_trains_with_neighbor2neighbor(
    kriss_time: tuple[Path, Path], tmp_path: Path
) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for number in ("001", "002"):
        os.symlink(kriss_time[0] / f"low_100ns_{number}.png", frames / f"f{number}.png")
    path = run_training(
        tmp_path / "n2n",
        mode="noisy",
        noisy_source=frames,
        pair_dirs=[kriss_time],
        val_ids="5",
        iters=3,
        batch=2,
        patch_px=32,
        progress=False,
        threads=1,
        val_every=0,
        checkpoint_every=0,
    )
    assert path.name == "n2n-compact.safetensors"
    _, card = load_model(path)
    assert card.training["loss"] == {"neighbor2neighbor": {"gamma": 2.0}}
    assert card.training["sampler"]["sampler"] == "NoisyPatches"
    assert card.training["val_ids"] == ["005"]
    assert card.metrics["best_iteration"] == 3


@pytest.mark.realdata
def test_hd_mode_trains_on_synthetic_pairs(kriss_time: tuple[Path, Path], tmp_path: Path) -> None:
    hd = tmp_path / "hd"
    hd.mkdir()
    os.symlink(kriss_time[1] / "high_30us_001.png", hd / "a.png")
    path = run_training(
        tmp_path / "out", mode="hd", hd_dir=hd, iters=2, batch=2, patch_px=32, progress=False,
        threads=1, val_every=0, checkpoint_every=0,
    )  # fmt: skip
    _, card = load_model(path)
    assert card.training["sampler"]["sampler"] == "SyntheticPatches"
    assert card.training["mode"] == "hd" and card.metrics.get("val_pairs") is None


@pytest.mark.realdata
def test_video_frames_are_read_grey_and_cropped(
    kriss_time: tuple[Path, Path], tmp_path: Path
) -> None:
    # Even height: the lossless codec (FFV1) keeps exact grey levels but drops an odd last row.
    frame = load_gray(kriss_time[0] / "low_100ns_001.png")[:470]
    video = tmp_path / "scan.avi"
    height, width = frame.shape
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"FFV1"), 5, (width, height))
    if not writer.isOpened():
        pytest.skip("OpenCV has no FFV1 writer here")
    for _ in range(4):
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    frames = load_video_frames(video, max_frames=2)
    assert len(frames) == 2
    assert frames[0].ndim == 2 and frames[0].dtype == np.uint8
    # The data bar and the frame border are stripped.
    expected = detect_crop(frame).rect.apply(frame)
    assert expected.shape[0] < height - 20
    np.testing.assert_array_equal(frames[0], expected)
    with pytest.raises(DenoiseError, match="cannot open"):
        load_video_frames(tmp_path / "missing.avi")
