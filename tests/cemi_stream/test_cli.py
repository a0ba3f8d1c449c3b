"""The command-line contract, run as a real subprocess the way users run it."""

from __future__ import annotations

import csv
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "run_daemon.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("simulate", ["--out", "--source", "--rows", "--frames-per-row", "--frame-size",
                      "--overlap", "--serpentine", "--noise", "--video"]),
        ("extract", ["SOURCE", "--out", "--overlap"]),
        ("capture", ["SOURCE", "--run-dir"]),
        ("tap", ["--run-dir", "--pipe"]),
        ("stitch", ["--run-dir", "--frames-dir", "--pixel-size-um", "--layout"]),
        ("replay", ["SOURCE", "--out", "--denoise", "--model", "--keyframes"]),
        ("denoise-stage", ["--run-dir", "--backend", "--model", "--batch"]),
        ("demo", ["--out"]),
    ],
)  # fmt: skip
def test_help_lists_the_contract_options(command: str, expected: list[str]) -> None:
    result = run(command, "--help")
    assert result.returncode == 0
    for option in expected:
        assert option in result.stdout


def _single_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.avi"
    _single_line_error(run("extract", str(missing), "--out", str(tmp_path / "o")), str(missing))
    fake = tmp_path / "fake.avi"
    fake.write_text("this is not a video\n")
    _single_line_error(run("extract", str(fake), "--out", str(tmp_path / "o2")), str(fake))
    _single_line_error(
        run("capture", "/dev/video99", "--run-dir", str(tmp_path / "r")), "/dev/video99"
    )
    _single_line_error(run("extract", "sim:?colour=red", "--out", str(tmp_path / "o3")), "colour")
    bad = tmp_path / "bad.toml"
    bad.write_text("[capture]\ncrop = 'auto'\nkeyframe = 1\n")
    _single_line_error(
        run("extract", "sim:", "--out", str(tmp_path / "o4"), "--config", str(bad)),
        "capture.keyframe",
    )
    _single_line_error(
        run("extract", "sim:", "--out", str(tmp_path / "o5"), "--crop", "1,2,3"), "crop"
    )
    result = run("extract", "sim:", "--out", str(tmp_path / "o6"), "--overlap", "1.5")
    assert result.returncode == 2 and "--overlap" in result.stderr
    assert not (tmp_path / "r").exists()  # nothing created for a source that never opened


def test_replay_denoise_options_fail_fast_in_one_line(tmp_path: Path) -> None:
    """Bad backend or model: one line, exit 2, before any process or folder is created."""
    out = tmp_path / "run"
    missing = tmp_path / "no-such-model.safetensors"
    result = run("replay", "sim:", "--out", str(out), "--denoise", "cpu", "--model", str(missing))
    _single_line_error(result, str(missing))
    assert result.returncode == 2
    result = run("replay", "sim:", "--out", str(out), "--denoise", "gpu")
    _single_line_error(result, "--denoise gpu", "cpu")
    assert result.returncode == 2
    result = run("replay", "sim:", "--out", str(out), "--model", "x")
    _single_line_error(result, "--model")
    assert not out.exists()


def test_simulate_then_extract_contract(tmp_path: Path) -> None:
    sim_dir = tmp_path / "sim"
    result = run(
        "simulate", "--out", str(sim_dir), "--rows", "2", "--frames-per-row", "4",
        "--frame-size", "320x240", "--overlap", "0.5", "--noise", "ld", "--video", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    videos = list(sim_dir.glob("video.*"))
    assert len(videos) == 1
    with open(sim_dir / "ground_truth.csv") as f:
        truth = list(csv.DictReader(f))
    assert list(truth[0]) == ["src_index", "row", "x_px", "y_px"]
    assert {int(r["row"]) for r in truth} == {0, 1}

    out = tmp_path / "keys"
    result = run("extract", str(videos[0]), "--out", str(out), "--overlap", "0.5", "-q")
    assert result.returncode == 0, result.stderr
    with open(out / "keyframes.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["src_index", "kept", "reason", "dx_px", "dy_px"]
    assert [int(r["src_index"]) for r in rows] == list(range(len(truth)))
    kept = [int(r["src_index"]) for r in rows if r["kept"] == "1"]
    pngs = sorted(p.name for p in (out / "frames").glob("*.png"))
    assert pngs == [f"{i:06d}.png" for i in kept]
    # In the same row, keyframes advance by about half a frame (320 px * 0.5).
    by_src = {int(r["src_index"]): r for r in truth}
    steps = [
        float(by_src[b]["x_px"]) - float(by_src[a]["x_px"])
        for a, b in itertools.pairwise(kept)
        if by_src[a]["row"] == by_src[b]["row"]
    ]
    assert steps and all(96 <= s <= 224 for s in steps), steps  # overlap 30..70 %
    # Refuses to overwrite what it wrote.
    again = run("extract", str(videos[0]), "--out", str(out), "-q")
    _single_line_error(again, "already holds frames")


def test_simulate_image_folder(tmp_path: Path) -> None:
    result = run(
        "simulate", "--out", str(tmp_path), "--rows", "1", "--frames-per-row", "3",
        "--frame-size", "128x96", "--serpentine", "--noise", "hd", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
    ]
