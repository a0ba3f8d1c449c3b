"""Capture-stage preprocessing: crop every frame to the scanned image area.

Frames from a scanning electron microscope often carry more than the scanned
field: a burned-in data bar (FEI/Thermo, Zeiss, ... at the bottom, some vendors
at the top) and UI borders (a 1-px frame, thin coloured lines).  Neither may
reach the mosaic.  :func:`detect_crop` finds them on one frame (the capture
stage runs it on the first frame and applies the resulting :class:`CropRect`
to every frame); :func:`parse_crop` reads the ``capture.crop`` option.

Fault frames (blank, saturated, frozen) are rejected by
:class:`cemi_stream.capture.faults.FaultDetector`.

All images are 2-D ``uint8`` arrays with axes ``(y, x)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import ConfigError, SourceError

logger = logging.getLogger(__name__)

# --- data bar detection ------------------------------------------------------
# A bar row is drawn, not scanned: its background is one exact grey level, so
# most horizontal neighbours are equal.  Measured on the real data: bar rows
# 0.72..1.0 (KRISS text rows >= 0.80, FEI Teneo >= 0.72), specimen rows
# <= 0.43 (UHCS, superalloy, BSE tiles, eutectic with 36 % clipped pixels).
_BAR_ROW_FLAT = 0.6
# A drawn bar meets the specimen at a sharp line: the bar's last row is at
# least _EDGE_JUMP flatter than each of the _SHARP_ROWS specimen rows beyond
# it, and those are not bar-like.  A clipped dark specimen region instead
# fades in over several partly flat rows.
_EDGE_JUMP = 0.3
_SHARP_ROWS = 2
# Rows cutting through dense anti-aliased labels are less flat (~0.45 in the
# small bars of 240-row frames); they still count as bar rows when at least
# this share is flat and most of their pixels sit exactly at the bar
# background level.
_TEXT_ROW_FLAT = 0.3
_TEXT_ROW_BG = 0.6
# Share of the band that must be plainly flat rows (not only text rows).
_BAR_STRONG_SHARE = 0.5
# Specimen rows just above the bar must be textured (median flat fraction).
_ABOVE_MAX_FLAT = 0.6
# Fraction of rows inside the band that must look like bar rows.
_BAR_ROW_SHARE = 0.7
# Runs of non-bar rows tolerated inside a band: rows cutting through a line
# of small dense text (a 19-row bar on a 240-row frame has 4 such rows).  A
# run may be up to _BAR_GAP_FRAC of the band walked so far, at least
# _BAR_MIN_GAP and at most _BAR_MAX_GAP_FRAC of the frame height.
_BAR_MIN_GAP = 2
_BAR_GAP_FRAC = 0.5
_BAR_MAX_GAP_FRAC = 0.05
# Bar height limits as fractions of the frame height (plus a floor in rows).
_BAR_MIN_FRAC = 0.02
_BAR_MIN_ROWS = 6
_BAR_MAX_FRAC = 0.25
# The band's background level must cover this share of its pixels, and at
# least _BAR_SPAN_SHARE of each of _BAR_SPAN_BLOCKS column blocks: a bar spans
# the whole width, a dark specimen region rarely does.
_BAR_BG_SHARE = 0.5
_BAR_SPAN_BLOCKS = 8
_BAR_SPAN_SHARE = 0.3
# Labels and the scale bar: pixels far from the background level.  A flat
# band without any of them is clipped specimen, not a data bar.
_INK_CONTRAST = 64
_INK_MIN_SHARE = 0.002

# --- UI border detection -----------------------------------------------------
# Border lines may deviate a little from one level (JPEG or analogue capture).
_BORDER_TOL = 2
_BORDER_UNIFORM = 0.99
# The first specimen line next to a border must clearly differ from a border
# line; an edge line that is almost uniform (a dark void with a few specks)
# means the uniform run is specimen, not UI.
_BORDER_STEP = 0.9
# Widest border stripped, as a fraction of the dimension (and a floor in px).
# Wider uniform margins (letterboxing) need an explicit ``capture.crop``.
_BORDER_MAX_FRAC = 0.03
_BORDER_MIN_CAP = 3
# A detected crop keeping less than this share of the frame is distrusted.
_MIN_KEPT_AREA = 0.5


@dataclass(frozen=True, slots=True)
class CropRect:
    """A crop rectangle in pixels.

    Attributes
    ----------
    x, y : int
        Column and row of the top-left corner, in pixels from the frame's
        top-left corner.
    width, height : int
        Size in pixels (both at least 1).
    """

    x: int
    y: int
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("x", "y", "width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ConfigError(f"crop {name}: expected an integer, got {value!r}")
        if self.x < 0 or self.y < 0:
            raise ConfigError(f"crop {self}: the corner must not be negative")
        if self.width < 1 or self.height < 1:
            raise ConfigError(f"crop {self}: width and height must be at least 1 pixel")

    def __str__(self) -> str:
        return f"x={self.x},y={self.y},width={self.width},height={self.height}"

    @classmethod
    def full(cls, shape: tuple[int, ...]) -> CropRect:
        """The rectangle covering a whole frame.

        Parameters
        ----------
        shape : tuple of int
            Frame shape ``(height, width, ...)`` in pixels (an ndarray's shape).
        """
        if len(shape) < 2:
            raise ConfigError(f"crop: frame shape {shape} has fewer than 2 dimensions")
        return cls(0, 0, int(shape[1]), int(shape[0]))

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Cut the rectangle out of a frame.

        Parameters
        ----------
        image : ndarray
            Frame ``(y, x)`` or ``(y, x, channels)``.

        Returns
        -------
        ndarray
            A C-contiguous copy of ``image[y:y + height, x:x + width]``.

        Raises
        ------
        ConfigError
            If the rectangle does not lie inside the frame.
        """
        if image.ndim < 2:
            raise ConfigError(f"crop {self}: cannot crop an image with {image.ndim} dimensions")
        h, w = int(image.shape[0]), int(image.shape[1])
        if self.x + self.width > w or self.y + self.height > h:
            raise ConfigError(f"crop {self} does not fit in a {w} x {h} frame (width x height)")
        return image[self.y : self.y + self.height, self.x : self.x + self.width].copy(order="C")


@dataclass(frozen=True, slots=True)
class CropDetection:
    """Result of :func:`detect_crop`.

    Attributes
    ----------
    rect : CropRect
        The image area to keep, in pixels of the input frame.
    databar_rows : int
        Height in rows of the data bar that was stripped (0 when none).
    databar_side : {"bottom", "top", "none"}
        Edge the data bar was found at.
    border : tuple of int
        Width in pixels of the uniform UI border stripped on the
        ``(left, top, right, bottom)`` sides of the area left after the bar.
    """

    rect: CropRect
    databar_rows: int
    databar_side: Literal["bottom", "top", "none"]
    border: tuple[int, int, int, int]


def parse_crop(spec: str) -> CropRect | Literal["auto"] | None:
    """Read the ``capture.crop`` option.

    Parameters
    ----------
    spec : str
        ``"auto"`` (detect on the first frame), ``"none"`` (keep whole frames)
        or ``"x,y,width,height"`` in pixels, e.g. ``"0,0,1536,1024"``.

    Returns
    -------
    CropRect, "auto" or None
        None means no crop.

    Raises
    ------
    ConfigError
        If ``spec`` is none of these forms.
    """
    text = spec.strip().lower() if isinstance(spec, str) else ""
    if text == "auto":
        return "auto"
    if text == "none":
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 4 and all(p.isascii() and p.isdigit() for p in parts):
        x, y, w, h = (int(p) for p in parts)
        try:
            return CropRect(x, y, w, h)
        except ConfigError as exc:
            raise ConfigError(f"capture.crop: {spec!r}: {exc}") from None
    raise ConfigError(
        f"capture.crop: {spec!r} is not 'auto', 'none' or 'x,y,width,height' "
        "(non-negative integers, in pixels)"
    )


def check_gray8(image: np.ndarray, what: str) -> None:
    """Reject anything but a 2-D ``uint8`` frame with a clear message."""
    if not isinstance(image, np.ndarray) or image.ndim != 2 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise SourceError(f"{what}: expected a 2-D uint8 frame (y, x), got shape {shape} {dtype}")


def _near_mode(lines: np.ndarray, tol: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-line modal grey level and share of pixels within ``tol`` of it.

    Parameters
    ----------
    lines : ndarray
        ``uint8`` array ``(n_lines, length)``.
    tol : int
        Grey levels either side of the mode that still count as the mode.

    Returns
    -------
    (mode, share) : tuple of ndarray
        ``int`` level and ``float`` share (0..1) per line.
    """
    n, length = lines.shape
    # One bincount over line-offset values gives every line's histogram at once.
    offsets = (np.arange(n, dtype=np.int64) * 256)[:, None]
    hist = np.bincount((lines + offsets).ravel(), minlength=n * 256).reshape(n, 256)
    if tol > 0:
        # Window sums over levels v-tol..v+tol from a cumulative histogram.
        csum = np.zeros((n, 257), dtype=np.int64)
        np.cumsum(hist, axis=1, out=csum[:, 1:])
        levels = np.arange(256)
        hist = csum[:, np.minimum(levels + tol + 1, 256)] - csum[:, np.maximum(levels - tol, 0)]
    mode = hist.argmax(axis=1)
    share = hist[np.arange(n), mode] / float(length)
    return mode, share


def _flat_share(rows: np.ndarray) -> np.ndarray:
    """Share of exactly equal horizontal neighbours per row of a ``(y, x)`` block."""
    if rows.shape[1] < 2:
        return np.ones(rows.shape[0])
    equal = rows[:, 1:] == rows[:, :-1]
    return np.count_nonzero(equal, axis=1) / float(rows.shape[1] - 1)


def _find_bar(view: np.ndarray) -> int:
    """Height of a data bar at the END (last rows) of ``view``, or 0.

    Parameters
    ----------
    view : ndarray
        ``uint8`` frame ``(y, x)`` oriented so that the candidate edge is the
        last row (pass ``image[::-1]`` to look at the top edge).
    """
    height, width = view.shape
    max_rows = int(_BAR_MAX_FRAC * height)
    min_rows = max(_BAR_MIN_ROWS, round(_BAR_MIN_FRAC * height))
    max_gap = max(_BAR_MIN_GAP, int(_BAR_MAX_GAP_FRAC * height))
    window = min(height, max_rows + max_gap + 2)
    if window < min_rows + 2 or width < 2 * _BAR_SPAN_BLOCKS:
        return 0
    # Index 0 of the window arrays is the edge row, increasing inwards.
    rows_in = view[height - window :][::-1]
    flat = _flat_share(rows_in)
    strong = flat >= _BAR_ROW_FLAT
    # Candidate background: the commonest level of the outermost rows.
    edge_level = int(np.bincount(rows_in[:min_rows].ravel(), minlength=256).argmax())
    at_level = np.count_nonzero(rows_in == edge_level, axis=1) / float(width)
    barlike = strong | ((flat >= _TEXT_ROW_FLAT) & (at_level >= _TEXT_ROW_BG))

    last = -1
    gap = 0
    for i in range(window):
        if barlike[i]:
            last = i
            gap = 0
        else:
            gap += 1
            if gap > min(max_gap, max(_BAR_MIN_GAP, int(_BAR_GAP_FRAC * (last + 1)))):
                break
    else:
        # Flat all the way through the search window: flat specimen, not a bar.
        return 0
    # The bar ends at the outermost sharp edge the walk reached; bar-like
    # rows the walk picked up beyond it are specimen.
    n = last + 1
    # Rows past the window end count as bar-like, so they never confirm an edge.
    flat_pad = np.concatenate([flat, np.ones(_SHARP_ROWS)])
    bar_pad = np.concatenate([barlike, np.ones(_SHARP_ROWS, dtype=bool)])
    beyond_flat = np.full(n, -1.0)
    beyond_bar = np.zeros(n, dtype=bool)
    for k in range(1, _SHARP_ROWS + 1):
        beyond_flat = np.maximum(beyond_flat, flat_pad[k : n + k])
        beyond_bar |= bar_pad[k : n + k]
    edges = np.flatnonzero(barlike[:n] & ~beyond_bar & (flat[:n] - beyond_flat >= _EDGE_JUMP))
    if edges.size == 0:
        return 0
    rows = int(edges[-1]) + 1
    if not min_rows <= rows <= max_rows:
        return 0
    if np.count_nonzero(barlike[:rows]) < _BAR_ROW_SHARE * rows:
        return 0
    if np.count_nonzero(strong[:rows]) < _BAR_STRONG_SHARE * rows:
        return 0
    above = view[max(0, height - rows - max(16, rows)) : height - rows]
    if above.shape[0] == 0 or float(np.median(_flat_share(above))) > _ABOVE_MAX_FLAT:
        return 0

    band = view[height - rows :]
    hist = np.bincount(band.ravel(), minlength=256)
    background = int(hist.argmax())
    if hist[background] < _BAR_BG_SHARE * band.size:
        return 0
    is_bg = band == background
    block_edges = np.linspace(0, width, _BAR_SPAN_BLOCKS + 1).astype(int)
    block_share = np.add.reduceat(np.count_nonzero(is_bg, axis=0), block_edges[:-1]) / (
        np.diff(block_edges) * rows
    )
    if block_share.min() < _BAR_SPAN_SHARE:
        return 0
    low, high = background - _INK_CONTRAST, background + _INK_CONTRAST
    ink = np.count_nonzero((band <= low) | (band >= high))
    if ink < _INK_MIN_SHARE * band.size:
        return 0
    return rows


def _edge_run(lines: np.ndarray, cap: int) -> int:
    """Number of uniform border lines at the start of ``lines`` (0 if not a border).

    Parameters
    ----------
    lines : ndarray
        ``uint8`` array ``(n_lines, length)``; line 0 is the frame edge.
    cap : int
        Widest border accepted, in lines.
    """
    limit = min(cap + 1, lines.shape[0])
    start = 0
    # Most frames have no or a 1-2 px border: look at a few lines first and
    # only histogram more when all of them are uniform.
    for stop in (min(4, limit), min(16, limit), limit):
        if stop <= start:
            continue
        _, share = _near_mode(np.ascontiguousarray(lines[start:stop]), _BORDER_TOL)
        bad = np.flatnonzero(share < _BORDER_UNIFORM)
        if bad.size:
            run = start + int(bad[0])
            return run if share[bad[0]] < _BORDER_STEP else 0
        start = stop
    # Uniform beyond the cap (or across the whole frame): specimen or blank.
    return 0


def _strip_borders(area: np.ndarray) -> tuple[int, int, int, int]:
    """Uniform border widths ``(left, top, right, bottom)`` of a ``(y, x)`` area."""
    height, width = area.shape
    row_cap = max(_BORDER_MIN_CAP, round(_BORDER_MAX_FRAC * height))
    col_cap = max(_BORDER_MIN_CAP, round(_BORDER_MAX_FRAC * width))
    left = top = right = bottom = 0
    # Two passes: a row may look non-uniform only because a differently
    # coloured frame column crosses it, and vice versa.
    for _ in range(2):
        inner = area[:, left : width - right]
        top = _edge_run(inner, row_cap)
        bottom = _edge_run(inner[::-1], row_cap)
        inner = area[top : height - bottom]
        new_left = _edge_run(inner.T, col_cap)
        new_right = _edge_run(inner.T[::-1], col_cap)
        if (new_left, new_right) == (left, right):
            break
        left, right = new_left, new_right
    if top + bottom >= height or left + right >= width:
        return 0, 0, 0, 0
    return left, top, right, bottom


def _frame_rows_in_bar(image: np.ndarray, side: str, bar_rows: int) -> int:
    """Rows at the image side of a bar band that belong to a UI frame instead.

    A 1-px frame around the image area (KRISS/FEI: rows 0/441, cols 0/511) is
    as flat as the bar and joins the band; it is recognised by having the
    same uniform level as the frame's left or right edge column.
    """
    height = image.shape[0]
    view = image if side == "bottom" else image[::-1]
    outside = view[: height - bar_rows]
    col_cap = max(_BORDER_MIN_CAP, round(_BORDER_MAX_FRAC * outside.shape[1]))
    # Only a real side border counts (a specimen column may be uniform too).
    sides = [c for c, lines in ((0, outside.T), (-1, outside.T[::-1])) if _edge_run(lines, col_cap)]
    if not sides:
        return 0
    levels = [int(v) for v in _near_mode(np.ascontiguousarray(outside[:, sides].T), _BORDER_TOL)[0]]
    cap = min(bar_rows, max(_BORDER_MIN_CAP, round(_BORDER_MAX_FRAC * height)))
    band_top = np.ascontiguousarray(view[height - bar_rows : height - bar_rows + cap])
    row_level, row_share = _near_mode(band_top, _BORDER_TOL)
    n = 0
    for level, share in zip(row_level, row_share, strict=True):
        if share < _BORDER_UNIFORM or min(abs(int(level) - v) for v in levels) > _BORDER_TOL:
            break
        n += 1
    return n


def detect_crop(image: np.ndarray) -> CropDetection:
    """Find the specimen image area of a frame: strip a data bar and UI borders.

    Parameters
    ----------
    image : ndarray
        ``uint8`` frame ``(y, x)`` as delivered by the sources.

    Returns
    -------
    CropDetection
        The area to keep and what was stripped; the full frame when nothing
        was found.

    Raises
    ------
    SourceError
        If ``image`` is not a 2-D ``uint8`` array.

    Notes
    -----
    A data bar is a band at the bottom (else the top) edge, 2-25 % of the
    height, whose rows are drawn rather than scanned: most horizontal
    neighbours are exactly equal, one background level covers the band across
    the whole width, it holds some high-contrast labels, it starts with a
    sharp edge, and the rows above it are textured.  UI borders are runs of
    uniform rows/columns (at most ~3 % of the dimension) at the edges of what
    remains, followed by a clearly non-uniform line.  Dark specimen regions
    fail these tests because they are noisy or clipped unevenly, do not span
    the width, carry no labels, or fade in gradually.
    """
    check_gray8(image, "detect_crop")
    height, width = image.shape
    full = CropRect.full(image.shape)
    if height < 8 or width < 8:
        return CropDetection(full, 0, "none", (0, 0, 0, 0))

    side: Literal["bottom", "top", "none"] = "none"
    bar_rows = _find_bar(image)
    if bar_rows:
        side = "bottom"
    else:
        bar_rows = _find_bar(image[::-1])
        if bar_rows:
            side = "top"
    if bar_rows:
        bar_rows -= _frame_rows_in_bar(image, side, bar_rows)
    y0 = bar_rows if side == "top" else 0
    y1 = height - bar_rows if side == "bottom" else height

    left, top, right, bottom = _strip_borders(image[y0:y1])
    rect = CropRect(left, y0 + top, width - left - right, (y1 - y0) - top - bottom)
    if rect.width * rect.height < _MIN_KEPT_AREA * width * height:
        logger.warning(
            "crop detection would keep only %s of a %d x %d frame; keeping the whole frame",
            rect,
            width,
            height,
        )
        return CropDetection(full, 0, "none", (0, 0, 0, 0))
    logger.debug(
        "crop detection on %d x %d frame: data bar %d rows (%s), border %s -> %s",
        width,
        height,
        bar_rows,
        side,
        (left, top, right, bottom),
        rect,
    )
    return CropDetection(rect, bar_rows, side, (left, top, right, bottom))
