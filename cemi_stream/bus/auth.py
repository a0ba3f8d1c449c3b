"""CURVE security for tcp sockets of the frame bus: key pairs and the authenticator.

A bus on ``tcp://`` that leaves the machine (a denoise worker on another
host) must not accept frames from, or hand frames to, just anyone.  ZeroMQ's
CURVE mechanism encrypts and authenticates each connection; the binding side
is the *server*, and a ZAP handler (:class:`zmq.auth.thread.ThreadAuthenticator`)
admits only client public keys listed in the key folder.

Key folder (``DATA_DIR/keys`` for the daemon, ``RUN_DIR/keys`` for ``replay``)::

    keys/server.key            the server's public key (ZeroMQ certificate format)
    keys/server.key_secret     its secret key, mode 0600
    keys/NAME.key, NAME.key_secret   a local client's key pair (e.g. ``worker``)
    keys/clients/NAME.key      public keys of the admitted clients

Files are in ZeroMQ's certificate format (readable by
:func:`zmq.auth.load_certificate`); public keys may be copied freely, secret
keys never leave their host.  A remote worker makes its own pair
(``python -m cemi_stream.bus.auth keygen DIR NAME``) and its public key is
copied to ``keys/clients/`` on the daemon's host.  Keys are made with
:func:`zmq.curve_keypair`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import stat
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from ..errors import BusError, ConfigError

log = logging.getLogger(__name__)

KEYS_DIR = "keys"
CLIENTS_DIR = "clients"
SERVER = "server"
# Name of the key pair local clients (stages, local workers) use.
LOCAL_CLIENT = "local"
ZAP_DOMAIN = "cemi"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_Z85_KEY = re.compile(rb"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair, Z85-encoded (40 bytes each).

    Attributes
    ----------
    public : bytes
        Public key.
    secret : bytes or None
        Secret key; None for a peer's public key only.
    """

    public: bytes
    secret: bytes | None = None


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(f"key name {name!r}: use letters, digits, '.', '-' or '_'")


