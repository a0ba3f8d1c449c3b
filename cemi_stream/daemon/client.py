"""The command-line client of the daemon: ``start``, ``status``, ``stop`` (and ``resume``).

It talks to the control API (:mod:`~cemi_stream.daemon.api`) over HTTP with
the standard library (no proxy, a timeout on every request).  Where the
daemon is, and its token, come from ``--data-dir DIR`` (``DIR/daemon.json``
and ``DIR/token``; default ``./cemi-data``) or from ``--url URL
--token-file F``.

* ``start SOURCE [--pace native|max|FPS] [replay options] [--name NAME]``
  sends the run's options (the options of ``replay``, taken from the same
  parser definition, see :data:`REPLAY_FIELDS`) and prints the run id as its
  last line.  A SOURCE (or ``--config``/``--model`` path) that exists here is
  sent as an absolute path; the daemon accepts only paths inside its data
  directory (or its ``--allow-dir`` folders);
* ``status [RUN_ID] [--json]``: without an id a short table of the runs;
  with one, a summary of that run; ``--json`` prints the API's object
  exactly (``GET /api/runs/{id}``, or ``{"runs": [...]}`` without an id);
* ``stop RUN_ID``: asks the run to stop cleanly and prints its state;
* ``resume RUN_ID``: completes an ``interrupted`` or ``failed`` run.

A daemon that is not running, or one that refuses a request, gives one line
(:class:`~cemi_stream.errors.DaemonError`) and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import DaemonError
from .service import DAEMON_FILE, DEFAULT_DATA_DIR, TOKEN_FILE, read_daemon_file

#: Seconds to wait for one answer.
TIMEOUT_S = 30.0

#: ``replay``'s option destinations (its parser) -> :class:`RunOptions` fields.
#: ``source``, ``out`` and the common options (``-q``/``-v``) are not run options;
#: ``config`` is the run's ``config_file``.  A test checks that every option of
#: the ``replay`` parser is listed here, so the two cannot drift apart.
REPLAY_FIELDS: dict[str, str] = {
    "denoise": "denoise",
    "model": "model",
    "denoise_workers": "denoise_workers",
    "denoise_listen": "denoise_listen",
    "keyframes": "keyframes",
    "pixel_size_um": "pixel_size_um",
    "layout": "layout",
    "levels": "levels",
    "grid": "grid",
    "order": "order",
    "serpentine": "serpentine",
    "grid_overlap": "overlap",
    "allow_predicted": "allow_predicted",
    "analyze": "analyze",
    "config": "config_file",
}
#: Options ``start`` has beyond ``replay``'s.
START_FIELDS: dict[str, str] = {"pace": "pace", "name": "name"}
#: ``replay`` destinations that are not run options.
NOT_OPTIONS = ("source", "out", "quiet", "verbose", "help", "func", "command")


class DaemonClient:
    """HTTP client of one daemon.

    Parameters
    ----------
    url : str
        The daemon's base URL (``http://127.0.0.1:8750``).
    token : str or None
        The API token (sent as ``Authorization: Bearer``).
    timeout_s : float
        Seconds to wait for each answer.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = TIMEOUT_S):
        if not url.startswith(("http://", "https://")):
            raise DaemonError(f"--url {url}: must start with http:// or https://")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        # Never through a proxy: the daemon is local (or reached directly).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """Send one request; returns the decoded JSON answer.

        Raises
        ------
        DaemonError
            The daemon is not answering, or answered with an error (its
            one-line message).
        """
        data = None if body is None else json.dumps(dict(body)).encode("utf-8")
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise DaemonError(self._refusal(exc)) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
            raise DaemonError(f"no daemon is answering at {self.url} ({text})") from None
        except TimeoutError:
            raise DaemonError(
                f"the daemon at {self.url} did not answer within {self.timeout_s:.0f} s"
            ) from None
        except (ConnectionError, OSError) as exc:
            raise DaemonError(f"the daemon at {self.url}: {exc}") from None
        try:
            return json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, ValueError):
            raise DaemonError(f"the daemon at {self.url} sent an answer that is not JSON") from None

    def _refusal(self, exc: urllib.error.HTTPError) -> str:
        try:
            detail = json.loads(exc.read().decode("utf-8")).get("error")
        except (OSError, ValueError, AttributeError, UnicodeDecodeError):
            detail = None
        detail = detail or exc.reason
        if exc.code == 401:
            hint = "no token given" if not self.token else "wrong token"
            return (
                f"the daemon at {self.url} refused the request ({hint}: {detail}); "
                "use --data-dir DIR or --token-file FILE"
            )
        return str(detail)

    def health(self) -> dict[str, Any]:
        """``GET /api/health``."""
        result: dict[str, Any] = self.request("GET", "/api/health")
        return result

    def runs(self) -> list[dict[str, Any]]:
        """``GET /api/runs``: every run's object."""
        result = self.request("GET", "/api/runs")
        return list(result.get("runs", [])) if isinstance(result, dict) else []

    def run(self, run_id: str) -> dict[str, Any]:
        """``GET /api/runs/{id}``."""
        result: dict[str, Any] = self.request("GET", f"/api/runs/{quote(run_id, safe='')}")
        return result

    def start(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /api/runs``: start a run; returns its object (with ``id``)."""
        result: dict[str, Any] = self.request("POST", "/api/runs", options)
        return result

    def stop(self, run_id: str) -> dict[str, Any]:
        """``POST /api/runs/{id}/stop``."""
        result: dict[str, Any] = self.request("POST", f"/api/runs/{quote(run_id, safe='')}/stop")
        return result

    def resume(self, run_id: str) -> dict[str, Any]:
        """``POST /api/runs/{id}/resume``."""
        result: dict[str, Any] = self.request("POST", f"/api/runs/{quote(run_id, safe='')}/resume")
        return result


def _read_token(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        raise DaemonError(f"{path}: cannot read the API token ({exc.strerror})") from None


def connect(
    data_dir: Path | None = None,
    *,
    url: str | None = None,
    token_file: Path | None = None,
    timeout_s: float = TIMEOUT_S,
) -> DaemonClient:
    """A client for the daemon of ``data_dir``, or at ``url``.

    Parameters
    ----------
    data_dir : Path or None
        The daemon's data directory (``daemon.json``, ``token``); default
        ``./cemi-data`` when ``url`` is None.
    url : str or None
        The daemon's URL (then ``data_dir`` is used only for the token,
        when ``token_file`` is None and it was given).
    token_file : Path or None
        File holding the API token.

    Raises
    ------
    DaemonError
        No daemon recorded in the data directory, or it has stopped.
    """
    token: str | None = None
    if token_file is not None:
        token = _read_token(Path(token_file))
    if url is None:
        data_dir = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR)
        info = read_daemon_file(data_dir)
        if info is None or not isinstance(info.get("url"), str):
            raise DaemonError(
                f"no daemon is running for {data_dir} ({data_dir / DAEMON_FILE} not found); "
                f"start one with: run_daemon.py serve --data-dir {data_dir}"
            )
        if info.get("state") != "running":
            raise DaemonError(
                f"no daemon is running for {data_dir} (the last one, pid {info.get('pid')}, "
                f"stopped); start one with: run_daemon.py serve --data-dir {data_dir}"
            )
        url = info["url"]
    if token is None and data_dir is not None and (Path(data_dir) / TOKEN_FILE).exists():
        token = _read_token(Path(data_dir) / TOKEN_FILE)
    return DaemonClient(url, token, timeout_s=timeout_s)


def wait_until_serving(
    data_dir: Path, *, timeout_s: float = 30.0, pid: int | None = None
) -> DaemonClient:
    """Wait until the daemon of ``data_dir`` answers ``GET /api/health``; its client.

    For scripts and tests that start ``serve`` in the background.

    Parameters
    ----------
    data_dir : Path
        The daemon's data directory.
    timeout_s : float
        Give up after this many seconds.
    pid : int or None
        Wait for the daemon with this pid (not an earlier one's ``daemon.json``).

    Raises
    ------
    DaemonError
        Still not answering after ``timeout_s`` (the last reason is named).
    """
    deadline = time.monotonic() + timeout_s
    last = "daemon.json not written yet"
    while time.monotonic() < deadline:
        info = read_daemon_file(Path(data_dir))
        if info is not None and info.get("state") == "running" and pid in (None, info.get("pid")):
            try:
                client = connect(Path(data_dir), timeout_s=5.0)
                client.health()
                return client
            except DaemonError as exc:
                last = str(exc)
        time.sleep(0.05)
    raise DaemonError(f"{data_dir}: no daemon answering after {timeout_s:.0f} s ({last})")


def _client(args: argparse.Namespace) -> DaemonClient:
    return connect(args.data_dir, url=args.url, token_file=args.token_file)


def _absolute_if_local(text: str) -> str:
    """``text`` as an absolute path when it names a file or folder here; else unchanged."""
    path = Path(text).expanduser()
    if "://" in text or path.is_absolute() or not path.exists():
        return text
    return str(path.resolve())


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run options of a ``start`` command line (only those given).

    Options left at their defaults are not sent: the daemon applies its own
    (``pace`` ``native``, ``denoise`` ``off`` ...).
    """
    out: dict[str, Any] = {"source": _absolute_if_local(args.source)}
    for dest, name in {**REPLAY_FIELDS, **START_FIELDS}.items():
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        if name == "denoise" and value == "off":
            continue
        if name in ("config_file", "model") and isinstance(value, str):
            value = _absolute_if_local(value)
        out[name] = value
    return out


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}{unit}"
    return f"{value}{unit}"


