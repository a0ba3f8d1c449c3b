"""Inference backends of the denoiser: one model, four ways to run it.

Every backend takes a batch ``(N, 1, H, W)`` float32 in [0, 1] (H, W multiples
of 4, see :mod:`cemi_stream.denoise.tiling`) and returns the network's output
of the same shape, float32, not clipped.  ``BACKEND_FACTORIES`` maps a name to
its class; :func:`create_backend` builds one by name, resolving ``"auto"``.

- ``cpu``: PyTorch on all CPU cores, channels-last memory layout.
- ``onnx``: the model exported once to ONNX (cached on disk, keyed by the
  weights' hash) and run by ONNX Runtime on the CPU.
- ``cuda``: PyTorch on the GPU in fp16 (or bf16) autocast, with a guard that
  falls back to fp32 when half precision overflows or collapses.
- ``tensorrt``: a TensorRT engine built with Torch-TensorRT per frame size,
  cached on disk keyed by weights hash, shape and GPU.

``auto`` picks tensorrt, else cuda, else onnx, else cpu (see :func:`auto_backend`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import ConfigError, DenoiseError

if TYPE_CHECKING:
    from torch import Tensor
    from torch import dtype as torch_dtype
    from torch.nn import Module

    from models.rrdbnet import RRDBNet
    from models.weights import ModelCard

log = logging.getLogger(__name__)

#: Backend names accepted by :func:`create_backend` (and the ``--backend`` option).
BACKENDS: tuple[str, ...] = ("auto", "cpu", "onnx", "cuda", "tensorrt")

#: ONNX opset of the exported graph (part of the cache key).
ONNX_OPSET = 17

TENSORRT_MISSING = (
    "tensorrt backend: torch-tensorrt is not installed (pip install -e .[tensorrt] on a "
    "machine that can reach NVIDIA's wheel index)"
)

# An output "collapses to black" when nearly every pixel rounds to grey level 0.
_BLACK_LEVEL = 0.5 / 255.0
_BLACK_SHARE = 0.999


@dataclass(frozen=True)
class BackendOptions:
    """Settings of the GPU backends (the CPU ones ignore them).

    Attributes
    ----------
    precision : {"fp16", "bf16", "fp32"}
        Arithmetic of the ``cuda`` backend's autocast (``tensorrt`` always
        builds fp16 engines).
    compile : bool
        Wrap the ``cuda`` model in ``torch.compile`` (slow first batch per
        frame size, faster afterwards).
    max_batch : int
        Largest batch a ``tensorrt`` engine is built for (larger batches are
        split); also its optimisation point.
    """

    precision: str = "fp16"
    compile: bool = False
    max_batch: int = 4

    def __post_init__(self) -> None:
        if self.precision not in ("fp16", "bf16", "fp32"):
            raise ConfigError(f"precision {self.precision!r}: expected one of fp16, bf16, fp32")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch: expected at least 1, got {self.max_batch}")


class Backend(Protocol):
    """What :class:`~cemi_stream.denoise.infer.Denoiser` needs from a backend."""

    name: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Denoise ``batch`` (N, 1, H, W) float32 in [0, 1] -> (N, 1, H, W) float32."""
        ...


BackendFactory = Callable[..., Backend]


