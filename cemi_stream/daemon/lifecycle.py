"""No process outlives its parent: the parent-death guard, and guarded spawning.

A stage process (and the render process a stitcher spawns) calls
:func:`arm_parent_guard` first thing.  From then on, when its parent dies -
cleanly, by a crash, or by ``kill -9`` - the process gets SIGTERM, which
every stage handles by stopping cleanly (the capture closes its spool and
ends its stream, the stitcher commits its journal, the denoise stage commits
its spool); if it is still alive ``grace_s`` later it is killed.

Two mechanisms, so that neither a race nor a platform gap leaves an orphan:

* on Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` through :mod:`ctypes`: the
  kernel signals the process the moment its parent dies.  Since the parent
  may have died *before* the call, the guard then compares ``os.getppid()``
  with the expected parent's pid (the environment variable
  :data:`PARENT_ENV`, set by :func:`spawn`, or an explicit argument) and
  stops at once when they differ;
* a watchdog thread that polls ``os.getppid()`` every ``poll_s`` seconds
  (every platform), sends SIGTERM to its own process when the parent is gone,
  and SIGKILL after ``grace_s`` more if the process is still there.

.. warning::

   Linux delivers the parent-death signal when the *thread* that created the
   child exits, not the process.  A parent must therefore start its guarded
   children from a thread that lives at least as long as they do: the main
   thread, or (in the daemon) the run's own monitor thread, which only ends
   once every stage process of the run has exited.  Never spawn a stage from
   a short-lived worker thread (an HTTP request handler, a thread pool).
   :func:`arm_parent_guard` arms only when the parent said so through
   :data:`PARENT_ENV` (or an explicit ``parent_pid``): a stage started by
   hand from a shell, or a stage function called inside another program
   (tests), is left alone.  The variable is removed from the environment
   once read, so that grandchildren do not inherit a pid that is not their
   parent's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

# The pid of the process that spawned this one, set by spawn() in the child's environment.
PARENT_ENV = "CEMI_PARENT_PID"
# Marks every process of a run (tests find leftovers by it): the run directory.
RUN_ENV = "CEMI_RUN_DIR"
PR_SET_PDEATHSIG = 1

_armed = False
_lock = threading.Lock()


def _set_pdeathsig(signum: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, signum)``; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        result = libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):
        return False
    if result != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def expected_parent(*, consume: bool = False) -> int | None:
    """The parent pid announced in :data:`PARENT_ENV`, or None when absent or malformed.

    Parameters
    ----------
    consume : bool
        Also remove the variable from this process's environment.
    """
    text = os.environ.pop(PARENT_ENV, "") if consume else os.environ.get(PARENT_ENV, "")
    return int(text) if text.isdigit() and int(text) > 1 else None


def arm_parent_guard(
    parent_pid: int | None = None,
    *,
    signum: int = signal.SIGTERM,
    grace_s: float = 10.0,
    poll_s: float = 0.5,
) -> bool:
    """Make this process stop when its parent dies (see the module docstring).

    Call it first thing in a child process; calling it again does nothing.

    Parameters
    ----------
    parent_pid : int or None
        The parent this process belongs to.  None takes :data:`PARENT_ENV`
        (set by :func:`spawn`); when that is absent too, nothing is armed.
    signum : int
        The signal sent when the parent is gone (SIGTERM: a clean stop).
    grace_s : float
        Seconds between that signal and SIGKILL, if the process is still alive.
    poll_s : float
        Watchdog polling period, seconds.

    Returns
    -------
    bool
        True when the guard was armed (now or by an earlier call).
    """
    global _armed
    parent = parent_pid if parent_pid is not None else expected_parent(consume=True)
    if parent is None:
        return _armed
    with _lock:
        if _armed:
            return True
        _armed = True
    if not _set_pdeathsig(signum):
        log.debug("no parent-death signal on this platform: watchdog only")
    watchdog = threading.Thread(
        target=_watch, args=(parent, signum, grace_s, poll_s), name="parent-guard", daemon=True
    )
    watchdog.start()
    if os.getppid() != parent:
        # The parent died before prctl took effect (or before we were told of it).
        _parent_gone(parent, signum, grace_s)
    return True


def _watch(parent: int, signum: int, grace_s: float, poll_s: float) -> None:
    """Watchdog thread body: poll the parent, stop this process when it is gone."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    _parent_gone(parent, signum, grace_s)


_gone = threading.Event()


def _parent_gone(parent: int, signum: int, grace_s: float) -> None:
    """Signal this process, and kill it if it has not stopped after ``grace_s``."""
    if _gone.is_set():
        return
    _gone.set()
    log.warning("parent process %d is gone: stopping", parent)
    os.kill(os.getpid(), signum)

    def _reaper() -> None:
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=_reaper, name="parent-guard-kill", daemon=True).start()


def guarded_env(
    env: Mapping[str, str] | None = None, *, run_dir: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """The environment of a guarded child: ``env`` (default ours) plus :data:`PARENT_ENV`.

    Parameters
    ----------
    env : Mapping or None
        Base environment; None copies this process's.
    run_dir : path or None
        Recorded as :data:`RUN_ENV`, so that every process of a run can be found.
    """
    out = dict(os.environ if env is None else env)
    out[PARENT_ENV] = str(os.getpid())
    if run_dir is not None:
        out[RUN_ENV] = os.fspath(run_dir)
    return out


def spawn(
    command: Sequence[str],
    *,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = None,
    env: Mapping[str, str] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: int | IO[Any] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a child process that will arm its parent-death guard against us.

    Call it from a thread that outlives the child (see the module docstring).

    Parameters
    ----------
    command : sequence of str
        The command line.
    stdout, stderr : file, int or None
        As for :class:`subprocess.Popen`.
    env : Mapping or None
        Base environment (default: ours).
    run_dir : path or None
        Marks the child's environment with :data:`RUN_ENV`.
    cwd : path or None
        Working directory.
    stdin : file, int or None
        As for :class:`subprocess.Popen` (None: inherited).
    """
    return subprocess.Popen(
        list(command),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=guarded_env(env, run_dir=run_dir),
        cwd=cwd,
        close_fds=True,
    )


def run_processes(run_dir: str | os.PathLike[str]) -> list[int]:
    """Pids of the live processes of a run: those whose environment names it in :data:`RUN_ENV`.

    Every stage process and every process it starts inherits the mark, so an
    empty list after a run (or after a ``kill -9`` at any level) means no
    orphan is left.  Zombies are not counted; on systems without ``/proc``
    the list is empty.
    """
    needle = f"{RUN_ENV}={os.fspath(run_dir)}".encode() + b"\0"
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes() + b"\0"
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in environ and state != "Z":
            found.append(int(entry.name))
    return found