def describe_run(run: Mapping[str, Any]) -> list[str]:
    """A run's object as a few human-readable lines."""
    name = f" ({run['name']})" if run.get("name") else ""
    lines = [f"run {run.get('id')}{name}: {run.get('state')}"]
    if run.get("reason"):
        lines.append(f"  reason: {run['reason']}")
    lines.append(f"  run_dir: {run.get('run_dir')}")
    options = run.get("options") or {}
    if options.get("source"):
        lines.append(f"  source: {options['source']} (pace {options.get('pace')})")
    for stage, st in (run.get("stages") or {}).items():
        if not isinstance(st, Mapping):
            continue
        pid = f" pid {st['pid']}" if st.get("pid") else ""
        line = (
            f"  {stage}: {st.get('state')}{pid}, restarts {_fmt(st.get('restarts'))}, "
            f"frames {_fmt(st.get('frames_in'))} in / {_fmt(st.get('frames_out'))} out, "
            f"{_fmt(st.get('frames_per_s'))} frames/s, queue {_fmt(st.get('queue_depth'))}"
        )
        dropped = st.get("dropped") or {}
        if dropped:
            line += ", dropped " + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()))
        lines.append(line)
        if st.get("last_error"):
            lines.append(f"    last error: {st['last_error']}")
    counts = run.get("counts") or {}
    shape = run.get("mosaic_shape")
    mosaic = f"; mosaic {shape[1]} x {shape[0]} px" if isinstance(shape, list) and shape else ""
    lines.append(
        f"  frames: placed {_fmt(counts.get('placed'))}, predicted "
        f"{_fmt(counts.get('predicted'))}, skipped {_fmt(counts.get('skipped'))}{mosaic}"
    )
    return lines


