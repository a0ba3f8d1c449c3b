"""Training patch samplers for the denoiser.

Each sampler draws a batch of square patches from whole images and returns
``(input, target)`` tensors ``(N, 1, P, P)`` float32 in ``[0, 1]``:

- :class:`PairPatches`: real LD/HD pairs (already aligned by
  :func:`cemi_stream.denoise.pairs.align_pair`), cropped at the same place in
  both images (the paper's SEMNET/SEMGAN training data);
- :class:`SyntheticPatches`: HD images only; the LD input is made on the fly
  from the HD crop by :func:`cemi_stream.denoise.degrade.degrade` (the paper's
  "only HD images are available" case);
- :class:`NoisyPatches`: LD frames only, for self-supervised
  Neighbor2Neighbor training; the target is ``None``.

Every patch gets one of the 8 flips/quarter turns at random (SEM noise and
microstructure have no preferred orientation).  All randomness comes from one
:class:`numpy.random.Generator` per sampler, seeded at construction; its state
can be saved and restored (:meth:`PatchSampler.get_state`) so a resumed
training run draws the same patches as an uninterrupted one.

Patch sides must be multiples of 8: the U-Net discriminator halves the patch
three times, and Neighbor2Neighbor halves it once before the generator, which
needs sides that are multiples of 4.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DenoiseError
from .degrade import DegradeConfig, degrade
from .pairs import AlignedPair

log = logging.getLogger(__name__)

PATCH_MULTIPLE = 8


def check_patch_px(patch_px: int) -> int:
    """Validate a patch side in pixels (positive multiple of 8).

    Raises
    ------
    ConfigError
        If ``patch_px`` is not a positive multiple of :data:`PATCH_MULTIPLE`.
    """
    if isinstance(patch_px, bool) or not isinstance(patch_px, int | np.integer):
        raise ConfigError(f"patch size: expected an integer number of pixels, got {patch_px!r}")
    if patch_px < PATCH_MULTIPLE or patch_px % PATCH_MULTIPLE:
        raise ConfigError(
            f"patch size {patch_px} px: must be a positive multiple of {PATCH_MULTIPLE} "
            "(the discriminator and Neighbor2Neighbor halve it)"
        )
    return int(patch_px)


def _check_images(images: Sequence[np.ndarray], patch_px: int, what: str) -> list[np.ndarray]:
    if len(images) == 0:
        raise DenoiseError(f"{what}: no images to sample patches from")
    out = []
    for i, image in enumerate(images):
        if image.ndim != 2:
            raise DenoiseError(f"{what} image {i}: expected a 2-D grey image, got {image.shape}")
        if image.shape[0] < patch_px or image.shape[1] < patch_px:
            raise DenoiseError(
                f"{what} image {i}: {image.shape[1]} x {image.shape[0]} px is smaller than "
                f"the {patch_px} px patch"
            )
        out.append(image)
    return out


def _to_unit_float(patch: np.ndarray) -> np.ndarray:
    """uint8 (or float in [0, 1]) -> float32 in [0, 1]."""
    if patch.dtype == np.uint8:
        return patch.astype(np.float32) / 255.0
    return np.clip(patch.astype(np.float32), 0.0, 1.0)


def _augment(patches: list[np.ndarray], k: int, flip: bool) -> list[np.ndarray]:
    """Apply the same quarter turns and horizontal flip to every patch."""
    out = []
    for p in patches:
        q = np.rot90(p, k) if k else p
        if flip:
            q = q[:, ::-1]
        out.append(np.ascontiguousarray(q))
    return out


def _batch_tensor(patches: list[np.ndarray]) -> torch.Tensor:
    """List of (P, P) float32 arrays -> (N, 1, P, P) tensor."""
    return torch.from_numpy(np.stack(patches)[:, None]).contiguous()


class PatchSampler:
    """Base class: seeded random crops with flips/quarter turns.

    Parameters
    ----------
    patch_px : int
        Patch side in pixels (multiple of 8).
    seed : int
        Seed of the sampler's random generator.
    """

    #: Whether :meth:`sample` returns a target (False for self-supervised data).
    has_target: bool = True

    def __init__(self, patch_px: int, seed: int = 0) -> None:
        self.patch_px = check_patch_px(patch_px)
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)

    def __len__(self) -> int:
        """Number of source images."""
        raise NotImplementedError

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw ``batch`` patches.

        Returns
        -------
        input, target : Tensor
            ``(batch, 1, P, P)`` float32 in ``[0, 1]``; ``target`` is ``None``
            for samplers without a clean target.
        """
        if batch < 1:
            raise ConfigError(f"batch size {batch}: must be at least 1")
        inputs, targets = [], []
        for _ in range(batch):
            inp, tgt = self._one()
            inputs.append(inp)
            if tgt is not None:
                targets.append(tgt)
        return _batch_tensor(inputs), (_batch_tensor(targets) if targets else None)

    def get_state(self) -> dict[str, Any]:
        """The generator's state (JSON-serialisable) for checkpoints."""
        return dict(self.rng.bit_generator.state)

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`get_state`."""
        try:
            self.rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError) as exc:
            raise DenoiseError(f"patch sampler: cannot restore the random state ({exc})") from exc

    def describe(self) -> dict[str, Any]:
        """What the sampler draws from (for model cards)."""
        return {"sampler": type(self).__name__, "images": len(self), "patch_px": self.patch_px}

    # -- helpers for subclasses ------------------------------------------------
    def _corner(self, shape: tuple[int, ...]) -> tuple[int, int]:
        p = self.patch_px
        y = int(self.rng.integers(0, shape[0] - p + 1))
        x = int(self.rng.integers(0, shape[1] - p + 1))
        return y, x

    def _orientation(self) -> tuple[int, bool]:
        return int(self.rng.integers(0, 4)), bool(self.rng.integers(0, 2))

    def _one(self) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError


class PairPatches(PatchSampler):
    """Crops at the same place in aligned LD (input) and HD (target) images.

    Parameters
    ----------
    aligned_pairs : sequence of AlignedPair
        Pairs whose ``ld`` and ``hd`` uint8 ``(y, x)`` images have equal shapes.
    patch_px : int
        Patch side in pixels (multiple of 8).
    seed : int
        Seed of the sampler's random generator.
    """

    def __init__(self, aligned_pairs: Sequence[AlignedPair], patch_px: int, seed: int = 0) -> None:
        super().__init__(patch_px, seed)
        self.pairs = list(aligned_pairs)
        lds = _check_images([p.ld for p in self.pairs], self.patch_px, "LD")
        hds = _check_images([p.hd for p in self.pairs], self.patch_px, "HD")
        for pair, ld, hd in zip(self.pairs, lds, hds, strict=True):
            if ld.shape != hd.shape:
                raise DenoiseError(
                    f"pair {pair.name}: LD {ld.shape} and HD {hd.shape} differ in shape"
                )
        self.lds, self.hds = lds, hds

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pairs": [p.name for p in self.pairs]}

    def _one(self) -> tuple[np.ndarray, np.ndarray | None]:
        i = int(self.rng.integers(0, len(self.pairs)))
        y, x = self._corner(self.lds[i].shape)
        p = self.patch_px
        ld = self.lds[i][y : y + p, x : x + p]
        hd = self.hds[i][y : y + p, x : x + p]
        k, flip = self._orientation()
        ld_a, hd_a = _augment([ld, hd], k, flip)
        return _to_unit_float(ld_a), _to_unit_float(hd_a)


class SyntheticPatches(PatchSampler):
    """HD crops (target) with LD inputs synthesised by the degradation model.

    Parameters
    ----------
    hd_images : sequence of ndarray
        Clean uint8 ``(y, x)`` images (data bar already stripped).
    patch_px : int
        Patch side in pixels (multiple of 8).
    degrade_config : DegradeConfig
        Noise ranges of :func:`cemi_stream.denoise.degrade.degrade`.
    seed : int
        Seed of the sampler's random generator (crops and noise).
    """

    def __init__(
        self,
        hd_images: Sequence[np.ndarray],
        patch_px: int,
        degrade_config: DegradeConfig | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(patch_px, seed)
        self.hds = _check_images(list(hd_images), self.patch_px, "HD")
        self.degrade_config = degrade_config if degrade_config is not None else DegradeConfig()

    def __len__(self) -> int:
        return len(self.hds)

    def _one(self) -> tuple[np.ndarray, np.ndarray | None]:
        i = int(self.rng.integers(0, len(self.hds)))
        y, x = self._corner(self.hds[i].shape)
        p = self.patch_px
        k, flip = self._orientation()
        (hd,) = _augment([self.hds[i][y : y + p, x : x + p]], k, flip)
        ld = degrade(hd, self.rng, self.degrade_config)
        if ld.shape != hd.shape:
            raise DenoiseError(f"degradation changed the patch shape from {hd.shape} to {ld.shape}")
        return _to_unit_float(np.asarray(ld)), _to_unit_float(hd)


class NoisyPatches(PatchSampler):
    """Crops of noisy LD frames only (self-supervised Neighbor2Neighbor input).

    Parameters
    ----------
    ld_images : sequence of ndarray
        Noisy uint8 ``(y, x)`` frames (data bar already stripped).
    patch_px : int
        Patch side in pixels (multiple of 8).
    seed : int
        Seed of the sampler's random generator.
    """

    has_target = False

    def __init__(self, ld_images: Sequence[np.ndarray], patch_px: int, seed: int = 0) -> None:
        super().__init__(patch_px, seed)
        self.lds = _check_images(list(ld_images), self.patch_px, "LD")

    def __len__(self) -> int:
        return len(self.lds)

    def _one(self) -> tuple[np.ndarray, np.ndarray | None]:
        i = int(self.rng.integers(0, len(self.lds)))
        y, x = self._corner(self.lds[i].shape)
        p = self.patch_px
        k, flip = self._orientation()
        (ld,) = _augment([self.lds[i][y : y + p, x : x + p]], k, flip)
        return _to_unit_float(ld), None
