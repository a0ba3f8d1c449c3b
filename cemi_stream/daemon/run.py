"""One run and its stage processes: started, watched, restarted, stopped.

The daemon's registry of runs is :class:`cemi_stream.daemon.supervisor.Supervisor`.

:class:`Run` is one run: its stage processes (``denoise`` when on, then
``capture`` and ``stitch``; command lines from
:mod:`~cemi_stream.daemon.stages`), driven by :meth:`Run.drive` until they
have all exited.  ``replay`` drives one in the foreground (no restarts);
the daemon's :class:`Supervisor` drives each in its own monitor thread.

Watching
--------
Each stage is watched by its exit status and by its heartbeat, the ``time``
field of ``RUN_DIR/stats/STAGE.json`` that the stage rewrites about twice a
second (:mod:`cemi_stream.daemon.stats`; a stage that has not written one
yet is judged by its exit status alone).  A stage that dies (non-zero exit
or a signal) or whose heartbeat is older than ``heartbeat_timeout_s`` (it
is killed first) is restarted after a back-off of 0.2 s doubling to at most
5 s; each stage resumes from its own record (the stitcher from its
journal, the denoise stage after its last committed frame, the capture after
its last spooled frame).  More than ``max_restarts`` restarts of one stage
within ``restart_window_s`` and the run is given up: state ``failed``, with
the reason.  A stage that exits with :data:`EXIT_NO_SPACE` (the disk is
full) fails the run at once: a restart would only fail the same way.

States
------
``starting`` (stages being started; the denoise stage loads its model
first), ``running``, ``stopping`` (:meth:`Run.request_stop`: the capture is
sent SIGTERM and ends its stream cleanly, so the others finish what was
captured), ``finished``, ``failed``, ``interrupted`` (its processes stopped
before the run was complete: the daemon died, or a stop had to terminate
them; :meth:`Supervisor.resume` completes it).  The state, options,
reason, restarts and pids are kept in ``RUN_DIR/daemon-run.json``
(:data:`RUN_RECORD`), rewritten atomically on every change, so that a new
:class:`Supervisor` lists earlier runs.

Threads
-------
Stage processes arm a parent-death guard (:mod:`~cemi_stream.daemon.lifecycle`)
that Linux ties to the *thread* that spawned them, so every process of a run
is spawned by the thread that drives it, which ends only after all of them
have exited.  The public methods of :class:`Supervisor` may be called from
any thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .. import __version__
from ..capture.spool import SPOOL_DIR
from ..errors import CemiError
from ..stitch.feed import DENOISED_DIR
from . import standby
from .lifecycle import spawn
from .options import RunOptions
from .stages import ANALYSIS_DIR, ANALYZE, CAPTURE, DENOISE, stage_commands

log = logging.getLogger(__name__)

RUN_RECORD = "daemon-run.json"
RUNS_DIR = "runs"
STATES = ("starting", "running", "stopping", "finished", "failed", "interrupted")
ACTIVE = ("starting", "running", "stopping")
# Longest wait for the denoise process to load its model and bind its bus, seconds.
DENOISE_READY_S = 300.0
# A stage asked to stop gets this long before SIGKILL, seconds.
TERMINATE_GRACE_S = 10.0
# After a stop request, how long the capture's downstream stages may take to
# finish what was captured before they are sent SIGTERM too, seconds.
STOP_DRAIN_S = 60.0
# The first restart comes this soon (a crash is rarely immediate again, and a
# crash loop is still slowed down: the delay doubles per recent restart).
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
POLL_S = 0.05
# A stage's warm spare (cemi_stream.daemon.standby) is started this long after
# the stage (re)started, seconds: after its first start so that the spares'
# imports do not compete with the stages' own, and after a restart so that
# the restarted stage catches up first.
SPARE_DELAY_S = 1.0
SPARE_DELAY_AFTER_RESTART_S = 3.0
# Exit status of a stage that stopped on SIGINT/SIGTERM (cemi_stream.cli.EXIT_INTERRUPTED).
EXIT_INTERRUPTED = 130
# Exit status of a stage that ran out of disk space (cemi_stream.cli.EXIT_NO_SPACE).
EXIT_NO_SPACE = 28


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus 6 random hex digits (safe as a folder name)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (tmp + fsync + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_line(path: Path) -> str | None:
    """The last non-empty line of a (possibly large) text file, or None."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - 8192, 0))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return None
    return lines[-1].strip() if lines else None


