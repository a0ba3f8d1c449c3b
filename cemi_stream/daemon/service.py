"""``serve``: the daemon process - data directory, token, control API server, clean stop.

``python run_daemon.py serve [--host 127.0.0.1] [--port 8750] [--data-dir DIR]
[--public-read] [--config FILE] [--allow-dir DIR]...`` runs in the foreground,
logs to stderr, and serves the control API (:mod:`~cemi_stream.daemon.api`)
over one :class:`~cemi_stream.daemon.supervisor.Supervisor` until SIGTERM or
SIGINT; then it stops every run cleanly (``Supervisor.shutdown``) and exits 0.

The data directory (default ``./cemi-data``) holds:

* ``daemon.json``: ``url``, ``host``, ``port`` (the real one, also with
  ``--port 0``), ``pid``, ``started`` (unix s), ``started_utc``, ``version``,
  ``public_read``, ``data_dir`` and ``state`` (``running``; ``stopped`` with
  ``stopped`` time after a clean exit).  Written once the socket listens, so a
  client that finds ``state: running`` can connect.  With a wildcard host
  (``0.0.0.0``, ``::``) ``url`` names the loopback address (it is read by
  local clients);
* ``token``: the API token, created on first start (256 random bits,
  URL-safe text, mode 0600) and kept afterwards;
* ``daemon.lock``: held (``flock``) while a daemon serves the directory, so a
  second daemon on the same directory refuses to start;
* ``runs/RUN_ID/``: one run directory per run, laid out as ``replay`` lays
  out its own.

Token rules (what "a non-loopback --host without a token refuses to start"
means here): every mutating request always needs the token, and the token
file always exists once the daemon has started, so the only way to serve
without a token is ``--public-read`` (reads need none).  Hence:

* a non-loopback ``--host`` together with ``--public-read`` refuses to start
  (the network would read every run without a token);
* the token file must hold at least :data:`MIN_TOKEN_CHARS` printable,
  non-blank ASCII characters and be readable by its owner only; a weak,
  empty or group/world-readable token refuses to start on any host
  (delete the file to have a new one made, or ``chmod 600`` it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from .. import __version__
from ..errors import ConfigError, DaemonError

log = logging.getLogger(__name__)

DAEMON_FILE = "daemon.json"
TOKEN_FILE = "token"
LOCK_FILE = "daemon.lock"
DEFAULT_DATA_DIR = Path("cemi-data")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8750
#: Shortest accepted API token, characters.
MIN_TOKEN_CHARS = 32
#: How long a stop (SIGTERM/SIGINT) waits for the runs to finish cleanly, seconds.
SHUTDOWN_TIMEOUT_S = 60.0
#: Longest request line plus headers the HTTP server buffers, bytes.
MAX_HEADER_BYTES = 16 * 1024
#: Most connections served at once (503 beyond).
MAX_CONNECTIONS = 128


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only reaches this machine.

    A name counts as loopback when every address it resolves to is one;
    a name that does not resolve is not.
    """
    text = host.strip().strip("[]")
    if text.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(text, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses
    )


def check_host(host: str, *, public_read: bool) -> None:
    """Refuse a non-loopback ``host`` that would serve reads without a token.

    Raises
    ------
    ConfigError
        ``--host`` is not loopback and ``public_read`` is set.
    """
    if public_read and not is_loopback(host):
        raise ConfigError(
            f"--host {host}: not a loopback address, and --public-read would let the network "
            "read every run without a token; drop --public-read (clients then send the token)"
        )


def _check_token_text(path: Path, text: str) -> str:
    token = text.strip()
    if len(token) < MIN_TOKEN_CHARS or not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError(
            f"{path}: the API token must be at least {MIN_TOKEN_CHARS} printable ASCII "
            "characters without spaces; delete the file to have a new one made"
        )
    return token


