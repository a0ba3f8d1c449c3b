"""The frame-bus message format: one typed, versioned encode/decode pair.

Every message is a two-part ZeroMQ multipart message ``[header, payload]``:

* ``header`` - a msgpack map with string keys (never pickle):

  ========== ======== ==========================================================
  key        type     meaning
  ========== ======== ==========================================================
  ``v``      int      protocol version (:data:`PROTOCOL_VERSION`)
  ``kind``   str      ``frame``, ``end`` (end of stream) or ``heartbeat``
  ``run``    str      run id (one capture session)
  ``seq``    int      frames: sequence number (0, 1, 2 ... per run);
                      ``end``/``heartbeat``: the last frame sequence number
                      sent on this pipe (-1 when none yet)
  ``sent``   int      send time, UTC ns since the epoch
  ``src``    int      frames: index of the frame in its source
  ``t``      int      frames: capture time, UTC ns since the epoch
  ``shape``  [int]    frames: array shape, ``[height, width]`` for ``(y, x)``
  ``dtype``  str      frames: ``uint8`` (``uint16``/``float32`` reserved)
  ``px_nm``  float    optional: pixel size in nanometres
  ``stage``  [float]  optional: stage position ``[x_um, y_um]`` in micrometres
  ``row``    int      optional: traversal row
  ``count``  int      ``end``: number of frames in the run
  ========== ======== ==========================================================

* ``payload`` - the raw C-contiguous pixel buffer for frames (sent zero-copy),
  empty for control messages.

:func:`decode` validates everything it reads and raises
:class:`~cemi_stream.errors.ProtocolError` with a short reason, which receivers
count and log instead of crashing.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from ..errors import ProtocolError
from ..frame import Frame, FrameMeta, utc_now_ns

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
DTYPES = frozenset({"uint8", "uint16", "float32"})


class Kind(enum.StrEnum):
    """Message kinds."""

    FRAME = "frame"
    END = "end"
    HEARTBEAT = "heartbeat"


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded, validated bus message.

    Attributes
    ----------
    kind : Kind
        What the message is.
    run_id : str
        The capture run it belongs to.
    seq : int
        Frame sequence number, or for control messages the last one sent.
    sent_ns : int
        Send time, UTC ns.
    frame : Frame or None
        For ``frame`` messages: the image (a read-only zero-copy view of the
        received buffer, ``(y, x)``) and its metadata.
    count : int or None
        For ``end`` messages: the number of frames in the run.
    """

    kind: Kind
    run_id: str
    seq: int
    sent_ns: int
    frame: Frame | None = None
    count: int | None = None


def encode_frame(run_id: str, seq: int, frame: Frame) -> list[Any]:
    """Encode a frame as ``[header_bytes, pixel_buffer]``.

    The pixel buffer is the frame's own C-contiguous array, so
    ``socket.send_multipart(parts, copy=False)`` sends it without a copy.

    Parameters
    ----------
    run_id : str
        Run identifier.
    seq : int
        Frame sequence number (>= 0).
    frame : Frame
        A 2-D image ``(y, x)``; non-contiguous arrays are copied once.
    """
    image = np.ascontiguousarray(frame.image)
    meta = frame.meta
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": Kind.FRAME.value,
        "run": run_id,
        "seq": int(seq),
        "sent": utc_now_ns(),
        "src": int(meta.src_index),
        "t": int(meta.capture_time_ns),
        "shape": [int(n) for n in image.shape],
        "dtype": image.dtype.name,
    }
    if meta.pixel_size_nm is not None:
        header["px_nm"] = float(meta.pixel_size_nm)
    if meta.stage_x_um is not None and meta.stage_y_um is not None:
        header["stage"] = [float(meta.stage_x_um), float(meta.stage_y_um)]
    if meta.row is not None:
        header["row"] = int(meta.row)
    return [msgpack.packb(header), image]


def encode_control(kind: Kind, run_id: str, last_seq: int, count: int | None = None) -> list[bytes]:
    """Encode an ``end`` or ``heartbeat`` message.

    Parameters
    ----------
    kind : Kind
        ``Kind.END`` or ``Kind.HEARTBEAT``.
    run_id : str
        Run identifier.
    last_seq : int
        Last frame sequence number sent on this pipe (-1 when none).
    count : int or None
        For ``end``: total number of frames in the run.
    """
    if kind is Kind.FRAME:
        raise ValueError("use encode_frame for frames")
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": kind.value,
        "run": run_id,
        "seq": int(last_seq),
        "sent": utc_now_ns(),
    }
    if kind is Kind.END:
        header["count"] = int(count if count is not None else last_seq + 1)
    return [msgpack.packb(header), b""]


