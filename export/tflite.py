"""Convert a DeepLab TFLite flatbuffer into an ONNX segmenter (NCHW, float, argmax inside).

Why by hand: tflite2onnx fails on these graphs (SPACE_TO_BATCH_ND) and tf2onnx needs all
of TensorFlow at conversion time and still leaves graphs that onnxruntime rejects (float
Resize scales) or runs 3x slower (atrous convolutions emulated with Pad/SpaceToDepth).
DeepLab-MobileNet graphs use a dozen ops, so a direct converter is small and exact:

* every activation is kept NCHW; weights are transposed once (OHWI -> OIHW);
* int8/uint8 weights and int32 biases are dequantised to float32 (scale * (q - zero_point));
  activations are computed in float, so quantised graphs are emulated, not reproduced bit
  for bit (the parity test measures argmax agreement against the TFLite interpreter);
* ``SPACE_TO_BATCH_ND -> (DEPTHWISE_)CONV_2D(VALID) -> BATCH_TO_SPACE_ND`` - TensorFlow's
  way of writing an atrous convolution - becomes one ``Conv(dilations=block)``;
* the argmax and a lookup table from model class to label-set id are appended, so the
  graph outputs ``labels`` (N x H x W uint8) ready for remapping and synthesis.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from segsynth.core import labels, onnxmeta
from segsynth.core.errors import ModelError

if TYPE_CHECKING:  # imported lazily at run time
    import onnx

OPSET = 17
_ACT = {0: None, 1: (0.0, None), 2: (-1.0, 1.0), 3: (0.0, 6.0)}  # TFLite fused activations
_NP_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
_NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: type
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    axis: int
    data: np.ndarray | None  # constant contents (raw, still quantised), None for activations

    def dequantized(self) -> np.ndarray:
        data = self.data.astype(np.float32)
        if self.scale is None or self.dtype in (np.float32, np.float16):
            return data
        shape = [1] * data.ndim
        if self.scale.size > 1:
            shape[self.axis] = -1
        return (data - self.zero_point.reshape(shape)) * self.scale.reshape(shape).astype(np.float32)


@dataclass
class _Op:
    code: str
    inputs: list[int]
    outputs: list[int]
    options: object


def _read(path: Path) -> tuple[list[_Tensor], list[_Op], list[int], list[int]]:
    try:
        # imported here: the TFLite reader is the export extra
        import tflite
        from tflite.BuiltinOperator import BuiltinOperator
    except ImportError as exc:  # pragma: no cover - part of the export extra
        raise ModelError("converting TFLite needs the 'tflite' package: pip install 'segsynth[export]'") from exc
    buf = path.read_bytes()
    try:
        model = tflite.Model.GetRootAsModel(buf, 0)
        graph = model.Subgraphs(0)
        if graph is None:
            raise ValueError("no subgraph")
    except Exception as exc:
        raise ModelError(f"{path} is not a TFLite model ({exc})") from exc
    code_names = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
    tensors = []
    for i in range(graph.TensorsLength()):
        t = graph.Tensors(i)
        q = t.Quantization()
        scale = q.ScaleAsNumpy() if q is not None and q.ScaleLength() else None
        zp = q.ZeroPointAsNumpy() if scale is not None else None
        dtype = _NP_TYPES.get(t.Type())
        raw = model.Buffers(t.Buffer()).DataAsNumpy() if t.Buffer() else 0
        data = None
        if not isinstance(raw, int) and raw.size:
            if dtype is None:
                raise ModelError(f"{path}: tensor {t.Name().decode()} has unsupported type {t.Type()}")
            data = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(t.ShapeAsNumpy())
        tensors.append(_Tensor(t.Name().decode(), tuple(int(d) for d in t.ShapeAsNumpy()), dtype,
                               scale, zp, q.QuantizedDimension() if q is not None else 0, data))
    ops = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        oc = model.OperatorCodes(op.OpcodeIndex())
        code = code_names.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()), "CUSTOM")
        options = None
        table = op.BuiltinOptions()
        cls = {"CONV_2D": "Conv2DOptions", "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions",
               "ADD": "AddOptions", "MUL": "MulOptions", "AVERAGE_POOL_2D": "Pool2DOptions",
               "RESIZE_BILINEAR": "ResizeBilinearOptions",
               "CONCATENATION": "ConcatenationOptions"}.get(code)
        if cls and table is not None:
            options = getattr(tflite, cls)()
            options.Init(table.Bytes, table.Pos)
        ops.append(_Op(code, [int(j) for j in op.InputsAsNumpy()], [int(j) for j in op.OutputsAsNumpy()], options))
    return tensors, ops, [int(i) for i in graph.InputsAsNumpy()], [int(i) for i in graph.OutputsAsNumpy()]


def _same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _Builder:
    """Accumulates ONNX nodes and initialisers with deterministic names."""

    def __init__(self, tensors: list[_Tensor]) -> None:
        self.helper, self.numpy_helper = helper, numpy_helper
        self.tensors = tensors
        self.nodes, self.inits = [], []
        self.value: dict[int, str] = {}  # TFLite tensor index -> ONNX value name
        self.consts: dict[int, np.ndarray] = {}  # folded constants (dequantised)
        self._n = 0

    def set(self, idx: int, value: str) -> None:
        """Record the ONNX value computed for TFLite tensor ``idx``."""
        self.value[idx] = value

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, array: np.ndarray, hint: str = "c") -> str:
        name = self.fresh(hint)
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.fresh(hint or op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def constant_of(self, idx: int) -> np.ndarray | None:
        if idx in self.consts:
            return self.consts[idx]
        t = self.tensors[idx]
        return t.dequantized() if t.data is not None else None

    def activation(self, x: str, fused: int) -> str:
        if fused not in _ACT:
            raise ModelError(f"unsupported fused activation {fused}")
        bounds = _ACT[fused]
        if bounds is None:
            return x
        lo, hi = bounds
        if hi is None:
            return self.node("Relu", [x])
        return self.node("Clip", [x, self.const(np.float32(lo)), self.const(np.float32(hi))])

    def operand(self, idx: int) -> str:
        """An elementwise operand: an activation, or a constant reshaped to broadcast in NCHW."""
        if idx in self.value:
            return self.value[idx]
        c = self.constant_of(idx)
        if c is None:
            raise ModelError(f"tensor {self.tensors[idx].name} is used before it is computed")
        if c.ndim == 1:
            c = c.reshape(1, -1, 1, 1)
        elif c.ndim == 4:
            c = c.transpose(0, 3, 1, 2)
        return self.const(c.astype(np.float32))


def convert(path: str | Path, *, class_lut: np.ndarray | None = None,
            input_scale: float | None = None, input_offset: float | None = None,
            metadata: dict[str, str] | None = None) -> "onnx.ModelProto":
    """Convert ``path`` to an ONNX model with input ``image`` (N x 3 x H x W float32,
    already normalised) and outputs ``labels`` (N x H x W uint8 = class_lut[argmax]) and
    ``confidence`` (N x H x W float32: the top class's probability, see ``_confidence``).

    For quantised inputs the normalisation is read from the input's quantisation
    (pixel * scale + offset); float inputs need ``input_scale``/``input_offset``.
    """

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such TFLite file")
    tensors, ops, inputs, outputs = _read(path)
    if len(inputs) != 1 or len(tensors[inputs[0]].shape) != 4 or tensors[inputs[0]].shape[3] != 3:
        raise ModelError(f"{path} is not an image segmenter (expected one N x H x W x 3 input)")
    src = tensors[inputs[0]]
    if src.dtype in (np.uint8, np.int8):
        scale, zp = float(src.scale[0]), float(src.zero_point[0])
        input_scale, input_offset = scale, -zp * scale
    elif input_scale is None or input_offset is None:
        raise ModelError(f"{path} has a float input: give its normalisation (input_scale, input_offset)")
    height, width = src.shape[1:3]

    b = _Builder(tensors)
    b.set(inputs[0], "image")
    consumers: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        for t in op.inputs:
            consumers.setdefault(t, []).append(i)
    skipped: set[int] = set()
    for i, op in enumerate(ops):  # fold weight dequantisation first: it may follow its user's producer
        if op.code == "DEQUANTIZE" and tensors[op.inputs[0]].data is not None:
            b.consts[op.outputs[0]] = tensors[op.inputs[0]].dequantized()
            skipped.add(i)
    argmax_out = None
    resized: dict[str, tuple[str, np.ndarray, str]] = {}  # Resize output -> (its input, size, mode)

    for i, op in enumerate(ops):
        if i in skipped:
            continue
        ins, out = op.inputs, op.outputs[0]
        name = tensors[out].name
        if op.code in ("DEQUANTIZE", "QUANTIZE"):  # activation (re)quantisation: identity in float
            b.set(out, b.value[ins[0]])
        elif op.code in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            b.set(out, _conv(b, op, tensors[ins[0]].shape, b.value[ins[0]], (1, 1), None))
        elif op.code == "SPACE_TO_BATCH_ND":
            # Fuse S2B -> conv(VALID, stride 1) -> B2S into one dilated convolution.
            conv_i = consumers.get(out, [None])[0]
            conv = ops[conv_i] if conv_i is not None else None
            b2s_i = consumers.get(conv.outputs[0], [None])[0] if conv else None
            if (conv is None or conv.code not in ("CONV_2D", "DEPTHWISE_CONV_2D") or b2s_i is None
                    or ops[b2s_i].code != "BATCH_TO_SPACE_ND" or conv.options.Padding() != 1
                    or (conv.options.StrideH(), conv.options.StrideW()) != (1, 1)):
                raise ModelError(f"{path}: SPACE_TO_BATCH_ND at {name} is not an atrous convolution")
            b2s = ops[b2s_i]
            block = b.constant_of(ins[1]).astype(int)
            pads = b.constant_of(ins[2]).astype(int)
            crops = b.constant_of(b2s.inputs[2]).astype(int)
            begin, end = pads[:, 0] - crops[:, 0], pads[:, 1] - crops[:, 1]
            if (begin < 0).any() or (end < 0).any():
                raise ModelError(f"{path}: unsupported crops in atrous convolution at {name}")
            fused_pads = (int(begin[0]), int(begin[1]), int(end[0]), int(end[1]))
            b.set(b2s.outputs[0], _conv(b, conv, tensors[ins[0]].shape, b.value[ins[0]], tuple(block), fused_pads))
            skipped.update((conv_i, b2s_i))
        elif op.code in ("ADD", "MUL"):
            y = b.node(op.code.capitalize(), [b.operand(ins[0]), b.operand(ins[1])])
            b.set(out, b.activation(y, op.options.FusedActivationFunction() if op.options else 0))
        elif op.code == "AVERAGE_POOL_2D":
            o = op.options
            _, h, w, _ = tensors[ins[0]].shape
            if (o.FilterHeight(), o.FilterWidth()) == (h, w) and o.Padding() == 1:
                y = b.node("GlobalAveragePool", [b.value[ins[0]]])
            else:
                ph, pw = (_same_pads(h, o.FilterHeight(), o.StrideH(), 1),
                          _same_pads(w, o.FilterWidth(), o.StrideW(), 1)) if o.Padding() == 0 else ((0, 0), (0, 0))
                y = b.node("AveragePool", [b.value[ins[0]]], kernel_shape=[o.FilterHeight(), o.FilterWidth()],
                           strides=[o.StrideH(), o.StrideW()], pads=[ph[0], pw[0], ph[1], pw[1]])
            b.set(out, b.activation(y, o.FusedActivationFunction()))
        elif op.code == "RESIZE_BILINEAR":
            size = b.constant_of(ins[1]).astype(np.int64)
            if tuple(size) == tensors[ins[0]].shape[1:3]:
                b.set(out, b.value[ins[0]])  # identity resize
                continue
            o = op.options
            mode = "align_corners" if o.AlignCorners() else ("half_pixel" if o.HalfPixelCenters() else "asymmetric")
            x = b.value[ins[0]]
            nc = b.node("Slice", [b.node("Shape", [x]), b.const(np.array([0], np.int64)),
                                  b.const(np.array([2], np.int64))])
            sizes = b.node("Concat", [nc, b.const(size)], axis=0)
            b.set(out, b.node("Resize", [x, "", "", sizes], hint="resize", mode="linear",
                              coordinate_transformation_mode=mode))
            resized[b.value[out]] = (x, size, mode)
        elif op.code == "CONCATENATION":
            axis = op.options.Axis() % 4
            y = b.node("Concat", [b.value[j] for j in ins], axis=_NHWC_TO_NCHW_AXIS[axis])
            b.set(out, b.activation(y, op.options.FusedActivationFunction()))
        elif op.code == "ARG_MAX":
            axis = int(b.constant_of(ins[1]).reshape(-1)[0]) % 4
            argmax_out = b.node("ArgMax", [b.value[ins[0]]], axis=_NHWC_TO_NCHW_AXIS[axis], keepdims=0)
            b.set(out, argmax_out)
        else:
            raise ModelError(f"{path}: TFLite op {op.code} is not supported by the converter")

    final = b.value[outputs[0]]
    if argmax_out is None or final != argmax_out:
        final = b.node("ArgMax", [final], axis=1, keepdims=0)
    logits = next(n for n in b.nodes if final in n.output).input[0]
    lut = class_lut if class_lut is not None else np.arange(256, dtype=np.uint8)
    # int32 inside, uint8 only at the edge: TensorRT takes uint8 as a network output of a Cast only
    ids = b.node("Gather", [b.const(lut.astype(np.int32), "class_lut"), final], "class_ids")
    b.nodes.append(helper.make_node("Cast", [ids], ["labels"], to=TensorProto.UINT8, name="labels"))
    _confidence(b, logits, resized)

    graph = helper.make_graph(
        b.nodes, "segmenter",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, height, width])],
        [helper.make_tensor_value_info("labels", TensorProto.UINT8, ["N", height, width]),
         helper.make_tensor_value_info("confidence", TensorProto.FLOAT, ["N", height, width])],
        b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="segsynth.export.tflite")
    model.ir_version = 8
    mean, std = -input_offset / input_scale, 1 / input_scale  # x * scale + offset == (x - mean) / std
    props = {
        onnxmeta.ROLE: "segmenter",
        onnxmeta.INPUT_ORDER: "rgb",
        onnxmeta.INPUT_MEAN: ",".join([repr(float(mean))] * 3),
        onnxmeta.INPUT_STD: ",".join([repr(float(std))] * 3),
        onnxmeta.SOURCE: path.name,
        onnxmeta.SOURCE_SHA256: hashlib.sha256(path.read_bytes()).hexdigest(),
        **(metadata or {}),
    }
    helper.set_model_props(model, props)
    model.doc_string = f"converted from TFLite {path.name} by segsynth export deeplab --from-tflite"
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv(b: _Builder, op: _Op, in_shape: tuple[int, ...], x: str, dilation: tuple[int, int],
          pads: tuple[int, int, int, int] | None) -> str:
    o = op.options
    w = b.constant_of(op.inputs[1])
    if w is None:
        raise ModelError(f"convolution {b.tensors[op.outputs[0]].name} has non-constant weights")
    if op.code == "CONV_2D":
        weight, group = w.transpose(0, 3, 1, 2), 1  # OHWI -> OIHW
    else:
        weight, group = w.transpose(3, 0, 1, 2), in_shape[3]  # 1HW(C*m) -> (C*m)1HW
    dh = dilation[0] if dilation != (1, 1) else o.DilationHFactor()
    dw = dilation[1] if dilation != (1, 1) else o.DilationWFactor()
    kh, kw = weight.shape[2:]
    if pads is None:
        if o.Padding() == 0:  # SAME
            (t, bo), (le, r) = _same_pads(in_shape[1], kh, o.StrideH(), dh), _same_pads(in_shape[2], kw, o.StrideW(), dw)
            pads = (t, le, bo, r)
        else:
            pads = (0, 0, 0, 0)
    inputs = [x, b.const(weight.astype(np.float32), "w")]
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        inputs.append(b.const(b.constant_of(op.inputs[2]).astype(np.float32), "b"))
    y = b.node("Conv", inputs, hint="conv", kernel_shape=[kh, kw], strides=[o.StrideH(), o.StrideW()],
               dilations=[dh, dw], pads=list(pads), group=group)
    return b.activation(y, o.FusedActivationFunction())


def _confidence(b: _Builder, logits: str, resized: dict) -> None:
    """Output ``confidence``: the top class's softmax probability per pixel, computed where the
    logits are small (before the final bilinear upsampling, when there is one: a softmax over
    151 x 513 x 513 would cost as much as the rest of the head) and upsampled the same way."""

    low, size, mode = resized.get(logits, (logits, None, None))
    # max softmax = 1 / sum(exp(x - max)): onnxruntime's Softmax over axis 1 of NCHW is ~20x slower
    peak = b.node("ReduceMax", [low], axes=[1], keepdims=1)
    total = b.node("ReduceSum", [b.node("Exp", [b.node("Sub", [low, peak])]), b.const(np.array([1], np.int64), "axes")],
                   keepdims=1)
    top = b.node("Reciprocal", [total])
    if size is not None:
        n1 = b.node("Slice", [b.node("Shape", [top]), b.const(np.array([0], np.int64)),
                              b.const(np.array([2], np.int64))])
        sizes = b.node("Concat", [n1, b.const(size)], axis=0)
        top = b.node("Resize", [top, "", "", sizes], hint="resize", mode="linear", coordinate_transformation_mode=mode)
    b.nodes.append(helper.make_node("Squeeze", [top, b.const(np.array([1], np.int64), "axes")], ["confidence"],
                                    name="confidence"))


def _class_count(path: Path) -> int:
    tensors, ops, _, outputs = _read(path)
    argmax = [op for op in ops if op.code == "ARG_MAX"]
    logits = argmax[-1].inputs[0] if argmax else outputs[0]
    return int(tensors[logits].shape[-1])


def segmenter_from_tflite(path: str | Path, label_set: str | None = None) -> "onnx.ModelProto":
    """Convert a DeepLab TFLite file into segsynth's segmenter contract, choosing the label set
    from the class count when not given: 151 = ADE20K (class 0 'other' -> 255, i -> i - 1, the
    0-based ids SPADE uses), 21 = PASCAL VOC, 19 = Cityscapes. Float inputs are assumed to use
    DeepLab's TensorFlow normalisation, x / 127.5 - 1."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such TFLite file")
    n = _class_count(path)
    guessed = labels.by_class_count(n)
    label_set = label_set or guessed
    if label_set is None:
        raise ModelError(f"{path}: {n} classes match no known label set; pass --label-set")
    lut = np.full(256, 255, np.uint8)
    if label_set == "ade20k" and n == 151:
        lut[1:151] = np.arange(150)
    else:
        lut[:n] = np.arange(n)
    return convert(path, class_lut=lut, input_scale=1 / 127.5, input_offset=-1.0,
                   metadata={onnxmeta.LABEL_SET: label_set, onnxmeta.CLASSES: str(n)})