def _describe_exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit {code}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_belongs_to(pid: int, run_dir: Path) -> bool:
    """Whether the live process ``pid`` is one of this run's (its command line names the run)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return _pid_alive(pid)  # no /proc: trust the pid
    return str(run_dir).encode() in cmdline


def read_stage_stats(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The stages' own statistics (``RUN_DIR/stats/STAGE.json``), by stage name.

    Through :func:`cemi_stream.daemon.stats.read_stats`: a stage that has not
    written its file yet is simply absent.
    """
    from .stats import read_stats

    try:
        return read_stats(run_dir)
    except (OSError, ValueError, CemiError):
        return {}


@dataclass
class StageProcess:
    """One stage of a run and its current process.

    Attributes
    ----------
    name : str
        ``capture``, ``denoise``, ``stitch`` or ``analyze``.
    command : list of str
        Its command line.
    proc : subprocess.Popen or None
        The current process (None before the first start).
    state : str
        ``pending``, ``running``, ``restarting``, ``done`` (exited 0, or
        stopped on request), ``stopped`` (terminated before it was done),
        ``failed``.
    restarts : int
        Restarts so far.
    restart_times : list of float
        Monotonic times of recent restarts (for the window).
    exit_code : int or None
        Exit status of the last process that ended.
    last_error : str or None
        The last line of its stderr when it last failed.
    restart_at : float or None
        Monotonic time of a scheduled restart.
    spare : subprocess.Popen or None
        The stage's warm spare (:mod:`~cemi_stream.daemon.standby`), if any.
    spare_at : float or None
        Monotonic time at which a spare is to be started.
    """

    name: str
    command: list[str]
    proc: subprocess.Popen[bytes] | None = None
    state: str = "pending"
    restarts: int = 0
    restart_times: list[float] = field(default_factory=list)
    exit_code: int | None = None
    last_error: str | None = None
    restart_at: float | None = None
    started_at: float = 0.0
    signalled_at: float | None = None
    spare: subprocess.Popen[bytes] | None = None
    spare_at: float | None = None

    @property
    def pid(self) -> int | None:
        """Pid of the current process, while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def spare_pid(self) -> int | None:
        """Pid of its warm spare, while there is one."""
        return self.spare.pid if self.spare is not None and self.spare.poll() is None else None


class Run:
    """One run's stage processes, driven to their end (see the module docstring).

    Parameters
    ----------
    run_id : str
        The run's id.
    run_dir : Path
        Its run directory (created).
    options : RunOptions
        Its options.
    max_restarts : int
        Restarts of one stage allowed within ``restart_window_s``; 0: a
        stage that fails fails the run (``replay``).
    restart_window_s : float
        The window, seconds.
    heartbeat_timeout_s : float or None
        A running stage whose heartbeat is older than this is killed and
        restarted; None: exit status only.
    model_path : Path or None
        The denoiser's resolved weights file (resolved here when None).
    record : bool
        Keep ``RUN_DIR/daemon-run.json`` (the daemon; ``replay`` does not).
    resume : bool
        Start only the stages that have not completed, each resuming from
        its own record.
    spares : bool
        Keep a warm spare process per stage (:mod:`~cemi_stream.daemon.standby`)
        so that a restart skips the imports; only when ``max_restarts > 0``.
    """

    def __init__(
        self,
        run_id: str,
        run_dir: Path,
        options: RunOptions,
        *,
        max_restarts: int = 5,
        restart_window_s: float = 60.0,
        heartbeat_timeout_s: float | None = 30.0,
        model_path: Path | None = None,
        record: bool = True,
        resume: bool = False,
        created: float | None = None,
        spares: bool = False,
    ) -> None:
        self.id = run_id
        self.run_dir = Path(run_dir)
        self.options = options
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.record = record
        self.resume = resume
        self.spares = spares and max_restarts > 0
        self.state = "starting"
        self.reason: str | None = None
        self.culprit: str | None = None
        self.created = time.time() if created is None else created
        self.started: float | None = None
        self.ended: float | None = None
        self.wall_s: float | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._nothing_captured = False  # stopped before the capture's bus came up
        self._stop_deadline: float | None = None
        commands = stage_commands(options, self.run_dir, model_path=model_path)
        self.stages: dict[str, StageProcess] = {
            name: StageProcess(name, cmd) for name, cmd in commands.items()
        }
        self.thread: threading.Thread | None = None

    # -- state ------------------------------------------------------------------

    def _set_state(self, state: str, reason: str | None = None) -> None:
        with self._lock:
            self.state = state
            if reason is not None:
                self.reason = reason
            self.save()

    def save(self) -> None:
        """Rewrite ``RUN_DIR/daemon-run.json`` (when this run keeps one)."""
        if not self.record:
            return
        with self._lock:
            data = {
                "id": self.id,
                "cemi_stream": __version__,
                "options": self.options.to_dict(),
                "state": self.state,
                "reason": self.reason,
                "created": self.created,
                "started": self.started,
                "ended": self.ended,
                "daemon_pid": os.getpid(),
                "stages": {
                    s.name: {
                        "pid": s.pid,
                        "state": s.state,
                        "restarts": s.restarts,
                        "exit_code": s.exit_code,
                        "last_error": s.last_error,
                    }
                    for s in self.stages.values()
                },
            }
            try:
                _write_json(self.run_dir / RUN_RECORD, data)
            except OSError as exc:
                # The run goes on (its stages write their own records); say so loudly.
                log.error("run %s: cannot write %s (%s)", self.id, RUN_RECORD, exc)

    @property
    def active(self) -> bool:
        """True while the run's processes are being driven."""
        return self.state in ACTIVE

    def request_stop(self) -> None:
        """Stop the run cleanly: the capture ends its stream, the others finish.

        Returns at once; :meth:`drive` does the work.  Stages still running
        ``STOP_DRAIN_S`` after the capture are sent SIGTERM.
        """
        with self._lock:
            if not self.active or self._stop.is_set():
                return
            self._stop.set()
            self._stop_deadline = time.monotonic() + STOP_DRAIN_S
            self.state = "stopping"
            self.save()

    # -- driving ------------------------------------------------------------------

    def start_thread(self) -> None:
        """Drive the run in its own (monitor) thread, which spawns every stage process."""
        self.thread = threading.Thread(target=self._drive_logged, name=f"run-{self.id}")
        self.thread.start()

    def _drive_logged(self) -> None:
        try:
            self.drive()
        except Exception as exc:  # never let a monitor thread die silently
            log.exception("run %s: supervisor error", self.id)
            with contextlib.suppress(Exception):
                self._kill_all()
            self.ended = time.time()
            self._set_state("failed", f"supervisor error: {type(exc).__name__}: {exc}")

    def drive(self, tick: Callable[[Run], None] | None = None) -> None:
        """Start the stages and follow them until all have exited.

        Parameters
        ----------
        tick : callable or None
            Called with this run about five times a second (progress).

        Ends in state ``finished``, ``failed`` or ``interrupted``; the
        processes are always gone when it returns (SIGTERM, then SIGKILL
        after ``TERMINATE_GRACE_S``, on errors and KeyboardInterrupt too).
        """
        t0 = time.monotonic()
        self.started = time.time()
        self._set_state("starting")
        try:
            with contextlib.ExitStack() as files:
                mode = "a" if self.resume else "w"
                logs = {
                    name: files.enter_context(
                        open(self.run_dir / f"{name}.stderr", mode, encoding="utf-8")
                    )
                    for name in self.stages
                }
                self._follow(logs, tick)
        finally:
            self._kill_all()
            self.wall_s = time.monotonic() - t0
            self.ended = time.time()
        self._conclude()

    def _spawn(self, stage: StageProcess, log_file: IO[str]) -> None:
        command = stage.command
        if stage.name == CAPTURE and (self.run_dir / SPOOL_DIR).exists():
            # A restarted (or resumed) capture continues its spool; a summary
            # left by a stopped one would tell the consumers it had finished.
            command = [*command, "--resume"]
            (self.run_dir / "capture.json").unlink(missing_ok=True)
        spare, stage.spare = stage.spare, None
        args = standby.handoff_args(command)
        how = "started"
        if spare is not None and args is not None and standby.hand_over(spare, args):
            stage.proc, how = spare, "started from its warm spare"
        else:
            if spare is not None:
                standby.retire(spare)
            stage.proc = spawn(
                command, stdout=subprocess.DEVNULL, stderr=log_file, run_dir=self.run_dir
            )
        restarted = stage.state == "restarting"
        stage.state = "running"
        stage.started_at = time.monotonic()
        stage.restart_at = None
        if self.spares and args is not None:
            delay = SPARE_DELAY_AFTER_RESTART_S if restarted else SPARE_DELAY_S
            stage.spare_at = stage.started_at + delay
        level = logging.INFO if self.record else logging.DEBUG  # replay stays quiet
        log.log(level, "run %s: %s %s (pid %d)", self.id, stage.name, how, stage.proc.pid)
        self.save()

    def _tend_spares(self, logs: dict[str, IO[str]], now: float) -> None:
        """Start the spares that are due; let go of those of stages that ended."""
        for name, stage in self.stages.items():
            if stage.state in ("done", "stopped", "failed") or self._stop.is_set():
                self._retire_spare(stage)
            elif (
                stage.state == "running"
                and stage.spare is None
                and stage.spare_at is not None
                and now >= stage.spare_at
            ):
                stage.spare_at = None
                stage.spare = standby.start_spare(name, logs[name], self.run_dir)

    @staticmethod
    def _retire_spare(stage: StageProcess) -> None:
        stage.spare_at = None
        if stage.spare is not None:
            spare, stage.spare = stage.spare, None
            standby.retire(spare)

    def _complete(self, name: str) -> bool:
        """Whether stage ``name`` finished in an earlier process (resume)."""
        if name == DENOISE:
            return (self.run_dir / DENOISED_DIR / "denoise.json").is_file()
        if name == ANALYZE:
            data = _read_json(self.run_dir / ANALYSIS_DIR / "analysis.json") or {}
            return "live" in data  # written by the stage's final step only
        if name == CAPTURE:
            data = _read_json(self.run_dir / "capture.json") or {}
            summary = data.get("summary", {})
            return summary.get("stopped_by") == "end_of_source" and not summary.get("error")
        return False

    def _follow(self, logs: dict[str, IO[str]], tick: Callable[[Run], None] | None) -> None:
        if self.resume:
            for name, stage in self.stages.items():
                if self._complete(name):
                    stage.state = "done"
                    stage.exit_code = 0
        denoise = self.stages.get(DENOISE)
        if denoise is not None and denoise.state == "pending":
            (self.run_dir / DENOISED_DIR / "bus.json").unlink(missing_ok=True)
            self._spawn(denoise, logs[DENOISE])
            assert denoise.proc is not None
            ready = self.run_dir / DENOISED_DIR / "bus.json"
            deadline = time.monotonic() + DENOISE_READY_S
            while not ready.exists() and denoise.proc.poll() is None:
                if self._stop.is_set():
                    return
                if time.monotonic() > deadline:
                    self._fail(
                        DENOISE,
                        f"denoise process not ready after {DENOISE_READY_S:.0f} s "
                        f"(see {self.run_dir / 'denoise.stderr'})",
                    )
                    return
                time.sleep(0.05)
            if denoise.proc.poll() is not None and denoise.proc.returncode != 0:
                # Failed before anything was captured (a bad model or backend): no restart.
                denoise.exit_code = denoise.proc.returncode
                self._stage_failed(denoise, restart=False)
                return
        for name, stage in self.stages.items():
            if stage.state == "pending":
                self._spawn(stage, logs[name])
        self._set_state("running" if not self._stop.is_set() else "stopping")
        last_tick = 0.0
        while True:
            now = time.monotonic()
            for stage in self.stages.values():
                self._watch(stage, now)
            if self.state == "failed":
                return
            for name, stage in self.stages.items():
                if stage.state == "restarting" and stage.restart_at is not None:
                    if self._stop.is_set():
                        stage.state = "stopped"
                    elif now >= stage.restart_at:
                        self._spawn(stage, logs[name])
            if self._stop.is_set():
                self._advance_stop(now)
            if self.spares:
                self._tend_spares(logs, now)
            if all(s.state in ("done", "stopped", "failed") for s in self.stages.values()):
                return
            if tick is not None and now - last_tick >= 0.2:
                tick(self)
                last_tick = now
            time.sleep(POLL_S)

    def _watch(self, stage: StageProcess, now: float) -> None:
        """Look at one stage: exited (done, failed, to restart) or hung (heartbeat)."""
        proc = stage.proc
        if proc is None or stage.state != "running":
            return
        code = proc.poll()
        if code is None:
            if self._hung(stage, now):
                log.warning("run %s: %s heartbeat lost; killing it", self.id, stage.name)
                proc.kill()
                proc.wait()
                stage.last_error = f"no heartbeat for {self.heartbeat_timeout_s:.0f} s"
                stage.exit_code = proc.returncode
                self._stage_failed(stage, restart=True, why=stage.last_error)
            return
        stage.exit_code = code
        if code == 0:
            stage.state = "done"
            self.save()
        elif self._stop.is_set() and code in (EXIT_INTERRUPTED, -signal.SIGTERM):
            stage.state = "done" if stage.name == CAPTURE else "stopped"
            self.save()
        elif code == EXIT_NO_SPACE:
            # A full disk is not cured by a restart: the run fails at once, and
            # what is on disk (spool, journal) stays as the stages left it.
            self._stage_failed(stage, restart=False)
        else:
            self._stage_failed(stage, restart=True)

    def _hung(self, stage: StageProcess, now: float) -> bool:
        if self.heartbeat_timeout_s is None or stage.proc is None:
            return False
        if now - stage.started_at < self.heartbeat_timeout_s:
            return False
        stats = read_stage_stats(self.run_dir).get(stage.name)
        if not stats or stats.get("pid") != stage.proc.pid:
            return False  # no heartbeat of this process yet: exit status only
        beat = stats.get("time")
        return isinstance(beat, int | float) and time.time() - beat > self.heartbeat_timeout_s

    def _stage_failed(self, stage: StageProcess, *, restart: bool, why: str | None = None) -> None:
        """A stage died: schedule its restart, or give the run up."""
        code = stage.exit_code if stage.exit_code is not None else -1
        line = why or _last_line(self.run_dir / f"{stage.name}.stderr")
        if not line and code == EXIT_NO_SPACE:
            # Its stderr is on the full disk too: the exit status is all there is.
            line = (
                f"{os.strerror(errno.ENOSPC)} (exit status {EXIT_NO_SPACE}, "
                "nothing could be logged)"
            )
        stage.last_error = line or f"no error output (see {self.run_dir / stage.name}.stderr)"
        message = f"{stage.name} process failed ({_describe_exit(code)}): {stage.last_error}"
        now = time.monotonic()
        recent = [t for t in stage.restart_times if now - t < self.restart_window_s]
        if not restart or self.max_restarts <= 0 or self._stop.is_set():
            self._fail(stage.name, message)
            return
        if len(recent) >= self.max_restarts:
            self._fail(
                stage.name,
                f"{message}; gave up after {len(recent)} restarts in {self.restart_window_s:.0f} s",
            )
            return
        delay = min(BACKOFF_FIRST_S * 2 ** len(recent), BACKOFF_MAX_S)
        recent.append(now)
        stage.restart_times = recent
        stage.restarts += 1
        stage.state = "restarting"
        stage.restart_at = now + delay
        log.warning("run %s: %s; restarting in %.1f s", self.id, message, delay)
        self.save()

    def _fail(self, culprit: str, reason: str) -> None:
        stage = self.stages[culprit]
        stage.state = "failed"
        self.culprit = culprit
        # replay (no record) reports the failure itself, in one line.
        log.log(
            logging.ERROR if self.record else logging.DEBUG, "run %s failed: %s", self.id, reason
        )
        self._set_state("failed", reason)
        # Nothing more will come through the pipeline: stop the others.
        self._terminate([s for s in self.stages.values() if s.pid is not None])

    def _advance_stop(self, now: float) -> None:
        """During a stop: SIGTERM the capture; the rest after the drain time; SIGKILL last."""
        overdue = self._stop_deadline is not None and now > self._stop_deadline
        capture = self.stages.get(CAPTURE)
        if (
            capture is not None
            and capture.proc is not None
            and capture.proc.poll() is not None
            and not (self.run_dir / "bus.json").exists()
        ):
            # The capture stopped before its bus came up: nothing will reach the
            # others, which would wait for a bus until their timeout.
            overdue = self._nothing_captured = True
        for stage in self.stages.values():
            proc = stage.proc
            if proc is None or proc.poll() is not None:
                continue
            if stage.signalled_at is None and (stage.name == CAPTURE or overdue):
                proc.terminate()
                stage.signalled_at = now
            elif stage.signalled_at is not None and now - stage.signalled_at > TERMINATE_GRACE_S:
                proc.kill()

    def _terminate(self, stages: list[StageProcess]) -> None:
        """SIGTERM ``stages``, wait up to ``TERMINATE_GRACE_S``, then SIGKILL."""
        running = [s.proc for s in stages if s.proc is not None and s.proc.poll() is None]
        for p in running:
            p.terminate()
        deadline = time.monotonic() + TERMINATE_GRACE_S
        for p in running:
            try:
                p.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                p.kill()  # e.g. a stitcher still waiting for frames that will never come
                p.wait()
        for s in stages:
            if s.proc is not None and s.state == "running":
                s.exit_code = s.proc.returncode
                s.state = "stopped"

    def _kill_all(self) -> None:
        for stage in self.stages.values():
            self._retire_spare(stage)
        self._terminate(list(self.stages.values()))

    def _conclude(self) -> None:
        """The final state once every process has exited."""
        if self.state == "failed":
            self.save()
            return
        if self._nothing_captured and self._stop.is_set():
            self._set_state("finished", "stopped on request (before anything was captured)")
        elif all(s.state == "done" for s in self.stages.values()):
            reason = "stopped on request" if self._stop.is_set() else None
            self._set_state("finished", reason)
        else:
            unfinished = ", ".join(n for n, s in self.stages.items() if s.state != "done")
            self._set_state("interrupted", f"stopped before the end ({unfinished} unfinished)")

    # -- reporting -----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The ``GET /api/runs/{id}`` object (see :meth:`Supervisor.get`)."""
        with self._lock:
            stages = {
                s.name: {
                    "pid": s.pid,
                    "state": s.state,
                    "restarts": s.restarts,
                    "exit_code": s.exit_code,
                    "last_error": s.last_error,
                    "spare_pid": s.spare_pid,
                }
                for s in self.stages.values()
            }
            base = {
                "id": self.id,
                "name": self.options.name,
                "state": self.state,
                "reason": self.reason,
                "run_dir": str(self.run_dir),
                "created": self.created,
                "started": self.started,
                "ended": self.ended,
                "options": self.options.to_dict(),
            }
        return _with_results(base, stages, self.run_dir)


