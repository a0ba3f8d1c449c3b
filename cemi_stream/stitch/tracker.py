"""Online position finding: where does each new frame land?

The tracker follows the stage path from the images themselves (the header's
``row`` field helps when present, but nothing is required):

* a frame is registered against its predecessor, predicted by the velocity
  along the row so far;
* when it no longer overlaps its predecessor (a raster row return, a
  serpentine turn), it is searched for against the start (raster) and the end
  (serpentine) of the row just finished, and a new row begins;
* from the second row on, each frame is also registered against the frame of
  the previous row it overlaps most (a row-to-row constraint);
* a frame that does not match its predecessor is tried against the frames
  before it (a chain broken by one bad frame is re-anchored by the first
  later frame that registers against anything placed);
* a frame whose registrations all fail is placed by the motion learned from
  the registered pairs (or the stage positions in the header), with status
  ``predicted`` and the reason; while no motion is known yet it is *held*:
  it gets no invented position, and is tied to the mosaic by the first later
  frame it registers against, or by the motion once it is learned;
* frames that matched only each other (an island behind a broken chain) are
  tied to the mosaic by the first of them that registers against a frame of
  the mosaic, and through the next row's row-to-row links.

Positions here are provisional (frame 0 at the origin); the global solve
(:mod:`cemi_stream.stitch.solve`) refines them from the constraints, and
:func:`final_statuses` says at the end which frames the measurements tie to
the mosaic (``placed``) and which only a motion model does (``predicted``).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .register import Prepared, Registrar, Shift
from .solve import MOTION, Constraint

log = logging.getLogger(__name__)

PLACED = "placed"
PREDICTED = "predicted"
MOTION_WEIGHT = 1e-3  # a prior, not a measurement: only holds unregistered frames
LINK = "link"  # a measured constraint to a frame other than the usual neighbours
HELD = "held"  # reason prefix: no registration and no motion known yet
_LOOSE_KEEP = 6  # frames not (yet) tied to the mosaic that later frames try to tie
_BACK = 3  # frames before the predecessor a frame is tried against when it fails


@dataclass(slots=True)
class Placement:
    """Where the tracker put one frame.

    Attributes
    ----------
    seq, src_index : int
        Frame identifiers.
    row : int
        Traversal row (0-based, as recognised by the tracker).
    x, y : float
        Provisional top-left position in mosaic pixels.
    score : float
        Best NCC of the frame's registrations (0 when predicted).
    status : str
        ``placed`` (registered against an earlier frame) or ``predicted``.
    constraints : list of Constraint
        Measurements linking this frame to earlier ones (and motion priors,
        also for earlier held frames once the motion is learned).
    reason : str
        Why the frame was predicted (``""`` when placed): e.g.
        ``motion: noise`` (placed by the learned motion; the registrar's
        reason), ``stage: ...`` (by the stage positions), ``held: ...``.
    """

    seq: int
    src_index: int
    row: int
    x: float
    y: float
    score: float
    status: str
    constraints: list[Constraint] = field(default_factory=list)
    reason: str = ""


@dataclass(slots=True)
class _Row:
    seqs: list[int] = field(default_factory=list)
    label: int | None = None  # the header's row field, when the source gives one


def _better_row_step(a: Shift, b: Shift) -> bool:
    """Whether ``a`` is the more credible row step of two successful matches.

    Scores within 0.05 are a tie (a specimen that repeats itself matches
    equally well in several places); the tie goes to the larger overlap: a
    new row starts beside its anchor, not diagonally off it.
    """
    if abs(a.score - b.score) > 0.05:
        return a.score > b.score
    return a.overlap > b.overlap


class PathTracker:
    """Places frames one by one (see the module docstring).

    Parameters
    ----------
    registrar : Registrar
        The pairwise translation estimator.
    frame_shape : (height, width)
        Shape of every frame, pixels.
    layout : {"auto", "raster", "serpentine"}
        Traversal hint; ``auto`` tries both at each row change.
    keep_rows : int
        Rows whose prepared frames stay in memory for row-to-row matching.
    """

    def __init__(
        self,
        registrar: Registrar,
        frame_shape: tuple[int, int],
        layout: Literal["auto", "raster", "serpentine"] = "auto",
        keep_rows: int = 2,
    ) -> None:
        self.registrar = registrar
        self.height, self.width = frame_shape
        self.layout = layout
        self.rows: list[_Row] = []
        self.positions: dict[int, tuple[float, float]] = {}
        self.row_of: dict[int, int] = {}
        self._prepared: dict[int, Prepared] = {}
        self._keep_rows = keep_rows
        self._steps: deque[tuple[float, float]] = deque(maxlen=5)
        self._stage: dict[int, tuple[float, float]] = {}
        self._seed_velocity: tuple[float, float] | None = None
        self._velocity_of: tuple[tuple[tuple[float, float], ...], tuple[float, float]] = (
            (),
            (0.0, 0.0),
        )
        self._row_step: tuple[float, float] | None = None
        self._ties = _Ties()
        self._held: list[int] = []  # predicted with no motion prior yet, oldest first
        self._loose: deque[int] = deque(maxlen=_LOOSE_KEEP)  # recent frames not tied
        self._tries: Counter[int] = Counter()  # attempts to tie each loose frame

    # -- public ------------------------------------------------------------

    def add(
        self,
        seq: int,
        src_index: int,
        image: np.ndarray,
        row_label: int | None,
        stage_px: tuple[float, float] | None = None,
    ) -> Placement:
        """Place frame ``seq`` (2-D uint8 ``(y, x)``) and return where it went.

        ``stage_px`` is the stage position from the frame header converted to
        pixels, when the source reports one; it disambiguates a row change
        (row start vs row end) on specimens that repeat themselves, and
        places a frame that registers against nothing.
        """
        cur = self.registrar.prepare(image)
        if stage_px is not None:
            self._stage[seq] = stage_px
        if not self.rows:
            self._start_row(row_label)
            return self._commit(Placement(seq, src_index, 0, 0.0, 0.0, 1.0, PLACED), cur)
        prev = self.rows[-1].seqs[-1]
        header_new_row = row_label is not None and row_label != self.rows[-1].label
        why = ""
        placement = None
        if not header_new_row:
            placement, why = self._along_row(seq, src_index, prev, cur)
        if placement is None:
            # No match with the predecessor: a row change, or a failed registration.
            found = self._find_row_start(cur, self._stage.get(seq))
            if found is not None or header_new_row or self._row_due():
                placement = self._new_row(seq, src_index, found, row_label)
            else:
                placement = self._reanchor(seq, src_index, prev, cur)
            if placement is None:
                placement = self._unmatched(seq, src_index, prev, why or "no_match")
        self._add_row_link(placement, cur)
        if placement.status == PLACED:
            self._tie_loose(placement, cur)
        self._prior_for_held(placement)
        return self._commit(placement, cur)

    def replay(
        self,
        p: Placement,
        image: np.ndarray,
        row_label: int | None,
        stage_px: tuple[float, float] | None = None,
    ) -> None:
        """Restore the state ``add`` left after placing ``p`` (a journaled frame)."""
        cur = self.registrar.prepare(image)
        if stage_px is not None:
            self._stage[p.seq] = stage_px
        if not self.rows or p.row != len(self.rows) - 1:
            first_of_prev = self.rows[-1].seqs[0] if self.rows else None
            last = self.velocity()
            self._start_row(row_label)
            self._steps.clear()
            layout = "raster"
            for c in p.constraints:
                if c.kind == "row" and c.i in self.positions:
                    self._row_step = (c.dx, c.dy)
                    layout = "raster" if c.i == first_of_prev else "serpentine"
                    if self.layout == "auto":
                        self.layout = layout  # type: ignore[assignment]
                    break
            if last is not None:
                sign = -1.0 if layout == "serpentine" else 1.0
                self._seed_velocity = (sign * last[0], sign * last[1])
        else:
            prev = self.rows[-1].seqs[-1]
            for c in p.constraints:
                if c.kind == "frame" and c.i == prev and c.j == p.seq:
                    self._steps.append((c.dx, c.dy))
        self._commit(p, cur)

    def velocity(self) -> tuple[float, float] | None:
        """Median displacement per frame along the current row, pixels."""
        if not self._steps:
            return None
        key = tuple(self._steps)
        if self._velocity_of[0] != key:
            # Asked several times per frame: the median of 5 steps is cached.
            steps = np.array(self._steps)
            self._velocity_of = (
                key,
                (float(np.median(steps[:, 0])), float(np.median(steps[:, 1]))),
            )
        return self._velocity_of[1]

    # -- internals ---------------------------------------------------------

    def _along_row(
        self, seq: int, src: int, prev: int, cur: Prepared
    ) -> tuple[Placement | None, str]:
        velocity = self.velocity()
        search = 0.25 * self.width if velocity is not None else None
        if velocity is None and self._seed_velocity is not None:
            # Second frame of a row: expect the previous row's motion (reversed
            # on a serpentine path), within a generous window.
            velocity, search = self._seed_velocity, 0.5 * self.width
        shift = self.registrar.register(self._prepared[prev], cur, velocity, search)
        if not shift.ok and velocity is not None and not self._steps:
            # The seeded guess may be wrong (e.g. a misjudged layout): search freely.
            shift = self.registrar.register(self._prepared[prev], cur, None, None)
        if not shift.ok:
            return None, shift.why
        px, py = self.positions[prev]
        c = Constraint(prev, seq, shift.dx, shift.dy, max(shift.score, 1e-3), "frame")
        self._steps.append((shift.dx, shift.dy))
        return Placement(
            seq, src, len(self.rows) - 1, px + shift.dx, py + shift.dy, shift.score, PLACED,
            [c, self._motion(prev, seq, (shift.dx, shift.dy))],
        ), ""  # fmt: skip

    def _reanchor(self, seq: int, src: int, prev: int, cur: Prepared) -> Placement | None:
        """Register a frame that missed its predecessor against the frames before it.

        One unregistrable frame (blank, out of focus, charging) must not cut
        the row: the next frame overlaps the one before it too when the
        overlap exceeds 50 %.
        """
        row = self.rows[-1].seqs
        velocity = self.velocity()
        for k, anchor in enumerate(reversed(row[-1 - _BACK : -1]), start=2):
            if anchor not in self._prepared:
                continue
            predicted = None if velocity is None else (k * velocity[0], k * velocity[1])
            search = None if velocity is None else 0.25 * self.width
            shift = self.registrar.register(self._prepared[anchor], cur, predicted, search)
            if shift.ok:
                ax, ay = self.positions[anchor]
                log.info("frame %d: re-anchored on frame %d (%d back)", seq, anchor, k)
                c = Constraint(anchor, seq, shift.dx, shift.dy, max(shift.score, 1e-3), LINK)
                return Placement(
                    seq, src, len(self.rows) - 1, ax + shift.dx, ay + shift.dy, shift.score,
                    PLACED, [c, self._motion(prev, seq, _divide((shift.dx, shift.dy), k))],
                )  # fmt: skip
        return None

    def _row_due(self) -> bool:
        """Whether the current row has as many frames as the one before it.

        A frame that then matches neither its predecessor nor a row end is far
        more likely the next row's first frame (its overlap with the row
        above featureless or too noisy) than one more frame along this row:
        placing it by the row step, not by the motion along the row, keeps a
        missed row change from shifting a whole row by a row's length.
        """
        if len(self.rows) < 2 or self._row_step is None:
            return False
        return len(self.rows[-1].seqs) >= len(self.rows[-2].seqs)

    def _unmatched(self, seq: int, src: int, prev: int, why: str) -> Placement:
        """A frame that registered against nothing: placed by a motion model, or held."""
        row = len(self.rows) - 1
        velocity = self.velocity()
        if velocity is not None:
            log.warning("frame %d: not registered (%s); placed by the learned motion", seq, why)
            return self._predicted(seq, src, prev, velocity, row, f"motion: {why}")
        step = self._stage_step(prev, seq)
        if step is not None:
            log.warning("frame %d: not registered (%s); placed by the stage position", seq, why)
            return self._predicted(seq, src, prev, step, row, f"stage: {why}")
        # No motion known yet: no invented position.  The frame waits for a
        # later frame to register against, or for the motion to be learned.
        log.warning("frame %d: not registered (%s) and no motion known yet: held", seq, why)
        px, py = self.positions[prev]
        return Placement(seq, src, row, px, py, 0.0, PREDICTED, [], f"{HELD}: {why}")

    def _stage_step(self, i: int, j: int) -> tuple[float, float] | None:
        if i in self._stage and j in self._stage:
            (xi, yi), (xj, yj) = self._stage[i], self._stage[j]
            return xj - xi, yj - yi
        return None

    def _tie_loose(self, placement: Placement, cur: Prepared) -> None:
        """Tie frames not yet tied to the mosaic to ``placement``, or it to the mosaic.

        Only runs while some recent frame is loose (held, or an island behind
        a broken chain), so an ordinary run pays nothing for it.
        """
        loose = [s for s in self._loose if not self._ties.tied(s) and self._tries[s] < _BACK]
        if not loose:
            return
        measured = {c.i for c in placement.constraints if c.kind != MOTION}
        cur_tied = any(self._ties.tied(i) for i in measured)
        if cur_tied:
            targets = [s for s in reversed(loose) if s not in measured]
        else:
            row = self.rows[placement.row].seqs if placement.row < len(self.rows) else []
            targets = [s for s in reversed(row) if self._ties.tied(s) and s not in measured]
        for other in targets[:_BACK]:
            prep = self._prepared.get(other)
            ox, oy = self.positions[other]
            if prep is None or not self._may_overlap((ox, oy), (placement.x, placement.y)):
                continue
            if not self._ties.tied(other):
                self._tries[other] += 1  # a frame that never matches is given up on
            shift = self.registrar.register(prep, cur, None, None)
            if shift.ok:
                log.info("frame %d: tied to frame %d", placement.seq, other)
                placement.constraints.append(
                    Constraint(other, placement.seq, shift.dx, shift.dy, max(shift.score, 1e-3),
                               LINK)
                )  # fmt: skip
                return

    def _may_overlap(self, a: tuple[float, float], b: tuple[float, float]) -> bool:
        """Whether frames at provisional positions ``a`` and ``b`` can overlap (with slack)."""
        return abs(a[0] - b[0]) < 1.25 * self.width and abs(a[1] - b[1]) < 1.25 * self.height

    def _prior_for_held(self, placement: Placement) -> None:
        """Once the motion is known, give every held frame its motion prior."""
        velocity = self.velocity()
        if velocity is None or not self._held:
            return
        for seq in self._held:
            prev = self._predecessor(seq)
            if prev is not None:
                placement.constraints.append(self._motion(prev, seq, velocity))

    def _predecessor(self, seq: int) -> int | None:
        row = self.rows[self.row_of[seq]].seqs
        k = row.index(seq)
        return row[k - 1] if k > 0 else None

    def _find_row_start(
        self, cur: Prepared, stage: tuple[float, float] | None
    ) -> tuple[Shift, str, int] | None:
        """Search ``cur`` at the start (raster) and end (serpentine) of the current row.

        When neither end matches (its overlap with the new row may be
        featureless), the frame next to each end is tried too.
        """
        row = self.rows[-1].seqs
        best = self._row_start_at(cur, stage, row[0], row[-1] if row[-1] != row[0] else None)
        if best is None and len(row) >= 3:
            best = self._row_start_at(cur, stage, row[1], row[-2] if len(row) >= 4 else None)
        return best

    def _row_start_at(
        self, cur: Prepared, stage: tuple[float, float] | None, start: int, end: int | None
    ) -> tuple[Shift, str, int] | None:
        candidates: list[tuple[str, int]] = []
        if self.layout in ("auto", "raster"):
            candidates.append(("raster", start))
        if self.layout in ("auto", "serpentine") and end is not None:
            candidates.append(("serpentine", end))
        ends = (self.rows[-1].seqs[0], self.rows[-1].seqs[-1])
        best: tuple[Shift, str, int] | None = None
        across = self._across_row()
        for layout, anchor in candidates:
            seen = layout == self._layout_seen() and anchor in ends
            predicted = self._row_step if seen else None
            shift = self.registrar.register(self._prepared[anchor], cur, predicted, None)
            # A row step must leave the row: a hit inside it is the same row, missed.
            reach = abs(across[0]) * self.width + abs(across[1]) * self.height
            leaves_row = abs(shift.dx * across[0] + shift.dy * across[1]) > 0.2 * reach
            if not (shift.ok and leaves_row):
                continue
            if stage is not None and anchor in self._stage:
                # Where the stage says we are along x must agree with the match.
                stage_dx = stage[0] - self._stage[anchor][0]
                if abs(stage_dx - shift.dx) > 0.5 * self.width:
                    continue
            if best is None or _better_row_step(shift, best[0]):
                best = (shift, layout, anchor)
        return best

    def _across_row(self) -> tuple[float, float]:
        """Unit vector across the current row (rows usually run along x)."""
        velocity = self.velocity()
        if velocity is None or np.hypot(*velocity) < 1.0:
            return 0.0, 1.0
        vx, vy = velocity
        norm = float(np.hypot(vx, vy))
        return -vy / norm, vx / norm

    def _new_row(
        self, seq: int, src: int, found: tuple[Shift, str, int] | None, label: int | None
    ) -> Placement:
        finished = self.rows[-1]
        last = self.velocity()
        self._start_row(label)
        row = len(self.rows) - 1
        self._steps.clear()
        if last is not None:
            sign = -1.0 if found is not None and found[1] == "serpentine" else 1.0
            self._seed_velocity = (sign * last[0], sign * last[1])
        if found is None:
            anchor = finished.seqs[-1] if self.layout == "serpentine" else finished.seqs[0]
            step = self._stage_step(anchor, seq) or self._row_step
            if step is None:
                log.warning("frame %d: row change not registered, no row step known: held", seq)
                ax, ay = self.positions[anchor]
                return Placement(seq, src, row, ax, ay, 0.0, PREDICTED, [],
                                 f"{HELD}: row change not registered")  # fmt: skip
            log.warning("frame %d: row change not registered; placed by the row step", seq)
            return self._predicted(seq, src, anchor, step, row, "row_step: not registered")
        shift, layout, anchor = found
        if self.layout == "auto":
            self.layout = layout  # type: ignore[assignment]
            log.info("traversal layout recognised as %s", layout)
        if anchor in (finished.seqs[0], finished.seqs[-1]):
            self._row_step = (shift.dx, shift.dy)
        ax, ay = self.positions[anchor]
        c = Constraint(anchor, seq, shift.dx, shift.dy, max(shift.score, 1e-3), "row")
        return Placement(
            seq, src, row, ax + shift.dx, ay + shift.dy, shift.score, PLACED,
            [c, self._motion(anchor, seq, (shift.dx, shift.dy))],
        )  # fmt: skip

    def _layout_seen(self) -> str | None:
        return None if self.layout == "auto" else self.layout

    def _add_row_link(self, placement: Placement, cur: Prepared) -> None:
        """Register against the most overlapping frame of the previous row."""
        if placement.row == 0:
            return
        prev_row = self.rows[placement.row - 1].seqs
        x, y = placement.x, placement.y
        best_seq, best_overlap = None, 0.0
        for s in prev_row:
            if s not in self._prepared:
                continue
            sx, sy = self.positions[s]
            ox = max(self.width - abs(sx - x), 0.0)
            oy = max(self.height - abs(sy - y), 0.0)
            if ox * oy > best_overlap:
                best_seq, best_overlap = s, ox * oy
        if best_seq is None or best_overlap < 0.1 * self.width * self.height:
            return
        # Frames of the previous row behind this one are never matched again
        # (rows are monotonic); the row's first and last stay for row changes.
        k = prev_row.index(best_seq)
        if self.layout == "raster":
            behind = prev_row[1 : max(k - 1, 1)]
        elif self.layout == "serpentine":
            behind = prev_row[k + 2 : -1]
        else:
            behind = []
        for s in behind:
            self._prepared.pop(s, None)
        if any(c.i == best_seq for c in placement.constraints if c.kind != MOTION):
            return
        sx, sy = self.positions[best_seq]
        predicted = (x - sx, y - sy)
        if placement.status == PLACED:
            # Predicted from a registered placement: good to a few pixels.
            shift = self.registrar.refine(
                self._prepared[best_seq], cur, predicted, 0.1 * self.width
            )
        else:
            shift = self.registrar.register(self._prepared[best_seq], cur, predicted, None)
        if not shift.ok:
            return
        placement.constraints.append(
            Constraint(best_seq, placement.seq, shift.dx, shift.dy, max(shift.score, 1e-3), "row")
        )
        if placement.status == PREDICTED:
            # The row link is the only measurement: take it.
            placement.x, placement.y = sx + shift.dx, sy + shift.dy
            placement.status, placement.score, placement.reason = PLACED, shift.score, ""
        else:
            placement.score = max(placement.score, shift.score)

    def _predicted(
        self, seq: int, src: int, anchor: int, step: tuple[float, float], row: int, reason: str
    ) -> Placement:
        ax, ay = self.positions[anchor]
        return Placement(
            seq, src, row, ax + step[0], ay + step[1], 0.0, PREDICTED,
            [self._motion(anchor, seq, step)], reason,
        )  # fmt: skip

    def _motion(self, i: int, j: int, step: tuple[float, float]) -> Constraint:
        return Constraint(i, j, step[0], step[1], MOTION_WEIGHT, MOTION)

    def _start_row(self, label: int | None) -> None:
        self.rows.append(_Row(label=label))
        # Prepared frames of rows older than keep_rows are no longer matched against.
        if len(self.rows) > self._keep_rows:
            for s in self.rows[-self._keep_rows - 1].seqs:
                self._prepared.pop(s, None)
                self._stage.pop(s, None)

    def _commit(self, placement: Placement, cur: Prepared) -> Placement:
        seq = placement.seq
        self.rows[placement.row].seqs.append(seq)
        self.positions[seq] = (placement.x, placement.y)
        self.row_of[seq] = placement.row
        self._prepared[seq] = cur
        self._ties.add(seq, placement.constraints)
        primed = {c.j for c in placement.constraints if c.kind == MOTION}
        self._held = [s for s in self._held if s not in primed]
        if placement.status == PREDICTED and not any(
            c.j == seq and c.kind == MOTION for c in placement.constraints
        ):
            self._held.append(seq)
        if not self._ties.tied(seq):
            self._loose.append(seq)
        return placement


class _Ties:
    """Which frames measurements tie to the first frame (union-find over constraints)."""

    def __init__(self) -> None:
        self._parent: dict[int, int] = {}
        self._root_tied: set[int] = set()

    def _root(self, a: int) -> int:
        parent = self._parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def add(self, seq: int, constraints: Iterable[Constraint]) -> None:
        if not self._parent:
            self._root_tied.add(seq)  # the first frame defines the mosaic
        self._parent.setdefault(seq, seq)
        for c in constraints:
            if c.kind == MOTION or c.i not in self._parent or c.j not in self._parent:
                continue
            a, b = self._root(c.i), self._root(c.j)
            if a != b:
                self._parent[a] = b
                if a in self._root_tied:
                    self._root_tied.discard(a)
                    self._root_tied.add(b)

    def tied(self, seq: int) -> bool:
        return seq in self._parent and self._root(seq) in self._root_tied


def _divide(step: tuple[float, float], k: int) -> tuple[float, float]:
    return step[0] / k, step[1] / k


def final_statuses(placements: Iterable[Placement]) -> dict[int, tuple[str, str]]:
    """Status and reason of every frame once the run is over.

    A frame is ``placed`` when its measurements tie it, directly or through
    other frames, to the largest group of frames the measurements connect
    (the mosaic); any other frame is ``predicted`` (held by a motion model
    only), with its reason: the tracker's, or ``island: ...`` for frames that
    registered only against each other.

    Parameters
    ----------
    placements : iterable of Placement
        Every placement of the run, with its constraints.

    Returns
    -------
    dict of int to (str, str)
        ``seq -> (status, reason)``; the reason is ``""`` for placed frames.
    """
    items = list(placements)
    parent = {p.seq: p.seq for p in items}

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    measured: set[int] = set()
    for p in items:
        for c in p.constraints:
            if c.kind != MOTION and c.i in parent and c.j in parent:
                parent[root(c.i)] = root(c.j)
                measured.update((c.i, c.j))
    sizes: dict[int, int] = {}
    for p in items:
        sizes[root(p.seq)] = sizes.get(root(p.seq), 0) + 1
    main = max(sizes, key=lambda r: (sizes[r], -min(s for s in parent if root(s) == r)))
    out: dict[int, tuple[str, str]] = {}
    for p in items:
        if root(p.seq) == main:
            out[p.seq] = (PLACED, "")
        elif p.reason:
            out[p.seq] = (PREDICTED, p.reason)
        else:
            out[p.seq] = (
                PREDICTED,
                "island: registered only against frames not tied to the mosaic",
            )
    return out
