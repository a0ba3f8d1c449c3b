"""The denoiser's subcommands through ``run_daemon.py`` (real processes, real files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from cemi_stream.cli import main
from models.weights import load_model, read_card

REPO = Path(__file__).resolve().parents[3]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "run_daemon.py"), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )


def write_images(folder: Path, count: int, shape: tuple[int, int] = (64, 80)) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        name = f"img_{i + 1:03d}.png"
        cv2.imwrite(str(folder / name), rng.integers(0, 256, shape, dtype=np.uint8))
        names.append(name)
    return names


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A model trained for a few iterations through the command line on real pairs."""
    out = tmp_path_factory.mktemp("model")
    k = data_dir / "kriss-sem-pairs"
    code = main(
        ["train-denoiser", "--pairs", str(k / "time/low"), str(k / "time/high"),
         "--train-ids", "1-2", "--val-ids", "3", "--out", str(out), "--name", "cli-test",
         "--iters", "4", "--batch", "2", "--patch", "64", "--val-every", "2",
         "--checkpoint-every", "2", "--threads", "1", "-q"]
    )  # fmt: skip
    assert code == 0
    return out / "cli-test.safetensors"


def test_train_denoiser_writes_a_model_and_its_card(trained: Path) -> None:
    model, card = load_model(trained)
    assert card.iterations == 4 and card.name == "cli-test"
    assert card.arch["num_feat"] == 16  # compact by default
    assert "train-denoiser" in card.training["command"]
    assert "val_psnr_db" in card.metrics
    assert sum(p.numel() for p in model.parameters()) > 0
    assert read_card(trained).to_dict() == card.to_dict()


def test_denoise_command_keeps_names_and_sizes(trained: Path, tmp_path: Path) -> None:
    names = write_images(tmp_path / "in", 3)
    proc = run("denoise", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
               "--model", str(trained), "--backend", "cpu", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["count"] == 3 and summary["backend"] == "cpu"
    for name in names:
        out = cv2.imread(str(tmp_path / "out" / name), cv2.IMREAD_UNCHANGED)
        assert out is not None and out.shape == (64, 80) and out.dtype == np.uint8


def test_denoise_command_errors_are_one_line(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 1)
    proc = run("denoise", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
               "--model", str(tmp_path / "absent.safetensors"), "-q")  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "absent.safetensors" in lines[0], proc.stderr


def test_train_denoiser_refuses_a_bad_option(tmp_path: Path) -> None:
    folder = tmp_path / "hd"
    write_images(folder, 2)
    proc = run("train-denoiser", "--hd", str(folder), "--out", str(tmp_path / "m"),
               "--iters", "0", "-q")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --iters 0: must be positive"]


def test_eval_denoiser_command(trained: Path, data_dir: Path, tmp_path: Path) -> None:
    k = data_dir / "kriss-sem-pairs"
    proc = run("eval-denoiser", "--pairs", str(k / "time/low"), str(k / "time/high"),
               "--ids", "3", "--model", str(trained), "--nlm-h", "20",
               "--backend", "cpu", "--out", str(tmp_path / "ev"), "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    methods = json.loads(proc.stdout)
    assert set(methods) == {"raw-ld", "nlm", "cli-test"}
    header = (tmp_path / "ev" / "eval.csv").read_text().splitlines()[0]
    assert header == "image,method,psnr_db,ssim,dark_fraction_error_pp"
    assert (tmp_path / "ev" / "eval.png").is_file()
