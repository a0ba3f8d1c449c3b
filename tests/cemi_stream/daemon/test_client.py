"""The command-line client (``start``, ``status``, ``stop``, ``resume``) against a real daemon."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cemi_stream.cli import build_parser
from cemi_stream.daemon.client import (
    NOT_OPTIONS,
    REPLAY_FIELDS,
    START_FIELDS,
    DaemonClient,
    options_from_args,
    wait_until_serving,
)
from cemi_stream.daemon.options import RunOptions
from cemi_stream.daemon.service import DAEMON_FILE, TOKEN_FILE
from cemi_stream.errors import DaemonError

REPO = Path(__file__).resolve().parents[3]
SOURCE = "sim:?rows=2&frames_per_row=4&frame_size=256x192&seed=5"
RUN_ID_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("no subcommands")


def cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "run_daemon.py", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout_s,
    )  # fmt: skip


def test_start_takes_every_replay_option_and_maps_it_to_a_run_option() -> None:
    replay = {a.dest for a in subcommand("replay")._actions}
    assert replay - set(REPLAY_FIELDS) - set(NOT_OPTIONS) == set(), "replay option not mapped"
    assert set(REPLAY_FIELDS.values()) | set(START_FIELDS.values()) <= {
        f for f in RunOptions.__dataclass_fields__
    }
    start = {opt for a in subcommand("start")._actions for opt in a.option_strings}
    for action in subcommand("replay")._actions:
        if action.dest not in ("out", "help"):
            assert set(action.option_strings) <= start, action.option_strings


def test_options_from_a_full_start_command_line(tmp_path: Path) -> None:
    (tmp_path / "frames").mkdir()
    args = build_parser().parse_args(
        ["start", str(tmp_path / "frames"), "--pace", "12.5", "--name", "tiles", "--keyframes",
         "off", "--pixel-size-um", "0.25", "--layout", "raster", "--levels", "full", "--grid",
         "3x2", "--order", "column", "--serpentine", "--overlap", "0.1,0.2", "--allow-predicted"]
    )  # fmt: skip
    sent = options_from_args(args)
    assert sent == {
        "source": str(tmp_path / "frames"), "pace": "12.5", "name": "tiles", "keyframes": "off",
        "pixel_size_um": 0.25, "layout": "raster", "levels": "full", "grid": "3x2",
        "order": "column", "serpentine": True, "overlap": "0.1,0.2", "allow_predicted": True,
    }  # fmt: skip
    # Exactly what the daemon validates: accepted as sent.
    options = RunOptions.from_mapping(json.loads(json.dumps(sent)), tmp_path)
    assert (options.grid, options.order, options.overlap) == ("3x2", "column", "0.1,0.2")
    # Defaults are left to the daemon.
    assert options_from_args(build_parser().parse_args(["start", "sim:"])) == {"source": "sim:"}


def test_no_daemon_gives_one_line_and_exit_2(tmp_path: Path) -> None:
    result = cli("status", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no daemon is running" in result.stderr
    # A daemon that stopped cleanly, and one that died (its port is closed).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = {"url": f"http://127.0.0.1:{port}", "pid": 1, "state": "stopped"}
    (tmp_path / DAEMON_FILE).write_text(json.dumps(info))
    result = cli("stop", "20261202T000000Z-abcdef", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "stopped" in result.stderr
    (tmp_path / DAEMON_FILE).write_text(json.dumps({**info, "state": "running"}))
    result = cli("start", "sim:", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"no daemon is answering at http://127.0.0.1:{port}" in result.stderr
    with pytest.raises(DaemonError, match="must start with http"):
        DaemonClient("127.0.0.1:8750")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, DaemonClient]]:
    data = tmp_path_factory.mktemp("client") / "data"
    data.mkdir()
    log = open(data.parent / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "run_daemon.py", "serve", "--port", "0", "--data-dir", str(data)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield data, wait_until_serving(data, timeout_s=60, pid=proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(90) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def without_ages(run: dict[str, Any]) -> dict[str, Any]:
    """A run object without its heartbeat ages (they change from one call to the next)."""
    out = json.loads(json.dumps(run))
    for stage in out.get("stages", {}).values():
        stage.pop("heartbeat_age_s", None)
    return out


def test_start_status_stop_through_the_command_line(
    daemon: tuple[Path, DaemonClient], tmp_path: Path
) -> None:
    data, client = daemon
    started = cli("start", SOURCE, "--pace", "max", "--name", "cli run", "--data-dir", str(data))
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip().splitlines()[-1]
    assert RUN_ID_RE.match(run_id), started.stdout
    deadline = time.monotonic() + 120
    while client.run(run_id)["state"] not in ("finished", "failed", "interrupted"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status = cli("status", run_id, "--json", "--data-dir", str(data))
    assert status.returncode == 0, status.stderr
    assert without_ages(json.loads(status.stdout)) == without_ages(client.run(run_id))
    assert json.loads(status.stdout)["state"] == "finished"
    human = cli("status", run_id, "--data-dir", str(data))
    assert f"run {run_id} (cli run): finished" in human.stdout and "placed 8" in human.stdout
    table = cli("status", "--data-dir", str(data))
    (line,) = [ln for ln in table.stdout.splitlines() if ln.startswith(run_id)]
    assert line.split()[1:3] == ["finished", "8"]
    # --url with --token-file reaches the same daemon.
    url = json.loads((data / DAEMON_FILE).read_text())["url"]
    stopped = cli("stop", run_id, "--url", url, "--token-file", str(data / TOKEN_FILE),
                  "--data-dir", str(tmp_path / "elsewhere"))  # fmt: skip
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"run {run_id}: finished"
    # A finished run cannot be resumed: the API's message, one line, exit 2.
    resumed = cli("resume", run_id, "--data-dir", str(data))
    assert resumed.returncode == 2 and "cannot resume a run that is finished" in resumed.stderr


def test_refusals_are_one_line_and_exit_2(
    daemon: tuple[Path, DaemonClient], tmp_path: Path
) -> None:
    data, _ = daemon
    bad = cli("start", "../../no-such-folder", "--data-dir", str(data))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "source" in bad.stderr and "'..' is not allowed" in bad.stderr
    # A local path that exists is sent absolute (its '..' resolved here), so the
    # daemon refuses it for being outside its data directory, not for the '..'.
    elsewhere = tmp_path / "elsewhere-frames"
    elsewhere.mkdir()
    relative = os.path.relpath(elsewhere, REPO)
    assert relative.startswith("..")
    outside = cli("start", relative, "--data-dir", str(data))
    assert outside.returncode == 2
    assert f"{elsewhere.resolve()} is outside the data directory" in outside.stderr
    unknown = cli("status", "20261202T000000Z-abcdef", "--data-dir", str(data))
    assert unknown.returncode == 2 and "no such run" in unknown.stderr
    wrong = tmp_path / "wrong-token"
    wrong.write_text("w" * 43)
    url = json.loads((data / DAEMON_FILE).read_text())["url"]
    refused = cli("status", "--url", url, "--token-file", str(wrong))
    assert refused.returncode == 2 and "wrong token" in refused.stderr
