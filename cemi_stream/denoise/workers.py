"""Several denoise workers per run, local or on other hosts: :class:`DenoisePool`.

The denoise stage (:mod:`cemi_stream.denoise.stage`) stays the one process
that reads the capture's frames in order and writes the denoised spool and
bus in order.  With ``denoise.workers > 1`` or ``denoise.listen`` it hands
each batch to a :class:`DenoisePool` instead of denoising it itself::

    capture -> denoise stage (collector) --ROUTER/DEALER--> worker, worker, ...
                  |  frames of a batch out, denoised frames back (any order)
                  v
               RUN_DIR/denoised (spool + bus, in sequence order) -> stitch

The pool binds a ROUTER socket; every worker (``python -m
cemi_stream.denoise.workers --connect URL ...``) connects a DEALER, loads its
model, says ``ready`` and then takes one frame at a time.  Frames go to idle
workers (load balancing by readiness, so a slow or remote worker takes
fewer); each result comes back tagged with its task id and lands in its
slot of the batch, so the stage commits the batch in sequence order exactly
as it does without a pool.  No frame is lost: a task whose worker dies
(local worker: its exit is seen at once, and it is restarted) or does not
answer within the task timeout is sent to another worker; a late or
duplicate answer is discarded (counted as ``stale``).  Every message the
pool receives is validated (protocol tag, kind, task id, the frame through
:func:`~cemi_stream.bus.protocol.decode`, shape and dtype); bad ones are
counted by reason and logged, never raised.

Remote workers connect over ``tcp://`` to ``denoise.listen``; with
``bus.curve_dir`` the socket is a CURVE server that admits only the keys in
``KEYS/clients`` (:mod:`cemi_stream.bus.auth`), and a non-loopback address
is refused without it.  The denoised frames travel back on the same
authenticated connection, and the collector writes them to the spool on the
daemon's disk.

Wire format (ZeroMQ multipart, first part :data:`PROTOCOL`):

* worker -> pool: ``[P, b"ready", name]`` (also sent every second while
  idle, as a heartbeat); ``[P, b"result", task_id, header, payload]``.
* pool -> worker: ``[P, b"task", task_id, header, payload]``; ``[P, b"stop"]``.

``header, payload`` are a bus frame message (:func:`encode_frame`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from ..bus.auth import LOCAL_CLIENT, CurveAuth, KeyPair, client_socket, load_keypair, server_auth
from ..bus.protocol import Kind, decode, encode_frame
from ..config import Config
from ..errors import BusError, CemiError, DenoiseError, ProtocolError
from ..frame import Frame

log = logging.getLogger(__name__)

PROTOCOL = b"cemi-denoise/1"
READY, TASK, RESULT, STOP = b"ready", b"task", b"result", b"stop"
# A worker that is idle re-announces itself this often, seconds.
HEARTBEAT_S = 1.0
# How often a local worker that keeps dying is restarted, at most.
MAX_LOCAL_RESTARTS = 5
_TASK_ID = struct.Struct(">Q")
_MAX_IPC_PATH = 100


class DenoisePool:
    """Spreads the frames of each batch over denoise worker processes.

    Parameters
    ----------
    run_dir : Path
        Run directory (worker logs go to ``run_dir/denoised/workers/``).
    config : Config
        ``denoise`` (workers, listen, backend, tile_px), ``bus`` (curve_dir,
        max_frame_bytes) sections.
    model_path : Path
        Weights file the local workers load.
    backend : str
        Inference backend of the local workers.
    run_id : str
        Put in the frame headers sent to workers.
    context : zmq.Context or None
        Context for the ROUTER socket (None: a private one).
    task_timeout_s : float
        A frame not returned within this time is sent to another worker.
    wait_s : float
        How long a batch may wait with no worker connected before
        :class:`DenoiseError`.

    Attributes
    ----------
    endpoint : str
        Where workers connect.
    rejected : Counter
        Messages discarded, by reason (``stale``, ``bad_protocol``, ...).
    frames_by_worker : Counter
        Frames denoised per worker name.
    redispatched : int
        Frames sent again after a worker died or timed out.
    """

    def __init__(
        self,
        run_dir: Path,
        config: Config,
        model_path: Path,
        backend: str,
        run_id: str,
        *,
        context: zmq.Context[Any] | None = None,
        task_timeout_s: float = 60.0,
        wait_s: float = 60.0,
    ) -> None:
        cfg = config.denoise
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.task_timeout_s = task_timeout_s
        self.wait_s = wait_s
        self.max_frame_bytes = config.bus.max_frame_bytes
        self.rejected: Counter[str] = Counter()
        self.frames_by_worker: Counter[str] = Counter()
        self.redispatched = 0
        self._own_context = context is None
        self._context: zmq.Context[Any] = context or zmq.Context()
        self._auth: CurveAuth | None = None
        self._tmp: Path | None = None
        self._idle: collections.deque[bytes] = collections.deque()
        self._names: dict[bytes, str] = {}
        self._next_task = 1
        self._procs: list[subprocess.Popen[bytes] | None] = []
        self._restarts = 0
        self._closed = False
        self._todo: collections.deque[int] = collections.deque()
        self._sock = self._context.socket(zmq.ROUTER)
        try:
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes + 65536)
            curve: tuple[KeyPair, bytes] | None = None
            if cfg.listen is not None:
                self.endpoint = self._bind_tcp(cfg.listen, config.bus.curve_dir)
                if self._auth is not None:
                    local = load_keypair(Path(self._auth.key_dir), LOCAL_CLIENT)
                    curve = (local, self._auth.server.public)
            else:
                self.endpoint = self._bind_ipc()
            self._local_command = self._worker_command(model_path, backend, cfg, config, curve)
            for i in range(cfg.workers if cfg.listen is None else max(cfg.workers - 1, 0)):
                self._procs.append(None)
                self._start_local(i)
        except BaseException:
            self.close()
            raise

    # -- setup ---------------------------------------------------------------

    def _bind_tcp(self, listen: str, curve_dir: str | None) -> str:
        host = listen[len("tcp://") :].rsplit(":", 1)[0]
        self._auth = server_auth(self._context, "tcp", curve_dir)
        if self._auth is None and host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
            raise BusError(
                f"denoise.listen {listen}: remote workers off loopback need CURVE "
                "(set bus.curve_dir to a key folder)"
            )
        if self._auth is not None:
            self._auth.server_socket(self._sock)
        try:
            self._sock.bind(listen)
        except zmq.ZMQError as exc:
            raise BusError(f"{listen}: cannot bind the denoise worker socket ({exc})") from None
        endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # Local workers reach a wildcard bind over loopback.
        return endpoint.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")

    def _bind_ipc(self) -> str:
        folder = self.run_dir / "denoised" / "bus"
        if len(str(folder.resolve())) + len("/workers.sock") > _MAX_IPC_PATH:
            self._tmp = Path(tempfile.mkdtemp(prefix="cemi-workers-"))
            folder = self._tmp
        folder.mkdir(parents=True, exist_ok=True)
        endpoint = f"ipc://{folder.resolve()}/workers.sock"
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise BusError(f"{endpoint}: cannot bind the denoise worker socket ({exc})") from None
        return endpoint

    def _worker_command(
        self,
        model_path: Path,
        backend: str,
        cfg: Any,
        config: Config,
        curve: tuple[KeyPair, bytes] | None,
    ) -> list[str]:
        threads = max(1, (os.cpu_count() or 1) // max(cfg.workers, 1))
        command = [
            sys.executable, "-m", "cemi_stream.denoise.workers", "--connect", self.endpoint,
            "--model", str(model_path), "--backend", backend, "--threads", str(threads),
            "--tile-px", str(cfg.tile_px), "--max-frame-bytes", str(config.bus.max_frame_bytes),
        ]  # fmt: skip
        if curve is not None and config.bus.curve_dir is not None:
            command += ["--keys", config.bus.curve_dir, "--key-name", LOCAL_CLIENT]
            command += ["--server-key", curve[1].decode("ascii")]
        return command

    def _start_local(self, i: int) -> None:
        from ..daemon.lifecycle import spawn

        logs = self.run_dir / "denoised" / "workers"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"local-{i}.log", "ab") as err:
            self._procs[i] = spawn(
                [*self._local_command, "--name", f"local-{i}"], stderr=err, run_dir=self.run_dir
            )

    def wait_ready(self, timeout_s: float = 60.0) -> int:
        """Wait until every local worker has loaded its model and said ``ready``.

        Returns the number of connected workers (remote ones that are already
        there count too).  A pool of remote workers only does not wait.

        Raises
        ------
        DenoiseError
            When a local worker is not ready within ``timeout_s``.
        """
        local = len(self._procs)
        deadline = time.monotonic() + timeout_s
        no_inflight: dict[int, tuple[int, bytes, float]] = {}
        while len([n for n in self._names.values() if n.startswith("local-")]) < local:
            self._check_local(no_inflight, self._todo)
            if time.monotonic() >= deadline:
                raise DenoiseError(
                    f"{self.endpoint}: {local} local denoise workers not ready in {timeout_s:.0f} s"
                    f" (see {self.run_dir / 'denoised' / 'workers'})"
                )
            if self._sock.poll(100, zmq.POLLIN):
                while True:
                    try:
                        parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(parts, [], [], no_inflight)
        return self.workers

    # -- the work ------------------------------------------------------------

    @property
    def workers(self) -> int:
        """Workers known to be connected (they said ``ready`` at least once)."""
        return len(self._names)

    def denoise_frames(self, batch: list[tuple[int, Frame]]) -> list[np.ndarray]:
        """Denoise ``batch`` on the workers; results in the batch's order.

        Raises
        ------
        DenoiseError
            When no worker has been connected for ``wait_s`` seconds, or the
            local workers keep dying.
        """
        n = len(batch)
        results: list[np.ndarray | None] = [None] * n
        todo: collections.deque[int] = collections.deque(range(n))
        self._todo = todo
        # task id -> (index in batch, worker identity, time sent)
        inflight: dict[int, tuple[int, bytes, float]] = {}
        missing = n
        no_worker_since: float | None = None
        while missing:
            self._check_local(inflight, todo)
            now = time.monotonic()
            while todo and self._idle:
                i = todo.popleft()
                if results[i] is not None:
                    continue
                worker = self._idle.popleft()
                tid = self._next_task
                self._next_task += 1
                seq, frame = batch[i]
                header, payload = encode_frame(self.run_id, seq, frame)
                try:
                    self._sock.send_multipart(
                        [worker, PROTOCOL, TASK, _TASK_ID.pack(tid), header, payload], copy=False
                    )
                except zmq.ZMQError:  # the worker is gone (ROUTER_MANDATORY)
                    self._forget(worker)
                    todo.appendleft(i)
                    continue
                inflight[tid] = (i, worker, now)
            if todo and not self._idle and not inflight:
                no_worker_since = no_worker_since or now
                if now - no_worker_since > self.wait_s:
                    raise DenoiseError(
                        f"{self.endpoint}: no denoise worker connected for {self.wait_s:.0f} s"
                    )
            else:
                no_worker_since = None
            if self._sock.poll(100, zmq.POLLIN):
                while True:
                    try:
                        parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    done = self._handle(parts, batch, results, inflight)
                    if done is not None:
                        missing -= 1
            for tid, (i, worker, sent) in list(inflight.items()):
                if results[i] is not None:
                    del inflight[tid]
                elif time.monotonic() - sent > self.task_timeout_s:
                    log.warning(
                        "denoise worker %s: frame %d not back after %.0f s; sending it elsewhere",
                        self._names.get(worker, "?"), batch[i][0], self.task_timeout_s,
                    )  # fmt: skip
                    del inflight[tid]
                    self._forget(worker)
                    self.redispatched += 1
                    todo.append(i)
        return [r for r in results if r is not None]

    def _handle(
        self,
        parts: list[Any],
        batch: list[tuple[int, Frame]],
        results: list[np.ndarray | None],
        inflight: dict[int, tuple[int, bytes, float]],
    ) -> int | None:
        """One message from a worker; returns the batch index it completed, if any."""
        worker = bytes(parts[0].buffer)
        if len(parts) < 3 or bytes(parts[1].buffer) != PROTOCOL:
            self._reject("bad_protocol", worker)
            return None
        kind = bytes(parts[2].buffer)
        if kind == READY:
            if len(parts) != 4:
                self._reject("bad_ready", worker)
                return None
            if worker not in self._names:
                name = bytes(parts[3].buffer)[:64].decode("utf-8", "replace")
                self._names[worker] = name
                log.info("denoise worker %s connected", name)
            busy = any(w == worker for _, w, _ in inflight.values())
            if worker not in self._idle and not busy:
                self._idle.append(worker)
            return None
        if kind != RESULT or len(parts) != 6 or len(parts[3].buffer) != _TASK_ID.size:
            self._reject("bad_kind", worker)
            return None
        (tid,) = _TASK_ID.unpack(bytes(parts[3].buffer))
        task = inflight.pop(tid, None)
        if worker in self._names and worker not in self._idle:
            self._idle.append(worker)  # a result means the worker is free again
        if task is None:
            self._reject("stale", worker)
            return None
        i = task[0]
        seq, frame = batch[i]
        try:
            message = decode([parts[4], parts[5]], self.max_frame_bytes)
        except ProtocolError as exc:
            self._requeue_after_bad(i, inflight)
            self._reject(str(exc).split(" (")[0], worker, i)
            return None
        image = None if message.frame is None else message.frame.image
        if (
            message.kind is not Kind.FRAME
            or message.seq != seq
            or image is None
            or image.shape != frame.image.shape
            or image.dtype != np.uint8
        ):
            self._requeue_after_bad(i, inflight)
            self._reject("bad_result", worker, i)
            return None
        if results[i] is not None:
            self._reject("stale", worker)
            return None
        results[i] = image.copy()
        self.frames_by_worker[self._names.get(worker, "?")] += 1
        return i

    def _requeue_after_bad(self, i: int, inflight: dict[int, tuple[int, bytes, float]]) -> None:
        """A bad answer: the frame goes out again (to whichever worker is idle next)."""
        if not any(task[0] == i for task in inflight.values()):
            self._todo.append(i)
            self.redispatched += 1

    def _reject(self, reason: str, worker: bytes, i: int | None = None) -> None:
        self.rejected[reason] += 1
        if self.rejected[reason] <= 10 or self.rejected[reason] % 1000 == 0:
            log.warning(
                "denoise worker %s: rejected a message (%s; %d so far)",
                self._names.get(worker, worker[:16].hex()), reason, self.rejected[reason],
            )  # fmt: skip

    def _forget(self, worker: bytes) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        name = self._names.pop(worker, None)
        if name is not None:
            log.warning("denoise worker %s: dropped", name)

    def _check_local(
        self, inflight: dict[int, tuple[int, bytes, float]], todo: collections.deque[int]
    ) -> None:
        """Restart local workers that died; their frames go to other workers at once."""
        for k, proc in enumerate(self._procs):
            if proc is None or proc.poll() is None:
                continue
            gone = [w for w, n in self._names.items() if n == f"local-{k}"]
            for tid, (i, worker, _) in list(inflight.items()):
                if worker in gone:
                    del inflight[tid]
                    todo.appendleft(i)
                    self.redispatched += 1
            for worker in gone:
                self._forget(worker)
            self._restarts += 1
            if self._restarts > MAX_LOCAL_RESTARTS * max(len(self._procs), 1):
                raise DenoiseError(
                    f"denoise worker local-{k} keeps dying (exit {proc.returncode}); "
                    f"see {self.run_dir / 'denoised' / 'workers'}"
                )
            log.warning("denoise worker local-%d exited (%s); restarting it", k, proc.returncode)
            self._start_local(k)

    def close(self) -> None:
        """Tell every worker to stop, end the local ones, close the socket."""
        if self._closed:
            return
        self._closed = True
        for worker in list(self._names):
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart([worker, PROTOCOL, STOP], zmq.NOBLOCK)
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            if proc is None:
                continue
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(3.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._own_context:
            self._context.term()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                (self._tmp / "workers.sock").unlink()
                self._tmp.rmdir()


def run_worker(
    connect: str,
    model: str | None,
    backend: str = "cpu",
    *,
    name: str | None = None,
    curve: tuple[KeyPair, bytes] | None = None,
    threads: int | None = None,
    tile_px: int = 0,
    max_frame_bytes: int = 64 << 20,
    stop: threading.Event | None = None,
) -> int:
    """Serve a denoise pool at ``connect`` until told to stop; returns frames denoised.

    Parameters
    ----------
    connect : str
        The pool's endpoint (``ipc://...`` or ``tcp://HOST:PORT``).
    model, backend, tile_px
        As for :class:`~cemi_stream.denoise.infer.Denoiser`.
    name : str or None
        Shown in the pool's logs and counts (default ``HOST-PID``).
    curve : (KeyPair, bytes) or None
        This worker's key pair and the pool's server public key, for a CURVE
        endpoint.
    threads : int or None
        Torch CPU threads (local workers split the cores between them).
    max_frame_bytes : int
        Largest frame accepted.
    stop : threading.Event or None
        Set it (e.g. from SIGTERM) to stop after the current frame.
    """
    from ..daemon.lifecycle import arm_parent_guard
    from .infer import Denoiser

    arm_parent_guard()
    stop = stop or threading.Event()
    if threads:
        import torch

        torch.set_num_threads(threads)
    denoiser = Denoiser(model, backend, tile_px=tile_px)
    name = name or f"{os.uname().nodename}-{os.getpid()}"
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes + 65536)
    sock.setsockopt(zmq.ROUTING_ID, f"{name}-{os.getpid()}".encode()[:255])
    if curve is not None:
        client_socket(sock, *curve)
    done = 0
    try:
        sock.connect(connect)
        log.info("denoise worker %s: %s on %s, serving %s", name, denoiser.card.name,
                 denoiser.backend, connect)  # fmt: skip
        last_ready = 0.0
        while not stop.is_set():
            if time.monotonic() - last_ready >= HEARTBEAT_S:
                # No pool connected (or not admitted): nothing to tell, try again later.
                with contextlib.suppress(zmq.Again):
                    sock.send_multipart([PROTOCOL, READY, name.encode()[:64]], zmq.NOBLOCK)
                last_ready = time.monotonic()
            if not sock.poll(200, zmq.POLLIN):
                continue
            parts = sock.recv_multipart(copy=False)
            if len(parts) < 2 or bytes(parts[0].buffer) != PROTOCOL:
                log.warning("denoise worker %s: ignored a malformed message", name)
                continue
            kind = bytes(parts[1].buffer)
            if kind == STOP:
                log.info("denoise worker %s: stopped by the pool after %d frames", name, done)
                break
            if kind != TASK or len(parts) != 5:
                log.warning("denoise worker %s: ignored a message of kind %r", name, kind[:16])
                continue
            try:
                message = decode([parts[3], parts[4]], max_frame_bytes)
            except ProtocolError as exc:
                log.warning("denoise worker %s: ignored a bad frame (%s)", name, exc)
                continue
            if message.frame is None:
                continue
            image = denoiser.denoise(message.frame.image)
            header, payload = encode_frame(
                message.run_id, message.seq, Frame(image, message.frame.meta)
            )
            result = [PROTOCOL, RESULT, bytes(parts[2].buffer), header, payload]
            while not stop.is_set():  # the pool may be gone: stay stoppable
                try:
                    sock.send_multipart(result, zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:
                    sock.poll(200, zmq.POLLOUT)
            done += 1
            last_ready = time.monotonic()  # the result says "ready" too
    finally:
        sock.close()
        context.term()
    return done


def main(argv: list[str] | None = None) -> int:
    """``python -m cemi_stream.denoise.workers --connect URL [options]``: one denoise worker."""
    parser = argparse.ArgumentParser(
        prog="python -m cemi_stream.denoise.workers", description="A denoise worker."
    )
    parser.add_argument("--connect", required=True, help="the pool's endpoint")
    parser.add_argument("--model", default=None, help="model name or .safetensors path")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--name", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tile-px", type=int, default=0)
    parser.add_argument("--max-frame-bytes", type=int, default=64 << 20)
    parser.add_argument("--keys", type=Path, default=None, help="key folder (CURVE)")
    parser.add_argument("--key-name", default=LOCAL_CLIENT, help="this worker's key pair name")
    parser.add_argument("--server-key", default=None, help="the pool's public key (Z85)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        curve = None
        if args.keys is not None:
            if not args.server_key:
                raise BusError("--keys needs --server-key (the pool's public key)")
            curve = (load_keypair(args.keys, args.key_name), args.server_key.encode("ascii"))
        run_worker(
            args.connect, args.model, args.backend, name=args.name, curve=curve,
            threads=args.threads, tile_px=args.tile_px, max_frame_bytes=args.max_frame_bytes,
            stop=stop,
        )  # fmt: skip
    except CemiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
