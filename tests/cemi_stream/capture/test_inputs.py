"""Capture of real 16-bit, 12-bit, float and damaged inputs, written as real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cemi_stream.capture.spool import SpoolReader
from cemi_stream.capture.stage import run_capture
from cemi_stream.config import load_config
from cemi_stream.errors import SourceError

REPO = Path(__file__).resolve().parents[3]
TILE_H, TILE_W = 96, 128
GRID = 5  # 5 x 5 = 25 tiles


def texture(height: int, width: int, seed: int = 2) -> np.ndarray:
    """A smooth random micrograph-like field in 0..1, ``(y, x)`` float64."""
    rng = np.random.default_rng(seed)
    fine = cv2.GaussianBlur(rng.random((height, width)), (0, 0), 2.0)
    coarse = cv2.GaussianBlur(rng.random((height, width)), (0, 0), 9.0)
    field = fine + 3.0 * coarse
    return (field - field.min()) / (field.max() - field.min())


def tiles(low: float, high: float) -> list[np.ndarray]:
    """A 5 x 5 grid of overlapping tiles of one texture, values ``low..high`` (float64)."""
    step_y, step_x = TILE_H * 2 // 3, TILE_W * 2 // 3
    field = low + (high - low) * texture(step_y * (GRID - 1) + TILE_H, step_x * (GRID - 1) + TILE_W)
    return [
        field[r * step_y : r * step_y + TILE_H, c * step_x : c * step_x + TILE_W]
        for r in range(GRID)
        for c in range(GRID)
    ]


def write_png16(folder: Path, low: int = 200, high: int = 1300) -> Path:
    folder.mkdir(parents=True)
    for i, tile in enumerate(tiles(low, high)):
        assert cv2.imwrite(str(folder / f"tile_{i:03d}.png"), np.round(tile).astype(np.uint16))
    return folder


def capture(source: Path, run_dir: Path, levels: str | None = None) -> dict[str, object]:
    overrides: dict[str, object] = {"bus.pipes": [], "bus.monitor": False}
    if levels is not None:
        overrides["capture.levels"] = levels
    run_capture(str(source), run_dir, load_config(overrides=overrides), progress=False)
    return json.loads((run_dir / "capture.json").read_text())["summary"]  # type: ignore[no-any-return]


def csv_rows(run_dir: Path) -> list[list[str]]:
    lines = (run_dir / "capture.csv").read_text().splitlines()
    assert lines[0] == "src_index,kept,reason,dx_px,dy_px,seq"
    return [line.split(",") for line in lines[1:]]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cemi_stream", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
    )  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_narrow_16bit_folder_uses_the_whole_8bit_range(tmp_path: Path) -> None:
    folder = write_png16(tmp_path / "png16")
    summary = capture(folder, tmp_path / "run")
    assert summary["frames_in"] == summary["kept"] == 25
    assert "blank" not in summary["reasons"]  # type: ignore[operator]
    levels = summary["levels"]
    assert isinstance(levels, dict)
    assert (levels["mode"], levels["source"], levels["dtype"]) == ("auto", "percentiles", "uint16")
    # From the first row of tiles only (5 sample frames): inside the data's range, wide.
    low, high = levels["window"]
    assert 200 <= low < high <= 1300 and high - low > 600
    assert (levels["input_min"], levels["input_max"]) == (200, 1300)
    assert levels["sample_frames"] == 5
    spool = SpoolReader(tmp_path / "run")
    pixels = np.concatenate([spool.read(i).image.ravel() for i in range(len(spool))])
    assert pixels.dtype == np.uint8
    assert np.percentile(pixels, 1) < 40 and np.percentile(pixels, 99) > 215
    assert all(row[1] == "1" for row in csv_rows(tmp_path / "run"))


def test_levels_full_reproduces_the_old_blank_frames_with_a_clear_error(tmp_path: Path) -> None:
    folder = write_png16(tmp_path / "png16")
    with pytest.raises(SourceError) as err:
        capture(folder, tmp_path / "run", levels="full")
    message = str(err.value)
    expected = (
        "all 25 frames rejected as blank: the images are 16-bit with values 200..1300 of 65535"
    )
    assert expected in message, message
    assert message.endswith("try --levels auto or --levels 200,1300"), message
    summary = json.loads((tmp_path / "run" / "capture.json").read_text())["summary"]
    assert summary["reasons"] == {"blank": 25} and summary["error"] == message
    assert summary["levels"]["window"] == [0, 65535]
    # The same through the command line: one line, exit 2.
    line = one_error_line(
        cli("capture", str(folder), "--run-dir", str(tmp_path / "run2"), "--levels", "full",
            "--no-pipes", "--no-monitor", "-q")
    )  # fmt: skip
    assert line.startswith(f"error: {folder}: all 25 frames rejected as blank"), line
    assert "--levels auto or --levels 200,1300" in line


def test_explicit_levels_are_used_as_given(tmp_path: Path) -> None:
    folder = write_png16(tmp_path / "png16")
    summary = capture(folder, tmp_path / "run", levels="200,1300")
    assert summary["kept"] == 25
    assert summary["levels"]["window"] == [200, 1300]  # type: ignore[index]
    assert summary["levels"]["source"] == "explicit"  # type: ignore[index]
    first = SpoolReader(tmp_path / "run").read(0).image
    source = cv2.imread(str(folder / "tile_000.png"), cv2.IMREAD_UNCHANGED).astype(np.float64)
    expected = np.clip((source - 200) * 255 / 1100 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(first, expected)


@pytest.mark.parametrize("value", ["bright", "1300,200", "7"])
def test_bad_levels_values_fail_in_one_line_before_anything_starts(
    tmp_path: Path, value: str
) -> None:
    folder = write_png16(tmp_path / "png16")
    for command in (
        ["capture", str(folder), "--run-dir", str(tmp_path / "run")],
        ["extract", str(folder), "--out", str(tmp_path / "out")],
        ["replay", str(folder), "--out", str(tmp_path / "replay")],
    ):
        line = one_error_line(cli(*command, f"--levels={value}", "-q"))
        assert line.startswith(f"error: capture.levels (--levels) {value!r}:"), line
    assert not (tmp_path / "run").exists() and not (tmp_path / "replay" / "frames.zarr").exists()


def test_12bit_tiff_in_a_16bit_container_uses_its_declared_bits(tmp_path: Path) -> None:
    folder = tmp_path / "tif12"
    folder.mkdir()
    for i, tile in enumerate(tiles(300, 3500)):
        tifffile.imwrite(
            folder / f"t{i:02d}.tif",
            np.round(tile).astype(np.uint16),
            extratags=[(281, "H", 1, 4095, True)],  # MaxSampleValue: 12 significant bits
        )
    summary = capture(folder, tmp_path / "run")
    levels = summary["levels"]
    assert isinstance(levels, dict)
    assert (levels["source"], levels["window"], levels["significant_bits"]) == (
        "metadata", [0, 4095], 12,
    )  # fmt: skip
    assert summary["kept"] == 25


def test_float32_tiff_stack(tmp_path: Path) -> None:
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as writer:
        for tile in tiles(-0.2, 3.7):
            writer.write(tile.astype(np.float32))
    summary = capture(path, tmp_path / "run")
    levels = summary["levels"]
    assert isinstance(levels, dict)
    assert (levels["source"], levels["dtype"]) == ("percentiles", "float32")
    low, high = levels["window"]
    assert -0.21 <= low < high <= 3.71 and high - low > 2.0
    assert summary["kept"] == 25


def test_truncated_png_mid_folder_is_counted_as_corrupt_and_the_run_completes(
    tmp_path: Path,
) -> None:
    folder = write_png16(tmp_path / "png16")
    victim = folder / "tile_012.png"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    run_dir = tmp_path / "run"
    result = cli("capture", str(folder), "--run-dir", str(run_dir), "--no-pipes", "--no-monitor",
                 "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "tile_012.png" in result.stderr  # the warning names the file
    summary = json.loads((run_dir / "capture.json").read_text())["summary"]
    assert summary["frames_in"] == 25 and summary["kept"] == 24
    assert summary["reasons"]["corrupt"] == 1
    rows = csv_rows(run_dir)
    assert [int(r[0]) for r in rows] == list(range(25))
    assert rows[12][1:3] == ["0", "corrupt"] and rows[12][5] == ""
    assert len(SpoolReader(run_dir)) == 24
    assert "tile_012.png" in (run_dir / "capture.log").read_text()


def test_frame_of_another_size_mid_folder_is_size_changed(tmp_path: Path) -> None:
    folder = tmp_path / "png8"
    folder.mkdir()
    for i, tile in enumerate(tiles(10, 245)):
        image = np.round(tile).astype(np.uint8)
        if i == 7:
            image = cv2.resize(image, (TILE_W // 2, TILE_H // 2))
        cv2.imwrite(str(folder / f"f{i:02d}.png"), image)
    summary = capture(folder, tmp_path / "run")
    assert summary["frames_in"] == 25 and summary["kept"] == 24
    assert summary["reasons"]["size_changed"] == 1  # type: ignore[index]
    assert summary["levels"]["source"] == "8-bit"  # type: ignore[index]
    rows = csv_rows(tmp_path / "run")
    assert rows[7][1:3] == ["0", "size_changed"]
    spool = SpoolReader(tmp_path / "run")
    assert len(spool) == 24 and spool.frame_shape == (TILE_H, TILE_W)


def write_video(path: Path, frames: int = 30) -> None:
    field = np.round(10 + 235 * texture(TILE_H, TILE_W + 4 * frames)).astype(np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, (TILE_W, TILE_H),
                             isColor=False)  # fmt: skip
    for i in range(frames):
        writer.write(np.ascontiguousarray(field[:, 4 * i : 4 * i + TILE_W]))
    writer.release()


def test_damaged_video_keeps_what_decodes(tmp_path: Path) -> None:
    # FFmpeg conceals a damaged packet (the frame comes back with artefacts, or
    # not at all) and stops at a truncation; OpenCV reports neither.  What can be
    # checked: the run completes with every frame the decoder delivered, and a
    # file ending before its announced frame count is logged.
    path = tmp_path / "v.avi"
    write_video(path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = b"\x00" * 2000
    damaged = tmp_path / "damaged.avi"
    damaged.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(bytes(data[: len(data) * 3 // 4]))
    for source, least in ((damaged, 25), (truncated, 10)):
        run_dir = tmp_path / f"run-{source.stem}"
        summary = capture(source, run_dir)
        assert least <= summary["frames_in"] <= 30  # type: ignore[operator]
        assert summary["kept"] >= 1  # type: ignore[operator]
        assert len(csv_rows(run_dir)) == summary["frames_in"]
    log = (tmp_path / "run-truncated" / "capture.log").read_text()
    assert "frames its container announces (truncated file or broken packets)" in log


@pytest.mark.e2e
def test_replay_records_the_window_in_run_json(tmp_path: Path) -> None:
    folder = write_png16(tmp_path / "png16")
    out = tmp_path / "replay"
    result = cli("replay", str(folder), "--out", str(out), "--denoise", "off", "-q")
    assert result.returncode == 0, result.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["levels"]["source"] == "percentiles" and run["levels"]["dtype"] == "uint16"
    assert run["counts"]["frames_kept"] == 25
    assert "blank" not in run["counts"]["capture_reasons"]
