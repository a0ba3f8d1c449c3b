"""``analyze``: measure the microstructure of a mosaic or of images, tile by tile, on Dask.

Each image is read as a Dask array (lazily, from its OME-Zarr level or its
file), rechunked to the tile grid, and every tile is measured by
:func:`measure_tile` in a task of its own: phase fraction
(:mod:`~cemi_stream.analysis.phase`), lamellar fraction, width and count
(:mod:`~cemi_stream.analysis.lamellae`).  Only the per-tile numbers come
back, so memory stays bounded by a few tiles per worker whatever the
mosaic's length; ``--scheduler`` picks threads, processes, or a Dask
distributed scheduler at an address (the same graph, on a cluster).  The
default ``auto`` takes processes for a mosaic of :data:`PROCESSES_FROM_TILES`
tiles or more on a machine with more than one core (the measurements hold
the GIL much of the time: 2 threads gave 1.2x one thread, 2 processes 1.7x,
on the 2-core dev VM, bench/bench_analysis.py), else threads.

Outputs in ``DIR`` (contract): ``tiles.csv`` (one row per tile), ``maps/``
(one heatmap per quantity and image), ``profiles.csv`` and ``profiles.png``
(mean and spread along y per x-column), ``analysis.json`` (settings,
versions, summaries, timing) and, with ``--property``, ``correlation.json``
and ``correlation.png``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import AnalysisError
from .correlate import correlate, read_property
from .figures import draw_correlation, draw_map, draw_profiles
from .segment import LAMELLAR_KIND, PHASE_KIND
from .tiling import Image, open_images, tile_grid, tile_size_px

log = logging.getLogger(__name__)

TILES_HEADER = (
    "image,row,col,x_px,y_px,x_um,y_um,valid,phase_fraction,lamellar_fraction,"
    "lamellar_width_px,lamellar_width_um,lamella_count"
)
#: Values per tile returned by :func:`measure_tile`, in order.
MEASURES = ("valid", "phase_fraction", "lamellar_fraction", "lamellar_width_px", "lamella_count")
#: Bradley-Roth's t in the paper (its window is the tile width / 8).
PAPER_T = 0.15
#: ``--scheduler auto`` starts worker processes from this many tiles (their start, ~2-3 s,
#: is then paid back).
PROCESSES_FROM_TILES = 256
#: A tile is valid when at least this fraction of it is specimen ...
MIN_VALID_FRACTION = 0.5
#: ... and its specimen pixels are not flat (standard deviation, grey levels of 8 bits).
MIN_STD_8BIT = 2.0


@dataclass(frozen=True, slots=True)
class Settings:
    """What to measure and how (the command line's options)."""

    tile: tuple[int, int] | None = None
    tile_um: tuple[float, float] | None = None
    level: int = 0
    phase: str = "dark"
    method: str = "auto"
    segmenter: str = "classical"
    phase_model: str | None = None
    window: int | None = None
    t: float | None = None
    scheduler: str = "auto"
    workers: int | None = None
    pixel_size_um: float | None = None
    property_csv: str | None = None
    progress: bool = True


def _flat_std(image: np.ndarray) -> float:
    scale = 255.0 / float(np.iinfo(image.dtype).max) if image.dtype.kind in "ui" else 1.0
    return float(image.std()) * scale


def measure_tile(
    tile: np.ndarray, *, zero_is_outside: bool, phase: str, method: str, window: int | None,
    t: float | None, segmenter: str, phase_model: str | None = None,
) -> np.ndarray:  # fmt: skip
    """The numbers of one tile, in :data:`MEASURES` order (nan where not measured).

    Parameters
    ----------
    tile : ndarray
        2-D ``(y, x)`` pixels.
    zero_is_outside : bool
        0 means "not specimen" (a mosaic's uncovered area).
    phase, method, window, t, phase_model
        Phase-fraction settings (:func:`cemi_stream.analysis.phase.phase_fraction`;
        ``phase_model`` is the phase segmenter's file for ``method="model"``).
    segmenter : str
        ``classical`` (the structure-tensor detector), ``none`` (no lamellar
        measures) or the path of a trained segmenter (U-Net++,
        :mod:`cemi_stream.analysis.segment`).
    """
    from .lamellae import lamellar_mask, lamellar_stats
    from .phase import phase_fraction

    out = np.full(len(MEASURES), np.nan)
    valid = tile > 0 if zero_is_outside else None
    n_valid = int(valid.sum()) if valid is not None else tile.size
    if n_valid < MIN_VALID_FRACTION * tile.size:
        out[0] = 0.0
        return out
    pixels = tile[valid] if valid is not None else tile
    if _flat_std(pixels) < MIN_STD_8BIT:
        out[0] = 0.0
        return out
    out[0] = 1.0
    out[1] = phase_fraction(tile, valid, method=method, phase=phase, window=window,
                            t=PAPER_T if t is None else t, model=phase_model)  # fmt: skip
    if segmenter != "none":
        if segmenter == "classical":
            mask = lamellar_mask(tile, valid)
        else:  # a trained segmenter's file (loaded once per process)
            from .segment import load_segmenter

            mask = load_segmenter(segmenter).predict(tile, valid)
        stats = lamellar_stats(tile, mask, valid)
        out[2] = stats.lamellar_fraction
        out[3] = stats.width_px
        out[4] = stats.count
    return out


def tile_kwargs(s: Settings) -> dict[str, Any]:
    """The keyword arguments of :func:`measure_tile` (but ``zero_is_outside``) from ``s``."""
    return {"phase": s.phase, "method": s.method, "window": s.window, "t": s.t,
            "segmenter": s.segmenter, "phase_model": s.phase_model}  # fmt: skip


def prepare_worker() -> None:
    """Settings for a process or thread that measures one tile at a time.

    OpenCV's own threads would only fight the scheduler's for the same cores;
    reusing freed memory spares the page faults of every tile's temporaries
    (:mod:`cemi_stream.allocator`).  Cheap to call again.
    """
    import cv2

    from ..allocator import keep_freed_memory

    cv2.setNumThreads(1)
    keep_freed_memory()


def _measure_block(block: np.ndarray, **kw: Any) -> np.ndarray:
    prepare_worker()
    return measure_tile(np.ascontiguousarray(block), **kw).reshape(1, 1, len(MEASURES))


class _Progress:
    """Counts finished tile tasks of a local Dask scheduler into a progress bar."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        from dask.callbacks import Callback

        from ..progress import Progress

        bar = Progress(label, total, enabled=enabled)
        done = [0]

        def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if isinstance(key, tuple) and str(key[0]).startswith("measure"):
                done[0] += 1
                bar.update(done[0], "tiles")

        self.callback = Callback(posttask=posttask)
        self.bar = bar


def _compute(images: list[Image], w: int, h: int, s: Settings) -> list[np.ndarray]:
    """Per image the ``(rows, cols, len(MEASURES))`` array of tile numbers."""
    import dask
    import dask.array as da

    graphs = []
    total = 0
    for im in images:
        # A mosaic: one task per tile reads its own region from the store (a
        # rechunk would ship every stored chunk between tasks, and between
        # processes with the processes scheduler).
        arr = (da.from_zarr(im.store, chunks=(h, w)) if im.store is not None
               else im.array.rechunk((h, w)))  # fmt: skip
        graphs.append(
            da.map_blocks(
                _measure_block,
                arr,
                dtype=float,
                chunks=(1, 1, len(MEASURES)),
                new_axis=2,
                name=f"measure-{im.name}-{w}x{h}",
                zero_is_outside=im.zero_is_outside,
                **tile_kwargs(s),
            )
        )
        total += int(np.prod(arr.numblocks))
    if s.scheduler in ("threads", "processes", "sync"):
        progress = _Progress(total, "analyze", s.progress)
        with progress.callback:
            results = dask.compute(*graphs, scheduler=s.scheduler, num_workers=s.workers)
        progress.bar.close()
        return list(results)
    from distributed import Client

    try:
        client = Client(s.scheduler, timeout="20s")
    except OSError as exc:
        raise AnalysisError(f"--scheduler {s.scheduler}: cannot connect ({exc})") from None
    try:
        futures = client.compute(graphs)
        return [np.asarray(f.result()) for f in futures]
    finally:
        client.close()


def analyze(source: str | Path, out_dir: Path, settings: Settings) -> dict[str, Any]:
    """Measure ``source`` into ``out_dir`` (see the module docstring); returns the summary.

    Raises
    ------
    AnalysisError
        Bad source or settings (one line, naming the thing and the reason).
    """
    p = plan(source, settings)
    t0 = time.perf_counter()
    results = _compute(p.images, p.w, p.h, p.run)
    return write_outputs(p, results, out_dir, time.perf_counter() - t0)


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated analysis: what to read, the tile size and the resolved settings."""

    source: str
    images: list[Image]
    w: int
    h: int
    run: Settings
    requested: Settings
    points: Any = None


def resolve_settings(s: Settings, w: int, n_tiles: int) -> Settings:
    """``s`` with ``auto`` method and scheduler resolved for ``n_tiles`` tiles ``w`` px wide.

    Raises
    ------
    AnalysisError
        Unknown phase, method, segmenter or scheduler, or a bad worker count.
    """
    from .phase import PHASE_METHODS, auto_settings

    if s.phase not in ("dark", "bright"):
        raise AnalysisError(f"--phase {s.phase}: choose dark or bright")
    if s.method not in ("auto", *PHASE_METHODS):
        raise AnalysisError(f"--method {s.method}: choose from auto, {', '.join(PHASE_METHODS)}")
    phase_model = None
    if s.method == "model":
        phase_model = _model_file("--phase-model", s.phase_model, PHASE_KIND)
    elif s.phase_model is not None:
        raise AnalysisError(f"--phase-model {s.phase_model}: only with --method model")
    segmenter = s.segmenter
    if segmenter not in ("classical", "none"):
        segmenter = _model_file("--segmenter", segmenter, LAMELLAR_KIND)
    if s.scheduler not in ("auto", "threads", "processes", "sync") and "://" not in s.scheduler:
        raise AnalysisError(
            f"--scheduler {s.scheduler}: choose auto, threads, processes or a tcp://HOST:PORT "
            "address"
        )
    if s.workers is not None and s.workers < 1:
        raise AnalysisError(f"--workers {s.workers}: must be >= 1")
    # auto: the method and settings chosen by measurement on the labelled superalloys
    # (cemi_stream.analysis.phase); an explicit --window/--t still wins.  An explicit
    # bradley without them is the paper's: window = width / 8, t = 0.15.
    window: int | None
    if s.method == "auto":
        method, auto_window, auto_t = auto_settings(w)
        window = s.window if s.window is not None else auto_window
        t = s.t if s.t is not None else auto_t
    else:
        method = s.method
        window = s.window
        t = s.t if s.t is not None else PAPER_T
    scheduler = s.scheduler
    if scheduler == "auto":
        many = n_tiles >= PROCESSES_FROM_TILES and (os.cpu_count() or 1) > 1 and s.workers != 1
        scheduler = "processes" if many else "threads"
    fields = {f: getattr(s, f) for f in s.__dataclass_fields__}
    return Settings(**{**fields, "method": method, "window": window, "t": t,
                       "scheduler": scheduler, "segmenter": segmenter,
                       "phase_model": phase_model})  # fmt: skip


def _model_file(option: str, spec: str | None, kind: str) -> str:
    """A trained model's file, absolute, so that worker processes and cluster workers
    load the same one (each once, :mod:`cemi_stream.analysis.segment`)."""
    from ..errors import ModelError
    from .segment import resolve_segmenter

    try:
        return str(resolve_segmenter(spec, kind).resolve())
    except ModelError as exc:
        raise AnalysisError(f"{option} {spec or '(default)'}: {exc}") from None


def plan(source: str | Path, settings: Settings) -> Plan:
    """Open ``source`` and resolve ``settings`` (:func:`resolve_settings`), reading no pixel yet."""
    s = settings
    resolve_settings(s, 508, 0)  # the option checks first, before any file is opened
    points = read_property(Path(s.property_csv)) if s.property_csv else None
    images = open_images(source, level=s.level, pixel_size_um=s.pixel_size_um)
    w, h = tile_size_px(s.tile, s.tile_um, images[0].pixel_size_um)
    n = sum(int(np.prod(_blocks(im.array.shape, w, h))) for im in images)
    return Plan(str(source), images, w, h, resolve_settings(s, w, n), s, points)


def write_outputs(p: Plan, results: list[np.ndarray], out_dir: Path, seconds: float,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Write tiles.csv, maps, profiles, analysis.json (and correlation) from tile numbers.

    Parameters
    ----------
    p : Plan
        The analysis.
    results : list of ndarray
        Per image of ``p.images``, the ``(rows, cols, len(MEASURES))`` numbers
        of its tile grid; a tile whose ``valid`` is nan is not measured (yet):
        it is left out of ``tiles.csv`` and of the maps and profiles.
    out_dir : Path
        Where to write.
    seconds : float
        Compute time, for the summary.
    extra : dict, optional
        More entries for ``analysis.json``.
    """
    images, w, h, run, s, points, source = (p.images, p.w, p.h, p.run, p.requested, p.points,
                                            p.source)  # fmt: skip
    method = run.method
    out_dir = Path(out_dir)
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    rows_out: list[list[Any]] = []
    profiles_rows: list[list[Any]] = []
    per_image: list[dict[str, Any]] = []
    profile_x_um: list[float] = []
    profile_means: dict[str, list[float]] = {q: [] for q in MEASURES[1:]}
    n_tiles = 0
    for im, res in zip(images, results, strict=True):
        grid = tile_grid(tuple(im.array.shape), w, h)
        rows = max(g.row for g in grid) + 1
        cols = max(g.col for g in grid) + 1
        res = res[:rows, :cols]
        n_tiles += int(np.isfinite(res[..., 0]).sum())  # measured tiles
        scale = 2**im.level
        px_um = im.pixel_size_um
        for g in grid:
            v = res[g.row, g.col]
            if not math.isfinite(v[0]):
                continue  # not measured yet (a live analysis)
            valid = bool(v[0] == 1.0)
            cx, cy = (g.x0 + g.w / 2) * scale, (g.y0 + g.h / 2) * scale
            width_um = v[3] * px_um if px_um and math.isfinite(v[3]) else math.nan
            rows_out.append([
                im.name, g.row, g.col, f"{cx:.1f}", f"{cy:.1f}",
                _fmt(cx * px_um / scale if px_um else math.nan, 3),
                _fmt(cy * px_um / scale if px_um else math.nan, 3),
                int(valid), _fmt(v[1] if valid else math.nan, 5),
                _fmt(v[2] if valid else math.nan, 5), _fmt(v[3] if valid else math.nan, 3),
                _fmt(width_um if valid else math.nan, 4), _fmt(v[4] if valid else math.nan, 3),
            ])  # fmt: skip
        valid_grid = res[..., 0] == 1.0
        quantities = {
            "phase_fraction": res[..., 1], "lamellar_fraction": res[..., 2],
            "lamellar_width_um" if px_um else "lamellar_width_px":
                res[..., 3] * (px_um if px_um else 1.0),
            "lamella_count": res[..., 4],
        }  # fmt: skip
        stem = Path(im.name).stem
        if len(images) <= 20:
            for q, grid_values in quantities.items():
                values = np.where(valid_grid, grid_values, np.nan)
                if not np.isfinite(values).any():
                    continue
                draw_map(values, q, out_dir / "maps" / f"{stem}_{q}.png", tile_w=w * scale,
                         tile_h=h * scale, pixel_size_um=px_um / scale if px_um else None,
                         title=f"{im.name}: {q.replace('_', ' ')}")  # fmt: skip
        # Profiles: mean and spread along y of each x-column (valid tiles only).
        x_centres = (np.arange(cols) * w + w / 2) * scale
        means, spreads = {}, {}
        for q, grid_values in quantities.items():
            values = np.where(valid_grid, grid_values, np.nan)
            with warnings.catch_warnings():  # columns without a valid tile are nan
                warnings.simplefilter("ignore", RuntimeWarning)
                means[q] = np.nanmean(np.where(np.isfinite(values), values, np.nan), axis=0)
                spreads[q] = np.nanstd(values, axis=0)
            means[q] = np.where(np.isfinite(means[q]), means[q], np.nan)
        counts = valid_grid.sum(axis=0)
        for c in range(cols):
            x_um = x_centres[c] * px_um / scale if px_um else math.nan
            profiles_rows.append([im.name, c, f"{x_centres[c]:.1f}", _fmt(x_um, 3), int(counts[c])]
                                 + [_fmt(v, 5) for q in quantities
                                    for v in (means[q][c], spreads[q][c])])  # fmt: skip
        if im is images[0]:
            unit = "mm" if px_um else "px"
            xs = x_centres * px_um / scale / 1000 if px_um else x_centres
            title = f"{im.name}: mean along y (band: one standard deviation)"
            draw_profiles(xs, means, spreads, out_dir / "profiles.png", x_unit=unit, title=title)
            profile_x_um = list(x_centres * px_um / scale) if px_um else []
            for q in MEASURES[1:]:
                key = "lamellar_width_um" if q == "lamellar_width_px" and px_um else q
                profile_means[q] = list(means.get(key, np.full(cols, np.nan)))
        per_image.append({
            "name": im.name, "rows": rows, "cols": cols, "valid_tiles": int(valid_grid.sum()),
            **{f"mean_{q}": _mean_or_none(np.where(valid_grid, v, np.nan))
               for q, v in quantities.items()},
        })  # fmt: skip
    _write_text(out_dir / "tiles.csv", rows_out, TILES_HEADER)
    width_name = "lamellar_width_um" if images[0].pixel_size_um else "lamellar_width_px"
    head = ["image", "col", "x_px", "x_um", "valid_tiles"]
    for q in ("phase_fraction", "lamellar_fraction", width_name, "lamella_count"):
        head += [f"{q}_mean", f"{q}_std"]
    _write_text(out_dir / "profiles.csv", profiles_rows, ",".join(head))
    correlation = None
    if points is not None:
        if not profile_x_um:
            raise AnalysisError("--property: positions in µm need the pixel size "
                                "(the mosaic's metadata or --pixel-size-um)")  # fmt: skip
        q_names = {"phase_fraction": "phase_fraction", "lamellar_fraction": "lamellar_fraction",
                   "lamellar_width_px": width_name, "lamella_count": "lamella_count"}  # fmt: skip
        profs = {q_names[q]: np.array(v, float) for q, v in profile_means.items()}
        tile_um = w * (images[0].pixel_size_um or 0.0)
        correlation = correlate(np.array(profile_x_um), profs, points, tile_um)
        _write_json(out_dir / "correlation.json", _jsonable(correlation))
        draw_correlation(correlation, out_dir / "correlation.png")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary: dict[str, Any] = {
        "cemi_stream": __version__,
        "source": str(source),
        "settings": {
            "tile_px": [w, h],
            "level": run.level,
            "phase": run.phase,
            "method": method,
            "method_requested": s.method,
            "segmenter": run.segmenter,
            "window": run.window,
            "t": run.t,
            "scheduler": run.scheduler,
            "scheduler_requested": s.scheduler,
            "workers": run.workers or os.cpu_count(),
        },
        "versions": _versions(),
        "images": per_image,
        "tiles": n_tiles,
        "seconds": round(seconds, 3),
        "tiles_per_s": round(n_tiles / seconds, 2) if seconds > 0 else None,
        "peak_rss_mb": round(rss_mb, 1),
        "correlation": _jsonable(correlation) if correlation is not None else None,
    }
    if run.segmenter not in ("classical", "none"):
        from .segment import load_segmenter

        summary["segmenter_model"] = load_segmenter(run.segmenter).describe()
    if run.phase_model is not None:
        from .segment import load_segmenter

        summary["phase_model"] = load_segmenter(run.phase_model, kind=PHASE_KIND).describe()
    summary.update(extra or {})
    _write_json(out_dir / "analysis.json", _jsonable(summary))
    return summary


def _write_text(path: Path, rows: list[list[Any]], header: str) -> None:
    """A CSV written whole and renamed into place: a reader (the dashboard, a live
    analysis's user) never sees half a file."""
    import io

    buf = io.StringIO()
    buf.write(header + "\n")
    csv.writer(buf, lineterminator="\n").writerows(rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _blocks(shape: tuple[int, ...], w: int, h: int) -> tuple[int, int]:
    """Number of ``(rows, cols)`` tiles of ``w`` x ``h`` px covering an image of ``shape``."""
    return -(-int(shape[0]) // h), -(-int(shape[1]) // w)


def _fmt(value: float, digits: int) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mean_or_none(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _versions() -> dict[str, str]:
    import cv2
    import dask

    return {"python": platform.python_version(), "numpy": np.__version__,
            "opencv": cv2.__version__, "dask": dask.__version__,
            "cpus": str(os.cpu_count())}  # fmt: skip
