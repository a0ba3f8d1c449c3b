"""One typed configuration for the whole daemon.

The configuration is a tree of frozen dataclasses.  It is read from a TOML
file (``--config FILE``) and/or overridden from the command line; unknown keys
and wrongly typed values are rejected with a :class:`ConfigError` that names
the dotted key.  Defaults are what a microscopist gets with no file at all.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from .capture.crop import parse_crop
from .capture.levels import parse_levels
from .errors import ConfigError
from .stitch.gridspec import grid_spec

T = TypeVar("T")

DEFAULT_HWM = 64
DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024
# Inference backends of the denoiser (``cemi_stream.denoise.infer.BACKENDS``),
# repeated here so that reading a configuration never imports torch.
DenoiseBackend = Literal["auto", "cpu", "onnx", "cuda", "tensorrt"]
DENOISE_BACKENDS: tuple[str, ...] = typing.get_args(DenoiseBackend)


@dataclass(frozen=True, slots=True)
class BusConfig:
    """ZeroMQ frame bus settings.

    Attributes
    ----------
    transport : {"ipc", "tcp"}
        ``ipc`` (Unix domain sockets, default) or ``tcp`` loopback/network.
    host : str
        Interface to bind for tcp; 127.0.0.1 unless deliberately exposed.
    port_base : int
        First tcp port; pipes and the monitor stream take consecutive ports.
    ipc_dir : str or None
        Directory for ipc socket files; None puts them in ``RUN_DIR/bus`` (or
        a temporary directory when that path is too long for a socket name).
    hwm : int
        High-water mark in messages per pipe: the bound on frames in flight
        before the sender blocks (back-pressure, never silent loss).
    heartbeat_s : float
        Seconds between heartbeats on idle pipes.
    max_frame_bytes : int
        Largest accepted payload; bigger messages are rejected on receive.
    pipes : list of str
        Names of the durable (PUSH/PULL) downstream pipes the capture feeds.
    monitor : bool
        Also publish every frame on the lossy PUB stream for dashboards.
    drain_timeout_s : float
        At end of stream, how long to wait for a consumer that never
        connected before giving up (the spool still holds every frame).
    curve_dir : str or None
        Key folder (:mod:`cemi_stream.bus.auth`): tcp sockets bind as CURVE
        servers admitting only its clients; required for a non-loopback host.
    """

    transport: Literal["ipc", "tcp"] = "ipc"
    host: str = "127.0.0.1"
    port_base: int = 5550
    ipc_dir: str | None = None
    hwm: int = DEFAULT_HWM
    heartbeat_s: float = 1.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    pipes: list[str] = field(default_factory=lambda: ["stitch"])
    monitor: bool = True
    drain_timeout_s: float = 30.0
    curve_dir: str | None = None


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Thresholds for rejecting fault frames (grey levels on 0..255).

    Attributes
    ----------
    blank_std : float
        A frame whose standard deviation is below this is ``blank``.
    saturated_fraction : float
        A frame with more than this fraction of pixels at 255 is ``saturated``.
    frozen_mad : float
        A frame whose mean absolute difference from the previous input frame
        (at 1/4 resolution) is below this is ``frozen``.
    """

    blank_std: float = 2.0
    saturated_fraction: float = 0.5
    frozen_mad: float = 0.3


