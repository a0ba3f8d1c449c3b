"""Tests of the second-order degradation (synthetic LD images from HD images)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import cv2
import numpy as np
import pytest

from cemi_stream.denoise.degrade import (
    KERNEL_KINDS,
    BlurParams,
    DegradeConfig,
    DegradeParams,
    NoiseParams,
    OrderConfig,
    OrderParams,
    ResizeParams,
    apply_params,
    blur_kernel,
    degrade,
    degrade_uint8,
    sample_params,
)
from cemi_stream.errors import ConfigError, DenoiseError

N_DRAWS = 1000


def disks(shape: tuple[int, int] = (96, 80), seed: int = 0) -> np.ndarray:
    """A clean SEM-like ``uint8`` image ``(y, x)``: bright disks on a dark ground."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, 40, dtype=np.uint8)
    for _ in range(12):
        centre = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        cv2.circle(image, centre, int(rng.integers(3, 14)), int(rng.integers(150, 230)), -1)
    return image


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def plain_order(noise: NoiseParams | None) -> OrderParams:
    return OrderParams(blur=None, resize=ResizeParams("keep", 1.0, "bilinear"), noise=noise)


def noise_only(noise: NoiseParams) -> DegradeParams:
    return DegradeParams(plain_order(noise), plain_order(None), "bilinear")


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


# --- determinism and output format -------------------------------------------


def test_same_seed_gives_identical_output() -> None:
    image = disks()
    for seed in range(5):
        a = degrade(image, np.random.default_rng(seed))
        b = degrade(image, np.random.default_rng(seed))
        assert np.array_equal(a, b), f"seed {seed} is not reproducible"


def test_different_seeds_differ() -> None:
    image = disks()
    outputs = [degrade(image, np.random.default_rng(seed)) for seed in range(5)]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert not np.array_equal(outputs[i], outputs[j])


@pytest.mark.parametrize("shape", [(96, 80), (17, 23), (128, 128)])
def test_output_shape_dtype_and_range(shape: tuple[int, int]) -> None:
    image = disks(shape)
    for seed in range(20):
        out = degrade(image, np.random.default_rng(seed))
        assert out.shape == image.shape
        assert out.dtype == np.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        # The specimen survives: the output still correlates with the input.
        if min(shape) >= 64:
            corr = np.corrcoef(out.ravel(), image.ravel().astype(np.float64))[0, 1]
            assert corr > 0.3, f"seed {seed}: output unrelated to the input (r={corr:.2f})"


def test_float_input_matches_uint8_input() -> None:
    image = disks()
    a = degrade(image, np.random.default_rng(3))
    b = degrade(image.astype(np.float32) / 255.0, np.random.default_rng(3))
    assert np.array_equal(a, b)


def test_degrade_uint8_rounds_the_float_output() -> None:
    image = disks()
    out = degrade_uint8(image, np.random.default_rng(7))
    ref = degrade(image, np.random.default_rng(7))
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out, np.round(ref * 255.0).astype(np.uint8))
    with pytest.raises(DenoiseError, match="uint8"):
        degrade_uint8(image.astype(np.float32), np.random.default_rng(0))


def test_rejects_non_2d_input() -> None:
    with pytest.raises(DenoiseError, match="2-D"):
        degrade(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0))
    with pytest.raises(DenoiseError, match="int32"):
        degrade(np.zeros((8, 8), np.int32), np.random.default_rng(0))


# --- parameter sampling ------------------------------------------------------


def check_order(order: OrderParams, cfg: OrderConfig) -> None:
    if order.blur is not None:
        blur = order.blur
        assert blur.kind in KERNEL_KINDS
        assert blur.size in cfg.kernel_sizes
        for sigma in (blur.sigma_x, blur.sigma_y):
            assert cfg.blur_sigma[0] <= sigma <= cfg.blur_sigma[1]
        if "iso" in blur.kind and not blur.kind.endswith("aniso"):
            assert blur.sigma_x == blur.sigma_y and blur.angle == 0.0
        assert -np.pi <= blur.angle <= np.pi
        if blur.kind.startswith("generalized"):
            assert cfg.betag_range[0] <= blur.beta <= cfg.betag_range[1]
        elif blur.kind.startswith("plateau"):
            assert cfg.betap_range[0] <= blur.beta <= cfg.betap_range[1]
        else:
            assert blur.beta == 1.0
    resize = order.resize
    low, high = cfg.resize_range
    assert {"up": 1.0 <= resize.scale <= high, "down": low <= resize.scale <= 1.0}.get(
        resize.mode, resize.scale == 1.0
    ), resize
    if order.noise is not None:
        noise = order.noise
        if noise.kind == "gaussian":
            assert cfg.noise_sigma[0] <= noise.sigma <= cfg.noise_sigma[1]
        else:
            assert cfg.poisson_scale[0] <= noise.scale <= cfg.poisson_scale[1]


