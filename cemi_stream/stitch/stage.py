"""The stitch stage: frames in, positions journal and OME-Zarr mosaic out.

Position finding and mosaic assembly are separate steps (as in ASHLAR):

1. :class:`~cemi_stream.stitch.tracker.PathTracker` places each frame as it
   arrives (provisional position, constraints) and the placement is
   committed to the journal;
2. when a row is complete, the unrendered frames (that row and the one
   before) are solved by weighted least squares against the already rendered
   ones (:mod:`cemi_stream.stitch.solve`), and the earlier of the two rows is
   rendered into the canvas; at the end the last rows are solved and rendered.

So every frame is rendered once, with positions that include its constraints
to both neighbouring rows.  ``RUN_DIR`` gets ``mosaic.ome.zarr/``,
``positions.csv`` (refined, level-0 mosaic pixels), ``stitch.json`` and
``preview.png``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .. import __version__
from ..config import Config, to_dict
from ..errors import CemiError
from ..frame import FrameMeta
from ..progress import Progress
from ..spool import SpoolReader
from .feed import frames_in_order
from .journal import POSITIONS, POSITIONS_HEADER, Journal, format_position, read_journal
from .mosaic import MosaicCanvas
from .register import RegisterConfig, Registrar
from .solve import Constraint, solve_positions
from .tracker import PathTracker, Placement

log = logging.getLogger(__name__)

MOSAIC_DIR = "mosaic.ome.zarr"
SUMMARY = "stitch.json"
PREVIEW = "preview.png"
SKIPPED = "skipped"
# The first frame goes this far inside the canvas's first chunk, so that the
# usual stage jitter above/left of it does not open a mostly empty chunk row
# (the stored mosaic starts at a chunk boundary).
CANVAS_MARGIN_PX = 128.0


@dataclass(slots=True)
class StitchSummary:
    """What the stitch stage did (also ``stitch.json``)."""

    frames: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    layout: str = "auto"
    resumed_from: int = 0
    seconds: float = 0.0
    frames_per_s: float = 0.0
    timings_ms_per_frame: dict[str, float] = field(default_factory=dict)
    residuals: dict[str, float | int] = field(default_factory=dict)
    mosaic_shape: list[int] = field(default_factory=list)
    mosaic_levels: int = 0
    pixel_size_um: float | None = None


class Assembler:
    """Solves settled rows and renders them (see the module docstring).

    Parameters
    ----------
    canvas : MosaicCanvas
        Where frames are blended.
    load : callable
        ``load(seq) -> image``: frames are read back (from the spool) when
        they are rendered instead of being held for two rows.
    """

    def __init__(self, canvas: MosaicCanvas, load: Callable[[int], np.ndarray]) -> None:
        self.canvas = canvas
        self.load = load
        self.placements: dict[int, Placement] = {}
        self.constraints: list[Constraint] = []
        self.fixed: dict[int, tuple[float, float]] = {}
        self.rows: dict[int, list[int]] = {}
        self.render_s = 0.0
        self.solve_s = 0.0

    def add(self, placement: Placement) -> None:
        """Take a placed frame; render what became settled."""
        finished_row = max(self.rows) if self.rows else None
        self.placements[placement.seq] = placement
        self.constraints.extend(placement.constraints)
        self.rows.setdefault(placement.row, []).append(placement.seq)
        if finished_row is not None and placement.row > finished_row:
            # Row ``finished_row`` is complete: the row before it is now settled.
            self._settle(render_rows=[r for r in self.rows if r < finished_row])

    def finish(self) -> dict[int, tuple[float, float]]:
        """Solve and render everything left; returns every frame's position."""
        self._settle(render_rows=list(self.rows))
        return dict(self.fixed)

    def _settle(self, render_rows: list[int]) -> None:
        free = [s for s in self.placements if s not in self.fixed]
        if not free:
            return
        t0 = time.perf_counter()
        initial = {s: (self.placements[s].x, self.placements[s].y) for s in free}
        solution = solve_positions(free, self.constraints, self.fixed, initial)
        self.solve_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        for row in sorted(render_rows):
            seqs = self.rows.pop(row)
            self._render_row(seqs, solution.positions)
        self.render_s += time.perf_counter() - t0

    def _render_row(self, seqs: list[int], positions: dict[int, tuple[float, float]]) -> None:
        m = CANVAS_MARGIN_PX
        for k, seq in enumerate(seqs):
            x, y = positions[seq]
            self.canvas.add(self.load(seq), x + m, y + m)
            self.fixed[seq] = (x, y)
            rest = [(px + m, py + m) for px, py in (positions[s] for s in seqs[k + 1 :])]
            # Chunks no later frame of this row touches are written now; the
            # next row re-opens the ones it overlaps, so RAM holds ~one frame.
            h, w = self.canvas.frame_shape
            keep = [_bbox(rest, w, h)] if rest else []
            self.canvas.flush(keep)


