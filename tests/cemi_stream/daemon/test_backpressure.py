"""A slow stitcher and a live device: the capture is never held back, and every frame a
live device delivers is either spooled or counted with its reason, one row each."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cemi_stream.daemon.options import RunOptions
from cemi_stream.daemon.supervisor import Supervisor

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

BASE = "sim:?rows=2&frames_per_row=20&frame_size=256x192&seed=4"
FRAMES = 40
SLOW_FPS = 4


def wait_done(sup: Supervisor, run_id: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = sup.get(run_id)
        if info["state"] in ("finished", "failed", "interrupted"):
            return info
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} not done after {timeout_s} s: {sup.get(run_id)}")


def decisions(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "capture.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def spool_table(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "frames.zarr" / "table.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def summary(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / f"{name}.json").read_text())["summary"]


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Supervisor]:
    s = Supervisor(tmp_path / "data", max_restarts=2)
    yield s
    s.shutdown(10)


def test_a_slow_stitcher_never_holds_back_a_live_capture(sup: Supervisor) -> None:
    """Stitcher throttled to 4 frames/s behind a 30 frames/s live device: the capture takes
    every frame far faster than the stitcher could (the spool absorbs the difference),
    none is lost, and the stitcher, fed from the spool, ends with the same positions as
    an unthrottled run.  (On a loaded machine the simulator itself renders below 30
    frames/s, hence the comparison with the stitcher's pace, not with the device's.)"""
    slow = sup.data_dir / "slow.toml"
    slow.write_text(f"[stitch]\nmax_fps = {SLOW_FPS}\n")
    reference = sup.start(RunOptions(source=BASE, pace="max"))
    assert wait_done(sup, reference)["state"] == "finished"
    run_id = sup.start(RunOptions(source=BASE + "&live=30", pace="native", config_file=str(slow)))
    info = wait_done(sup, run_id)
    assert info["state"] == "finished", info
    run_dir = Path(info["run_dir"])
    table = spool_table(run_dir)
    assert [int(r["src_index"]) for r in table] == list(range(FRAMES))  # spool intact
    # On the device's clock: 40 frames at 30 frames/s arrive over ~1.3 s (idle machine)...
    times = np.array([int(r["capture_time_ns"]) for r in table]) / 1e9
    captured_s = float(times[-1] - times[0])
    stitch = summary(run_dir, "stitch")
    # ... while the stitcher needs >= 9.75 s for them at 4 frames/s; held back to its
    # pace, the capture would span as long.
    paced_s = (FRAMES - 1) / SLOW_FPS
    assert stitch["frames"] == FRAMES and stitch["seconds"] >= 0.9 * paced_s
    assert captured_s < 0.6 * paced_s, f"the capture was held back: {captured_s:.2f} s"
    reasons = Counter(r["reason"] for r in decisions(run_dir))
    assert reasons["overrun"] == 0 and reasons["decimated"] == 0
    ref_dir = Path(sup.get(reference)["run_dir"])
    assert (run_dir / "positions.csv").read_text() == (ref_dir / "positions.csv").read_text()


def test_every_frame_a_live_device_delivers_is_spooled_or_counted(sup: Supervisor) -> None:
    """A 60 frames/s device captured at --pace 20, and a device far faster than the
    capture's keyframe selection: one decision row per device frame, and the drops by
    reason agree between capture.csv, capture.json and the stage statistics."""
    cases = {
        "decimated": (BASE + "&live=60", "20", FRAMES),
        "video": (
            "sim:?rows=1&frames_per_row=4&frame_size=512x384&video=1&live=2000&live_buffer=1",
            "native", None,
        ),
    }  # fmt: skip
    for name, (source, pace, n_frames) in cases.items():
        info = wait_done(sup, sup.start(RunOptions(source=source, pace=pace)))
        assert info["state"] == "finished", (name, info)
        run_dir = Path(info["run_dir"])
        rows = decisions(run_dir)
        indices = sorted(int(r["src_index"]) for r in rows)
        assert indices == list(range(len(indices))), f"{name}: a device frame has no row"
        if n_frames is not None:
            assert len(indices) == n_frames
        counted = Counter(r["reason"] for r in rows if r["kept"] == "0")
        capture = summary(run_dir, "capture")
        stats = json.loads((run_dir / "stats" / "capture.json").read_text())
        for reason in ("overrun", "decimated"):
            assert counted[reason] == capture["reasons"].get(reason, 0), (name, reason)
            assert counted[reason] == stats["dropped"].get(reason, 0), (name, reason)
        kept = sum(r["kept"] == "1" for r in rows)
        assert kept == capture["kept"] == len(spool_table(run_dir))
        assert summary(run_dir, "stitch")["frames"] == kept
        if name == "decimated":
            assert counted["decimated"] >= FRAMES // 4  # pace 20 of a 60 frames/s device
        print(f"{name}: {len(indices)} device frames, kept {kept}, dropped {dict(counted)}")
