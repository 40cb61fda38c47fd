"""Choosing an inference backend and making its Runner for a model file."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from segsynth.errors import BackendError

from .runner import Runner

log = logging.getLogger("segsynth")
BACKENDS = ("auto", "tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime")
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda", "torch-cuda")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _ort_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _torch_cuda() -> bool:
    if not _has("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_backend(name: str = "auto") -> str:
    """``auto`` picks TensorRT > onnxruntime-cuda > torch-cuda > onnxruntime (CPU) by what is
    installed and whether a GPU is present. A GPU pick is announced; the CPU fallback (the
    expected case on machines without one) is logged at debug level so it never crowds errors."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    from . import cuda

    gpu = cuda.gpu_available() if _has("cuda") else False
    if gpu and _has("tensorrt"):
        choice, why = "tensorrt", "TensorRT and a GPU are present"
    elif _ort_cuda() and (gpu or _torch_cuda()):
        choice, why = "onnxruntime-cuda", "onnxruntime-gpu and a GPU are present (no TensorRT)"
    elif _torch_cuda():
        choice, why = "torch-cuda", "torch sees a CUDA GPU (no TensorRT, no onnxruntime-gpu)"
    else:
        log.debug("backend: onnxruntime (no GPU backend is usable here)")
        return "onnxruntime"
    log.info("backend: %s (%s)", choice, why)
    return choice


def make_runner(model: str | Path, backend: str, *, fp16: bool = True, threads: int | None = None,
                cache_dir: Path | None = None, batch: tuple[int, int, int] = (1, 1, 8)) -> Runner:
    """A Runner for an ONNX file on a resolved backend (FP16 applies to GPU backends only)."""
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(model, threads=threads)
    if backend == "onnxruntime-cuda":
        from .onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(model, threads=threads, providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                                 io_binding=True)
    if backend == "torch-cuda":
        from .torch_runner import TorchCudaRunner

        return TorchCudaRunner(model, fp16=fp16)
    if backend == "tensorrt":
        from .tensorrt import TensorRTRunner

        return TensorRTRunner(model, fp16=fp16, batch=batch, cache_dir=cache_dir / "engines" if cache_dir else None)
    raise BackendError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
