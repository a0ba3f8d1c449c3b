"""ZeroMQ transport of the frame bus: endpoints, senders and receivers.

Topology
--------
The capture process binds, everything downstream connects.

* Every durable downstream stage (the stitcher, later the denoiser) has its
  own PUSH/PULL *pipe*.  The sender blocks when the pipe's high-water mark is
  reached, so a slow consumer slows its own pipe and nothing is dropped.
  Each pipe is served by its own thread with its own cursor into a
  :class:`FrameLog`; a pipe that falls behind the frames still in memory is
  fed from the on-disk spool, so it never holds up the capture or the other
  pipes.
* Dashboards get one lossy PUB stream (``monitor``): a subscriber that falls
  behind misses frames, which the sequence numbers make visible.

Heartbeats carry the last sequence number sent, so a receiver can tell a
quiet pipe from a lost frame.  The endpoints of a run are written to
``RUN_DIR/bus.json`` so that other processes can find them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..config import DEFAULT_HWM, DEFAULT_MAX_FRAME_BYTES, BusConfig
from ..errors import BusError, ProtocolError
from ..frame import Frame
from .auth import HANDSHAKE_FAILURES, CurveAuth, KeyPair, client_socket
from .protocol import Kind, Message, decode, encode_control, encode_frame

log = logging.getLogger(__name__)

ENDPOINTS_FILE = "bus.json"
MONITOR = "monitor"
# Unix socket paths are limited to 107 bytes on Linux.
_MAX_IPC_PATH = 100


@dataclass(frozen=True, slots=True)
class BusEndpoints:
    """Where a run's pipes and monitor stream live.

    Attributes
    ----------
    pipes : dict of str to str
        Durable pipe name -> ZeroMQ endpoint (``ipc://...`` or ``tcp://...``).
    monitor : str or None
        Endpoint of the lossy PUB stream, if enabled.
    server_key : str or None
        The CURVE server public key (Z85) when the tcp sockets are CURVE
        servers (``bus.curve_dir``); consumers then connect as CURVE clients.
    """

    pipes: dict[str, str]
    monitor: str | None = None
    server_key: str | None = None

    def to_json(self) -> str:
        """Serialise for ``bus.json``."""
        data: dict[str, Any] = {"pipes": self.pipes, "monitor": self.monitor}
        if self.server_key is not None:
            data["server_key"] = self.server_key
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> BusEndpoints:
        """Parse the contents of ``bus.json``."""
        data = json.loads(text)
        return cls(dict(data["pipes"]), data.get("monitor"), data.get("server_key"))


def make_endpoints(config: BusConfig, run_dir: Path) -> BusEndpoints:
    """Choose endpoints for a run from the bus configuration.

    Parameters
    ----------
    config : BusConfig
        Transport, host, ports, ipc directory, pipe names.
    run_dir : Path
        Run directory; ipc sockets go to ``run_dir/bus`` unless the path is
        too long for a Unix socket name, then to a fresh temporary directory.
    """
    names = list(config.pipes) + ([MONITOR] if config.monitor else [])
    if config.transport == "tcp" and config.curve_dir is None and not _loopback(config.host):
        raise BusError(
            f"bus.host {config.host}: a tcp bus on a non-loopback interface needs CURVE "
            "authentication (set bus.curve_dir to a key folder)"
        )
    if config.transport == "tcp":
        urls = {n: f"tcp://{config.host}:{config.port_base + i}" for i, n in enumerate(names)}
    else:
        sock_dir = Path(config.ipc_dir) if config.ipc_dir else run_dir / "bus"
        longest = max((len(n) for n in names), default=0) + len(".sock") + 1
        if len(str(sock_dir.resolve())) + longest > _MAX_IPC_PATH:
            sock_dir = Path(tempfile.mkdtemp(prefix="cemi-bus-"))
        sock_dir.mkdir(parents=True, exist_ok=True)
        urls = {n: f"ipc://{sock_dir.resolve()}/{n}.sock" for n in names}
    monitor = urls.pop(MONITOR, None)
    return BusEndpoints(urls, monitor)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def write_endpoints(run_dir: Path, endpoints: BusEndpoints) -> None:
    """Publish the endpoints of a run in ``run_dir/bus.json`` (atomically)."""
    tmp = run_dir / (ENDPOINTS_FILE + ".tmp")
    tmp.write_text(endpoints.to_json(), encoding="utf-8")
    os.replace(tmp, run_dir / ENDPOINTS_FILE)


def read_endpoints(run_dir: Path, timeout_s: float = 0.0) -> BusEndpoints:
    """Read ``run_dir/bus.json``, waiting up to ``timeout_s`` for it to appear."""
    path = run_dir / ENDPOINTS_FILE
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return BusEndpoints.from_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise BusError(f"{path}: no bus endpoints (is a capture running?)") from None
            time.sleep(0.05)
        except (ValueError, KeyError) as exc:
            raise BusError(f"{path}: unreadable bus endpoints ({exc})") from None


class FrameLog:
    """The ordered frames of a run, shared by the pipe senders.

    The newest ``memory_frames`` frames stay in RAM; older ones are fetched
    with ``reader`` (the spool), so a consumer that falls far behind costs
    disk reads, never capture stalls or unbounded memory.

    Parameters
    ----------
    memory_frames : int
        How many of the newest frames to keep in RAM.
    reader : callable or None
        ``reader(seq) -> Frame`` for frames no longer in RAM.
    start : int
        Frames ``0 .. start - 1`` exist only through ``reader`` (a resumed
        producer numbers its frames on from ``start``).
    """

    def __init__(
        self,
        memory_frames: int,
        reader: Callable[[int], Frame] | None = None,
        start: int = 0,
    ) -> None:
        self._memory_frames = memory_frames
        self._reader = reader
        self._frames: OrderedDict[int, Frame] = OrderedDict()
        self._count = start
        self._finished = False
        self._cond = threading.Condition()

    @property
    def count(self) -> int:
        """Number of frames appended so far."""
        return self._count

    @property
    def finished(self) -> bool:
        """True once :meth:`finish` was called."""
        return self._finished

    def append(self, frame: Frame) -> int:
        """Add the next frame; returns its sequence number."""
        with self._cond:
            seq = self._count
            self._frames[seq] = frame
            while len(self._frames) > self._memory_frames:
                self._frames.popitem(last=False)
            self._count += 1
            self._cond.notify_all()
        return seq

    def finish(self) -> None:
        """Mark the end of the run: no more frames will be appended."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def wait(self, seq: int, timeout_s: float) -> bool:
        """Wait until frame ``seq`` exists; False on timeout or when finished without it."""
        with self._cond:
            return (
                self._cond.wait_for(lambda: seq < self._count or self._finished, timeout=timeout_s)
                and seq < self._count
            )

    def get(self, seq: int) -> Frame:
        """Frame ``seq`` from RAM or, when evicted, from the reader."""
        with self._cond:
            frame = self._frames.get(seq)
        if frame is not None:
            return frame
        if self._reader is None:
            raise BusError(f"frame {seq} is no longer in memory and there is no spool to read")
        return self._reader(seq)


@dataclass(slots=True)
class SenderStats:
    """Counters of one pipe sender."""

    sent: int = 0
    skipped: int = 0
    heartbeats: int = 0
    undelivered: int = 0
    ended: bool = False
    peers: int = 0
    refused: Counter[str] = field(default_factory=Counter)


class PipeSender(threading.Thread):
    """Serves one endpoint from a :class:`FrameLog` in its own thread.

    A *durable* sender (PUSH) sends every frame in order, blocking while the
    consumer's queue is full; a *lossy* one (PUB) skips to the newest frames
    when it falls more than a high-water mark behind.  Both send heartbeats
    when idle and an ``end`` message after the last frame.

    Parameters
    ----------
    name : str
        Pipe name (for logs).
    endpoint : str
        ZeroMQ endpoint to bind.
    frames : FrameLog
        Source of frames.
    run_id : str
        Run identifier put in every header.
    config : BusConfig
        High-water mark, heartbeat period, drain timeout.
    context : zmq.Context
        Shared context (sockets are created inside the thread, as ZeroMQ
        sockets must not cross threads).
    durable : bool
        PUSH (True) or PUB (False).
    auth : CurveAuth or None
        Bind a ``tcp://`` endpoint as a CURVE server admitting only the
        authenticator's clients (refused handshakes are counted in
        ``stats.refused``); ignored for ``ipc://``.
    """

    def __init__(
        self,
        name: str,
        endpoint: str,
        frames: FrameLog,
        run_id: str,
        config: BusConfig,
        context: zmq.Context[Any],
        durable: bool = True,
        auth: CurveAuth | None = None,
    ) -> None:
        super().__init__(name=f"pipe-{name}", daemon=True)
        self.auth = auth
        self.pipe = name
        self.endpoint = endpoint
        self.frames = frames
        self.run_id = run_id
        self.config = config
        self.context = context
        self.durable = durable
        self.stats = SenderStats()
        self.error: BaseException | None = None
        self._abort = threading.Event()
        self._bound = threading.Event()

    def wait_bound(self, timeout_s: float = 10.0) -> None:
        """Block until the socket is bound; re-raise a bind failure."""
        if not self._bound.wait(timeout_s):
            raise BusError(f"{self.endpoint}: pipe {self.pipe!r} did not bind in {timeout_s} s")
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop as soon as possible without draining."""
        self._abort.set()

    def run(self) -> None:
        """Thread body."""
        sock = self.context.socket(zmq.PUSH if self.durable else zmq.PUB)
        # Peer connect/disconnect events tell when a consumer has gone after the end.
        events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
        for event in HANDSHAKE_FAILURES:
            events |= event
        self._events = sock.get_monitor_socket(events)
        try:
            sock.setsockopt(zmq.SNDHWM, self.config.hwm)
            sock.setsockopt(zmq.LINGER, int(self.config.drain_timeout_s * 1000))
            if self.auth is not None and self.endpoint.startswith("tcp://"):
                self.auth.server_socket(sock)
            try:
                sock.bind(self.endpoint)
            except zmq.ZMQError as exc:
                self.error = BusError(f"{self.endpoint}: cannot bind pipe {self.pipe!r} ({exc})")
                return
            finally:
                self._bound.set()
            self._serve(sock)
        except BaseException as exc:  # surfaced to the capture thread via .error
            log.exception("pipe %s failed", self.pipe)
            self.error = exc
        finally:
            with contextlib.suppress(zmq.ZMQError):  # the context may already be gone
                sock.disable_monitor()
            self._events.close(linger=0)
            sock.close()

    def _poll_events(self, timeout_ms: int = 0) -> None:
        """Update the count of connected consumers from the socket monitor."""
        while self._events.poll(timeout_ms, zmq.POLLIN):
            event = recv_monitor_message(self._events)
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.stats.peers += 1
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.stats.peers = max(self.stats.peers - 1, 0)
            elif event["event"] in HANDSHAKE_FAILURES:
                reason = HANDSHAKE_FAILURES[event["event"]]
                self.stats.refused[reason] += 1
                log.warning("pipe %s: refused a peer (%s)", self.pipe, reason)
            timeout_ms = 0

    def _linger_for_consumers(self) -> None:
        """After ``end``, keep the socket open until every consumer has disconnected.

        Closing a PUSH socket while a consumer's receive queue is full drops
        the frames still queued on our side despite ZMQ_LINGER (seen with
        libzmq 4.3.5), so the consumer's disconnect after it has read ``end``
        is the acknowledgement that everything arrived.
        """
        deadline = time.monotonic() + self.config.drain_timeout_s
        self._poll_events()
        while self.stats.peers > 0 and not self._abort.is_set():
            if time.monotonic() >= deadline:
                log.warning(
                    "pipe %s: consumer still connected %.0f s after the end; closing",
                    self.pipe,
                    self.config.drain_timeout_s,
                )
                return
            self._poll_events(100)

    def _serve(self, sock: zmq.Socket[Any]) -> None:
        cursor = 0
        last_sent = time.monotonic()
        hb_period = self.config.heartbeat_s
        next_events = 0.0
        while not self._abort.is_set():
            now = time.monotonic()
            if now >= next_events:  # peer bookkeeping is not worth a syscall per frame
                self._poll_events()
                next_events = now + 0.05
            if self.frames.wait(cursor, timeout_s=min(hb_period, 0.2)):
                if not self.durable and self.frames.count - cursor > self.config.hwm:
                    newest = self.frames.count - 1
                    self.stats.skipped += newest - cursor
                    cursor = newest
                parts = encode_frame(self.run_id, cursor, self.frames.get(cursor))
                if self.durable:
                    # Try first; waiting (a poll syscall) is only needed when the pipe is full.
                    try:
                        sock.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        if not self._wait_writable(sock):
                            break
                        sock.send_multipart(parts, copy=False)
                    self.stats.sent += 1
                else:
                    try:
                        sock.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
                        self.stats.sent += 1
                    except zmq.Again:
                        self.stats.skipped += 1
                cursor += 1
                last_sent = time.monotonic()
            elif self.frames.finished and cursor >= self.frames.count:
                end = encode_control(Kind.END, self.run_id, cursor - 1, count=self.frames.count)
                if self.durable and not self._wait_writable(sock):
                    break
                with contextlib.suppress(zmq.Again):  # a lossy stream may drop its end
                    sock.send_multipart(end, flags=0 if self.durable else zmq.NOBLOCK)
                self.stats.ended = True
                log.debug("pipe %s: end of stream after %d frames", self.pipe, cursor)
                if self.durable:
                    self._linger_for_consumers()
                return
            elif time.monotonic() - last_sent >= hb_period:
                try:
                    sock.send_multipart(
                        encode_control(Kind.HEARTBEAT, self.run_id, cursor - 1), flags=zmq.NOBLOCK
                    )
                    self.stats.heartbeats += 1
                except zmq.Again:
                    pass  # heartbeats are advisory; a full pipe already proves liveness
                last_sent = time.monotonic()
        self.stats.undelivered = max(self.frames.count - cursor, 0)

    def _wait_writable(self, sock: zmq.Socket[Any]) -> bool:
        """Wait until the pipe accepts a message.

        While the run is live this waits indefinitely (back-pressure).  Once
        the run has finished it gives up after ``drain_timeout_s`` without
        progress, so a consumer that never connects cannot hang the capture;
        the undelivered frames stay in the spool.
        """
        stalled_since: float | None = None
        while not self._abort.is_set():
            self._poll_events()
            if sock.poll(100, zmq.POLLOUT):
                return True
            if self.frames.finished:
                now = time.monotonic()
                stalled_since = stalled_since or now
                if now - stalled_since >= self.config.drain_timeout_s:
                    log.warning(
                        "pipe %s: no consumer took frames for %.0f s after the end of the run; "
                        "%d frames stay undelivered (they are in the spool)",
                        self.pipe,
                        self.config.drain_timeout_s,
                        self.frames.count - self.stats.sent,
                    )
                    return False
        return False


@dataclass(slots=True)
class ReceiverStats:
    """Counters of one receiver.

    Attributes
    ----------
    frames : int
        Valid frame messages received.
    heartbeats : int
        Heartbeats received.
    rejected : Counter
        Rejected messages by reason.
    missing : int
        Frames known to be lost: gaps in sequence numbers, or heartbeats and
        end messages announcing frames that never arrived.
    duplicates : int
        Frames whose sequence number was already seen (or went backwards).
    """

    frames: int = 0
    heartbeats: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    missing: int = 0
    duplicates: int = 0


class FrameReceiver:
    """Connects to a pipe (PULL) or the monitor stream (SUB) and validates.

    Malformed messages are counted in :attr:`stats` and logged, never raised;
    sequence gaps are counted as missing frames.

    Parameters
    ----------
    endpoint : str
        Endpoint to connect to.
    mode : {"pull", "sub"}
        Durable pipe or lossy monitor stream.
    max_frame_bytes : int
        Largest accepted payload.
    hwm : int
        Receive high-water mark (messages).
    context : zmq.Context or None
        Context to use; None creates a private one.
    curve : (KeyPair, bytes) or None
        This client's key pair and the server's public key, for a CURVE
        server (see :mod:`cemi_stream.bus.auth`).
    """

    def __init__(
        self,
        endpoint: str,
        mode: Literal["pull", "sub"] = "pull",
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        hwm: int = DEFAULT_HWM,
        context: zmq.Context[Any] | None = None,
        curve: tuple[KeyPair, bytes] | None = None,
    ) -> None:
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.PULL if mode == "pull" else zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        if mode == "sub":
            self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        if curve is not None:
            client_socket(self.socket, *curve)
        try:
            self.socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise BusError(f"{endpoint}: cannot connect ({exc})") from None
        self.endpoint = endpoint
        self.max_frame_bytes = max_frame_bytes
        self.stats = ReceiverStats()
        self.run_id: str | None = None
        self._next_seq: int | None = None
        self.ended = False
        self.end_count: int | None = None

    def recv(self, timeout_ms: int | None = 1000) -> Message | None:
        """Return the next valid message, or None when ``timeout_ms`` passes.

        Heartbeats and ``end`` messages are returned too (check ``kind``);
        invalid messages are skipped after being counted.
        """
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            try:
                parts = self.socket.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                wait = -1 if deadline is None else max(int((deadline - time.monotonic()) * 1000), 0)
                if not self.socket.poll(wait, zmq.POLLIN):
                    return None
                parts = self.socket.recv_multipart(copy=False)
            try:
                message = decode(parts, self.max_frame_bytes)
            except ProtocolError as exc:
                reason = str(exc)
                self.stats.rejected[reason.split(" (")[0]] += 1
                log.warning("%s: rejected message: %s", self.endpoint, reason)
                continue
            self._track(message)
            return message

    def _track(self, message: Message) -> None:
        """Update sequence bookkeeping."""
        if message.run_id != self.run_id:
            if self.run_id is not None:
                log.info("%s: new run %s", self.endpoint, message.run_id)
            self.run_id = message.run_id
            self._next_seq = None
        if message.kind is Kind.FRAME:
            self.stats.frames += 1
            expected = self._next_seq
            if expected is not None and message.seq > expected:
                self.stats.missing += message.seq - expected
                log.warning("%s: frames %d..%d missing", self.endpoint, expected, message.seq - 1)
            elif expected is not None and message.seq < expected:
                self.stats.duplicates += 1
                return
            self._next_seq = message.seq + 1
            return
        if message.kind is Kind.HEARTBEAT:
            self.stats.heartbeats += 1
        else:
            self.ended = True
            self.end_count = message.count
        announced_next = message.seq + 1
        expected = self._next_seq if self._next_seq is not None else 0
        if announced_next > expected:
            self.stats.missing += announced_next - expected
            log.warning("%s: frames %d..%d never arrived", self.endpoint, expected, message.seq)
            self._next_seq = announced_next

    def close(self) -> None:
        """Close the socket (and the private context)."""
        self.socket.close(linger=0)
        if self._own_context:
            self.context.term()
