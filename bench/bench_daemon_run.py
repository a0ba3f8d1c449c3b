"""A run through the daemon against plain ``replay`` on the same source: wall time.

Starts ``run_daemon.py serve --port 0`` on a temporary data directory (the
source folder admitted with ``--allow-dir``), starts the run with ``--pace
max`` through the API and times it from the request to the run's end
(polling its status 5 times a second, as a dashboard would); and runs
``replay`` on the same source and times it.  The source is read once before
any run (so that neither pays for a cold page cache), and the two alternate,
the first of each pair swapping every repeat, so both see the same machine
load.  Target: the daemon within 5 % of
``replay`` (median of the runs).  Writes ``bench/results/daemon_run.json``.

Usage: ``python -m bench.bench_daemon_run FRAMES_DIR [--repeats 3]`` (e.g. the
paper-sized folder of ``bench/make_paper_run.py``).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import write_result
from cemi_stream.daemon.client import wait_until_serving

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.05
POLL_S = 0.2


def _warm(source: Path) -> int:
    """Read every file of ``source`` once (page cache); returns the bytes read."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    total = 0
    for p in files:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def _daemon_run(source: Path, work: Path) -> dict[str, Any]:
    data = work / "data"
    log = open(work / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run_daemon.py"), "serve", "--port", "0",
         "--data-dir", str(data), "--allow-dir", str(source.parent)],
        stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    try:
        client = wait_until_serving(data, timeout_s=60, pid=proc.pid)
        t0 = time.perf_counter()
        run = client.start({"source": str(source), "pace": "max"})
        run_id = run["id"]
        while (info := client.run(run_id))["state"] not in ("finished", "failed", "interrupted"):
            time.sleep(POLL_S)
        wall = time.perf_counter() - t0
        if info["state"] != "finished":
            raise SystemExit(f"daemon run {run_id} ended {info['state']}: {info.get('reason')}")
        return {"wall_s": round(wall, 2), "counts": info["counts"]}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        log.close()


def _replay(source: Path, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO / "run_daemon.py"), "replay", str(source),
         "--out", str(work / "replay"), "-q"],
        capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"replay failed: {result.stderr.strip().splitlines()[-1:]}")
    return {"wall_s": round(wall, 2)}


def main() -> None:
    """Alternate daemon and replay runs; write the JSON and a one-line verdict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    source = args.source.resolve()
    if not source.exists():
        raise SystemExit(f"{source}: no such source")
    warmed = _warm(source)
    daemon_runs: list[dict[str, Any]] = []
    replay_runs: list[dict[str, Any]] = []
    for k in range(args.repeats):
        order = ("daemon", "replay") if k % 2 == 0 else ("replay", "daemon")
        for what in order:
            with tempfile.TemporaryDirectory(prefix=f"cemi-{what}-run-") as tmp:
                if what == "daemon":
                    daemon_runs.append(_daemon_run(source, Path(tmp)))
                else:
                    replay_runs.append(_replay(source, Path(tmp)))
        print(
            f"repeat {k + 1}/{args.repeats}: daemon {daemon_runs[-1]['wall_s']} s, "
            f"replay {replay_runs[-1]['wall_s']} s",
            flush=True,
        )
    d = statistics.median(r["wall_s"] for r in daemon_runs)
    r = statistics.median(r["wall_s"] for r in replay_runs)
    ratio = d / r
    result = {
        "source": str(source),
        "source_bytes_warmed": warmed,
        "status_poll_s": POLL_S,
        "load_average": list(os.getloadavg()),
        "daemon": daemon_runs,
        "replay": replay_runs,
        "median_daemon_s": d,
        "median_replay_s": r,
        "ratio_daemon_over_replay": round(ratio, 3),
        "target_ratio_max": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
    }
    write_result("daemon_run", result)
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"daemon {d:.1f} s vs replay {r:.1f} s: ratio {ratio:.3f} (target <= 1.05: {verdict})")


if __name__ == "__main__":
    main()
