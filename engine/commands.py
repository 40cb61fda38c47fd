"""``segsynth engine build | info | compare``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx

from segsynth.core import onnxmeta
from segsynth.core.errors import InputError
from segsynth.engine.onnxruntime import describe_onnx
from segsynth.engine.select import make_runner, resolve_backend
from segsynth.engine.tensorrt import TensorRTRunner, import_tensorrt

log = logging.getLogger("segsynth")


def build(onnx_path: Path, *, fp16: bool, batch: int | tuple[int, int, int], cache_dir: Path | None) -> str:
    """Build (or find) the TensorRT engine for ``onnx_path`` in the engine cache. ``batch``:
    the batch it will run (N: profile 1..N, tuned for N) or (min, opt, max)."""

    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: no such ONNX file")
    with TensorRTRunner(onnx_path, fp16=fp16, batch=batch, cache_dir=cache_dir) as runner:
        path, (lo, opt, hi) = runner.engine_path, runner.batch
    return f"engine for {onnx_path.name} ({'FP16' if fp16 else 'FP32'}, batch {lo}..{hi}, tuned for {opt}) in {path}"


def info(path: Path) -> list[str]:
    """Bindings, shapes, precision and the GPU an engine was built for; for ONNX files, the graph's I/O."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    lines = []
    if path.suffix == ".onnx":
        inputs, outputs, meta = describe_onnx(onnx.load(str(path), load_external_data=False))
        for kind, tensors in (("input", inputs), ("output", outputs)):
            for t in tensors.values():
                lines.append(f"{kind:6} {t.name:10} {t.dtype.name:8} {list(t.shape)}")
        lines += [f"meta   {k} = {v}" for k, v in sorted(meta.items())]
        return lines
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise InputError(f"{path}: not an engine from segsynth's cache (no {sidecar.name} beside it)")
    key = json.loads(sidecar.read_text())
    lines += [f"built for {key['gpu']} (sm {key['compute_capability']}), TensorRT {key['tensorrt']}, "
              f"{key['precision']}", f"profile {key['profile']}", f"graph sha256 {key['graph_sha256']}"]
    try:
        trt = import_tensorrt()
        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            lines.append("this engine does not load here (another GPU or TensorRT version): rebuild it")
        else:
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
                lines.append(f"{mode:6} {name:10} {engine.get_tensor_dtype(name)} {list(engine.get_tensor_shape(name))}")
    except Exception as exc:  # noqa: BLE001 - info still shows what the sidecar knows
        lines.append(f"(bindings not shown: {exc})")
    return lines


def _inputs(runner, batch: int, inputs_file: Path | None) -> dict[str, np.ndarray]:
    if inputs_file is not None:
        if not inputs_file.is_file():
            raise InputError(f"{inputs_file}: no such inputs file")
        with np.load(inputs_file) as data:
            return {name: data[name] for name in runner.inputs}
    rng = np.random.default_rng(0)
    label_nc = int(runner.metadata.get(onnxmeta.LABEL_NC, 2))
    feed = {}
    for name, meta in runner.inputs.items():
        shape = tuple(batch if not isinstance(d, int) or d <= 0 else d for d in meta.shape)
        if name == "remap":
            feed[name] = np.arange(256, dtype=np.uint8)
        elif meta.dtype == np.uint8:
            feed[name] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif np.issubdtype(meta.dtype, np.integer):  # label / instance maps: blocky random classes
            blocks = rng.integers(0, label_nc, (*shape[:-2], max(1, shape[-2] // 8), max(1, shape[-1] // 8)))
            feed[name] = blocks.repeat(8, -2).repeat(8, -1)[..., : shape[-2], : shape[-1]].astype(meta.dtype)
        else:
            feed[name] = rng.uniform(-1, 1, shape).astype(meta.dtype)
    return feed


def compare_outputs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per output: max/mean abs difference; PSNR for images; argmax agreement for logits; equality
    for integer labels."""
    report = {}
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            report[name] = {"error": f"shapes differ: {x.shape} vs {y.shape}"}
            continue
        if np.issubdtype(x.dtype, np.integer) and np.issubdtype(y.dtype, np.integer) and name != "image":
            report[name] = {"agreement": float((x == y).mean())}
            continue
        x, y = x.astype(np.float64), y.astype(np.float64)
        diff = np.abs(x - y)
        entry = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
        if name == "image" or name.startswith("image"):
            span = max(float(x.max() - x.min()), 1e-12)
            mse = float((diff**2).mean())
            entry["psnr_db"] = float("inf") if mse == 0 else float(10 * np.log10(span**2 / mse))
        if name == "logits" and x.ndim == 4:
            entry["argmax_agreement"] = float((x.argmax(1) == y.argmax(1)).mean())
        report[name] = entry
    return report


def compare(a: Path, b: Path, *, backend_a: str, backend_b: str, fp16_a: bool, fp16_b: bool, batch: int,
            inputs_file: Path | None, cache_dir: Path | None) -> dict[str, dict]:
    runners = [make_runner(path, resolve_backend(backend), fp16=fp16, cache_dir=cache_dir, batch=batch)
               for path, backend, fp16 in ((a, backend_a, fp16_a), (b, backend_b, fp16_b))]
    with runners[0] as ra, runners[1] as rb:
        if set(ra.inputs) != set(rb.inputs):
            raise InputError(f"{a.name} and {b.name} take different inputs: {sorted(ra.inputs)} vs {sorted(rb.inputs)}")
        feed = _inputs(ra, batch, inputs_file)
        return compare_outputs(ra.infer(feed), rb.infer(feed))
