"""Float16 ONNX graphs: the float32 compute of a graph made float16, its inputs and outputs
kept at their types. TensorRT 11 builds only strongly typed networks (precision comes from
the graph's own tensor types, there is no FP16 builder flag), and onnxruntime-cuda runs
float16 only where the graph is float16, so both take the graph this module writes.

Written here rather than taken from onnxconverter-common: that package's converter keeps
float32 I/O only through a block list of op names and does not know segsynth's rule that
shape arithmetic stays exact; this one is a single pass driven by onnx's own operator
schemas and shape inference.

The rules:

* Every float32 tensor becomes float16, except where onnx's type constraints forbid it (an
  input such as Resize's ``scales`` is ``tensor(float)`` only; an op such as Range has no
  float16 form), and except what is computed only for such an input (it stays float32 back
  to where it branches off the float16 data).
* Shape arithmetic stays float32: a float tensor computed from ``Shape``/``Size`` results
  and constants (float16 holds integers exactly only up to 2048).
* Graph inputs and outputs keep their types: a float32 input is cast to float16 where it is
  read, a float32 output is cast back from float16 at the end; uint8 and integer tensors are
  never touched.
* Constants (initializers, ``Constant`` and ``ConstantOfShape`` values) are converted, with
  values beyond float16's range (|x| > 65504) clamped to +-65504, as TensorRT's own FP16
  mode does with weights; ``Cast(to=FLOAT)`` becomes ``Cast(to=FLOAT16)``. Activations
  that overflow float16 at run time are not guarded: segsynth's graphs are normalised
  convolution nets whose activations stay small (the comparison tests measure it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from segsynth.core.errors import ModelError
from segsynth.engine.cache import CachedFile, content_key

F32, F16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16
FP16_MAX = 65504.0
_SHAPE_OPS = ("Shape", "Size")


def _half(array: np.ndarray) -> np.ndarray:
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)


class _Slots:
    """What onnx's schema of one node says about each float32 input and output."""

    def __init__(self, node, opset: int, types: dict[str, int]) -> None:
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        except onnx.defs.SchemaError:
            raise ModelError(f"{node.op_type} ({node.name or node.output[0]}): no ONNX schema for this op "
                             f"(domain {node.domain!r}); float16 conversion needs standard ops") from None
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

        def params(formal, names):
            out = []
            for i, name in enumerate(names):
                p = formal[min(i, len(formal) - 1)]  # a variadic last parameter takes the rest
                out.append((name, p.type_str, allowed.get(p.type_str, {p.type_str})))
            return out

        self.inputs = params(schema.inputs, node.input) if schema.inputs else []
        self.outputs = params(schema.outputs, node.output) if schema.outputs else []
        self.out_vars = {var for _, var, _ in self.outputs}
        # an output whose type admits no float16 keeps the whole node float32 (e.g. Range)
        self.fp32_only = any(types.get(name) == F32 and "tensor(float16)" not in ok
                             for name, _, ok in self.outputs if name)
        in_vars = [var for name, var, _ in self.inputs if name and types.get(name) == F32]
        self.shared = {var for var in in_vars if in_vars.count(var) > 1}

    def want(self, slot: int, compute: int) -> int | None:
        """The type input ``slot`` must have when the node computes in ``compute``; None:
        either float type (a Cast's or Shape's input, a parameter with its own type)."""
        _, var, ok = self.inputs[slot]
        if "tensor(float16)" not in ok:
            return F32
        if var in self.out_vars:
            return compute
        return F16 if var in self.shared else None  # inputs that share a type must agree


