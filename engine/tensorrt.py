"""The TensorRT backend (TensorRT 10.x and 11.x Python API; memory and streams through cuda-python).

An engine is built from the ONNX graph on first use - one optimisation profile over the
batch dimension (min/opt/max, from the batch the caller runs: see ``batch_range``), a
workspace limit and a persistent timing cache - and stored in the engine cache, keyed by
graph hash, GPU, compute capability, TensorRT version, precision and profile. Execution
uses named tensors: ``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3``.

Precision. TensorRT 10 keeps its weakly typed path: the float32 graph with
``BuilderFlag.FP16``, so TensorRT picks FP16 or FP32 per layer by speed (the path that
has been measured on GPUs; it is left as it was). TensorRT 11 has no weak typing (no
``BuilderFlag.FP16``, no ``platform_has_fast_fp16``): precision comes from the graph's
tensor types, so FP16 builds a strongly typed network from ``fp16.to_float16(graph)``
and FP32 one from the graph as it is. The choice follows the API that is there, not the
version number (``strongly_typed``); the cache key says which (``fp16-strong``) and
hashes the graph that was built.

Double buffering: two execution contexts, each with its own CUDA stream, pinned host
buffers and device buffers. ``submit()`` copies a batch in (straight from the caller's
array when it lies in this runner's page-locked memory, ``pinned_allocator``), enqueues it and its copy out on
the next slot's stream and returns; ``wait()`` synchronises that slot. So the copies of one
batch overlap the compute of the other.

Threading: calls are serialised by the runner's lock (several stream sessions may share the
runner); a handle stays valid when another caller reuses its slot (its outputs are kept).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnx

from segsynth.core import paths
from segsynth.core.errors import BackendError, ModelError
from segsynth.engine import cuda
from segsynth.engine.cache import EngineCache, EngineKey, graph_sha256, profile_string
from segsynth.engine.fp16 import to_float16
from segsynth.engine.onnxruntime import describe_onnx
from segsynth.engine.runner import Runner, TensorMeta

log = logging.getLogger("segsynth")
SUPPORTED_MAJORS = ("10", "11")
DEFAULT_BATCH = (1, 1, 8)


def import_tensorrt():
    """The ``tensorrt`` module, or BackendError when it is missing or of a major version
    this backend was not written for."""
    try:
        # imported here: TensorRT is optional (GPU machines)
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError("TensorRT is not installed here (pip install 'segsynth[tensorrt]' on a machine with an "
                           "NVIDIA GPU); use --backend onnxruntime or torch-cuda") from exc
    version = str(getattr(trt, "__version__", "unknown"))
    if version.split(".")[0] not in SUPPORTED_MAJORS:
        raise BackendError(f"TensorRT {version} is installed; segsynth supports TensorRT 10.x and 11.x "
                           "(pip install 'tensorrt>=10,<12'), or use --backend onnxruntime-cuda")
    return trt


def strongly_typed(trt) -> bool:
    """Whether this TensorRT takes precision from the graph's types only (TensorRT 11: the
    weak-typing flag BuilderFlag.FP16 is gone)."""
    return not hasattr(trt.BuilderFlag, "FP16")


def batch_range(batch: int | tuple[int, int, int] | None) -> tuple[int, int, int]:
    """The (min, opt, max) batch of the optimisation profile: an int b is the batch the
    caller runs, so (1, b, b) (TensorRT tunes its kernels for opt); a triple is taken as
    given; None is the default (1, 1, 8)."""
    if batch is None:
        return DEFAULT_BATCH
    if isinstance(batch, int) and not isinstance(batch, bool):
        batch = (1, batch, batch)
    try:
        lo, opt, hi = (int(b) for b in batch)
    except (TypeError, ValueError):
        raise BackendError(f"batch {batch!r}: expected a batch size or (min, opt, max)") from None
    if not 1 <= lo <= opt <= hi:
        raise BackendError(f"batch {batch!r}: expected 1 <= min <= opt <= max")
    return lo, opt, hi


def batch_profile(onnx_bytes: bytes, batch: tuple[int, int, int]) -> dict:
    """min/opt/max shapes for every input: the batch axis varies, every other axis is fixed."""

    inputs, _, _ = describe_onnx(onnx.load_from_string(onnx_bytes))
    shapes = {}
    for name, meta in inputs.items():
        rest = meta.shape[1:]
        if not all(isinstance(d, int) and d > 0 for d in rest):
            raise ModelError(f"input {name} has dynamic dimensions {meta.shape}; export it with a fixed --size")
        if isinstance(meta.shape[0], int) and meta.shape[0] > 0:  # a fixed batch (or an unbatched input)
            shapes[name] = ((meta.shape[0], *rest),) * 3
        else:
            shapes[name] = tuple((b, *rest) for b in batch)
    return shapes


def public_shape(engine_shape: tuple, graph_meta) -> tuple:
    """TensorRT gives dynamic dims as -1; the Runner contract names them (the graph's own name,
    e.g. "N", or "N" where the graph has none)."""
    names = graph_meta.shape if graph_meta is not None and len(graph_meta.shape) == len(engine_shape) else ()
    return tuple((names[i] if names and isinstance(names[i], str) else "N") if d == -1 else int(d)
                 for i, d in enumerate(engine_shape))


def timing_cache_name(key: EngineKey) -> str:
    """One timing cache per GPU model, compute capability and TensorRT version (tactic timings
    of one do not hold for another)."""

    gpu = re.sub(r"[^A-Za-z0-9]+", "-", key.gpu).strip("-")
    return f"timing-{gpu}-sm{key.compute_capability.replace('.', '')}-trt{key.tensorrt}.cache"


def build_engine(onnx_bytes: bytes, *, fp16: bool, shapes: dict, workspace_bytes: int,
                 timing_cache: Path | None = None, strong: bool = False) -> bytes:
    """Serialize an engine for ``onnx_bytes``. ``strong``: a strongly typed network, whose
    precision is the graph's own (pass a float16 graph for FP16); else TensorRT 10's weak
    typing, with ``fp16`` setting BuilderFlag.FP16."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None) if strong else None
    network = builder.create_network(0 if flag is None else 1 << int(flag))  # explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"TensorRT cannot parse the ONNX graph: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16 and not strong:
        if not builder.platform_has_fast_fp16:
            log.warning("warning: this GPU has no fast FP16; building FP32")
        else:
            config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # a cache of another GPU or version
        log.warning("warning: the timing cache %s does not fit this GPU/TensorRT; building without it", timing_cache)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    log.info("building a TensorRT %s%s engine (minutes on first use; cached afterwards)", "FP16" if fp16 else "FP32",
             ", strongly typed" if strong else "")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError("TensorRT could not build an engine for this graph (see the TensorRT log above)")
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(cache.serialize()))
    return bytes(serialized)


