"""Bus message encode/decode: round trips and every kind of malformed input."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest

from cemi_stream.bus.protocol import (
    PROTOCOL_VERSION,
    Kind,
    decode,
    encode_control,
    encode_frame,
)
from cemi_stream.errors import ProtocolError
from cemi_stream.frame import Frame, FrameMeta

LIMIT = 16 * 1024 * 1024


def _frame(shape: tuple[int, ...] = (48, 64), dtype: str = "uint8") -> Frame:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, shape).astype(dtype)
    meta = FrameMeta(7, 1_700_000_000_123_456_789, 5.828, 12.5, -3.25, 2)
    return Frame(image, meta)


def _wire(parts: list[object]) -> list[bytes]:
    """What a socket would deliver: plain bytes for every part."""
    return [bytes(memoryview(p)) if not isinstance(p, bytes) else p for p in parts]  # type: ignore[arg-type]


def _header(parts: list[bytes]) -> dict[str, object]:
    return msgpack.unpackb(parts[0])  # type: ignore[no-any-return]


def _reheader(parts: list[bytes], **changes: object) -> list[bytes]:
    header = _header(parts)
    header.update(changes)
    return [msgpack.packb(header), parts[1]]


def test_frame_round_trip_keeps_pixels_and_metadata() -> None:
    frame = _frame()
    msg = decode(_wire(encode_frame("run-1", 42, frame)), LIMIT)
    assert msg.kind is Kind.FRAME
    assert (msg.run_id, msg.seq) == ("run-1", 42)
    assert msg.frame is not None
    assert np.array_equal(msg.frame.image, frame.image)
    assert msg.frame.meta == frame.meta


def test_optional_metadata_may_be_absent() -> None:
    frame = Frame(np.zeros((4, 8), np.uint8), FrameMeta(0, 1))
    parts = _wire(encode_frame("r", 0, frame))
    header = _header(parts)
    assert "px_nm" not in header and "stage" not in header and "row" not in header
    msg = decode(parts, LIMIT)
    assert msg.frame is not None and msg.frame.meta == frame.meta


def test_payload_is_sent_without_copy() -> None:
    frame = _frame()
    parts = encode_frame("r", 0, frame)
    assert parts[1] is frame.image  # the array itself goes to zmq (copy=False)


def test_decoded_image_is_a_view_of_the_buffer() -> None:
    parts = _wire(encode_frame("r", 0, _frame()))
    buf = bytearray(parts[1])
    msg = decode([parts[0], buf], LIMIT)
    assert msg.frame is not None
    buf[0] = (buf[0] + 1) % 256
    assert msg.frame.image.ravel()[0] == buf[0]


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_other_dtypes_round_trip(dtype: str) -> None:
    frame = _frame((10, 12), dtype)
    msg = decode(_wire(encode_frame("r", 1, frame)), LIMIT)
    assert msg.frame is not None and msg.frame.image.dtype == np.dtype(dtype)
    assert np.array_equal(msg.frame.image, frame.image)


def test_control_messages_round_trip() -> None:
    hb = decode(encode_control(Kind.HEARTBEAT, "r", 9), LIMIT)
    assert hb.kind is Kind.HEARTBEAT and hb.seq == 9 and hb.frame is None
    end = decode(encode_control(Kind.END, "r", 9, count=10), LIMIT)
    assert end.kind is Kind.END and end.count == 10


def test_encode_control_refuses_frame_kind() -> None:
    with pytest.raises(ValueError, match="encode_frame"):
        encode_control(Kind.FRAME, "r", 0)


def _without(parts: list[bytes], key: str) -> dict[str, object]:
    return {k: v for k, v in _header(parts).items() if k != key}


def _control(kind: str) -> dict[str, object]:
    return {"v": 1, "kind": kind, "run": "r", "seq": 1, "sent": 0}


GOOD = _wire(encode_frame("r", 3, _frame()))


@pytest.mark.parametrize(
    ("parts", "reason"),
    [
        ([GOOD[0]], "expected 2 message parts"),
        ([GOOD[0], GOOD[1], b""], "expected 2 message parts"),
        ([b"\xc1\xff garbage", GOOD[1]], "not msgpack"),
        ([b"", GOOD[1]], "not msgpack"),
        ([msgpack.packb([1, 2, 3]), GOOD[1]], "not a map"),
        (_reheader(GOOD, v=PROTOCOL_VERSION + 1), "unsupported protocol version"),
        (_reheader(GOOD, v="1"), "'v' has type str"),
        (_reheader(GOOD, kind="pickle"), "unknown message kind"),
        (_reheader(GOOD, seq=-1), "negative frame sequence"),
        (_reheader(GOOD, seq=True), "'seq' has type bool"),
        (_reheader(GOOD, shape=[48]), "invalid frame shape"),
        (_reheader(GOOD, shape=[48, 0]), "invalid frame shape"),
        (_reheader(GOOD, shape=[48, "64"]), "invalid frame shape"),
        (_reheader(GOOD, dtype="object"), "unsupported dtype"),
        (_reheader(GOOD, shape=[48, 65]), "payload is 3072 bytes but shape"),
        ([GOOD[0], GOOD[1][:-1]], "payload is 3071 bytes"),
        (_reheader(GOOD, shape=[100000, 100000]), "exceeds"),
        (_reheader(GOOD, stage=[1.0]), "invalid stage position"),
        (_reheader(GOOD, px_nm=-2.0), "invalid pixel size"),
        (
            [msgpack.packb({k: v for k, v in _header(GOOD).items() if k != "run"}), GOOD[1]],
            "lacks 'run'",
        ),
        ([b"\x80" * (70 * 1024), GOOD[1]], "exceeds"),
        (
            [msgpack.packb({"v": 1, "kind": "heartbeat", "run": "r", "seq": 1, "sent": 0}), b"x"],
            "payload",
        ),
        (
            [msgpack.packb({"v": 1, "kind": "end", "run": "r", "seq": 1, "sent": 0}), b""],
            "lacks 'count'",
        ),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(parts: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason.replace("(", r"\(").replace("[", r"\[")):
        decode(parts, LIMIT)


def test_oversize_payload_rejected_before_use() -> None:
    frame = _frame((64, 64))
    with pytest.raises(ProtocolError, match="exceeds the 1000-byte limit"):
        decode(_wire(encode_frame("r", 0, frame)), 1000)


def test_random_garbage_never_crashes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(0, 200))
        junk = rng.integers(0, 256, n).astype(np.uint8).tobytes()
        with contextlib.suppress(ProtocolError):
            decode([junk, junk[: n // 2]], LIMIT)
