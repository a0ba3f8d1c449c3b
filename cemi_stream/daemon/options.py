"""The options of a run: what ``replay`` takes on its command line, as one value.

:class:`RunOptions` is built in two ways:

* directly (``RunOptions(source=..., ...)``), by ``replay`` from its own
  command line: values are checked (:meth:`RunOptions.__post_init__`), paths
  are taken as given;
* from untrusted JSON (the daemon's ``POST /api/runs``) with
  :meth:`RunOptions.from_mapping`, which also rejects unknown keys and wrong
  types, checks the source (a driver must claim it) and keeps every path -
  a file or folder source, a ``sim:`` specimen image, a model file, a
  configuration file - inside the daemon's data directory (relative paths
  are taken from there; symbolic links are followed before the check).

Every failure is a :class:`~cemi_stream.errors.ConfigError` whose one-line
message starts with the name of the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

from ..config import DENOISE_BACKENDS, from_dict, load_config
from ..errors import CemiError, ConfigError

Toggle = Literal["on", "off"]
Layout = Literal["auto", "raster", "serpentine"]
Order = Literal["row", "column"]

# A run's name: shown in listings, never used as a path.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,63}$")
MAX_TEXT = 4096
# Sources that name no file: devices and streams (see drivers.registry).
_STREAM_SCHEMES = ("device", "rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt", "gst")


@dataclass(frozen=True, slots=True)
class RunOptions:
    """The options of one run (``replay``'s, plus the pace and a name).

    Attributes
    ----------
    source : str
        Frame source string (see :mod:`drivers.registry`).
    pace : str
        ``native`` (the source's own frame rate; the daemon's default),
        ``max`` (as fast as possible; ``replay``'s) or a positive frame rate
        in frames/s, as text.
    denoise : str
        ``off`` or a denoise backend (``auto``, ``cpu``, ``onnx``, ``cuda``,
        ``tensorrt``).
    model : str or None
        Denoiser model name or ``.safetensors`` path (only with ``denoise``).
    denoise_workers : int or None
        Local denoise worker processes (``denoise.workers``; only with ``denoise``).
    denoise_listen : str or None
        ``tcp://HOST:PORT`` for remote denoise workers (``denoise.listen``; only
        with ``denoise``; off loopback it needs ``bus.curve_dir``).
    keyframes : {"on", "off"} or None
        Keyframe selection; None: on for videos, off for image folders.
    keyframe_overlap : float or None
        Target keyframe overlap, area fraction (capture ``--overlap``).
    crop : str or None
        ``auto``, ``none`` or ``x,y,width,height`` pixels (capture ``--crop``).
    levels : str or None
        ``auto``, ``full`` or ``LO,HI`` input grey levels.
    pixel_size_um : float or None
        Pixel size, micrometres; None: from the frames.
    layout : {"auto", "raster", "serpentine"} or None
        Traversal hint of the stitcher.
    grid : str or None
        ``COLSxROWS``: the frames are a tile grid.
    order : {"row", "column"} or None
        With ``grid``: how the files are numbered.
    serpentine : bool
        With ``grid``: every other line runs backwards.
    overlap : str or None
        With ``grid``: nominal tile overlap, ``F`` or ``FX,FY`` (fractions).
    allow_predicted : bool
        A run with more than half of its frames predicted still succeeds.
    analyze : bool
        Add the analysis stage: tiles measured as the mosaic settles, in
        ``RUN_DIR/analysis`` (settings: the configuration's ``[analysis]``).
    name : str or None
        A label for listings (letters, digits, ``._ -``; at most 64).
    config_file : str or None
        TOML configuration file for every stage.
    """

    source: str
    pace: str = "native"
    denoise: str = "off"
    model: str | None = None
    denoise_workers: int | None = None
    denoise_listen: str | None = None
    keyframes: Toggle | None = None
    keyframe_overlap: float | None = None
    crop: str | None = None
    levels: str | None = None
    pixel_size_um: float | None = None
    layout: Layout | None = None
    grid: str | None = None
    order: Order | None = None
    serpentine: bool = False
    overlap: str | None = None
    allow_predicted: bool = False
    analyze: bool = False
    name: str | None = None
    config_file: str | None = None

    def __post_init__(self) -> None:
        """Check every value on its own (no file is looked at).

        Raises
        ------
        ConfigError
            Naming the field and the reason.
        """
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and (len(value) > MAX_TEXT or "\x00" in value):
                raise ConfigError(f"{f.name}: too long or contains a NUL character")
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError("source: an empty source string")
        if any(c in self.source for c in "\r\n"):
            raise ConfigError("source: contains a line break")
        object.__setattr__(self, "pace", _check_pace(self.pace))
        if self.denoise not in ("off", *DENOISE_BACKENDS):
            raise ConfigError(
                f"denoise: {self.denoise!r} is unknown (choose from off, "
                f"{', '.join(DENOISE_BACKENDS)})"
            )
        if self.model is not None and self.denoise == "off":
            raise ConfigError(f"model: {self.model!r} is only used with denoise (it is off)")
        if self.model is not None and not self.model.strip():
            raise ConfigError("model: an empty model name")
        for key in ("denoise_workers", "denoise_listen"):
            if getattr(self, key) is not None and self.denoise == "off":
                raise ConfigError(f"{key}: only used with denoise (it is off)")
        if self.keyframes not in (None, "on", "off"):
            raise ConfigError(f"keyframes: {self.keyframes!r} must be on or off")
        if self.layout not in (None, "auto", "raster", "serpentine"):
            raise ConfigError(f"layout: {self.layout!r} must be auto, raster or serpentine")
        if self.order not in (None, "row", "column"):
            raise ConfigError(f"order: {self.order!r} must be row or column")
        if self.pixel_size_um is not None and not (
            isinstance(self.pixel_size_um, int | float)
            and not isinstance(self.pixel_size_um, bool)
            and math.isfinite(self.pixel_size_um)
            and self.pixel_size_um > 0
        ):
            raise ConfigError(f"pixel_size_um: {self.pixel_size_um!r} must be a positive number")
        if self.name is not None and not _NAME_RE.match(self.name):
            raise ConfigError(
                f"name: {self.name!r} must be 1-64 letters, digits, '.', '_', '-' or spaces, "
                "starting with a letter or digit"
            )
        # The capture's and stitcher's own validators (levels, crop, grid, overlaps).
        try:
            load_config(None, self.config_overrides())
        except ConfigError as exc:
            raise ConfigError(_field_message(str(exc))) from None

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], data_dir: Path, *, roots: Sequence[Path] = ()
    ) -> RunOptions:
        """Validate untrusted options (a JSON object) into a :class:`RunOptions`.

        Parameters
        ----------
        data : Mapping
            Field names to values (JSON types: strings, numbers, booleans,
            null).  ``source`` is required; every other field has its default.
        data_dir : Path
            The daemon's data directory: relative paths are taken from it,
            and no path may lead outside it (or outside ``roots``).
        roots : sequence of Path
            Further folders that sources, models and configuration files may
            come from (e.g. a data share the daemon was told to serve).

        Returns
        -------
        RunOptions
            With file sources and paths made absolute.

        Raises
        ------
        ConfigError
            One line naming the field: an unknown key, a wrong type, a bad
            value, a source no driver can open, a missing model or
            configuration file, a path outside the data directory.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"options: expected a JSON object, got {type(data).__name__}")
        if any(not isinstance(k, str) for k in data):
            raise ConfigError("options: every key must be a string")
        if "source" not in data:
            raise ConfigError("source: required")
        allowed = [Path(data_dir).resolve(), *(Path(r).resolve() for r in roots)]
        try:
            options = from_dict(cls, dict(data))
        except ConfigError as exc:
            raise ConfigError(_field_message(str(exc))) from None
        changes: dict[str, Any] = {"source": _check_source(options.source, allowed)}
        if options.config_file is not None:
            path = _inside("config_file", options.config_file, allowed)
            if not path.is_file():
                raise ConfigError(f"config_file: {options.config_file}: no such file")
            changes["config_file"] = str(path)
        if options.model is not None and _looks_like_path(options.model):
            changes["model"] = str(_inside("model", options.model, allowed))
        options = dataclasses.replace(options, **changes)
        try:
            load_config(options.config_file, options.config_overrides())
        except ConfigError as exc:
            raise ConfigError(f"config_file: {exc}") from None
        try:
            from .stages import check_denoise

            check_denoise(options.denoise, options.model, options.config_file)
        except CemiError as exc:
            field = "model" if options.model is not None else "denoise"
            raise ConfigError(f"{field}: {exc}") from None
        return options

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> RunOptions:
        """Options read back from a run's own record (``daemon-run.json``).

        Types and values are checked again; paths are not (they were when
        the run was created).

        Raises
        ------
        ConfigError
            A record that does not hold valid options.
        """
        if not isinstance(data, Mapping):
            raise ConfigError("options: expected an object")
        return from_dict(cls, dict(data))

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-compatible dict (field names to values)."""
        return dataclasses.asdict(self)

    def config_overrides(self) -> dict[str, Any]:
        """The dotted configuration keys these options set (see :func:`load_config`)."""
        out: dict[str, Any] = {}
        pairs = (
            ("capture.keyframes.mode", self.keyframes),
            ("capture.keyframes.overlap", self.keyframe_overlap),
            ("capture.crop", self.crop),
            ("capture.levels", self.levels),
            ("stitch.pixel_size_um", self.pixel_size_um),
            ("stitch.layout", self.layout),
            ("stitch.grid", self.grid),
            ("stitch.order", self.order),
            ("stitch.overlap", self.overlap),
            ("denoise.workers", self.denoise_workers),
            ("denoise.listen", self.denoise_listen),
        )
        for key, value in pairs:
            if value is not None:
                out[key] = (
                    float(value)
                    if key.endswith(("overlap", "_um")) and not isinstance(value, str)
                    else value
                )
        if self.serpentine:
            out["stitch.serpentine"] = True
        return out

    def to_replay_args(self) -> list[str]:
        """The options as ``replay`` takes them on its command line.

        SOURCE and ``--out`` are not included.  ``replay`` always runs at
        ``--pace max`` and has no ``--crop``, keyframe ``--overlap`` or name:
        those are passed to the stage commands
        (:func:`cemi_stream.daemon.stages.stage_commands`) instead.
        """
        args: list[str] = []
        if self.denoise != "off":
            args += ["--denoise", self.denoise]
        if self.model is not None:
            args += ["--model", self.model]
        if self.denoise_workers is not None:
            args += ["--denoise-workers", str(self.denoise_workers)]
        if self.denoise_listen is not None:
            args += ["--denoise-listen", self.denoise_listen]
        if self.keyframes is not None:
            args += ["--keyframes", self.keyframes]
        if self.pixel_size_um is not None:
            args += ["--pixel-size-um", repr(float(self.pixel_size_um))]
        if self.layout is not None:
            args += ["--layout", self.layout]
        if self.levels is not None:
            args += ["--levels", self.levels]
        args += self.grid_args()
        if self.allow_predicted:
            args.append("--allow-predicted")
        if self.analyze:
            args.append("--analyze")
        if self.config_file is not None:
            args += ["--config", self.config_file]
        return args

    def grid_args(self) -> list[str]:
        """``--grid``, ``--order``, ``--overlap``, ``--serpentine`` (replay and stitch)."""
        args: list[str] = []
        for flag, value in (("--grid", self.grid), ("--order", self.order),
                            ("--overlap", self.overlap)):  # fmt: skip
            if value is not None:
                args += [flag, value]
        if self.serpentine:
            args.append("--serpentine")
        return args


def _check_pace(pace: Any) -> str:
    from drivers.pacing import parse_pace

    if not isinstance(pace, str):
        raise ConfigError(f"pace: expected a string, got {pace!r}")
    try:
        mode = parse_pace(pace)
    except CemiError:
        raise ConfigError(
            f"pace: {pace!r} must be native, max or a positive number of frames/s"
        ) from None
    return mode if isinstance(mode, str) else pace.strip()


def _field_message(message: str) -> str:
    """A configuration message about a dotted key, renamed to the option's field."""
    names = {
        "capture.keyframes.mode": "keyframes",
        "capture.keyframes.overlap": "keyframe_overlap",
        "capture.crop": "crop",
        "capture.levels": "levels",
        "stitch.pixel_size_um": "pixel_size_um",
        "stitch.layout": "layout",
        "stitch.grid (--grid)": "grid",
        "stitch.grid": "grid",
        "stitch.order (--order)": "order",
        "stitch.order": "order",
        "stitch.overlap (--overlap)": "overlap",
        "stitch.overlap": "overlap",
        "stitch.serpentine": "serpentine",
        "denoise.workers": "denoise_workers",
        "denoise.listen": "denoise_listen",
    }
    for key, name in names.items():
        if message.startswith(key):
            return name + message[len(key) :]
    return message


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.endswith(".safetensors") or text.startswith(".")


def _inside(field: str, text: str, allowed: Sequence[Path]) -> Path:
    """``text`` as an absolute path, relative to the data directory; must lie in ``allowed``."""
    raw = Path(text).expanduser()
    if ".." in raw.parts:
        raise ConfigError(f"{field}: {text}: '..' is not allowed in a path")
    path = (raw if raw.is_absolute() else allowed[0] / raw).resolve()
    if not any(path == root or path.is_relative_to(root) for root in allowed):
        raise ConfigError(f"{field}: {text} is outside the data directory {allowed[0]}")
    return path


def _check_source(source: str, allowed: Sequence[Path]) -> str:
    """Check that a driver claims ``source``; return it with its path made absolute."""
    import drivers
    from drivers.registry import parse_uri

    try:
        parsed, _, _ = parse_uri(source)
    except CemiError as exc:
        raise ConfigError(f"source: {exc}") from None
    scheme, target = parsed.scheme, parsed.target
    if scheme in _STREAM_SCHEMES or (not scheme and target.strip().isdigit()):
        return source
    if not scheme and target.startswith("/dev/video"):
        return source
    try:
        if scheme == "sim":
            return _absolute_sim(source, parsed.options, target, allowed)
        if scheme and scheme not in ("folder", "tiff", "video"):
            drivers.registry.resolve(parsed)  # raises: an unknown scheme
            return source
        path = _inside("source", target, allowed)
        if not path.exists():
            raise ConfigError(f"source: {source}: no such file or directory")
        _, pace, loop = parse_uri(source)
        query = dict(parsed.options)
        if pace is not None:
            query["pace"] = pace
        if loop:
            query["loop"] = "1"
        head = f"{scheme}:" if scheme else ""
        absolute = f"{head}{path}" + (f"?{urlencode(query)}" if query else "")
        drivers.registry.resolve(parse_uri(absolute)[0])
    except ConfigError:
        raise
    except CemiError as exc:
        raise ConfigError(f"source: {exc}") from None
    return absolute


def _absolute_sim(
    source: str, options: Mapping[str, str], target: str, allowed: Sequence[Path]
) -> str:
    """A ``sim:`` source with its specimen image (if any) as an absolute path."""
    from drivers.sim import config_from_options

    image = options.get("source") or target or None
    if image is None:
        config_from_options(dict(options))  # unknown or bad options, named
        return source
    path = _inside("source", image, allowed)
    if not path.is_file():
        raise ConfigError(f"source: {image}: no such specimen image")
    opts = {k: v for k, v in options.items() if k != "source"}
    config_from_options({**opts, "source": str(path)})
    query = parse_qsl(source.split("?", 1)[1], keep_blank_values=True) if "?" in source else []
    kept = [(k, v) for k, v in query if k != "source"]
    return f"sim:{path}" + (f"?{urlencode(kept)}" if kept else "")