class _Slot:
    """One in-flight batch: an execution context with its stream and buffers."""

    def __init__(self, engine, io: dict[str, TensorMeta], max_shapes: dict[str, tuple]) -> None:
        self.context = engine.create_execution_context()
        self.stream = cuda.Stream()
        self.started, self.done = cuda.Event(), cuda.Event()  # timing events: the batch's device span
        self.host, self.device = {}, {}
        for name, meta in io.items():
            shape = max_shapes[name]
            self.host[name] = cuda.PinnedBuffer(shape, meta.dtype)
            self.device[name] = cuda.DeviceBuffer(self.host[name].nbytes)
        self.pending: _Pending | None = None

    def close(self) -> None:
        for buf in (*self.host.values(), *self.device.values()):
            buf.close()
        self.stream.close()
        self.started.close()
        self.done.close()


class _Pending:
    """The handle of one submitted batch: its slot until collected, then its outputs."""

    def __init__(self, slot: _Slot, shapes: dict[str, tuple], epoch) -> None:
        self.slot, self.shapes, self.outputs, self.epoch = slot, shapes, None, epoch
        self.span: tuple[float, float] | None = None

    def collect(self) -> dict[str, np.ndarray]:
        if self.outputs is None:
            slot = self.slot
            slot.done.synchronize()
            self.outputs = {name: slot.host[name].array.reshape(-1)[: int(np.prod(shape))].reshape(shape).copy()
                            for name, shape in self.shapes.items()}
            self.span = (slot.started.elapsed_ms(self.epoch), slot.done.elapsed_ms(self.epoch))
            slot.pending, self.slot = None, None
        return self.outputs


