"""The parent-death guard: real processes, killed with SIGKILL, leave no orphan."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cemi_stream.capture.stage import run_capture
from cemi_stream.config import load_config
from cemi_stream.daemon.lifecycle import PARENT_ENV, RUN_ENV, arm_parent_guard
from drivers.sim import SimConfig, write_simulation

REPO = Path(__file__).resolve().parents[3]


def marked_processes(marker: str) -> list[int]:
    """Pids of live processes whose environment has ``CEMI_RUN_DIR=marker`` (zombies excluded)."""
    needle = f"{RUN_ENV}={marker}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes() + b"\0"
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env and state != "Z":
            found.append(int(entry.name))
    return found


def wait_gone(marker: str, timeout_s: float) -> list[int]:
    """Wait until no marked process is left; returns those still alive at the timeout."""
    deadline = time.monotonic() + timeout_s
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def kill_marked(marker: str) -> None:
    for pid in marked_processes(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# A parent that spawns one guarded child (which sleeps), prints the child's pid, then waits.
_PARENT = textwrap.dedent(
    """
    import sys, time
    from cemi_stream.daemon.lifecycle import spawn
    child = spawn([sys.executable, "-c", sys.argv[1]], run_dir=sys.argv[2])
    print(child.pid, flush=True)
    time.sleep(600)
    """
)
_CHILD = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    from cemi_stream.daemon.lifecycle import RUN_ENV, arm_parent_guard
    assert arm_parent_guard(grace_s=5.0)
    Path(os.environ[RUN_ENV] + ".armed").touch()
    time.sleep(600)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_guarded_child_stops_when_its_parent_is_killed(tmp_path: Path) -> None:
    marker = str(tmp_path / "m1")
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, _CHILD, marker], stdout=subprocess.PIPE, cwd=REPO,
        text=True,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while not Path(marker + ".armed").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marked_processes(marker) == [child]
        t0 = time.monotonic()
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        left = wait_gone(marker, 5.0)
        assert left == [], f"orphans {left}"
        # The kernel's parent-death signal, not the 0.5 s watchdog poll alone.
        assert time.monotonic() - t0 < 3.0
    finally:
        parent.kill()
        kill_marked(marker)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_child_whose_parent_died_before_arming_stops_at_once(tmp_path: Path) -> None:
    marker = str(tmp_path / "m2")
    env = {**os.environ, PARENT_ENV: "999999999", RUN_ENV: marker}  # not our parent
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], env=env, cwd=REPO)
    try:
        assert proc.wait(20) == -signal.SIGTERM
    finally:
        proc.kill()


def test_nothing_is_armed_without_a_parent_to_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PARENT_ENV, raising=False)
    assert arm_parent_guard() is False


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_no_renderer_survives_a_killed_stitcher(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    write_simulation(
        SimConfig(rows=4, frames_per_row=8, frame_width=512, frame_height=384, seed=8), sim
    )
    run_dir = tmp_path / "run"
    config = load_config(overrides={"bus.pipes": [], "bus.monitor": False})
    run_capture(str(sim / "frames"), run_dir, config, progress=False)
    marker = str(run_dir)
    env = {**os.environ, RUN_ENV: marker}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run_daemon.py"), "stitch", "--run-dir", str(run_dir), "-q"],
        cwd=REPO, env=env,
    )  # fmt: skip
    try:
        journal = run_dir / "stitch.journal"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count("\n") >= 4:
                break
            time.sleep(0.01)
        # The stitch process and its renderer (a multiprocessing child) are both running.
        assert len(marked_processes(marker)) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        left = wait_gone(marker, 10.0)
        assert left == [], f"processes left after kill -9 of the stitcher: {left}"
        assert not (run_dir / "stitch.json").exists(), "the stitcher was not killed mid-run"
    finally:
        proc.kill()
        kill_marked(marker)
