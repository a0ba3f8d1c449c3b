"""Several denoise workers per run: real worker processes, real sockets, real spools."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from cemi_stream.bus.auth import SERVER, authorize, generate_keypair, load_keypair, setup_keys
from cemi_stream.capture.spool import SpoolReader
from cemi_stream.capture.stage import run_capture
from cemi_stream.config import load_config
from cemi_stream.daemon.stats import read_stats
from cemi_stream.denoise.stage import DENOISED_DIR, run_denoise_stage
from cemi_stream.errors import ConfigError

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[3]
SOURCE = "sim:?rows=1&frames_per_row=10&frame_size=128x96&seed=5&databar=0"


def _random_model(folder: Path) -> Path:
    import torch

    from models.rrdbnet import build_generator
    from models.weights import ModelCard, save_model

    torch.manual_seed(4)
    net = build_generator("compact")
    card = ModelCard(name="random", arch={}, training={}, iterations=0, metrics={}, created="")
    return save_model(net, folder / "random.safetensors", card)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _random_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished capture (raw spool only), the input of every denoise run here."""
    run_dir = tmp_path_factory.mktemp("raw") / "run"
    config = load_config(overrides={"bus.pipes": [], "bus.monitor": False})
    run_capture(SOURCE, run_dir, config, pace="max", progress=False)
    return run_dir


@pytest.fixture(scope="module")
def reference(model: Path, raw_run: Path) -> list[np.ndarray]:
    """The frames denoised in-process by the single-worker path."""
    from cemi_stream.denoise.infer import Denoiser

    denoiser = Denoiser(model, "cpu")
    return [denoiser.denoise(frame.image) for frame in SpoolReader(raw_run)]


def _copy_raw(raw_run: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-r", str(raw_run), str(dest)], check=True)
    return dest


def _config(model: Path, **overrides: Any) -> Any:
    base: dict[str, Any] = {
        "denoise.backend": "cpu", "denoise.model": str(model), "denoise.pipes": [],
        "bus.monitor": False, "denoise.batch": 4,
    }  # fmt: skip
    base.update(overrides)
    return load_config(overrides=base)


def _denoised(run_dir: Path) -> list[np.ndarray]:
    return [frame.image for frame in SpoolReader(run_dir / DENOISED_DIR)]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        # Same model, same backend, other processes: bit-identical or at most
        # one grey level off (thread counts change float summation order).
        diff = np.abs(x.astype(int) - y.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (i, diff.max())


def _worker_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == os.getpid() and b"cemi_stream.denoise.workers" in cmd:
            pids.append(int(entry))
    return pids


def test_two_local_workers_keep_order_and_every_frame(
    model: Path, raw_run: Path, reference: list[np.ndarray], tmp_path: Path
) -> None:
    run_dir = _copy_raw(raw_run, tmp_path / "run")
    config = _config(model, **{"denoise.workers": 2})
    garbage_sent = threading.Event()

    def inject_garbage() -> None:
        """Malformed messages straight into the pool's socket while it works."""
        sock_path = run_dir / DENOISED_DIR / "bus" / "workers.sock"
        deadline = time.monotonic() + 30
        while not sock_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        ctx: zmq.Context[Any] = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.connect(f"ipc://{sock_path}")
        tag = b"cemi-denoise/1"
        bad = [[b"junk"], [tag, b"result", b"x" * 8, b"h", b"p"], [tag, b"what"], [tag, b"result"]]
        for msg in bad:
            s.send_multipart(msg)
        garbage_sent.set()
        time.sleep(0.5)
        s.close(linger=0)
        ctx.term()

    injector = threading.Thread(target=inject_garbage)
    injector.start()
    summary = run_denoise_stage(run_dir, config, progress=False, wait_s=60)
    injector.join()
    assert garbage_sent.is_set()
    assert summary.frames == summary.denoised == 10
    _same(_denoised(run_dir), reference)
    # Both workers took part, and the counts add up.
    assert set(summary.workers) == {"local-0", "local-1"}, summary.workers
    assert sum(summary.workers.values()) == 10
    data = json.loads((run_dir / DENOISED_DIR / "denoise.json").read_text())["summary"]
    assert data["workers"] == summary.workers
    assert read_stats(run_dir)["denoise"]["workers"] == summary.workers
    assert not _worker_pids()  # the pool ended its workers


def test_a_killed_worker_loses_no_frame(
    model: Path, raw_run: Path, reference: list[np.ndarray], tmp_path: Path
) -> None:
    run_dir = _copy_raw(raw_run, tmp_path / "run")
    config = _config(model, **{"denoise.workers": 2, "denoise.batch": 2})
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = read_stats(run_dir).get("denoise", {})
            pids = _worker_pids()
            if stats.get("frames_out", 0) >= 2 and len(pids) == 2:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    summary = run_denoise_stage(run_dir, config, progress=False, wait_s=60)
    thread.join()
    assert killed, "the run ended before a worker could be killed"
    assert summary.frames == 10
    _same(_denoised(run_dir), reference)
    assert not _worker_pids()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_remote_worker_over_curve_tcp(
    model: Path, raw_run: Path, reference: list[np.ndarray], tmp_path: Path
) -> None:
    """A "remote" worker with its own admitted key; a stranger's worker gets no frame."""
    run_dir = _copy_raw(raw_run, tmp_path / "run")
    keys = tmp_path / "keys"
    setup_keys(keys)
    server_key = load_keypair(keys, SERVER).public.decode()
    remote_keys, stranger_keys = tmp_path / "remote-host", tmp_path / "stranger-host"
    authorize(keys, "remote", generate_keypair(remote_keys, "remote").public)
    generate_keypair(stranger_keys, "stranger")  # never admitted
    port = _free_port()
    config = _config(
        model, **{"denoise.listen": f"tcp://127.0.0.1:{port}", "bus.curve_dir": str(keys)}
    )

    def worker(name: str, key_dir: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "cemi_stream.denoise.workers", "--connect",
             f"tcp://127.0.0.1:{port}", "--model", str(model), "--backend", "cpu", "--name", name,
             "--keys", str(key_dir), "--key-name", name, "--server-key", server_key],
            cwd=REPO, stderr=subprocess.PIPE,
        )  # fmt: skip

    procs = [worker("stranger", stranger_keys), worker("remote", remote_keys)]
    try:
        summary = run_denoise_stage(run_dir, config, progress=False, wait_s=60)
        assert summary.workers == {"remote": 10}
        _same(_denoised(run_dir), reference)
        # The pool told its worker to stop; the stranger never got in and runs on.
        assert procs[1].wait(15) == 0
        assert procs[0].poll() is None
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(15)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"denoise\.workers"):
        load_config(overrides={"denoise.workers": 0})
    with pytest.raises(ConfigError, match=r"denoise\.listen"):
        load_config(overrides={"denoise.listen": "ipc:///tmp/x"})


def test_listen_off_loopback_needs_curve(model: Path, raw_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_raw(raw_run, tmp_path / "run")
    config = _config(model, **{"denoise.listen": f"tcp://0.0.0.0:{_free_port()}"})
    with pytest.raises(Exception, match="need CURVE"):
        run_denoise_stage(run_dir, config, progress=False, wait_s=5)
