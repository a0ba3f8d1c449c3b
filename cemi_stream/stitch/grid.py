"""Position finding for tile grids: each tile against its grid neighbours.

With ``--grid COLSxROWS`` the files are tiles of a known grid
(:class:`~cemi_stream.stitch.gridspec.GridSpec`), so nothing has to be
recognised from the images: each tile is registered against every neighbour
already acquired (left/right in its line, above/below in the line before),
predicted by the grid step and searched within a window around it.  The
step comes from the registered pairs as soon as there are some (the median,
as NIST MIST estimates the stage's repeatability), before that from the
nominal ``--overlap``.

A tile whose overlaps hold no usable texture (a flat background, a sparse
specimen) registers against nothing: it is placed by the learned grid step
from its neighbours, with status ``predicted`` and the registrar's reason,
never by a wrong match.  Positions are provisional (the first tile at its
nominal grid position); the global solve refines them.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from .gridspec import GridSpec
from .register import Prepared, Registrar, Shift
from .solve import MOTION, Constraint
from .tracker import MOTION_WEIGHT, PLACED, PREDICTED, Placement

log = logging.getLogger(__name__)

_LEARNED_SEARCH = 0.05  # search radius once the step is learned, fraction of the tile side
_MIN_SEARCH_PX = 16.0


class GridTracker:
    """Places the tiles of a grid one by one (see the module docstring).

    Parameters
    ----------
    registrar : Registrar
        The pairwise translation estimator.
    frame_shape : (height, width)
        Shape of every tile, pixels.
    spec : GridSpec
        The grid.
    """

    layout = "grid"

    def __init__(self, registrar: Registrar, frame_shape: tuple[int, int], spec: GridSpec) -> None:
        self.registrar = registrar
        self.height, self.width = frame_shape
        self.spec = spec
        self.positions: dict[int, tuple[float, float]] = {}
        self._cells: dict[tuple[int, int], int] = {}
        self._cell_of: dict[int, tuple[int, int]] = {}
        self._prepared: dict[int, Prepared] = {}
        self._steps: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._line = -1

    # -- public ------------------------------------------------------------

    def add(
        self,
        seq: int,
        src_index: int,
        image: np.ndarray,
        row_label: int | None = None,
        stage_px: tuple[float, float] | None = None,
    ) -> Placement:
        """Place tile ``seq`` (file ``src_index`` of the grid, 2-D uint8 ``(y, x)``)."""
        cur = self.registrar.prepare(image)
        col, row = self.spec.cell(src_index)
        line = self.spec.line(src_index)
        neighbours = self._neighbours(col, row)
        if not neighbours:
            sx, sy = self.step("x"), self.step("y")
            p = Placement(seq, src_index, line, col * sx[0], row * sy[1], 1.0, PLACED)
            return self._commit(p, cur, col, row)
        found: list[tuple[Shift, int, str]] = []
        why = ""
        for other, axis, sign in neighbours:
            step = self.step(axis)
            predicted = (sign * step[0], sign * step[1])
            shift = self.registrar.register(
                self._prepared[other], cur, predicted, self._search(axis)
            )
            if shift.ok:
                found.append((shift, other, axis))
                self._steps[axis].append((sign * shift.dx, sign * shift.dy))
            else:
                why = why or shift.why
        if found:
            best, anchor, _ = max(found, key=lambda f: f[0].signal)
            ax, ay = self.positions[anchor]
            constraints = [
                Constraint(other, seq, s.dx, s.dy, max(s.score, 1e-3),
                           "frame" if axis == self._along() else "row")
                for s, other, axis in found
            ]  # fmt: skip
            p = Placement(seq, src_index, line, ax + best.dx, ay + best.dy, best.score, PLACED,
                          constraints)  # fmt: skip
            return self._commit(p, cur, col, row)
        # Nothing to register against (featureless overlaps): the grid model.
        constraints, xs, ys = [], [], []
        for other, axis, sign in neighbours:
            step = self.step(axis)
            dx, dy = sign * step[0], sign * step[1]
            constraints.append(Constraint(other, seq, dx, dy, MOTION_WEIGHT, MOTION))
            ox, oy = self.positions[other]
            xs.append(ox + dx)
            ys.append(oy + dy)
        log.warning("tile %d (%d, %d): not registered (%s); placed by the grid step",
                    src_index, col, row, why)  # fmt: skip
        p = Placement(seq, src_index, line, float(np.mean(xs)), float(np.mean(ys)), 0.0,
                      PREDICTED, constraints, f"grid: {why or 'no_match'}")  # fmt: skip
        return self._commit(p, cur, col, row)

    def replay(
        self,
        p: Placement,
        image: np.ndarray,
        row_label: int | None = None,
        stage_px: tuple[float, float] | None = None,
    ) -> None:
        """Restore the state ``add`` left after placing ``p`` (a journaled tile)."""
        cur = self.registrar.prepare(image)
        col, row = self.spec.cell(p.src_index)
        for c in p.constraints:
            if c.kind != MOTION and c.i in self._cell_of:
                ocol, orow = self._cell_of[c.i]
                axis = "x" if orow == row else "y"
                sign = (col - ocol) if axis == "x" else (row - orow)
                self._steps[axis].append((sign * c.dx, sign * c.dy))
        self._commit(p, cur, col, row)

    def step(self, axis: str) -> tuple[float, float]:
        """Displacement ``(dx, dy)`` to the next tile along ``axis`` (``x`` or ``y``), pixels.

        The median of the registered neighbour pairs once there are any, else
        the nominal overlap.
        """
        steps = self._steps.get(axis)
        if steps:
            arr = np.array(steps)
            return float(np.median(arr[:, 0])), float(np.median(arr[:, 1]))
        if axis == "x":
            return (1.0 - self.spec.overlap_x) * self.width, 0.0
        return 0.0, (1.0 - self.spec.overlap_y) * self.height

    # -- internals ---------------------------------------------------------

    def _along(self) -> str:
        return "x" if self.spec.order == "row" else "y"

    def _search(self, axis: str) -> float:
        """Search radius around the predicted step, pixels."""
        side = self.width if axis == "x" else self.height
        if self._steps.get(axis):
            return max(_LEARNED_SEARCH * side, _MIN_SEARCH_PX)
        # The nominal overlap may be wrong by half of itself.
        overlap = self.spec.overlap_x if axis == "x" else self.spec.overlap_y
        return max(0.5 * overlap * side, _MIN_SEARCH_PX)

    def _neighbours(self, col: int, row: int) -> list[tuple[int, str, int]]:
        """Acquired neighbours as ``(seq, axis, sign)``: ``sign`` steps from them to the tile."""
        out = []
        for dc, dr in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            other = self._cells.get((col + dc, row + dr))
            if other is not None and other in self._prepared:
                axis = "x" if dr == 0 else "y"
                out.append((other, axis, -(dc + dr)))
        return out

    def _commit(self, p: Placement, cur: Prepared, col: int, row: int) -> Placement:
        self.positions[p.seq] = (p.x, p.y)
        self._cells[(col, row)] = p.seq
        self._cell_of[p.seq] = (col, row)
        self._prepared[p.seq] = cur
        if p.row != self._line:
            # A new line: tiles two lines back are never neighbours again.
            self._line = p.row
            for seq in [s for s in self._prepared if self._line_of(s) < p.row - 1]:
                del self._prepared[seq]
        return p

    def _line_of(self, seq: int) -> int:
        col, row = self._cell_of[seq]
        return row if self.spec.order == "row" else col
