"""End-to-end capture: real processes, real sockets, real spool on disk."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cemi_stream.bus.protocol import Message
from cemi_stream.bus.tap import tap
from cemi_stream.capture.spool import SpoolReader
from cemi_stream.capture.stage import run_capture
from cemi_stream.config import load_config
from cemi_stream.errors import SpoolError

REPO = Path(__file__).resolve().parents[3]
SIM_VIDEO = "sim:?video=1&rows=2&frames_per_row=5&frame_size=512x384&noise=ld&seed=4&databar=1"


def _spawn_capture(source: str, run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "cemi_stream", "capture", source, "--run-dir", str(run_dir), "-q"]
    return subprocess.Popen([*cmd, *extra], cwd=REPO, stderr=subprocess.PIPE)


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.mark.e2e
def test_capture_process_publishes_every_spooled_frame(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _spawn_capture(SIM_VIDEO, run_dir)
    received: dict[int, str] = {}
    monitor: dict[str, object] = {}

    def on_frame(message: Message) -> None:
        assert message.frame is not None
        received[message.seq] = _digest(message.frame.image)

    mon = threading.Thread(target=lambda: monitor.update(tap(run_dir, "monitor", timeout_s=60)))
    mon.start()
    report = tap(run_dir, "stitch", timeout_s=60, on_frame=on_frame)
    _, err = proc.communicate(timeout=60)
    mon.join(60)
    assert proc.returncode == 0, err.decode()

    summary = json.loads((run_dir / "capture.json").read_text())["summary"]
    spool = SpoolReader(run_dir)
    assert report["ended"] and report["missing"] == 0 and not report["rejected"]
    assert report["frames"] == summary["kept"] == len(spool) == report["end_count"]
    assert summary["kept"] >= 8
    # What arrived is bit-identical to what is on disk, in order.
    assert sorted(received) == list(range(len(spool)))
    assert all(received[i] == _digest(spool.read(i).image) for i in range(len(spool)))
    # The data bar was found and stripped from every frame.
    assert summary["crop"]["databar_rows"] > 0
    assert spool.frame_shape[0] < 384 and spool.frame_shape[1] == 512
    # capture.csv: one line per input frame, seq numbers on the kept ones.
    lines = (run_dir / "capture.csv").read_text().splitlines()
    assert lines[0] == "src_index,kept,reason,dx_px,dy_px,seq"
    assert len(lines) - 1 == summary["frames_in"]
    seqs = [int(ln.split(",")[5]) for ln in lines[1:] if ln.split(",")[1] == "1"]
    assert seqs == list(range(len(spool)))
    # The lossy monitor saw the end too (it may have missed frames, never invented them).
    assert monitor["frames"] <= summary["kept"]  # type: ignore[operator]


@pytest.mark.e2e
def test_sigint_stops_cleanly_and_loses_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    source = "sim:?video=1&rows=1&frames_per_row=3&frame_size=256x192&noise=ld&seed=1"
    proc = _spawn_capture(source, run_dir, "--loop", "--pace", "40", "--drain-timeout", "5")
    got: list[int] = []
    tapper = threading.Thread(
        target=lambda: got.append(
            tap(run_dir, "stitch", timeout_s=60)["frames"]  # type: ignore[arg-type]
        )
    )
    tapper.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        csv = run_dir / "capture.csv"
        if csv.exists() and csv.read_text().count("\n") > 60:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    tapper.join(60)
    assert proc.returncode == 130, err.decode()
    summary = json.loads((run_dir / "capture.json").read_text())["summary"]
    assert summary["stopped_by"] == "stop_request"
    spool = SpoolReader(run_dir)
    assert got == [len(spool)] and len(spool) == summary["kept"] > 2
    assert spool.attrs.get("complete") is True


def _write_folder(folder: Path, n: int = 6) -> None:
    from drivers.sim import SimConfig, write_simulation

    write_simulation(
        SimConfig(rows=1, frames_per_row=n, frame_width=256, frame_height=192, seed=3), folder
    )


@pytest.mark.e2e
def test_image_folder_keeps_every_frame_and_rejects_faults(tmp_path: Path) -> None:
    sim_dir = tmp_path / "sim"
    _write_folder(sim_dir)
    frames = sim_dir / "frames"
    names = sorted(frames.iterdir())
    # Inject faults between the real fields: a blank, a saturated and a frozen frame.
    cv2.imwrite(str(frames / "000001a.png"), np.full((192, 256), 37, np.uint8))
    cv2.imwrite(str(frames / "000002a.png"), np.full((192, 256), 255, np.uint8))
    cv2.imwrite(str(frames / "000003a.png"), cv2.imread(str(names[3]), cv2.IMREAD_UNCHANGED))
    config = load_config(overrides={"bus.pipes": [], "bus.monitor": False})
    summary = run_capture(str(frames), tmp_path / "run", config, progress=False)
    assert summary.frames_in == 9
    assert summary.kept == 6
    assert summary.reasons == {"first": 1, "keep_all": 5, "blank": 1, "saturated": 1, "frozen": 1}
    assert len(SpoolReader(tmp_path / "run")) == 6


def test_late_consumer_still_gets_everything(tmp_path: Path) -> None:
    """Frames captured before any consumer connects wait in RAM or the spool."""
    sim_dir = tmp_path / "sim"
    _write_folder(sim_dir, n=5)
    run_dir = tmp_path / "run"
    config = load_config(
        overrides={"bus.monitor": False, "bus.drain_timeout_s": 20.0, "spool.memory_frames": 2}
    )
    result: list[object] = []
    capture = threading.Thread(
        target=lambda: result.append(
            run_capture(str(sim_dir / "frames"), run_dir, config, progress=False)
        )
    )
    capture.start()
    time.sleep(1.5)  # the capture has long finished reading; nobody listened
    report = tap(run_dir, "stitch", timeout_s=20)
    capture.join(30)
    assert report["frames"] == 5 and report["missing"] == 0 and report["ended"]
    assert result and result[0].pipes["stitch"]["undelivered"] == 0  # type: ignore[attr-defined]


def test_existing_spool_is_never_overwritten(tmp_path: Path) -> None:
    sim_dir = tmp_path / "sim"
    _write_folder(sim_dir, n=2)
    config = load_config(overrides={"bus.pipes": [], "bus.monitor": False})
    run_capture(str(sim_dir / "frames"), tmp_path / "run", config, progress=False)
    before = os.path.getmtime(tmp_path / "run" / "frames.zarr" / "table.csv")
    with pytest.raises(SpoolError, match="already exists"):
        run_capture(str(sim_dir / "frames"), tmp_path / "run", config, progress=False)
    assert os.path.getmtime(tmp_path / "run" / "frames.zarr" / "table.csv") == before