def ensure_token(data_dir: Path) -> tuple[str, bool]:
    """The API token of ``data_dir``, created (mode 0600) when there is none.

    Returns
    -------
    (str, bool)
        The token, and whether it was created now.

    Raises
    ------
    ConfigError
        A token file readable by others, or a weak token (see the module docstring).
    DaemonError
        The token file cannot be written or read.
    """
    path = data_dir / TOKEN_FILE
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DaemonError(f"{path}: cannot create the API token ({exc.strerror})") from None
    else:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, (token + "\n").encode("ascii"))
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise DaemonError(f"{path}: cannot write the API token ({exc.strerror})") from None
        os.close(fd)
        return token, True
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"{path}: readable by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run: chmod 600 {path}"
            )
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise DaemonError(f"{path}: cannot read the API token ({exc.strerror})") from None
    return _check_token_text(path, text), False


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename).

    Raises
    ------
    OSError
        The write failed (the old file, if any, is left as it was).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _url(host: str, port: int) -> str:
    text = host.strip().strip("[]")
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(text)
        if address.is_unspecified:
            text = "::1" if address.version == 6 else "127.0.0.1"
        if ipaddress.ip_address(text).version == 6:
            return f"http://[{text}]:{port}"
    return f"http://{text}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port).

    Raises
    ------
    DaemonError
        The address cannot be resolved or bound (in use, not ours).
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be 0..65535")
    text = host.strip().strip("[]")
    try:
        infos = socket.getaddrinfo(text, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise DaemonError(f"--host {host}: cannot be resolved ({exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise DaemonError(f"{host}:{port}: cannot listen ({exc.strerror or exc})") from None
    sock.set_inheritable(False)
    return sock


@contextlib.contextmanager
def lock_data_dir(data_dir: Path) -> Generator[IO[str], None, None]:
    """Hold ``DATA_DIR/daemon.lock`` for the block: one daemon per data directory.

    Raises
    ------
    DaemonError
        Another process holds the lock (its pid and url are named when known).
    """
    path = data_dir / LOCK_FILE
    try:
        f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the block
    except OSError as exc:
        raise DaemonError(f"{path}: cannot open the lock file ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise DaemonError(f"{path}: cannot lock ({exc.strerror})") from None
            info = read_daemon_file(data_dir) or {}
            raise DaemonError(
                f"{data_dir}: another daemon (pid {info.get('pid', '?')}, "
                f"{info.get('url', 'url unknown')}) already serves this data directory"
            ) from None
        yield f
    finally:
        f.close()  # releases the lock


def read_daemon_file(data_dir: Path) -> dict[str, Any] | None:
    """``DATA_DIR/daemon.json`` as a dict, or None when absent or unreadable."""
    try:
        data = json.loads((data_dir / DAEMON_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _make_server(app: Any, *, limit_concurrency: int) -> Any:
    """A uvicorn server for ``app`` that leaves signal handling to :func:`serve`."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            # serve() installs its own handlers (and uvicorn would re-raise the
            # signal after its shutdown, killing us before the runs are stopped).
            yield

    config = uvicorn.Config(
        app,
        http="h11",
        loop="asyncio",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=True,
        limit_concurrency=limit_concurrency,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    return _Server(config)


def serve(
    data_dir: Path = DEFAULT_DATA_DIR,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    public_read: bool = False,
    config_file: str | None = None,
    allow_dirs: Sequence[Path] = (),
    shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S,
    max_restarts: int = 5,
    restart_window_s: float = 60.0,
) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns the exit code.

    Parameters
    ----------
    data_dir : Path
        The data directory (created): ``daemon.json``, ``token``, ``runs/``.
    host : str
        Address to listen on (default loopback; see the module docstring for
        the token rules off loopback).
    port : int
        TCP port; 0 picks a free one (recorded in ``daemon.json``).
    public_read : bool
        Reads need no token.
    config_file : str or None
        TOML configuration given to every run that names none (checked now).
    allow_dirs : sequence of Path
        Folders outside the data directory that run sources, models and
        configuration files may come from.
    shutdown_timeout_s : float
        How long a stop waits for the runs to finish cleanly before they are
        terminated (and listed ``interrupted``), seconds.
    max_restarts, restart_window_s : int, float
        The supervisor's restart policy.

    Returns
    -------
    int
        0 after a clean stop; 1 if the final ``daemon.json`` could not be written.

    Raises
    ------
    ConfigError
        A bad option (host/token rules, configuration file).
    DaemonError
        The data directory, token, lock or socket cannot be set up.
    """
    from ..config import load_config
    from .api import create_app
    from .supervisor import Supervisor

    check_host(host, public_read=public_read)
    data_dir = Path(data_dir).expanduser()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DaemonError(
            f"{data_dir}: cannot create the data directory ({exc.strerror})"
        ) from None
    data_dir = data_dir.resolve()
    default_config: str | None = None
    if config_file is not None:
        path = Path(config_file).expanduser().resolve()
        load_config(path)  # a bad file fails now, not at the first run
        default_config = str(path)
    roots = []
    for d in allow_dirs:
        root = Path(d).expanduser().resolve()
        if not root.is_dir():
            raise ConfigError(f"--allow-dir {d}: no such folder")
        roots.append(root)
    with lock_data_dir(data_dir):
        token, created = ensure_token(data_dir)
        if created:
            log.info("created the API token %s (mode 0600)", data_dir / TOKEN_FILE)
        supervisor = Supervisor(
            data_dir, max_restarts=max_restarts, restart_window_s=restart_window_s
        )
        app = create_app(
            supervisor, token, public_read=public_read, data_dir=data_dir,
            default_config=default_config, roots=roots,
        )  # fmt: skip
        sock = bind_socket(host, port)
        real_port = int(sock.getsockname()[1])
        server = _make_server(app, limit_concurrency=MAX_CONNECTIONS)
        info: dict[str, Any] = {
            "url": _url(host, real_port),
            "host": host,
            "port": real_port,
            "pid": os.getpid(),
            "started": time.time(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": __version__,
            "public_read": public_read,
            "data_dir": str(data_dir),
            "state": "running",
        }
        signals: list[int] = []

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if signals:
                log.warning("signal %d: already stopping", signum)
            else:
                log.warning("signal %d: stopping the runs and the daemon", signum)
            signals.append(signum)
            server.should_exit = True

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        code = 0
        try:
            try:
                write_json_atomic(data_dir / DAEMON_FILE, info)
            except OSError as exc:
                raise DaemonError(
                    f"{data_dir / DAEMON_FILE}: cannot write ({exc.strerror})"
                ) from None
            where = "" if is_loopback(host) else " (token required for every request)"
            log.info("cemi-stream %s serving %s on %s%s", __version__, data_dir, info["url"], where)
            if not signals:
                server.run(sockets=[sock])
        finally:
            try:
                supervisor.shutdown(shutdown_timeout_s)
            finally:
                sock.close()
                for sig, handler in old.items():
                    signal.signal(sig, handler)
                info.update(state="stopped", stopped=time.time())
                try:
                    write_json_atomic(data_dir / DAEMON_FILE, info)
                except OSError as exc:
                    # A full disk: removing the file still tells clients that no
                    # daemon serves here (and needs no space); else it is an error.
                    try:
                        (data_dir / DAEMON_FILE).unlink()
                        log.warning("%s: cannot mark the daemon stopped (%s); removed it",
                                    data_dir / DAEMON_FILE, exc.strerror)  # fmt: skip
                    except OSError:
                        log.error("%s: cannot mark the daemon stopped (%s)",
                                  data_dir / DAEMON_FILE, exc.strerror)  # fmt: skip
                        code = 1
        log.info("daemon stopped")
    return code


def _threads_left() -> list[str]:
    """Names of non-daemon threads still alive (should be none after a stop)."""
    return [
        t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon
    ]


def main_serve(args: Any) -> int:
    """``serve`` from parsed command-line arguments (see :mod:`cemi_stream.cli`)."""
    code = serve(
        args.data_dir,
        host=args.host,
        port=args.port,
        public_read=args.public_read,
        config_file=args.config,
        allow_dirs=args.allow_dir or (),
    )
    left = _threads_left()
    if left:
        log.warning("threads still running at exit: %s", ", ".join(left))
    sys.stderr.flush()
    return code