@dataclass(frozen=True, slots=True)
class KeyframeConfig:
    """Keyframe selection.

    Attributes
    ----------
    mode : {"auto", "on", "off"}
        ``auto`` selects keyframes for video-like sources (video files,
        devices, sim video) and keeps every frame of image folders and stacks.
    overlap : float
        Target overlap (area fraction) of a keyframe with the previous one.
    downsample : int
        Resolution divisor for the fast phase correlation.
    min_score : float
        Normalised cross-correlation below which a displacement estimate is
        not trusted (the frame has lost track of the last keyframe).
    end_overlap : float
        At a row end or end of stream, the last frame is also kept when its
        overlap with the last keyframe is below this (so the row end is covered).
    """

    mode: Literal["auto", "on", "off"] = "auto"
    overlap: float = 0.5
    downsample: int = 4
    min_score: float = 0.2
    end_overlap: float = 0.9


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """Capture-stage preprocessing.

    Attributes
    ----------
    crop : str
        ``auto`` (detect data bar and UI borders on the first frame), ``none``,
        or ``x,y,width,height`` in pixels.
    levels : str
        Grey-level window mapping 16-bit and float input to 8 bits, one for
        the whole run: ``auto`` (8-bit untouched; else the file's declared
        significant bits, or the 0.1/99.9 percentiles of the first frames),
        ``full`` (the pixel type's full range: ``uint16`` / 257) or ``LO,HI``
        in input grey levels (see :mod:`cemi_stream.capture.levels`).
    faults : FaultConfig
        Fault-frame thresholds.
    keyframes : KeyframeConfig
        Keyframe selection settings.
    """

    crop: str = "auto"
    levels: str = "auto"
    faults: FaultConfig = field(default_factory=FaultConfig)
    keyframes: KeyframeConfig = field(default_factory=KeyframeConfig)


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    """Raw frame spool (``frames.zarr``).

    Attributes
    ----------
    compression : {"none", "lz4", "zstd"}
        Chunk codec.  ``none`` by default: noisy SEM frames compress by only
        ~13 % (zstd level 1), which doubles the write cost (2.8 -> 5.7 ms
        per 1024 x 768 frame on the development machine).
    fsync_interval_s : float
        Chunk files and the frame table are fsynced at most this far apart
        (0 = after every frame).  A killed process loses nothing either way;
        this bounds what a power failure can lose.
    memory_frames : int
        Frames kept in RAM for the publisher; beyond that, it re-reads them
        from the spool so a slow consumer never stalls the capture.
    """

    compression: Literal["none", "lz4", "zstd"] = "none"
    fsync_interval_s: float = 1.0
    memory_frames: int = 128


@dataclass(frozen=True, slots=True)
class StitchConfig:
    """The live stitcher.

    Attributes
    ----------
    layout : {"auto", "raster", "serpentine"}
        Traversal hint; ``auto`` recognises it from the images.
    min_band_z : float
        Significance of the band-passed overlap agreement below which a
        registration is rejected (see ``stitch.register.accept``; calibrated
        by ``bench/bench_accept.py``: raise it to trust fewer, surer matches).
    chunk_px : int
        Side of the square storage chunks of the mosaic, pixels.
    pixel_size_um : float or None
        Pixel size in micrometres; None takes it from the frames' metadata.
    journal_fsync : bool
        fsync the journal (the commit record) in a background thread that
        covers every frame written since its last fsync (group commit).
    preview_max_side : int
        Longest side of ``preview.png`` in pixels.
    grid : str or None
        ``"COLSxROWS"``: the frames are a tile grid (see
        :mod:`cemi_stream.stitch.grid`); None follows a stage path.
    order : {"row", "column"}
        How a grid's files are numbered: row by row or column by column.
    serpentine : bool
        Every other grid row (column, with ``order = "column"``) runs backwards.
    overlap : str or None
        Nominal overlap of neighbouring grid tiles, ``"F"`` or ``"FX,FY"``
        (fractions of the tile); None: 0.1.
    max_fps : float
        Most frames per second the stitcher takes, 0 = as many as it can: to
        leave CPU to the instrument's own software, or to rehearse a slow
        stitcher (the capture is never held back by it: frames wait in the
        spool, see ``stitch.feed``).
    """

    layout: Literal["auto", "raster", "serpentine"] = "auto"
    min_band_z: float = 14.0
    chunk_px: int = 1024
    pixel_size_um: float | None = None
    journal_fsync: bool = True
    preview_max_side: int = 2048
    grid: str | None = None
    order: Literal["row", "column"] = "row"
    serpentine: bool = False
    overlap: str | None = None
    max_fps: float = 0.0


