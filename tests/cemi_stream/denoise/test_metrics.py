"""Tests of the denoiser metrics (PSNR, SSIM, dark-phase fraction) and the NLM baseline."""

from __future__ import annotations

import itertools
import math

import cv2
import numpy as np
import pytest

from cemi_stream.denoise.metrics import dark_fraction, nlm, psnr, ssim, tune_nlm
from cemi_stream.denoise.pairs import AlignedPair
from cemi_stream.errors import DenoiseError


def scene(shape: tuple[int, int] = (128, 128), seed: int = 0) -> np.ndarray:
    """A clean ``uint8`` image ``(y, x)``: grey disks of several levels on a smooth ground."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = (90 + 40 * np.sin(xx / 17.0) * np.cos(yy / 23.0)).astype(np.uint8)
    for _ in range(20):
        centre = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        cv2.circle(image, centre, int(rng.integers(3, 12)), int(rng.integers(160, 240)), -1)
    return image


def noisy(image: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


# --- PSNR ---------------------------------------------------------------------


def test_psnr_of_identical_images_is_infinite() -> None:
    image = scene()
    assert math.isinf(psnr(image, image.copy()))


def test_psnr_of_a_constant_offset() -> None:
    image = np.full((32, 40), 100, np.uint8)
    assert psnr(image, image + 10) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)
    assert psnr(image, image + 10, data_range=1.0) == pytest.approx(-20.0, abs=1e-9)
    # uint8 input must not wrap around: 0 - 255 is a difference of 255.
    assert psnr(np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)) == pytest.approx(0.0)


def test_psnr_rejects_mismatched_shapes() -> None:
    with pytest.raises(DenoiseError, match="shapes differ"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)))


# --- SSIM ---------------------------------------------------------------------


def test_ssim_is_one_for_identical_images_and_falls_with_noise() -> None:
    image = scene()
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    values = [ssim(image, noisy(image, sigma)) for sigma in (3, 10, 30, 60)]
    assert all(a > b for a, b in itertools.pairwise(values)), values
    assert values[-1] < 0.5


def test_ssim_matches_scikit_image_when_installed() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    image = scene((96, 120))
    other = noisy(image, 20.0)
    reference = metrics.structural_similarity(
        image,
        other,
        data_range=255,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim(image, other) == pytest.approx(reference, abs=1e-9)


def test_ssim_rejects_small_images() -> None:
    with pytest.raises(DenoiseError, match="smaller than"):
        ssim(np.zeros((8, 40)), np.zeros((8, 40)))


# --- dark-phase fraction --------------------------------------------------------


def dark_disks(gradient: float, seed: int = 3) -> tuple[np.ndarray, float]:
    """Dark disks on a bright ground with a left-to-right brightness ramp; true fraction."""
    rng = np.random.default_rng(seed)
    shape = (256, 256)
    mask = np.zeros(shape, np.uint8)
    for _ in range(60):
        centre = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        cv2.circle(mask, centre, int(rng.integers(3, 7)), 1, -1)
    ramp = np.linspace(0.0, gradient, shape[1])[None, :]
    ground = 150.0 + ramp
    image = np.where(mask > 0, 0.35 * ground, ground)
    image = image + np.random.default_rng(seed + 1).normal(0.0, 4.0, shape)
    return np.clip(image, 0, 255).astype(np.uint8), float(mask.mean())


@pytest.mark.parametrize("gradient", [0.0, 100.0])
def test_dark_fraction_of_known_disks(gradient: float) -> None:
    image, truth = dark_disks(gradient)
    assert 0.03 < truth < 0.2
    assert dark_fraction(image) == pytest.approx(truth, abs=0.01)


def test_dark_fraction_adapts_to_uneven_brightness() -> None:
    # With the ground brightening from 150 to 350 (clipped at 255) across
    # the image, disks on the right are brighter than the ground on the left:
    # no global threshold separates them, the local-mean one does.
    image, truth = dark_disks(200.0)
    mean = float(image.mean())
    global_fraction = float((image < 0.85 * mean).mean())
    assert abs(global_fraction - truth) > 0.02
    assert dark_fraction(image) == pytest.approx(truth, abs=0.01)


def test_dark_fraction_of_uniform_image_is_zero_and_checks_args() -> None:
    assert dark_fraction(np.full((40, 50), 120, np.uint8)) == 0.0
    with pytest.raises(DenoiseError, match="window_frac"):
        dark_fraction(np.zeros((8, 8)), window_frac=0.0)
    with pytest.raises(DenoiseError, match="2-D"):
        dark_fraction(np.zeros((8, 8, 3)))


# --- NLM ----------------------------------------------------------------------


def test_nlm_improves_psnr_of_a_noisy_image() -> None:
    clean = scene()
    dirty = noisy(clean, 25.0)
    out = nlm(dirty, 25.0)
    assert out.dtype == np.uint8 and out.shape == clean.shape
    assert psnr(out, clean) > psnr(dirty, clean) + 3.0


def test_nlm_rejects_bad_input() -> None:
    with pytest.raises(DenoiseError, match="uint8"):
        nlm(np.zeros((16, 16), np.float32), 10.0)
    with pytest.raises(DenoiseError, match="positive"):
        nlm(np.zeros((16, 16), np.uint8), 0.0)


def make_pairs(sigma: float) -> list[AlignedPair]:
    pairs = []
    for seed in range(2):
        clean = scene((96, 96), seed=seed)
        pairs.append(AlignedPair(str(seed), noisy(clean, sigma, seed + 10), clean, (0.0, 0.0), 1.0))
    return pairs


def test_tune_nlm_picks_stronger_filtering_for_noisier_pairs() -> None:
    hs = (3.0, 10.0, 25.0, 50.0)
    weak = tune_nlm(make_pairs(4.0), hs)
    strong = tune_nlm(make_pairs(35.0), hs)
    assert weak in hs and strong in hs
    assert weak < strong
    # The chosen h really is the best of the candidates on those pairs.
    pairs = make_pairs(35.0)
    scores = {h: np.mean([psnr(nlm(p.ld, h), p.hd) for p in pairs]) for h in hs}
    assert scores[strong] == max(scores.values())


def test_tune_nlm_needs_pairs() -> None:
    with pytest.raises(DenoiseError, match="no pairs"):
        tune_nlm([])
