"""The stitcher's commit record: ``positions.csv`` plus ``stitch.journal``.

For every frame the stitcher appends one line to ``stitch.journal`` (JSON:
row, provisional position, score, status and the constraints measured) and
one line to ``positions.csv`` (the contract columns
``seq,src_index,x_px,y_px,score,status``), flushes both to the operating
system (so a killed process loses nothing) and hands them to a background
thread that fsyncs them (group commit: one fsync covers every line written
since the last, so a slow disk never stalls the stitcher; a power failure
can lose only the lines of the fsync in flight).  A frame is
committed when its ``positions.csv`` line is complete; a restarted stitcher
replays the journal up to the last committed frame instead of registering
those frames again, so the resumed run computes exactly what an
uninterrupted one would.  At finalisation ``positions.csv`` is replaced
(atomically) by the refined positions in level-0 mosaic pixels.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, TextIO

from ..errors import CemiError
from .solve import Constraint
from .tracker import Placement

POSITIONS = "positions.csv"
JOURNAL = "stitch.journal"
POSITIONS_HEADER = "seq,src_index,x_px,y_px,score,status"


class JournalError(CemiError):
    """The stitch journal cannot be written or read."""


def format_position(
    seq: int | None, src: int, x: float | None, y: float | None, score: float, status: str
) -> str:
    """One ``positions.csv`` line (with newline)."""
    xs = "" if x is None else f"{x:.3f}"
    ys = "" if y is None else f"{y:.3f}"
    seqs = "" if seq is None else str(seq)
    return f"{seqs},{src},{xs},{ys},{score:.4f},{status}\n"


class Journal:
    """Appends placements durably (see the module docstring).

    Parameters
    ----------
    run_dir : Path
        Run directory.
    fsync : bool
        fsync both files after every frame (the default; a test may turn it
        off for speed).
    """

    def __init__(self, run_dir: Path, fsync: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.fsync = fsync
        self._positions: TextIO | None = None
        self._journal: TextIO | None = None
        self._dirty = threading.Event()
        self._closing = False
        self._syncer: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def _sync_loop(self) -> None:
        """Background fsync of whatever was written since the last one."""
        while True:
            self._dirty.wait()
            self._dirty.clear()
            try:
                for f in (self._journal, self._positions):
                    if f is not None and not f.closed:
                        os.fsync(f.fileno())
            except (OSError, ValueError) as exc:
                self._sync_error = OSError(str(exc))
                return
            if self._closing and not self._dirty.is_set():
                return

    def open(self, truncate_to: int) -> None:
        """Open for appending, dropping anything after the first ``truncate_to`` frames."""
        pos_path = self.run_dir / POSITIONS
        jr_path = self.run_dir / JOURNAL
        try:
            if truncate_to == 0:
                pos_path.write_text(POSITIONS_HEADER + "\n", encoding="utf-8")
                jr_path.write_text("", encoding="utf-8")
            else:
                _truncate_lines(pos_path, truncate_to + 1)
                _truncate_lines(jr_path, truncate_to)
            self._positions = open(pos_path, "a", encoding="utf-8")  # noqa: SIM115
            self._journal = open(jr_path, "a", encoding="utf-8")  # noqa: SIM115
            if self.fsync:
                self._syncer = threading.Thread(target=self._sync_loop, daemon=True)
                self._syncer.start()
        except OSError as exc:
            raise JournalError(f"{self.run_dir}: cannot open the stitch journal ({exc})") from None

    def append(self, p: Placement) -> None:
        """Commit one placement (journal first, then the positions line)."""
        if self._positions is None or self._journal is None:
            raise JournalError(f"{self.run_dir}: journal is not open")
        record = placement_to_record(p)
        try:
            self._journal.write(json.dumps(record) + "\n")
            self._journal.flush()
            self._positions.write(format_position(p.seq, p.src_index, p.x, p.y, p.score, p.status))
            self._positions.flush()
        except OSError as exc:
            raise JournalError(f"{self.run_dir}: cannot append to the journal ({exc})") from None
        if self._sync_error is not None:
            raise JournalError(f"{self.run_dir}: fsync of the journal failed ({self._sync_error})")
        self._dirty.set()

    def close(self) -> None:
        """Wait for the last fsync, then close both files."""
        if self._syncer is not None:
            self._closing = True
            self._dirty.set()
            self._syncer.join()
            self._syncer = None
        for f in (self._positions, self._journal):
            if f is not None:
                f.close()
        self._positions = self._journal = None
        if self._sync_error is not None:
            raise JournalError(f"{self.run_dir}: fsync of the journal failed ({self._sync_error})")


def placement_to_record(p: Placement) -> dict[str, Any]:
    """A placement as a JSON-ready dict (the journal's record format)."""
    return {
        "seq": p.seq, "src": p.src_index, "row": p.row, "x": p.x, "y": p.y,
        "score": p.score, "status": p.status,
        "c": [[c.i, c.j, c.dx, c.dy, c.weight, c.kind] for c in p.constraints],
        "why": p.reason,
    }  # fmt: skip


def record_to_placement(r: dict[str, Any]) -> Placement:
    """Inverse of :func:`placement_to_record` (raises KeyError/TypeError/ValueError)."""
    constraints = [
        Constraint(int(i), int(j), float(dx), float(dy), float(w), str(kind))
        for i, j, dx, dy, w, kind in r["c"]
    ]
    return Placement(
        int(r["seq"]), int(r["src"]), int(r["row"]), float(r["x"]), float(r["y"]),
        float(r["score"]), str(r["status"]), constraints, str(r.get("why", "")),
    )  # fmt: skip


def read_journal(run_dir: Path) -> list[Placement]:
    """Committed placements of an earlier run (empty when there is none)."""
    pos_path = Path(run_dir) / POSITIONS
    jr_path = Path(run_dir) / JOURNAL
    if not pos_path.is_file() or not jr_path.is_file():
        return []
    committed = _complete_lines(pos_path)[1:]
    records = _complete_lines(jr_path)
    out: list[Placement] = []
    for k, line in enumerate(records[: len(committed)]):
        try:
            out.append(record_to_placement(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalError(f"{jr_path}: corrupt record {k} ({exc})") from None
        if out[-1].seq != k:
            raise JournalError(f"{jr_path}: record {k} holds frame {out[-1].seq}")
    return out


def _complete_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    complete, _, _ = text.rpartition("\n")
    return complete.split("\n") if complete else []


def _truncate_lines(path: Path, keep: int) -> None:
    lines = _complete_lines(path)[:keep]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
