"""The live analysis stage: settled tiles, replay --analyze, resume from the journal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cemi_stream.analysis.live import JOURNAL, SLACK_PX, settled_tiles

REPO = Path(__file__).resolve().parents[3]
SOURCE = "sim:?rows=8&frames_per_row=10&frame_size=512x384&seed=8&pixel_size_nm=100"
W, H = 508, 413


def state(rendered: list[float], pending: list[float] | None, progress: list[float] | None
          ) -> dict[str, object]:  # fmt: skip
    return {"rendered_bbox": rendered, "pending_bbox": pending, "progress": progress}


def test_tiles_behind_the_pending_rows_are_settled_along_the_way_rows_advance() -> None:
    rendered = [128.0, 128.0, 3000.0, 1500.0]
    # Rows advance down (+y): pending frames from y = 1300; tiles must end 64 px above.
    down = settled_tiles(state(rendered, [128.0, 1300.0, 3000.0, 2000.0], [0.0, 1.0]), W, H)
    assert down and all((r + 1) * H <= 1300 - SLACK_PX for r, _ in down)
    assert {r for r, _ in down} == {0, 1}  # row 2 ends at 1239 > 1236
    assert {c for _, c in down} == set(range(6))  # x: 128..3000 -> columns 0..5
    # Rows advance up (-y): only tiles below the pending frames.
    up = settled_tiles(state([0.0, 800.0, 1000.0, 2100.0], [0.0, 0.0, 1000.0, 700.0],
                             [0.0, -1.0]), W, H)  # fmt: skip
    assert up and all(r * H >= 700 + SLACK_PX for r, _ in up)
    # Rows advance along +x (a column-wise traversal).
    right = settled_tiles(state([0.0, 0.0, 2000.0, 900.0], [1500.0, 0.0, 2500.0, 900.0],
                                [1.0, 0.0]), W, H)  # fmt: skip
    assert right and all((c + 1) * W <= 1500 - SLACK_PX for _, c in right)
    # Everything rendered and nothing pending: all rendered tiles.
    assert len(settled_tiles(state(rendered, None, None), W, H)) == 4 * 6
    # Pending frames but no direction known yet: nothing is safe.
    assert settled_tiles(state(rendered, [0.0, 0.0, 1.0, 1.0], None), W, H) == []
    assert settled_tiles({"rendered_bbox": None}, W, H) == []


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "run_daemon.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("live")
    # A stitcher held to 6 frames/s leaves the analysis stage time to work while
    # the traversal goes on, however loaded the machine is.
    config = base / "slow.toml"
    config.write_text("[stitch]\nmax_fps = 6.0\n[analysis]\nmaps_every_s = 1.0\n")
    out = base / "run"
    done = cli("replay", SOURCE, "--out", str(out), "--analyze", "--config", str(config), "-q")
    assert done.returncode == 0, done.stderr
    assert "analysis:" in done.stdout and "measured while stitching" in done.stdout
    return out


def test_replay_analyze_measures_tiles_while_stitching_and_equals_analyze(
    run_dir: Path, tmp_path: Path
) -> None:
    summary = json.loads((run_dir / "run.json").read_text())["analysis"]
    assert summary["measured_live"] > 0, summary
    assert summary["tiles"] == summary["valid_tiles"] == 30
    data = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert data["live"]["tiles_measured_live"] == summary["measured_live"]
    # The same numbers as the offline command on the finished mosaic, to the digit.
    done = cli("analyze", str(run_dir), "--out", str(tmp_path / "off"), "-q")
    assert done.returncode == 0, done.stderr
    assert (run_dir / "analysis" / "tiles.csv").read_text() == (
        tmp_path / "off" / "tiles.csv").read_text()  # fmt: skip
    for name in ("phase_fraction", "lamellar_fraction"):
        assert (run_dir / "analysis" / "maps" / f"mosaic_{name}.png").stat().st_size > 2000
    # The stage reported itself like every stage (heartbeat, counts).
    stats = json.loads((run_dir / "stats" / "analyze.json").read_text())
    assert stats["stage"] == "analyze"


def test_a_restarted_stage_carries_on_from_its_journal(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.sock"))
    final = (copy / "analysis" / "tiles.csv").read_text()
    for name in ("tiles.csv", "analysis.json"):
        (copy / "analysis" / name).unlink()
    journal = copy / "analysis" / JOURNAL
    lines = journal.read_text().splitlines()
    # a kill in the middle of a write leaves half a line: that tile is measured again
    journal.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    done = cli("analyze-stage", "--run-dir", str(copy), "-q")
    assert done.returncode == 0, done.stderr
    data = json.loads((copy / "analysis" / "analysis.json").read_text())
    assert data["live"]["tiles_measured_at_the_end"] == 1
    assert (copy / "analysis" / "tiles.csv").read_text() == final


def test_a_bad_analysis_setting_is_refused_before_anything_starts(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[analysis]\ntile = "5x5"\n')
    done = cli("replay", SOURCE, "--out", str(tmp_path / "r"), "--analyze", "--config",
               str(config), "-q")  # fmt: skip
    assert done.returncode == 2
    assert "analysis.tile" in done.stderr and done.stderr.count("\n") <= 2
    assert not (tmp_path / "r" / "frames.zarr").exists()
