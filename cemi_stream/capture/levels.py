"""One grey-level window per run: 16-bit and float frames mapped to 8 bits.

Sources deliver frames in the depth they decode (:mod:`drivers.base`).  The
capture front end maps them to ``uint8`` through :class:`LevelsGate` with one
window ``(low, high)`` in input grey levels, chosen once for the whole run and
then fixed: stretching each frame on its own would make the brightness of
overlapping frames disagree, and the stitcher blends overlaps.

``capture.levels`` (``--levels``) chooses the window:

* ``auto`` (default): 8-bit input is left untouched.  Deeper input uses the
  significant bits its file declares when they are fewer than the container
  holds and the data fits them (12 bits in a 16-bit PNG: ``0..4095``); else
  the 0.1 and 99.9 percentiles of the first :data:`SAMPLE_FRAMES` frames (a
  subsample of each), so a 16-bit tile grid whose values span 200..1300 uses
  the whole 8-bit range instead of 0..5.
* ``full``: the pixel type's full range (``uint16`` divided by 257, floats
  taken as 0..1; 8-bit untouched), the behaviour before ``auto`` existed.
* ``LO,HI``: that window, in input grey levels, for any input (8-bit too).

While ``auto`` waits for its sample frames they are held back, in order, and
released once the window is known (or at the end of the stream, or when the
capture stops): no frame is lost or reordered.  Fault frames (no pixels) need
no window and keep their place in the order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError
from ..frame import Frame

log = logging.getLogger(__name__)

AUTO = "auto"
FULL = "full"
SAMPLE_FRAMES = 5  # frames whose pixels the auto window is estimated from
SAMPLE_PIXELS = 1 << 18  # at most this many pixels per frame enter the statistics
PERCENTILES = (0.1, 99.9)  # robust to hot pixels and a few saturated ones

Source = Literal["8-bit", "full", "explicit", "metadata", "percentiles"]


@dataclass(frozen=True, slots=True)
class LevelsSpec:
    """A parsed ``capture.levels`` value.

    Attributes
    ----------
    mode : {"auto", "full", "explicit"}
        How the window is chosen.
    low, high : float or None
        The explicit window in input grey levels (``explicit`` only).
    """

    mode: Literal["auto", "full", "explicit"]
    low: float | None = None
    high: float | None = None


def parse_levels(text: str) -> LevelsSpec:
    """Parse ``auto``, ``full`` or ``LO,HI``.

    Raises
    ------
    ConfigError
        One line naming the value and what is expected.
    """
    value = text.strip().lower()
    if value in (AUTO, FULL):
        return LevelsSpec(value)  # type: ignore[arg-type]
    parts = value.split(",")
    expected = "expected auto, full or LO,HI in input grey levels, e.g. 200,1300"
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"capture.levels (--levels) {text!r}: {expected}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"capture.levels (--levels) {text!r}: LO and HI must be finite")
    if not high > low:
        raise ConfigError(f"capture.levels (--levels) {text!r}: HI must be greater than LO")
    return LevelsSpec("explicit", low, high)


@dataclass(frozen=True, slots=True)
class Window:
    """The grey-level window of a run: ``low`` maps to 0, ``high`` to 255.

    Attributes
    ----------
    low, high : float
        In input grey levels.
    dtype : str
        Pixel type of the input it was chosen for.
    source : str
        ``8-bit`` (untouched), ``full``, ``explicit``, ``metadata`` or
        ``percentiles``.
    """

    low: float
    high: float
    dtype: str
    source: Source

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Map one ``(y, x)`` image to ``uint8`` ``(y, x)``.

        Integer images of up to 16 bits go through a lookup table (exact, and
        ``full`` on ``uint16`` is bit-identical to dividing by 257 with
        rounding); others are scaled in float32, NaN becoming 0.
        """
        if self.source == "8-bit" and image.dtype == np.uint8:
            return image
        if image.dtype.kind in "ui" and image.dtype.itemsize <= 2:
            info = np.iinfo(image.dtype)
            levels = np.arange(info.min, info.max + 1, dtype=np.float64)
            lut = _scale(levels, self.low, self.high)
            offset = -int(info.min)
            index = image.astype(np.int32) + offset if offset else image
            return np.ascontiguousarray(lut[index])
        data = image.astype(np.float32)
        if data.dtype.kind == "f":
            data = np.nan_to_num(data, nan=self.low, posinf=self.high, neginf=self.low)
        return np.ascontiguousarray(_scale(data, self.low, self.high))


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def full_window(dtype: np.dtype[Any]) -> Window:
    """The ``full`` window of a pixel type (``uint8`` untouched, floats 0..1)."""
    if dtype == np.uint8:
        return Window(0.0, 255.0, "uint8", "8-bit")
    if dtype.kind == "f":
        return Window(0.0, 1.0, str(dtype), "full")
    info = np.iinfo(dtype)
    return Window(float(info.min), float(info.max), str(dtype), "full")


