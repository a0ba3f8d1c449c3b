"""Command-line entry point (``run_daemon.py``) and its subcommands.

Every user error (bad file, bad option, absent device) is a
:class:`~cemi_stream.errors.CemiError`; :func:`main` prints its one-line
message to stderr and returns 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from . import __version__
from .config import DENOISE_BACKENDS, Config, load_config
from .errors import CemiError
from .report import EXIT_PREDICTED, skipped_count, stitch_report

log = logging.getLogger("cemi_stream")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# A stage that ran out of disk space (errno ENOSPC's number): the supervisor
# does not restart it, since a restart would only fail the same way.
EXIT_NO_SPACE = 28


def _frame_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1024x768") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"frame size {text} is too small (minimum 16x16)")
    return w, h


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} must lie strictly between 0 and 1")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, warnings only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_frontend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overlap", type=_fraction, help="target keyframe overlap (area fraction, default 0.5)"
    )
    p.add_argument(
        "--keyframes",
        choices=["auto", "on", "off"],
        help="keyframe selection (auto: on for video-like sources, off for image folders)",
    )
    p.add_argument("--crop", metavar="SPEC", help="auto (default), none, or x,y,width,height")
    _add_levels(p)


def _add_levels(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--levels",
        metavar="auto|full|LO,HI",
        help="8-bit mapping of 16-bit/float input, one window per run: auto (default: declared "
        "bits or percentiles of the first frames), full (the type's range, 16-bit / 257), or "
        "LO,HI in input grey levels",
    )


def _add_stitch_options(p: argparse.ArgumentParser) -> None:
    """Tile-grid description and the predicted-frames policy (``replay`` and ``stitch``)."""
    p.add_argument(
        "--grid",
        metavar="COLSxROWS",
        help="the frames are a tile grid of COLS x ROWS (files in natural order): register "
        "each tile against its grid neighbours",
    )
    p.add_argument(
        "--order",
        choices=["row", "column"],
        help="with --grid: how the files are numbered, row by row (default) or column by column",
    )
    p.add_argument(
        "--serpentine",
        action="store_true",
        default=None,
        help="with --grid: every other row (column) runs backwards",
    )
    p.add_argument(
        "--overlap",
        dest="grid_overlap",
        metavar="F[,FY]",
        help="with --grid: nominal overlap of neighbouring tiles, a fraction (one value, or x,y)",
    )
    p.add_argument(
        "--allow-predicted",
        action="store_true",
        help=f"exit 0 even when more than half of the frames could not be registered (else "
        f"exit {EXIT_PREDICTED})",
    )


def _add_replay_options(p: argparse.ArgumentParser) -> None:
    """The run options of ``replay`` after SOURCE and ``--out`` (``start`` takes them too)."""
    p.add_argument(
        "--denoise",
        default="off",
        metavar="BACKEND",
        help="denoise the frames before stitching: off (default), auto, cpu, onnx, cuda or "
        "tensorrt",
    )
    p.add_argument(
        "--model",
        metavar="NAME|PATH",
        help="denoiser model name or .safetensors file (default: the shipped default model)",
    )
    p.add_argument("--denoise-workers", type=int, metavar="N",
                   help="local denoise worker processes (config: denoise.workers)")  # fmt: skip
    p.add_argument("--denoise-listen", metavar="tcp://HOST:PORT",
                   help="where remote denoise workers connect (denoise.listen)")  # fmt: skip
    p.add_argument(
        "--keyframes", choices=["on", "off"], help="default: on for videos, off for images"
    )
    p.add_argument("--pixel-size-um", type=float, metavar="X")
    p.add_argument("--layout", choices=["auto", "raster", "serpentine"])
    p.add_argument(
        "--analyze",
        action="store_true",
        help="measure the microstructure tile by tile as the mosaic settles, into "
        "RUN_DIR/analysis (settings: the configuration's [analysis])",
    )
    _add_levels(p)
    _add_stitch_options(p)


def _add_daemon_connection(p: argparse.ArgumentParser) -> None:
    """Where the daemon is: ``--data-dir DIR`` or ``--url URL --token-file F``."""
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("cemi-data"),
        metavar="DIR",
        help="the daemon's data directory: read DIR/daemon.json and DIR/token "
        "(default ./cemi-data)",
    )
    p.add_argument("--url", metavar="URL", help="the daemon's URL (instead of DIR/daemon.json)")
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="F",
        help="file holding the API token (default DIR/token)",
    )


def _add_daemon_commands(sub: Any) -> None:
    """``serve`` (the daemon) and its clients ``start``, ``status``, ``stop``, ``resume``."""
    p = sub.add_parser(
        "serve",
        help="run the daemon: the control API and a supervisor of runs (foreground)",
        description="Serve the control API (HTTP, JSON) on HOST:PORT and supervise the runs it "
        "starts in DIR/runs/RUN_ID/, each laid out as replay lays out a run.  DIR holds "
        "daemon.json (url, pid, start time, version) and the API token DIR/token (made on "
        "first start, mode 0600).  SIGTERM or SIGINT stops the runs cleanly, then the daemon.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8750, help="TCP port (default 8750; 0: a free port)")
    p.add_argument(
        "--data-dir", type=Path, default=Path("cemi-data"), metavar="DIR",
        help="data directory (default ./cemi-data)",
    )  # fmt: skip
    p.add_argument(
        "--public-read",
        action="store_true",
        help="reads (GET) need no token (refused with a non-loopback --host)",
    )
    p.add_argument(
        "--allow-dir",
        action="append",
        type=Path,
        metavar="DIR",
        help="a folder outside the data directory that run sources may come from (repeatable)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "start",
        help="start a run on the daemon; prints the run id",
        description="Ask the daemon to start a run of SOURCE with replay's options (and "
        "--pace, --name); prints the run id as the last line.  Paths must lie in the "
        "daemon's data directory.",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument(
        "--pace", help="native (the daemon's default), max, or frames per second (replay sources)"
    )
    p.add_argument("--name", help="a label for listings")
    _add_replay_options(p)
    _add_daemon_connection(p)
    _add_common(p)
    p.set_defaults(func=cmd_start)

    p = sub.add_parser(
        "status",
        help="the state of a run on the daemon (or a table of all runs)",
        description="Print the state, stages and counts of RUN_ID (or a table of every run); "
        "--json prints the API's object (GET /api/runs/RUN_ID) exactly.",
    )
    p.add_argument("run_id", nargs="?", metavar="RUN_ID")
    p.add_argument("--json", action="store_true", help="print the API's JSON object")
    _add_daemon_connection(p)
    _add_common(p)
    p.set_defaults(func=cmd_status)

    for name, what, func in (
        ("stop", "ask a run on the daemon to stop cleanly", cmd_stop),
        ("resume", "complete an interrupted or failed run on the daemon", cmd_resume),
    ):
        p = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        p.add_argument("run_id", metavar="RUN_ID")
        _add_daemon_connection(p)
        _add_common(p)
        p.set_defaults(func=func)


def _stitch_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "grid", None) is not None:
        out["stitch.grid"] = args.grid
    if getattr(args, "order", None) is not None:
        out["stitch.order"] = args.order
    if getattr(args, "serpentine", None):
        out["stitch.serpentine"] = True
    if getattr(args, "grid_overlap", None) is not None:
        out["stitch.overlap"] = args.grid_overlap
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``run_daemon.py`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="run_daemon.py",
        description="cemi-stream: live SEM video to centimetre-scale mosaics.",
    )
    parser.add_argument("--version", action="version", version=f"cemi-stream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "analyze",
        help="measure the microstructure of a mosaic or of images, tile by tile",
        description="Cut SOURCE (a run directory, an OME-Zarr mosaic, an image or a folder of "
        "images) into tiles and measure each: phase fraction, lamellar fraction, width and "
        "count.  Writes DIR/tiles.csv, DIR/maps/*.png, DIR/profiles.csv, DIR/profiles.png, "
        "DIR/analysis.json and, with --property, DIR/correlation.json and correlation.png.",
    )
    p.add_argument("source", metavar="SOURCE", help="run directory, mosaic, image or folder")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--tile", metavar="WxH", help="tile size in pixels (default 508x413)")
    p.add_argument("--tile-um", metavar="W,H", help="tile size in micrometres")
    p.add_argument("--level", type=int, default=0, metavar="N", help="mosaic pyramid level")
    p.add_argument("--phase", choices=["dark", "bright"], default="dark",
                   help="the phase whose fraction is measured (default dark)")  # fmt: skip
    p.add_argument("--method", default="auto", metavar="auto|bradley|otsu|multiotsu|model",
                   help="phase-fraction method (default auto: chosen by measurement; model: "
                        "a trained phase segmenter, see --phase-model)")  # fmt: skip
    p.add_argument("--phase-model", default=None, metavar="NAME|PATH",
                   help="--method model: the phase segmenter (default phase-unetpp-small, "
                        "trained on the labelled superalloys; see train-segmenter "
                        "--task phase)")  # fmt: skip
    p.add_argument("--segmenter", default="classical", metavar="NAME|PATH|none",
                   help="lamellar regions: classical (default, no training), none, or a "
                        "trained U-Net++ (a shipped NAME or a .safetensors PATH; see "
                        "train-segmenter)")  # fmt: skip
    p.add_argument("--window", type=int, default=None, metavar="PX",
                   help="Bradley-Roth window (auto: tile width / 4; bradley: width / 8, "
                        "the paper's)")  # fmt: skip
    p.add_argument(
        "--t",
        type=float,
        default=None,
        help="Bradley-Roth t (auto: 0, measured; bradley: 0.15, as the paper)",
    )
    p.add_argument("--pixel-size-um", type=float, default=None,
                   help="pixel size of images (a mosaic's own metadata wins)")  # fmt: skip
    p.add_argument("--property", metavar="CSV", help="x_um,value[,name] to correlate with")
    p.add_argument("--scheduler", default="auto", metavar="threads|processes|ADDRESS",
                   help="Dask scheduler (default auto: processes for large mosaics, else "
                        "threads)")  # fmt: skip
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="threads or processes of a local scheduler (default: one "
                        "a core)")  # fmt: skip
    _add_common(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "simulate",
        help="virtual SEM: write a simulated traversal as images or a video",
        description="Simulate a stage traversal with the virtual SEM and write DIR/frames/*.png "
        "(or DIR/video.avi with --video) and DIR/ground_truth.csv "
        "(src_index,row,x_px,y_px: true top-left corner of each frame in specimen pixels).",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument(
        "--source",
        metavar="IMAGE",
        help="real micrograph as specimen (default: procedural eutectic)",
    )
    p.add_argument("--rows", type=int, default=3)
    p.add_argument("--frames-per-row", type=int, default=8, metavar="N")
    p.add_argument("--frame-size", type=_frame_size, default=(1024, 768), metavar="WxH")
    p.add_argument(
        "--overlap",
        type=_fraction,
        default=0.5,
        help="overlap of neighbouring fields (default 0.5)",
    )
    p.add_argument("--serpentine", action="store_true", help="serpentine instead of raster rows")
    p.add_argument("--noise", choices=["ld", "hd", "none"], default="ld")
    p.add_argument(
        "--video", action="store_true", help="write a video (stage moving, ~95%% frame overlap)"
    )
    p.add_argument("--fps", type=float, default=25.0, help="video frame rate (default 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--databar", action="store_true", help="burn an FEI-style data bar into each frame"
    )
    p.add_argument("--jitter-px", type=float, default=None, help="stage jitter per field in pixels")
    _add_common(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "extract",
        help="select keyframes from a recorded source into an image folder",
        description="Write the keyframes of SOURCE as DIR/frames/NNNNNN.png (named by source "
        "index) and DIR/keyframes.csv (src_index,kept,reason,dx_px,dy_px).",
    )
    p.add_argument(
        "source", metavar="SOURCE", help="video, image folder, TIFF stack, device or sim:"
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    _add_frontend(p)
    _add_common(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser(
        "capture",
        help="run the capture process: spool and publish frames until the source ends or SIGINT",
        description="Read SOURCE, crop, reject fault frames, select keyframes, append each kept "
        "frame to DIR/frames.zarr and publish it on the frame bus (endpoints in DIR/bus.json).",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--run-dir", required=True, type=Path, metavar="DIR")
    p.add_argument("--pace", help="native, max, or frames per second (replay sources)")
    p.add_argument("--loop", action="store_true", help="restart a replay source at its end")
    p.add_argument(
        "--pipe", action="append", metavar="NAME", help="durable pipe (repeatable; default: stitch)"
    )
    p.add_argument("--no-pipes", action="store_true", help="spool only, no durable pipes")
    p.add_argument("--no-monitor", action="store_true", help="no lossy PUB stream")
    p.add_argument("--transport", choices=["ipc", "tcp"])
    p.add_argument(
        "--drain-timeout", type=float, metavar="S", help="wait for absent consumers at the end"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the spool already in DIR (a restarted capture): a recorded source is "
        "read again from its start and the frames already spooled are not written again",
    )
    _add_frontend(p)
    _add_common(p)
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser(
        "stitch",
        help="run the stitch process on a capture's run directory (resumes from its journal)",
        description="Consume the frames of the capture in DIR (bus pipe, or the spool once the "
        "capture has finished), place and blend each one, and write DIR/mosaic.ome.zarr, "
        "DIR/positions.csv, DIR/stitch.json and DIR/preview.png.  Restarted on the same DIR, "
        "it resumes from DIR/positions.csv and gives the same mosaic.",
    )
    p.add_argument("--run-dir", required=True, type=Path, metavar="DIR")
    p.add_argument(
        "--pixel-size-um", type=float, metavar="X", help="pixel size (default: from the frames)"
    )
    p.add_argument("--layout", choices=["auto", "raster", "serpentine"], help="traversal hint")
    p.add_argument(
        "--frames-dir",
        type=Path,
        metavar="FDIR",
        help="folder of the frames to stitch (default DIR; DIR/denoised for the denoise "
        "stage's output)",
    )
    p.add_argument("--wait", type=float, default=60.0, metavar="S", help="wait for the capture")
    _add_stitch_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_stitch)

    p = sub.add_parser(
        "denoise-stage",
        help="run the denoise process on a capture's run directory (resumes where it stopped)",
        description="Consume the frames of the capture in DIR (bus pipe 'denoise', or the spool "
        "once the capture has finished) in order, denoise them in batches, and write them with "
        "the same sequence numbers and metadata to DIR/denoised/frames.zarr and the stage's own "
        "bus (DIR/denoised/bus.json, pipe 'stitch'); DIR/denoised/denoise.json marks the end.  "
        "Restarted on the same DIR, it resumes after the last denoised frame.",
    )
    p.add_argument("--run-dir", required=True, type=Path, metavar="DIR")
    p.add_argument(
        "--backend", help="auto (default), cpu, onnx, cuda or tensorrt (config: denoise.backend)"
    )
    p.add_argument("--model", metavar="NAME|PATH", help="model name or .safetensors file")
    p.add_argument("--batch", type=int, metavar="N", help="frames per batch (default 4)")
    p.add_argument("--workers", type=int, metavar="N", help="config: denoise.workers")
    p.add_argument("--listen", metavar="tcp://HOST:PORT", help="config: denoise.listen")
    p.add_argument("--pipe", default="denoise", help="the capture's pipe to consume")
    p.add_argument("--wait", type=float, default=60.0, metavar="S", help="wait for the capture")
    _add_common(p)
    p.set_defaults(func=cmd_denoise_stage)

    from .analysis.train import add_parser as add_train_segmenter

    add_train_segmenter(sub, _add_common)

    p = sub.add_parser(
        "analyze-stage",
        help="run the analysis process on a run directory (started by replay --analyze)",
        description="Follow the stitch stage of DIR: measure each tile of the mosaic as soon as "
        "no later frame will change it (DIR/settled.json), appending to "
        "DIR/analysis/tiles.jsonl and rewriting DIR/analysis (tiles.csv, maps, profiles) as it "
        "goes; once the mosaic is final, measure what is missing and write the outputs of "
        "'analyze DIR'.  Restarted on the same DIR, it carries on from its journal.  Settings: "
        "the configuration's [analysis] section, or the options below.",
    )
    p.add_argument("--run-dir", required=True, type=Path, metavar="DIR")
    p.add_argument("--tile", metavar="WxH", help="tile size in pixels (config: analysis.tile)")
    p.add_argument("--phase", choices=["dark", "bright"], help="config: analysis.phase")
    p.add_argument("--method", metavar="auto|bradley|otsu|multiotsu|model",
                   help="config: analysis.method")  # fmt: skip
    p.add_argument("--phase-model", metavar="NAME|PATH", help="config: analysis.phase_model")
    p.add_argument("--segmenter", metavar="NAME|PATH|none", help="config: analysis.segmenter")
    _add_common(p)
    p.set_defaults(func=cmd_analyze_stage)

    p = sub.add_parser(
        "replay",
        help="capture and stitch a recorded source (image folder, video, TIFF stack) at full speed",
        description="Run the capture and stitch processes over SOURCE and finalise RUN_DIR: "
        "mosaic.ome.zarr/, positions.csv (seq,src_index,x_px,y_px,score,status), run.json and "
        "preview.png.  SOURCE may be a folder of videos, one per row.  With --denoise BACKEND, a "
        "denoise process between them denoises every frame (RUN_DIR/denoised/) and the mosaic "
        "is made of the denoised frames.",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--out", required=True, type=Path, metavar="RUN_DIR")
    _add_replay_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "tap",
        help="consume a run's pipe or monitor stream and report what arrived",
        description="Connect to a running capture (DIR/bus.json), receive frames until the end "
        "of the stream, and print a JSON report (frames, missing, rejected).",
    )
    p.add_argument("--run-dir", required=True, type=Path, metavar="DIR")
    p.add_argument("--pipe", default="stitch", help="pipe name, or 'monitor' (default: stitch)")
    p.add_argument("--timeout", type=float, default=30.0, help="give up after S seconds of silence")
    _add_common(p)
    p.set_defaults(func=cmd_tap)

    from .denoise.cli import add_commands as add_denoise_commands

    add_denoise_commands(sub, _add_common)

    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the embedded virtual SEM and report",
        description="Simulate a stage traversal recorded as video, run the capture process on "
        "it in a child process and receive its keyframes over the bus, then print what happened.",
    )
    p.add_argument("--out", type=Path, default=Path("demo-run"), metavar="DIR")
    p.add_argument(
        "--denoise",
        choices=["off", *DENOISE_BACKENDS],
        default="auto",
        help="denoise with the shipped model (auto: when the ml extra is installed)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    _add_daemon_commands(sub)
    return parser


def _setup_logging(args: argparse.Namespace, config: Config) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else config.log_level
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)


def _config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    overrides: dict[str, Any] = dict(extra or {})
    if getattr(args, "overlap", None) is not None and args.command != "simulate":
        overrides["capture.keyframes.overlap"] = args.overlap
    if getattr(args, "keyframes", None) is not None:
        overrides["capture.keyframes.mode"] = args.keyframes
    if getattr(args, "crop", None) is not None:
        overrides["capture.crop"] = args.crop
    if getattr(args, "levels", None) is not None:
        overrides["capture.levels"] = args.levels
    return load_config(args.config, overrides)


def cmd_analyze(args: argparse.Namespace) -> int:
    """``analyze``: tiles, maps, profiles and correlations of a mosaic or images."""
    from .analysis.analyze import Settings, analyze
    from .analysis.tiling import parse_pair

    config = _config(args)
    _setup_logging(args, config)
    settings = Settings(
        tile=parse_pair(args.tile, "--tile", int) if args.tile else None,
        tile_um=parse_pair(args.tile_um, "--tile-um", float) if args.tile_um else None,
        level=args.level, phase=args.phase, method=args.method, segmenter=args.segmenter,
        phase_model=args.phase_model, window=args.window, t=args.t, scheduler=args.scheduler,
        workers=args.workers,
        pixel_size_um=args.pixel_size_um, property_csv=args.property, progress=not args.quiet,
    )  # fmt: skip
    summary = analyze(args.source, args.out, settings)
    n_valid = sum(im["valid_tiles"] for im in summary["images"])
    first = summary["images"][0]
    phase = first.get("mean_phase_fraction")
    lam = first.get("mean_lamellar_fraction")
    print(
        f"analyze: {summary['tiles']} tiles ({n_valid} valid) of {len(summary['images'])} "
        f"image(s) in {summary['seconds']:.1f} s ({summary['tiles_per_s']} tiles/s), "
        f"method {summary['settings']['method']}"
    )
    print(
        f"  {first['name']}: {summary['settings']['phase']} phase "
        f"{'-' if phase is None else f'{100 * phase:.1f} %'}, lamellar "
        f"{'-' if lam is None else f'{100 * lam:.1f} %'}"
    )
    for name, per in (summary.get("correlation") or {}).items():
        parts = [f"{q} r={v['r']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}] n={v['n']}"
                 for q, v in per.items() if v.get("r") is not None]  # fmt: skip
        print(f"  {name}: " + "; ".join(parts))
    print(f"  maps: {args.out / 'maps'}  profiles: {args.out / 'profiles.png'}  "
          f"tiles: {args.out / 'tiles.csv'}")  # fmt: skip
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """``simulate``: write a simulated traversal."""
    from drivers.sim import SimConfig, write_simulation

    config = _config(args)
    _setup_logging(args, config)
    fields: dict[str, Any] = {
        "rows": args.rows,
        "frames_per_row": args.frames_per_row,
        "frame_width": args.frame_size[0],
        "frame_height": args.frame_size[1],
        "overlap": args.overlap,
        "serpentine": args.serpentine,
        "noise": args.noise,
        "video": args.video,
        "fps": args.fps,
        "seed": args.seed,
        "source": args.source,
        "databar": args.databar,
    }
    if args.jitter_px is not None:
        fields["jitter_px"] = args.jitter_px
    sim = SimConfig(**fields)
    from .progress import Progress

    bar = Progress("simulate", enabled=not args.quiet)
    result = write_simulation(sim, args.out, progress=lambda done, total: _tick(bar, done, total))
    bar.close()
    print(json.dumps(result, indent=2, default=str))
    return 0


def _tick(bar: Any, done: int, total: int) -> None:
    bar.total = total
    bar.update(done)


def cmd_extract(args: argparse.Namespace) -> int:
    """``extract``: keyframes to an image folder."""
    from .capture.extract import run_extract

    config = _config(args)
    _setup_logging(args, config)
    summary = run_extract(args.source, args.out, config.capture, progress=not args.quiet)
    ov = summary.overlaps
    report = {
        "frames_in": summary.frames_in,
        "kept": summary.kept,
        "reasons": summary.reasons,
        "overlap_min": round(min(ov), 3) if ov else None,
        "overlap_median": round(sorted(ov)[len(ov) // 2], 3) if ov else None,
        "overlap_max": round(max(ov), 3) if ov else None,
        "levels": summary.levels,
        "out": str(args.out),
    }
    print(json.dumps(report, indent=2))
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    """``capture``: the capture process."""
    from .capture.stage import run_capture

    extra: dict[str, Any] = {}
    if args.no_pipes:
        extra["bus.pipes"] = []
    elif args.pipe:
        extra["bus.pipes"] = args.pipe
    if args.no_monitor:
        extra["bus.monitor"] = False
    if args.transport:
        extra["bus.transport"] = args.transport
    if args.drain_timeout is not None:
        extra["bus.drain_timeout_s"] = args.drain_timeout
    config = _config(args, extra)
    _setup_logging(args, config)
    stop = threading.Event()
    with _stop_on_signals(stop):
        summary = run_capture(
            args.source,
            args.run_dir,
            config,
            pace=args.pace,
            loop=args.loop or None,
            stop=stop,
            progress=not args.quiet,
            resume=args.resume,
        )
    return EXIT_INTERRUPTED if summary.stopped_by == "stop_request" and stop.is_set() else 0


def cmd_stitch(args: argparse.Namespace) -> int:
    """``stitch``: the stitch process."""
    from .stitch.stage import run_stitch

    extra: dict[str, Any] = {}
    if args.pixel_size_um is not None:
        extra["stitch.pixel_size_um"] = args.pixel_size_um
    if args.layout:
        extra["stitch.layout"] = args.layout
    config = _config(args, {**extra, **_stitch_overrides(args)})
    _setup_logging(args, config)
    stop = threading.Event()
    with _stop_on_signals(stop):
        summary = run_stitch(
            args.run_dir,
            config,
            frames_dir=args.frames_dir,
            stop=stop,
            progress=not args.quiet,
            wait_s=args.wait,
        )
    if stop.is_set():
        return EXIT_INTERRUPTED
    capture = _read_json(args.run_dir / "capture.json").get("summary", {})
    lines, code = stitch_report(
        run_dir=args.run_dir, frames=summary.frames, statuses=summary.statuses, rows=summary.rows,
        skipped=skipped_count(capture.get("reasons", {}), capture.get("kept", 0),
                              capture.get("frames_in", 0)),
        residuals=summary.residuals, mosaic_shape=summary.mosaic_shape,
        levels=summary.mosaic_levels, predicted=summary.predicted, seconds=summary.seconds,
        allow_predicted=args.allow_predicted, what="stitch",
    )  # fmt: skip
    _emit(lines)
    return code


def cmd_denoise_stage(args: argparse.Namespace) -> int:
    """``denoise-stage``: the denoise process of a run."""
    extra: dict[str, Any] = {}
    if args.backend is not None:
        extra["denoise.backend"] = args.backend
    if args.model is not None:
        extra["denoise.model"] = args.model
    if args.batch is not None:
        extra["denoise.batch"] = args.batch
    if args.workers is not None:
        extra["denoise.workers"] = args.workers
    if args.listen is not None:
        extra["denoise.listen"] = args.listen
    config = _config(args, extra)
    _setup_logging(args, config)
    # Imported here: it loads torch, which the other commands do not need.
    from .denoise.stage import run_denoise_stage

    stop = threading.Event()
    with _stop_on_signals(stop):
        summary = run_denoise_stage(
            args.run_dir,
            config,
            pipe=args.pipe,
            stop=stop,
            progress=not args.quiet,
            wait_s=args.wait,
        )
    return EXIT_INTERRUPTED if summary.stopped_by == "stop_request" else 0


def cmd_analyze_stage(args: argparse.Namespace) -> int:
    """``analyze-stage``: the analysis process of a run."""
    extra: dict[str, Any] = {}
    for key in ("tile", "phase", "method", "segmenter", "phase_model"):
        if getattr(args, key) is not None:
            extra[f"analysis.{key}"] = getattr(args, key)
    config = _config(args, extra)
    _setup_logging(args, config)
    from .analysis.analyze import Settings
    from .analysis.live import run_analysis_stage
    from .analysis.tiling import parse_pair
    from .daemon.stats import StatsWriter

    a = config.analysis
    settings = Settings(
        tile=parse_pair(a.tile, "analysis.tile", int), phase=a.phase, method=a.method,
        segmenter=a.segmenter, phase_model=a.phase_model, progress=False,
    )  # fmt: skip
    stats = StatsWriter(args.run_dir, "analyze")
    stats.start()

    def on_step(stage: Any, n: int) -> None:
        if n:
            stats.frame_out(n)
        stats.set_extra(tiles=len(stage.journal.tiles))

    stop = threading.Event()
    error: str | None = None
    try:
        with _stop_on_signals(stop):
            summary = run_analysis_stage(
                args.run_dir, settings, maps_every_s=a.maps_every_s, stop=stop, on_step=on_step
            )
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        stats.close(error)
    if summary is None:
        return EXIT_INTERRUPTED
    log.info("analysis: %d tiles (%d measured live)", summary["tiles"],
             summary["live"]["tiles_measured_live"])  # fmt: skip
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """``replay``: capture + stitch of a recorded source."""
    from .replay import run_replay

    if args.pixel_size_um is not None and not args.pixel_size_um > 0:
        raise CemiError(f"--pixel-size-um {args.pixel_size_um}: must be positive")
    config = _config(args, _stitch_overrides(args))
    _setup_logging(args, config)
    summary = run_replay(
        args.source,
        args.out,
        keyframes=args.keyframes,
        pixel_size_um=args.pixel_size_um,
        layout=args.layout,
        config_file=args.config,
        denoise=args.denoise,
        model=args.model,
        denoise_workers=args.denoise_workers,
        denoise_listen=args.denoise_listen,
        progress=not args.quiet,
        levels=args.levels,
        stitch_args=_stitch_args(args),
        analyze=args.analyze,
    )
    counts, mosaic = summary["counts"], summary["mosaic"]
    lines, code = stitch_report(
        run_dir=args.out, frames=counts["stitched"], statuses=counts["statuses"],
        rows=counts["rows"],
        skipped=skipped_count(counts["capture_reasons"], counts["frames_kept"],
                              counts["frames_read"]),
        residuals=summary["residuals"], mosaic_shape=mosaic["shape"], levels=mosaic["levels"],
        predicted=summary.get("predicted", []), seconds=summary["timings"]["wall_s"],
        allow_predicted=args.allow_predicted, what="replay",
    )  # fmt: skip
    an = summary.get("analysis")
    if an:
        lines.append(
            f"analysis: {an['tiles']} tiles ({an['valid_tiles']} valid, {an['measured_live']} "
            f"measured while stitching) in {an['dir']}"
        )
    _emit(lines)
    return code


def _stitch_args(args: argparse.Namespace) -> list[str]:
    """The grid options, passed on to the stitch process as given."""
    out: list[str] = []
    for flag, value in (("--grid", args.grid), ("--order", args.order),
                        ("--overlap", args.grid_overlap)):  # fmt: skip
        if value is not None:
            out += [flag, str(value)]
    if args.serpentine:
        out.append("--serpentine")
    return out


def _emit(lines: list[str]) -> None:
    """The closing summary: results on stdout, warnings and errors on stderr."""
    for line in lines:
        stream = sys.stderr if line.startswith(("warning:", "error:")) else sys.stdout
        print(line, file=stream)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cmd_tap(args: argparse.Namespace) -> int:
    """``tap``: consume a pipe and report."""
    from .bus.tap import tap

    config = _config(args)
    _setup_logging(args, config)
    stop = threading.Event()
    with _stop_on_signals(stop):
        report = tap(args.run_dir, args.pipe, timeout_s=args.timeout, stop=stop)
    print(json.dumps(report, indent=2))
    return 0 if report["ended"] and report["missing"] == 0 else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """``demo``: the pipeline on the embedded default."""
    from .demo import run_demo

    config = _config(args)
    _setup_logging(args, config)
    return run_demo(args.out, quiet=args.quiet, denoise=args.denoise)


def cmd_serve(args: argparse.Namespace) -> int:
    """``serve``: the daemon, in the foreground."""
    from .daemon.service import main_serve

    config = _config(args)
    _setup_logging(args, config)
    return main_serve(args)


def cmd_start(args: argparse.Namespace) -> int:
    """``start``: start a run on the daemon."""
    from .daemon.client import cmd_start as run

    _setup_logging(args, _config(args))
    return run(args)


def cmd_status(args: argparse.Namespace) -> int:
    """``status``: a run's state on the daemon."""
    from .daemon.client import cmd_status as run

    _setup_logging(args, _config(args))
    return run(args)


