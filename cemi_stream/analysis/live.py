"""The analysis stage of a run: tiles measured as soon as the stitcher has settled them.

``run_daemon.py analyze-stage --run-dir RUN_DIR`` (started by ``replay
--analyze`` and by the daemon for runs with ``analyze``) follows the stitch
stage.  Its render process writes ``RUN_DIR/settled.json`` after each row it
renders (:meth:`cemi_stream.stitch.stage.Assembler.settled_state`): the box of
everything rendered, the box of the frames placed but not rendered yet, and
the way the rows advance.  A tile of the grid (anchored at mosaic pixel
``(0, 0)``, the live canvas's first unit corner) is *settled* when it lies in
the rendered box and wholly behind the pending frames along that way, by
:data:`SLACK_PX` more: no later frame will touch it.  Settled tiles are read
from the live mosaic array and measured (:func:`~cemi_stream.analysis.analyze.measure_tile`,
one at a time in this process, so the stage never takes more than a core
from the stitcher); each result is appended to ``RUN_DIR/analysis/tiles.jsonl``
(a restarted stage carries on from it) and, every
``analysis.maps_every_s``, ``tiles.csv``, the maps and the profiles in
``RUN_DIR/analysis`` are rewritten with what is measured so far.

Once the stitcher has finished (``stitch.json``; the mosaic is final), the
stage measures the tiles still missing from the final mosaic and writes the
outputs of ``analyze RUN_DIR`` exactly: tile boxes are matched in mosaic
pixels, so a tile measured live is reused only when the final grid has the
same box (the final level 0 starts at a unit corner, normally mosaic
``(0, 0)``; if it starts elsewhere every tile is measured again).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..daemon.stages import ANALYSIS_DIR
from ..errors import AnalysisError
from ..stitch.stage import MOSAIC_DIR, SETTLED
from ..stitch.stage import SUMMARY as STITCH_SUMMARY
from .analyze import (
    MEASURES,
    Plan,
    Settings,
    measure_tile,
    plan,
    prepare_worker,
    resolve_settings,
    tile_kwargs,
    write_outputs,
)
from .tiling import Image, tile_grid

log = logging.getLogger(__name__)

LIVE_DIR = ANALYSIS_DIR
JOURNAL = "tiles.jsonl"
#: A tile is settled this far behind the pending frames (their positions can
#: still move by the final solve, a few pixels; the blend feather lies inside them).
SLACK_PX = 64.0

Box = tuple[int, int, int, int]  # x0, y0, w, h in mosaic pixels


def settled_tiles(state: dict[str, Any], w: int, h: int) -> list[tuple[int, int]]:
    """Grid ``(row, col)`` of the ``w`` x ``h`` tiles that no later frame will change.

    Parameters
    ----------
    state : dict
        ``settled.json`` (mosaic pixels).
    w, h : int
        Tile size, pixels; the grid is anchored at mosaic pixel ``(0, 0)``.

    Returns
    -------
    list of (int, int)
        Tiles inside the rendered box and behind the pending frames.
    """
    rb = state.get("rendered_bbox")
    pb = state.get("pending_bbox")
    pr = state.get("progress")
    if not rb:
        return []
    r0, r1 = max(0, math.floor(rb[1] / h)), math.ceil(rb[3] / h)
    c0, c1 = max(0, math.floor(rb[0] / w)), math.ceil(rb[2] / w)
    out = []
    for r in range(r0, r1):
        for c in range(c0, c1):
            x0, y0, x1, y1 = c * w, r * h, (c + 1) * w, (r + 1) * h
            if pb is not None:
                if not pr:
                    return []  # pending frames but no direction yet: nothing is safe
                # behind the pending frames along the progress direction (its main axis)
                if abs(pr[1]) >= abs(pr[0]):
                    ok = y1 <= pb[1] - SLACK_PX if pr[1] > 0 else y0 >= pb[3] + SLACK_PX
                else:
                    ok = x1 <= pb[0] - SLACK_PX if pr[0] > 0 else x0 >= pb[2] + SLACK_PX
                if not ok:
                    continue
            out.append((r, c))
    return out


class TileJournal:
    """Measured tiles by mosaic box, appended to ``tiles.jsonl`` (read back on restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tiles: dict[Box, list[float]] = {}
        if path.is_file():
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    rec = json.loads(line)
                    box = (int(rec["x0"]), int(rec["y0"]), int(rec["w"]), int(rec["h"]))
                    values = [math.nan if v is None else float(v) for v in rec["v"]]
                except (ValueError, KeyError, TypeError):
                    # a line cut by a kill: the tile is measured again
                    log.warning("%s:%d: unreadable line skipped", path, n)
                    continue
                if len(values) == len(MEASURES):
                    self.tiles[box] = values
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open

    def add(self, box: Box, values: np.ndarray) -> None:
        vals = [None if not math.isfinite(v) else float(v) for v in values]
        self._file.write(json.dumps({"x0": box[0], "y0": box[1], "w": box[2], "h": box[3],
                                     "v": vals}) + "\n")  # fmt: skip
        self._file.flush()
        self.tiles[box] = [math.nan if v is None else v for v in vals]

    def close(self) -> None:
        self._file.close()


def _measure(tile: np.ndarray, run: Settings) -> np.ndarray:
    prepare_worker()
    return measure_tile(np.ascontiguousarray(tile), zero_is_outside=True, **tile_kwargs(run))


class LiveAnalysis:
    """The analysis stage's state (see the module docstring).

    Parameters
    ----------
    run_dir : Path
        The run directory.
    settings : Settings
        Tile size (``tile``, pixels; default 508 x 413), phase, method and
        segmenter; the scheduler is not used (one tile at a time).
    maps_every_s : float
        Rewrite the outputs at most this often while the run goes on.
    """

    def __init__(self, run_dir: Path, settings: Settings, maps_every_s: float = 15.0) -> None:
        self.run_dir = Path(run_dir)
        self.out = self.run_dir / LIVE_DIR
        self.out.mkdir(parents=True, exist_ok=True)
        w, h = settings.tile or (508, 413)
        self.w, self.h = int(w), int(h)
        self.requested = settings
        self.run = resolve_settings(settings, self.w, 0)
        self.maps_every_s = maps_every_s
        self.journal = TileJournal(self.out / JOURNAL)
        self.live_tiles = 0
        self.final_tiles = 0
        self.measure_s = 0.0
        self._written_at = 0.0
        self._written_count = -1
        self._pixel_size_um: float | None = None

    # -- live ----------------------------------------------------------------------

    def _live_array(self) -> tuple[Any, tuple[int, int]] | None:
        """The live level 0 and the mosaic pixel of its element (0, 0), or None."""
        import zarr

        try:
            group = zarr.open_group(str(self.run_dir / MOSAIC_DIR), mode="r", zarr_format=3)
            attrs: dict[str, Any] = dict(group.attrs)
            meta: dict[str, Any] = attrs.get("cemi_stream", {}).get("mosaic", {})
            if meta.get("state") != "live":
                return None
            ox, oy = meta["origin_xy_px"]
            self._pixel_size_um = meta.get("pixel_size_um")
            return group["0"], (int(ox), int(oy))
        except (OSError, KeyError, ValueError, TypeError, zarr.errors.GroupNotFoundError):
            return None

    def step(self, stop: threading.Event | None = None) -> int:
        """Measure the newly settled tiles; returns how many."""
        try:
            state = json.loads((self.run_dir / SETTLED).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return 0
        todo = [(r, c) for r, c in settled_tiles(state, self.w, self.h)
                if (c * self.w, r * self.h, self.w, self.h) not in self.journal.tiles]  # fmt: skip
        if not todo:
            return 0
        live = self._live_array()
        if live is None:
            return 0
        arr, (ox, oy) = live
        n = 0
        for r, c in todo:
            if stop is not None and stop.is_set():
                break
            x0, y0 = c * self.w, r * self.h
            try:
                tile = np.asarray(arr[y0 - oy : y0 - oy + self.h, x0 - ox : x0 - ox + self.w])
            except (OSError, ValueError) as exc:  # the mosaic rebuilt or finalised meanwhile
                log.debug("live tile (%d, %d) not readable now: %s", r, c, exc)
                break
            t0 = time.perf_counter()
            values = _measure(tile, self.run)
            self.measure_s += time.perf_counter() - t0
            self.journal.add((x0, y0, self.w, self.h), values)
            n += 1
        self.live_tiles += n
        return n

    def write_partial(self, force: bool = False) -> bool:
        """Rewrite the outputs from the tiles measured so far (at most every ``maps_every_s``)."""
        tiles = self.journal.tiles
        now = time.monotonic()
        if not tiles or len(tiles) == self._written_count:
            return False
        if not force and now - self._written_at < self.maps_every_s:
            return False
        boxes = [b for b in tiles if b[2] == self.w and b[3] == self.h
                 and b[0] % self.w == 0 and b[1] % self.h == 0]  # fmt: skip
        if not boxes:
            return False
        rows = max(b[1] // self.h for b in boxes) + 1
        cols = max(b[0] // self.w for b in boxes) + 1
        res = np.full((rows, cols, len(MEASURES)), np.nan)
        for b in boxes:
            res[b[1] // self.h, b[0] // self.w] = tiles[b]
        shape = (rows * self.h, cols * self.w)
        image = Image("mosaic", np.broadcast_to(np.uint8(0), shape), self._pixel_size_um, True)
        p = Plan(str(self.run_dir), [image], self.w, self.h, self.run, self.requested)
        write_outputs(p, [res], self.out, self.measure_s)
        self._written_at, self._written_count = now, len(tiles)
        return True

    # -- final ---------------------------------------------------------------------

    def finish(self, stop: threading.Event | None = None) -> dict[str, Any]:
        """Measure what is missing from the final mosaic and write the final outputs."""
        import zarr

        p = plan(self.run_dir, self.requested)
        if (p.w, p.h) != (self.w, self.h):
            raise AnalysisError(f"analysis tile {self.w}x{self.h} px changed to {p.w}x{p.h}")
        p = Plan(p.source, p.images, p.w, p.h, self.run, self.requested, p.points)
        image = p.images[0]
        group = zarr.open_group(str(self.run_dir / MOSAIC_DIR), mode="r", zarr_format=3)
        attrs: dict[str, Any] = dict(group.attrs)
        ox, oy = (int(v) for v in attrs["cemi_stream"]["mosaic"]["origin_xy_px"])
        if ox % self.w or oy % self.h:
            log.info("final mosaic starts at (%d, %d), off the live tile grid: "
                     "every tile is measured again", ox, oy)  # fmt: skip
        grid = tile_grid(tuple(image.array.shape), self.w, self.h)
        rows = max(g.row for g in grid) + 1
        cols = max(g.col for g in grid) + 1
        res = np.full((rows, cols, len(MEASURES)), np.nan)
        arr = image.store
        for g in grid:
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
            box = (g.x0 + ox, g.y0 + oy, g.w, g.h)
            known = self.journal.tiles.get(box)
            if known is None:
                tile = np.asarray(arr[g.y0 : g.y0 + g.h, g.x0 : g.x0 + g.w])
                t0 = time.perf_counter()
                values = _measure(tile, self.run)
                self.measure_s += time.perf_counter() - t0
                self.journal.add(box, values)
                self.final_tiles += 1
                known = list(values)
            res[g.row, g.col] = known
        live = {"tiles_measured_live": self.live_tiles,
                "tiles_measured_at_the_end": self.final_tiles}  # fmt: skip
        return write_outputs(p, [res], self.out, self.measure_s, extra={"live": live})

    def close(self) -> None:
        self.journal.close()


def stitch_finished(run_dir: Path) -> bool:
    """Whether the stitch stage has finished (its summary written, the mosaic final)."""
    return (Path(run_dir) / STITCH_SUMMARY).is_file()


def run_analysis_stage(
    run_dir: Path,
    settings: Settings,
    *,
    maps_every_s: float = 15.0,
    poll_s: float = 0.5,
    stop: threading.Event | None = None,
    on_step: Any = None,
) -> dict[str, Any] | None:
    """Follow the run in ``run_dir`` until its mosaic is final; returns the summary.

    Returns None when stopped (``stop`` set) before the end: what was measured
    stays in the journal and the partial outputs.
    """
    from ..daemon.lifecycle import arm_parent_guard

    arm_parent_guard()
    stage = LiveAnalysis(run_dir, settings, maps_every_s)
    try:
        while not (stop is not None and stop.is_set()):
            done = stitch_finished(run_dir)
            n = stage.step(stop)
            stage.write_partial()
            if on_step is not None:
                on_step(stage, n)
            if done:
                summary = stage.finish(stop)
                if on_step is not None:
                    on_step(stage, 0)
                return summary
            if n == 0:
                time.sleep(poll_s)
        stage.write_partial(force=True)
        return None
    finally:
        stage.close()
