"""The daemon's runs: a :class:`Supervisor` keeps every run of a data directory.

It starts each new run's :class:`~cemi_stream.daemon.run.Run` in its own
monitor thread (the thread that spawns a run's stages lives as long as the
run: the stages' parent-death signal is tied to it), lists earlier runs from
their records (``runs/RUN_ID/daemon-run.json``; a run whose daemon died
mid-run is ``interrupted``), and stops and resumes them.  Thread-safe: the
control API calls it from its worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import CemiError, ConfigError, RunNotFoundError, RunStateError
from .options import RunOptions
from .run import (
    ACTIVE,
    RUN_RECORD,
    RUNS_DIR,
    TERMINATE_GRACE_S,
    Run,
    _pid_alive,
    _pid_belongs_to,
    _read_json,
    _with_results,
    _write_json,
    new_run_id,
)
from .stages import check_denoise

log = logging.getLogger(__name__)

# Free space a new run needs on the data directory, bytes: room for the first
# frames, the logs and the records a failing run still has to write.
MIN_FREE_BYTES = 32 * 2**20


class Supervisor:
    """All runs of a data directory: start, watch, restart, stop, resume.

    Parameters
    ----------
    data_dir : Path
        The daemon's data directory; runs live in ``DATA_DIR/runs/RUN_ID/``.
        Earlier runs found there at construction are listed: ``finished``,
        ``failed``, or ``interrupted`` (their daemon died mid-run).
    max_restarts : int
        Restarts of one stage allowed within ``restart_window_s`` before the
        run is given up (``failed``).
    restart_window_s : float
        The window, seconds.
    heartbeat_timeout_s : float or None
        A stage whose heartbeat is older is killed and restarted.
    min_free_bytes : int
        Free space the data directory must have for a new run to start
        (default :data:`MIN_FREE_BYTES`).
    spares : bool
        Keep a warm spare process per running stage, so that a stage that
        died is running again without Python's start-up and imports
        (:mod:`~cemi_stream.daemon.standby`).

    Notes
    -----
    Thread-safe: the API calls it from worker threads.  Each run's processes
    are spawned by the run's own monitor thread (never by the caller's).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        max_restarts: int = 5,
        restart_window_s: float = 60.0,
        heartbeat_timeout_s: float | None = 30.0,
        min_free_bytes: int = MIN_FREE_BYTES,
        spares: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.min_free_bytes = min_free_bytes
        self.spares = spares
        self.runs_dir = self.data_dir / RUNS_DIR
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._lock = threading.RLock()
        self._runs: dict[str, Run] = {}
        # Earlier runs, as read from their records (not driven by this process).
        self._past: dict[str, dict[str, Any]] = {}
        self._closed = False
        self._scan()

    def _scan(self) -> None:
        for path in sorted(self.runs_dir.glob(f"*/{RUN_RECORD}")):
            record = _read_json(path)
            if record is None or not isinstance(record.get("id"), str):
                log.warning("%s: unreadable run record; not listed", path)
                continue
            if record.get("state") in ACTIVE:
                record["reason"] = (
                    f"the daemon (pid {record.get('daemon_pid')}) stopped while the run was "
                    f"{record.get('state')}"
                )
                record["state"] = "interrupted"
                for st in record.get("stages", {}).values():
                    if isinstance(st, dict) and st.get("state") == "running":
                        st["state"] = "stopped"
                with contextlib.suppress(OSError):
                    _write_json(path, record)
            self._past[record["id"]] = record

    # -- the interface ---------------------------------------------------------------

    def start(self, options: RunOptions) -> str:
        """Create ``DATA_DIR/runs/RUN_ID/`` and start the run's stages; returns RUN_ID.

        Raises
        ------
        ConfigError
            A denoise backend or model that cannot be used (before anything starts).
        RunStateError
            After :meth:`shutdown`.
        OSError
            ``ENOSPC`` when the data directory has less than ``min_free_bytes``
            free.
        """
        model_path = check_denoise(options.denoise, options.model, options.config_file)
        free = shutil.disk_usage(self.data_dir).free
        if free < self.min_free_bytes:
            # A run started on a nearly full disk fails at its first frames, and
            # leaves a run directory that cannot even hold its error output.
            raise OSError(
                errno.ENOSPC,
                f"{free / 2**20:.1f} MiB free, a run needs at least "
                f"{self.min_free_bytes / 2**20:.0f} MiB",
                str(self.data_dir),
            )
        with self._lock:
            if self._closed:
                raise RunStateError("the daemon is shutting down; no new runs")
            run_id = new_run_id()
            run_dir = self.runs_dir / run_id
            run_dir.mkdir(parents=True)
            run = Run(
                run_id, run_dir, options, model_path=model_path,
                max_restarts=self.max_restarts, restart_window_s=self.restart_window_s,
                heartbeat_timeout_s=self.heartbeat_timeout_s, spares=self.spares,
            )  # fmt: skip
            run.save()
            self._runs[run_id] = run
            run.start_thread()
        log.info("run %s started: %s", run_id, options.source)
        return run_id

    def get(self, run_id: str) -> dict[str, Any]:
        """The run's object: ``id``, ``state``, ``run_dir``, ``stages``, ``counts`` ...

        ``stages`` maps each stage of the run (``capture``, ``denoise`` when
        on, ``stitch``) to ``pid``, ``state``, ``restarts``, ``exit_code``,
        ``last_error``, ``frames_in``, ``frames_out``, ``frames_per_s``,
        ``queue_depth``, ``dropped``, ``heartbeat_age_s`` (statistics are
        None until the stage has written any); ``counts`` has ``placed``,
        ``predicted``, ``skipped``; ``mosaic_shape`` is ``[height, width]``
        once the mosaic is finalised, else None.

        Raises
        ------
        RunNotFoundError
            No such run.
        """
        with self._lock:
            run = self._runs.get(run_id)
            past = self._past.get(run_id)
        if run is not None:
            return run.snapshot()
        if past is None:
            raise RunNotFoundError(f"run {run_id!r}: no such run")
        return _past_snapshot(past, self.runs_dir / run_id)

    def list(self) -> list[dict[str, Any]]:
        """Every run's object, oldest first."""
        with self._lock:
            ids = sorted(set(self._runs) | set(self._past))
        out = []
        for run_id in ids:
            with contextlib.suppress(RunNotFoundError):
                out.append(self.get(run_id))
        return out

    def stop(self, run_id: str) -> dict[str, Any]:
        """Ask a run to stop cleanly (see :meth:`Run.request_stop`); returns its object.

        Stopping a run that is not active changes nothing.

        Raises
        ------
        RunNotFoundError
            No such run.
        """
        with self._lock:
            run = self._runs.get(run_id)
        if run is not None:
            run.request_stop()
        return self.get(run_id)

    def resume(self, run_id: str) -> dict[str, Any]:
        """Restart the unfinished stages of an ``interrupted`` (or ``failed``) run.

        Each stage resumes from its own record, so the result equals an
        undisturbed run's.  Leftover processes of the run (a daemon killed
        moments ago) are stopped first.

        Raises
        ------
        RunNotFoundError
            No such run.
        RunStateError
            The run is active or finished.
        """
        with self._lock:
            if self._closed:
                raise RunStateError("the daemon is shutting down; no resume")
            run = self._runs.get(run_id)
            past = self._past.get(run_id)
            if run is None and past is None:
                raise RunNotFoundError(f"run {run_id!r}: no such run")
            state = run.state if run is not None else past.get("state") if past else None
            if state not in ("interrupted", "failed"):
                raise RunStateError(
                    f"run {run_id}: cannot resume a run that is {state} "
                    "(only interrupted or failed runs)"
                )
            run_dir = self.runs_dir / run_id
            if run is not None:
                options, created = run.options, run.created
            else:
                assert past is not None
                try:
                    options = RunOptions.from_record(past.get("options", {}))
                except ConfigError as exc:
                    raise RunStateError(f"run {run_id}: its record is unusable ({exc})") from None
                created = past.get("created") or time.time()
                _stop_leftovers(past, run_dir)
            try:
                model_path = check_denoise(options.denoise, options.model, options.config_file)
            except CemiError as exc:
                raise RunStateError(f"run {run_id}: cannot resume ({exc})") from None
            new = Run(
                run_id, run_dir, options, model_path=model_path, resume=True, created=created,
                max_restarts=self.max_restarts, restart_window_s=self.restart_window_s,
                heartbeat_timeout_s=self.heartbeat_timeout_s, spares=self.spares,
            )  # fmt: skip
            self._runs[run_id] = new
            self._past.pop(run_id, None)
            new.save()
            new.start_thread()
        log.info("run %s resumed", run_id)
        return self.get(run_id)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop every active run cleanly and wait up to ``timeout_s`` for them.

        Runs still active then are terminated (and listed ``interrupted``).
        """
        with self._lock:
            self._closed = True
            runs = list(self._runs.values())
        for run in runs:
            run.request_stop()
        deadline = time.monotonic() + timeout_s
        for run in runs:
            if run.thread is not None:
                run.thread.join(max(deadline - time.monotonic(), 0.0))
        for run in runs:
            if run.thread is not None and run.thread.is_alive():
                run._stop_deadline = 0.0  # the drive loop sends SIGTERM to every stage now
                run.thread.join(TERMINATE_GRACE_S + 5.0)


def _past_snapshot(record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The object of a run known only from its record."""
    stages: dict[str, dict[str, Any]] = {}
    for name, st in (record.get("stages") or {}).items():
        st = st if isinstance(st, dict) else {}
        stages[str(name)] = {
            "pid": None,
            "state": st.get("state"),
            "restarts": st.get("restarts", 0),
            "exit_code": st.get("exit_code"),
            "last_error": st.get("last_error"),
            "spare_pid": None,
        }
    options = record.get("options") if isinstance(record.get("options"), dict) else {}
    base = {
        "id": record.get("id"),
        "name": (options or {}).get("name"),
        "state": record.get("state"),
        "reason": record.get("reason"),
        "run_dir": str(run_dir),
        "created": record.get("created"),
        "started": record.get("started"),
        "ended": record.get("ended"),
        "options": options,
    }
    return _with_results(base, stages, run_dir)


def _stop_leftovers(record: dict[str, Any], run_dir: Path) -> None:
    """Stop processes of an earlier daemon's run that are still alive (they are stopping)."""
    pids: list[int] = []
    for st in (record.get("stages") or {}).values():
        if isinstance(st, dict) and isinstance(st.get("pid"), int):
            pids.append(int(st["pid"]))
    live = [p for p in pids if p > 1 and _pid_alive(p) and _pid_belongs_to(p, run_dir)]
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in live:
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
