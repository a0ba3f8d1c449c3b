"""Prometheus metrics from real stage statistics, parsed back with prometheus_client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from cemi_stream.daemon.metrics import render_metrics
from cemi_stream.daemon.stats import StatsWriter, read_stats

REPO = Path(__file__).resolve().parents[3]


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real ``replay`` of a ``sim:`` source (capture + stitch processes)."""
    run_dir = tmp_path_factory.mktemp("metrics") / "run"
    source = "sim:?rows=2&frames_per_row=3&frame_size=128x96&seed=9&databar=0"
    result = subprocess.run(
        [sys.executable, str(REPO / "run_daemon.py"), "replay", source, "--out", str(run_dir),
         "-q", "--allow-predicted"],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return run_dir


def test_metrics_of_a_real_run(finished_run: Path) -> None:
    stats = read_stats(finished_run)
    assert set(stats) == {"capture", "stitch"}
    runs = [
        {
            "id": "r1",
            "state": "finished",
            "stages": {"capture": {"restarts": 0}, "stitch": {"restarts": 2}},
        }
    ]
    text = render_metrics(runs, {"r1": stats})
    samples = _samples(text)
    capture = json.loads((finished_run / "capture.json").read_text())["summary"]
    stitch = json.loads((finished_run / "stitch.json").read_text())["summary"]
    run = {"run": "r1"}
    assert _get(samples, "cemi_frames_processed_total", stage="capture", **run) == capture["kept"]
    assert (
        _get(samples, "cemi_frames_received_total", stage="capture", **run) == capture["frames_in"]
    )
    assert _get(samples, "cemi_frames_processed_total", stage="stitch", **run) == stitch["frames"]
    for reason, n in stats["capture"]["dropped"].items():
        assert (
            _get(samples, "cemi_frames_dropped_total", stage="capture", reason=reason, **run) == n
        )
    assert _get(samples, "cemi_stage_restarts_total", stage="stitch", **run) == 2
    assert _get(samples, "cemi_stage_restarts_total", stage="capture", **run) == 0
    # The run has finished: its processes are gone, so no stage is up.
    assert _get(samples, "cemi_stage_up", stage="capture", **run) == 0
    assert _get(samples, "cemi_stage_up", stage="stitch", **run) == 0
    assert _get(samples, "cemi_bytes_written_total", stage="capture", **run) == 6 * 128 * 96
    assert _get(samples, "cemi_queue_depth", stage="stitch", **run) == 0
    assert _get(samples, "cemi_last_frame_timestamp_seconds", stage="stitch", **run) == (
        pytest.approx(stats["stitch"]["last_frame_time"])
    )
    assert _get(samples, "cemi_run_state", state="finished", **run) == 1
    assert _get(samples, "cemi_run_state", state="running", **run) == 0
    # The histogram: cumulative buckets in seconds, +Inf equal to the count.
    hist = stats["capture"]["timings_ms"]
    name = "cemi_stage_processing_seconds"
    assert _get(samples, f"{name}_count", stage="capture", **run) == hist["count"]
    assert _get(samples, f"{name}_sum", stage="capture", **run) == pytest.approx(hist["sum"] / 1000)
    assert _get(samples, f"{name}_bucket", stage="capture", le="+Inf", **run) == hist["count"]
    edge = hist["buckets"][3]
    assert _get(samples, f"{name}_bucket", stage="capture", le=str(edge / 1000), **run) == sum(
        hist["counts"][:4]
    )


def test_a_live_stage_is_up_and_a_stale_one_is_not(tmp_path: Path) -> None:
    with StatsWriter(tmp_path, "denoise") as stats:  # this process: alive
        stats.frame_out(3)
        stats.write()
        live = read_stats(tmp_path)
        now = time.time()
        samples = _samples(render_metrics([], {"r2": live}, now=now))
        assert _get(samples, "cemi_stage_up", run="r2", stage="denoise") == 1
        assert _get(samples, "cemi_frames_processed_total", run="r2", stage="denoise") == 3
        # The same statistics seen 10 s later: the heartbeat is stale.
        late = _samples(render_metrics([], {"r2": live}, now=now + 10))
        assert _get(late, "cemi_stage_up", run="r2", stage="denoise") == 0


def test_malformed_statistics_are_skipped_not_fatal() -> None:
    stats: dict[str, Any] = {
        "capture": {
            "frames_out": "many", "frames_in": float("nan"), "queue_depth": True,
            "dropped": {"blank": "x", "frozen": 2}, "timings_ms": {"buckets": [1], "counts": [1]},
            "pid": "me", "time": None,
        },
        "stitch": ["not", "a", "dict"],
        "denoise": {"timings_ms": {"buckets": [1, "b"], "counts": [1, 2, 3], "sum": 1}},
    }  # fmt: skip
    runs: list[dict[str, Any]] = [
        {"id": "r3", "state": "weird", "stages": {"capture": {"restarts": "no"}, "x": 5}},
        {"no": "id"},
    ]
    samples = _samples(render_metrics(runs, {"r3": stats}))
    assert (
        _get(samples, "cemi_frames_dropped_total", run="r3", stage="capture", reason="frozen") == 2
    )
    assert ("cemi_frames_processed_total", (("run", "r3"), ("stage", "capture"))) not in samples
    assert _get(samples, "cemi_stage_up", run="r3", stage="capture") == 0
    assert _get(samples, "cemi_stage_restarts_total", run="r3", stage="capture") == 0


def test_label_values_are_escaped_and_extra_collectors_rendered() -> None:
    class Api:
        def collect(self) -> Any:
            family = CounterMetricFamily("cemi_api_rejected", "x", labels=["reason"])
            family.add_metric(["bad json"], 4)
            yield family

    stats = {'we"ird\nrun': {"capture": {"frames_out": 1}}}
    samples = _samples(render_metrics([], stats, extra=[Api()]))
    assert _get(samples, "cemi_frames_processed_total", run='we"ird\nrun', stage="capture") == 1
    assert _get(samples, "cemi_api_rejected_total", reason="bad json") == 4