def cache_root(cache_dir: Path | None = None) -> Path:
    """Folder for exported models and engines.

    ``cache_dir`` when given, else ``$CEMI_CACHE``, else
    ``~/.cache/cemi-stream``; ONNX files go to its ``onnx/`` and TensorRT
    engines to its ``tensorrt/`` subfolder.
    """
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("CEMI_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cemi-stream"


def _check_batch(batch: np.ndarray) -> np.ndarray:
    if not isinstance(batch, np.ndarray) or batch.ndim != 4 or batch.shape[1] != 1:
        shape = getattr(batch, "shape", None)
        raise DenoiseError(f"backend input: expected an array (N, 1, H, W), got {shape}")
    if batch.shape[2] % 4 or batch.shape[3] % 4 or 0 in batch.shape:
        raise DenoiseError(
            f"backend input: H and W must be positive multiples of 4 px, got {batch.shape}"
        )
    return np.ascontiguousarray(batch, dtype=np.float32)


def _model_hash(model_path: Path) -> str:
    from models.weights import model_hash

    return model_hash(model_path)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` into a temporary file beside ``path``, then rename it.

    Two processes exporting the same model at once then never read a half
    written file: each renames a complete one over the other.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the real suffix: some writers check it.
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class CpuBackend:
    """PyTorch on the CPU: all cores, channels-last, inference mode.

    Note that it sets ``torch.set_num_threads`` for the whole process.
    """

    name = "cpu"

    def __init__(
        self,
        model: RRDBNet,
        model_path: Path,
        card: ModelCard,
        cache_dir: Path | None = None,
        options: BackendOptions | None = None,
    ) -> None:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        self._torch = torch
        self.model = model.to("cpu").eval().to(memory_format=torch.channels_last)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Denoise ``batch`` (N, 1, H, W) float32 in [0, 1] -> (N, 1, H, W) float32."""
        torch = self._torch
        x = torch.from_numpy(_check_batch(batch)).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            y = self.model(x)
        return np.ascontiguousarray(y.float().numpy(), dtype=np.float32)


def export_onnx(model: RRDBNet, path: Path) -> None:
    """Export ``model`` to ONNX at ``path`` with dynamic batch, height and width.

    Uses the TorchScript-based exporter (``dynamo=False``): on the compact
    model it exports in ~1 s with correct dynamic shapes, where the
    ``torch.export``-based exporter also works (checked, same outputs) but
    takes ~15-20 s, too slow for a first run.  The legacy exporter's
    deprecation warning is silenced here; if a future torch drops it, the
    dynamo exporter is used instead.
    """
    import torch

    model = model.to("cpu").float().eval()
    example = torch.rand(1, 1, 64, 64)
    axes = {0: "batch", 2: "height", 3: "width"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": axes, "output": axes},
                opset_version=ONNX_OPSET,
            )
        return
    except (TypeError, RuntimeError, NotImplementedError) as exc:
        log.info("legacy ONNX exporter failed (%s); using the dynamo exporter", exc)
    from torch.export import Dim

    # RRDBNet folds 4 x 4 pixel blocks: H and W are declared multiples of 4.
    h4, w4 = Dim("h4", min=1, max=8192), Dim("w4", min=1, max=8192)
    batch = Dim("batch", min=1, max=1024)
    example = torch.rand(2, 1, 64, 64)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes={"x": {0: batch, 2: 4 * h4, 3: 4 * w4}},
        opset_version=max(ONNX_OPSET, 18),
    )
    if program is None:
        raise DenoiseError("onnx backend: the dynamo exporter returned no program")
    program.save(str(path))


class OnnxBackend:
    """ONNX Runtime on the CPU (all cores, all graph optimisations).

    The model is exported once to ``<cache>/onnx/<sha256 of weights>-opsetN.onnx``
    and reused by every later run of the same weights.
    """

    name = "onnx"

    def __init__(
        self,
        model: RRDBNet,
        model_path: Path,
        card: ModelCard,
        cache_dir: Path | None = None,
        options: BackendOptions | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise DenoiseError(
                "onnx backend: onnxruntime is not installed (pip install -e .[ml])"
            ) from None
        self._ort = ort
        digest = _model_hash(model_path)
        self.onnx_path = cache_root(cache_dir) / "onnx" / f"{digest}-opset{ONNX_OPSET}.onnx"
        if not self.onnx_path.is_file():
            self._export(model)
        try:
            self.session = self._session()
        except Exception as exc:  # onnxruntime raises its own error types
            # A cache file cut short by a crash or a full disk: export afresh, once.
            log.warning("%s: unusable cached ONNX model (%s); exporting again", self.onnx_path, exc)
            self._export(model)
            try:
                self.session = self._session()
            except Exception as exc2:
                raise DenoiseError(
                    f"{self.onnx_path}: ONNX Runtime cannot load it ({exc2})"
                ) from None
        self.input_name = self.session.get_inputs()[0].name

    def _export(self, model: RRDBNet) -> None:
        log.info("exporting %s to ONNX (once per model)", self.onnx_path.name)
        try:
            _write_atomically(self.onnx_path, lambda tmp: export_onnx(model, tmp))
        except OSError as exc:
            raise DenoiseError(f"{self.onnx_path}: cannot write the ONNX model ({exc})") from None

    def _session(self) -> Any:
        ort = self._ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(
            str(self.onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Denoise ``batch`` (N, 1, H, W) float32 in [0, 1] -> (N, 1, H, W) float32."""
        out = self.session.run(None, {self.input_name: _check_batch(batch)})[0]
        return np.ascontiguousarray(out, dtype=np.float32)


def _collapsed(y: Tensor) -> bool:
    """True when an output holds NaN/Inf or nearly all of it rounds to black."""
    import torch

    if not bool(torch.isfinite(y).all()):
        return True
    return float((y.abs() < _BLACK_LEVEL).float().mean()) >= _BLACK_SHARE


def _checked_first_batch(y: Tensor, fp32: Callable[[], Tensor], what: str) -> tuple[Tensor, bool]:
    """Guard a half-precision output: ``(output, fall_back_to_fp32)``.

    When ``y`` is NaN/Inf or black while the fp32 output (``fp32()``, computed
    only then) is not, the fp32 output is returned, a warning says so, and the
    caller runs fp32 for the rest of the run.
    """
    if not _collapsed(y):
        return y, False
    y32 = fp32()
    if _collapsed(y32):
        return y, False
    log.warning(
        "%s output of the first batch is NaN/Inf or black while fp32 is not; "
        "running fp32 for the rest of this run",
        what,
    )
    return y32, True


def _require_cuda(backend: str) -> Any:
    import torch

    if not torch.cuda.is_available():
        raise DenoiseError(f"{backend} backend: no CUDA device available")
    return torch


class CudaBackend:
    """PyTorch on the GPU in half-precision autocast, channels-last.

    fp16 overflows in some networks (activations above 65504 become Inf) or
    underflows to a black image.  The first batch is therefore checked: when
    its half-precision output holds NaN/Inf or is black while the fp32 output
    of the same batch is not, the backend logs a warning and runs fp32 for the
    rest of the run.
    """

    name = "cuda"

    def __init__(
        self,
        model: RRDBNet,
        model_path: Path,
        card: ModelCard,
        cache_dir: Path | None = None,
        options: BackendOptions | None = None,
    ) -> None:
        torch = _require_cuda("cuda")
        opts = options or BackendOptions()
        self._torch = torch
        self.device = torch.device("cuda")
        # cuDNN picks the fastest convolution per shape; frames of a run share one.
        torch.backends.cudnn.benchmark = True
        self.model = model.to(self.device).eval().to(memory_format=torch.channels_last)
        if opts.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise DenoiseError(
                f"cuda backend: {torch.cuda.get_device_name(0)} does not support bf16; "
                "use fp16 or fp32"
            )
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
        self.dtype: torch_dtype | None = dtypes[opts.precision]
        self.precision = opts.precision
        self.forward: Callable[[Tensor], Tensor] = (
            torch.compile(self.model) if opts.compile else self.model
        )
        self._checked = self.dtype is None

    def _infer(self, x: Tensor, dtype: torch_dtype | None) -> Tensor:
        torch = self._torch
        with (
            torch.inference_mode(),
            torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            return self.forward(x).float()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Denoise ``batch`` (N, 1, H, W) float32 in [0, 1] -> (N, 1, H, W) float32."""
        torch = self._torch
        x = torch.from_numpy(_check_batch(batch)).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        y = self._infer(x, self.dtype)
        if not self._checked:
            self._checked = True
            what = f"cuda backend: the {self.precision}"
            y, fall_back = _checked_first_batch(y, lambda: self._infer(x, None), what)
            if fall_back:
                self.dtype = None
                self.precision = "fp32"
        return np.ascontiguousarray(y.cpu().numpy(), dtype=np.float32)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


class TensorRTBackend:
    """A TensorRT fp16 engine per frame size, built with Torch-TensorRT.

    Each engine accepts batches of 1..``max_batch`` frames of one size
    (``torch_tensorrt.Input(min_shape, opt_shape, max_shape)``); it is saved as
    an ExportedProgram under ``<cache>/tensorrt/`` keyed by the weights' hash,
    the input shape, the GPU name and the Torch-TensorRT version (an engine is
    only valid on the GPU model and TensorRT release it was built for), and
    loaded with ``torch.export.load`` by later runs.

    The engine runs fp16 throughout: the model's weights are cast to half and
    the input is declared half, which TensorRT's explicit typing honours
    (``enabled_precisions`` is deprecated since Torch-TensorRT 2.8 and
    rejected together with ``use_explicit_typing``, the default since 2.10).
    The first batch is checked like the cuda backend's; a NaN/Inf or black
    engine output falls back to fp32 PyTorch on the GPU.
    """

    name = "tensorrt"

    def __init__(
        self,
        model: RRDBNet,
        model_path: Path,
        card: ModelCard,
        cache_dir: Path | None = None,
        options: BackendOptions | None = None,
    ) -> None:
        try:
            import torch_tensorrt
        except ImportError:
            raise DenoiseError(TENSORRT_MISSING) from None
        torch = _require_cuda("tensorrt")
        self._torch = torch
        self._trt = torch_tensorrt
        opts = options or BackendOptions()
        self.max_batch = opts.max_batch
        self.digest = _model_hash(model_path)
        self.folder = cache_root(cache_dir) / "tensorrt"
        self.gpu = _slug(torch.cuda.get_device_name(0))
        self.model_fp32 = model.to("cuda").float().eval()
        self._engines: dict[tuple[int, int], Callable[[Tensor], Tensor]] = {}
        self._fallback = False
        self._checked = False

    def engine_path(self, height: int, width: int) -> Path:
        """Cache file of the engine for ``height`` x ``width`` px frames."""
        version = _slug(str(getattr(self._trt, "__version__", "unknown")))
        key = f"{self.digest}-{height}x{width}-b{self.max_batch}-{self.gpu}-trt{version}"
        return self.folder / f"{key}.ep"

    def _engine(self, height: int, width: int) -> Callable[[Tensor], Tensor]:
        if (height, width) in self._engines:
            return self._engines[height, width]
        torch, trt = self._torch, self._trt
        path = self.engine_path(height, width)
        engine: Callable[[Tensor], Tensor] | None = None
        if path.is_file():
            try:
                engine = torch.export.load(str(path)).module()
            except Exception as exc:  # a stale or truncated engine: rebuild it
                log.warning("%s: cannot load the cached engine (%s); rebuilding", path, exc)
        if engine is None:
            log.info("building a TensorRT engine for %d x %d px frames (once)", height, width)
            spec = trt.Input(
                min_shape=(1, 1, height, width),
                opt_shape=(self.max_batch, 1, height, width),
                max_shape=(self.max_batch, 1, height, width),
                dtype=torch.half,
            )
            half = self._half_model()
            try:
                engine = trt.compile(half, ir="dynamo", inputs=[spec], use_explicit_typing=True)
            except Exception as exc:  # the TensorRT builder has many failure types
                raise DenoiseError(
                    f"tensorrt backend: building the {height}x{width} engine failed ({exc})"
                ) from None
            compiled = engine

            def save(tmp: Path) -> None:
                trt.save(compiled, str(tmp), output_format="exported_program", arg_inputs=[spec])

            try:
                _write_atomically(path, save)
            except Exception as exc:  # caching is an optimisation; keep the engine
                log.warning("%s: could not cache the TensorRT engine (%s)", path, exc)
        self._engines[height, width] = engine
        return engine

    def _half_model(self) -> Module:
        import copy

        return copy.deepcopy(self.model_fp32).half().eval()

    def _fp32(self, x: Tensor) -> Tensor:
        with self._torch.inference_mode():
            return self.model_fp32(x.float()).float()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Denoise ``batch`` (N, 1, H, W) float32 in [0, 1] -> (N, 1, H, W) float32."""
        torch = self._torch
        data = _check_batch(batch)
        outputs = []
        for start in range(0, data.shape[0], self.max_batch):
            x = torch.from_numpy(data[start : start + self.max_batch]).to("cuda")
            if self._fallback:
                y = self._fp32(x)
            else:
                engine = self._engine(x.shape[2], x.shape[3])
                with torch.inference_mode():
                    y = engine(x.half()).float()
                if not self._checked:
                    self._checked = True
                    what = "tensorrt backend: the fp16 engine's"
                    y, self._fallback = _checked_first_batch(
                        y, functools.partial(self._fp32, x), what
                    )
            outputs.append(y.cpu().numpy())
        return np.ascontiguousarray(np.concatenate(outputs), dtype=np.float32)


BACKEND_FACTORIES: dict[str, BackendFactory] = {
    "cpu": CpuBackend,
    "onnx": OnnxBackend,
    "cuda": CudaBackend,
    "tensorrt": TensorRTBackend,
}


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def auto_backend() -> str:
    """The backend ``"auto"`` stands for on this machine.

    ``tensorrt`` when torch-tensorrt is importable and a CUDA device is
    present, else ``cuda`` with a CUDA device, else ``onnx`` when onnxruntime
    is importable, else ``cpu``.  ONNX Runtime was the faster CPU backend
    in every measurement on the (shared, 2-core) build machine, so it is
    preferred without timing both at start-up: compact arch on a 1024 x 768
    frame 0.38-0.42 s (onnx) vs 0.44-0.47 s (cpu, channels-last; 0.80 s
    without channels-last); paper arch on 256 x 192, interleaved runs,
    0.70 s vs 0.83 s.  ``bench/bench_denoise.py`` measures both.
    """
    cuda = _cuda_available()
    if cuda and importlib.util.find_spec("torch_tensorrt") is not None:
        return "tensorrt"
    if cuda:
        return "cuda"
    if importlib.util.find_spec("onnxruntime") is not None:
        return "onnx"
    return "cpu"


def resolve_backend_name(name: str) -> str:
    """Check a backend name and resolve ``"auto"``.

    Raises
    ------
    ConfigError
        For a name not in :data:`BACKENDS` (the message lists them).
    """
    if name not in BACKENDS:
        raise ConfigError(f"backend {name!r}: unknown (choose from {', '.join(BACKENDS)})")
    return auto_backend() if name == "auto" else name


def create_backend(
    name: str,
    model: RRDBNet,
    model_path: Path,
    card: ModelCard,
    cache_dir: Path | None = None,
    options: BackendOptions | None = None,
) -> Backend:
    """Build the backend ``name`` (``"auto"`` resolved) for a loaded model.

    Parameters
    ----------
    name : str
        One of :data:`BACKENDS`.
    model : RRDBNet
        The loaded network (float32; a backend may move it to its device).
    model_path : Path
        Its ``.safetensors`` file (the hash keys the export caches).
    card : ModelCard
        Its model card.
    cache_dir : Path, optional
        Root of the export caches (see :func:`cache_root`).
    options : BackendOptions, optional
        GPU settings.

    Raises
    ------
    ConfigError
        Unknown backend name.
    DenoiseError
        The backend cannot run here (package or device missing).
    """
    resolved = resolve_backend_name(name)
    return BACKEND_FACTORIES[resolved](model, model_path, card, cache_dir, options)
