"""Whether TensorRT's ONNX parser (onnx-tensorrt, TensorRT 10) can take a graph, decided on
the CPU from the graph alone, so every graph segsynth writes is checked in CI on machines
that have no TensorRT.

The rules are those of onnx-tensorrt's operator support matrix (docs/operators.md): the
opset range, the ops segsynth's graphs may use with the tensor types each accepts, the
inputs that must be build-time constants, the Resize/pool modes it implements, and that
UINT8 exists only at the edges of a network (a graph input read only by Cast, a graph
output written only by Cast). Types come from onnx's own shape inference.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from segsynth.core.errors import ModelError
from segsynth.engine.onnx_torch import (
    _attrs,  # node attributes as Python values (imports no torch)
)

OPSET_RANGE = (9, 20)
F32, U8, I8, I32, I64, BOOL, F16, F64, BF16 = 1, 2, 3, 6, 7, 9, 10, 11, 16
_TYPE_NAMES = {F32: "float32", U8: "uint8", I8: "int8", I32: "int32", I64: "int64", BOOL: "bool", F16: "float16",
               F64: "float64", BF16: "bfloat16"}
_FLOAT = frozenset({F32, F16, BF16})
_NUMERIC = _FLOAT | {I32, I64}
_ANY = _NUMERIC | {BOOL}
_CAST = _ANY | {U8}

# op -> (tensor types its data inputs and outputs may have, which inputs are data: None = all)
_OPS: dict[str, tuple[frozenset, tuple[int, ...] | None]] = {
    **{op: (_FLOAT, None) for op in (
        "AveragePool", "BatchNormalization", "Conv", "ConvTranspose", "Floor", "Gemm", "GlobalAveragePool",
        "HardSigmoid", "HardSwish", "InstanceNormalization", "LeakyRelu", "MatMul", "MaxPool", "Round", "Sigmoid",
        "Softmax", "Tanh", "Erf", "Sqrt", "Exp", "Log", "Pow", "Neg", "Reciprocal")},
    "Clip": (_FLOAT, (0,)), "Resize": (_FLOAT, (0,)),
    **{op: (_NUMERIC, None) for op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Abs", "Relu", "Range")},
    "ArgMax": (_NUMERIC, (0,)), "ArgMin": (_NUMERIC, (0,)), "Equal": (_NUMERIC, ()), "Less": (_NUMERIC, ()),
    "Greater": (_NUMERIC, ()), "ReduceMean": (_NUMERIC, (0,)), "ReduceMax": (_NUMERIC, (0,)),
    "ReduceSum": (_NUMERIC, (0,)), "TopK": (_NUMERIC, (0,)), "Pad": (_NUMERIC - {BF16}, (0,)),
    "ScatterND": (_NUMERIC, (0, 2)),
    **{op: (_ANY, None) for op in ("Concat", "Identity", "Split", "Transpose", "Flatten")},
    **{op: (_ANY, (0,)) for op in ("Expand", "Gather", "GatherElements", "GatherND", "Reshape", "Slice", "Squeeze",
                                   "Unsqueeze", "Tile")},
    "Shape": (_ANY, ()), "ConstantOfShape": (_ANY, ()), "Constant": (_ANY, None), "Where": (_ANY, (1, 2)),
    "Not": (frozenset({BOOL}), None), "Or": (frozenset({BOOL}), None), "And": (frozenset({BOOL}), None),
    "Cast": (_CAST, None), "OneHot": (_ANY, (2,)),
}
_CONSTANT_INPUTS = {"Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "Pad": (3,), "ReduceMean": (1,),
                    "ReduceMax": (1,), "ReduceSum": (1,), "OneHot": (1,)}
_RESIZE = {"mode": {"nearest", "linear"},
           "coordinate_transformation_mode": {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                              "asymmetric", "align_corners"},
           "nearest_mode": {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"},
           "keep_aspect_ratio_policy": {"stretch"}}


def tensorrt_problems(model) -> list[str]:
    """Everything in ``model`` (a ModelProto, bytes or a path) that onnx-tensorrt would refuse;
    empty when TensorRT 10 can parse it."""

    try:
        if isinstance(model, (str, Path)):
            model = onnx.load(str(model))
        elif isinstance(model, bytes):
            model = onnx.load_from_string(model)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:  # protobuf DecodeError, onnx's InferenceError/ValidationError
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"not a valid ONNX graph ({first})") from exc
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"opset {opset} is outside TensorRT 10's range {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    constants = {t.name for t in graph.initializer}
    constants.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    inputs = {v.name for v in graph.input} - {t.name for t in graph.initializer}
    outputs = {v.name for v in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    for name, kind in types.items():
        if kind == F64:
            problems.append(f"tensor {name} is float64 (TensorRT has no double arithmetic)")
        elif kind == U8:
            if name in inputs:
                readers = [n for n in graph.node if name in n.input and n.op_type != "Cast"]
                if readers:
                    problems.append(f"uint8 input {name} is read by {readers[0].op_type} ({readers[0].name}); "
                                    "only a Cast may read a uint8 network input")
            elif name in outputs:
                made_by = producer.get(name)
                if made_by is None or made_by.op_type != "Cast":
                    problems.append(f"uint8 output {name} is made by {made_by.op_type if made_by else 'nothing'}; "
                                    "only a Cast may write a uint8 network output")
            else:
                problems.append(f"tensor {name} is uint8 inside the network (uint8 is only for network inputs and "
                                "outputs; use int32)")
    for node in graph.node:
        where = f"{node.op_type} ({node.name or node.output[0]})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {node.domain!r} needs a TensorRT plugin")
            continue
        if node.op_type not in _OPS:
            problems.append(f"{where}: op not in onnx-tensorrt's support matrix")
            continue
        allowed, data = _OPS[node.op_type]
        # ops whose inputs are all data keep their type; the others' outputs are indices, masks or shapes
        checked = [*node.input, *node.output] if data is None else [node.input[i] for i in data if i < len(node.input)]
        for name in checked:
            kind = types.get(name)
            if name and kind is not None and kind not in allowed and kind not in (F64, U8):  # reported above
                problems.append(f"{where}: {name} is {_TYPE_NAMES.get(kind, kind)}, which TensorRT's "
                                f"{node.op_type} does not take")
        for i in _CONSTANT_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] and node.input[i] not in constants:
                problems.append(f"{where}: input {i} ({node.input[i]}) must be an initializer or Constant")
        attrs = _attrs(node)
        if node.op_type == "Resize":
            for key, ok in _RESIZE.items():
                value = attrs.get(key)
                if value is not None and value.decode() not in ok:
                    problems.append(f"{where}: {key}={value.decode()} is not supported")
            if attrs.get("antialias", 0):
                problems.append(f"{where}: antialias is not supported")
        if node.op_type in ("AveragePool", "MaxPool") and any(d != 1 for d in attrs.get("dilations", [])):
            problems.append(f"{where}: dilations must be ones")
        if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
            problems.append(f"{where}: the Indices output is not supported")
        if node.op_type == "TopK" and attrs.get("sorted", 1) != 1:
            problems.append(f"{where}: sorted must be 1")
    return problems

