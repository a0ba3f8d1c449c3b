"""``analyze`` end to end: a real run directory, images, a Dask cluster, the command line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cemi_stream.analysis.analyze import TILES_HEADER, Settings, analyze

REPO = Path(__file__).resolve().parents[3]
SOURCE = "sim:?rows=3&frames_per_row=10&frame_size=512x384&seed=8&pixel_size_nm=100"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "run_daemon.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("analyze") / "run"
    done = cli("replay", SOURCE, "--out", str(out), "-q")
    assert done.returncode == 0, done.stderr
    return out


def read_tiles(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_run_directory_through_the_command_line(run_dir: Path, tmp_path: Path) -> None:
    prop = tmp_path / "hardness.csv"
    prop.write_text("x_um,value,name\n" + "".join(
        f"{x},{3 + 0.001 * x},hardness\n" for x in range(30, 600, 45)))  # fmt: skip
    out = tmp_path / "out"
    done = cli("analyze", str(run_dir), "--out", str(out), "--tile", "254x206",
               "--property", str(prop), "-q")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "tiles/s" in done.stdout and done.stdout.count("\n") <= 6  # a summary, not a dump
    assert (out / "tiles.csv").read_text().splitlines()[0] == TILES_HEADER
    tiles = read_tiles(out / "tiles.csv")
    valid = [t for t in tiles if t["valid"] == "1"]
    assert len(valid) >= 0.5 * len(tiles)
    assert all(0.0 <= float(t["phase_fraction"]) <= 1.0 for t in valid)
    assert all(t["x_um"] and t["y_um"] for t in tiles)  # the mosaic knows its pixel size
    # The tile positions are centres in level-0 pixels, in the grid's order.
    first = tiles[0]
    assert (float(first["x_px"]), float(first["y_px"])) == (127.0, 103.0)
    assert float(first["x_um"]) == pytest.approx(12.7, abs=1e-3)
    for name in ("phase_fraction", "lamellar_fraction"):
        assert (out / "maps" / f"mosaic_{name}.png").stat().st_size > 2000
    assert (out / "profiles.png").is_file() and (out / "correlation.png").is_file()
    profiles = read_tiles(out / "profiles.csv")
    assert len(profiles) == max(int(t["col"]) for t in tiles) + 1
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["settings"]["tile_px"] == [254, 206] and summary["tiles"] == len(tiles)
    corr = json.loads((out / "correlation.json").read_text())["hardness"]
    assert corr["phase_fraction"]["n"] >= 5


def test_a_dask_cluster_gives_the_same_tiles(run_dir: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    local = analyze(run_dir, tmp_path / "threads", Settings(tile=(254, 206), progress=False))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:  # fmt: skip
        remote = analyze(run_dir, tmp_path / "cluster",
                         Settings(tile=(254, 206), scheduler=cluster.scheduler_address,
                                  progress=False))  # fmt: skip
    assert remote["tiles"] == local["tiles"]
    a = (tmp_path / "threads" / "tiles.csv").read_text()
    b = (tmp_path / "cluster" / "tiles.csv").read_text()
    assert a == b


def test_images_of_a_folder_each_their_own_grid(tmp_path: Path) -> None:
    import cv2

    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, frac in enumerate((0.2, 0.6)):
        img = np.full((413, 1016), 200, np.uint8)
        img[rng.random(img.shape) < frac] = 40
        cv2.imwrite(str(folder / f"im{k}.png"), cv2.GaussianBlur(img, (0, 0), 0.7))
    summary = analyze(folder, tmp_path / "out", Settings(segmenter="none", progress=False))
    assert [im["name"] for im in summary["images"]] == ["im0.png", "im1.png"]
    tiles = read_tiles(tmp_path / "out" / "tiles.csv")
    assert len(tiles) == 4 and {t["image"] for t in tiles} == {"im0.png", "im1.png"}
    assert all(t["lamellar_fraction"] == "" for t in tiles)  # --segmenter none
    assert all(t["x_um"] == "" for t in tiles)  # no pixel size for plain images


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--method", "magic"], "--method magic"), (["--phase", "grey"], "invalid choice"),
     (["--tile", "5x5"], "at least 16"), (["--scheduler", "lots"], "--scheduler lots"),
     (["--level", "7"], "no level 7"), (["--segmenter", "unet"], "--segmenter unet")],
)  # fmt: skip
def test_bad_settings_are_one_line_errors(run_dir: Path, tmp_path: Path, args: list[str],
                                          message: str) -> None:  # fmt: skip
    done = cli("analyze", str(run_dir), "--out", str(tmp_path / "o"), *args, "-q")
    assert done.returncode == 2, done.stderr
    assert (
        message in done.stderr and done.stderr.strip().count("\n") <= 1
    ) or "usage" in done.stderr
    missing = cli("analyze", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "-q")
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr


def test_schedulers_and_worker_counts_give_the_same_tiles(run_dir: Path, tmp_path: Path) -> None:
    # The mosaic is read tile by tile from its store; threads, processes and one
    # worker must agree to the digit, and auto resolves by the tile count.
    outs = {}
    for name, settings in {
        "auto": Settings(tile=(254, 206), progress=False),
        "one": Settings(tile=(254, 206), scheduler="threads", workers=1, progress=False),
        "procs": Settings(tile=(254, 206), scheduler="processes", workers=2, progress=False),
    }.items():
        summary = analyze(run_dir, tmp_path / name, settings)
        outs[name] = (tmp_path / name / "tiles.csv").read_text()
        if name == "auto":  # a few dozen tiles: not worth starting processes
            assert summary["settings"]["scheduler"] == "threads"
            assert summary["settings"]["scheduler_requested"] == "auto"
    assert outs["auto"] == outs["one"] == outs["procs"]


def test_zero_workers_is_a_one_line_error(run_dir: Path, tmp_path: Path) -> None:
    done = cli("analyze", str(run_dir), "--out", str(tmp_path / "o"), "--workers", "0", "-q")
    assert done.returncode == 2 and "--workers 0: must be >= 1" in done.stderr
