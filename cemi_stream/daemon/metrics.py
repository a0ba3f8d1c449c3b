"""Prometheus metrics of the daemon's runs, built at scrape time from the stage statistics.

Each scrape of ``GET /metrics`` calls :func:`render_metrics` with the
supervisor's run objects and every run's ``RUN_DIR/stats/STAGE.json``
(:func:`cemi_stream.daemon.stats.read_stats`).  A custom collector on a
fresh :class:`~prometheus_client.CollectorRegistry` turns them into metric
families; nothing is kept between scrapes and prometheus_client's
multiprocess mode is not used (the stages are separate processes that share
nothing but their files).

Metrics (labels ``run`` = run id, ``stage`` = stage name):

=====================================  =========  =====================================
``cemi_frames_processed_total``        counter    frames the stage emitted (``frames_out``)
``cemi_frames_received_total``         counter    frames the stage took (``frames_in``)
``cemi_frames_dropped_total``          counter    frames not emitted, by ``reason``
``cemi_queue_depth``                   gauge      frames waiting (see the stage modules)
``cemi_frames_per_second``             gauge      recent output rate
``cemi_stage_processing_seconds``      histogram  per-frame processing time
``cemi_stage_up``                      gauge      1: heartbeat fresh and process alive
``cemi_stage_restarts_total``          counter    restarts by the supervisor
``cemi_bytes_written_total``           counter    bytes of data files written
``cemi_last_frame_timestamp_seconds``  gauge      unix time of the last frame emitted
``cemi_run_state``                     gauge      1 for the run's current ``state``
=====================================  =========  =====================================

A counter restarts from the resumed position when its stage restarts (the
stages count over the whole run where they can: see the stage modules).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# A stage whose statistics are older than this is not up (they are written every 0.5 s).
STALE_AFTER_S = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RUN_STATES = ("starting", "running", "stopping", "finished", "failed", "interrupted")


def _number(value: Any) -> float | None:
    """A finite float from a stats value, or None (stats files are read from disk)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


