"""The run object's frame counts: read incrementally from positions.csv, re-read on a rewrite."""

from __future__ import annotations

import os
from pathlib import Path

from cemi_stream.daemon.run import _position_counts

HEADER = "seq,src_index,x_px,y_px,score,status\n"


def line(seq: int, status: str) -> str:
    return f"{seq},{seq},{10.0 * seq:.3f},0.000,0.9000,{status}\n"


def test_counts_follow_appends_partial_lines_and_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "positions.csv"
    assert _position_counts(path) == {"placed": 0, "predicted": 0, "skipped": 0}
    path.write_text(HEADER + line(0, "placed") + line(1, "predicted"))
    assert _position_counts(path) == {"placed": 1, "predicted": 1, "skipped": 0}
    with open(path, "a") as f:
        f.write(line(2, "placed") + line(3, "placed")[:7])  # the last line half-written
    assert _position_counts(path)["placed"] == 2
    with open(path, "a") as f:
        f.write(line(3, "placed")[7:])
    assert _position_counts(path) == {"placed": 3, "predicted": 1, "skipped": 0}
    # finalisation replaces the file atomically (a new inode): counted again from the start
    tmp = tmp_path / "positions.csv.tmp"
    tmp.write_text(HEADER + "".join(line(i, "placed") for i in range(4)))
    os.replace(tmp, path)
    assert _position_counts(path) == {"placed": 4, "predicted": 0, "skipped": 0}
    path.write_text(HEADER + line(0, "predicted"))  # shorter in place: counted again too
    assert _position_counts(path) == {"placed": 0, "predicted": 1, "skipped": 0}