def depth_text(dtype: str) -> str:
    """``16-bit`` for ``uint16``, ``8-bit`` for ``uint8``, else the type name."""
    kind = np.dtype(dtype)
    return f"{kind.itemsize * 8}-bit" if kind.kind == "u" else str(kind)


def _subsample(image: np.ndarray) -> np.ndarray:
    """At most about :data:`SAMPLE_PIXELS` pixels of ``image`` on a regular grid, flat."""
    step = max(1, math.ceil(math.sqrt(image.size / SAMPLE_PIXELS)))
    values = image[::step, ::step].ravel()
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
    return values


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(float(value), 6)


class LevelsGate:
    """Maps every frame of a run to ``uint8`` with one window, holding back the first few.

    Parameters
    ----------
    spec : LevelsSpec or str
        ``auto``, ``full`` or ``LO,HI`` (see the module docstring).
    significant_bits : int or None
        Significant bits the source declares (:attr:`drivers.base.SourceInfo.significant_bits`).
    sample_frames : int
        Frames the ``auto`` window is estimated from.
    """

    def __init__(
        self,
        spec: LevelsSpec | str,
        significant_bits: int | None = None,
        sample_frames: int = SAMPLE_FRAMES,
    ) -> None:
        self.spec = parse_levels(spec) if isinstance(spec, str) else spec
        self.significant_bits = significant_bits
        self.sample_frames = max(1, sample_frames)
        self.window: Window | None = None
        self._held: list[Frame] = []  # in input order, real and fault frames
        self._held_real = 0
        self._sampled = 0
        self._input_min = math.inf
        self._input_max = -math.inf
        self._other_dtypes: set[str] = set()

    def push(self, frame: Frame) -> list[Frame]:
        """Take one frame; return the frames now ready, mapped to ``uint8``, in input order."""
        if frame.fault is not None:
            if not self._held:
                return [frame]
            self._held.append(frame)
            return []
        self._observe(frame.image)
        decide_now = self.spec.mode != AUTO or frame.image.dtype == np.uint8
        if self.window is None and decide_now and not self._held_real:
            self._decide([frame.image])
        if self.window is not None:
            return [self._map(frame)]
        self._held.append(frame)
        self._held_real += 1
        if self._held_real >= self.sample_frames:
            return self.flush()
        return []

    def flush(self) -> list[Frame]:
        """Decide the window from what is held (if still open) and release everything held."""
        if self.window is None and self._held_real:
            self._decide([f.image for f in self._held if f.fault is None])
        held, self._held, self._held_real = self._held, [], 0
        return [f if f.fault is not None else self._map(f) for f in held]

    def describe(self) -> dict[str, Any]:
        """What ``capture.json`` records: the mode, the window and the input's range."""
        w = self.window
        seen = math.isfinite(self._input_min)
        data: dict[str, Any] = {
            "mode": self.spec.mode,
            "source": None if w is None else w.source,
            "dtype": None if w is None else w.dtype,
            "window": None if w is None else [_number(w.low), _number(w.high)],
            "significant_bits": self.significant_bits,
            "sample_frames": self._sampled,
            "input_min": _number(self._input_min) if seen else None,
            "input_max": _number(self._input_max) if seen else None,
        }
        if self._other_dtypes:
            data["other_dtypes"] = sorted(self._other_dtypes)
        return data

    def _observe(self, image: np.ndarray) -> None:
        # The input's range over the run, for capture.json and error messages.
        values = _subsample(image)
        if values.size:
            self._input_min = min(self._input_min, float(values.min()))
            self._input_max = max(self._input_max, float(values.max()))

    def _map(self, frame: Frame) -> Frame:
        window = self.window
        if window is None:  # pragma: no cover - callers decide first
            raise RuntimeError("levels window not decided")
        image = frame.image
        if str(image.dtype) != window.dtype:
            if str(image.dtype) not in self._other_dtypes:
                log.warning(
                    "frame %d is %s, the run's window is for %s: mapped with its full range",
                    frame.meta.src_index, image.dtype, window.dtype,
                )  # fmt: skip
                self._other_dtypes.add(str(image.dtype))
            mapped = full_window(image.dtype).apply(image)
        else:
            mapped = window.apply(image)
        return Frame(mapped, frame.meta, frame.fault)

    def _decide(self, images: list[np.ndarray]) -> None:
        dtype = images[0].dtype
        spec = self.spec
        if spec.mode == "explicit" and spec.low is not None and spec.high is not None:
            window = Window(spec.low, spec.high, str(dtype), "explicit")
        elif spec.mode == FULL or dtype == np.uint8:
            window = full_window(dtype)
        else:
            window = self._auto_window(dtype, [i for i in images if i.dtype == dtype])
        self.window = window
        log.info(
            "levels: %s input mapped to 0..255 with the window %s..%s (%s, %d sample frames)",
            window.dtype, _number(window.low), _number(window.high), window.source, self._sampled,
        )  # fmt: skip

    def _auto_window(self, dtype: np.dtype[Any], images: list[np.ndarray]) -> Window:
        self._sampled = len(images)
        values = np.concatenate([_subsample(i) for i in images])
        if values.size == 0:
            log.warning("levels: the sample frames hold no finite value; using the full range")
            return full_window(dtype)
        top = float(values.max())
        bits = self.significant_bits
        if bits is not None and dtype.kind == "u" and bits < dtype.itemsize * 8:
            white = float(2**bits - 1)
            if top <= white:
                return Window(0.0, white, str(dtype), "metadata")
            log.warning(
                "levels: the source declares %d significant bits but values reach %s; "
                "using percentiles", bits, _number(top),
            )  # fmt: skip
        low, high = (float(v) for v in np.percentile(values, PERCENTILES))
        if dtype.kind in "ui":
            low, high = math.floor(low), math.ceil(high)
        if not high > low:
            low, high = float(values.min()), top
        if not high > low:
            log.warning(
                "levels: the sample frames are uniform (%s); using the full range", _number(low)
            )
            return full_window(dtype)
        return Window(low, high, str(dtype), "percentiles")


