"""Configuration of the virtual SEM and its mapping from ``sim:?key=value`` options."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from cemi_stream.errors import ConfigError, SourceError

NoisePreset = Literal["ld", "hd", "none"]
_NOISE_CHOICES = ("ld", "hd", "none")
_MAX_FRAME_SIDE = 16384


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything the virtual SEM needs; the command line maps onto these fields.

    Attributes
    ----------
    rows : int
        Traversal rows.
    frames_per_row : int
        Frames per row in image mode; in video mode a row spans the same
        distance as that many image-mode frames.
    frame_width, frame_height : int
        Frame size in pixels.
    overlap : float
        Fraction of a frame shared by neighbouring image-mode frames (x) and
        by neighbouring rows (y), in ``[0, 0.95]``.
    serpentine : bool
        Alternate rows run backwards (otherwise raster: every row starts left).
    noise : {"ld", "hd", "none"}
        Imaging preset: fast scan, slow scan or noise-free.
    noise_scale : float
        Shot-noise multiplier on the preset: the dose is divided by its
        square (2: a quarter of the electrons, twice the relative noise);
        1 keeps the calibrated preset.  For dose sweeps.
    video : bool
        Continuous stage motion recorded as video instead of one frame per step.
    fps : float
        Video frame rate in frames per second.
    video_overlap : float
        Fraction of the width shared by consecutive video frames, ``[0, 0.999]``.
    seed : int
        Seed of the specimen, the stage errors and the noise (>= 0).
    source : str or None
        Micrograph used as specimen (mirror-tiled); None = procedural eutectic.
    specimen_scale : float
        Magnification of the specimen before imaging.
    jitter_px : float
        Image mode: uniform stage positioning error, +- pixels in x and y.
        Video mode: vibration of ``0.03 * jitter_px`` px rms, plus 3 % velocity
        fluctuation unless ``jitter_px`` is 0.
    backlash_px : float
        Play between lead screw and carriage in pixels (shows at x reversals).
    drift_px_per_frame : float
        Slow drift speed in pixels per frame.
    databar : bool
        Burn a data bar into the bottom ~8 % of each frame.
    pixel_size_nm : float
        Pixel size in nanometres (converts stage positions to micrometres).
    report_stage : bool
        Put the commanded stage position in the frame metadata.
    live : float
        Frames per second of a live device (:class:`drivers.live.LiveDevice`):
        frames are acquired on the device's clock whether read or not, and a
        reader that falls behind loses the oldest; 0 = a replay source.
    live_buffer : int
        Frames the live device's ring buffer holds.
    """

    rows: int = 3
    frames_per_row: int = 8
    frame_width: int = 1024
    frame_height: int = 768
    overlap: float = 0.5
    serpentine: bool = False
    noise: NoisePreset = "ld"
    noise_scale: float = 1.0
    video: bool = False
    fps: float = 25.0
    video_overlap: float = 0.95
    seed: int = 0
    source: str | None = None
    specimen_scale: float = 1.0
    jitter_px: float = 10.0
    backlash_px: float = 3.0
    drift_px_per_frame: float = 0.02
    databar: bool = False
    pixel_size_nm: float = 220.0
    report_stage: bool = True
    live: float = 0.0
    live_buffer: int = 4

    def __post_init__(self) -> None:
        for name in ("serpentine", "video", "databar", "report_stage"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "must be a boolean", getattr(self, name))
        for name, low, high in (
            ("rows", 1, 100_000),
            ("frames_per_row", 1, 1_000_000),
            ("frame_width", 16, _MAX_FRAME_SIDE),
            ("frame_height", 16, _MAX_FRAME_SIDE),
            ("seed", 0, 2**63 - 1),
            ("live_buffer", 1, 100_000),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                _fail(name, "must be an integer", value)
            if not low <= value <= high:
                _fail(name, f"must be in {low}..{high}", value)
        for name, lo, hi, low_open in (
            ("overlap", 0.0, 0.95, False),
            ("noise_scale", 0.0, 100.0, True),
            ("fps", 0.0, 10_000.0, True),
            ("video_overlap", 0.0, 0.999, False),
            ("specimen_scale", 0.0, 100.0, True),
            ("jitter_px", 0.0, 10_000.0, False),
            ("backlash_px", 0.0, 10_000.0, False),
            ("drift_px_per_frame", 0.0, 1_000.0, False),
            ("pixel_size_nm", 0.0, 1e9, True),
            ("live", 0.0, 10_000.0, False),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                _fail(name, "must be a number", value)
            if not math.isfinite(value):
                _fail(name, "must be finite", value)
            bad_low = value <= lo if low_open else value < lo
            if bad_low or value > hi:
                bracket = "(" if low_open else "["
                _fail(name, f"must be in {bracket}{lo:g}, {hi:g}]", value)
        if self.noise not in _NOISE_CHOICES:
            _fail("noise", f"must be one of {', '.join(_NOISE_CHOICES)}", self.noise)
        if self.source is not None and (not isinstance(self.source, str) or not self.source):
            _fail("source", "must be a non-empty path or None", self.source)

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(width, height)`` of the frames in pixels."""
        return self.frame_width, self.frame_height


def _fail(name: str, reason: str, value: object) -> None:
    raise ConfigError(f"sim.{name}: {reason}, not {value!r}")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_bool(key: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SourceError(f"sim: option {key}={text!r} is not a boolean (use 1/0, true/false)")


def _parse_number(key: str, text: str, kind: type) -> int | float:
    try:
        return int(text.strip()) if kind is int else float(text.strip())
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise SourceError(f"sim: option {key}={text!r} is not {expected}") from None


def config_from_options(options: dict[str, str]) -> SimConfig:
    """Build a :class:`SimConfig` from URI query options (all strings).

    Parameters
    ----------
    options : dict of str to str
        Keys are :class:`SimConfig` field names, plus ``frame_size=WxH`` as a
        shorthand for ``frame_width``/``frame_height``.

    Returns
    -------
    SimConfig
        Defaults for every field not given.

    Raises
    ------
    SourceError
        An unknown option or a value that does not parse (naming the option).
    ConfigError
        A value out of range (naming the field).
    """
    fields = {f.name: f for f in dataclasses.fields(SimConfig)}
    defaults = SimConfig()
    values: dict[str, object] = {}
    for key, text in options.items():
        if key == "frame_size":
            parts = text.lower().replace("*", "x").split("x")
            if len(parts) != 2:
                raise SourceError(f"sim: option frame_size={text!r} must look like 1024x768")
            values["frame_width"] = _parse_number(key, parts[0], int)
            values["frame_height"] = _parse_number(key, parts[1], int)
            continue
        if key not in fields:
            known = ", ".join([*fields, "frame_size"])
            raise SourceError(f"sim: unknown option {key!r} (known: {known})")
        default = getattr(defaults, key)
        if key == "source":
            values[key] = text or None
        elif key == "noise":
            values[key] = text.strip().lower()
        elif isinstance(default, bool):
            values[key] = _parse_bool(key, text)
        elif isinstance(default, int):
            values[key] = _parse_number(key, text, int)
        elif isinstance(default, float):
            values[key] = _parse_number(key, text, float)
        else:
            values[key] = text
    return SimConfig(**values)  # type: ignore[arg-type]
