"""CURVE on the tcp bus: key files, admitted and refused peers over real sockets."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.auth

from cemi_stream.bus.auth import (
    LOCAL_CLIENT,
    SERVER,
    CurveAuth,
    authorize,
    authorized_keys,
    ensure_keypair,
    generate_keypair,
    load_keypair,
    setup_keys,
)
from cemi_stream.bus.protocol import Kind
from cemi_stream.bus.transport import FrameLog, FrameReceiver, PipeSender, make_endpoints
from cemi_stream.config import BusConfig
from cemi_stream.errors import BusError, ConfigError
from cemi_stream.frame import Frame, FrameMeta

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_port_block(count: int = 8) -> int:
    """A base port with ``count`` consecutive free ports, below the ephemeral range.

    A run's bus binds ``port_base + i`` for each pipe; one free ephemeral port says
    nothing about its neighbours, which other sockets of the suite may hold.
    """
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000 - count)
        held = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no block of free ports found for the bus")


def test_key_files_modes_and_format(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    pair = generate_keypair(keys, "worker-1")
    secret_file, public_file = keys / "worker-1.key_secret", keys / "worker-1.key"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_file.stat().st_mode) == 0o644
    assert "secret" not in public_file.read_text().replace("cemi-stream", "")
    # ZeroMQ's own reader understands the files.
    assert zmq.auth.load_certificate(public_file) == (pair.public, None)
    assert zmq.auth.load_certificate(secret_file) == (pair.public, pair.secret)
    assert load_keypair(keys, "worker-1") == pair
    assert load_keypair(keys, "worker-1", secret=False).secret is None
    assert ensure_keypair(keys, "worker-1") == pair
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_keypair(keys, "worker-1")
    with pytest.raises(ConfigError, match="key name"):
        generate_keypair(keys, "../evil")


def test_bad_key_files_are_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keypair(keys, "a")
    os.chmod(keys / "a.key_secret", 0o640)
    with pytest.raises(ConfigError, match="accessible by others"):
        load_keypair(keys, "a")
    with pytest.raises(ConfigError, match="no such key file"):
        load_keypair(keys, "missing")
    other = generate_keypair(keys, "b")
    text = (keys / "a.key_secret").read_text()
    assert other.secret is not None
    mixed = text.splitlines()
    mixed[-1] = f'    secret-key = "{other.secret.decode()}"'
    (keys / "c.key_secret").write_text("\n".join(mixed))
    os.chmod(keys / "c.key_secret", 0o600)
    with pytest.raises(ConfigError, match="does not match"):
        load_keypair(keys, "c")
    (keys / "d.key").write_text('public-key = "short"\n')
    with pytest.raises(ConfigError, match="Z85"):
        load_keypair(keys, "d", secret=False)


def test_authorize(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    server, local = setup_keys(keys)
    assert authorized_keys(keys) == {local.public: LOCAL_CLIENT}
    assert server == load_keypair(keys, SERVER)
    remote = generate_keypair(tmp_path / "elsewhere", "remote")
    authorize(keys, "remote", remote.public)
    authorize(keys, "remote", remote.public)  # the same again: fine
    with pytest.raises(ConfigError, match="different key"):
        authorize(keys, "remote", local.public)
    assert authorized_keys(keys)[remote.public] == "remote"


def test_non_loopback_tcp_needs_curve(tmp_path: Path) -> None:
    with pytest.raises(BusError, match="needs CURVE"):
        make_endpoints(BusConfig(transport="tcp", host="0.0.0.0"), tmp_path)
    ok = make_endpoints(BusConfig(transport="tcp", host="0.0.0.0", curve_dir="k"), tmp_path)
    assert ok.pipes["stitch"].startswith("tcp://0.0.0.0:")
    make_endpoints(BusConfig(transport="tcp", host="localhost"), tmp_path)


def _frames(n: int) -> FrameLog:
    log = FrameLog(100)
    for i in range(n):
        log.append(Frame(np.full((16, 24), i, np.uint8), FrameMeta(i, i)))
    log.finish()
    return log


def _drain(receiver: FrameReceiver, timeout_s: float) -> list[int]:
    seqs: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = receiver.recv(100)
        if msg is None:
            continue
        if msg.kind is Kind.FRAME:
            seqs.append(msg.seq)
        elif msg.kind is Kind.END:
            break
    return seqs


def test_curve_pipe_admits_listed_clients_only(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    _, local = setup_keys(keys)
    stranger = generate_keypair(tmp_path / "stranger", "x")
    ctx: zmq.Context[Any] = zmq.Context()
    auth = CurveAuth(ctx, keys).start()
    url = f"tcp://127.0.0.1:{_free_port()}"
    config = BusConfig(hwm=8, drain_timeout_s=5.0, heartbeat_s=0.2)
    sender = PipeSender("curve", url, _frames(20), "run", config, ctx, auth=auth)
    server_key = auth.server.public
    try:
        # Peers that must get nothing: no CURVE at all, and an unknown key.
        plain = FrameReceiver(url)
        wrong = FrameReceiver(url, curve=(stranger, server_key))
        sender.start()
        sender.wait_bound()
        assert _drain(plain, 1.5) == [] and _drain(wrong, 0.5) == []
        good = FrameReceiver(url, curve=(local, server_key))
        assert _drain(good, 10.0) == list(range(20))
        for r in (plain, wrong, good):
            r.close()
        sender.join(10)
        assert not sender.is_alive() and sender.error is None
        assert sender.stats.sent == 20
        assert auth.refused["unknown_key"] >= 1 and auth.admitted >= 1
        refused = sender.stats.refused
        assert refused["auth_failed"] >= 1, refused
        assert refused["protocol_mismatch"] + refused["handshake_failed"] >= 1, refused
    finally:
        sender.abort()
        auth.stop()
        ctx.destroy(linger=0)


def test_reload_admits_a_new_client(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    setup_keys(keys)
    late = generate_keypair(tmp_path / "w", "late")
    ctx: zmq.Context[Any] = zmq.Context()
    with CurveAuth(ctx, keys) as auth:
        assert auth.callback("*", late.public) is False
        authorize(keys, "late", late.public)
        auth.reload()
        assert auth.callback("*", late.public) is True
        assert auth.refused["unknown_key"] == 1
    ctx.destroy(linger=0)


@pytest.mark.e2e
def test_replay_over_a_curve_tcp_bus(tmp_path: Path) -> None:
    """capture and stitch processes over tcp with CURVE: the run completes, keys are made."""
    keys = tmp_path / "keys"
    port = _free_port_block()
    cfg = tmp_path / "bus.toml"
    cfg.write_text(
        f'[bus]\ntransport = "tcp"\nport_base = {port}\nmonitor = false\ncurve_dir = "{keys}"\n'
    )
    run_dir = tmp_path / "run"
    source = "sim:?rows=1&frames_per_row=4&frame_size=128x96&seed=2"
    result = subprocess.run(
        [sys.executable, str(REPO / "run_daemon.py"), "replay", source, "--out", str(run_dir),
         "--config", str(cfg), "-q", "--allow-predicted"],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    bus = json.loads((run_dir / "bus.json").read_text())
    assert bus["server_key"] == load_keypair(keys, SERVER).public.decode()
    assert json.loads((run_dir / "stitch.json").read_text())["summary"]["frames"] == 4
    assert stat.S_IMODE((keys / "server.key_secret").stat().st_mode) == 0o600
