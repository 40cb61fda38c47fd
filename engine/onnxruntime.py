"""ONNX Runtime backend: the CPU runner that works everywhere, and ORT's CUDA / TensorRT
execution providers where onnxruntime-gpu is installed."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from segsynth.core import onnxmeta
from segsynth.core.errors import BackendError, ModelError
from segsynth.engine.runner import Runner, TensorMeta

log = logging.getLogger("segsynth")

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16}


def describe_onnx(proto) -> tuple[dict[str, TensorMeta], dict[str, TensorMeta], dict[str, str]]:
    """(inputs, outputs, segsynth metadata) of an ONNX ModelProto, without running it."""
    init = {t.name for t in proto.graph.initializer}

    def meta(v) -> TensorMeta:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        return TensorMeta(v.name, np.dtype(_ONNX_DTYPES.get(t.elem_type, np.float32)), dims)

    inputs = {v.name: meta(v) for v in proto.graph.input if v.name not in init}
    outputs = {v.name: meta(v) for v in proto.graph.output}
    return inputs, outputs, onnxmeta.read(proto)


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX file (or serialized bytes) with onnxruntime.

    ``threads``: intra-op threads (None = ORT's default, one per core). ``providers``:
    execution providers in priority order (CUDA / TensorRT ones need onnxruntime-gpu).
    ``optimized_model_path``: where ORT saves the optimised graph, so the next start can
    skip optimisation. ``io_binding``: inputs uploaded and outputs bound on the execution
    provider's device (one binding per calling thread, reused), so ORT makes no extra host
    copies around a device provider; only the outputs come back to the host.

    onnxruntime-gpu lists CUDAExecutionProvider even when its CUDA libraries cannot load,
    and then quietly builds a CPU session: the providers the session really got are checked,
    and a fallback to the CPU is said in one warning (``device`` tells which it runs on).
    """

    name = "onnxruntime"
    thread_safe = True  # InferenceSession.run may be called from several threads at once

    def __init__(self, model: str | Path | bytes, *, threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), graph_optimization: str = "all",
                 optimized_model_path: str | Path | None = None, io_binding: bool = False) -> None:
        super().__init__()
        if graph_optimization not in _OPT_LEVELS:
            raise BackendError(f"unknown graph optimisation level {graph_optimization!r}; "
                               f"choose one of {', '.join(_OPT_LEVELS)}")
        self.model, self.threads, self.providers = model, threads, providers
        self.graph_optimization, self.optimized_model_path = graph_optimization, optimized_model_path
        self.io_binding = io_binding
        self.session, self.device = None, "cpu"
        self._local = threading.local()
        if "CUDAExecutionProvider" in providers or "TensorrtExecutionProvider" in providers:
            self.name = "onnxruntime-cuda"

    @property
    def label(self) -> str:
        return "<in-memory model>" if isinstance(self.model, bytes) else Path(self.model).name

    def _activate_impl(self) -> None:
        available = set(ort.get_available_providers())
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise BackendError(f"onnxruntime here has no {', '.join(missing)} "
                               f"(available: {', '.join(sorted(available))}); install onnxruntime-gpu for CUDA")
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[self.graph_optimization])
        if self.optimized_model_path:
            opts.optimized_model_filepath = str(self.optimized_model_path)
        opts.log_severity_level = 3  # errors only; ORT's shape-merge warnings are noise here
        # Idle intra-op threads sleep instead of spinning: a process runs several sessions in turn (the
        # models of a chain, many streams), and on few cores a finished session's spinning threads slow
        # the next one (measured on 2 cores: segment + synth parts 411 -> 374 ms a frame, one graph 372 -> 365)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source = self.model if isinstance(self.model, bytes) else str(self.model)
        if not isinstance(self.model, bytes) and not Path(source).is_file():
            raise ModelError(f"{source}: no such ONNX file")
        try:
            self.session = ort.InferenceSession(source, opts, providers=list(self.providers))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.label}: not a usable ONNX model ({first})") from exc
        self.device = self._device(self.session.get_providers())
        self.inputs = {i.name: TensorMeta(i.name, np.dtype(_ORT_TYPES.get(i.type, np.float32)), tuple(i.shape))
                       for i in self.session.get_inputs()}
        self.outputs = {o.name: TensorMeta(o.name, np.dtype(_ORT_TYPES.get(o.type, np.float32)), tuple(o.shape))
                        for o in self.session.get_outputs()}
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def _device(self, active: list[str]) -> str:
        """"cuda" when the session really runs on a CUDA provider, else "cpu" (said once when a
        device provider was asked for and the session fell back)."""
        wanted = [p for p in self.providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
        if any(p in active for p in wanted):
            return "cuda"
        if wanted:
            log.warning("warning: %s: onnxruntime could not use %s (its CUDA/cuDNN libraries did not load, or no "
                        "GPU is visible); running on the CPU", self.label, " or ".join(wanted))
            self.name = "onnxruntime"
        return "cpu"

    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(self.outputs)
        if not self.io_binding:
            return dict(zip(names, self.session.run(names, feed)))

        binding = getattr(self._local, "binding", None)
        if binding is None:  # one per thread: an IOBinding must not be shared by concurrent runs
            binding = self._local.binding = self.session.io_binding()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in feed.items():
            array = np.ascontiguousarray(array)
            if self.device == "cpu":
                binding.bind_cpu_input(name, array)
            else:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, self.device, 0))
        for name in names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))

    def _deactivate_impl(self) -> None:
        self.session, self._local = None, threading.local()