@dataclass(frozen=True, slots=True)
class DenoiseConfig:
    """The denoise stage (``denoise-stage``; ``replay --denoise``).

    Attributes
    ----------
    backend : {"auto", "cpu", "onnx", "cuda", "tensorrt"}
        Inference backend; ``auto`` takes the fastest one available.
    model : str or None
        Model name (in ``models/weights``) or path of a ``.safetensors``
        file; None is the default model (``models.zoo.DEFAULT_MODEL``).
    batch : int
        Most frames collected for one call of the denoiser (which may run
        them in smaller backend batches: one frame at a time on the CPU
        backends).
    batch_wait_s : float
        Longest time, in seconds, the first frame of a batch waits for more
        frames: a partial batch is denoised then, so a slow trickle of frames
        (live capture) is never held back for a batch to fill.
    tile_px : int
        Tile side in pixels (a multiple of 4) for denoising large frames in
        pieces, e.g. when a frame does not fit the GPU's memory; 0 = whole
        frames.
    pipes : list of str
        Durable pipes of the stage's own bus (``RUN_DIR/denoised/bus.json``),
        which carries the denoised frames downstream.
    workers : int
        Local denoise worker processes: 1 denoises in the stage's own process;
        more spread each batch over that many worker processes
        (:mod:`cemi_stream.denoise.workers`; make ``batch`` a multiple of it).
    listen : str or None
        ``tcp://HOST:PORT`` where remote denoise workers connect (CURVE with
        ``bus.curve_dir``, required off loopback); None: local workers only.
    cpu_nice : int
        Niceness (0-19) the denoise stage process of a run (started by
        ``replay`` or the daemon) adds to itself when it denoises on the CPU
        (backends ``cpu`` and ``onnx``).  The CPU denoiser takes every core
        it can get, and the capture, which must keep up with the instrument
        (and be processing frames again within a second of a restart), would
        then wait for it: on a 2-core machine a restarted capture took
        2.1-2.2 s to spool its next frame with 0, 0.6-0.8 s with 10.  The
        denoiser still gets every cycle nobody else wants.  ``cuda`` and
        ``tensorrt`` are not affected.
    """

    backend: DenoiseBackend = "auto"
    model: str | None = None
    batch: int = 4
    batch_wait_s: float = 0.05
    tile_px: int = 0
    pipes: list[str] = field(default_factory=lambda: ["stitch"])
    workers: int = 1
    listen: str | None = None
    cpu_nice: int = 10


# Phase-fraction methods of the analysis (cemi_stream.analysis.phase; no import here).
ANALYSIS_METHODS = ("auto", "bradley", "otsu", "multiotsu", "model")


@dataclass(frozen=True, slots=True)
class AnalysisConfig:
    """The live analysis stage (``analyze-stage``; ``replay --analyze``, run option ``analyze``).

    Attributes
    ----------
    tile : str
        Tile size ``WxH`` in pixels (the paper's 508 x 413).
    phase : {"dark", "bright"}
        The phase whose area fraction is measured.
    method : str
        Phase-fraction method (``auto``, ``bradley``, ``otsu``, ``multiotsu``,
        ``model``).
    segmenter : str
        Lamellar regions: ``classical``, ``none`` or a segmenter model.
    phase_model : str or None
        ``method = "model"``: the phase segmenter (name or path); None = the
        shipped default.
    maps_every_s : float
        Seconds between rewrites of ``RUN_DIR/analysis`` (tiles.csv, maps,
        profiles) while the run goes on.
    """

    tile: str = "508x413"
    phase: Literal["dark", "bright"] = "dark"
    method: str = "auto"
    segmenter: str = "classical"
    phase_model: str | None = None
    maps_every_s: float = 15.0


