"""Warm spares: a stage restarted after a crash starts from an already-imported process.

Most of a stage process's start is Python importing numpy, zarr, OpenCV and
ZeroMQ (0.4-0.6 s on a quiet 2-core machine) and, for the denoise stage,
torch (1.3-1.6 s, twice that while the other stages load the cores).  A
crashed stage must process frames again within seconds, so while a stage
runs the supervisor keeps one *spare* for it: a process started with

    python -m cemi_stream.daemon.standby MODULE [MODULE ...]

that arms its parent-death guard, imports the stage's modules and then
blocks reading one line from its stdin.  When the stage dies, the supervisor
writes the stage's command line to the spare as one JSON line
(``{"argv": [...]}``: the arguments after ``python -m cemi_stream``) and the
spare runs it as :func:`cemi_stream.cli.main` would in a fresh process.  EOF
on stdin before that (the supervisor retired the spare, or died) makes it
exit 0 at once.

A spare is an ordinary guarded child (:func:`~cemi_stream.daemon.lifecycle.spawn`,
marked with the run directory): it never outlives the run's monitor thread,
and it sits idle (no CPU) until it is used.  Only commands of the form
``PYTHON -m cemi_stream ...`` with this interpreter can be handed to a spare;
any other falls back to a fresh process.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from .lifecycle import arm_parent_guard, spawn

# Longest accepted command line from the supervisor, bytes.
MAX_LINE = 1 << 20
# The modules a spare of each stage imports beforehand (the heavy ones its
# command imports anyway; torch only where the stage needs it).
PRELOAD: dict[str, tuple[str, ...]] = {
    "capture": ("cemi_stream.cli", "cemi_stream.capture.stage"),
    "stitch": ("cemi_stream.cli", "cemi_stream.stitch.stage"),
    "denoise": ("cemi_stream.cli", "cemi_stream.denoise.stage", "torch"),
    "analyze": ("cemi_stream.cli", "cemi_stream.analysis.live"),
}


def handoff_args(command: Sequence[str]) -> list[str] | None:
    """The arguments a spare can run for ``command``, or None when it cannot.

    Parameters
    ----------
    command : sequence of str
        A stage's command line.

    Returns
    -------
    list of str or None
        The arguments after ``PYTHON -m cemi_stream`` when ``PYTHON`` is this
        interpreter, else None.
    """
    if list(command[:3]) == [sys.executable, "-m", "cemi_stream"]:
        return list(command[3:])
    return None


def start_spare(stage: str, stderr: IO[str], run_dir: Path) -> subprocess.Popen[bytes] | None:
    """Start a spare for ``stage`` (None for a stage without a preload list).

    Call it from the run's monitor thread (see :mod:`~cemi_stream.daemon.lifecycle`).

    Parameters
    ----------
    stage : str
        The stage's name (a key of :data:`PRELOAD`).
    stderr : file
        The stage's log file: the spare's errors and, once used, the stage's.
    run_dir : Path
        The run directory (marks the process as the run's).
    """
    modules = PRELOAD.get(stage)
    if modules is None:
        return None
    return spawn(
        [sys.executable, "-m", "cemi_stream.daemon.standby", *modules],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        run_dir=run_dir,
    )


def hand_over(spare: subprocess.Popen[bytes], args: Sequence[str]) -> bool:
    """Give a spare its command line; False when the spare is gone (start afresh)."""
    if spare.poll() is not None or spare.stdin is None:
        return False
    line = json.dumps({"argv": list(args)}).encode() + b"\n"
    try:
        spare.stdin.write(line)
        spare.stdin.close()
    except OSError:  # the spare died meanwhile (a broken pipe)
        retire(spare)
        return False
    return True


def retire(spare: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """Let an unused spare go (EOF on its stdin), and reap it."""
    if spare.stdin is not None:
        with contextlib.suppress(OSError):
            spare.stdin.close()
    try:
        spare.wait(timeout_s)
    except subprocess.TimeoutExpired:
        spare.kill()
        spare.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """The spare process: import ``argv``'s modules, wait for a command line, run it."""
    arm_parent_guard()
    for name in sys.argv[1:] if argv is None else argv:
        importlib.import_module(name)
    line = sys.stdin.buffer.readline(MAX_LINE)
    if not line:
        return 0  # retired unused
    try:
        args = json.loads(line)["argv"]
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise TypeError("argv is not a list of strings")
    except (ValueError, KeyError, TypeError) as exc:
        print(f"error: standby: unusable command line from the supervisor ({exc})", file=sys.stderr)
        return 2
    # The stage owns no stdin (a fresh stage inherits the daemon's, which is
    # not for it either): the pipe is done with.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    from ..cli import main as cli_main

    sys.argv = [str(Path(sys.modules["cemi_stream"].__file__ or "cemi_stream")), *args]
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
