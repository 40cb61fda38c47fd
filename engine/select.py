"""Choosing an inference backend and making its Runner for a model file.

``open_runner(model, "auto", ...)`` is the entry point for the pipeline: it makes and
activates a Runner, and when auto's first choice cannot serve this model (TensorRT missing
or of an unsupported version, its parser or builder refusing the graph), it says why in
one warning and takes the next usable backend. A backend named explicitly is used or fails
with its own clear error.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import onnxruntime

from segsynth.core.errors import BackendError, ModelError
from segsynth.core.grammar import BACKENDS
from segsynth.engine import cuda
from segsynth.engine.fp16 import cached_float16
from segsynth.engine.onnxruntime import (
    OnnxRuntimeRunner,  # imports no onnxruntime until a runner activates
)
from segsynth.engine.runner import Runner
from segsynth.engine.tensorrt import TensorRTRunner, import_tensorrt
from segsynth.engine.torch_runner import TorchCudaRunner

log = logging.getLogger("segsynth")
Batch = int | tuple[int, int, int] | None


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _ort_cuda() -> bool:
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _torch_cuda() -> bool:
    if not _has("torch"):
        return False
    # imported here: torch is optional: importing segsynth.engine must not import it
    import torch

    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _say_once(line: str) -> None:
    log.warning("%s", line)


@functools.lru_cache(maxsize=1)
def _tensorrt_usable() -> bool:
    """TensorRT imports and is a version the backend supports; said once when it is not."""

    try:
        import_tensorrt()
    except BackendError as exc:
        log.warning("warning: auto backend: not using TensorRT (%s)", exc)
        return False
    return True


def backend_candidates() -> list[tuple[str, str]]:
    """The backends ``auto`` may use here, best first, each with why: TensorRT >
    onnxruntime-cuda > torch-cuda > onnxruntime (CPU, always last)."""

    problem = cuda.gpu_problem() if _has("cuda") else "cuda-python is not installed"
    gpu = problem is None
    if not gpu and _has("tensorrt"):  # TensorRT is here but cuda-python cannot reach the GPU
        _say_once(f"warning: auto backend: cuda-python sees no GPU ({problem}); TensorRT is not used")
    out = []
    if gpu and _has("tensorrt") and _tensorrt_usable():
        out.append(("tensorrt", "TensorRT and a GPU are present"))
    if _ort_cuda() and (gpu or _torch_cuda()):
        out.append(("onnxruntime-cuda", "onnxruntime-gpu and a GPU are present"))
    if _torch_cuda():
        out.append(("torch-cuda", "torch sees a CUDA GPU"))
    return [*out, ("onnxruntime", "no GPU backend is usable here")]


def resolve_backend(name: str = "auto") -> str:
    """``auto`` picks the first of ``backend_candidates()``. A GPU pick is announced; the CPU
    fallback (the expected case on machines without one) is logged at debug level so it
    never crowds errors."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    choice, why = backend_candidates()[0]
    log.log(logging.DEBUG if choice == "onnxruntime" else logging.INFO, "backend: %s (%s)", choice, why)
    return choice


def make_runner(model: str | Path, backend: str, *, fp16: bool = True, threads: int | None = None,
                cache_dir: Path | None = None, batch: Batch = None) -> Runner:
    """A Runner (not yet active) for an ONNX file on ``backend`` ("auto" is resolved here).

    ``fp16`` applies to GPU backends only: TensorRT builds FP16, onnxruntime-cuda runs the
    graph's float16 form (``fp16.to_float16``, cached in ``cache_dir/fp16``), torch-cuda
    computes in half. ``batch``: the batch the caller will run (int b: TensorRT's profile
    is (1, b, b)) or (min, opt, max); None: TensorRT's default (1, 1, 8). The runner's
    ``max_batch`` says how large one call may be. ``cache_dir``: segsynth's cache root
    (TensorRT engines go to ``cache_dir/engines``)."""
    backend = resolve_backend(backend)
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(model, threads=threads)
    if backend == "onnxruntime-cuda":
        cuda_providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
        if fp16:
            return Float16OnnxRuntimeRunner(model, cache_dir, threads=threads, providers=cuda_providers,
                                             io_binding=True)
        return OnnxRuntimeRunner(model, threads=threads, providers=cuda_providers, io_binding=True)
    if backend == "torch-cuda":
        return TorchCudaRunner(model, fp16=fp16)
    if backend == "tensorrt":
        return TensorRTRunner(model, fp16=fp16, batch=batch, cache_dir=cache_dir / "engines" if cache_dir else None)
    raise BackendError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


def open_runner(model: str | Path, backends: str | Sequence[str] = "auto", *, fp16: bool = True,
                threads: int | None = None, cache_dir: Path | None = None, batch: Batch = None) -> Runner:
    """An active Runner for ``model``: ``make_runner(...).activate()`` on the first of
    ``backends`` that can serve it. ``backends``: one name (used or failing with its own
    error), "auto" (``backend_candidates()``) or names to try in order. Each backend that
    cannot serve the model (BackendError, ModelError) is skipped with one warning line;
    the last one's error is raised."""
    if isinstance(backends, str):
        names = [name for name, _ in backend_candidates()] if backends == "auto" else [resolve_backend(backends)]
    else:
        names = [resolve_backend(name) for name in backends]
    label = Path(model).name
    for i, name in enumerate(names):
        try:
            runner = make_runner(model, name, fp16=fp16, threads=threads, cache_dir=cache_dir, batch=batch)
            return runner.activate()
        except (BackendError, ModelError) as exc:
            if i == len(names) - 1:
                raise
            log.warning("warning: %s cannot run %s here (%s); using %s", name, label, exc, names[i + 1])
    raise BackendError("no backend to try")  # only for an empty sequence


class Float16OnnxRuntimeRunner(OnnxRuntimeRunner):
    """onnxruntime on the float16 form of a graph (``fp16.cached_float16``), converted or
    found in the cache on ``activate``, so making the runner stays cheap."""

    def __init__(self, model: str | Path, cache_dir: Path | None, **options) -> None:
        super().__init__(model, **options)
        self.source, self.cache_dir = Path(model), cache_dir

    @property
    def label(self) -> str:
        return self.source.name

    def _activate_impl(self) -> None:
        self.model = cached_float16(self.source, self.cache_dir)
        super()._activate_impl()