class RunsCollector(Collector):
    """Metric families of the given runs and their stage statistics.

    Parameters
    ----------
    runs : list of dict
        Run objects as :meth:`Supervisor.list` returns them (``id``,
        ``state``, ``stages`` keyed by stage name with ``restarts``).
    stats : dict
        ``{run_id: {stage: stats}}`` (:func:`~cemi_stream.daemon.stats.read_stats`).
    now : float or None
        Unix time of the scrape (for the heartbeat check); None: now.
    """

    def __init__(
        self,
        runs: Sequence[Mapping[str, Any]],
        stats: Mapping[str, Mapping[str, Mapping[str, Any]]],
        now: float | None = None,
    ) -> None:
        self.runs = runs
        self.stats = stats
        self.now = time.time() if now is None else now

    def collect(self) -> Iterator[Metric]:
        """Build the metric families (called once per scrape)."""
        lbl = ["run", "stage"]
        processed = CounterMetricFamily(
            "cemi_frames_processed", "Frames a stage emitted downstream.", labels=lbl
        )
        received = CounterMetricFamily(
            "cemi_frames_received", "Frames a stage took from upstream.", labels=lbl
        )
        dropped = CounterMetricFamily(
            "cemi_frames_dropped",
            "Frames a stage did not emit.",
            labels=[*lbl, "reason"],
        )
        depth = GaugeMetricFamily("cemi_queue_depth", "Frames waiting at a stage.", labels=lbl)
        fps = GaugeMetricFamily(
            "cemi_frames_per_second", "Recent output rate of a stage, frames/s.", labels=lbl
        )
        timing = HistogramMetricFamily(
            "cemi_stage_processing_seconds", "Per-frame processing time of a stage.", labels=lbl
        )
        up = GaugeMetricFamily(
            "cemi_stage_up",
            "1: heartbeat fresh, process alive.",
            labels=lbl,
        )
        restarts = CounterMetricFamily(
            "cemi_stage_restarts", "Restarts of a stage by the supervisor.", labels=lbl
        )
        written = CounterMetricFamily(
            "cemi_bytes_written", "Bytes of data files a stage wrote.", labels=lbl
        )
        last_frame = GaugeMetricFamily(
            "cemi_last_frame_timestamp_seconds",
            "Unix time of the last frame a stage emitted.",
            labels=lbl,
        )
        state = GaugeMetricFamily(
            "cemi_run_state", "1 for the current state of a run.", labels=["run", "state"]
        )
        run_ids: list[str] = []
        restarts_of: dict[tuple[str, str], float] = {}
        for run in self.runs:
            run_id = str(run.get("id", ""))
            if not run_id:
                continue
            run_ids.append(run_id)
            current = run.get("state")
            for name in RUN_STATES:
                state.add_metric([run_id, name], 1.0 if current == name else 0.0)
            stages = run.get("stages")
            if isinstance(stages, Mapping):
                for stage, info in stages.items():
                    n = _number(info.get("restarts")) if isinstance(info, Mapping) else None
                    restarts_of[(run_id, str(stage))] = n or 0.0
        for run_id in [*run_ids, *(r for r in self.stats if r not in run_ids)]:
            for stage, data in sorted(self.stats.get(run_id, {}).items()):
                if not isinstance(data, Mapping):
                    continue
                labels = [run_id, str(stage)]
                for family, key in (
                    (processed, "frames_out"), (received, "frames_in"), (depth, "queue_depth"),
                    (fps, "frames_per_s"), (written, "bytes_written"),
                    (last_frame, "last_frame_time"),
                ):  # fmt: skip
                    value = _number(data.get(key))
                    if value is not None:
                        family.add_metric(labels, value)
                reasons = data.get("dropped")
                if isinstance(reasons, Mapping):
                    for reason, n in sorted(reasons.items()):
                        value = _number(n)
                        if value is not None:
                            dropped.add_metric([*labels, str(reason)], value)
                histogram = _histogram(data.get("timings_ms"))
                if histogram is not None:
                    timing.add_metric(labels, histogram[0], histogram[1])
                beat = _number(data.get("time"))
                fresh = beat is not None and self.now - beat <= STALE_AFTER_S
                up.add_metric(labels, 1.0 if fresh and _pid_alive(data.get("pid")) else 0.0)
                restarts_of.setdefault((run_id, str(stage)), 0.0)
        for (run_id, stage), n in sorted(restarts_of.items()):
            restarts.add_metric([run_id, stage], n)
        yield from (processed, received, dropped, depth, fps, timing, up, restarts, written)
        yield from (last_frame, state)


def _histogram(data: Any) -> tuple[list[tuple[str, float]], float] | None:
    """Cumulative Prometheus buckets (seconds) and sum from a ``timings_ms`` object."""
    if not isinstance(data, Mapping):
        return None
    bounds, counts = data.get("buckets"), data.get("counts")
    total = _number(data.get("sum"))
    if not isinstance(bounds, list) or not isinstance(counts, list) or total is None:
        return None
    if len(counts) != len(bounds) + 1:
        return None
    edges: list[float] = []
    numbers: list[float] = []
    for raw in bounds:
        edge = _number(raw)
        if edge is None:
            return None
        edges.append(edge / 1000.0)
    for raw in counts:
        n = _number(raw)
        if n is None or n < 0:
            return None
        numbers.append(n)
    edges.append(math.inf)
    buckets: list[tuple[str, float]] = []
    running = 0.0
    for edge, n in zip(edges, numbers, strict=True):
        running += n
        buckets.append((floatToGoString(edge), running))
    return buckets, total / 1000.0


def render_metrics(
    runs: Sequence[Mapping[str, Any]],
    stats: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    extra: Iterable[Collector] = (),
    now: float | None = None,
) -> bytes:
    """Prometheus text exposition of the runs and their stage statistics.

    Parameters
    ----------
    runs : list of dict
        The supervisor's run objects (``Supervisor.list()``).
    stats : dict
        ``{run_id: read_stats(run_dir)}`` for the runs to report.
    extra : iterable of Collector
        More collectors to render in the same scrape (e.g. the API's own
        request counters).
    now : float or None
        Unix time of the scrape, for ``cemi_stage_up``; None: now.

    Returns
    -------
    bytes
        The text format (content type :data:`CONTENT_TYPE`).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunsCollector(runs, stats, now))
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)
