"""Labelme annotations: our own reader of the JSON format and its rasteriser.

Labelme (https://github.com/wkentaro/labelme, GPL) writes one JSON file per
image::

    {"version": "5.x", "flags": {}, "shapes": [
        {"label": "lamellar", "points": [[x, y], ...], "group_id": null,
         "shape_type": "polygon", "flags": {}, "description": "",
         "mask": null},
        ...],
     "imagePath": "image.png", "imageData": "<base64 of the image file> or null",
     "imageHeight": 768, "imageWidth": 1024}

Points are ``[x, y]`` in pixels (x along columns, y along rows; pixel
``(row, col)`` is centred at ``x = col, y = row``).  This module reads it
without labelme and rasterises each shape the way labelme's own mask export
does, with PIL's ``ImageDraw`` on a one-bit canvas of the image's size:

``polygon``
    the filled polygon through the points (at least 3);
``rectangle``
    the filled axis-aligned rectangle with the two points as corners (both
    edges included);
``circle``
    the filled circle around the first point through the second;
``line``, ``linestrip``
    the polyline through the points, :data:`LINE_WIDTH` px wide;
``point``
    a filled disc of radius :data:`POINT_RADIUS` px around the point;
``mask``
    a base64 PNG bitmap (non-zero = inside) placed with its top-left corner
    at the first point (the second point is its bottom-right corner).

The image comes from ``imageData`` when present, else from ``imagePath``
resolved against the JSON file's folder (Windows separators accepted).  Shapes
are painted in file order: shapes with a lamellar label set pixels, shapes
with a background label clear them (a later shape wins, as in labelme's label
images).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import cv2
import numpy as np

from ..errors import AnalysisError

#: Width of ``line`` / ``linestrip`` shapes, px (labelme's mask export).
LINE_WIDTH = 10
#: Radius of ``point`` shapes, px (labelme's mask export).
POINT_RADIUS = 5
SHAPE_TYPES = ("polygon", "rectangle", "circle", "line", "linestrip", "point", "mask")
#: Labels that clear the mask by default (background painted over lamellae).
BACKGROUND_LABELS = ("_background_", "background", "non-lamellar", "not-lamellar")


@dataclass(frozen=True)
class Shape:
    """One labelme shape.

    Attributes
    ----------
    label : str
        Its label.
    shape_type : str
        One of :data:`SHAPE_TYPES`.
    points : ndarray
        ``(n, 2)`` float64 ``[x, y]`` points, px.
    mask : ndarray or None
        Bool ``(h, w)`` bitmap of a ``mask`` shape.
    """

    label: str
    shape_type: str
    points: np.ndarray
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class LabelmeSample:
    """An annotated image.

    Attributes
    ----------
    image : ndarray
        ``(y, x)`` grey image (uint8 or uint16; colour converted to grey).
    mask : ndarray
        ``(y, x)`` bool lamellar mask.
    labels : list of str
        Labels of the shapes, in file order.
    path : Path
        The JSON file.
    """

    image: np.ndarray
    mask: np.ndarray
    labels: list[str] = field(default_factory=list)
    path: Path = Path()


def _fail(path: Path | str, what: str) -> AnalysisError:
    return AnalysisError(f"{path}: {what}")


def _decode_image(data: bytes, path: Path | str, what: str) -> np.ndarray:
    arr = np.frombuffer(data, np.uint8)
    image = cv2.imdecode(arr, cv2.IMREAD_UNCHANGED) if arr.size else None
    if image is None:
        raise _fail(path, f"{what} is not a readable image")
    return image


def _to_grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype not in (np.uint8, np.uint16):
        lo, hi = float(np.min(image)), float(np.max(image))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = ((image.astype(np.float64) - lo) * scale).astype(np.uint8)
    return np.ascontiguousarray(image)


def _b64(text: Any, path: Path | str, what: str) -> bytes:
    if not isinstance(text, str):
        raise _fail(path, f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise _fail(path, f"{what} is not valid base64") from None


def _points(raw: Any, path: Path | str, index: int) -> np.ndarray:
    try:
        pts = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise _fail(path, f"shape {index}: points must be [[x, y], ...] numbers") from None
    if pts.size == 0:
        pts = pts.reshape(0, 2)
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise _fail(path, f"shape {index}: points must be [[x, y], ...] finite numbers")
    return pts


def parse_shapes(data: dict[str, Any], path: Path | str = "<labelme>") -> list[Shape]:
    """The shapes of a parsed labelme JSON object.

    Raises
    ------
    AnalysisError
        Missing ``shapes``, an unknown shape type, or too few points for it.
    """
    shapes = data.get("shapes")
    if not isinstance(shapes, list):
        raise _fail(path, "no 'shapes' list: not a labelme file")
    out = []
    least = {
        "polygon": 3,
        "rectangle": 2,
        "circle": 2,
        "line": 2,
        "linestrip": 2,
        "point": 1,
        "mask": 2,
    }
    for i, raw in enumerate(shapes):
        if not isinstance(raw, dict):
            raise _fail(path, f"shape {i} is not an object")
        label = raw.get("label")
        if not isinstance(label, str):
            raise _fail(path, f"shape {i}: label must be a string")
        kind = raw.get("shape_type") or "polygon"
        if kind not in SHAPE_TYPES:
            raise _fail(
                path,
                f"shape {i} ({label}): unsupported shape_type {kind!r} "
                f"(known: {', '.join(SHAPE_TYPES)})",
            )
        pts = _points(raw.get("points", []), path, i)
        if len(pts) < least[kind]:
            raise _fail(
                path,
                f"shape {i} ({label}): a {kind} needs at least {least[kind]} "
                f"points, has {len(pts)}",
            )
        bitmap = None
        if kind == "mask":
            png = _decode_image(
                _b64(raw.get("mask"), path, f"shape {i} mask"), path, f"shape {i} mask"
            )
            bitmap = (png if png.ndim == 2 else png[..., 0]) > 0
        out.append(Shape(label, kind, pts, bitmap))
    return out


def shape_mask(shape: Shape, size: tuple[int, int]) -> np.ndarray:
    """Rasterise one shape on a ``(height, width)`` canvas, as labelme's mask export does.

    Returns
    -------
    ndarray
        Bool ``(height, width)``.
    """
    from PIL import Image, ImageDraw

    h, w = size
    if shape.shape_type == "mask":
        out = np.zeros((h, w), bool)
        if shape.mask is None:
            return out
        x1, y1 = (int(v) for v in shape.points[0])  # truncated, as labelme's astype(int)
        bh, bw = shape.mask.shape
        ya, xa = max(0, y1), max(0, x1)
        yb, xb = min(h, y1 + bh), min(w, x1 + bw)
        if ya < yb and xa < xb:
            out[ya:yb, xa:xb] = shape.mask[ya - y1 : yb - y1, xa - x1 : xb - x1]
        return out
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    xy = [(float(x), float(y)) for x, y in shape.points]
    kind = shape.shape_type
    if kind == "circle":
        (cx, cy), (px, py) = xy[0], xy[1]
        r = math.hypot(px - cx, py - cy)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    elif kind == "rectangle":
        (ax, ay), (bx, by) = xy[0], xy[1]
        box = [min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)]
        draw.rectangle(box, outline=1, fill=1)
    elif kind in ("line", "linestrip"):
        draw.line(xy, fill=1, width=LINE_WIDTH)
    elif kind == "point":
        cx, cy = xy[0]
        pr = float(POINT_RADIUS)
        draw.ellipse([cx - pr, cy - pr, cx + pr, cy + pr], outline=1, fill=1)
    else:  # polygon
        draw.polygon(xy, outline=1, fill=1)
    return np.asarray(canvas) > 0


def _image_of(data: dict[str, Any], path: Path) -> np.ndarray:
    if data.get("imageData"):
        return _decode_image(_b64(data["imageData"], path, "imageData"), path, "imageData")
    rel = data.get("imagePath")
    if not isinstance(rel, str) or not rel:
        raise _fail(path, "neither imageData nor imagePath: no image")
    candidate = Path(rel)
    if "\\" in rel:
        candidate = Path(*PureWindowsPath(rel).parts)
    image_path = Path(
        os.path.normpath(candidate if candidate.is_absolute() else path.parent / candidate)
    )
    if not image_path.is_file():
        raise _fail(path, f"imagePath {rel!r}: no such file {image_path}")
    try:
        raw = image_path.read_bytes()
    except OSError as exc:
        raise _fail(path, f"imagePath {rel!r}: cannot read ({exc})") from None
    return _decode_image(raw, image_path, "the image")


def _matches(label: str, names: Iterable[str]) -> bool:
    low = label.strip().lower()
    return any(low == n.strip().lower() for n in names)


def read_labelme(
    path: Path,
    labels: Sequence[str] | None = None,
    background_labels: Sequence[str] = BACKGROUND_LABELS,
) -> LabelmeSample:
    """Read a labelme JSON file: its grey image and the lamellar mask of its shapes.

    Parameters
    ----------
    path : Path
        The ``.json`` file.
    labels : sequence of str, optional
        Labels that mean "lamellar" (case-insensitive).  None: every label
        that is not a background label.
    background_labels : sequence of str
        Labels whose shapes clear the mask (painted in file order).

    Returns
    -------
    LabelmeSample

    Raises
    ------
    AnalysisError
        Unreadable or malformed file, missing image, or an image whose size
        differs from ``imageHeight`` / ``imageWidth`` (one line each).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(path, "no such labelme file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _fail(path, f"not a readable JSON file ({reason})") from None
    if not isinstance(data, dict):
        raise _fail(path, "not a labelme file (top level is not an object)")
    shapes = parse_shapes(data, path)
    image = _to_grey(_image_of(data, path))
    h, w = image.shape
    stated = (data.get("imageHeight"), data.get("imageWidth"))
    if all(isinstance(v, int) for v in stated) and stated != (h, w):
        raise _fail(
            path, f"image is {w}x{h} px but imageWidth x imageHeight say {stated[1]}x{stated[0]}"
        )
    mask = np.zeros((h, w), bool)
    for shape in shapes:
        if _matches(shape.label, background_labels):
            mask &= ~shape_mask(shape, (h, w))
        elif labels is None or _matches(shape.label, labels):
            mask |= shape_mask(shape, (h, w))
    return LabelmeSample(image, mask, [s.label for s in shapes], path)


def read_labelme_dir(
    folder: Path,
    labels: Sequence[str] | None = None,
    background_labels: Sequence[str] = BACKGROUND_LABELS,
) -> list[LabelmeSample]:
    """Every ``*.json`` labelme file of ``folder`` (sorted by name), see :func:`read_labelme`.

    Raises
    ------
    AnalysisError
        A missing folder, no JSON file in it, or a bad file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AnalysisError(f"{folder}: labelme folder does not exist")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise AnalysisError(f"{folder}: no labelme .json files")
    return [read_labelme(f, labels, background_labels) for f in files]


def encode_image(image: np.ndarray, ext: str = ".png") -> str:
    """Base64 text of an image file (for ``imageData`` / ``mask``; tests and exports)."""
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(image))
    if not ok:
        raise AnalysisError(f"cannot encode a {image.shape} {image.dtype} image as {ext}")
    return base64.b64encode(io.BytesIO(buf.tobytes()).getvalue()).decode("ascii")


__all__ = [
    "BACKGROUND_LABELS",
    "LINE_WIDTH",
    "POINT_RADIUS",
    "SHAPE_TYPES",
    "LabelmeSample",
    "Shape",
    "encode_image",
    "parse_shapes",
    "read_labelme",
    "read_labelme_dir",
    "shape_mask",
]
