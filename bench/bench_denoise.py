"""Denoiser speed: frames/s of each backend on 1024 x 768 frames.

For the compact arch (the live stage's model) and the paper's full-size
ESRGAN generator (23 RRDB blocks, one timed frame only: it needs ~1.8 TFLOP
per frame), each available backend (cpu, onnx; cuda fp16/fp32 and tensorrt
when a GPU / torch-tensorrt is present) denoises whole 1024 x 768 frames
through :class:`cemi_stream.denoise.infer.Denoiser` (uint8 in, uint8 out:
padding, conversion and the backend call).  Warm-up first (it also pays the
one-time ONNX export / engine build, reported as ``init_s``), then the median
of N timed frames.  Speed does not depend on the weights, so random-
initialised networks are used unless a model file is given.  Also reported:
parameter counts and the analytic FLOP count (``generator_flops``).
Writes ``bench/results/denoise_speed.json``.

Usage: ``python -m bench.bench_denoise [--runs N] [--model PATH] [--paper-model PATH]
[--size WxH] [--skip-paper]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import write_result
from cemi_stream.denoise.infer import Denoiser
from models.rrdbnet import build_generator, count_parameters, generator_flops
from models.weights import ModelCard, load_model, save_model


def random_model(arch: str, folder: Path) -> Path:
    """Save a random-initialised generator of ``arch`` (speed needs no training)."""
    torch.manual_seed(0)
    card = ModelCard(name=f"random-{arch}", arch={}, training={"note": "random init (bench)"})
    return save_model(build_generator(arch), folder / f"random-{arch}.safetensors", card)


def backends_here() -> list[tuple[str, dict[str, Any]]]:
    """(backend, Denoiser options) pairs to time on this machine."""
    todo: list[tuple[str, dict[str, Any]]] = [("cpu", {})]
    if importlib.util.find_spec("onnxruntime") is not None:
        todo.append(("onnx", {}))
    if torch.cuda.is_available():
        todo += [("cuda", {"precision": "fp16"}), ("cuda", {"precision": "fp32"})]
        if importlib.util.find_spec("torch_tensorrt") is not None:
            todo.append(("tensorrt", {}))
    return todo


def time_backend(
    model: Path,
    backend: str,
    options: dict[str, Any],
    frame: np.ndarray,
    runs: int,
    cache_dir: Path,
) -> dict[str, Any]:
    """Median seconds per frame of one backend after one warm-up frame."""
    t0 = time.perf_counter()
    denoiser = Denoiser(model, backend, cache_dir=cache_dir, batch_size=1, **options)
    denoiser.denoise(frame)  # warm-up: export / engine build / cuDNN autotune
    init_s = time.perf_counter() - t0
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.process_time()
        denoiser.denoise(frame)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    median = float(np.median(wall))
    return {
        "backend": denoiser.backend,
        **options,
        "runs": runs,
        "init_s (load + export/build + first frame)": round(init_s, 3),
        "median_s_per_frame": round(median, 4),
        "min_s_per_frame": round(float(np.min(wall)), 4),
        "frames_per_s": round(1.0 / median, 3),
        "cpu_s_per_frame (process time, all threads)": round(float(np.median(cpu)), 4),
    }


def bench_arch(
    arch: str, model: Path, frame: np.ndarray, runs: int, cache_dir: Path
) -> dict[str, Any]:
    """Time every backend on one model; FLOP count for the frame size."""
    net, card = load_model(model)
    height, width = frame.shape
    flops = generator_flops(card.arch, height, width)
    out: dict[str, Any] = {
        "model": str(model) if not card.name.startswith("random-") else "random init",
        "arch": card.arch,
        "parameters": count_parameters(net),
        "gflop_per_frame": round(flops / 1e9, 1),
        "backends": [],
    }
    for backend, options in backends_here():
        label = backend + (f" {options['precision']}" if options else "")
        print(f"{arch}: {label} ...", flush=True)
        result = time_backend(model, backend, options, frame, runs, cache_dir)
        result["gflop_per_s"] = round(flops / 1e9 / result["median_s_per_frame"], 1)
        print(f"  {json.dumps(result)}", flush=True)
        out["backends"].append(result)
    return out


def main() -> None:
    """Time the compact and paper generators on every available backend."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed frames (compact arch)")
    parser.add_argument("--model", type=Path, help="compact model file (default: random init)")
    parser.add_argument("--paper-model", type=Path, help="paper-arch model file (default: random)")
    parser.add_argument("--size", default="1024x768", help="frame WxH in pixels")
    parser.add_argument("--skip-paper", action="store_true", help="time the compact arch only")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    frame = np.random.default_rng(0).integers(0, 256, (height, width), dtype=np.uint8)
    load_before = os.getloadavg()[0]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-denoise-") as tmp:
        folder = Path(tmp)
        cache_dir = folder / "cache"  # random models: do not fill the user's cache
        compact = args.model or random_model("compact", folder)
        results["compact"] = bench_arch("compact", compact, frame, args.runs, cache_dir)
        if not args.skip_paper:
            paper = args.paper_model or random_model("paper", folder)
            results["paper"] = bench_arch("paper", paper, frame, 1, cache_dir)
    path = write_result(
        "denoise_speed",
        {
            "frames": f"{width} x {height} px uint8, whole frame (no tiling), batch 1",
            "what": "Denoiser.denoise(frame) wall time: median of the timed frames after "
            "one warm-up frame; the paper arch is timed on one frame only",
            "versions": {
                "torch": torch.__version__,
                "onnxruntime": _version("onnxruntime"),
                "torch_tensorrt": _version("torch_tensorrt"),
            },
            "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "paper_gflop_per_1024x768_frame": round(generator_flops("paper", 768, 1024) / 1e9, 1),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "results": results,
        },
    )
    print(f"wrote {path}")


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    return str(getattr(__import__(module), "__version__", "unknown"))


if __name__ == "__main__":
    main()
