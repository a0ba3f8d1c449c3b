"""Patch samplers: shapes, ranges, alignment of input and target, determinism."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cemi_stream.denoise.data import NoisyPatches, PairPatches, SyntheticPatches, check_patch_px
from cemi_stream.denoise.pairs import AlignedPair, load_aligned_pairs
from cemi_stream.errors import ConfigError, DenoiseError


def _texture(seed: int, shape: tuple[int, int] = (80, 96)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _inverted_pair(seed: int, shape: tuple[int, int] = (80, 96)) -> AlignedPair:
    # LD = 255 - HD: the same crop and orientation gives input == 1 - target.
    hd = _texture(seed, shape)
    return AlignedPair(name=f"{seed:03d}", ld=255 - hd, hd=hd, shift_yx=(0.0, 0.0), score=1.0)


def test_pair_patches_shapes_range_and_same_place() -> None:
    sampler = PairPatches([_inverted_pair(1), _inverted_pair(2)], patch_px=32, seed=0)
    inp, target = sampler.sample(6)
    assert target is not None
    assert inp.shape == target.shape == (6, 1, 32, 32)
    assert inp.dtype == target.dtype == torch.float32
    assert float(inp.min()) >= 0.0 and float(inp.max()) <= 1.0
    assert float(target.min()) >= 0.0 and float(target.max()) <= 1.0
    # Input and target come from the same place with the same flip/rotation.
    torch.testing.assert_close(inp, 1.0 - target, atol=1e-6, rtol=0)
    # Patches really are crops of the source images (exact grey levels).
    assert torch.allclose(target * 255.0, torch.round(target * 255.0), atol=1e-4)


def test_pair_patches_use_all_eight_orientations() -> None:
    # A patch-sized image with unique values: each sample is one of its 8
    # flips/quarter turns.
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    pair = AlignedPair(name="x", ld=image, hd=image.copy(), shift_yx=(0.0, 0.0), score=1.0)
    sampler = PairPatches([pair], patch_px=8, seed=3)
    inp, _ = sampler.sample(200)
    seen = {tuple(np.round(p[0].numpy() * 255).astype(np.uint8).ravel()) for p in inp}
    dihedral = set()
    for k in range(4):
        rot = np.rot90(image, k)
        dihedral.add(tuple(rot.ravel()))
        dihedral.add(tuple(rot[:, ::-1].ravel()))
    assert seen <= dihedral
    assert len(seen) == 8


def test_samplers_are_deterministic_and_restorable() -> None:
    pairs = [_inverted_pair(1), _inverted_pair(2)]
    a = PairPatches(pairs, patch_px=16, seed=5)
    b = PairPatches(pairs, patch_px=16, seed=5)
    c = PairPatches(pairs, patch_px=16, seed=6)
    first_a, first_b = a.sample(4)[0], b.sample(4)[0]
    assert torch.equal(first_a, first_b)
    assert not torch.equal(first_a, c.sample(4)[0])
    state = a.get_state()
    expected = a.sample(4)[0]
    a.set_state(state)
    assert torch.equal(a.sample(4)[0], expected)


def test_synthetic_patches_degrade_the_hd_crop() -> None:
    hd = [_texture(7, (64, 64)) // 2 + 64, _texture(8, (72, 64)) // 2 + 64]
    sampler = SyntheticPatches(hd, patch_px=32, seed=1)
    inp, target = sampler.sample(4)
    assert target is not None
    assert inp.shape == target.shape == (4, 1, 32, 32)
    assert inp.dtype == torch.float32
    assert float(inp.min()) >= 0.0 and float(inp.max()) <= 1.0
    # The target is an untouched HD crop; the input is a noisy, blurred version.
    assert torch.allclose(target * 255.0, torch.round(target * 255.0), atol=1e-4)
    assert float((inp - target).abs().mean()) > 0.01
    again = SyntheticPatches(hd, patch_px=32, seed=1).sample(4)
    assert torch.equal(again[0], inp)


def test_noisy_patches_have_no_target() -> None:
    sampler = NoisyPatches([_texture(3), _texture(4)], patch_px=24, seed=0)
    inp, target = sampler.sample(3)
    assert target is None
    assert not sampler.has_target
    assert inp.shape == (3, 1, 24, 24)
    assert len(sampler) == 2


@pytest.mark.parametrize("patch_px", [0, 12, 20, 65, -8])
def test_patch_side_must_be_a_multiple_of_8(patch_px: int) -> None:
    with pytest.raises(ConfigError, match="multiple of 8"):
        check_patch_px(patch_px)
    with pytest.raises(ConfigError):
        NoisyPatches([_texture(1)], patch_px=patch_px)


def test_images_smaller_than_the_patch_are_refused() -> None:
    with pytest.raises(DenoiseError, match="smaller than the 128 px patch"):
        NoisyPatches([_texture(1, (100, 200))], patch_px=128)
    with pytest.raises(DenoiseError, match="no images"):
        NoisyPatches([], patch_px=8)


@pytest.mark.realdata
def test_pair_patches_on_real_kriss_pairs_match(data_dir: Path) -> None:
    root = data_dir / "kriss-sem-pairs" / "time"
    pairs = load_aligned_pairs(root / "low", root / "high", names={"001", "002"})
    inp, target = PairPatches(pairs, patch_px=64, seed=0).sample(8)
    assert target is not None

    def ncc(a: np.ndarray, b: np.ndarray) -> float:
        a = cv2.GaussianBlur(a, (0, 0), 2.0)
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    lds = [p[0].numpy() for p in inp]
    hds = [p[0].numpy() for p in target]
    matched = np.mean([ncc(lds[i], hds[i]) for i in range(8)])
    shuffled = np.mean([ncc(lds[i], hds[(i + 1) % 8]) for i in range(8)])
    # The noisy LD crop shows the same specimen as its HD crop; another crop does not.
    assert matched > 0.9
    assert matched > shuffled + 0.5