def runs_table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The runs as a short table (one line each)."""
    if not runs:
        return ["no runs"]
    header = (
        f"{'RUN ID':<24}  {'STATE':<11}  {'PLACED':>6}  {'PRED':>5}  {'SKIP':>5}  NAME / SOURCE"
    )
    lines = [header]
    for run in runs:
        counts = run.get("counts") or {}
        options = run.get("options") or {}
        label = run.get("name") or options.get("source") or ""
        lines.append(
            f"{run.get('id')!s:<24}  {run.get('state')!s:<11}  {_fmt(counts.get('placed')):>6}  "
            f"{_fmt(counts.get('predicted')):>5}  {_fmt(counts.get('skipped')):>5}  {label}"
        )
    return lines


def cmd_start(args: argparse.Namespace) -> int:
    """``start``: start a run on the daemon; prints the run id last."""
    client = _client(args)
    run = client.start(options_from_args(args))
    print(f"started run {run.get('id')} in {run.get('run_dir')}", file=sys.stderr)
    print(run.get("id"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``status``: one run's state (or a table of all runs)."""
    client = _client(args)
    if args.run_id is None:
        runs = client.runs()
        if args.json:
            print(json.dumps({"runs": runs}, indent=2))
        else:
            print("\n".join(runs_table(runs)))
        return 0
    run = client.run(args.run_id)
    print(json.dumps(run, indent=2) if args.json else "\n".join(describe_run(run)))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """``stop``: ask a run to stop cleanly."""
    run = _client(args).stop(args.run_id)
    print(f"run {run.get('id')}: {run.get('state')}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """``resume``: complete an interrupted or failed run."""
    run = _client(args).resume(args.run_id)
    print(f"run {run.get('id')}: {run.get('state')}")
    return 0