def _certificate(public: bytes, secret: bytes | None) -> str:
    lines = [
        "#   ****  CURVE certificate written by cemi-stream  ****",
        "#   ZeroMQ certificate format (zmq.auth.load_certificate)",
        "metadata",
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create ``path`` with ``mode`` (never widened by the umask's absence); refuse to overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create key file ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(path, mode)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write key file ({exc.strerror})") from None


def generate_keypair(key_dir: Path, name: str) -> KeyPair:
    """Make a new key pair ``NAME.key`` (0644) + ``NAME.key_secret`` (0600) in ``key_dir``.

    Raises
    ------
    ConfigError
        A bad name, an existing key file, or a folder that cannot be written.
    """
    _check_name(name)
    key_dir = Path(key_dir)
    try:
        key_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key_dir}: cannot create the key folder ({exc.strerror})") from None
    public, secret = zmq.curve_keypair()
    # The secret first: a public key without its secret is useless, the reverse is repairable.
    _write_new(key_dir / f"{name}.key_secret", _certificate(public, secret), 0o600)
    _write_new(key_dir / f"{name}.key", _certificate(public, None), 0o644)
    return KeyPair(public, secret)


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such key file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read key file ({exc.strerror})") from None
    public: bytes | None = None
    secret: bytes | None = None
    for line in data.splitlines():
        line = line.strip()
        for field in (b"public-key", b"secret-key"):
            if line.startswith(field) and b"=" in line:
                value = line.split(b"=", 1)[1].strip(b" \t'\"")
                if not _Z85_KEY.match(value):
                    raise ConfigError(f"{path}: {field.decode()} is not a 40-character Z85 key")
                if field == b"public-key":
                    public = value
                else:
                    secret = value
    if public is None:
        raise ConfigError(f"{path}: no public-key in this key file")
    return public, secret


def load_keypair(key_dir: Path, name: str, *, secret: bool = True) -> KeyPair:
    """Read the key pair ``NAME`` (or only its public key) from ``key_dir``.

    Raises
    ------
    ConfigError
        Missing or malformed files, a secret key readable by group or others,
        or a secret that does not belong to the public key.
    """
    _check_name(name)
    key_dir = Path(key_dir)
    if not secret:
        public, _ = _read_certificate(key_dir / f"{name}.key")
        return KeyPair(public)
    path = key_dir / f"{name}.key_secret"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such key file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read key file ({exc.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: secret key is accessible by others (mode {stat.S_IMODE(mode):04o}); "
            "chmod 600 it"
        )
    public, secret_key = _read_certificate(path)
    if secret_key is None:
        raise ConfigError(f"{path}: no secret-key in this key file")
    if zmq.curve_public(secret_key) != public:
        raise ConfigError(f"{path}: the secret key does not match its public key")
    return KeyPair(public, secret_key)


def ensure_keypair(key_dir: Path, name: str) -> KeyPair:
    """Load the key pair ``NAME`` from ``key_dir``, making it first if it does not exist."""
    if (Path(key_dir) / f"{name}.key_secret").exists():
        return load_keypair(key_dir, name)
    return generate_keypair(key_dir, name)


def authorize(key_dir: Path, name: str, public: bytes) -> Path:
    """Admit a client: write its public key to ``key_dir/clients/NAME.key``.

    Rewriting the same key is a no-op; a different key under an existing
    name is refused (remove the old file first).

    Returns
    -------
    Path
        The public key file.
    """
    _check_name(name)
    if not _Z85_KEY.match(public):
        raise ConfigError(f"client key {name}: not a 40-character Z85 public key")
    folder = Path(key_dir) / CLIENTS_DIR
    path = folder / f"{name}.key"
    if path.exists():
        if _read_certificate(path)[0] == public:
            return path
        raise ConfigError(f"{path}: a different key is already admitted under this name")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot create ({exc.strerror})") from None
    _write_new(path, _certificate(public, None), 0o644)
    return path


def authorized_keys(key_dir: Path) -> dict[bytes, str]:
    """The admitted client public keys of ``key_dir/clients``: ``{public: name}``."""
    folder = Path(key_dir) / CLIENTS_DIR
    keys: dict[bytes, str] = {}
    if folder.is_dir():
        for path in sorted(folder.glob("*.key")):
            keys[_read_certificate(path)[0]] = path.stem
    return keys


def setup_keys(key_dir: Path) -> tuple[KeyPair, KeyPair]:
    """The server pair and the local client pair of a key folder (made if absent; local admitted).

    Returns
    -------
    (KeyPair, KeyPair)
        The server's and the local client's key pairs.
    """
    server = ensure_keypair(key_dir, SERVER)
    local = ensure_keypair(key_dir, LOCAL_CLIENT)
    authorize(key_dir, LOCAL_CLIENT, local.public)
    return server, local


class CurveAuth:
    """The CURVE server side of a ZeroMQ context: a ZAP authenticator and the server keys.

    One per context (ZAP handlers are per context).  Clients are admitted
    when their public key is in ``key_dir/clients`` (re-read by :meth:`reload`);
    every refused key is counted in :attr:`refused` and logged at warning
    level.  Use :meth:`server_socket` on each socket before binding it.

    Parameters
    ----------
    context : zmq.Context
        The context whose sockets bind as CURVE servers.
    key_dir : Path
        Key folder (see the module docstring); the server pair is made if absent.
    """

    def __init__(self, context: zmq.Context[Any], key_dir: Path) -> None:
        self.key_dir = Path(key_dir)
        self.server = ensure_keypair(self.key_dir, SERVER)
        self.refused: Counter[str] = Counter()
        self.admitted = 0
        self._lock = threading.Lock()
        self._keys = authorized_keys(self.key_dir)
        self._auth = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
        self._started = False

    def start(self) -> CurveAuth:
        """Start the authenticator thread; returns self."""
        if not self._started:
            self._auth.start()
            self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)
            self._started = True
        return self

    def stop(self) -> None:
        """Stop the authenticator thread."""
        if self._started:
            self._auth.stop()
            self._started = False

    def __enter__(self) -> CurveAuth:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reload(self) -> None:
        """Re-read ``key_dir/clients`` (after a client was admitted or removed)."""
        keys = authorized_keys(self.key_dir)
        with self._lock:
            self._keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP check of one client key (called by the authenticator thread)."""
        with self._lock:
            name = self._keys.get(key)
            if name is None:
                self.refused["unknown_key"] += 1
            else:
                self.admitted += 1
        if name is None:
            log.warning(
                "CURVE: refused a client with an unknown key %s", key.decode(errors="replace")
            )
            return False
        log.debug("CURVE: admitted client %s", name)
        return True

    def server_socket(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server checked by this authenticator (call before bind)."""
        if self.server.secret is None:
            raise BusError(f"{self.key_dir}: the server key pair has no secret key")
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        sock.curve_secretkey = self.server.secret
        sock.curve_publickey = self.server.public
        sock.curve_server = True


def client_socket(sock: zmq.Socket[Any], client: KeyPair, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client of the server ``server_public`` (call before connect)."""
    if client.secret is None:
        raise BusError("CURVE client: the client key pair has no secret key")
    sock.curve_secretkey = client.secret
    sock.curve_publickey = client.public
    sock.curve_serverkey = server_public


def server_auth(
    context: zmq.Context[Any], transport: str, curve_dir: str | None
) -> CurveAuth | None:
    """A started :class:`CurveAuth` for a tcp bus with ``bus.curve_dir``, else None.

    The local client pair is made and admitted too, so the run's own stages
    can connect (:func:`local_client`).
    """
    if transport != "tcp" or curve_dir is None:
        return None
    setup_keys(Path(curve_dir))
    return CurveAuth(context, Path(curve_dir)).start()


def local_client(curve_dir: str | None) -> KeyPair | None:
    """The local client key pair of ``bus.curve_dir`` (None without CURVE)."""
    return None if curve_dir is None else load_keypair(Path(curve_dir), LOCAL_CLIENT)


# Socket monitor events of a refused handshake, and the reason each is counted under.
HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth_failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol_mismatch",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
}


def main(argv: list[str] | None = None) -> int:
    """``python -m cemi_stream.bus.auth keygen DIR NAME | admit DIR NAME PUBLIC_KEY_FILE``."""
    parser = argparse.ArgumentParser(prog="python -m cemi_stream.bus.auth")
    sub = parser.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("keygen", help="make a key pair NAME in DIR")
    gen.add_argument("dir", type=Path)
    gen.add_argument("name")
    admit = sub.add_parser("admit", help="admit the client whose public key file is given")
    admit.add_argument("dir", type=Path)
    admit.add_argument("name")
    admit.add_argument("public_key_file", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "keygen":
            pair = generate_keypair(args.dir, args.name)
            print(f"{args.dir / args.name}.key: public key {pair.public.decode()}")
        else:
            public, _ = _read_certificate(args.public_key_file)
            print(authorize(args.dir, args.name, public))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