def test_sampled_parameters_stay_in_the_documented_ranges() -> None:
    config = DegradeConfig()
    # The paper's numbers, so a change of the defaults is a visible decision.
    assert config.first.noise_sigma == (1.0, 30.0) and config.first.poisson_scale == (0.05, 3.0)
    assert config.second.noise_sigma == (1.0, 25.0) and config.second.poisson_scale == (0.05, 2.5)
    assert config.first.blur_sigma == (0.2, 3.0) and config.second.blur_sigma == (0.2, 1.5)
    assert config.first.kernel_sizes == tuple(range(7, 22, 2))
    rng = np.random.default_rng(123)
    draws = [sample_params(rng, config) for _ in range(N_DRAWS)]
    for params in draws:
        check_order(params.first, config.first)
        check_order(params.second, config.second)
        assert params.final_interpolation in config.interpolations
    # Both extremes of the ranges are reached (uniform draws, not a constant).
    sigmas = [p.first.noise.sigma for p in draws if p.first.noise and p.first.noise.sigma]
    assert min(sigmas) < 3.0 and max(sigmas) > 28.0
    sizes = Counter(p.first.blur.size for p in draws if p.first.blur)
    assert set(sizes) == set(config.first.kernel_sizes)


def test_skip_and_choice_probabilities_are_honoured() -> None:
    config = DegradeConfig()
    rng = np.random.default_rng(5)
    draws = [sample_params(rng, config) for _ in range(N_DRAWS)]
    # 4 standard deviations of a binomial share over 1000 draws is <= 0.064.
    tol = 0.065
    assert all(p.first.blur is not None for p in draws)
    assert np.mean([p.second.blur is None for p in draws]) == pytest.approx(0.2, abs=tol)
    for order, cfg in (("first", config.first), ("second", config.second)):
        modes = Counter(getattr(p, order).resize.mode for p in draws)
        for mode, prob in zip(("up", "down", "keep"), cfg.resize_probs, strict=True):
            assert modes[mode] / N_DRAWS == pytest.approx(prob, abs=tol), (order, mode)
        kinds = Counter(getattr(p, order).noise.kind for p in draws)
        assert kinds["gaussian"] / N_DRAWS == pytest.approx(0.5, abs=tol)
    kinds = Counter(p.first.blur.kind for p in draws if p.first.blur)
    for kind, prob in zip(KERNEL_KINDS, config.first.kernel_probs, strict=True):
        assert kinds[kind] / N_DRAWS == pytest.approx(prob, abs=tol), kind
    interps = Counter(p.final_interpolation for p in draws)
    assert all(n / N_DRAWS == pytest.approx(1 / 3, abs=tol) for n in interps.values())


def test_configured_skip_probabilities_are_honoured() -> None:
    order = OrderConfig(blur_prob=0.3, noise_prob=0.6, resize_probs=(0.0, 0.0, 1.0))
    config = DegradeConfig(first=order, second=order)
    rng = np.random.default_rng(9)
    draws = [sample_params(rng, config) for _ in range(N_DRAWS)]
    assert np.mean([p.first.blur is not None for p in draws]) == pytest.approx(0.3, abs=0.065)
    assert np.mean([p.second.noise is not None for p in draws]) == pytest.approx(0.6, abs=0.065)
    assert all(p.first.resize.mode == "keep" for p in draws)


def test_sample_then_apply_equals_degrade() -> None:
    image = disks()
    rng = np.random.default_rng(11)
    params = sample_params(rng)
    manual = apply_params(image, params, rng)
    assert np.array_equal(manual, degrade(image, np.random.default_rng(11)))


# --- the steps ---------------------------------------------------------------


def test_isotropic_kernel_is_the_separable_gaussian() -> None:
    kernel = blur_kernel(BlurParams("iso", 15, 2.0, 2.0, 0.0, 1.0))
    g = cv2.getGaussianKernel(15, 2.0)
    assert kernel.shape == (15, 15)
    np.testing.assert_allclose(kernel, g @ g.T, atol=1e-6)


