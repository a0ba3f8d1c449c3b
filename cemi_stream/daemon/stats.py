"""Live statistics of a stage process: ``RUN_DIR/stats/STAGE.json``.

Every stage process (capture, denoise, stitch) keeps a :class:`StatsWriter`
and updates its counters from its own loop; a small daemon thread writes the
snapshot atomically (temporary file, then :func:`os.replace`) every
``interval_s`` seconds (0.5 s: about twice a second) and once more when the
stage closes it.  The supervisor takes the field ``time`` as the stage's
heartbeat; the control API's per-stage fields and the Prometheus metrics
(:mod:`cemi_stream.daemon.metrics`) are built from these files at read time,
so no process shares memory with another.

The file (one JSON object)::

    {"stage": "capture", "pid": 4242, "time": 1767225600.5,
     "frames_in": 153, "frames_out": 18, "frames_per_s": 9.7, "queue_depth": 0,
     "dropped": {"redundant": 135}, "bytes_written": 14155776,
     "last_frame_time": 1767225600.4, "last_error": null,
     "timings_ms": {"buckets": [0.5, 1, ...], "counts": [...], "sum": 812.5, "count": 18}}

* ``time``, ``last_frame_time``: unix seconds (wall clock); ``last_frame_time``
  is when the stage last emitted a frame (null before the first);
* ``frames_in`` / ``frames_out``: frames the stage took / emitted (the counts
  of its summary file, see the stage modules); ``dropped``: frames not emitted,
  by reason; ``bytes_written``: bytes of data files written;
* ``frames_per_s``: ``frames_out`` over the last ``window_s`` seconds;
* ``queue_depth``: frames waiting in or in front of the stage (stage-specific,
  documented where it is set);
* ``timings_ms``: a fixed-bucket histogram of per-frame processing time in
  milliseconds; ``counts[i]`` is the number of observations ``<= buckets[i]``
  and above ``buckets[i-1]`` (not cumulative), with one more entry at the end
  for everything above the last bucket.

Updating costs a lock and an addition or two per frame (well under 1 % of a
frame's processing time; measured in ``tests/cemi_stream/daemon/test_stats.py``).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

STATS_DIR = "stats"
# Upper bounds of the processing-time histogram, milliseconds.
DEFAULT_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
)  # fmt: skip
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# Longest stats file read_stats accepts, bytes (a normal one is well under 2 KiB).
_MAX_FILE_BYTES = 1 << 20


def stats_dir(run_dir: Path) -> Path:
    """Where a run's stage statistics live: ``RUN_DIR/stats``."""
    return Path(run_dir) / STATS_DIR


def stats_path(run_dir: Path, stage: str) -> Path:
    """The statistics file of one stage: ``RUN_DIR/stats/STAGE.json``."""
    return stats_dir(run_dir) / f"{stage}.json"


