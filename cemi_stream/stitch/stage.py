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
import multiprocessing as mp
import os
import queue
import sys
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
from ..bus.auth import local_client
from ..config import Config, to_dict
from ..daemon.lifecycle import arm_parent_guard
from ..daemon.stats import StatsWriter, tree_bytes
from ..errors import CemiError
from ..frame import FrameMeta
from ..progress import Progress
from .feed import SpoolFrames, frames_in_order
from .grid import GridTracker
from .gridspec import grid_spec
from .journal import (
    JOURNAL,
    POSITIONS,
    POSITIONS_HEADER,
    Journal,
    format_position,
    placement_to_record,
    read_journal,
    record_to_placement,
)
from .mosaic import MosaicCanvas
from .register import RegisterConfig, Registrar
from .solve import Constraint, solve_positions
from .tracker import PathTracker, Placement, final_statuses

log = logging.getLogger(__name__)

MOSAIC_DIR = "mosaic.ome.zarr"
SUMMARY = "stitch.json"
# Which part of the live mosaic no later frame will change (the live analysis reads it).
SETTLED = "settled.json"
SETTLED_VERSION = 1
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
    frames_dir: str = "."
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
    predicted: list[dict[str, Any]] = field(default_factory=list)


class Assembler:
    """Solves settled rows and renders them (see the module docstring).

    Parameters
    ----------
    canvas : MosaicCanvas
        Where frames are blended.
    load : callable
        ``load(seq) -> image``: frames are read back (from the spool) when
        they are rendered instead of being held for two rows.
    on_settled : callable, optional
        ``on_settled(state)`` after each render: :meth:`settled_state`.
    """

    def __init__(
        self,
        canvas: MosaicCanvas,
        load: Callable[[int], np.ndarray],
        on_settled: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.canvas = canvas
        self.load = load
        self.on_settled = on_settled
        self.rendered_bbox: list[float] | None = None
        self.row_centres: dict[int, tuple[float, float]] = {}
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
            pts = [solution.positions[s] for s in seqs]
            self.row_centres[row] = (float(np.mean([p[0] for p in pts])),
                                     float(np.mean([p[1] for p in pts])))  # fmt: skip
        self.render_s += time.perf_counter() - t0
        if self.on_settled is not None and render_rows:
            self.on_settled(self.settled_state(solution.positions))

    def settled_state(self, positions: dict[int, tuple[float, float]]) -> dict[str, Any]:
        """What of the mosaic is final: ``settled.json`` (mosaic pixels, canvas margin included).

        ``rendered_bbox`` ``[x0, y0, x1, y1]`` holds every rendered frame;
        ``pending_bbox`` the frames placed but not rendered (their latest
        positions; None when none); ``progress`` the unit vector from the
        rendered rows' centre to the pending rows' (the way later rows come).
        Everything rendered that lies behind the pending frames, seen along
        ``progress``, is final: later frames land on the pending rows or
        beyond them.
        """
        m = CANVAS_MARGIN_PX
        h, w = self.canvas.frame_shape
        pending = [positions.get(s, (self.placements[s].x, self.placements[s].y))
                   for seqs in self.rows.values() for s in seqs]  # fmt: skip
        progress = None
        if pending and self.row_centres:
            done = np.mean(list(self.row_centres.values()), axis=0)
            ahead = np.mean(pending, axis=0)
            d = ahead - done
            n = float(np.hypot(*d))
            progress = [float(d[0] / n), float(d[1] / n)] if n > 0 else None
        return {
            "version": SETTLED_VERSION,
            "frames_rendered": len(self.fixed),
            "frame_shape": [h, w],
            "rendered_bbox": self.rendered_bbox,
            "pending_bbox": [v + m for v in _bbox(pending, w, h)] if pending else None,
            "progress": progress,
            "time": time.time(),
        }

    def _render_row(self, seqs: list[int], positions: dict[int, tuple[float, float]]) -> None:
        m = CANVAS_MARGIN_PX
        for k, seq in enumerate(seqs):
            x, y = positions[seq]
            self.canvas.add(self.load(seq), x + m, y + m)
            self.fixed[seq] = (x, y)
            h, w = self.canvas.frame_shape
            box = [x + m, y + m, x + m + w, y + m + h]
            rb = self.rendered_bbox
            self.rendered_bbox = (
                box
                if rb is None
                else [
                    min(rb[0], box[0]),
                    min(rb[1], box[1]),
                    max(rb[2], box[2]),
                    max(rb[3], box[3]),
                ]
            )
            rest = [(px + m, py + m) for px, py in (positions[s] for s in seqs[k + 1 :])]
            # Chunks no later frame of this row touches are written now; the
            # next row re-opens the ones it overlaps, so RAM holds ~one frame.
            keep = [_bbox(rest, w, h)] if rest else []
            self.canvas.flush(keep)


class RenderProcess:
    """Runs the :class:`Assembler` (solve, blend, write) in a child process.

    Registration (this process) and rendering (the child) then use both
    cores; threads could not, as the GIL serialised most of the work.  The
    child reads frames back from the spool, so only placements cross the
    process boundary, as journal records (JSON text).  At the end it
    finalises the mosaic, writes ``preview.png`` and sends back the final
    positions and the mosaic geometry.

    Parameters
    ----------
    run_dir : Path
        Run directory (mosaic out).
    frames_dir : Path
        Folder whose spool holds the frames that were registered (the run
        directory, or ``RUN_DIR/denoised``): the mosaic shows those pixels.
    frame_shape : (height, width)
        Frame shape, pixels.
    pixel_size_um : float or None
        For the OME-Zarr scale.
    chunk_px, preview_max_side : int
        Canvas chunk side and preview size, pixels.
    """

    def __init__(
        self,
        run_dir: Path,
        frames_dir: Path,
        frame_shape: tuple[int, int],
        pixel_size_um: float | None,
        chunk_px: int,
        preview_max_side: int,
    ) -> None:
        ctx = mp.get_context("spawn")  # never fork a process holding ZeroMQ sockets
        self._inbox: Any = ctx.Queue(maxsize=1024)
        self._outbox: Any = ctx.Queue()
        args = (
            str(run_dir), str(frames_dir), frame_shape, pixel_size_um, chunk_px, preview_max_side,
            os.getpid(),
        )  # fmt: skip
        self._proc = ctx.Process(
            target=_render_main, args=(*args, self._inbox, self._outbox), name="render", daemon=True
        )
        self._proc.start()

    def add(self, placement: Placement) -> None:
        """Send one placed frame to the renderer."""
        if not self._proc.is_alive():
            raise CemiError(f"stitch: the render process died (exit {self._proc.exitcode})")
        self._inbox.put(json.dumps(placement_to_record(placement)))

    def finish(self) -> dict[str, Any]:
        """Ask for the final solve, render and finalisation; wait for the result."""
        self._inbox.put(None)
        while True:
            try:
                result: dict[str, Any] = self._outbox.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._proc.is_alive():
                    raise CemiError(
                        f"stitch: the render process died (exit {self._proc.exitcode})"
                    ) from None
        self._proc.join()
        if "error" in result:
            raise CemiError(f"stitch: rendering failed: {result['error']}")
        return result

    def abort(self) -> None:
        """Stop the child without a result (on errors)."""
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()


def _render_main(
    run_dir: str,
    frames_dir: str,
    frame_shape: tuple[int, int],
    pixel_size_um: float | None,
    chunk_px: int,
    preview_max_side: int,
    parent_pid: int,
    inbox: Any,
    outbox: Any,
) -> None:
    """Body of the render process (see :class:`RenderProcess`).

    It stops when the stitch process ``parent_pid`` dies, even by ``kill -9``
    (:func:`~cemi_stream.daemon.lifecycle.arm_parent_guard`).
    """
    arm_parent_guard(parent_pid, grace_s=2.0)
    try:
        path = Path(run_dir)
        canvas = MosaicCanvas(
            path / MOSAIC_DIR, frame_shape,
            pixel_size_um=pixel_size_um, chunk=chunk_px, overwrite=True,
        )  # fmt: skip
        settled = path / SETTLED

        def write_settled(state: dict[str, Any]) -> None:
            # The chunk files of what it describes are written first (the
            # reader trusts them once settled.json says so).
            canvas.sync()
            tmp = settled.with_name(settled.name + ".tmp")
            tmp.write_text(json.dumps(state), encoding="utf-8")
            os.replace(tmp, settled)

        settled.unlink(missing_ok=True)  # a rebuilt mosaic: nothing is settled yet
        assembler = Assembler(canvas, SpoolFrames(Path(frames_dir)).image, write_settled)
        while (text := inbox.get()) is not None:
            assembler.add(record_to_placement(json.loads(text)))
        positions = assembler.finish()
        t0 = time.perf_counter()
        info = canvas.finalize()
        finalize_s = time.perf_counter() - t0
        if not cv2.imwrite(str(path / PREVIEW), canvas.preview(preview_max_side)):
            raise CemiError(f"{path / PREVIEW}: could not write the preview image")
        outbox.put(
            {
                "positions": {str(k): list(v) for k, v in positions.items()},
                "origin_xy": list(info.origin_xy),
                "shape": list(info.shape),
                "levels": info.levels,
                "render_s": assembler.render_s,
                "solve_s": assembler.solve_s,
                "finalize_s": finalize_s,
            }
        )
    except Exception as exc:  # reported to the parent, which raises it
        outbox.put({"error": f"{type(exc).__name__}: {exc}"})


def _bbox(points: list[tuple[float, float]], w: int, h: int) -> tuple[float, float, float, float]:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return min(xs), min(ys), max(xs) + w, max(ys) + h


def run_stitch(
    run_dir: Path,
    config: Config,
    *,
    frames_dir: Path | None = None,
    pipe: str = "stitch",
    stop: threading.Event | None = None,
    progress: bool = True,
    wait_s: float = 60.0,
) -> StitchSummary:
    """Run the stitch stage on ``run_dir`` until the producer's last frame.

    Resumes from ``positions.csv``/``stitch.journal`` when they exist: the
    journaled frames are not registered again, and the mosaic is rebuilt
    from the spool, so the result equals an uninterrupted run's.

    Parameters
    ----------
    run_dir : Path
        Run directory: the capture's ``capture.csv`` is read there, and the
        journal, mosaic, positions and summary are written there.
    config : Config
        Stitch settings (``config.stitch``).
    frames_dir : Path or None
        Frames folder to stitch (its ``bus.json``, ``frames.zarr`` and
        completion marker; see :mod:`cemi_stream.stitch.feed`): None is
        ``run_dir`` (the raw capture), ``RUN_DIR/denoised`` stitches the
        denoise stage's output.
    pipe : str
        Bus pipe to consume while the producer runs.
    stop : threading.Event or None
        Set it to stop after the current frame.
    progress : bool
        Show a progress counter on stderr.
    wait_s : float
        How long to wait for the producer to appear or send anything.
    """
    # First: a stage spawned by replay or the daemon stops when its parent dies.
    arm_parent_guard()
    run_dir = Path(run_dir)
    frames_dir = run_dir if frames_dir is None else Path(frames_dir)
    stop = stop or threading.Event()
    cfg = config.stitch
    started = time.monotonic()
    summary = StitchSummary(layout=cfg.layout, frames_dir=_relative(frames_dir, run_dir))
    journaled = read_journal(run_dir)
    summary.resumed_from = len(journaled)
    registrar = Registrar(RegisterConfig(min_band_z=cfg.min_band_z))
    tracker: PathTracker | GridTracker | None = None
    grid = grid_spec(cfg)
    renderer: RenderProcess | None = None
    placements: list[Placement] = []
    journal = Journal(run_dir, fsync=cfg.journal_fsync)
    journal.open(truncate_to=len(journaled))
    timings: defaultdict[str, float] = defaultdict(float)
    bar = Progress("stitch", enabled=progress)
    pixel_size_um = cfg.pixel_size_um
    # Live statistics (RUN_DIR/stats/stitch.json): frames counted from seq 0 like
    # stitch.json's "frames" (journaled ones included); queue depth: placements
    # the renderer has not taken yet; bytes: the mosaic, journal and positions.
    stats = StatsWriter(run_dir, "stitch")
    stats.set_extra(resumed_from=summary.resumed_from, frames_dir=summary.frames_dir)
    stats.queue_depth_from(lambda: 0 if renderer is None else int(renderer._inbox.qsize()))
    stats.bytes_written_from(
        lambda: (
            tree_bytes(run_dir / MOSAIC_DIR)
            + sum(tree_bytes(run_dir / name) for name in (POSITIONS, JOURNAL))
        )
    )
    statuses: Counter[str] = Counter()
    rows_seen: set[int] = set()
    try:
        stats.start()
        curve = local_client(config.bus.curve_dir)
        period = 1.0 / cfg.max_fps if cfg.max_fps > 0 else 0.0
        next_due = time.monotonic()
        for seq, frame in frames_in_order(frames_dir, 0, pipe, wait_s=wait_s, curve=curve):
            if stop.is_set():
                break
            if period:  # stitch.max_fps: a fixed schedule, no bursts after a wait
                next_due = max(next_due + period, time.monotonic())
                stop.wait(max(next_due - time.monotonic(), 0.0))
            if tracker is None or renderer is None:
                if pixel_size_um is None and frame.meta.pixel_size_nm:
                    pixel_size_um = frame.meta.pixel_size_nm / 1000.0
                tracker = (
                    PathTracker(registrar, frame.shape, layout=cfg.layout)
                    if grid is None
                    else GridTracker(registrar, frame.shape, grid)
                )
                renderer = RenderProcess(
                    run_dir, frames_dir, frame.shape, pixel_size_um, cfg.chunk_px,
                    cfg.preview_max_side,
                )  # fmt: skip
            stats.frame_in()
            t0 = time.perf_counter()
            stage_px = _stage_px(frame.meta)
            ms: float | None = None
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
                t2 = time.perf_counter()
                timings["journal"] += t2 - t1
                ms = (t2 - t0) * 1000.0
            renderer.add(placement)
            placements.append(placement)
            statuses[placement.status] += 1
            rows_seen.add(placement.row)
            stats.set_extra(statuses=dict(statuses), rows=len(rows_seen))
            stats.frame_out(ms=ms)
            summary.frames += 1
            bar.update(summary.frames, f"row {placement.row}")
        if tracker is None or renderer is None:
            raise CemiError(f"{frames_dir}: the producer delivered no frames to stitch")
        result = renderer.finish()
        renderer = None
        timings["render"] = result["render_s"]
        timings["solve"] = result["solve_s"]
        timings["finalize_total_s"] = result["finalize_s"]
        bar.close()
    finally:
        journal.close()
        if renderer is not None:
            renderer.abort()
        exc = sys.exc_info()[1]
        if exc is not None:
            stats.close(f"{type(exc).__name__}: {exc}")
    positions = {int(k): (v[0], v[1]) for k, v in result["positions"].items()}
    x0, y0 = result["origin_xy"]
    origin = (x0 - CANVAS_MARGIN_PX, y0 - CANVAS_MARGIN_PX)
    by_seq = {p.seq: p for p in placements}
    final = final_statuses(placements)
    _write_final_positions(run_dir, by_seq, positions, origin, final)
    constraints = [c for p in placements for c in p.constraints]
    provisional = {p.seq: (p.x, p.y) for p in placements}
    everything = solve_positions(list(by_seq), constraints, {}, provisional)
    summary.residuals = everything.stats()
    summary.statuses = dict(Counter(status for status, _ in final.values()))
    summary.predicted = [
        {"seq": seq, "src_index": by_seq[seq].src_index, "reason": reason}
        for seq, (status, reason) in sorted(final.items())
        if status != "placed"
    ]
    summary.rows = len({p.row for p in placements})
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
    summary.mosaic_shape = list(result["shape"])
    summary.mosaic_levels = int(result["levels"])
    summary.pixel_size_um = pixel_size_um
    data = {"cemi_stream": __version__, "summary": asdict(summary), "config": to_dict(config)}
    (run_dir / SUMMARY).write_text(json.dumps(data, indent=2), encoding="utf-8")
    stats.set_counts(frames_in=summary.frames, frames_out=summary.frames)
    stats.set_extra(statuses=summary.statuses, rows=summary.rows, mosaic_shape=summary.mosaic_shape)
    stats.close()
    log.info(
        "stitch: %d frames (%s) in %.1f s, mosaic %s, residual rms %.2f px",
        summary.frames, summary.statuses, summary.seconds, summary.mosaic_shape,
        summary.residuals.get("rms_px", 0.0),
    )  # fmt: skip
    return summary


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it (``"."``, ``"denoised"``), else absolute."""
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


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
    final: dict[int, tuple[str, str]],
) -> None:
    """Replace ``positions.csv`` by refined positions in level-0 array pixels.

    The status is the final one (:func:`~cemi_stream.stitch.tracker.final_statuses`):
    a frame first predicted and later tied by a measurement is ``placed``.

    Frames the capture rejected as faults (``capture.csv``) are listed too,
    with status ``skipped`` and no position, so that there is one line per
    input frame, in source order.
    """
    lines: list[tuple[int, str]] = []
    for seq, p in placements.items():
        x, y = positions[seq]
        status = final[seq][0]
        line = format_position(seq, p.src_index, x - origin[0], y - origin[1], p.score, status)
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
