"""``serve``: the real daemon process, its data directory, token rules, runs and clean stop.

Every test here runs ``python run_daemon.py serve --port 0 --data-dir DIR`` as a
real process and talks to it over real HTTP (the real supervisor behind it
starts real stage processes on small ``sim:`` runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cemi_stream.daemon.client import DaemonClient, wait_until_serving
from cemi_stream.daemon.lifecycle import RUN_ENV
from cemi_stream.daemon.service import DAEMON_FILE, MIN_TOKEN_CHARS, TOKEN_FILE, is_loopback

REPO = Path(__file__).resolve().parents[3]
# 2 rows x 4 frames of 256 x 192: a run of a few seconds at --pace max.
SOURCE = "sim:?rows=2&frames_per_row=4&frame_size=256x192&seed=5"
FRAMES = 8
# The same traversal, longer: 3 rows x 6 frames, for runs that are stopped mid-way.
SLOW_SOURCE = "sim:?rows=3&frames_per_row=6&frame_size=256x192&seed=5"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]


class Daemon:
    """A ``serve`` process and a client of it."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(data_dir.parent / f"{data_dir.name}-serve.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "run_daemon.py", "serve", "--port", "0", "--data-dir",
             str(data_dir), *extra],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            self.client: DaemonClient = wait_until_serving(
                data_dir, timeout_s=60, pid=self.proc.pid
            )
        except Exception:
            self.close()
            raise
        info = json.loads((data_dir / DAEMON_FILE).read_text())
        self.url: str = info["url"]
        self.token = (data_dir / TOKEN_FILE).read_text().strip()
        self.http = httpx.Client(base_url=self.url, timeout=30, trust_env=False)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(path, headers=kw.pop("headers", self.auth), **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.post(path, headers=kw.pop("headers", self.auth), **kw)

    def wait_state(self, run_id: str, states: tuple[str, ...], timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.get(f"/api/runs/{run_id}").json()
            if info["state"] in states:
                return info
            time.sleep(0.1)
        raise AssertionError(f"run {run_id} still {info['state']} after {timeout_s} s")

    def terminate(self, timeout_s: float = 90.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(AttributeError):
            self.http.close()
        self.log.close()

    def serve_log(self) -> str:
        return (self.data_dir.parent / f"{self.data_dir.name}-serve.log").read_text()


def processes_under(data_dir: Path, timeout_s: float = 20.0) -> list[int]:
    """Live processes of runs under ``data_dir`` (their CEMI_RUN_DIR) after ``timeout_s``."""
    prefix = f"{RUN_ENV}={data_dir.resolve()}".encode()
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and any(v.startswith(prefix) for v in env):
                found.append(int(entry.name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def journal_lines(run_dir: Path) -> int:
    try:
        return (run_dir / "stitch.journal").read_text().count("\n")
    except OSError:
        return 0


def serve_fails(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "run_daemon.py", "serve", "--port", "0", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("svc") / "data")
    try:
        yield d
    finally:
        code = d.terminate()
        assert code == 0, d.serve_log()[-3000:]


def test_data_dir_layout_daemon_json_and_token(daemon: Daemon) -> None:
    info = json.loads((daemon.data_dir / DAEMON_FILE).read_text())
    assert info["pid"] == daemon.proc.pid and info["state"] == "running"
    assert info["port"] > 0 and info["url"] == f"http://127.0.0.1:{info['port']}"
    assert info["version"] and abs(info["started"] - time.time()) < 300
    token_stat = (daemon.data_dir / TOKEN_FILE).stat()
    assert stat.S_IMODE(token_stat.st_mode) == 0o600
    assert len(daemon.token) >= MIN_TOKEN_CHARS
    assert (daemon.data_dir / "runs").is_dir()
    health = daemon.get("/api/health").json()
    assert health["status"] == "ok" and health["pid"] == daemon.proc.pid
    # One daemon per data directory.
    second = serve_fails("--data-dir", str(daemon.data_dir))
    assert second.returncode == 2
    assert "another daemon" in second.stderr and f"pid {daemon.proc.pid}" in second.stderr
    assert json.loads((daemon.data_dir / DAEMON_FILE).read_text())["pid"] == daemon.proc.pid


def test_every_request_needs_the_token(daemon: Daemon) -> None:
    for method, path in (("GET", "/api/runs"), ("GET", "/api/health"), ("GET", "/metrics"),
                         ("POST", "/api/runs"), ("POST", "/api/runs/x/stop")):  # fmt: skip
        for headers in ({}, {"Authorization": "Bearer " + "0" * len(daemon.token)}):
            resp = daemon.http.request(method, path, headers=headers, json={"source": "sim:"})
            assert resp.status_code == 401, (method, path, resp.text)
            assert resp.json()["reason"] in ("missing_token", "bad_token")
    assert daemon.get("/api/runs").status_code == 200


def test_a_run_end_to_end_through_the_api(daemon: Daemon) -> None:
    resp = daemon.post("/api/runs", json={"source": SOURCE, "pace": "max", "name": "e2e"})
    assert resp.status_code == 201, resp.text
    run_id = resp.json()["id"]
    assert resp.json()["state"] in ("starting", "running")
    info = daemon.wait_state(run_id, ("finished", "failed", "interrupted"), 120)
    assert info["state"] == "finished", info
    run_dir = Path(info["run_dir"])
    assert run_dir == daemon.data_dir.resolve() / "runs" / run_id
    # Laid out as replay lays out a run.
    for name in ("frames.zarr", "capture.json", "positions.csv", "stitch.json",
                 "mosaic.ome.zarr", "preview.png"):  # fmt: skip
        assert (run_dir / name).exists(), name
    rows = (run_dir / "positions.csv").read_text().splitlines()[1:]
    placed = sum(1 for r in rows if r.endswith(",placed"))
    assert info["counts"]["placed"] == placed == FRAMES
    stitch = json.loads((run_dir / "stitch.json").read_text())["summary"]
    assert info["mosaic_shape"] == stitch["mosaic_shape"]
    assert set(info["stages"]) == {"capture", "stitch"}
    for stage in info["stages"].values():
        assert stage["state"] == "done" and stage["restarts"] == 0 and stage["pid"] is None
    assert info["stages"]["stitch"]["frames_out"] == FRAMES
    listed = {r["id"]: r for r in daemon.get("/api/runs").json()["runs"]}
    assert listed[run_id]["state"] == "finished" and listed[run_id]["name"] == "e2e"
    metrics = daemon.get("/metrics").text
    assert f'cemi_frames_processed_total{{run="{run_id}",stage="stitch"}} {FRAMES}.0' in metrics
    # A finished run cannot be resumed.
    again = daemon.post(f"/api/runs/{run_id}/resume")
    assert again.status_code == 409 and again.json()["reason"] == "conflict"


def test_a_run_stopped_midway(daemon: Daemon) -> None:
    resp = daemon.post("/api/runs", json={"source": SLOW_SOURCE, "pace": "3"})
    assert resp.status_code == 201, resp.text
    run_id = resp.json()["id"]
    deadline = time.monotonic() + 60
    while daemon.get(f"/api/runs/{run_id}").json()["counts"]["placed"] < 2:
        assert time.monotonic() < deadline, "no frame placed in 60 s"
        time.sleep(0.1)
    stopped = daemon.post(f"/api/runs/{run_id}/stop")
    assert stopped.status_code == 200 and stopped.json()["state"] in ("stopping", "finished")
    info = daemon.wait_state(run_id, ("finished", "failed", "interrupted"), 60)
    assert info["state"] == "finished" and "stop" in (info["reason"] or ""), info
    assert 2 <= info["counts"]["placed"] < 18
    assert processes_under(Path(info["run_dir"])) == []


def test_malformed_http_leaves_the_server_serving(daemon: Daemon) -> None:
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    garbage = [b"\x00\x01\x02\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
               b"POST /api/runs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
               b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
               b"POST /api/runs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
               b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n"]  # fmt: skip
    for data in garbage * 5:
        with (
            socket.create_connection((host, int(port)), timeout=10) as s,
            contextlib.suppress(OSError),
        ):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            s.recv(4096)
    # Oversized and malformed requests over real HTTP: 4xx, never 5xx.
    big = daemon.post("/api/runs", content=b"{" * (1 << 20))
    assert big.status_code == 413
    for body in (b"{", b"[]", b'{"source": "../../etc"}', b'{"source": "sim:", "x": 1}'):
        resp = daemon.post("/api/runs", content=body)
        assert 400 <= resp.status_code < 500, resp.text
    assert daemon.get("/api/health").json()["status"] == "ok"
    assert daemon.proc.poll() is None


def test_public_read_and_the_host_rules(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "pub", "--public-read")
    try:
        assert d.http.get("/api/runs").status_code == 200
        assert d.http.get("/api/health").json()["public_read"] is True
        assert d.http.get("/metrics").status_code == 200
        resp = d.http.post("/api/runs", json={"source": SOURCE})
        assert resp.status_code == 401 and resp.json()["reason"] == "missing_token"
    finally:
        assert d.terminate() == 0
    # Off loopback, reads without a token are refused before anything starts.
    assert not is_loopback("0.0.0.0") and is_loopback("::1") and is_loopback("localhost")
    refused = serve_fails("--host", "0.0.0.0", "--public-read", "--data-dir", str(tmp_path / "n"))
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --host 0.0.0.0: not a loopback address"), refused.stderr
    assert not (tmp_path / "n" / TOKEN_FILE).exists()


def test_weak_or_exposed_tokens_refuse_to_start(tmp_path: Path) -> None:
    weak = tmp_path / "weak"
    weak.mkdir()
    (weak / TOKEN_FILE).write_text("secret\n")
    os.chmod(weak / TOKEN_FILE, 0o600)
    result = serve_fails("--data-dir", str(weak))
    assert result.returncode == 2 and "at least 32" in result.stderr, result.stderr
    exposed = tmp_path / "exposed"
    exposed.mkdir()
    (exposed / TOKEN_FILE).write_text("k" * 40 + "\n")
    os.chmod(exposed / TOKEN_FILE, 0o644)
    result = serve_fails("--data-dir", str(exposed))
    assert result.returncode == 2 and "chmod 600" in result.stderr, result.stderr
    assert not (exposed / DAEMON_FILE).exists()


def test_sigterm_stops_the_runs_then_the_daemon(tmp_path: Path) -> None:
    data = tmp_path / "term"
    d = Daemon(data)
    try:
        run_id = d.post("/api/runs", json={"source": SLOW_SOURCE, "pace": "2"}).json()["id"]
        deadline = time.monotonic() + 60
        while d.get(f"/api/runs/{run_id}").json()["counts"]["placed"] < 1:
            assert time.monotonic() < deadline, "no frame placed in 60 s"
            time.sleep(0.1)
        pids = [s["pid"] for s in d.get(f"/api/runs/{run_id}").json()["stages"].values()]
        assert all(isinstance(p, int) for p in pids)
    finally:
        t0 = time.monotonic()
        code = d.terminate()
    assert code == 0, d.serve_log()[-3000:]
    assert time.monotonic() - t0 < 60
    assert processes_under(data, timeout_s=5) == []
    info = json.loads((data / DAEMON_FILE).read_text())
    assert info["state"] == "stopped" and info["stopped"] >= info["started"]
    # A new daemon lists the earlier run from its run directory.
    again = Daemon(data)
    try:
        run = again.get(f"/api/runs/{run_id}").json()
        assert run["state"] in ("finished", "interrupted"), run
        assert [r["id"] for r in again.get("/api/runs").json()["runs"]] == [run_id]
    finally:
        assert again.terminate() == 0


def test_kill_9_of_the_daemon_stops_its_stages_and_resume_completes_the_run(
    tmp_path: Path,
) -> None:
    data = tmp_path / "kill"
    d = Daemon(data)
    try:
        run_id = d.post("/api/runs", json={"source": SLOW_SOURCE, "pace": "max"}).json()["id"]
        run_dir = data / "runs" / run_id
        # Killed once the capture has finished and the stitcher is on its way (as the
        # supervisor's own test does: the capture stage does not resume mid-stream yet).
        deadline = time.monotonic() + 120
        while not ((run_dir / "capture.json").exists() and journal_lines(run_dir) >= 3):
            assert time.monotonic() < deadline, "capture not finished after 120 s"
            time.sleep(0.01)
        d.proc.kill()
        d.proc.wait()
    finally:
        d.close()
    assert processes_under(data, timeout_s=20) == []
    again = Daemon(data)
    try:
        run = again.get(f"/api/runs/{run_id}").json()
        assert run["state"] == "interrupted", run
        resumed = again.post(f"/api/runs/{run_id}/resume")
        assert resumed.status_code == 200, resumed.text
        info = again.wait_state(run_id, ("finished", "failed", "interrupted"), 120)
        assert info["state"] == "finished", info
        assert info["counts"]["placed"] == 18
    finally:
        assert again.terminate() == 0
    assert processes_under(data, timeout_s=5) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs as the daemon's data directory (needs the right to mount)."""
    data = tmp_path / "data"
    data.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(data)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip() or 'not root'}")
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_a_full_disk_fails_the_run_clearly_and_the_daemon_serves_on(small_disk: Path) -> None:
    """Frames of 512 x 384 (~190 kB each) overflow 48 MiB: the stage that hits the full disk
    fails the run at once (no restart loop), with the reason; what was spooled and
    journaled reads back whole; the daemon goes on answering, and refuses a new run
    (507) while the disk is full."""
    from cemi_stream.capture.spool import SpoolReader
    from cemi_stream.stitch.journal import read_journal

    d = Daemon(small_disk)
    try:
        created = d.post(
            "/api/runs",
            json={"source": "sim:?rows=6&frames_per_row=80&frame_size=512x384&seed=3",
                  "pace": "max"},
        )  # fmt: skip
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        info = d.wait_state(run_id, ("finished", "failed", "interrupted"), 120)
        assert info["state"] == "failed", info
        assert "No space left on device" in info["reason"], info["reason"]
        assert "gave up" not in info["reason"]  # failed at once, not after restarts
        culprit = next(s for s in info["stages"].values() if s["state"] == "failed")
        assert culprit["restarts"] == 0 and "No space left" in culprit["last_error"]
        # The spool and the journal are consistent: every spooled frame reads back,
        # every committed placement is of a spooled frame, in order.
        run_dir = Path(info["run_dir"])
        spool = SpoolReader(run_dir)
        assert 0 < len(spool) < 480
        for seq in range(len(spool)):
            assert spool.image(seq).shape == (384, 512)
        placements = read_journal(run_dir)
        assert [p.seq for p in placements] == list(range(len(placements)))
        assert len(placements) <= len(spool)
        # Still serving, reads and writes answered with a reason.
        assert d.get("/api/health").status_code == 200
        assert d.get(f"/api/runs/{run_id}").json()["state"] == "failed"
        again = d.post("/api/runs", json={"source": SOURCE, "pace": "max"})
        assert again.status_code == 507, again.text
        assert "MiB free, a run needs at least 32 MiB" in again.json()["error"]
        assert d.proc.poll() is None
        assert processes_under(small_disk) == []
    finally:
        code = d.terminate()
    assert code == 0, d.serve_log()[-3000:]