def _with_results(
    base: dict[str, Any], stages: dict[str, dict[str, Any]], run_dir: Path
) -> dict[str, Any]:
    """Add the stages' statistics, the counts and the mosaic shape to a run's object."""
    stats = read_stage_stats(run_dir)
    now = time.time()
    for name, entry in stages.items():
        st = stats.get(name, {})
        entry["frames_in"] = st.get("frames_in")
        entry["frames_out"] = st.get("frames_out")
        entry["frames_per_s"] = st.get("frames_per_s")
        entry["queue_depth"] = st.get("queue_depth")
        entry["dropped"] = st.get("dropped", {})
        if entry.get("last_error") is None and st.get("last_error"):
            entry["last_error"] = st.get("last_error")
        beat = st.get("time")
        entry["heartbeat_age_s"] = round(now - beat, 3) if isinstance(beat, int | float) else None
    counts, shape = _counts(run_dir)
    return {**base, "stages": stages, "counts": counts, "mosaic_shape": shape}


#: positions.csv -> (device, inode, bytes counted, counts): what is already counted.
_COUNTED: dict[Path, tuple[int, int, int, dict[str, int]]] = {}
_COUNTED_LOCK = threading.Lock()


def _position_counts(path: Path) -> dict[str, int]:
    """Frames by status in ``positions.csv``, counting only the lines added since last time.

    The stitcher only appends to the file while it runs and replaces it (a new
    inode) when it rewrites it, so an unchanged inode that is not shorter than
    what was counted means the counted part still stands.  Status requests at
    10/s on a paper-sized run would otherwise re-read ~4,000 lines each time.
    """
    zero = {"placed": 0, "predicted": 0, "skipped": 0}
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            with _COUNTED_LOCK:
                known = _COUNTED.get(path)
            if (
                known is None
                or (known[0], known[1]) != (st.st_dev, st.st_ino)
                or st.st_size < known[2]
            ):
                known = (st.st_dev, st.st_ino, 0, zero)
            offset, counts = known[2], dict(known[3])
            f.seek(offset)
            data = f.read()
    except OSError:
        return zero
    complete = data.rfind(b"\n") + 1  # a line being written is counted once it is whole
    lines = data[:complete].split(b"\n")[:-1]
    if offset == 0 and lines:
        lines = lines[1:]  # the header
    for line in lines:
        status = line.rsplit(b",", 1)[-1].decode("ascii", "replace")
        if status in counts:
            counts[status] += 1
    with _COUNTED_LOCK:
        _COUNTED[path] = (st.st_dev, st.st_ino, offset + complete, counts)
    return dict(counts)


def _counts(run_dir: Path) -> tuple[dict[str, int], list[int] | None]:
    """Placed / predicted / skipped frames and the mosaic shape, as far as known."""
    counts = _position_counts(run_dir / "positions.csv")
    shape: list[int] | None = None
    stitch = _read_json(run_dir / "stitch.json")
    if stitch is not None:
        summary = stitch.get("summary", {})
        shape = summary.get("mosaic_shape") or None
    capture = (_read_json(run_dir / "capture.json") or {}).get("summary", {})
    if counts["skipped"] == 0 and capture:
        from ..report import skipped_count

        counts["skipped"] = skipped_count(
            capture.get("reasons", {}), capture.get("kept", 0), capture.get("frames_in", 0)
        )
    return counts, shape