def to_float16(model):
    """A copy of ``model`` (an onnx ModelProto) computing in float16; see the module docstring.
    Raises ModelError for graphs it cannot convert (control flow, custom ops)."""

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx's InferenceError / ValidationError
        raise ModelError(f"not a valid ONNX graph ({str(exc).strip().splitlines()[0][:300]})") from exc
    graph = inferred.graph
    opset = next((o.version for o in inferred.opset_import if o.domain in ("", "ai.onnx")), 0)
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    nodes = list(graph.node)
    for node in nodes:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ModelError(f"{node.op_type} ({node.name or node.output[0]}): graphs with control flow are not "
                             "converted to float16")
    slots = [_Slots(n, opset, types) for n in nodes]
    is_f32 = lambda name: bool(name) and types.get(name) == F32  # noqa: E731
    graph_outputs = {v.name for v in graph.output}
    initializers = {t.name: t for t in graph.initializer}
    constants = {*initializers, *(o for n in nodes if n.op_type == "Constant" for o in n.output)}

    shape_derived = set()  # float32 shape arithmetic: from Shape/Size results and constants alone
    for node in nodes:
        ins = [i for i in node.input if i]
        if node.op_type in _SHAPE_OPS or (ins and all(i in shape_derived or i in constants for i in ins)
                                          and any(i in shape_derived for i in ins)):
            shape_derived.update(node.output)

    uses: dict[str, list[tuple[int, int]]] = {}
    for k, node in enumerate(nodes):
        for slot, name in enumerate(node.input):
            if is_f32(name):
                uses.setdefault(name, []).append((k, slot))

    compute: dict[int, int] = {}

    def stays_f32(name: str) -> bool:
        """Every use of ``name`` that cares needs float32 (and it is not a graph output)."""
        if name in graph_outputs:
            return name in initializers  # an output straight from an initializer keeps its value
        wants = [w for k, slot in uses.get(name, []) if (w := slots[k].want(slot, compute[k])) is not None]
        return bool(wants) and all(w == F32 for w in wants)

    for k in reversed(range(len(nodes))):  # consumers before producers
        outs = [o for o in nodes[k].output if is_f32(o)]
        keep = slots[k].fp32_only or any(o in shape_derived for o in outs) or (outs and all(map(stays_f32, outs)))
        compute[k] = F32 if keep else F16

    actual = {name: F32 for name in types if is_f32(name)}  # graph inputs stay float32
    for k, node in enumerate(nodes):
        actual.update({o: compute[k] for o in node.output if is_f32(o)})
    new_inits = []
    for t in graph.initializer:
        if t.data_type == F32 and not stays_f32(t.name):
            new_inits.append(numpy_helper.from_array(_half(numpy_helper.to_array(t)), t.name))
            actual[t.name] = F16
        else:
            new_inits.append(t)

    # float32 outputs computed in float16: the node writes NAME_fp16, a final Cast writes NAME
    rename = {o: f"{o}_fp16" for k, n in enumerate(nodes) for o in n.output
              if o in graph_outputs and is_f32(o) and compute[k] == F16}
    actual.update({new: F16 for new in rename.values()})
    converted: dict[tuple[str, int], str] = {}
    new_nodes = []

    def as_type(name: str, want: int) -> str:
        """``name`` as a ``want`` tensor: a converted copy of an initializer, else a Cast."""
        key = (name, want)
        if key not in converted:
            suffix = "fp16" if want == F16 else "fp32"
            converted[key] = new = f"{name}_as_{suffix}"
            if name in initializers:
                data = numpy_helper.to_array(initializers[name])
                new_inits.append(numpy_helper.from_array(_half(data) if want == F16 else data, new))
            else:
                new_nodes.append(helper.make_node("Cast", [name], [new], to=want, name=f"{new}_cast"))
        return converted[key]

    for k, node in enumerate(nodes):
        node = _copy(node)
        for slot, name in enumerate(node.input):
            if not is_f32(name):
                continue
            name = rename.get(name, name)
            want = slots[k].want(slot, compute[k])
            node.input[slot] = as_type(name, want) if want is not None and want != actual[name] else name
        for i, name in enumerate(node.output):
            node.output[i] = rename.get(name, name)
        if compute[k] == F16 and any(is_f32(o) for o in nodes[k].output):
            _retype_attributes(node)
        new_nodes.append(node)
    new_nodes += [helper.make_node("Cast", [new], [old], to=F32, name=f"{old}_cast") for old, new in rename.items()]

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:], out.graph.initializer[:], out.graph.value_info[:]
    out.graph.node.extend(new_nodes)
    out.graph.initializer.extend(new_inits)
    for v in out.graph.input:  # old-style graphs also list initializers as inputs
        if v.name in initializers and actual.get(v.name) == F16:
            v.type.tensor_type.elem_type = F16
    return out


def _copy(node):
    new = onnx.NodeProto()
    new.CopyFrom(node)
    return new


def _retype_attributes(node) -> None:
    """The attributes that fix a float32 output type, rewritten for float16."""

    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Cast" and attrs["to"].i == F32:
        attrs["to"].i = F16
    elif node.op_type == "Constant":
        value = helper.get_attribute_value(next(iter(attrs.values())))
        array = numpy_helper.to_array(value) if "value" in attrs else np.array(value, np.float32)
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(_half(array))))
    elif node.op_type == "ConstantOfShape":
        value = numpy_helper.to_array(attrs["value"].t) if "value" in attrs else np.zeros(1, np.float32)
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(_half(value))))


CONVERTER_VERSION = 1  # part of cached file names: a change to the rules above makes new files


def cached_float16(onnx_path: str | Path, cache_dir: str | Path | None) -> Path | bytes:
    """The float16 form of the graph at ``onnx_path``: a file in ``cache_dir/fp16`` named by
    the source graph's sha256 (made once: engine.cache.CachedFile), or serialized bytes when
    ``cache_dir`` is None."""
    source = Path(onnx_path)
    if not source.is_file():
        raise ModelError(f"{source}: no such ONNX file")
    data = source.read_bytes()

    def convert() -> bytes:
        try:
            proto = onnx.load_from_string(data)
        except Exception as exc:  # protobuf's DecodeError
            raise ModelError(f"{source.name}: not an ONNX graph ({type(exc).__name__})") from exc
        return to_float16(proto).SerializeToString()

    if cache_dir is None:
        return convert()
    name = f"{source.stem}-{content_key(data, length=24)}-v{CONVERTER_VERSION}.onnx"
    return CachedFile(Path(cache_dir) / "fp16" / name)(lambda tmp: tmp.write_bytes(convert()))
