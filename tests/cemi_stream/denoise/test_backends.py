"""Inference backends: cpu vs onnx agreement, the ONNX cache, GPU backends when present."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cemi_stream.denoise.backends import (
    BACKEND_FACTORIES,
    BACKENDS,
    TENSORRT_MISSING,
    CpuBackend,
    OnnxBackend,
    TensorRTBackend,
    auto_backend,
    create_backend,
)
from cemi_stream.denoise.infer import Denoiser
from cemi_stream.errors import ConfigError, DenoiseError
from models.rrdbnet import build_generator
from models.weights import ModelCard, load_model, model_hash, save_model

HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("torch_tensorrt") is not None
NO_CUDA = "no CUDA device on this machine"
NO_TRT = (
    "torch-tensorrt is not installed (pip install -e .[tensorrt] on a machine that can "
    "reach NVIDIA's wheel index)"
)


def textured(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A smooth random 'specimen' with noise, uint8 (y, x)."""
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 3)
    base = (base - base.min()) / (base.max() - base.min())
    noisy = base * 200 + 28 + rng.normal(0, 20, shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def save_test_model(path: Path, seed: int = 0) -> Path:
    """A random-initialised compact RRDBNet whose output spans the grey range.

    Freshly initialised, the network's output is nearly flat (mean ~0.03,
    std ~0.003), so backends or tilings that disagree would still look alike.
    conv_last is rescaled (an affine change of the output) to give mean 0.5
    and std 0.2 on a textured frame, so any disagreement shows.
    """
    torch.manual_seed(seed)
    net = build_generator("compact").eval()
    x = torch.from_numpy(textured((128, 128), seed).astype(np.float32) / 255)[None, None]
    with torch.inference_mode():
        y = net(x)
    gain = 0.2 / float(y.std())
    with torch.no_grad():
        net.conv_last.weight.mul_(gain)
        net.conv_last.bias.mul_(gain).add_(0.5 - gain * float(y.mean()))
    return save_model(net, path, ModelCard(name="test-compact", arch={}))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_test_model(tmp_path_factory.mktemp("model") / "test-compact.safetensors")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the tests that do not test the cache itself."""
    return tmp_path_factory.mktemp("cache")


def test_registry_holds_every_named_backend() -> None:
    assert set(BACKEND_FACTORIES) == set(BACKENDS) - {"auto"}


def test_cpu_and_onnx_agree(model_path: Path, cache_dir: Path) -> None:
    image = textured((64, 96), seed=5)
    cpu = Denoiser(model_path, "cpu", cache_dir=cache_dir)
    onnx = Denoiser(model_path, "onnx", cache_dir=cache_dir)
    assert (cpu.backend, onnx.backend) == ("cpu", "onnx")
    a = cpu.denoise_float(image)
    b = onnx.denoise_float(image)
    assert a.shape == b.shape == (64, 96) and a.dtype == b.dtype == np.float32
    assert float(a.std()) > 0.05  # a real image, not a flat output
    assert float(np.abs(a - b).max()) <= 1e-4


def test_onnx_handles_any_batch_and_size(model_path: Path, cache_dir: Path) -> None:
    # One export with dynamic batch / height / width serves every shape.
    model, card = load_model(model_path)
    onnx = OnnxBackend(model, model_path, card, cache_dir)
    ref_model, _ = load_model(model_path)
    cpu = CpuBackend(ref_model, model_path, card)
    rng = np.random.default_rng(2)
    for shape in [(1, 1, 64, 96), (3, 1, 32, 48), (2, 1, 100, 36)]:
        batch = rng.random(shape, dtype=np.float32)
        out = onnx.run(batch)
        assert out.shape == shape and out.dtype == np.float32
        assert float(np.abs(out - cpu.run(batch)).max()) <= 1e-4


def test_onnx_export_is_cached_by_model_hash(model_path: Path, tmp_path: Path) -> None:
    model, card = load_model(model_path)
    first = OnnxBackend(model, model_path, card, tmp_path)
    cached = first.onnx_path
    assert cached.parent == tmp_path / "onnx"
    assert cached.name.startswith(model_hash(model_path))
    stamp = cached.stat().st_mtime_ns
    batch = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    expected = first.run(batch)
    # A second backend for the same weights reuses the file.
    second = OnnxBackend(model, model_path, card, tmp_path)
    assert second.onnx_path == cached and cached.stat().st_mtime_ns == stamp
    # A damaged cache file (a crash mid-write, a full disk) is exported again.
    cached.write_bytes(b"not an onnx model")
    third = OnnxBackend(model, model_path, card, tmp_path)
    np.testing.assert_allclose(third.run(batch), expected, atol=1e-6)


def test_onnx_cache_dir_from_environment(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CEMI_CACHE", str(tmp_path / "env-cache"))
    model, card = load_model(model_path)
    backend = OnnxBackend(model, model_path, card)
    assert backend.onnx_path.parent == tmp_path / "env-cache" / "onnx"
    assert backend.onnx_path.is_file()


def test_onnx_without_onnxruntime_names_the_package(
    model_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import onnxruntime` fail as if it were absent.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    model, card = load_model(model_path)
    with pytest.raises(DenoiseError, match="onnxruntime is not installed"):
        OnnxBackend(model, model_path, card, cache_dir)


def test_backends_reject_a_bad_batch(model_path: Path) -> None:
    model, card = load_model(model_path)
    cpu = CpuBackend(model, model_path, card)
    with pytest.raises(DenoiseError, match="multiples of 4"):
        cpu.run(np.zeros((1, 1, 30, 32), np.float32))
    with pytest.raises(DenoiseError, match=r"\(N, 1, H, W\)"):
        cpu.run(np.zeros((1, 3, 32, 32), np.float32))


def test_unknown_backend_lists_the_valid_ones(model_path: Path) -> None:
    with pytest.raises(ConfigError, match="auto, cpu, onnx, cuda, tensorrt"):
        Denoiser(model_path, "vulkan")
    model, card = load_model(model_path)
    with pytest.raises(ConfigError, match="unknown"):
        create_backend("gpu", model, model_path, card)


def test_auto_picks_the_fastest_available_backend() -> None:
    expected = (
        "tensorrt"
        if HAS_CUDA and HAS_TRT
        else "cuda"
        if HAS_CUDA
        else "onnx"
        if importlib.util.find_spec("onnxruntime")
        else "cpu"
    )
    assert auto_backend() == expected


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present")
def test_cuda_backend_without_a_device(model_path: Path) -> None:
    with pytest.raises(DenoiseError, match="cuda backend: no CUDA device available"):
        Denoiser(model_path, "cuda")


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize(("precision", "tol"), [("fp32", 5e-3), ("fp16", 2e-2), ("bf16", 6e-2)])
def test_cuda_matches_cpu(model_path: Path, precision: str, tol: float) -> None:
    # fp32 on the GPU may use TF32 convolutions (10-bit mantissa), hence 5e-3.
    image = textured((128, 160), seed=3)
    ref = Denoiser(model_path, "cpu").denoise_float(image)
    out = Denoiser(model_path, "cuda", precision=precision).denoise_float(image)
    assert float(np.abs(out - ref).max()) <= tol


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_cuda_falls_back_to_fp32_when_fp16_overflows(
    model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Scale the trunk's input layer up by 1e5 and the output layer's weights
    # down by 1e5: nearly the same function in fp32 (mid-grey, textured), but
    # the features exceed fp16's range (65504) and become Inf.
    net, _ = load_model(model_path)
    with torch.no_grad():
        net.conv_first.weight.mul_(1e5)
        net.conv_first.bias.mul_(1e5)
        net.conv_last.weight.mul_(1e-5)
    path = save_model(net, tmp_path / "overflow.safetensors", ModelCard(name="overflow", arch={}))
    image = textured((64, 64), seed=1)
    ref = Denoiser(path, "cpu").denoise_float(image)
    assert np.isfinite(ref).all() and float(ref.mean()) > 0.1
    with caplog.at_level(logging.WARNING, logger="cemi_stream.denoise.backends"):
        out = Denoiser(path, "cuda", precision="fp16").denoise_float(image)
    assert "running fp32 for the rest" in caplog.text
    assert np.isfinite(out).all()
    assert float(np.abs(out - ref).max()) <= 5e-3


def test_tensorrt_missing_package_message(model_path: Path) -> None:
    if HAS_TRT:
        pytest.skip("torch-tensorrt is installed")
    model, card = load_model(model_path)
    with pytest.raises(DenoiseError) as info:
        TensorRTBackend(model, model_path, card)
    assert str(info.value) == TENSORRT_MISSING


@pytest.mark.skipif(not (HAS_TRT and HAS_CUDA), reason=NO_CUDA if HAS_TRT else NO_TRT)
def test_tensorrt_matches_cpu_and_caches_the_engine(model_path: Path, tmp_path: Path) -> None:
    image = textured((128, 160), seed=3)
    ref = Denoiser(model_path, "cpu").denoise_float(image)
    trt = Denoiser(model_path, "tensorrt", cache_dir=tmp_path)
    out = trt.denoise_float(image)
    assert float(np.abs(out - ref).max()) <= 2e-2
    engines = list((tmp_path / "tensorrt").glob("*.ep"))
    assert len(engines) == 1 and "128x160" in engines[0].name
    # A new backend loads the cached engine and gives the same output.
    again = Denoiser(model_path, "tensorrt", cache_dir=tmp_path).denoise_float(image)
    assert float(np.abs(again - out).max()) <= 1e-3


def test_first_batch_guard_falls_back_only_when_fp32_is_sound() -> None:
    # The cuda and tensorrt backends share this guard; it runs on CPU tensors too.
    from cemi_stream.denoise.backends import _checked_first_batch

    good = torch.full((1, 1, 8, 8), 0.5)
    black = torch.zeros((1, 1, 8, 8))
    nan = torch.full((1, 1, 8, 8), float("nan"))
    calls: list[int] = []

    def fp32(value: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return value

    assert _checked_first_batch(good, lambda: fp32(good), "t") == (good, False)
    assert not calls  # a sound half-precision output costs no fp32 pass
    y, fall_back = _checked_first_batch(nan, lambda: fp32(good), "t")
    assert fall_back and y is good
    y, fall_back = _checked_first_batch(black, lambda: fp32(black), "t")
    assert not fall_back and y is black  # fp32 no better: keep going as configured
