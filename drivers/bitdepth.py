"""Declared bit depth of 16-bit image files (12-bit data in a 16-bit container).

SEM detectors often digitise 10, 12 or 14 bits and store them in 16-bit
files.  Some files say so:

* PNG: the ``sBIT`` chunk (significant bits per channel, before ``IDAT``);
* TIFF: ``BitsPerSample`` below the container's sample size (rare, readers
  disagree about it) or ``MaxSampleValue`` (tag 281) below the type's maximum.

A file that declares only its container's size (16 bits) says nothing useful:
these functions return None then, and the capture estimates a window from
the data instead (:mod:`cemi_stream.capture.levels`).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TAG_MAX_SAMPLE_VALUE = 281


def png_significant_bits(data: bytes | np.ndarray) -> int | None:
    """Significant bits of a PNG's grey (or first colour) channel from ``sBIT``.

    Parameters
    ----------
    data : bytes or ndarray of uint8
        The whole file, or at least everything before the first ``IDAT``.

    Returns
    -------
    int or None
        The declared bits when the file has an ``sBIT`` chunk declaring fewer
        bits than its ``IHDR`` bit depth; None otherwise (also for data that
        is not a well-formed PNG: decoding reports that).
    """
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if not raw.startswith(PNG_SIGNATURE):
        return None
    pos = len(PNG_SIGNATURE)
    depth: int | None = None
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos : pos + 8])
        body = raw[pos + 8 : pos + 8 + length]
        if len(body) < length:
            return None
        if kind == b"IHDR" and length >= 9:
            depth = body[8]
        elif kind == b"sBIT" and length >= 1 and depth is not None:
            bits = body[0]
            return bits if 0 < bits < depth else None
        elif kind in (b"IDAT", b"IEND"):
            return None  # sBIT must come before the image data
        pos += 12 + length  # length, type, body, CRC
    return None


def tiff_significant_bits(page: Any) -> int | None:
    """Significant bits declared by a TIFF page, when fewer than its sample type holds.

    Parameters
    ----------
    page : tifffile.TiffPage
        The page (its ``dtype``, ``bitspersample`` and tags are used).

    Returns
    -------
    int or None
        From ``BitsPerSample`` when it is below the sample type's size, else
        from ``MaxSampleValue`` when it is below the type's maximum (its bit
        length: 4095 -> 12); None when the page declares nothing narrower or
        is not an unsigned integer image.
    """
    dtype = getattr(page, "dtype", None)
    if dtype is None or np.dtype(dtype).kind != "u":
        return None
    container = np.dtype(dtype).itemsize * 8
    bits = int(getattr(page, "bitspersample", container) or container)
    if 0 < bits < container:
        return bits
    tag = page.tags.get(TAG_MAX_SAMPLE_VALUE)
    if tag is None:
        return None
    value = tag.value
    top = int(max(value)) if isinstance(value, tuple | list) else int(value)
    declared = top.bit_length()
    return declared if 0 < declared < container else None
