"""The frame bus over real ZeroMQ sockets: delivery, back-pressure, gaps, garbage."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from cemi_stream.bus.protocol import Kind, encode_control, encode_frame
from cemi_stream.bus.transport import (
    BusEndpoints,
    FrameLog,
    FrameReceiver,
    PipeSender,
    make_endpoints,
    read_endpoints,
    write_endpoints,
)
from cemi_stream.config import BusConfig
from cemi_stream.errors import BusError
from cemi_stream.frame import Frame, FrameMeta


def _frame(i: int, shape: tuple[int, int] = (32, 48)) -> Frame:
    return Frame(np.full(shape, i % 256, np.uint8), FrameMeta(i, i))


def _receive_all(receiver: FrameReceiver, timeout_ms: int = 5000) -> list[int]:
    seqs = []
    while True:
        msg = receiver.recv(timeout_ms)
        assert msg is not None, "timed out before end of stream"
        if msg.kind is Kind.FRAME:
            assert msg.frame is not None
            assert int(msg.frame.image[0, 0]) == msg.seq % 256
            seqs.append(msg.seq)
        elif msg.kind is Kind.END:
            return seqs


@pytest.fixture
def ctx() -> Any:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)  # never hang teardown on a failed test's sockets


def _sender(
    ctx: Any, endpoint: str, frames: FrameLog, durable: bool = True, **cfg: Any
) -> PipeSender:
    config = BusConfig(**{"hwm": 8, "drain_timeout_s": 5.0, "heartbeat_s": 0.2, **cfg})
    sender = PipeSender("test", endpoint, frames, "run", config, ctx, durable)
    sender.start()
    sender.wait_bound()
    return sender


def test_every_frame_arrives_in_order_over_ipc(tmp_path: Path, ctx: Any) -> None:
    endpoint = f"ipc://{tmp_path}/p.sock"
    frames = FrameLog(memory_frames=1000)
    sender = _sender(ctx, endpoint, frames)
    receiver = FrameReceiver(endpoint, context=ctx)
    for i in range(200):
        frames.append(_frame(i))
    frames.finish()
    assert _receive_all(receiver) == list(range(200))
    assert receiver.stats.missing == 0 and receiver.end_count == 200
    receiver.close()  # the disconnect tells the sender everything arrived
    sender.join(2)
    assert not sender.is_alive()
    assert sender.stats.sent == 200 and sender.stats.ended and sender.stats.undelivered == 0


def test_slow_consumer_far_behind_is_fed_from_the_reader(tmp_path: Path, ctx: Any) -> None:
    """Only 4 frames fit in RAM; the rest come from the (spool) reader, none lost."""
    endpoint = f"ipc://{tmp_path}/p.sock"
    stored = {i: _frame(i) for i in range(300)}
    reads: list[int] = []

    def reader(seq: int) -> Frame:
        reads.append(seq)
        return stored[seq]

    frames = FrameLog(memory_frames=4, reader=reader)
    sender = _sender(ctx, endpoint, frames, hwm=2)
    for i in range(300):  # the capture never blocks, although nobody is listening yet
        frames.append(stored[i])
    frames.finish()
    receiver = FrameReceiver(endpoint, context=ctx, hwm=2)
    assert _receive_all(receiver) == list(range(300))
    receiver.close()
    sender.join(2)
    assert not sender.is_alive()
    assert len(reads) > 250


def test_tcp_and_two_independent_pipes(ctx: Any) -> None:
    frames = FrameLog(memory_frames=64)
    port = 25555 + int(time.time()) % 1000
    a = _sender(ctx, f"tcp://127.0.0.1:{port}", frames)
    b = _sender(ctx, f"tcp://127.0.0.1:{port + 1}", frames)
    ra = FrameReceiver(f"tcp://127.0.0.1:{port}", context=ctx)
    rb = FrameReceiver(f"tcp://127.0.0.1:{port + 1}", context=ctx)
    for i in range(50):
        frames.append(_frame(i))
    frames.finish()
    assert _receive_all(ra) == list(range(50))
    assert _receive_all(rb) == list(range(50))
    ra.close()
    rb.close()
    a.join(2)
    b.join(2)
    assert not a.is_alive() and not b.is_alive()


def test_heartbeats_when_idle(tmp_path: Path, ctx: Any) -> None:
    endpoint = f"ipc://{tmp_path}/p.sock"
    frames = FrameLog(memory_frames=8)
    sender = _sender(ctx, endpoint, frames)
    receiver = FrameReceiver(endpoint, context=ctx)
    frames.append(_frame(0))
    kinds = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and kinds.count(Kind.HEARTBEAT) < 2:
        msg = receiver.recv(1000)
        if msg is not None:
            kinds.append(msg.kind)
            if msg.kind is Kind.HEARTBEAT:
                assert msg.seq == 0  # last frame sent
    assert kinds[0] is Kind.FRAME and kinds.count(Kind.HEARTBEAT) >= 2
    assert receiver.stats.missing == 0
    frames.finish()
    assert _receive_all(receiver) == []
    receiver.close()
    sender.join(2)
    assert not sender.is_alive()


def test_absent_consumer_does_not_hang_the_end(tmp_path: Path, ctx: Any) -> None:
    frames = FrameLog(memory_frames=8)
    sender = _sender(ctx, f"ipc://{tmp_path}/p.sock", frames, drain_timeout_s=0.5)
    for i in range(5):
        frames.append(_frame(i))
    frames.finish()
    start = time.monotonic()
    sender.join(10)
    assert not sender.is_alive() and time.monotonic() - start < 5
    assert sender.stats.undelivered == 5 and not sender.stats.ended


def test_gaps_garbage_and_duplicates_are_counted(tmp_path: Path, ctx: Any) -> None:
    endpoint = f"ipc://{tmp_path}/raw.sock"
    push = ctx.socket(zmq.PUSH)
    push.bind(endpoint)
    receiver = FrameReceiver(endpoint, context=ctx, max_frame_bytes=100_000)
    push.send_multipart(encode_frame("r", 0, _frame(0)), copy=False)
    push.send_multipart([b"\xff\x00garbage", b"12345"])
    push.send_multipart([b"only one part"])
    push.send_multipart(
        [msgpack.packb({"v": 99, "kind": "frame", "run": "r", "seq": 1, "sent": 0}), b""]
    )
    push.send_multipart(encode_frame("r", 3, _frame(3)), copy=False)  # 1, 2 lost
    push.send_multipart(encode_frame("r", 3, _frame(3)), copy=False)  # duplicate
    push.send_multipart(encode_frame("r", 4, _frame(4, (400, 400))), copy=False)  # oversize
    push.send_multipart(encode_control(Kind.HEARTBEAT, "r", 6))  # 4, 5, 6 never arrived
    push.send_multipart(encode_control(Kind.END, "r", 6, count=7))
    seen = []
    while (msg := receiver.recv(2000)) is not None:
        seen.append((msg.kind, msg.seq))
        if msg.kind is Kind.END:
            break
    assert seen == [
        (Kind.FRAME, 0),
        (Kind.FRAME, 3),
        (Kind.FRAME, 3),
        (Kind.HEARTBEAT, 6),
        (Kind.END, 6),
    ]
    stats = receiver.stats
    assert stats.frames == 3 and stats.duplicates == 1
    assert stats.missing == 2 + 3
    assert sum(stats.rejected.values()) == 4
    assert any("exceeds" in r for r in stats.rejected)
    assert any("version" in r for r in stats.rejected)
    push.close(0)
    receiver.close()


def test_monitor_stream_is_lossy_but_never_blocks(tmp_path: Path, ctx: Any) -> None:
    endpoint = f"ipc://{tmp_path}/mon.sock"
    frames = FrameLog(memory_frames=500)
    sender = _sender(ctx, endpoint, frames, durable=False, hwm=4)
    sub = FrameReceiver(endpoint, mode="sub", context=ctx, hwm=4)
    time.sleep(0.3)  # PUB drops everything sent before the subscription arrives
    for i in range(500):
        frames.append(_frame(i))
    frames.finish()
    sender.join(5)
    assert not sender.is_alive()
    got = 0
    while (msg := sub.recv(500)) is not None:
        if msg.kind is Kind.FRAME:
            got += 1
        if msg.kind is Kind.END:
            break
    assert 0 < got <= 500
    assert sender.stats.sent + sender.stats.skipped >= 500
    sub.close()


def test_endpoints_file_and_long_paths(tmp_path: Path) -> None:
    eps = make_endpoints(BusConfig(pipes=["stitch", "denoise"]), tmp_path)
    assert set(eps.pipes) == {"stitch", "denoise"} and eps.monitor is not None
    assert all(u.startswith("ipc://") for u in eps.pipes.values())
    write_endpoints(tmp_path, eps)
    assert read_endpoints(tmp_path) == eps
    deep = tmp_path / ("x" * 120)
    long_eps = make_endpoints(BusConfig(), deep)
    assert all(len(u) - len("ipc://") < 108 for u in long_eps.pipes.values())
    tcp = make_endpoints(BusConfig(transport="tcp", port_base=7000, pipes=["a"]), tmp_path)
    assert tcp == BusEndpoints({"a": "tcp://127.0.0.1:7000"}, "tcp://127.0.0.1:7001")
    with pytest.raises(BusError, match="no bus endpoints"):
        read_endpoints(tmp_path / "none", timeout_s=0.1)


def test_bind_failure_is_reported(tmp_path: Path, ctx: Any) -> None:
    frames = FrameLog(memory_frames=8)
    sender = PipeSender("x", "ipc:///nonexistent-dir/x/y.sock", frames, "r", BusConfig(), ctx)
    sender.start()
    with pytest.raises(BusError, match="cannot bind"):
        sender.wait_bound()
    sender.join(5)


def test_frame_log_wait_semantics() -> None:
    frames = FrameLog(memory_frames=2)
    assert not frames.wait(0, 0.01)
    threading.Timer(0.05, lambda: frames.append(_frame(0))).start()
    assert frames.wait(0, 2.0)
    frames.append(_frame(1))
    frames.append(_frame(2))
    with pytest.raises(BusError, match="no longer in memory"):
        frames.get(0)
    frames.finish()
    assert not frames.wait(3, 1.0)


def _malformed(rng: np.random.Generator, good: list[Any]) -> list[bytes]:
    """One malformed bus message: a random kind of damage to a valid frame message."""
    header = bytes(good[0].buffer if hasattr(good[0], "buffer") else good[0])
    payload = bytes(good[1].buffer if hasattr(good[1], "buffer") else good[1])
    fields = msgpack.unpackb(header)
    kind = int(rng.integers(10))
    if kind == 0:  # random bytes
        return [rng.bytes(int(rng.integers(0, 64))), rng.bytes(int(rng.integers(0, 64)))]
    if kind == 1:  # wrong number of parts
        return [header] if rng.random() < 0.5 else [header, payload, b"extra"]
    if kind == 2:  # truncated payload
        return [header, payload[: int(rng.integers(0, len(payload)))]]
    if kind == 3:  # unknown protocol version
        return [msgpack.packb({**fields, "v": int(rng.integers(2, 1000))}), payload]
    if kind == 4:  # unknown message kind
        return [msgpack.packb({**fields, "kind": "nonsense"}), payload]
    if kind == 5:  # shape that does not match the payload
        return [msgpack.packb({**fields, "shape": [int(rng.integers(1, 99)), 7]}), payload]
    if kind == 6:  # a huge declared frame
        return [msgpack.packb({**fields, "shape": [100_000, 100_000]}), payload]
    if kind == 7:  # wrong field types
        key = ["seq", "run", "shape", "dtype", "t"][int(rng.integers(5))]
        return [msgpack.packb({**fields, key: {"not": "valid"}}), payload]
    if kind == 8:  # missing fields
        drop = list(fields)[int(rng.integers(len(fields)))]
        return [msgpack.packb({k: v for k, v in fields.items() if k != drop}), payload]
    return [header[: int(rng.integers(1, len(header)))], payload]  # truncated header


def test_ten_thousand_malformed_messages_are_rejected_and_counted(tmp_path: Path, ctx: Any) -> None:
    """A real socket fed 10,000 damaged messages between valid ones: none crashes the
    receiver, none is delivered, every one is counted with a reason, valid ones still arrive."""
    endpoint = f"ipc://{tmp_path}/fuzz.sock"
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.bind(endpoint)
    receiver = FrameReceiver(endpoint, context=ctx, max_frame_bytes=1_000_000)
    rng = np.random.default_rng(7)
    good = encode_frame("r", 0, _frame(0))
    n_bad = 10_000
    push.send_multipart(good, copy=False)
    for k in range(n_bad):
        push.send_multipart(_malformed(rng, encode_frame("r", 1, _frame(1))))
        if k == n_bad // 2:
            push.send_multipart(encode_frame("r", 1, _frame(1)), copy=False)
    push.send_multipart(encode_control(Kind.END, "r", 1, count=2))
    seen = []
    while (msg := receiver.recv(5000)) is not None:
        seen.append((msg.kind, msg.seq))
        if msg.kind is Kind.END:
            break
    assert seen == [(Kind.FRAME, 0), (Kind.FRAME, 1), (Kind.END, 1)]
    stats = receiver.stats
    assert stats.frames == 2
    assert sum(stats.rejected.values()) == n_bad, stats.rejected
    assert len(stats.rejected) >= 5  # distinct reasons, not one catch-all
    push.close(0)
    receiver.close()
