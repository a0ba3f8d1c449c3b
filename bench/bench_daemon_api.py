"""Control API latency while a run streams: 100 status requests/s against the real daemon.

Starts ``run_daemon.py serve --port 0`` on a temporary data directory, starts
a run through the API (a virtual-SEM traversal of 1024 x 768 frames at a
fixed pace, so that it streams for the whole measurement: capture, bus and
stitcher busy), then sends ``GET /api/runs/{id}`` at a fixed rate (open loop:
request *i* is due at ``t0 + i / rate``, sent by a pool of client threads
with keep-alive connections), plus ``GET /api/runs`` and ``GET /metrics``
once a second.  Latency is measured from the moment each request is sent to
its full answer.  Target: p99 < 50 ms at 100 requests/s.  Writes
``bench/results/daemon_api.json``.

Usage: ``python -m bench.bench_daemon_api [--rate 100] [--seconds 20]``
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import write_result
from cemi_stream.daemon.client import wait_until_serving
from cemi_stream.daemon.service import DAEMON_FILE, TOKEN_FILE

REPO = Path(__file__).resolve().parents[1]


def percentiles(ms: list[float]) -> dict[str, Any]:
    if not ms:
        return {"n": 0}
    a = np.asarray(ms)
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p90_ms": round(float(np.percentile(a, 90)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "max_ms": round(float(a.max()), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=100.0, help="status requests per second")
    ap.add_argument("--seconds", type=float, default=20.0, help="measurement length")
    ap.add_argument("--threads", type=int, default=8, help="client threads")
    ap.add_argument("--frame-size", default="1024x768")
    args = ap.parse_args()

    frames_per_row = 12
    # Paced so the run outlasts the measurement (3 rows; warm-up included).
    pace = 3 * frames_per_row / (args.seconds + 15.0)
    source = f"sim:?rows=3&frames_per_row={frames_per_row}&frame_size={args.frame_size}&seed=3"
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "run_daemon.py", "serve", "--port", "0", "--data-dir", str(data)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_until_serving(data, timeout_s=60, pid=proc.pid)
            url = json.loads((data / DAEMON_FILE).read_text())["url"]
            headers = {"Authorization": f"Bearer {(data / TOKEN_FILE).read_text().strip()}"}
            with httpx.Client(base_url=url, headers=headers, trust_env=False, timeout=30) as c:
                resp = c.post("/api/runs", json={"source": source, "pace": f"{pace:.3f}"})
                resp.raise_for_status()
                run_id = resp.json()["id"]
                # Warm-up: until the stitcher has placed a frame (stages up and streaming).
                deadline = time.monotonic() + 120
                while c.get(f"/api/runs/{run_id}").json()["counts"]["placed"] < 1:
                    if time.monotonic() > deadline:
                        raise SystemExit("no frame placed after 120 s")
                    time.sleep(0.1)
                result = measure(url, headers, run_id, args)
                during = c.get(f"/api/runs/{run_id}").json()
                c.post(f"/api/runs/{run_id}/stop")
                deadline = time.monotonic() + 120
                while c.get(f"/api/runs/{run_id}").json()["state"] in (
                    "starting", "running", "stopping",
                ):  # fmt: skip
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                final = c.get(f"/api/runs/{run_id}").json()
                health = c.get("/api/health").json()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            log.close()
    status = result["status"]
    payload = {
        "source": source,
        "pace_fps": round(pace, 3),
        "rate_per_s": args.rate,
        "seconds": args.seconds,
        "client_threads": args.threads,
        "status_requests": status,
        "achieved_rate_per_s": result["achieved_rate_per_s"],
        "late_starts_over_10ms": result["late_starts"],
        "errors": result["errors"],
        "runs_list": result["runs_list"],
        "metrics": result["metrics"],
        "run_during": {
            "state": during["state"],
            "placed": during["counts"]["placed"],
            "stages": {k: v.get("state") for k, v in during["stages"].items()},
        },
        "run_final": {"state": final["state"], "placed": final["counts"]["placed"]},
        "daemon_rejected": health.get("rejected", {}),
        "daemon_exit_code": code,
        "target_p99_ms": 50.0,
        "target_met": bool(status.get("p99_ms", 1e9) < 50.0 and not result["errors"]),
    }
    path = write_result("daemon_api", payload)
    print(
        f"daemon API at {args.rate:.0f} status requests/s for {args.seconds:.0f} s while a run "
        f"streams ({during['counts']['placed']} frames placed by then):\n"
        f"  GET /api/runs/ID  p50 {status.get('p50_ms')} ms  p90 {status.get('p90_ms')} ms  "
        f"p99 {status.get('p99_ms')} ms  max {status.get('max_ms')} ms  "
        f"({status.get('n')} requests, {len(result['errors'])} errors, achieved "
        f"{result['achieved_rate_per_s']}/s)\n"
        f"  GET /api/runs p99 {result['runs_list'].get('p99_ms')} ms, GET /metrics p99 "
        f"{result['metrics'].get('p99_ms')} ms\n"
        f"  target p99 < 50 ms: {'met' if payload['target_met'] else 'NOT met'} -> {path}"
    )
    return 0


def measure(url: str, headers: dict[str, str], run_id: str, args: Any) -> dict[str, Any]:
    """The open-loop status load, plus one list and one metrics request per second."""
    local = threading.local()
    lock = threading.Lock()
    status_ms: list[float] = []
    errors: list[str] = []
    late = 0

    host, port = url.removeprefix("http://").rsplit(":", 1)

    def connection() -> http.client.HTTPConnection:
        # One keep-alive connection per client thread (http.client: a light client, so
        # that the load generator takes little of the CPU the daemon and the run share).
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn: http.client.HTTPConnection = local.conn
        return conn

    def one(path: str, due: float, sink: list[float]) -> None:
        nonlocal late
        if time.perf_counter() - due > 0.010:
            with lock:
                late += 1
        error = None
        t0 = time.perf_counter()
        try:
            conn = connection()
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                error = f"{path}: HTTP {resp.status}"
        except (OSError, http.client.HTTPException) as exc:
            error = f"{path}: {exc}"
            local.conn.close()
            del local.conn
        ms = (time.perf_counter() - t0) * 1000.0
        with lock:
            if error is None:
                sink.append(ms)
            else:
                errors.append(error)

    list_ms: list[float] = []
    metrics_ms: list[float] = []
    n = int(args.rate * args.seconds)
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        t_start = time.perf_counter()
        for i in range(n):
            due = t_start + i / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, f"/api/runs/{run_id}", due, status_ms)
            if i % int(args.rate) == int(args.rate) // 2:
                pool.submit(one, "/api/runs", due, list_ms)
                pool.submit(one, "/metrics", due, metrics_ms)
    elapsed = time.perf_counter() - t_start
    return {
        "status": percentiles(status_ms),
        "runs_list": percentiles(list_ms),
        "metrics": percentiles(metrics_ms),
        "errors": errors[:20],
        "late_starts": late,
        "achieved_rate_per_s": round(len(status_ms) / elapsed, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
