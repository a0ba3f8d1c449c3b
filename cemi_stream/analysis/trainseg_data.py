"""Training data of ``train-segmenter``: labelled images from folders, labelme, the
virtual SEM or the classical detector, and the random crops drawn from them.

Every source gives :class:`SegSample` objects: a 2-D ``(y, x)`` grey image
and a bool ``(y, x)`` lamellar (foreground) mask of the same shape.
:class:`CropSampler` draws square crops of them with random flips and
rotations by 90 degrees (and a mild random contrast / inversion), from the
image normalised as a whole exactly as inference normalises a tile
(:func:`cemi_stream.analysis.segment.normalise_tile`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import AnalysisError
from .segment import normalise_tile

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"})
#: Suffixes of mask file stems matched to an image stem (``img.png`` <- ``img_label.png``).
MASK_STEM_SUFFIXES = ("", "_label", "_labels", "_mask", "_masks", "_annot", "-label", "-mask")


@dataclass(frozen=True)
class SegSample:
    """One labelled image.

    Attributes
    ----------
    image : ndarray
        ``(y, x)`` grey pixels (uint8, uint16 or float).
    mask : ndarray
        ``(y, x)`` bool foreground (lamellar) mask.
    name : str
        Where it came from (file stem, ``sim-0007``, ...).
    """

    image: np.ndarray
    mask: np.ndarray
    name: str


def read_grey(path: Path) -> np.ndarray:
    """A 2-D grey image (uint8/uint16 kept; colour converted), or :class:`AnalysisError`."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise AnalysisError(f"{path}: not a readable image")
    if image.ndim == 3:
        if image.shape[2] == 1:
            image = image[..., 0]
        else:
            code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
            image = cv2.cvtColor(image, code)
    return np.ascontiguousarray(image)


