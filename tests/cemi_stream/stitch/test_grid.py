"""Tile grids (--grid/--order/--serpentine/--overlap) and the loud end of a run:
a sparse 16-bit grid at small overlap, exit codes 0/3 and --allow-predicted, through
the real ``replay`` command."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from cemi_stream.errors import ConfigError
from cemi_stream.stitch.gridspec import GridSpec, grid_spec
from drivers.sim import SimConfig, write_simulation


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cemi_stream", *args], capture_output=True, text=True, timeout=300
    )


class _Opts:
    def __init__(self, grid: str | None, order: str = "row", serp: bool = False,
                 overlap: str | None = None) -> None:  # fmt: skip
        self.grid, self.order, self.serpentine, self.overlap = grid, order, serp, overlap


def test_grid_cells_in_the_four_numberings() -> None:
    assert [GridSpec(3, 2).cell(i) for i in range(6)] == [(0, 0), (1, 0), (2, 0), (0, 1),
                                                          (1, 1), (2, 1)]  # fmt: skip
    serp = GridSpec(3, 2, serpentine=True)
    assert [serp.cell(i) for i in range(6)] == [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (0, 1)]
    col = GridSpec(3, 2, order="column")
    assert [col.cell(i) for i in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert col.line(3) == 1
    spec = grid_spec(_Opts("5x4", "column", True, "0.1,0.06"))
    assert spec == GridSpec(5, 4, "column", True, 0.1, 0.06)
    with pytest.raises(ConfigError, match="outside the 3x2 grid"):
        GridSpec(3, 2).cell(6)


@pytest.mark.parametrize(
    ("opts", "match"),
    [(_Opts("5"), "COLSxROWS"), (_Opts("1x1"), "COLSxROWS"), (_Opts("5x4", "diagonal"), "order"),
     (_Opts("5x4", overlap="0.95"), "overlap"), (_Opts(None, overlap="abc"), "overlap")],
)  # fmt: skip
def test_bad_grid_options_are_refused(opts: _Opts, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        grid_spec(opts)


def _sparse_specimen(path: Path, rng: np.random.Generator) -> None:
    """Isolated particles on a flat background: most tile overlaps have nothing in them."""
    img = np.full((1400, 1800), 90.0, np.float32)
    for _ in range(500):
        x, y, r = rng.uniform(0, 1800), rng.uniform(0, 1400), rng.uniform(4, 14)
        cv2.circle(img, (int(x), int(y)), int(r), float(rng.uniform(170, 240)), -1)
        # A little inner structure, so that a particle pins its position.
        cv2.circle(img, (int(x + r / 3), int(y)), max(int(r / 3), 1), 60.0, -1)
    cv2.imwrite(str(path), cv2.GaussianBlur(img, (0, 0), 1.2).astype(np.uint8))


def test_sparse_16_bit_grid_at_small_overlap(tmp_path: Path) -> None:
    """A 5 x 4 column-numbered grid of 16-bit tiles (values ~200-1300), 8 % overlap."""
    rng = np.random.default_rng(3)
    _sparse_specimen(tmp_path / "specimen.png", rng)
    cols, rows, ov = 5, 4, 0.08
    sim = SimConfig(
        rows=rows, frames_per_row=cols, frame_width=384, frame_height=320, overlap=ov,
        noise="hd", seed=5, source=str(tmp_path / "specimen.png"), jitter_px=1.5,
        report_stage=False,
    )  # fmt: skip
    write_simulation(sim, tmp_path / "sim")
    truth = list(csv.DictReader((tmp_path / "sim" / "ground_truth.csv").read_text().splitlines()))
    folder = tmp_path / "tiles"
    folder.mkdir()
    cells = {}
    for t in truth:
        k = int(t["src_index"])
        col, row = k % cols, k // cols
        cells[(col, row)] = (float(t["x_px"]), float(t["y_px"]))
        grey = cv2.imread(str(tmp_path / "sim" / "frames" / f"{k:06d}.png"), cv2.IMREAD_GRAYSCALE)
        tile = (200 + grey.astype(np.float64) * (1100 / 255)).astype(np.uint16)
        # Numbered column by column, as the real grid that found the bug.
        cv2.imwrite(str(folder / f"tile_{col * rows + row:03d}.png"), tile)
    run = tmp_path / "run"
    result = _cli("replay", str(folder), "--out", str(run), "--grid", f"{cols}x{rows}",
                  "--order", "column", "--overlap", str(ov), "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "frames in" in result.stdout and "{" not in result.stdout  # a summary, no JSON dump
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["levels"]["window"] != [0, 65535]  # one narrow window, not /257
    positions = list(csv.DictReader((run / "positions.csv").read_text().splitlines()))
    assert len(positions) == cols * rows
    est, ref = [], []
    for p in positions:
        k = int(p["src_index"])
        col, row = divmod(k, rows)
        est.append((float(p["x_px"]), float(p["y_px"])))
        ref.append(cells[(col, row)])
    diff = np.array(est) - np.array(ref)
    err = np.hypot(*(diff - np.median(diff, axis=0)).T)
    assert float(err.max()) < 3.0, err  # no gross error, registered or predicted
    statuses = {p["status"] for p in positions}
    assert statuses <= {"placed", "predicted"}
    predicted = run_json["predicted"]
    assert all(p["reason"].startswith("grid:") for p in predicted)
    assert sum(p["status"] == "placed" for p in positions) >= cols * rows // 2


def test_mostly_unregistrable_run_exits_3_unless_allowed(tmp_path: Path) -> None:
    """Pure noise frames: nothing registers, and the run says so instead of exiting 0."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "noise"
    folder.mkdir()
    for k in range(6):
        cv2.imwrite(str(folder / f"{k:03d}.png"), rng.integers(0, 256, (256, 320), np.uint8))
    result = _cli("replay", str(folder), "--out", str(tmp_path / "a"), "-q")
    assert result.returncode == 3, result.stderr
    assert "warning:" in result.stderr and "--allow-predicted" in result.stderr
    assert (tmp_path / "a" / "mosaic.ome.zarr").is_dir()  # nothing captured is lost
    allowed = _cli("replay", str(folder), "--out", str(tmp_path / "b"), "--allow-predicted", "-q")
    assert allowed.returncode == 0, allowed.stderr
    assert "warning:" in allowed.stderr
    reasons = json.loads((tmp_path / "b" / "run.json").read_text())["predicted"]
    assert len(reasons) >= 5 and all(r["reason"] for r in reasons)