class StatsWriter:
    """Counters of one stage process, written to ``RUN_DIR/stats/STAGE.json``.

    Thread-safe: the stage's threads update it, a daemon thread writes it.
    A failed write is logged (once until a write succeeds again) and never
    raised into the stage: statistics are telemetry, not data, so this is
    the one deliberate exception to "never swallow a write failure" - the
    stage's data files (spool, journal, mosaic) still fail loudly.

    Parameters
    ----------
    run_dir : Path
        Run directory; ``stats/`` is created inside it.
    stage : str
        Stage name (``capture``, ``denoise``, ``stitch``, ...): lower-case
        letters, digits, ``-`` and ``_``.
    interval_s : float
        Seconds between periodic writes (default 0.5).
    window_s : float
        Length of the sliding window of ``frames_per_s``, seconds.
    buckets_ms : sequence of float
        Increasing upper bounds of the processing-time histogram, ms.

    Raises
    ------
    ConfigError
        A bad stage name, interval, window or bucket list.
    """

    def __init__(
        self,
        run_dir: Path,
        stage: str,
        *,
        interval_s: float = 0.5,
        window_s: float = 5.0,
        buckets_ms: Sequence[float] = DEFAULT_BUCKETS_MS,
    ) -> None:
        if not _STAGE_NAME.match(stage):
            raise ConfigError(f"stats stage name {stage!r}: use lower-case letters, digits, - or _")
        if not interval_s > 0 or not window_s > 0:
            raise ConfigError(f"stats {stage}: interval_s and window_s must be positive")
        bounds = [float(b) for b in buckets_ms]
        if not bounds or any(b <= a for a, b in itertools.pairwise(bounds)):
            raise ConfigError(f"stats {stage}: histogram buckets must be increasing")
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.path = stats_path(self.run_dir, stage)
        self.interval_s = float(interval_s)
        self.window_s = float(window_s)
        self._buckets = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum_ms = 0.0
        self._n_timed = 0
        self.frames_in = 0
        self.frames_out = 0
        self.queue_depth = 0
        self.bytes_written = 0
        self.dropped: Counter[str] = Counter()
        self.last_frame_time: float | None = None
        self.last_error: str | None = None
        self._extra: dict[str, Any] = {}
        self._sampler: Callable[[], int] | None = None
        self._bytes_sampler: Callable[[], int] | None = None
        self._bytes_every_s = 5.0
        self._bytes_next = 0.0
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, int]] = deque()
        self._write_failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- updates from the stage (hot path: a lock and a few additions) -------

    def frame_in(self, n: int = 1) -> None:
        """Count ``n`` frames taken by the stage."""
        with self._lock:
            self.frames_in += n

    def frame_out(self, n: int = 1, *, nbytes: int = 0, ms: float | None = None) -> None:
        """Count ``n`` frames emitted, ``nbytes`` written, and (optionally) one timing.

        Parameters
        ----------
        n : int
            Frames emitted.
        nbytes : int
            Bytes written to data files for them.
        ms : float or None
            Processing time of one frame, milliseconds (see :meth:`observe_ms`).
        """
        now = time.time()
        with self._lock:
            self.frames_out += n
            self.bytes_written += nbytes
            self.last_frame_time = now
            if ms is not None:
                self._observe(ms)

    def observe_ms(self, ms: float, n: int = 1) -> None:
        """Add ``n`` observations of ``ms`` milliseconds to the processing-time histogram."""
        with self._lock:
            self._observe(ms, n)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` frames not emitted, for ``reason``."""
        with self._lock:
            self.dropped[reason] += n

    def add_bytes(self, nbytes: int) -> None:
        """Count ``nbytes`` written to data files."""
        with self._lock:
            self.bytes_written += nbytes

    def set_counts(
        self,
        *,
        frames_in: int | None = None,
        frames_out: int | None = None,
        queue_depth: int | None = None,
    ) -> None:
        """Set counters directly (when the stage keeps its own totals)."""
        with self._lock:
            if frames_in is not None:
                self.frames_in = frames_in
            if frames_out is not None:
                if frames_out > self.frames_out:
                    self.last_frame_time = time.time()
                self.frames_out = frames_out
            if queue_depth is not None:
                self.queue_depth = queue_depth

    def set_dropped(self, dropped: Mapping[str, int]) -> None:
        """Replace the dropped-frame counts (when the stage keeps them itself)."""
        with self._lock:
            self.dropped = Counter(dropped)

    def set_error(self, message: str | None) -> None:
        """Record the stage's last error (one line), or clear it with None."""
        with self._lock:
            self.last_error = None if message is None else str(message).splitlines()[0][:500]

    def set_extra(self, **fields: Any) -> None:
        """Add stage-specific JSON fields to the file (e.g. ``resumed_from``)."""
        with self._lock:
            self._extra.update(fields)

    def queue_depth_from(self, sampler: Callable[[], int] | None) -> None:
        """Take ``queue_depth`` from ``sampler()`` at each write instead of the hot path.

        ``sampler`` runs in the writer thread; it must be cheap and thread-safe
        (reading a few counters).  An exception in it is logged, not raised.
        """
        self._sampler = sampler

    def bytes_written_from(self, sampler: Callable[[], int] | None, every_s: float = 5.0) -> None:
        """Take ``bytes_written`` from ``sampler()``, at most every ``every_s`` s and at close.

        For a stage whose data is written by another process (the stitcher's
        renderer): e.g. the size of its output folder.  Runs in the writer
        thread; an exception in it is logged, not raised.
        """
        self._bytes_sampler = sampler
        self._bytes_every_s = every_s
        self._bytes_next = 0.0

    def _observe(self, ms: float, n: int = 1) -> None:
        self._counts[bisect.bisect_left(self._buckets, ms)] += n
        self._sum_ms += ms * n
        self._n_timed += n

    # -- snapshots and writing ----------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The current statistics as the JSON object of the file."""
        if self._sampler is not None:
            try:
                depth = int(self._sampler())
            except Exception as exc:  # telemetry must not break the stage
                log.debug("stats %s: queue depth sampler failed (%s)", self.stage, exc)
            else:
                with self._lock:
                    self.queue_depth = depth
        mono = time.monotonic()
        if self._bytes_sampler is not None and (mono >= self._bytes_next or self._closed):
            self._bytes_next = mono + self._bytes_every_s
            try:
                nbytes = int(self._bytes_sampler())
            except Exception as exc:  # telemetry must not break the stage
                log.debug("stats %s: bytes sampler failed (%s)", self.stage, exc)
            else:
                with self._lock:
                    self.bytes_written = nbytes
        with self._lock:
            samples = self._samples
            samples.append((mono, self.frames_out))
            while len(samples) > 2 and mono - samples[1][0] >= self.window_s:
                samples.popleft()
            t0, n0 = samples[0]
            fps = (self.frames_out - n0) / (mono - t0) if mono - t0 > 1e-3 else 0.0
            data: dict[str, Any] = {
                **self._extra,
                "stage": self.stage,
                "pid": os.getpid(),
                "time": time.time(),
                "frames_in": self.frames_in,
                "frames_out": self.frames_out,
                "frames_per_s": round(max(fps, 0.0), 3),
                "queue_depth": self.queue_depth,
                "dropped": dict(self.dropped),
                "bytes_written": self.bytes_written,
                "last_frame_time": self.last_frame_time,
                "last_error": self.last_error,
                "timings_ms": {
                    "buckets": list(self._buckets),
                    "counts": list(self._counts),
                    "sum": round(self._sum_ms, 3),
                    "count": self._n_timed,
                },
            }
        return data

    def write(self) -> bool:
        """Write the snapshot now (atomically); False when the write failed.

        The failure is logged (once until a write succeeds again), not raised.
        """
        data = self.snapshot()
        tmp = self.path.with_name(f".{self.stage}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(data, separators=(",", ":")))
            os.replace(tmp, self.path)
        except OSError as exc:
            # Telemetry only: the stage goes on (see the class docstring).
            if not self._write_failing:
                log.warning("%s: cannot write stage statistics (%s)", self.path, exc)
            self._write_failing = True
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        if self._write_failing:
            log.info("%s: stage statistics written again", self.path)
        self._write_failing = False
        return True

    def start(self) -> StatsWriter:
        """Write now and then every ``interval_s`` from a daemon thread; returns self."""
        if self._thread is None and not self._closed:
            self.write()
            self._thread = threading.Thread(
                target=self._loop, name=f"stats-{self.stage}", daemon=True
            )
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write()

    def close(self, error: str | None = None) -> None:
        """Stop the thread and write the final snapshot (with ``error``, if given)."""
        if error is not None:
            self.set_error(error)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self._closed:
            self._closed = True
            self.write()

    def __enter__(self) -> StatsWriter:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(None if exc is None else f"{type(exc).__name__}: {exc}")


def tree_bytes(path: Path) -> int:
    """Size of the file ``path``, or of the regular files under it (0 if absent), bytes."""
    try:
        if Path(path).is_file():
            return Path(path).stat().st_size
    except OSError:
        return 0
    total = 0
    stack = [str(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue  # removed or renamed meanwhile (finalize renames chunks)
    return total


def read_stats(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every stage's statistics of a run, keyed by stage name.

    Missing folders give ``{}``; files that are missing, being replaced,
    oversized, half-written or not a JSON object are left out (the next
    read will find the new version).

    Parameters
    ----------
    run_dir : Path
        Run directory.

    Returns
    -------
    dict of str to dict
        ``{stage: stats}``; each value is the object described in the module
        docstring.
    """
    out: dict[str, dict[str, Any]] = {}
    try:
        entries = list(os.scandir(stats_dir(run_dir)))
    except OSError:
        return out
    for entry in entries:
        name = entry.name
        if not name.endswith(".json") or name.startswith("."):
            continue
        stage = name[: -len(".json")]
        try:
            with open(entry.path, "rb") as f:
                raw = f.read(_MAX_FILE_BYTES + 1)
        except OSError:
            continue
        if len(raw) > _MAX_FILE_BYTES:
            continue
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if isinstance(data, dict):
            out[stage] = data
    return out
