"""Lamellar segmentation of tiles: a trained U-Net++ or the classical detector.

:func:`load_segmenter` turns a ``--segmenter`` value into an object with
``name``, ``predict(tile, valid) -> bool (y, x)``, ``predict_many`` and
``describe()``:

* ``"classical"``: :func:`cemi_stream.analysis.lamellae.lamellar_mask`
  (no training, no torch);
* a shipped NAME (``models/weights/NAME.safetensors``, e.g.
  :data:`DEFAULT_SEGMENTER`), a PATH to a ``.safetensors`` file with its
  ``.json`` card, or a folder holding one (a ``train-segmenter`` output).

Inference with a model (:class:`ModelSegmenter`): the tile is normalised
once (:func:`normalise_tile`: 0.5-99.5 % of its valid grey levels to -1..1,
whatever the dtype), padded to multiples of 32 px (reflection) and the logits
cropped back; images larger than ``window_px`` are processed in overlapping
windows whose logits are blended with weights that taper linearly over the
overlap (so a window's border, where the network sees less context, counts
less).  A pixel is lamellar where its logit is > 0 (probability > 0.5) and
it is valid.

Thread safety: one model per ``(spec, device)`` and process (cached by
:func:`load_segmenter`); its forward passes are serialised by a lock, so
``predict`` may be called from several threads (Dask's threaded scheduler).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import AnalysisError, ModelError

log = logging.getLogger(__name__)

#: The shipped small lamellar model (``models/weights/``).
DEFAULT_SEGMENTER = "lamellar-unetpp-small"
#: The shipped phase segmenter (``analyze --method model``): gamma' of the superalloys.
DEFAULT_PHASE_MODEL = "phase-unetpp-small"
#: Card kinds: lamellar regions, and a phase (the dark one).
LAMELLAR_KIND = "lamellar-segmenter"
PHASE_KIND = "phase-segmenter"
CLASSICAL = "classical"
#: Default largest window processed in one forward pass, px (a multiple of 32).
WINDOW_PX = 1024
#: Default overlap of neighbouring windows, px.
OVERLAP_PX = 128
_TRAIN_HINT = "train one with `python run_daemon.py train-segmenter`"


class Segmenter(Protocol):
    """What ``analyze`` needs of a lamellar segmenter."""

    name: str

    def predict(self, tile: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Boolean ``(y, x)`` lamellar mask of a 2-D ``(y, x)`` tile."""
        ...

    def predict_many(
        self, tiles: Sequence[np.ndarray], valids: Sequence[np.ndarray | None] | None = None
    ) -> list[np.ndarray]:
        """:meth:`predict` of each tile."""
        ...

    def describe(self) -> dict[str, Any]:
        """``name``, ``sha256`` (None for the classical detector), ``encoder`` and more."""
        ...


# --------------------------------------------------------------------------- input


