"""Running a trained denoiser on frames and image files.

:class:`Denoiser` loads a model (a name from the model zoo, a ``.safetensors``
file or a training run's folder, see :func:`models.zoo.resolve_model`) and
runs it on 8-bit grey frames through one of the backends of
:mod:`cemi_stream.denoise.backends`.  A frame is scaled to [0, 1],
reflect-padded to multiples of 4 px, run whole or in overlapping feathered
tiles (:mod:`cemi_stream.denoise.tiling`), cropped back, clipped and rounded.

:func:`denoise_files` is the ``denoise`` command: it denoises an image or a
folder of images into another folder, passing data bars and UI borders
through untouched.

Images are 2-D ``uint8`` arrays with axes ``(y, x)``; network tensors are
``(N, 1, H, W)`` float32 in [0, 1].
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..capture.crop import detect_crop
from ..errors import CemiError, ConfigError, DenoiseError
from ..progress import Progress
from .backends import BACKENDS, Backend, BackendOptions, create_backend, resolve_backend_name
from .tiling import TileBlender, TileBox, pad_to_multiple, tile_boxes

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "IMAGE_SUFFIXES",
    "Denoiser",
    "denoise_files",
    "list_images",
    "read_image",
    "write_image",
]

#: File suffixes :func:`denoise_files` reads (case-insensitive).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")

# RRDBNet at scale 1 folds 4 x 4 pixel blocks into channels.
_MULTIPLE = 4
# Default frames per backend call: batching pays on a GPU; on a CPU it only
# raises memory use (the paper arch needs ~1 GB per 1024 x 768 frame).
_GPU_BATCH = 4
_CPU_BATCH = 1


def as_gray(image: Any, what: str = "image") -> np.ndarray:
    """Check a frame and return it as a 2-D ``uint8`` array ``(y, x)``.

    Accepts ``(y, x)`` uint8, ``(y, x, 1)``, and ``(y, x, 3 | 4)`` whose colour
    channels are all equal (a grey image saved as RGB; alpha is ignored).

    Raises
    ------
    DenoiseError
        Not an array, empty, not uint8, or a colour image whose channels differ.
    """
    if not isinstance(image, np.ndarray):
        raise DenoiseError(f"{what}: expected a numpy array, got {type(image).__name__}")
    if image.size == 0:
        raise DenoiseError(f"{what}: empty image {image.shape}")
    if image.dtype != np.uint8:
        raise DenoiseError(f"{what}: expected an 8-bit (uint8) grey image, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        rgb = image[:, :, :3]
        if np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(
            rgb[:, :, 0], rgb[:, :, 2]
        ):
            return np.ascontiguousarray(rgb[:, :, 0])
        raise DenoiseError(f"{what}: colour image (its channels differ); expected a grey image")
    raise DenoiseError(f"{what}: expected a 2-D grey image (y, x), got shape {image.shape}")


class Denoiser:
    """A loaded denoiser model on one backend.

    Parameters
    ----------
    model : str, Path or None
        Model name in the zoo, ``.safetensors`` file or run folder; ``None``
        is the default model (:data:`models.zoo.DEFAULT_MODEL`).
    backend : str
        One of :data:`BACKENDS`; ``"auto"`` picks the fastest available
        (:func:`cemi_stream.denoise.backends.auto_backend`).
    tile_px : int
        0: run whole frames; else the side of square tiles in pixels (a
        multiple of 4), for frames that do not fit the device's memory.
    overlap_px : int
        Overlap of neighbouring tiles in pixels, ``0 <= overlap_px <
        tile_px``, blended with feathered weights
        (:class:`~cemi_stream.denoise.tiling.TileBlender`).  The network sees
        too little context near a tile's edge; with 32 px a random-initialised
        compact net agrees with whole-frame output to ~1e-4 beyond 16 px from
        any tile edge (see the tests); a trained network sees farther and may
        need more.
    cache_dir : Path, optional
        Root of the ONNX / TensorRT caches (default ``$CEMI_CACHE`` or
        ``~/.cache/cemi-stream``).
    batch_size : int, optional
        Frames (or tiles) per backend call; default 4 on a GPU, 1 on a CPU.
    precision : {"fp16", "bf16", "fp32"}
        Arithmetic of the cuda backend.
    torch_compile : bool
        Use ``torch.compile`` in the cuda backend.

    Attributes
    ----------
    backend : str
        The backend actually used (``"auto"`` resolved).
    model_path : Path
        The weights file.
    card : models.weights.ModelCard
        The model's card.

    Raises
    ------
    ConfigError
        Unknown backend name, or bad tile / overlap / batch settings.
    ModelError
        The model is missing or its files are corrupt.
    DenoiseError
        The backend cannot run here (package or device missing).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        backend: str = "auto",
        *,
        tile_px: int = 0,
        overlap_px: int = 32,
        cache_dir: Path | None = None,
        batch_size: int | None = None,
        precision: str = "fp16",
        torch_compile: bool = False,
    ) -> None:
        try:
            from models.weights import load_model
            from models.zoo import resolve_model
        except ImportError as exc:
            raise DenoiseError(
                f"denoiser: {exc.name or 'torch'} is not installed (pip install -e .[ml])"
            ) from None

        if tile_px < 0 or tile_px % _MULTIPLE:
            raise ConfigError(
                f"tile size {tile_px} px: expected 0 (whole frames) or a positive multiple of 4"
            )
        if tile_px and not 0 <= overlap_px < tile_px:
            raise ConfigError(
                f"tile overlap {overlap_px} px: expected 0 <= overlap < tile size ({tile_px} px)"
            )
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch size: expected at least 1, got {batch_size}")
        name = resolve_backend_name(backend)  # a bad name fails before any loading
        if batch_size is None:
            batch_size = _GPU_BATCH if name in ("cuda", "tensorrt") else _CPU_BATCH
        options = BackendOptions(precision=precision, compile=torch_compile, max_batch=batch_size)
        self.tile_px = tile_px
        self.overlap_px = overlap_px
        self.batch_size = batch_size
        self.model_path: Path = resolve_model(model)
        net, self.card = load_model(self.model_path)
        self._backend: Backend = create_backend(
            name, net, self.model_path, self.card, cache_dir, options
        )
        self.backend: str = self._backend.name
        log.info(
            "denoiser %s (%s) on %s, %s",
            self.card.name,
            self.model_path,
            self.backend,
            f"tiles {tile_px} px, overlap {overlap_px} px" if tile_px else "whole frames",
        )

    def __repr__(self) -> str:
        return (
            f"Denoiser(model={self.card.name!r}, backend={self.backend!r}, tile_px={self.tile_px})"
        )

    def denoise(self, image: np.ndarray) -> np.ndarray:
        """Denoise one frame.

        Parameters
        ----------
        image : ndarray
            ``uint8`` frame ``(y, x)`` (or RGB with equal channels).

        Returns
        -------
        ndarray
            ``uint8`` frame ``(y, x)`` of the same height and width.

        Raises
        ------
        DenoiseError
            ``image`` is not an 8-bit grey image.
        """
        return _to_uint8(self.denoise_float(image))

    def denoise_float(self, image: np.ndarray) -> np.ndarray:
        """Denoise one frame without clipping or rounding.

        Returns
        -------
        ndarray
            float32 ``(y, x)``; 1.0 is grey level 255, values may leave [0, 1].
        """
        return self._denoise_group([as_gray(image)])[0]

    def denoise_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Denoise several frames; frames of equal size share backend calls.

        Parameters
        ----------
        images : sequence of ndarray
            ``uint8`` frames ``(y, x)``, of any sizes.

        Returns
        -------
        list of ndarray
            ``uint8`` frames, in the order given.
        """
        return [_to_uint8(out) for out in self.denoise_batch_float(images)]

    def denoise_batch_float(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """:meth:`denoise_batch` without clipping or rounding (float32, 1.0 = 255)."""
        frames = [as_gray(image, f"image {i}") for i, image in enumerate(images)]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, frame in enumerate(frames):
            groups.setdefault((frame.shape[0], frame.shape[1]), []).append(i)
        results: list[np.ndarray | None] = [None] * len(frames)
        for indices in groups.values():
            outputs = self._denoise_group([frames[i] for i in indices])
            for i, out in zip(indices, outputs, strict=True):
                results[i] = out
        return [r for r in results if r is not None]

    def _denoise_group(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Denoise frames of one size: float32 outputs ``(y, x)``, 1.0 = 255."""
        stack = np.stack(frames).astype(np.float32) / np.float32(255.0)
        padded, (height, width) = pad_to_multiple(stack, _MULTIPLE)
        ph, pw = padded.shape[1:]
        if not self.tile_px or (ph <= self.tile_px and pw <= self.tile_px):
            out = self._run_batches(padded[:, None])[:, 0]
            return [np.ascontiguousarray(o[:height, :width]) for o in out]
        boxes = tile_boxes((ph, pw), self.tile_px, self.overlap_px, align=_MULTIPLE)
        jobs: list[tuple[int, TileBox]] = [(f, box) for f in range(len(frames)) for box in boxes]
        blenders = [TileBlender((ph, pw), self.overlap_px) for _ in frames]
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start : start + self.batch_size]
            tiles = np.stack([padded[f][box.slices] for f, box in chunk])[:, None]
            for (f, box), tile_out in zip(chunk, self._backend.run(tiles)[:, 0], strict=True):
                blenders[f].add(box, tile_out)
        return [np.ascontiguousarray(b.result()[:height, :width]) for b in blenders]

    def _run_batches(self, batch: np.ndarray) -> np.ndarray:
        """Run ``batch`` (N, 1, H, W) through the backend ``batch_size`` at a time."""
        parts = [
            self._backend.run(np.ascontiguousarray(batch[i : i + self.batch_size]))
            for i in range(0, batch.shape[0], self.batch_size)
        ]
        out = np.concatenate(parts)
        if out.shape != batch.shape:
            raise DenoiseError(
                f"{self.backend} backend: output shape {out.shape} != input shape {batch.shape}"
            )
        return out


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image * 255.0, 0.0, 255.0)).astype(np.uint8)