def cmd_stop(args: argparse.Namespace) -> int:
    """``stop``: stop a run on the daemon."""
    from .daemon.client import cmd_stop as run

    _setup_logging(args, _config(args))
    return run(args)


def cmd_resume(args: argparse.Namespace) -> int:
    """``resume``: resume a run on the daemon."""
    from .daemon.client import cmd_resume as run

    _setup_logging(args, _config(args))
    return run(args)


class _stop_on_signals:  # noqa: N801 - used as a context manager, reads like a function
    """Set ``stop`` on SIGINT/SIGTERM while inside the block (second SIGINT aborts)."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("signal %d: finishing the current frame and stopping", signum)
        self.stop.set()

    def __enter__(self) -> _stop_on_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = tuple(os.strerror(e) for e in _NO_SPACE_ERRNOS)


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk or an exhausted quota.

    Errors that crossed a process boundary (the stitcher's renderer) arrive
    as text only, so the message is read too.
    """
    seen: BaseException | None = exc
    for _ in range(16):  # cause chains are short; never loop on a cycle
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE_ERRNOS:
            return True
        if any(text in str(seen) for text in _NO_SPACE_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _say_error(line: str) -> None:
    """Print the one-line error; a stderr that cannot be written must not hide the exit code.

    A stage's stderr is a file in its run directory: on a full disk the line
    cannot be written, and the exit status (28) is then all the supervisor
    gets.
    """
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the exit flush must not fail either


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The exact command line, recorded by commands that document how a result was made.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CemiError as exc:
        _say_error(f"error: {exc}")
        return EXIT_NO_SPACE if is_no_space(exc) else EXIT_USER_ERROR
    except OSError as exc:
        if not is_no_space(exc):
            raise
        # A write outside the library's own checks (a log file, a temporary file).
        _say_error(f"error: {exc}")
        return EXIT_NO_SPACE
    except KeyboardInterrupt:
        _say_error("interrupted")
        return EXIT_INTERRUPTED
