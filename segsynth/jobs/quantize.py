"""int8 static quantisation of segsynth's graphs (``segsynth export quantize``).

onnxruntime's QDQ quantisation: weights int8 per output channel, activations uint8 per tensor
with ranges calibrated on frames of real video (min/max for segmenters, the 99.99th percentile
for generators); what the quantiser has no integer kernel for (argmax, class table,
confidence, instance norm) stays float, and so do the convolutions that make the outputs.
On CPUs with VNNI, onnxruntime runs each DequantizeLinear -> Conv -> QuantizeLinear as one
integer convolution.

Calibration inputs are what the model sees at run time: for a segmenter the frames resized to
its input and normalised as its metadata says; for a generator the label maps the default
segmenter (ade20k+voc) makes of those frames, at the generator's size. Frames are taken evenly
spaced over each video, so the same videos give the same graph.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import av
import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from segsynth.core import onnxmeta
from segsynth.core.errors import InputError
from segsynth.engine.select import open_runner
from segsynth.stream.infer.generator import Generator
from segsynth.stream.infer.segmenter import OnnxSegmenter, load_segmenter
from segsynth.stream.io.mux import atomic_output
from segsynth.stream.pictures import resize_labels, resize_rgb

log = logging.getLogger("segsynth")
QUANTIZED_OPS = None  # every op the quantiser supports (Conv, Clip, Add, Mul, Concat, Resize...)


def _span(spec: str) -> tuple[Path, float, float]:
    """VIDEO or VIDEO#START-END (seconds): the part of a video to take frames from."""
    path, _, span = str(spec).partition("#")
    if not span:
        return Path(path), 0.0, float("inf")
    try:
        start, end = (float(v) for v in span.split("-"))
    except ValueError:
        raise InputError(f"--calibrate {spec}: expected VIDEO#START-END in seconds, e.g. clip.mp4#0-7") from None
    if not 0 <= start < end:
        raise InputError(f"--calibrate {spec}: START must be before END")
    return Path(path), start, end