def rejected_all_message(
    frames_in: int, kept: int, reasons: dict[str, int], levels: dict[str, Any]
) -> str | None:
    """One line explaining a run in which every frame was rejected as blank or saturated.

    Parameters
    ----------
    frames_in, kept : int
        Input frames and kept frames of the run.
    reasons : dict
        Decision counts by reason.
    levels : dict
        :meth:`LevelsGate.describe` of the run.

    Returns
    -------
    str or None
        None when some frame was kept or none was blank or saturated.
    """
    bad = reasons.get("blank", 0) + reasons.get("saturated", 0)
    if frames_in == 0 or bad == 0 or kept:
        return None
    if len(reasons) == 1:
        head = f"all {frames_in} frames rejected as {next(iter(reasons))}"
    else:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        head = f"all {frames_in} frames rejected ({parts})"
    lo, hi, dtype = levels.get("input_min"), levels.get("input_max"), levels.get("dtype")
    if lo is None or hi is None or dtype is None:
        return head
    kind = np.dtype(dtype)
    of = f" of {np.iinfo(kind).max}" if kind.kind in "ui" else ""
    values = f"the images are {depth_text(dtype)} with values {lo}..{hi}{of}"
    if not hi > lo:
        return f"{head}: {values} (uniform): check the beam, detector and source"
    window = levels.get("window")
    explicit = f"--levels {lo},{hi}"
    if levels.get("mode") == AUTO and kind == np.uint8:
        hint = f"the source may be blank (beam, detector?); to stretch it anyway: {explicit}"
    elif levels.get("mode") == AUTO:
        hint = f"try {explicit}"
    else:
        hint = f"try --levels auto or {explicit}"
    used = "" if window is None else f", mapped with the window {window[0]}..{window[1]}"
    return f"{head}: {values}{used}; {hint}"
