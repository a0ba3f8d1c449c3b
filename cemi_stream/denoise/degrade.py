"""Second-order degradation: synthetic LD images from HD SEM images.

When only clean (HD) images exist, the CEMI paper trains its denoiser on LD
images made from them by a Real-ESRGAN-style high-order degradation: blur,
resize and noise, applied twice, each step drawn at random and sometimes
skipped.  The paper fixes the noise: Gaussian or Poisson with probability 0.5
each, Gaussian sigma 1..30 (of 255) and Poisson scale 0.05..3 in the first
order, sigma 1..25 and scale 0.05..2.5 in the second.  The blur and resize
ranges follow Real-ESRGAN's published training options (the paper says it is
inspired by Real-ESRGAN and gives no other values).  Everything is greyscale
(SEM images have one channel) and the output has the input's size (the
denoiser works at scale 1).

The degradation is split into :func:`sample_params` (every random choice,
as a :class:`DegradeParams` value) and :func:`apply_params` (deterministic
except for the noise realisation), so the drawn parameters can be inspected
and tested.  Every random number comes from the ``numpy.random.Generator``
passed in: the same seed gives bit-identical output.

Images are 2-D arrays with axes ``(y, x)``; floats are in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from ..errors import ConfigError, DenoiseError

#: Blur kernel families (Real-ESRGAN's list, without the sinc filter).
KERNEL_KINDS: tuple[str, ...] = (
    "iso",  # isotropic Gaussian
    "aniso",  # anisotropic, rotated Gaussian
    "generalized_iso",  # exp(-0.5 q**beta): flatter top / heavier tails than a Gaussian
    "generalized_aniso",
    "plateau_iso",  # 1 / (1 + q**beta): flat top, heavy tails
    "plateau_aniso",
)
#: Resize interpolations drawn at random (OpenCV flags).
INTERPOLATIONS: dict[str, int] = {
    "area": cv2.INTER_AREA,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
}
ResizeMode = Literal["up", "down", "keep"]
NoiseKind = Literal["gaussian", "poisson"]


def _check_prob(owner: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{owner}.{name}: probability {value} is not in [0, 1]")


def _check_range(owner: str, name: str, pair: tuple[float, float], lowest: float) -> None:
    if len(pair) != 2:
        raise ConfigError(f"{owner}.{name}: expected (low, high), got {pair!r}")
    low, high = pair
    if low > high:
        raise ConfigError(f"{owner}.{name}: range ({low}, {high}) is inverted")
    if low < lowest:
        raise ConfigError(f"{owner}.{name}: range ({low}, {high}) goes below {lowest}")


def _check_weights(owner: str, name: str, weights: tuple[float, ...], count: int) -> None:
    if len(weights) != count:
        raise ConfigError(f"{owner}.{name}: expected {count} probabilities, got {len(weights)}")
    for w in weights:
        _check_prob(owner, name, w)
    if not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise ConfigError(f"{owner}.{name}: probabilities {weights} do not sum to 1")


@dataclass(frozen=True)
class OrderConfig:
    """Ranges and probabilities of one degradation order.

    Attributes
    ----------
    blur_prob : float
        Probability that the blur step runs (else it is skipped).
    kernel_probs : tuple of float
        Probabilities of the kernel families in :data:`KERNEL_KINDS` (sum 1).
    kernel_sizes : tuple of int
        Odd kernel sizes in pixels, drawn uniformly.
    blur_sigma : (float, float)
        Gaussian sigma range in pixels (both axes for anisotropic kernels).
    betag_range : (float, float)
        Shape exponent range of the generalised Gaussian kernel.
    betap_range : (float, float)
        Shape exponent range of the plateau kernel.
    resize_probs : (float, float, float)
        Probabilities of scaling up, down, or keeping the size (sum 1).  Sizes
        are relative to the original image, so "keep" skips the step unless an
        earlier order resized (then it returns to the original size).
    resize_range : (float, float)
        Scale range relative to the original size: "up" draws from
        ``(1, high)``, "down" from ``(low, 1)``.
    noise_prob : float
        Probability that the noise step runs (else it is skipped).
    gaussian_noise_prob : float
        Probability that the noise is Gaussian (else Poisson).
    noise_sigma : (float, float)
        Gaussian noise standard deviation range in grey levels of 255.
    poisson_scale : (float, float)
        Poisson noise scale range (multiplies the shot-noise residual).
    """

    blur_prob: float = 1.0
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    noise_prob: float = 1.0
    gaussian_noise_prob: float = 0.5
    noise_sigma: tuple[float, float] = (1.0, 30.0)
    poisson_scale: tuple[float, float] = (0.05, 3.0)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("blur_prob", "noise_prob", "gaussian_noise_prob"):
            _check_prob(owner, name, getattr(self, name))
        _check_weights(owner, "kernel_probs", self.kernel_probs, len(KERNEL_KINDS))
        _check_weights(owner, "resize_probs", self.resize_probs, 3)
        if not self.kernel_sizes:
            raise ConfigError(f"{owner}.kernel_sizes: empty")
        for size in self.kernel_sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
                raise ConfigError(f"{owner}.kernel_sizes: {size!r} is not an odd positive integer")
        _check_range(owner, "blur_sigma", self.blur_sigma, 1e-3)
        _check_range(owner, "betag_range", self.betag_range, 1e-3)
        _check_range(owner, "betap_range", self.betap_range, 1e-3)
        _check_range(owner, "resize_range", self.resize_range, 1e-3)
        if not self.resize_range[0] <= 1.0 <= self.resize_range[1]:
            raise ConfigError(f"{owner}.resize_range: {self.resize_range} must contain 1")
        _check_range(owner, "noise_sigma", self.noise_sigma, 0.0)
        _check_range(owner, "poisson_scale", self.poisson_scale, 0.0)


def _second_order() -> OrderConfig:
    # Real-ESRGAN: the second blur is skipped with probability 0.2 and is
    # milder; the resize range is narrower and "keep" likelier.  Noise ranges
    # are the CEMI paper's.
    return OrderConfig(
        blur_prob=0.8,
        blur_sigma=(0.2, 1.5),
        resize_probs=(0.3, 0.4, 0.3),
        resize_range=(0.3, 1.2),
        noise_sigma=(1.0, 25.0),
        poisson_scale=(0.05, 2.5),
    )


@dataclass(frozen=True)
class DegradeConfig:
    """All ranges and probabilities of the two-order degradation.

    Attributes
    ----------
    first : OrderConfig
        First order: blur always (sigma 0.2..3 px), resize up/down/keep with
        probabilities 0.2/0.7/0.1 in 0.15..1.5, noise always: Gaussian sigma
        1..30 or Poisson scale 0.05..3 (probability 0.5 each).
    second : OrderConfig
        Second order: blur with probability 0.8 (sigma 0.2..1.5 px), resize
        up/down/keep 0.3/0.4/0.3 in 0.3..1.2, noise always: Gaussian sigma
        1..25 or Poisson scale 0.05..2.5.
    interpolations : tuple of str
        Resize interpolations (keys of :data:`INTERPOLATIONS`), drawn
        uniformly for every resize, including the final one back to the
        original size.
    """

    first: OrderConfig = field(default_factory=OrderConfig)
    second: OrderConfig = field(default_factory=_second_order)
    interpolations: tuple[str, ...] = ("area", "bilinear", "bicubic")

    def __post_init__(self) -> None:
        for name in ("first", "second"):
            if not isinstance(getattr(self, name), OrderConfig):
                raise ConfigError(f"DegradeConfig.{name}: expected an OrderConfig")
        if not self.interpolations:
            raise ConfigError("DegradeConfig.interpolations: empty")
        for interp in self.interpolations:
            if interp not in INTERPOLATIONS:
                raise ConfigError(
                    f"DegradeConfig.interpolations: {interp!r} is not one of "
                    f"{', '.join(INTERPOLATIONS)}"
                )


@dataclass(frozen=True)
class BlurParams:
    """One drawn blur kernel.

    Attributes
    ----------
    kind : str
        One of :data:`KERNEL_KINDS`.
    size : int
        Odd kernel side in pixels.
    sigma_x, sigma_y : float
        Standard deviations in pixels along the kernel's own axes (equal for
        isotropic kinds).
    angle : float
        Rotation of the kernel axes in radians (0 for isotropic kinds).
    beta : float
        Shape exponent (1 for the plain Gaussian kinds).
    """

    kind: str
    size: int
    sigma_x: float
    sigma_y: float
    angle: float
    beta: float


@dataclass(frozen=True)
class ResizeParams:
    """One drawn resize.

    Attributes
    ----------
    mode : {"up", "down", "keep"}
        Direction drawn; "keep" means the step is skipped.
    scale : float
        Target size relative to the original image (1 for "keep").
    interpolation : str
        Key of :data:`INTERPOLATIONS`.
    """

    mode: ResizeMode
    scale: float
    interpolation: str


@dataclass(frozen=True)
class NoiseParams:
    """One drawn noise step.

    Attributes
    ----------
    kind : {"gaussian", "poisson"}
        Noise model.
    sigma : float
        Gaussian standard deviation in grey levels of 255 (0 for Poisson).
    scale : float
        Poisson residual scale (0 for Gaussian).
    """

    kind: NoiseKind
    sigma: float
    scale: float


@dataclass(frozen=True)
class OrderParams:
    """The drawn steps of one order; ``None`` marks a skipped step."""

    blur: BlurParams | None
    resize: ResizeParams
    noise: NoiseParams | None


@dataclass(frozen=True)
class DegradeParams:
    """All drawn parameters of one degradation.

    Attributes
    ----------
    first, second : OrderParams
        The two orders.
    final_interpolation : str
        Interpolation of the last resize back to the original size.
    """

    first: OrderParams
    second: OrderParams
    final_interpolation: str


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _choice(rng: np.random.Generator, options: tuple[str, ...], probs: tuple[float, ...]) -> str:
    # Normalise against rounding in user-given probabilities (validated to
    # sum to 1 within 1e-6).
    p = np.asarray(probs, dtype=np.float64)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def _sample_blur(rng: np.random.Generator, cfg: OrderConfig) -> BlurParams:
    kind = _choice(rng, KERNEL_KINDS, cfg.kernel_probs)
    size = int(cfg.kernel_sizes[int(rng.integers(len(cfg.kernel_sizes)))])
    if kind == "iso" or kind.endswith("_iso"):
        sigma_x = _uniform(rng, cfg.blur_sigma)
        sigma_y, angle = sigma_x, 0.0
    else:
        sigma_x = _uniform(rng, cfg.blur_sigma)
        sigma_y = _uniform(rng, cfg.blur_sigma)
        angle = float(rng.uniform(-math.pi, math.pi))
    beta = 1.0
    if kind.startswith(("generalized", "plateau")):
        low, high = cfg.betag_range if kind.startswith("generalized") else cfg.betap_range
        # As Real-ESRGAN: half the draws below 1 where the range spans 1, so
        # the sharp-peaked shapes are not rare.
        if low < 1.0 < high:
            beta = float(rng.uniform(low, 1.0) if rng.uniform() < 0.5 else rng.uniform(1.0, high))
        else:
            beta = float(rng.uniform(low, high))
    return BlurParams(kind, size, sigma_x, sigma_y, angle, beta)


def _sample_resize(
    rng: np.random.Generator, cfg: OrderConfig, interps: tuple[str, ...]
) -> ResizeParams:
    mode: ResizeMode = _choice(rng, ("up", "down", "keep"), cfg.resize_probs)  # type: ignore[assignment]
    if mode == "up":
        scale = float(rng.uniform(1.0, cfg.resize_range[1]))
    elif mode == "down":
        scale = float(rng.uniform(cfg.resize_range[0], 1.0))
    else:
        scale = 1.0
    interp = interps[int(rng.integers(len(interps)))]
    return ResizeParams(mode, scale, interp)


def _sample_noise(rng: np.random.Generator, cfg: OrderConfig) -> NoiseParams:
    if rng.uniform() < cfg.gaussian_noise_prob:
        return NoiseParams("gaussian", _uniform(rng, cfg.noise_sigma), 0.0)
    return NoiseParams("poisson", 0.0, _uniform(rng, cfg.poisson_scale))


def _sample_order(
    rng: np.random.Generator, cfg: OrderConfig, interps: tuple[str, ...]
) -> OrderParams:
    # Draw the skip decisions first and always in the same order, so that the
    # stream of draws (and thus a seeded run) depends only on the config.
    blur = _sample_blur(rng, cfg) if rng.uniform() < cfg.blur_prob else None
    resize = _sample_resize(rng, cfg, interps)
    noise = _sample_noise(rng, cfg) if rng.uniform() < cfg.noise_prob else None
    return OrderParams(blur, resize, noise)


def sample_params(rng: np.random.Generator, config: DegradeConfig | None = None) -> DegradeParams:
    """Draw all random choices of one degradation.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of every random number.
    config : DegradeConfig, optional
        Ranges and probabilities (default: the paper's).

    Returns
    -------
    DegradeParams
        The drawn steps; skipped steps are ``None`` (resize: mode "keep").
    """
    cfg = config if config is not None else DegradeConfig()
    first = _sample_order(rng, cfg.first, cfg.interpolations)
    second = _sample_order(rng, cfg.second, cfg.interpolations)
    final = cfg.interpolations[int(rng.integers(len(cfg.interpolations)))]
    return DegradeParams(first, second, final)


def blur_kernel(params: BlurParams) -> np.ndarray:
    """The normalised 2-D blur kernel of drawn parameters.

    Parameters
    ----------
    params : BlurParams
        Kernel family, size, sigmas, rotation and shape exponent.

    Returns
    -------
    ndarray
        ``float32`` kernel ``(size, size)`` summing to 1.
    """
    half = params.size // 2
    coords = np.arange(-half, half + 1, dtype=np.float64)
    xx, yy = np.meshgrid(coords, coords)
    cos_a, sin_a = math.cos(params.angle), math.sin(params.angle)
    # Coordinates in the kernel's rotated frame; q is the squared
    # Mahalanobis distance d^T Sigma^-1 d with Sigma = R diag(sx^2, sy^2) R^T.
    u = cos_a * xx + sin_a * yy
    v = -sin_a * xx + cos_a * yy
    q = (u / params.sigma_x) ** 2 + (v / params.sigma_y) ** 2
    if params.kind.startswith("plateau"):
        kernel = 1.0 / (1.0 + q**params.beta)
    elif params.kind.startswith("generalized"):
        kernel = np.exp(-0.5 * q**params.beta)
    else:
        kernel = np.exp(-0.5 * q)
    return (kernel / kernel.sum()).astype(np.float32)


def _resize(image: np.ndarray, height: int, width: int, interp: str) -> np.ndarray:
    if image.shape == (height, width):
        return image
    return np.asarray(
        cv2.resize(image, (width, height), interpolation=INTERPOLATIONS[interp]),
        dtype=np.float32,
    )


def _poisson(image: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    # Shot noise at a photon count set by the image's own number of grey
    # levels (rounded up to a power of two), as in Real-ESRGAN; the residual
    # is then scaled.
    levels = len(np.unique(np.round(image * 255.0)))
    vals = float(2 ** math.ceil(math.log2(max(levels, 2))))
    counts = rng.poisson(np.clip(image, 0.0, 1.0).astype(np.float64) * vals)
    noisy = counts / vals
    return (image + (noisy - image) * scale).astype(np.float32)


def _noise(image: np.ndarray, params: NoiseParams, rng: np.random.Generator) -> np.ndarray:
    if params.kind == "gaussian":
        noise = rng.standard_normal(image.shape) * (params.sigma / 255.0)
        return (image + noise).astype(np.float32)
    return _poisson(image, params.scale, rng)


def _apply_order(
    image: np.ndarray, params: OrderParams, shape: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    if params.blur is not None:
        image = np.asarray(
            cv2.filter2D(
                image, cv2.CV_32F, blur_kernel(params.blur), borderType=cv2.BORDER_REFLECT_101
            )
        )
    # Sizes are relative to the original image so that two orders of "down"
    # do not compound (as in Real-ESRGAN); "keep" returns to the original size.
    height = max(1, round(shape[0] * params.resize.scale))
    width = max(1, round(shape[1] * params.resize.scale))
    image = np.clip(_resize(image, height, width, params.resize.interpolation), 0.0, 1.0)
    if params.noise is not None:
        image = np.clip(_noise(image, params.noise, rng), 0.0, 1.0)
    return image.astype(np.float32)


def _as_unit_float(hd: np.ndarray) -> np.ndarray:
    if not isinstance(hd, np.ndarray) or hd.ndim != 2 or hd.size == 0:
        got = hd.shape if isinstance(hd, np.ndarray) else type(hd)
        raise DenoiseError(f"degrade: need a non-empty 2-D greyscale image, got {got}")
    if hd.dtype == np.uint8:
        return hd.astype(np.float32) / 255.0
    if np.issubdtype(hd.dtype, np.floating):
        return np.clip(hd.astype(np.float32), 0.0, 1.0)
    raise DenoiseError(f"degrade: need uint8 or float in [0, 1], got {hd.dtype}")


def apply_params(hd: np.ndarray, params: DegradeParams, rng: np.random.Generator) -> np.ndarray:
    """Degrade an image with given parameters.

    Parameters
    ----------
    hd : ndarray
        Clean image ``(y, x)``: ``uint8`` (0..255) or float in [0, 1].
    params : DegradeParams
        The steps to apply (from :func:`sample_params`).
    rng : numpy.random.Generator
        Source of the noise realisations.

    Returns
    -------
    ndarray
        ``float32`` image in [0, 1] of the input's shape.

    Raises
    ------
    DenoiseError
        If ``hd`` is not a non-empty 2-D ``uint8`` or float image.
    """
    image = _as_unit_float(hd)
    shape = (int(image.shape[0]), int(image.shape[1]))
    for order in (params.first, params.second):
        image = _apply_order(image, order, shape, rng)
    image = _resize(image, shape[0], shape[1], params.final_interpolation)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def degrade(
    hd: np.ndarray, rng: np.random.Generator, config: DegradeConfig | None = None
) -> np.ndarray:
    """Make a synthetic LD image from a clean one (two-order degradation).

    Parameters
    ----------
    hd : ndarray
        Clean image ``(y, x)``: ``uint8`` (0..255) or float in [0, 1].
    rng : numpy.random.Generator
        Source of every random number; the same state gives the same output
        bit for bit.
    config : DegradeConfig, optional
        Ranges and probabilities (default: the paper's).

    Returns
    -------
    ndarray
        ``float32`` image in [0, 1] of the input's shape.

    Raises
    ------
    DenoiseError
        If ``hd`` is not a non-empty 2-D ``uint8`` or float image.
    """
    return apply_params(hd, sample_params(rng, config), rng)


def degrade_uint8(
    hd: np.ndarray, rng: np.random.Generator, config: DegradeConfig | None = None
) -> np.ndarray:
    """:func:`degrade` for 8-bit images: ``uint8`` in, ``uint8`` out (rounded).

    Parameters
    ----------
    hd : ndarray
        Clean ``uint8`` image ``(y, x)``.
    rng : numpy.random.Generator
        Source of every random number.
    config : DegradeConfig, optional
        Ranges and probabilities (default: the paper's).

    Returns
    -------
    ndarray
        ``uint8`` image of the input's shape.

    Raises
    ------
    DenoiseError
        If ``hd`` is not a 2-D ``uint8`` image.
    """
    if not isinstance(hd, np.ndarray) or hd.dtype != np.uint8:
        got = hd.dtype if isinstance(hd, np.ndarray) else type(hd)
        raise DenoiseError(f"degrade_uint8: need a uint8 image, got {got}")
    out = degrade(hd, rng, config)
    return np.round(out * 255.0).astype(np.uint8)