def _images_in(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise AnalysisError(f"{folder}: {what} folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise AnalysisError(f"{folder}: no images in the {what} folder")
    return files


def _mask_of(raw: np.ndarray, values: Sequence[int] | None) -> np.ndarray:
    if values is None:
        mask: np.ndarray = raw > 0
    else:
        mask = np.isin(raw, np.asarray(list(values)))
    return mask


def load_image_mask_dirs(
    images: Path,
    masks: Path,
    mask_values: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> list[SegSample]:
    """Images of one folder with their masks from another, matched by file stem.

    Parameters
    ----------
    images, masks : Path
        Folders.  A mask is the file of ``masks`` whose stem is the image's
        stem plus one of :data:`MASK_STEM_SUFFIXES` (``a.png`` <- ``a_label.png``).
    mask_values : sequence of int, optional
        Mask pixel values that are foreground; None: every non-zero value.
    names : sequence of str, optional
        Image stems to use (a split); None: all.

    Raises
    ------
    AnalysisError
        Missing folders, an image without a mask, a mask of another size, or
        a name not found.
    """
    image_files = _images_in(Path(images), "images")
    mask_files = {p.stem: p for p in _images_in(Path(masks), "masks")}
    if names is not None:
        wanted = set(names)
        missing = wanted - {p.stem for p in image_files}
        if missing:
            raise AnalysisError(f"{images}: no image named {sorted(missing)[0]!r}")
        image_files = [p for p in image_files if p.stem in wanted]
    out = []
    for path in image_files:
        mpath = next(
            (mask_files[path.stem + s] for s in MASK_STEM_SUFFIXES if path.stem + s in mask_files),
            None,
        )
        if mpath is None:
            raise AnalysisError(
                f"{path}: no mask for it in {masks} (expected "
                f"{path.stem}.png or {path.stem}_label.png ...)"
            )
        image = read_grey(path)
        raw = cv2.imread(str(mpath), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise AnalysisError(f"{mpath}: not a readable mask image")
        if raw.ndim == 3:
            raw = raw.max(axis=2)
        if raw.shape != image.shape:
            raise AnalysisError(
                f"{mpath}: mask is {raw.shape[1]}x{raw.shape[0]} px, its image "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        out.append(SegSample(image, _mask_of(raw, mask_values), path.stem))
    return out


def load_labelme(folder: Path, labels: Sequence[str] | None = None) -> list[SegSample]:
    """Every labelme JSON of ``folder`` (:func:`cemi_stream.analysis.labelme.read_labelme_dir`)."""
    from .labelme import read_labelme_dir

    return [SegSample(s.image, s.mask, s.path.stem) for s in read_labelme_dir(folder, labels)]


def load_sim(count: int, seed: int, size: int, start: int = 0) -> list[SegSample]:
    """Simulated specimens ``start ..`` (:func:`cemi_stream.analysis.simlabels.sim_samples`)."""
    from .simlabels import sim_samples

    return [
        SegSample(s.image, s.mask, f"sim-{start + i:05d}")
        for i, s in enumerate(sim_samples(count, seed, size, start))
    ]


def load_weak(
    folder: Path, names: Sequence[str] | None = None, fold: tuple[int, int] | None = None
) -> list[SegSample]:
    """Images of ``folder`` labelled by the classical detector (weak labels).

    Parameters
    ----------
    folder : Path
        Images, searched one level deep too (``folder/*/*.jpg``: class folders).
    names : sequence of str, optional
        File stems (or ``class/stem`` paths relative to ``folder``) to use.
    fold : (int, int), optional
        ``(i, k)``: in each sub-folder, the images at sorted positions ``i``,
        ``i + k``, ``i + 2k`` ... only (a split that keeps the classes'
        proportions; the others stay out for evaluation).
    """
    from .lamellae import lamellar_mask

    folder = Path(folder)
    if not folder.is_dir():
        raise AnalysisError(f"{folder}: weak-label image folder does not exist")
    files = sorted(
        p
        for p in [*folder.glob("*"), *folder.glob("*/*")]
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if names is not None:
        wanted = set(names)
        files = [p for p in files if p.stem in wanted or _rel(p, folder) in wanted]
    if fold is not None:
        i, k = fold
        if not 0 <= i < k:
            raise AnalysisError(f"--weak-fold {i}/{k}: expected I/K with 0 <= I < K")
        position: dict[Path, int] = {}
        kept = []
        for p in files:
            position[p.parent] = position.get(p.parent, -1) + 1
            if position[p.parent] % k == i:
                kept.append(p)
        files = kept
    if not files:
        raise AnalysisError(f"{folder}: no images to weak-label")
    out = []
    for path in files:
        image = read_grey(path)
        out.append(SegSample(image, lamellar_mask(image), f"weak-{_rel(path, folder)}"))
    return out


def _rel(path: Path, folder: Path) -> str:
    return path.relative_to(folder).with_suffix("").as_posix()


def split_names(names: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a random training / validation split (at least one of each when possible).

    Raises
    ------
    AnalysisError
        ``fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise AnalysisError(f"--val-fraction {fraction}: must be in [0, 1)")
    n = len(names)
    n_val = round(n * fraction)
    if fraction > 0 and n >= 2:
        n_val = min(max(1, n_val), n - 1)
    order = np.random.default_rng([seed, 0x5A1]).permutation(n)
    val = sorted(int(i) for i in order[:n_val])
    train = sorted(int(i) for i in order[n_val:])
    return train, val


def parse_fold(text: str | None) -> tuple[int, int] | None:
    """``"0/2"`` -> ``(0, 2)`` (``--weak-fold``); None or empty -> None."""
    if not text:
        return None
    try:
        i, k = (int(v) for v in text.split("/"))
    except ValueError:
        raise AnalysisError(f"--weak-fold {text!r}: expected I/K, e.g. 0/2") from None
    if not 0 <= i < k:
        raise AnalysisError(f"--weak-fold {text}: expected I/K with 0 <= I < K")
    return i, k


def parse_values(text: str | None) -> list[int] | None:
    """``"1,2"`` -> ``[1, 2]`` (mask values); None or empty -> None."""
    if not text:
        return None
    try:
        return [int(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    except ValueError:
        raise AnalysisError(f"--mask-values {text!r}: expected integers like 1,2") from None


# --------------------------------------------------------------------------- crops


class CropSampler:
    """Random square crops of labelled images, with flips, rot90 and mild contrast changes.

    Parameters
    ----------
    samples : sequence of SegSample
        Training images (any sizes; smaller than ``tile_px`` are padded by
        reflection).
    tile_px : int
        Crop side, px (a multiple of 32).
    crops_per_image : int
        Crops per image per epoch; 0: ``ceil(area / tile_px**2)`` for each.
    augment : bool
        Random flips / rot90 (always with ``augment``) plus contrast, offset
        and inversion of the normalised crop.
    """

    def __init__(
        self,
        samples: Sequence[SegSample],
        tile_px: int,
        crops_per_image: int = 0,
        augment: bool = True,
    ) -> None:
        if not samples:
            raise AnalysisError("no training images")
        if tile_px < 32 or tile_px % 32:
            raise AnalysisError(f"--tile {tile_px}: must be a positive multiple of 32")
        self.tile_px = int(tile_px)
        self.augment = augment
        self.names = [s.name for s in samples]
        self.images: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        for s in samples:
            if s.image.shape != s.mask.shape:
                raise AnalysisError(
                    f"{s.name}: mask {s.mask.shape} and image {s.image.shape} differ"
                )
            img: np.ndarray = normalise_tile(s.image)
            msk: np.ndarray = s.mask.astype(np.uint8)
            ph, pw = max(0, tile_px - img.shape[0]), max(0, tile_px - img.shape[1])
            if ph or pw:
                mode = (
                    cv2.BORDER_REFLECT_101
                    if ph < img.shape[0] and pw < img.shape[1]
                    else cv2.BORDER_REPLICATE
                )
                img = cv2.copyMakeBorder(img, 0, ph, 0, pw, mode)
                msk = cv2.copyMakeBorder(msk, 0, ph, 0, pw, mode)
            self.images.append(img)
            self.masks.append(msk)
        self.counts = [
            crops_per_image
            if crops_per_image > 0
            else max(1, int(np.ceil(im.size / float(tile_px * tile_px))))
            for im in self.images
        ]

    def __len__(self) -> int:
        return len(self.images)

    def epoch_size(self) -> int:
        """Crops per epoch."""
        return int(sum(self.counts))

    def epoch(self, seed: int, epoch: int, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The batches of one epoch: ``(x (B, 1, T, T) float32, y (B, 1, T, T) float32)``.

        Deterministic in ``(seed, epoch)``, so a resumed run sees the same data.
        """
        rng = np.random.default_rng([seed, epoch, 0xC0])
        order = np.repeat(np.arange(len(self.images)), self.counts)
        rng.shuffle(order)
        out = []
        for k in range(0, len(order), batch):
            xs, ys = zip(*(self._crop(int(i), rng) for i in order[k : k + batch]), strict=True)
            out.append((np.stack(xs)[:, None], np.stack(ys)[:, None]))
        return out

    def _crop(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        img, msk, t = self.images[i], self.masks[i], self.tile_px
        y0 = int(rng.integers(0, img.shape[0] - t + 1))
        x0 = int(rng.integers(0, img.shape[1] - t + 1))
        x = img[y0 : y0 + t, x0 : x0 + t]
        y = msk[y0 : y0 + t, x0 : x0 + t].astype(np.float32)
        if self.augment:
            k = int(rng.integers(4))
            x, y = np.rot90(x, k), np.rot90(y, k)
            if rng.uniform() < 0.5:
                x, y = x[:, ::-1], y[:, ::-1]
            gain = float(rng.uniform(0.7, 1.2))
            offset = float(rng.uniform(-0.2, 0.2))
            sign = -1.0 if rng.uniform() < 0.2 else 1.0
            x = np.clip(sign * gain * x + offset, -1.0, 1.0)
        return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.float32)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the model card."""
        return {
            "images": len(self.images),
            "tile_px": self.tile_px,
            "crops_per_epoch": self.epoch_size(),
            "augment": self.augment,
            "augmentations": [
                "random crop",
                "rot90",
                "flip",
                "contrast 0.7-1.2",
                "offset +-0.2",
                "inversion p=0.2",
            ]
            if self.augment
            else ["random crop"],
        }


__all__ = [
    "IMAGE_SUFFIXES",
    "CropSampler",
    "SegSample",
    "load_image_mask_dirs",
    "load_labelme",
    "load_sim",
    "load_weak",
    "parse_fold",
    "parse_values",
    "read_grey",
    "split_names",
]