@dataclass(frozen=True, slots=True)
class Config:
    """The whole daemon configuration."""

    bus: BusConfig = field(default_factory=BusConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    stitch: StitchConfig = field(default_factory=StitchConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def _check_value(value: Any, hint: Any, key: str) -> Any:
    """Validate ``value`` against a type hint, returning the converted value."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if dataclasses.is_dataclass(value) and isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return from_dict(hint, value, prefix=f"{key}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported configuration type {hint!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys.

    Parameters
    ----------
    cls : type
        A dataclass type from this module.
    data : dict
        Keys and values, nested tables as dicts.
    prefix : str
        Dotted path of ``data`` inside the whole configuration (for messages).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown configuration key (known: {', '.join(sorted(names))})"
        )
    kwargs = {k: _check_value(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """The configuration as plain nested dicts (for ``run.json``)."""
    return dataclasses.asdict(obj)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML file (optional) and apply dotted-key overrides.

    Parameters
    ----------
    path : path or None
        TOML file; None uses the defaults.
    overrides : dict or None
        Dotted keys such as ``{"capture.keyframes.overlap": 0.4}``, applied
        after the file (command-line flags end up here).
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: configuration file not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {part} is not a table")
        node[leaf] = value
    config = from_dict(Config, data)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    """Range checks that types alone cannot express."""
    kf = config.capture.keyframes
    if not 0.05 <= kf.overlap <= 0.95:
        raise ConfigError(f"capture.keyframes.overlap: {kf.overlap} is outside 0.05..0.95")
    if kf.downsample < 1 or kf.downsample > 16:
        raise ConfigError(f"capture.keyframes.downsample: {kf.downsample} is outside 1..16")
    if not kf.overlap < kf.end_overlap <= 1.0:
        raise ConfigError("capture.keyframes.end_overlap: must lie between overlap and 1")
    bus = config.bus
    if bus.hwm < 1:
        raise ConfigError(f"bus.hwm: {bus.hwm} must be at least 1")
    if not 1 <= bus.port_base <= 65000:
        raise ConfigError(f"bus.port_base: {bus.port_base} is not a usable port")
    _check_pipes("bus.pipes", bus.pipes)
    parse_crop(config.capture.crop)
    parse_levels(config.capture.levels)
    if config.spool.memory_frames < 1:
        raise ConfigError("spool.memory_frames: must be at least 1")
    st = config.stitch
    if not 0.0 <= st.min_band_z <= 1000.0:
        raise ConfigError(f"stitch.min_band_z: {st.min_band_z} is outside 0..1000")
    if not 0.0 <= st.max_fps <= 100_000.0:
        raise ConfigError(f"stitch.max_fps: {st.max_fps} is outside 0..100000 frames/s")
    if st.chunk_px < 64 or st.chunk_px % 64:
        raise ConfigError(f"stitch.chunk_px: {st.chunk_px} must be a multiple of 64")
    grid_spec(st)  # raises ConfigError naming the option
    if st.pixel_size_um is not None and not st.pixel_size_um > 0:
        raise ConfigError(f"stitch.pixel_size_um: {st.pixel_size_um} must be positive")
    if config.spool.fsync_interval_s < 0:
        raise ConfigError("spool.fsync_interval_s: must not be negative")
    dn = config.denoise
    if not 1 <= dn.batch <= 256:
        raise ConfigError(f"denoise.batch: {dn.batch} is outside 1..256")
    if not 0.0 <= dn.batch_wait_s <= 10.0:
        raise ConfigError(f"denoise.batch_wait_s: {dn.batch_wait_s} is outside 0..10 s")
    if dn.tile_px < 0 or dn.tile_px % 4:
        raise ConfigError(f"denoise.tile_px: {dn.tile_px} must be 0 or a positive multiple of 4")
    if dn.model is not None and not dn.model.strip():
        raise ConfigError("denoise.model: empty model name")
    _check_pipes("denoise.pipes", dn.pipes)
    if not 1 <= dn.workers <= 64:
        raise ConfigError(f"denoise.workers: {dn.workers} is outside 1..64")
    if not 0 <= dn.cpu_nice <= 19:
        raise ConfigError(f"denoise.cpu_nice: {dn.cpu_nice} is outside 0..19")
    if dn.listen is not None and not dn.listen.startswith("tcp://"):
        raise ConfigError(f"denoise.listen: {dn.listen!r} is not a tcp:// endpoint")
    an = config.analysis
    parts = an.tile.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 16 for p in parts):
        raise ConfigError(f"analysis.tile: {an.tile!r} must be WxH pixels, each at least 16")
    if an.method not in ANALYSIS_METHODS:
        raise ConfigError(
            f"analysis.method: {an.method!r} is unknown (choose from {', '.join(ANALYSIS_METHODS)})"
        )
    if not an.segmenter.strip():
        raise ConfigError("analysis.segmenter: empty (classical, none or a model)")
    if an.phase_model is not None and an.method != "model":
        raise ConfigError('analysis.phase_model: only with analysis.method = "model"')
    if an.phase_model is not None and not an.phase_model.strip():
        raise ConfigError("analysis.phase_model: empty (a model name or path)")
    if not 0.5 <= an.maps_every_s <= 3600:
        raise ConfigError(f"analysis.maps_every_s: {an.maps_every_s} is outside 0.5..3600 s")


def _check_pipes(key: str, pipes: list[str]) -> None:
    """Pipe names must be unique identifiers (they name socket files)."""
    if len(set(pipes)) != len(pipes):
        raise ConfigError(f"{key}: pipe names must be unique")
    for name in pipes:
        if not name.isidentifier():
            raise ConfigError(f"{key}: {name!r} is not a valid pipe name")
