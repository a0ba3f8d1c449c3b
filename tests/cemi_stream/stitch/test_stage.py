"""End-to-end stitching: real capture and stitch processes, real Zarr on disk."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cemi_stream.capture.stage import run_capture
from cemi_stream.config import load_config
from drivers.sim import SimConfig, write_simulation

REPO = Path(__file__).resolve().parents[3]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "run_daemon.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
    )  # fmt: skip


def _positions(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "positions.csv") as f:
        return list(csv.DictReader(f))


def _errors(rows: list[dict[str, str]], truth: dict[int, tuple[float, float]]) -> np.ndarray:
    est = np.array([(float(r["x_px"]), float(r["y_px"])) for r in rows])
    tru = np.array([truth[int(r["src_index"])] for r in rows])
    diff = est - tru
    diff -= np.median(diff, axis=0)  # a mosaic is defined up to a translation
    return np.hypot(diff[:, 0], diff[:, 1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    config = SimConfig(rows=3, frames_per_row=5, frame_width=512, frame_height=384, seed=21)
    write_simulation(config, out)
    return out


@pytest.mark.e2e
def test_replay_of_an_image_folder_matches_ground_truth(folder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _cli("replay", str(folder / "frames"), "--out", str(run_dir), "-q")
    assert result.returncode == 0, result.stderr
    for name in ("mosaic.ome.zarr", "positions.csv", "run.json", "preview.png"):
        assert (run_dir / name).exists(), name
    with open(run_dir / "positions.csv") as f:
        assert f.readline().strip() == "seq,src_index,x_px,y_px,score,status"
    rows = _positions(run_dir)
    assert len(rows) == 15 and all(r["status"] == "placed" for r in rows)
    with open(folder / "ground_truth.csv") as f:
        truth = {
            int(r["src_index"]): (float(r["x_px"]), float(r["y_px"])) for r in csv.DictReader(f)
        }
    err = _errors(rows, truth)
    assert float(np.median(err)) <= 0.3 and float(err.max()) <= 1.0, err
    run = json.loads((run_dir / "run.json").read_text())
    assert run["counts"]["stitched"] == 15 and run["mosaic"]["layout"] == "raster"
    assert run["timings"]["stitch_frames_per_s"] > 0
    # Positions are level-0 array pixels: frame 0's pixels are where it says.
    level0 = zarr.open_array(str(run_dir / "mosaic.ome.zarr" / "0"), mode="r")
    x, y = (round(float(rows[0][k])) for k in ("x_px", "y_px"))
    patch = np.asarray(level0[y + 150 : y + 200, x + 150 : x + 200])
    assert patch.std() > 5  # specimen texture, not empty canvas


@pytest.mark.e2e
def test_mosaic_reads_back_with_ome_zarr_py(folder: Path, tmp_path: Path) -> None:
    ome_zarr = pytest.importorskip("ome_zarr", reason="ome-zarr-py is in the dev extra")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    run_dir = tmp_path / "run"
    assert _cli("replay", str(folder / "frames"), "--out", str(run_dir), "-q",
                "--pixel-size-um", "0.22").returncode == 0  # fmt: skip
    location = parse_url(str(run_dir / "mosaic.ome.zarr"))
    assert location is not None, f"ome-zarr {ome_zarr.__version__} cannot open the mosaic"
    nodes = list(Reader(location)())
    data = nodes[0].data
    assert (
        len(data) >= 2 and data[0].shape[0] > 384 and data[1].shape[0] == -(-data[0].shape[0] // 2)
    )
    axes = nodes[0].metadata["axes"]
    assert [a["name"] for a in axes] == ["y", "x"]
    assert all(a.get("unit") == "micrometer" for a in axes)
    scale = nodes[0].metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == pytest.approx([0.22, 0.22])


@pytest.mark.e2e
def test_replay_of_a_simulated_video_over_the_bus(tmp_path: Path) -> None:
    from drivers.sim import config_from_options, plan_traversal

    options = {"video": "1", "rows": "2", "frames_per_row": "4", "frame_size": "512x384",
               "noise": "ld", "seed": "4"}  # fmt: skip
    source = "sim:?" + "&".join(f"{k}={v}" for k, v in options.items())
    run_dir = tmp_path / "run"
    result = _cli("replay", source, "--out", str(run_dir), "-q")
    assert result.returncode == 0, result.stderr
    steps = plan_traversal(config_from_options(options))
    truth = {s.index: (s.x_px, s.y_px) for s in steps}
    rows = _positions(run_dir)
    assert len(rows) >= 8 and all(r["status"] == "placed" for r in rows)
    err = _errors(rows, truth)
    assert float(np.median(err)) <= 0.3 and float(err.max()) <= 1.0, err


@pytest.mark.e2e
def test_killed_stitcher_resumes_to_the_same_result(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    write_simulation(
        SimConfig(rows=4, frames_per_row=8, frame_width=512, frame_height=384, seed=8), sim
    )
    captured = tmp_path / "captured"
    config = load_config(overrides={"bus.pipes": [], "bus.monitor": False})
    run_capture(str(sim / "frames"), captured, config, progress=False)
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(captured, a)
    shutil.copytree(captured, b)

    assert _cli("stitch", "--run-dir", str(a), "-q").returncode == 0
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run_daemon.py"), "stitch", "--run-dir", str(b), "-q"], cwd=REPO
    )
    journal = b / "stitch.journal"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if journal.exists() and journal.read_text().count("\n") >= 6:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    done = journal.read_text().count("\n")
    assert 6 <= done < 32, "the stitcher was not killed mid-run"
    assert not (b / "stitch.json").exists()
    assert _cli("stitch", "--run-dir", str(b), "-q").returncode == 0
    summary = json.loads((b / "stitch.json").read_text())["summary"]
    assert summary["resumed_from"] >= 6
    assert _positions(a) == _positions(b)
    mosaic_a = zarr.open_array(str(a / "mosaic.ome.zarr" / "0"), mode="r")
    mosaic_b = zarr.open_array(str(b / "mosaic.ome.zarr" / "0"), mode="r")
    assert mosaic_a.shape == mosaic_b.shape
    assert np.array_equal(np.asarray(mosaic_a[:]), np.asarray(mosaic_b[:]))
