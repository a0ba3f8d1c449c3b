"""The description of a tile grid: size, numbering order, direction, nominal overlap.

Automated tile acquisitions (the microscope's own "montage" or "tiles"
function, ASHLAR's and NIST MIST's inputs) come as a COLS x ROWS grid of
files numbered in one of four ways: row by row or column by column, each
line in the same direction (raster) or alternating (serpentine).  Only the
contract lives here (no image code): it is read by the configuration's
validation and by :mod:`cemi_stream.stitch.grid`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ..errors import ConfigError

DEFAULT_OVERLAP = 0.1


class _GridOptions(Protocol):
    @property
    def grid(self) -> str | None: ...
    @property
    def order(self) -> str: ...
    @property
    def serpentine(self) -> bool: ...
    @property
    def overlap(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class GridSpec:
    """A tile grid.

    Attributes
    ----------
    cols, rows : int
        Tiles per row and rows.
    order : {"row", "column"}
        Files numbered row by row or column by column.
    serpentine : bool
        Every other line (row, or column) runs backwards.
    overlap_x, overlap_y : float
        Nominal overlap of horizontal and vertical neighbours, fraction of
        the tile width / height.
    """

    cols: int
    rows: int
    order: str = "row"
    serpentine: bool = False
    overlap_x: float = DEFAULT_OVERLAP
    overlap_y: float = DEFAULT_OVERLAP

    @property
    def tiles(self) -> int:
        """Number of tiles in the grid."""
        return self.cols * self.rows

    def cell(self, index: int) -> tuple[int, int]:
        """``(col, row)`` of the file at 0-based position ``index`` (natural order)."""
        if not 0 <= index < self.tiles:
            raise ConfigError(
                f"stitch.grid: file {index} is outside the {self.cols}x{self.rows} grid "
                f"({self.tiles} tiles); check --grid"
            )
        line_len = self.cols if self.order == "row" else self.rows
        line, k = divmod(index, line_len)
        if self.serpentine and line % 2 == 1:
            k = line_len - 1 - k
        return (k, line) if self.order == "row" else (line, k)

    def line(self, index: int) -> int:
        """The acquisition line (row, or column) of the file at ``index``."""
        col, row = self.cell(index)
        return row if self.order == "row" else col


def grid_spec(options: _GridOptions) -> GridSpec | None:
    """Parse the grid options of the stitch configuration (None: no grid).

    Raises
    ------
    ConfigError
        A malformed grid or overlap, naming the option and the reason.
    """
    if options.order not in ("row", "column"):
        raise ConfigError(f"stitch.order (--order): {options.order!r} must be row or column")
    if options.grid is None:
        if options.overlap is not None:
            _overlap(options.overlap)  # validated even when unused
        return None
    text = str(options.grid).strip().lower().replace("*", "x")
    parts = text.split("x")
    try:
        cols, rows = (int(p) for p in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        cols = rows = 0
    if cols < 1 or rows < 1 or cols * rows < 2:
        raise ConfigError(
            f"stitch.grid (--grid): {options.grid!r} must be COLSxROWS with at least 2 tiles, "
            "e.g. 5x4"
        )
    ox, oy = _overlap(options.overlap) if options.overlap is not None else (DEFAULT_OVERLAP,) * 2
    return GridSpec(cols, rows, options.order, bool(options.serpentine), ox, oy)


def _overlap(text: str) -> tuple[float, float]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(math.isfinite(v) and 0.0 < v < 0.9 for v in values):
        raise ConfigError(
            f"stitch.overlap (--overlap): {text!r} must be one fraction or two (x,y), each "
            "between 0 and 0.9, e.g. 0.1 or 0.1,0.08"
        )
    return (values[0], values[-1])
