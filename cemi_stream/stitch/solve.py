"""Global position refinement: weighted least squares over pairwise constraints.

Every registered pair gives a constraint ``p[j] - p[i] = (dx, dy)`` with a
weight; a weak *motion* constraint links each frame to its predecessor so
that a frame whose registrations all failed still has a position.  Frames
already rendered are passed as fixed.  The solve is done separately for x
and y (translations decouple) on the sparse normal equations, then
constraints whose residual is an outlier are dropped and the solve repeated.
Motion constraints are never dropped: they only hold otherwise unconnected
frames in place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from ..errors import CemiError

log = logging.getLogger(__name__)

MOTION = "motion"


@dataclass(frozen=True, slots=True)
class Constraint:
    """One relative measurement between two frames.

    Attributes
    ----------
    i, j : int
        Frame sequence numbers.
    dx, dy : float
        Measured ``position(j) - position(i)`` in mosaic pixels.
    weight : float
        Confidence (registrations: the NCC score; motion priors: small).
    kind : str
        ``frame`` (same row), ``row`` (neighbouring rows) or ``motion``.
    """

    i: int
    j: int
    dx: float
    dy: float
    weight: float
    kind: str


@dataclass(slots=True)
class Solution:
    """Result of :func:`solve_positions`.

    Attributes
    ----------
    positions : dict of int to (float, float)
        Top-left ``(x, y)`` of every free frame, mosaic pixels.
    residuals_px : dict of int to float
        Residual length per kept registration constraint (index into the
        input sequence).
    rejected : list of int
        Indices of registration constraints dropped as outliers.
    """

    positions: dict[int, tuple[float, float]]
    residuals_px: dict[int, float] = field(default_factory=dict)
    rejected: list[int] = field(default_factory=list)

    def stats(self) -> dict[str, float | int]:
        """RMS, median and maximum residual in pixels, and counts."""
        r = np.array(list(self.residuals_px.values()), dtype=np.float64)
        return {
            "constraints": int(r.size),
            "rejected": len(self.rejected),
            "rms_px": float(np.sqrt(np.mean(r**2))) if r.size else 0.0,
            "median_px": float(np.median(r)) if r.size else 0.0,
            "max_px": float(r.max()) if r.size else 0.0,
        }


def solve_positions(
    free: Sequence[int],
    constraints: Sequence[Constraint],
    fixed: Mapping[int, tuple[float, float]],
    initial: Mapping[int, tuple[float, float]] | None = None,
    *,
    reject_px: float = 2.0,
    max_rounds: int = 8,
) -> Solution:
    """Solve for the positions of ``free`` frames.

    Parameters
    ----------
    free : sequence of int
        Frames to position.
    constraints : sequence of Constraint
        Measurements; those touching frames that are neither free nor fixed
        are ignored.
    fixed : mapping
        Frames whose position ``(x, y)`` is final (already rendered).
    initial : mapping or None
        Fallback positions used to anchor a connected group of free frames
        that touches no fixed frame (its first frame keeps its initial
        position).
    reject_px : float
        A registration residual above ``max(reject_px, 4 x 1.4826 x MAD)``
        is an outlier.
    max_rounds : int
        Solve / reject iterations.

    Returns
    -------
    Solution
    """
    index = {seq: k for k, seq in enumerate(free)}
    if not index:
        return Solution({})
    usable = [
        (n, c)
        for n, c in enumerate(constraints)
        if (c.i in index or c.i in fixed) and (c.j in index or c.j in fixed)
        and (c.i in index or c.j in index) and c.weight > 0
    ]  # fmt: skip
    anchors = _anchors(free, [c for _, c in usable], fixed, initial or {})
    rejected: set[int] = set()
    positions: dict[int, tuple[float, float]] = {}
    for _ in range(max_rounds):
        active = [(n, c) for n, c in usable if n not in rejected]
        positions = _solve_once(index, active, fixed, anchors)
        residuals = _residuals(active, positions, fixed)
        reg = {n: r for n, r in residuals.items() if constraints[n].kind != MOTION}
        if not reg:
            break
        values = np.array(list(reg.values()))
        mad = float(np.median(np.abs(values - np.median(values))))
        # An outlier drags its neighbours' residuals up too, so each round only
        # drops the worst ones (above half the largest residual) and re-solves.
        limit = max(reject_px, 4 * 1.4826 * mad, 0.5 * float(values.max()))
        worst = _droppable(
            sorted((n for n, r in reg.items() if r > limit), key=lambda n: -reg[n]),
            [c for _, c in active],
            constraints,
        )
        if not worst:
            break
        rejected.update(worst)
        log.debug("solve: rejecting %d constraints above %.2f px", len(worst), limit)
    active = [(n, c) for n, c in usable if n not in rejected]
    residuals = _residuals(active, positions, fixed)
    reg_res = {n: r for n, r in residuals.items() if constraints[n].kind != MOTION}
    return Solution(positions, reg_res, sorted(rejected))


def _droppable(
    candidates: Sequence[int], active: Sequence[Constraint], constraints: Sequence[Constraint]
) -> list[int]:
    """Candidates (worst first) to drop this round.

    A candidate is skipped when it shares a frame with one dropped this round
    (an outlier inflates its neighbours' residuals; they get another chance
    after the re-solve) or when either frame would be left without any
    constraint.
    """
    degree: dict[int, int] = {}
    for c in active:
        degree[c.i] = degree.get(c.i, 0) + 1
        degree[c.j] = degree.get(c.j, 0) + 1
    touched: set[int] = set()
    out = []
    for n in candidates:
        c = constraints[n]
        if c.i in touched or c.j in touched:
            continue
        if degree.get(c.i, 0) > 1 and degree.get(c.j, 0) > 1:
            degree[c.i] -= 1
            degree[c.j] -= 1
            touched.update((c.i, c.j))
            out.append(n)
    return out


def _anchors(
    free: Sequence[int],
    constraints: Iterable[Constraint],
    fixed: Mapping[int, tuple[float, float]],
    initial: Mapping[int, tuple[float, float]],
) -> dict[int, tuple[float, float]]:
    """One anchor per connected group of free frames that has no fixed frame."""
    parent = {seq: seq for seq in free}

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    grounded: set[int] = set()
    for c in constraints:
        if c.i in parent and c.j in parent:
            parent[root(c.i)] = root(c.j)
    for c in constraints:
        for a, b in ((c.i, c.j), (c.j, c.i)):
            if a in parent and b in fixed:
                grounded.add(root(a))
    anchors: dict[int, tuple[float, float]] = {}
    seen: set[int] = set()
    for seq in free:
        r = root(seq)
        if r in grounded or r in seen:
            continue
        seen.add(r)
        if seq not in initial:
            raise CemiError(f"solve: frame {seq} is unconnected and has no initial position")
        anchors[seq] = initial[seq]
    return anchors


def _solve_once(
    index: Mapping[int, int],
    active: Sequence[tuple[int, Constraint]],
    fixed: Mapping[int, tuple[float, float]],
    anchors: Mapping[int, tuple[float, float]],
) -> dict[int, tuple[float, float]]:
    n = len(index)
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    rhs = np.zeros((n, 2))
    diag = np.zeros(n)
    for _, c in active:
        w = c.weight
        d = np.array([c.dx, c.dy])
        ki, kj = index.get(c.i), index.get(c.j)
        # Normal equations of w * (p_j - p_i - d)^2, assembled as a graph Laplacian.
        if ki is not None and kj is not None:
            diag[ki] += w
            diag[kj] += w
            rows += [ki, kj]
            cols += [kj, ki]
            vals += [-w, -w]
            rhs[kj] += w * d
            rhs[ki] -= w * d
        elif kj is not None:
            diag[kj] += w
            rhs[kj] += w * (np.array(fixed[c.i]) + d)
        elif ki is not None:
            diag[ki] += w
            rhs[ki] += w * (np.array(fixed[c.j]) - d)
    strength = 1e6  # an anchor pins its group without distorting it
    for seq, pos in anchors.items():
        k = index[seq]
        diag[k] += strength
        rhs[k] += strength * np.array(pos)
    if np.any(diag == 0):
        missing = [seq for seq, k in index.items() if diag[k] == 0]
        raise CemiError(f"solve: frames {missing[:5]} have no constraint at all")
    matrix = sp.csc_matrix((vals, (rows, cols)), shape=(n, n)) + sp.diags(diag, format="csc")
    solution = spla.splu(matrix).solve(rhs)
    return {seq: (float(solution[k, 0]), float(solution[k, 1])) for seq, k in index.items()}


def _residuals(
    active: Sequence[tuple[int, Constraint]],
    positions: Mapping[int, tuple[float, float]],
    fixed: Mapping[int, tuple[float, float]],
) -> dict[int, float]:
    out = {}
    for n, c in active:
        pi = positions.get(c.i, fixed.get(c.i))
        pj = positions.get(c.j, fixed.get(c.j))
        if pi is None or pj is None:
            continue
        out[n] = float(np.hypot(pj[0] - pi[0] - c.dx, pj[1] - pi[1] - c.dy))
    return out