class RenderWorker:
    """Runs an :class:`Assembler` in its own thread.

    Registration (the caller's thread) and rendering overlap: numpy and
    OpenCV release the GIL in their inner loops, so on two cores the stage
    runs both at once.  Rendering is bursty - a whole row is rendered when
    the next one is complete - and the bounded queue lets registration run
    ahead by up to ``depth`` frames.
    """

    def __init__(self, assembler: Assembler, depth: int = 512) -> None:
        self.assembler = assembler
        self._queue: queue.Queue[Placement | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="render", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.assembler.add(item)
                except BaseException as exc:  # handed to the caller's thread
                    self._error = exc

    def add(self, placement: Placement) -> None:
        """Queue one placed frame (blocks while the queue is full)."""
        self._raise()
        self._queue.put(placement)

    def finish(self) -> dict[int, tuple[float, float]]:
        """Drain the queue, then solve and render what is left."""
        self._queue.put(None)
        self._thread.join()
        self._raise()
        return self.assembler.finish()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def _bbox(points: list[tuple[float, float]], w: int, h: int) -> tuple[float, float, float, float]:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return min(xs), min(ys), max(xs) + w, max(ys) + h


def run_stitch(
    run_dir: Path,
    config: Config,
    *,
    pipe: str = "stitch",
    stop: threading.Event | None = None,
    progress: bool = True,
    wait_s: float = 60.0,
) -> StitchSummary:
    """Run the stitch stage on ``run_dir`` until the capture's last frame.

    Resumes from ``positions.csv``/``stitch.journal`` when they exist: the
    journaled frames are not registered again, and the mosaic is rebuilt
    from the spool, so the result equals an uninterrupted run's.
    """
    run_dir = Path(run_dir)
    stop = stop or threading.Event()
    cfg = config.stitch
    started = time.monotonic()
    summary = StitchSummary(layout=cfg.layout)
    journaled = read_journal(run_dir)
    summary.resumed_from = len(journaled)
    registrar = Registrar(RegisterConfig(min_score=cfg.min_score))
    tracker: PathTracker | None = None
    assembler: Assembler | None = None
    worker: RenderWorker | None = None
    journal = Journal(run_dir, fsync=cfg.journal_fsync)
    journal.open(truncate_to=len(journaled))
    timings: defaultdict[str, float] = defaultdict(float)
    bar = Progress("stitch", enabled=progress)
    pixel_size_um = cfg.pixel_size_um
    try:
        for seq, frame in frames_in_order(run_dir, 0, pipe, wait_s=wait_s):
            if stop.is_set():
                break
            if tracker is None or assembler is None:
                if pixel_size_um is None and frame.meta.pixel_size_nm:
                    pixel_size_um = frame.meta.pixel_size_nm / 1000.0
                tracker = PathTracker(registrar, frame.shape, layout=cfg.layout)
                canvas = MosaicCanvas(
                    run_dir / MOSAIC_DIR, frame.shape,
                    pixel_size_um=pixel_size_um, chunk=cfg.chunk_px, overwrite=True,
                )  # fmt: skip
                assembler = Assembler(canvas, SpoolReader(run_dir).image)
                worker = RenderWorker(assembler)
            t0 = time.perf_counter()
            stage_px = _stage_px(frame.meta)
            if seq < len(journaled):
                placement = journaled[seq]
                tracker.replay(placement, frame.image, frame.meta.row, stage_px)
            else:
                placement = tracker.add(
                    seq, frame.meta.src_index, frame.image, frame.meta.row, stage_px
                )
                timings["register"] += time.perf_counter() - t0
                t1 = time.perf_counter()
                journal.append(placement)
                timings["journal"] += time.perf_counter() - t1
            if worker is None:  # pragma: no cover - created with the tracker
                raise CemiError("stitch: render worker missing")
            worker.add(placement)
            summary.frames += 1
            bar.update(summary.frames, f"row {placement.row}")
        if assembler is None or tracker is None or worker is None:
            raise CemiError(f"{run_dir}: the capture delivered no frames to stitch")
        positions = worker.finish()
        timings["render"] = assembler.render_s
        timings["solve"] = assembler.solve_s
        t0 = time.perf_counter()
        info = assembler.canvas.finalize()
        timings["finalize_total_s"] = time.perf_counter() - t0
        bar.close()
    finally:
        journal.close()
    x0, y0 = info.origin_xy
    origin = (x0 - CANVAS_MARGIN_PX, y0 - CANVAS_MARGIN_PX)
    _write_final_positions(run_dir, assembler.placements, positions, origin)
    preview = assembler.canvas.preview(cfg.preview_max_side)
    if not cv2.imwrite(str(run_dir / PREVIEW), preview):
        raise CemiError(f"{run_dir / PREVIEW}: could not write the preview image")
    everything = solve_positions(
        list(assembler.placements), assembler.constraints, {}, {0: (0.0, 0.0)}
    )
    summary.residuals = everything.stats()
    summary.statuses = dict(Counter(p.status for p in assembler.placements.values()))
    summary.rows = len({p.row for p in assembler.placements.values()})
    summary.layout = tracker.layout
    summary.seconds = time.monotonic() - started
    summary.frames_per_s = summary.frames / summary.seconds if summary.seconds else 0.0
    n = max(summary.frames - summary.resumed_from, 1)
    summary.timings_ms_per_frame = {
        k: round(v * 1000 / (n if k in ("register", "journal") else summary.frames), 3)
        for k, v in timings.items()
        if k != "finalize_total_s"
    }
    summary.timings_ms_per_frame["finalize_total_ms"] = round(timings["finalize_total_s"] * 1e3, 1)
    summary.mosaic_shape = list(info.shape)
    summary.mosaic_levels = info.levels
    summary.pixel_size_um = pixel_size_um
    data = {"cemi_stream": __version__, "summary": asdict(summary), "config": to_dict(config)}
    (run_dir / SUMMARY).write_text(json.dumps(data, indent=2), encoding="utf-8")
    log.info(
        "stitch: %d frames (%s) in %.1f s, mosaic %s, residual rms %.2f px",
        summary.frames, summary.statuses, summary.seconds, summary.mosaic_shape,
        summary.residuals.get("rms_px", 0.0),
    )  # fmt: skip
    return summary


def _stage_px(meta: FrameMeta) -> tuple[float, float] | None:
    """Stage position in pixels, when the header has a stage position and pixel size."""
    if meta.stage_x_um is None or meta.stage_y_um is None or not meta.pixel_size_nm:
        return None
    scale = 1000.0 / meta.pixel_size_nm
    return meta.stage_x_um * scale, meta.stage_y_um * scale


def _write_final_positions(
    run_dir: Path,
    placements: dict[int, Placement],
    positions: dict[int, tuple[float, float]],
    origin: tuple[float, float],
) -> None:
    """Replace ``positions.csv`` by refined positions in level-0 array pixels.

    Frames the capture rejected as faults (``capture.csv``) are listed too,
    with status ``skipped`` and no position, so that there is one line per
    input frame, in source order.
    """
    lines: list[tuple[int, str]] = []
    for seq, p in placements.items():
        x, y = positions[seq]
        line = format_position(seq, p.src_index, x - origin[0], y - origin[1], p.score, p.status)
        lines.append((p.src_index, line))
    capture_csv = run_dir / "capture.csv"
    if capture_csv.is_file():
        with open(capture_csv, encoding="utf-8") as f:
            next(f, None)
            for row in f:
                fields = row.rstrip("\n").split(",")
                if len(fields) >= 3 and fields[1] == "0" and fields[2] != "redundant":
                    src = int(fields[0])
                    lines.append((src, format_position(None, src, None, None, 0.0, SKIPPED)))
    lines.sort(key=lambda item: item[0])
    tmp = run_dir / (POSITIONS + ".tmp")
    tmp.write_text(POSITIONS_HEADER + "\n" + "".join(line for _, line in lines), encoding="utf-8")
    tmp.replace(run_dir / POSITIONS)


def summary_dict(summary: StitchSummary) -> dict[str, Any]:
    """The summary as plain data."""
    return asdict(summary)