@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_kernels_are_normalised_and_point_symmetric(kind: str) -> None:
    kernel = blur_kernel(BlurParams(kind, 13, 2.5, 0.8, 0.6, 1.5))
    assert kernel.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1], atol=1e-7)
    assert kernel[6, 6] == kernel.max()


def test_anisotropic_kernel_follows_its_rotation() -> None:
    # sigma_x > sigma_y at angle 0 spreads along x; at 90 degrees along y.
    flat = blur_kernel(BlurParams("aniso", 15, 3.0, 0.7, 0.0, 1.0))
    upright = blur_kernel(BlurParams("aniso", 15, 3.0, 0.7, np.pi / 2, 1.0))
    assert flat[7, 11] > 10 * flat[11, 7]
    np.testing.assert_allclose(upright, flat.T, atol=1e-6)


def test_gaussian_noise_level_matches_sigma() -> None:
    image = np.full((128, 128), 128, dtype=np.uint8)
    errors = []
    for sigma in (5.0, 15.0, 25.0):
        out = apply_params(image, noise_only(NoiseParams("gaussian", sigma, 0.0)), rng(0))
        errors.append(rms(out * 255.0, image))
        assert errors[-1] == pytest.approx(sigma, rel=0.05)
    assert errors == sorted(errors)


def test_poisson_noise_grows_with_scale() -> None:
    image = disks((128, 128))
    errors = [
        rms(apply_params(image, noise_only(NoiseParams("poisson", 0.0, s)), rng(1)) * 255, image)
        for s in (0.1, 1.0, 3.0)
    ]
    assert errors[0] < errors[1] < errors[2]
    # Shot noise: brighter regions are noisier.
    out = apply_params(image, noise_only(NoiseParams("poisson", 0.0, 2.0)), rng(2)) * 255
    resid = out - image
    assert resid[image > 140].std() > 1.3 * resid[image == 40].std()


def test_stronger_noise_config_degrades_more() -> None:
    image = disks((128, 128))

    def mean_error(sigma: tuple[float, float]) -> float:
        # Blur and resize off: the difference to the clean image is the noise.
        order = OrderConfig(
            blur_prob=0.0, resize_probs=(0.0, 0.0, 1.0), gaussian_noise_prob=1.0, noise_sigma=sigma
        )
        config = DegradeConfig(first=order, second=dataclasses.replace(order, noise_prob=0.0))
        return float(np.mean([rms(degrade(image, rng(s), config) * 255, image) for s in range(8)]))

    weak, strong = mean_error((1.0, 3.0)), mean_error((25.0, 30.0))
    assert weak < 4.0
    assert 20.0 < strong < 31.0


def test_resize_returns_to_the_original_size() -> None:
    image = disks((90, 70))
    down = ResizeParams("down", 0.3, "area")
    params = DegradeParams(OrderParams(None, down, None), OrderParams(None, down, None), "bicubic")
    out = apply_params(image, params, rng(0))
    assert out.shape == image.shape
    # Downscaling to 30 % loses the disk edges: a smoother, not identical image.
    assert 0.0 < rms(out * 255, image) < 60.0
    lap_in = cv2.Laplacian(image.astype(np.float32), cv2.CV_32F).std()
    lap_out = cv2.Laplacian(out * 255, cv2.CV_32F).std()
    assert lap_out < 0.7 * lap_in


# --- configuration validation ------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_sigma": (30.0, 1.0)}, "inverted"),
        ({"blur_sigma": (3.0, 0.2)}, "inverted"),
        ({"blur_prob": 1.2}, "probability"),
        ({"gaussian_noise_prob": -0.1}, "probability"),
        ({"resize_probs": (0.5, 0.5, 0.5)}, "sum to 1"),
        ({"kernel_probs": (1.0, 0.0)}, "expected 6"),
        ({"kernel_sizes": (7, 8)}, "odd"),
        ({"resize_range": (1.2, 1.5)}, "contain 1"),
        ({"poisson_scale": (-1.0, 2.0)}, "below"),
    ],
)
def test_invalid_order_config_is_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        OrderConfig(**kwargs)  # type: ignore[arg-type]


def test_invalid_interpolation_is_rejected() -> None:
    with pytest.raises(ConfigError, match="nearest"):
        DegradeConfig(interpolations=("nearest",))