class TensorRTRunner(Runner):
    """``batch``: the batch the caller runs (an int b: profile (1, b, b)) or (min, opt, max);
    ``max_batch`` is the profile's max, so callers split larger batches into chunks."""

    name = "tensorrt"

    def __init__(self, onnx_path: str | Path, *, fp16: bool = True, batch: int | tuple[int, int, int] | None = None,
                 cache_dir: str | Path | None = None, workspace_bytes: int = 2 << 30, device: int = 0) -> None:
        super().__init__()
        self.onnx_path, self.fp16, self.batch = Path(onnx_path), fp16, batch_range(batch)
        self.max_batch = self.batch[2]
        self.label = self.onnx_path.name
        self.cache = EngineCache(Path(cache_dir) if cache_dir else paths.cache_dir() / "engines")
        self.workspace_bytes, self.device_index = workspace_bytes, device
        self._next = 0
        self._pools: list[cuda.PinnedPool] = []  # pinned_allocator()'s, until closed

    def _activate_impl(self) -> None:
        trt = import_tensorrt()
        dev = cuda.device(self.device_index)
        check = cuda.check
        check(cuda.runtime().cudaSetDevice(self.device_index), "cudaSetDevice")
        onnx_bytes = self.onnx_path.read_bytes()
        shapes = batch_profile(onnx_bytes, self.batch)
        strong = strongly_typed(trt)
        built = onnx_bytes
        if strong and self.fp16:  # TensorRT 11: FP16 is a float16 graph

            built = to_float16(onnx.load_from_string(onnx_bytes)).SerializeToString()
        precision = ("fp16" if self.fp16 else "fp32") + ("-strong" if strong else "")
        key = EngineKey(graph_sha256(built), dev.name, f"{dev.compute_capability[0]}.{dev.compute_capability[1]}",
                        trt.__version__, precision, profile_string(shapes))
        self.engine_path = self.cache.path(key)
        engine_bytes = self.cache.load(key)
        if engine_bytes is None:
            engine_bytes = build_engine(built, fp16=self.fp16, shapes=shapes, workspace_bytes=self.workspace_bytes,
                                        timing_cache=self.cache.directory / timing_cache_name(key), strong=strong)
            log.info("engine cached at %s", self.cache.store(key, engine_bytes))
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise BackendError(f"the cached engine {self.cache.path(key)} does not load here (built for another GPU "
                               "or TensorRT version?); delete it to rebuild")
        graph_inputs, graph_outputs, self.metadata = describe_onnx(onnx.load_from_string(onnx_bytes))
        io = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            meta = TensorMeta(name, np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))),
                              tuple(self.engine.get_tensor_shape(name)))
            io[name] = meta
            public = TensorMeta(name, meta.dtype, public_shape(meta.shape, {**graph_inputs, **graph_outputs}.get(name)))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs[name] = public
            else:
                self.outputs[name] = public
        max_shapes = {name: shapes[name][2] if name in shapes else tuple(
            self.batch[2] if d == -1 else d for d in meta.shape) for name, meta in io.items()}
        # the profile's batch over the inputs that have one (a fixed first dim, like the chain's remap
        # table (256,), is not a batch; a graph of fixed batch says so in its own input shapes)
        self.max_batch = min((max_shapes[name][0] for name, meta in self.inputs.items()
                              if meta.shape and isinstance(meta.shape[0], str)), default=self.batch[2])
        self.slots = [_Slot(self.engine, io, max_shapes) for _ in range(2)]
        self.epoch = cuda.Event()  # the zero of device_span's clock
        self.epoch.record(self.slots[0].stream)

    def submit(self, feed: dict[str, np.ndarray]) -> "_Pending":
        """Upload, run and download on the next slot's stream; returns at once. Several
        threads may submit: each gets its own handle, and a slot still holding an uncollected
        batch keeps that batch's outputs in its handle before the slot is reused."""
        with self._guard:
            slot = self.slots[self._next]
            self._next ^= 1
            if slot.pending is not None:  # its previous batch was never collected: keep it for its owner
                slot.pending.collect()
            ctx = slot.context
            slot.started.record(slot.stream)
            for name, array in feed.items():
                array = np.ascontiguousarray(array, dtype=self.inputs[name].dtype)
                source = self._pinned_address(array)  # page-locked already: uploaded straight from it
                if source is None:
                    host = slot.host[name].array.reshape(-1)[: array.size].reshape(array.shape)
                    np.copyto(host, array)
                    source = slot.host[name]
                slot.stream.copy_to_device(slot.device[name], source, array.nbytes)
                ctx.set_input_shape(name, array.shape)
            for name, buf in slot.device.items():
                ctx.set_tensor_address(name, int(buf.ptr))
            if not ctx.execute_async_v3(slot.stream.handle):
                raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
            shapes = {}
            for name, meta in self.outputs.items():
                shape = tuple(ctx.get_tensor_shape(name))
                nbytes = int(np.prod(shape)) * meta.dtype.itemsize
                slot.stream.copy_to_host(slot.host[name], slot.device[name], nbytes)
                shapes[name] = shape
            slot.done.record(slot.stream)
            slot.pending = _Pending(slot, shapes, self.epoch)
            return slot.pending

    def wait(self, handle: "_Pending") -> dict[str, np.ndarray]:
        with self._guard:
            return handle.collect()

    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.wait(self.submit(feed))

    def device_span(self, handle: "_Pending") -> tuple[float, float] | None:
        return handle.span

    def pinned_allocator(self) -> "cuda.PinnedPool":
        """A pool of page-locked buffers (one per caller: a session's pipeline frees its own
        with ``close()``; the rest are freed when the runner deactivates). ``submit`` uploads
        an input that lies in one of them directly, without a staging copy."""
        with self._guard:
            pool = cuda.PinnedPool(on_close=self._forget_pool)
            self._pools.append(pool)
            return pool

    def _forget_pool(self, pool) -> None:
        with self._guard:
            self._pools.remove(pool)

    def _pinned_address(self, array: np.ndarray) -> int | None:
        return next((a for a in (p.address(array) for p in self._pools) if a is not None), None)

    def _deactivate_impl(self) -> None:
        for slot in getattr(self, "slots", []):
            slot.close()
        for pool in list(self._pools):
            pool.close()
        if getattr(self, "epoch", None) is not None:
            self.epoch.close()
            self.epoch = None
        self.slots, self.engine, self.runtime = [], None, None
