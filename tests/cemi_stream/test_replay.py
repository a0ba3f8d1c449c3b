"""``replay`` as a client of the daemon's process code: its processes die with it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cemi_stream.errors import CemiError
from cemi_stream.replay import run_replay

REPO = Path(__file__).resolve().parents[2]
SOURCE = "sim:?rows=3&frames_per_row=6&frame_size=512x384&seed=5"


def live_processes(run_dir: Path, timeout_s: float) -> list[int]:
    """Processes marked ``CEMI_RUN_DIR=run_dir`` still alive after ``timeout_s``."""
    needle = f"CEMI_RUN_DIR={run_dir}".encode() + b"\0"
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = (entry / "environ").read_bytes() + b"\0"
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in env and state != "Z":
                found.append(int(entry.name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_no_stage_or_renderer_survives_a_killed_replay(tmp_path: Path) -> None:
    run_dir = (tmp_path / "run").resolve()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run_daemon.py"), "replay", SOURCE, "--out", str(run_dir),
         "-q"],
        cwd=REPO,
    )  # fmt: skip
    try:
        journal = run_dir / "stitch.journal"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        # capture (or its end), stitch and the stitcher's renderer are running
        assert len(live_processes(run_dir, 0.0)) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        left = live_processes(run_dir, 15.0)
        assert left == [], f"processes outlived replay: {left}"
        assert not (run_dir / "run.json").exists(), "replay was not killed mid-run"
    finally:
        proc.kill()


@pytest.mark.e2e
def test_a_failing_stage_fails_replay_with_its_last_error_line(tmp_path: Path) -> None:
    # A 2x2 grid for an 18-frame source: the stitcher stops on frame 4.
    with pytest.raises(CemiError, match=r"stitch process failed \(exit 2\): .*outside the 2x2"):
        run_replay(SOURCE, tmp_path / "run", progress=False, stitch_args=["--grid", "2x2"])
    assert not (tmp_path / "run" / "run.json").exists()
    assert live_processes((tmp_path / "run").resolve(), 10.0) == []