def sample_frames(videos: list, count: int) -> list[np.ndarray]:
    """``count`` RGB frames (H x W x 3 uint8) spread evenly over the videos; a picture (PNG, JPEG)
    is one frame, the videos share the rest equally; ``VIDEO#START-END`` takes frames from those
    seconds only."""

    spans = [_span(spec) for spec in videos]

    def part(container, start, end):
        return (f for f in container.decode(video=0) if f.time is not None and start <= f.time < end)

    totals = []
    for spec, (path, start, end) in zip(videos, spans):
        try:
            with av.open(str(path)) as container:  # counted first: only the picked frames are kept
                totals.append(sum(1 for _ in part(container, start, end)))
        except (OSError, av.FFmpegError) as exc:
            raise InputError(f"--calibrate {path}: cannot read it as a video ({exc})") from None
        if not totals[-1]:
            raise InputError(f"--calibrate {spec}: no video frames there")
    stills = sum(t == 1 for t in totals)
    moving = len(totals) - stills
    left = max(count - stills, moving)
    shares = iter([left // moving + (i < left % moving) for i in range(moving)]) if moving else iter(())
    frames = []
    for (path, start, end), total in zip(spans, totals):
        want = 1 if total == 1 else next(shares)
        picks = set(np.linspace(0, total - 1, num=want).round().astype(int).tolist())
        with av.open(str(path)) as container:
            frames += [f.to_ndarray(format="rgb24") for i, f in enumerate(part(container, start, end)) if i in picks]
    return frames


def _float_weights(model) -> None:
    """Fold Cast(fp16 initializer -> fp32) into an fp32 initializer (generators store their
    weights in fp16); the quantiser needs the float weights of each Conv."""

    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        src = inits.get(node.input[0]) if node.op_type == "Cast" else None
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if src is not None and src.data_type == onnx.TensorProto.FLOAT16 and to == onnx.TensorProto.FLOAT:
            model.graph.initializer.append(numpy_helper.from_array(
                numpy_helper.to_array(src).astype(np.float32), node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {name for node in model.graph.node for name in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _calibration_inputs(path: Path, frames: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One feed per frame, as the runtime would build it for this graph."""

    runner = open_runner(path, "onnxruntime")
    role = runner.metadata.get(onnxmeta.ROLE)
    if role == "segmenter":
        seg = OnnxSegmenter(runner, path=path)
        w, h = seg.size
        feeds = []
        for frame in frames:
            x = resize_rgb(frame, w, h)[None]
            x = x[..., ::-1] if seg.bgr else x
            feeds.append({seg.input_name: np.ascontiguousarray(
                x.astype(np.float32).transpose(0, 3, 1, 2) * seg.scale + seg.offset)})
        seg.close()
        return feeds
    if role == "generator":
        gen = Generator(runner, path=path)
        w, h = gen.size
        labeller = load_segmenter("ade20k+voc")
        sw, sh = labeller.size
        feeds = []
        for frame in frames:
            ids = resize_labels(labeller(resize_rgb(frame, sw, sh)[None]), w, h).astype(np.int64)[:, None]
            feed = {"label": ids}
            if gen.uses_instance:
                feed["instance"] = ids
            if gen.uses_z:
                feed["z"] = gen.seeded_z(len(feeds))  # styles as seeds draw them at run time
            feeds.append(feed)
        labeller.close()
        gen.close()
        return feeds
    runner.deactivate()
    raise InputError(f"{path}: segsynth.role is {role!r}; quantize takes a segsynth segmenter or generator graph")


class _Feeds:
    """onnxruntime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):  # part of the interface; onnxruntime's min/max and percentile calibration read once
        raise NotImplementedError


def _last_convs(model) -> list[str]:
    """The convolutions that make a graph's outputs (through shape-only and elementwise ops):
    kept in float, so the logits the argmax compares and the picture keep float precision; one
    layer each, cheap. (Measured on ADE20K: it changes the labels' agreement with the float
    graph little, 0.914 either way; what int8 costs there comes from the layers before.)"""
    producers = {o: n for n in model.graph.node for o in n.output}
    found, todo, seen = [], [o.name for o in model.graph.output], set()
    while todo:
        node = producers.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "Conv":
            found.append(node.name)
            continue
        todo += [i for i in node.input if i]
    return found


def quantize(model_path: Path, out: Path, videos: list[Path], *, frames: int = 48) -> str:
    """Write ``out``: the int8 QDQ version of ``model_path`` calibrated on ``frames`` frames of ``videos``."""

    if not videos:
        raise InputError("export quantize needs --calibrate VIDEO [VIDEO ...]")
    if frames < 1:
        raise InputError("--frames must be at least 1")
    try:
        model = onnx.load(str(model_path))
    except Exception as exc:  # noqa: BLE001 - unreadable, or not protobuf: onnx raises several kinds
        raise InputError(f"{model_path}: not an ONNX model ({exc})") from None
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise InputError(f"{model_path} is quantised already")
    feeds = _calibration_inputs(model_path, sample_frames(videos, frames))
    frames = len(feeds)  # a picture gives one frame however many were asked of it
    _float_weights(model)
    meta = onnxmeta.read(model)
    digest = hashlib.sha256()
    for spec in videos:
        digest.update(_span(spec)[0].read_bytes())
    method = "99.99th percentile" if meta.get(onnxmeta.ROLE) == "generator" else "min/max"
    meta.update({onnxmeta.QUANTIZED: f"int8 QDQ (weights int8 per channel, activations uint8, {method} ranges)",
                 onnxmeta.CALIBRATION: f"{frames} frames of {', '.join(Path(str(v)).name for v in videos)} "
                                         f"(sha256 {digest.hexdigest()[:16]})",
                 onnxmeta.FLOAT_SOURCE: Path(model_path).name})
    with tempfile.TemporaryDirectory() as tmp:
        floated = Path(tmp) / "float.onnx"
        onnx.save(model, str(floated))
        quantized = Path(tmp) / "int8.onnx"
        # generators: ranges at the 99.99th percentile (measured on the first edition: 31.9 dB from
        # the float picture against 30.0 with min/max); segmenters: min/max. Percentile keeps every
        # activation of every frame: 48 frames at 513 x 513, or of a 256 x 256 generator, need over
        # 24 GB (scripts/quantize-bundled calibrates the generator on 12)
        generator = meta.get(onnxmeta.ROLE) == "generator"
        quantize_static(str(floated), str(quantized), _Feeds(feeds), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=_last_convs(model),
                        calibrate_method=CalibrationMethod.Percentile if generator else CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "CalibPercentile": 99.99})
        result = onnx.load(str(quantized))
    onnxmeta.write(result, meta)
    with atomic_output(out, model_path) as tmp:
        onnx.save(result, str(tmp))
    convs = sum(n.op_type in ("Conv", "MatMul", "Gemm") for n in result.graph.node)
    return (f"wrote {out} (int8 QDQ, {convs} convolutions, calibrated on {frames} frames; "
            f"{out.stat().st_size / 2**20:.1f} MiB from {Path(model_path).stat().st_size / 2**20:.1f} MiB)")