# --- files ---------------------------------------------------------------------


def _natural_key(path: Path) -> list[Any]:
    """Sort key: digit runs compare as numbers (``f2`` before ``f10``)."""
    parts = re.split(r"(\d+)", path.name.lower())
    return [int(p) if p.isdigit() else p for p in parts]


def list_images(input: Path) -> list[Path]:
    """The images ``input`` names: itself, or a folder's images in natural order.

    Raises
    ------
    DenoiseError
        ``input`` does not exist, is a file without an image suffix
        (:data:`IMAGE_SUFFIXES`), or a folder holding no images.
    """
    input = Path(input)
    if input.is_file():
        if input.suffix.lower() not in IMAGE_SUFFIXES:
            raise DenoiseError(f"{input}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
        return [input]
    if input.is_dir():
        files = [p for p in input.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DenoiseError(f"{input}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return sorted(files, key=_natural_key)
    raise DenoiseError(f"{input}: no such file or folder")


def read_image(path: Path) -> np.ndarray:
    """Read an 8-bit grey image file as ``uint8`` ``(y, x)``.

    TIFF files are read with tifffile (first page), others with OpenCV.

    Raises
    ------
    DenoiseError
        Unreadable, not an image, not 8-bit, or colour with differing channels;
        the one-line message names the file.
    """
    path = Path(path)
    image: np.ndarray | None
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            image = np.asarray(tifffile.imread(path, key=0))
        else:
            # imdecode on the bytes: cv2.imread fails silently on some paths.
            image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    except Exception as exc:  # tifffile and OS errors come in many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DenoiseError(f"{path}: cannot read image ({reason})") from None
    if image is None:
        raise DenoiseError(f"{path}: cannot read image (not a valid image file)")
    if image.dtype != np.uint8 and image.size:
        raise DenoiseError(f"{path}: {image.dtype} image; only 8-bit grey images are supported")
    return as_gray(image, str(path))


def write_image(path: Path, image: np.ndarray) -> None:
    """Write an 8-bit grey image; the format follows the suffix.

    TIFF with tifffile, other formats with OpenCV's encoder.

    Raises
    ------
    DenoiseError
        The image could not be encoded or written (never silently skipped).
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(path, image)
            return
        ok, data = cv2.imencode(path.suffix, image)
        if not ok:
            raise DenoiseError(f"{path}: cannot encode the image as {path.suffix}")
        path.write_bytes(data.tobytes())
    except DenoiseError:
        raise
    except Exception as exc:  # OSError, tifffile and cv2 errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DenoiseError(f"{path}: cannot write image ({reason})") from None


def denoise_files(
    input: Path,
    out_dir: Path,
    model: str | Path | None = None,
    backend: str = "auto",
    tile_px: int = 0,
    progress: bool = True,
    *,
    overlap_px: int = 32,
    cache_dir: Path | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Denoise an image or a folder of images into ``out_dir`` (the ``denoise`` command).

    Each output has the input's file name, size and format, 8-bit grey.  A
    data bar and UI border found by :func:`cemi_stream.capture.crop.detect_crop`
    are copied through untouched; only the image area is denoised and pasted
    back.  Processing stops at the first file that cannot be read or written
    (:class:`DenoiseError` naming it); outputs written before it are kept.

    Parameters
    ----------
    input : Path
        An image file or a folder (its images, in natural order; suffixes
        :data:`IMAGE_SUFFIXES`; subfolders are not searched).
    out_dir : Path
        Output folder (created); must not be the input's folder.
    model, backend, tile_px, overlap_px, cache_dir, batch_size
        As for :class:`Denoiser`.
    progress : bool
        Show a progress counter (:class:`cemi_stream.progress.Progress`).

    Returns
    -------
    dict
        ``count`` (files written), ``backend``, ``model`` (name), ``model_path``,
        ``seconds`` (wall time, all of it), ``load_seconds`` (of which model
        loading and export), ``frames_per_s`` (read + denoise + write, after
        loading),
        ``databar_frames`` (files whose bar or border was passed through),
        ``out_dir``.

    Raises
    ------
    DenoiseError
        Missing input, no images, an unreadable image, a failed write, or
        ``out_dir`` equal to the input folder.
    ConfigError, ModelError
        Bad options; missing or corrupt model.
    """
    started = time.monotonic()
    files = list_images(Path(input))
    out_dir = Path(out_dir)
    source_dir = Path(input) if Path(input).is_dir() else Path(input).parent
    if out_dir.exists() and out_dir.resolve() == source_dir.resolve():
        raise DenoiseError(f"{out_dir}: output folder is the input folder; choose another")
    denoiser = Denoiser(
        model,
        backend,
        tile_px=tile_px,
        overlap_px=overlap_px,
        cache_dir=cache_dir,
        batch_size=batch_size,
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DenoiseError(f"{out_dir}: cannot create the output folder ({exc})") from None
    loaded = time.monotonic()
    bar = Progress("denoise", total=len(files), enabled=progress, unit="images")
    done = 0
    with_bar = 0
    for start in range(0, len(files), denoiser.batch_size):
        chunk = files[start : start + denoiser.batch_size]
        frames = [read_image(path) for path in chunk]
        areas = []
        rects = []
        for path, frame in zip(chunk, frames, strict=True):
            try:
                rect = detect_crop(frame).rect
            except CemiError as exc:  # detection needs a 2-D uint8 frame; checked above
                raise DenoiseError(f"{path}: cannot find the image area ({exc})") from None
            rects.append(rect)
            areas.append(rect.apply(frame))
        for path, frame, rect, clean in zip(
            chunk, frames, rects, denoiser.denoise_batch(areas), strict=True
        ):
            out = frame.copy()
            out[rect.y : rect.y + rect.height, rect.x : rect.x + rect.width] = clean
            if clean.shape != frame.shape:
                with_bar += 1
            write_image(out_dir / path.name, out)
            done += 1
        bar.update(done)
    bar.close()
    finished = time.monotonic()
    summary = {
        "count": done,
        "backend": denoiser.backend,
        "model": denoiser.card.name,
        "model_path": str(denoiser.model_path),
        "seconds": round(finished - started, 3),
        "load_seconds": round(loaded - started, 3),
        "frames_per_s": round(done / max(finished - loaded, 1e-9), 3),
        "databar_frames": with_bar,
        "out_dir": str(out_dir),
    }
    log.info("denoised %d images into %s (%s)", done, out_dir, summary)
    return summary