def check_tile(tile: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate a tile (2-D, numeric; ``(y, x, 1)`` squeezed) and its valid mask.

    Raises
    ------
    AnalysisError
        Not an array, not 2-D, not numeric, empty, or a mask of another shape.
    """
    arr = np.asarray(tile)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.size == 0:
        raise AnalysisError(f"tile: expected a non-empty 2-D (y, x) grey image, got {arr.shape}")
    if arr.dtype.kind not in "uif" and arr.dtype != bool:
        raise AnalysisError(f"tile: expected numeric pixels, got dtype {arr.dtype}")
    if valid is None:
        return arr, None
    vm = np.asarray(valid)
    if vm.shape != arr.shape:
        raise AnalysisError(f"valid: mask of shape {vm.shape} does not match the tile {arr.shape}")
    return arr, vm.astype(bool, copy=False)


def normalise_tile(tile: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Grey levels to the network's input range, independent of the dtype.

    Parameters
    ----------
    tile : ndarray
        2-D ``(y, x)`` uint8, uint16, int or float pixels.
    valid : ndarray, optional
        Boolean ``(y, x)`` specimen pixels: the levels come from them only,
        and the others are set to 0 (mid grey).

    Returns
    -------
    ndarray of float32
        ``(y, x)``: the 0.5 % .. 99.5 % percentiles of the valid pixels map to
        -1 .. 1 (clipped there); a flat tile gives zeros.
    """
    arr, vm = check_tile(tile, valid)
    data = arr.astype(np.float32, copy=False)
    sample = data if data.size <= 1 << 18 else data[::2, ::2]
    if vm is not None:
        sample = data[vm] if data.size <= 1 << 18 else data[::2, ::2][vm[::2, ::2]]
        if sample.size < 16:
            sample = data[vm]
    if sample.size == 0:
        return np.zeros(arr.shape, np.float32)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return np.zeros(arr.shape, np.float32)
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if not hi > lo:
        return np.zeros(arr.shape, np.float32)
    out = (data - np.float32(lo)) * np.float32(2.0 / (hi - lo)) - np.float32(1.0)
    np.clip(out, -1.0, 1.0, out=out)
    out[~np.isfinite(out)] = 0.0
    if vm is not None:
        out[~vm] = 0.0
    result: np.ndarray = out.astype(np.float32, copy=False)
    return result


# --------------------------------------------------------------------------- windows


def _starts(length: int, window: int, overlap: int) -> list[int]:
    if length <= window:
        return [0]
    step = window - overlap
    starts = list(range(0, length - window, step))
    starts.append(length - window)
    return starts


def _ramp(n: int, taper_lo: bool, taper_hi: bool, overlap: int) -> np.ndarray:
    """1-D blending weights of a window: linear over ``overlap`` px at tapered ends."""
    w = np.ones(n, np.float32)
    if overlap <= 0:
        return w
    ramp = (np.arange(n, dtype=np.float32) + 0.5) / np.float32(overlap)
    if taper_lo:
        w = np.minimum(w, ramp)
    if taper_hi:
        w = np.minimum(w, ramp[::-1])
    return w


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
    """Pad the bottom/right of ``(..., y, x)`` to multiples of ``multiple`` (reflection).

    Reflection needs the padding to be shorter than the side; otherwise the
    edge is replicated.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    pad = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
    if ph < h and pw < w:
        out: np.ndarray = np.pad(x, pad, mode="reflect")
    else:
        out = np.pad(x, pad, mode="edge")
    return out


def windowed_logits(
    forward: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    *,
    window_px: int = WINDOW_PX,
    overlap_px: int = OVERLAP_PX,
    multiple: int = 32,
) -> np.ndarray:
    """Logits of a whole normalised image from a network that takes padded windows.

    Parameters
    ----------
    forward : callable
        Maps a float32 ``(N, 1, H, W)`` batch (``H``, ``W`` multiples of
        ``multiple``) to ``(N, 1, H, W)`` logits.
    image : ndarray
        ``(y, x)`` float32, already normalised (:func:`normalise_tile`).
    window_px : int
        Largest window side, px (rounded down to a multiple of ``multiple``).
    overlap_px : int
        Overlap of neighbouring windows, px (less than ``window_px``; unused
        when the image fits in one window).
    multiple : int
        Side multiple the network needs (32 for encoder depth 5).

    Returns
    -------
    ndarray of float32
        ``(y, x)`` logits, the image's shape: a single padded pass when the
        image fits in one window, else the blend of overlapping windows.
    """
    window = max(multiple, (int(window_px) // multiple) * multiple)
    overlap = int(overlap_px)
    h, w = image.shape
    if h <= window and w <= window:
        padded = pad_to_multiple(image, multiple)[None, None]
        out: np.ndarray = forward(np.ascontiguousarray(padded))[0, 0, :h, :w]
        return out.astype(np.float32, copy=False)
    if not 0 <= overlap < window:
        raise AnalysisError(f"overlap_px {overlap_px}: must be >= 0 and below window {window}")
    ys, xs = _starts(h, window, overlap), _starts(w, window, overlap)
    acc = np.zeros((h, w), np.float32)
    weight = np.zeros((h, w), np.float32)
    for iy, y0 in enumerate(ys):
        wh = min(window, h - y0)
        ry = _ramp(wh, iy > 0, iy < len(ys) - 1, overlap)
        for ix, x0 in enumerate(xs):
            ww = min(window, w - x0)
            rx = _ramp(ww, ix > 0, ix < len(xs) - 1, overlap)
            crop = image[y0 : y0 + wh, x0 : x0 + ww]
            padded = pad_to_multiple(crop, multiple)[None, None]
            logits = forward(np.ascontiguousarray(padded))[0, 0, :wh, :ww]
            wgt = ry[:, None] * rx[None, :]
            acc[y0 : y0 + wh, x0 : x0 + ww] += logits * wgt
            weight[y0 : y0 + wh, x0 : x0 + ww] += wgt
    result: np.ndarray = acc / weight
    return result


# --------------------------------------------------------------------------- segmenters


class ClassicalSegmenter:
    """The structure-tensor / local-spectrum detector as a :class:`Segmenter`."""

    name = CLASSICAL

    def predict(self, tile: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """:func:`~cemi_stream.analysis.lamellae.lamellar_mask` with its defaults."""
        from .lamellae import lamellar_mask

        arr, vm = check_tile(tile, valid)
        mask: np.ndarray = lamellar_mask(arr, vm)
        return mask

    def predict_many(
        self, tiles: Sequence[np.ndarray], valids: Sequence[np.ndarray | None] | None = None
    ) -> list[np.ndarray]:
        """:meth:`predict` of each tile."""
        vs = list(valids) if valids is not None else [None] * len(tiles)
        if len(vs) != len(tiles):
            raise AnalysisError(f"predict_many: {len(tiles)} tiles but {len(vs)} valid masks")
        return [self.predict(t, v) for t, v in zip(tiles, vs, strict=True)]

    def describe(self) -> dict[str, Any]:
        """Name and kind; no weights."""
        return {"name": CLASSICAL, "kind": "classical", "sha256": None, "encoder": None}


class ModelSegmenter:
    """A trained U-Net++ (:mod:`models.unetpp`) as a :class:`Segmenter`.

    Parameters
    ----------
    model : torch.nn.Module
        The network, in eval mode on ``device``.
    card : models.weights.ModelCard
        Its card (``kind`` lamellar-segmenter).
    path : Path or None
        The weights file (for ``describe``'s sha256); None for an unsaved model.
    device : str
        ``"cpu"`` or ``"cuda"``.
    window_px, overlap_px : int
        Windowing of large images (see :func:`windowed_logits`).
    """

    def __init__(
        self,
        model: Any,
        card: Any,
        path: Path | None = None,
        device: str = "cpu",
        *,
        window_px: int = WINDOW_PX,
        overlap_px: int = OVERLAP_PX,
    ) -> None:
        from models.unetpp import size_multiple

        self.model = model
        self.card = card
        self.path = Path(path) if path is not None else None
        self.device = device
        self.name = str(card.name)
        self.multiple = max(32, size_multiple(card.arch))
        self.window_px = int(window_px)
        self.overlap_px = int(overlap_px)
        self._lock = threading.Lock()
        self._sha256: str | None = None

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with self._lock, torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            out: np.ndarray = self.model(x).float().cpu().numpy()
        return out

    def logits(self, tile: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Float32 ``(y, x)`` lamellar logits of a tile (before the valid mask)."""
        image = normalise_tile(tile, valid)
        return windowed_logits(
            self._forward,
            image,
            window_px=self.window_px,
            overlap_px=self.overlap_px,
            multiple=self.multiple,
        )

    def probability(self, tile: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Float32 ``(y, x)`` lamellar probability in 0..1 (0 outside ``valid``)."""
        _, vm = check_tile(tile, valid)
        logits = np.clip(self.logits(tile, valid), -60.0, 60.0)
        prob: np.ndarray = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        if vm is not None:
            prob[~vm] = 0.0
        return prob

    def predict(self, tile: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Boolean ``(y, x)`` lamellar mask: logit > 0 and valid."""
        _, vm = check_tile(tile, valid)
        mask: np.ndarray = self.logits(tile, valid) > 0.0
        if vm is not None:
            mask &= vm
        return mask

    def predict_many(
        self,
        tiles: Sequence[np.ndarray],
        valids: Sequence[np.ndarray | None] | None = None,
        batch: int = 8,
    ) -> list[np.ndarray]:
        """:meth:`predict` of each tile; same-shaped tiles that fit a window go in batches."""
        vs = list(valids) if valids is not None else [None] * len(tiles)
        if len(vs) != len(tiles):
            raise AnalysisError(f"predict_many: {len(tiles)} tiles but {len(vs)} valid masks")
        checked = [check_tile(t, v) for t, v in zip(tiles, vs, strict=True)]
        out: list[np.ndarray | None] = [None] * len(tiles)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (arr, _) in enumerate(checked):
            if max(arr.shape) <= self.window_px:
                groups.setdefault(arr.shape, []).append(i)
            else:
                out[i] = self.predict(*checked[i])
        for (h, w), idx in groups.items():
            for k in range(0, len(idx), max(1, batch)):
                part = idx[k : k + max(1, batch)]
                stack = np.stack([normalise_tile(*checked[i]) for i in part])[:, None]
                logits = self._forward(np.ascontiguousarray(pad_to_multiple(stack, self.multiple)))
                for j, i in enumerate(part):
                    mask = logits[j, 0, :h, :w] > 0.0
                    vm = checked[i][1]
                    out[i] = mask & vm if vm is not None else mask
        return [m for m in out if m is not None]

    def describe(self) -> dict[str, Any]:
        """Name, kind, sha256 of the weights, encoder, arch, windowing and card metrics."""
        from models.weights import model_hash

        if self._sha256 is None and self.path is not None:
            self._sha256 = model_hash(self.path)
        return {
            "name": self.name,
            "kind": self.card.kind,
            "sha256": self._sha256,
            "encoder": self.card.arch.get("encoder"),
            "arch": dict(self.card.arch),
            "path": str(self.path) if self.path is not None else None,
            "device": self.device,
            "window_px": self.window_px,
            "overlap_px": self.overlap_px,
            "threshold": 0.5,
            "metrics": dict(self.card.metrics),
        }


# --------------------------------------------------------------------------- loading

_CACHE: dict[tuple[str, str, str], Segmenter] = {}
_CACHE_LOCK = threading.Lock()


def resolve_segmenter(spec: str | Path | None, kind: str = LAMELLAR_KIND) -> Path:
    """The ``.safetensors`` file of a segmenter NAME / PATH / folder (None: the default).

    ``kind`` picks the default: :data:`DEFAULT_SEGMENTER` for lamellar regions,
    :data:`DEFAULT_PHASE_MODEL` for :data:`PHASE_KIND`.

    Raises
    ------
    ModelError
        Nothing matches (the message lists the shipped models).
    """
    from models.zoo import resolve_model

    default = DEFAULT_PHASE_MODEL if kind == PHASE_KIND else DEFAULT_SEGMENTER
    return resolve_model(spec, default=default, train_hint=_TRAIN_HINT)


def _check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ModelError(f"device {device!r}: choose cpu or cuda")
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ModelError(f"device {device}: no CUDA GPU is available to torch (use cpu)")
    return str(device)


def load_segmenter(
    spec: str | Path | None = None, device: str = "cpu", kind: str = LAMELLAR_KIND
) -> Segmenter:
    """The segmenter ``spec`` names, loaded once per process and device.

    Parameters
    ----------
    spec : str, Path or None
        ``"classical"``; a shipped model name; a ``.safetensors`` path (its
        ``.json`` card beside it) or a folder holding one; None: the shipped
        default :data:`DEFAULT_SEGMENTER`.
    device : str
        ``"cpu"`` or ``"cuda"`` (a model's device; the classical detector
        always runs on the CPU).
    kind : str
        :data:`LAMELLAR_KIND` (the default) or :data:`PHASE_KIND`; a model
        whose card says another kind is refused.

    Returns
    -------
    Segmenter
        :class:`ClassicalSegmenter` or :class:`ModelSegmenter` (cached: the
        same object for the same file and device).

    Raises
    ------
    ModelError
        Unknown name, missing or corrupt file, a card of another kind of
        model, weights that do not fit their card, or no CUDA (one line).
    """
    if kind not in (LAMELLAR_KIND, PHASE_KIND):
        raise ModelError(f"segmenter kind {kind!r}: choose {LAMELLAR_KIND} or {PHASE_KIND}")
    if spec is not None and str(spec) == CLASSICAL and kind == LAMELLAR_KIND:
        key = (CLASSICAL, "cpu", kind)
        with _CACHE_LOCK:
            if key not in _CACHE:
                _CACHE[key] = ClassicalSegmenter()
            return _CACHE[key]
    if spec is not None and str(spec) == "none":
        raise ModelError("segmenter 'none': no segmenter to load (lamellar measures are off)")
    device = _check_device(device)
    path = resolve_segmenter(spec, kind).resolve()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model file ({exc})") from None
    key = (f"{path}@{stamp}", device, kind)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is None:
            from models.unetpp import load_segmenter_model

            model, card = load_segmenter_model(path, device, kind)
            cached = ModelSegmenter(model, card, path, device)
            _CACHE[key] = cached
            log.info("%s %s loaded from %s on %s", kind, card.name, path, device)
        return cached


def clear_cache() -> None:
    """Forget the loaded segmenters (tests; after replacing a model file in place)."""
    with _CACHE_LOCK:
        _CACHE.clear()


__all__ = [
    "CLASSICAL",
    "DEFAULT_PHASE_MODEL",
    "DEFAULT_SEGMENTER",
    "LAMELLAR_KIND",
    "OVERLAP_PX",
    "PHASE_KIND",
    "WINDOW_PX",
    "ClassicalSegmenter",
    "ModelSegmenter",
    "Segmenter",
    "check_tile",
    "clear_cache",
    "load_segmenter",
    "normalise_tile",
    "pad_to_multiple",
    "resolve_segmenter",
    "windowed_logits",
]