def _buffer(part: Any) -> memoryview:
    """A memoryview of one received part (bytes, memoryview or zmq.Frame)."""
    buf = getattr(part, "buffer", part)
    try:
        return memoryview(buf)
    except TypeError:
        raise ProtocolError(f"message part of type {type(part).__name__} is not a buffer") from None


def _field(
    header: dict[str, Any], key: str, kind: type | tuple[type, ...], optional: bool = False
) -> Any:
    """Fetch and type-check one header field."""
    if key not in header:
        if optional:
            return None
        raise ProtocolError(f"header lacks {key!r}")
    value = header[key]
    # bool is an int subclass; a bool where a number belongs is a malformed header.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ProtocolError(f"header field {key!r} has type {type(value).__name__}")
    return value


def decode(parts: Sequence[Any], max_payload_bytes: int) -> Message:
    """Decode and validate one received multipart message.

    Parameters
    ----------
    parts : sequence
        The received parts (``bytes``, ``memoryview`` or ``zmq.Frame``).
    max_payload_bytes : int
        Largest accepted pixel payload in bytes.

    Returns
    -------
    Message
        The validated message; for frames the image is a zero-copy view of
        the payload buffer.

    Raises
    ------
    ProtocolError
        With a short reason: wrong part count, garbage header, unknown
        version or kind, missing/mistyped field, bad shape/dtype, payload
        length not equal to shape x dtype, oversize payload.
    """
    if len(parts) != 2:
        raise ProtocolError(f"expected 2 message parts, got {len(parts)}")
    head = _buffer(parts[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {head.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    version = _field(header, "v", int)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    try:
        kind = Kind(_field(header, "kind", str))
    except ValueError:
        raise ProtocolError(f"unknown message kind {header['kind']!r}") from None
    run_id = _field(header, "run", str)
    seq = _field(header, "seq", int)
    sent = _field(header, "sent", int)
    payload = _buffer(parts[1])

    if kind is not Kind.FRAME:
        if payload.nbytes:
            raise ProtocolError(f"{kind.value} message carries a {payload.nbytes}-byte payload")
        count = _field(header, "count", int, optional=kind is not Kind.END)
        return Message(kind, run_id, seq, sent, count=count)

    if seq < 0:
        raise ProtocolError(f"negative frame sequence number {seq}")
    shape = _field(header, "shape", list)
    if len(shape) not in (2, 3) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape
    ):
        raise ProtocolError(f"invalid frame shape {shape!r}")
    dtype_name = _field(header, "dtype", str)
    if dtype_name not in DTYPES:
        raise ProtocolError(f"unsupported dtype {dtype_name!r}")
    dtype = np.dtype(dtype_name)
    expected = int(np.prod(shape)) * dtype.itemsize
    if expected > max_payload_bytes or payload.nbytes > max_payload_bytes:
        raise ProtocolError(
            f"payload of {max(expected, payload.nbytes)} bytes exceeds the "
            f"{max_payload_bytes}-byte limit"
        )
    if payload.nbytes != expected:
        raise ProtocolError(
            f"payload is {payload.nbytes} bytes but shape {shape} x {dtype_name} needs {expected}"
        )
    stage = _field(header, "stage", list, optional=True)
    if stage is not None and (
        len(stage) != 2
        or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in stage)
    ):
        raise ProtocolError(f"invalid stage position {stage!r}")
    px = _field(header, "px_nm", (int, float), optional=True)
    if px is not None and not px > 0:
        raise ProtocolError(f"invalid pixel size {px!r}")
    meta = FrameMeta(
        src_index=_field(header, "src", int),
        capture_time_ns=_field(header, "t", int),
        pixel_size_nm=float(px) if px is not None else None,
        stage_x_um=float(stage[0]) if stage is not None else None,
        stage_y_um=float(stage[1]) if stage is not None else None,
        row=_field(header, "row", int, optional=True),
    )
    image = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return Message(kind, run_id, seq, sent, frame=Frame(image, meta))
