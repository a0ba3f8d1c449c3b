"""Warm spares: a real spare process handed a command line; a killed stage restarted from one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cemi_stream.daemon import standby
from cemi_stream.daemon.lifecycle import run_processes
from cemi_stream.daemon.options import RunOptions
from cemi_stream.daemon.supervisor import Supervisor

SOURCE = "sim:?rows=3&frames_per_row=6&frame_size=512x384&seed=5"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_handoff_args_only_for_this_interpreters_cemi_stream() -> None:
    assert standby.handoff_args([sys.executable, "-m", "cemi_stream", "stitch", "-q"]) == [
        "stitch",
        "-q",
    ]
    assert standby.handoff_args(["/other/python", "-m", "cemi_stream", "stitch"]) is None
    assert standby.handoff_args([sys.executable, "-c", "pass"]) is None


def test_a_spare_runs_the_command_it_is_handed(tmp_path: Path) -> None:
    log = tmp_path / "stage.stderr"
    with open(log, "w", encoding="utf-8") as err:
        spare = standby.start_spare("capture", err, tmp_path)
    assert spare is not None
    out = tmp_path / "sim"
    # A real command: write a small simulated capture; the spare exits with its status.
    args = ["simulate", "--out", str(out), "--rows", "1", "--frames-per-row", "2",
            "--frame-size", "128x96", "-q"]  # fmt: skip
    assert standby.hand_over(spare, args)
    assert spare.wait(60) == 0, log.read_text()
    assert len(list((out / "frames").glob("*.png"))) == 2 and (out / "ground_truth.csv").is_file()


def test_a_spare_exits_when_retired_or_given_garbage(tmp_path: Path) -> None:
    with open(tmp_path / "a.stderr", "w", encoding="utf-8") as err:
        spare = standby.start_spare("stitch", err, tmp_path)
        assert spare is not None
        t0 = time.monotonic()
        standby.retire(spare)
        assert spare.returncode == 0 and time.monotonic() - t0 < 10
        bad = standby.start_spare("stitch", err, tmp_path)
    assert bad is not None and bad.stdin is not None
    bad.stdin.write(b'{"argv": "not a list"}\n')
    bad.stdin.close()
    assert bad.wait(30) == 2
    assert "unusable command line" in (tmp_path / "a.stderr").read_text()
    assert run_processes(tmp_path) == []


def test_a_spare_dies_with_its_parent(tmp_path: Path) -> None:
    # A parent that starts a spare and is then killed -9: the spare must not stay.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cemi_stream.daemon import standby\n"
        f"s = standby.start_spare('denoise', sys.stderr, Path({str(tmp_path)!r}))\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    spare_pid = int(parent.stdout.readline())
    assert spare_pid in run_processes(tmp_path)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 15
    while run_processes(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run_processes(tmp_path) == []


@pytest.mark.e2e
def test_a_killed_stage_restarts_from_its_warm_spare(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "data", max_restarts=3, restart_window_s=60)
    try:
        run_id = sup.start(RunOptions(source=SOURCE, pace="4"))
        run_dir = sup.runs_dir / run_id
        deadline = time.monotonic() + 60
        spare_pid = None
        while time.monotonic() < deadline:
            st = sup.get(run_id)["stages"]["stitch"]
            if st["pid"] and st["spare_pid"]:
                old, spare_pid = st["pid"], st["spare_pid"]
                break
            time.sleep(0.05)
        assert spare_pid is not None, "no spare was started for the stitcher"
        os.kill(old, signal.SIGKILL)
        while time.monotonic() < deadline:
            st = sup.get(run_id)["stages"]["stitch"]
            if st["pid"] not in (None, old):
                break
            time.sleep(0.02)
        assert st["pid"] == spare_pid and st["restarts"] == 1
        while sup.get(run_id)["state"] not in ("finished", "failed") and (
            time.monotonic() < deadline + 60
        ):
            time.sleep(0.05)
        info = sup.get(run_id)
        assert info["state"] == "finished", info
        assert info["counts"]["placed"] == 18
        # Spares of finished stages are let go: nothing of the run is left.
        assert all(s["spare_pid"] is None for s in info["stages"].values())
        deadline = time.monotonic() + 10
        while run_processes(run_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run_processes(run_dir) == []
    finally:
        sup.shutdown(10)


def _niceness(pid: int) -> int:
    # /proc/PID/stat field 19 (after the command name in parentheses: index 16).
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@pytest.mark.e2e
def test_the_cpu_denoiser_of_a_run_yields_to_the_capture(tmp_path: Path) -> None:
    # DenoiseConfig.cpu_nice: the denoise stage process lowers its priority on
    # the CPU backend; the capture and the stitcher keep the daemon's.
    sup = Supervisor(tmp_path / "data", max_restarts=3, restart_window_s=60)
    try:
        run_id = sup.start(RunOptions(source=SOURCE, pace="4", denoise="cpu"))
        base = os.getpriority(os.PRIO_PROCESS, 0)
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 90
        while len(seen) < 3 and time.monotonic() < deadline:
            stages = sup.get(run_id)["stages"]
            for name in ("capture", "denoise", "stitch"):
                pid = stages[name]["pid"]
                if pid and name not in seen and (sup.runs_dir / run_id / "bus.json").exists():
                    with contextlib.suppress(OSError):
                        seen[name] = _niceness(pid)
            time.sleep(0.05)
        assert seen.get("capture") == base and seen.get("stitch") == base, seen
        assert seen.get("denoise") == min(base + 10, 19), seen
        sup.stop(run_id)
    finally:
        sup.shutdown(30)
