"""Run segsynth's ONNX graphs with PyTorch operations, so the torch-cuda backend can execute
the bundled segmenters and any exported generator on a GPU that has torch but neither
TensorRT nor onnxruntime-gpu.

This is deliberately not a general ONNX runtime: it covers the operators our exporters
emit (TFLite-converted DeepLab, torch-exported SPADE/DeepLab graphs) and refuses others
with a clear message. Each node maps to the torch function with the same semantics.

Shape arithmetic stays on the host. Ops read some inputs as Python numbers (a Reshape's
shape, Slice's starts, Resize's sizes: ``_HOST_ARGS``); reading those from GPU tensors would
wait for the GPU to go idle, so nothing could overlap. Those inputs, and what they are
computed from when that is constants and ``Shape`` results alone (the Gather/Concat/Cast
chains of dynamic-batch graphs), are computed on the CPU and never made float16; everything
else is data and lives on the device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from segsynth.core.errors import BackendError

_ONNX_TO_TORCH_DTYPE = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
                        11: "float64"}


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# The inputs each op reads as Python numbers (shapes, axes, sizes, pads), by position.
_HOST_ARGS = {"Reshape": (1,), "Slice": (1, 2, 3, 4), "Resize": (1, 2, 3), "Pad": (1, 2), "Unsqueeze": (1,),
              "Squeeze": (1,), "Expand": (1,), "ConstantOfShape": (0,), "ReduceMean": (1,), "ReduceMax": (1,),
              "ReduceSum": (1,), "Split": (1,)}


def _host_values(nodes, constants) -> set[str]:
    """The values computed on the host: those read as numbers (``_HOST_ARGS``) and what they
    are computed from, where that is constants and Shape results only; and Shape results."""
    computable = set(constants)
    for op, ins, outs, _ in nodes:
        if op == "Shape" or all(i in computable for i in ins if i):
            computable.update(outs)
    needed = set()
    for op, ins, outs, _ in reversed(nodes):
        if op != "Shape" and outs[0] in computable and any(o in needed for o in outs):
            needed.update(ins)
        needed.update(ins[k] for k in _HOST_ARGS.get(op, ()) if k < len(ins))
    return (computable & needed) | {o for op, _, outs, _ in nodes if op == "Shape" for o in outs}


class OnnxTorchModule:
    """An ONNX graph as a callable over torch tensors (inputs by name -> dict of outputs).
    Not thread-safe while ``to()`` runs; calls share only the read-only constants."""

    def __init__(self, model: str | Path | bytes) -> None:
        # imported here: torch is optional: importing segsynth.engine must not import it
        import torch

        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
        self.proto = proto
        self.inputs = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
        self.outputs = [o.name for o in proto.graph.output]
        arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        arrays.update({n.output[0]: _constant(_attrs(n)) for n in proto.graph.node if n.op_type == "Constant"})
        self.constants = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}  # on the host, as stored
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in proto.graph.node
                      if n.op_type != "Constant"]
        unsupported = sorted({op for op, *_ in self.nodes if op not in _OPS})
        if unsupported:
            raise BackendError(f"the torch backend cannot run ONNX ops {', '.join(unsupported)}; "
                               "use --backend onnxruntime")
        self.host = _host_values(self.nodes, self.constants)
        self.device, self.half = torch.device("cpu"), False
        self.consts = dict(self.constants)

    def to(self, device, half: bool = False) -> "OnnxTorchModule":
        """Move the constants that are data to ``device`` (shape arithmetic stays on the host);
        ``half``: compute in float16 throughout (every float32 data tensor, from the constants,
        the feed or any node such as a Cast to float, is float16), so no op meets float32 and
        float16 at once."""
        # imported here: torch is optional: importing segsynth.engine must not import it
        import torch

        self.device, self.half = torch.device(device), half
        self.consts = {k: v if k in self.host else self._data(v) for k, v in self.constants.items()}
        return self

    def _data(self, t):
        """``t`` as data: on the device (a host value used as data is copied there, without
        waiting for the device), and float16 where ``half``."""
        # imported here: torch is optional: importing segsynth.engine must not import it
        import torch

        if not isinstance(t, torch.Tensor):
            return t
        if t.device.type == "cpu" and self.device.type != "cpu":
            t = t.to(self.device, non_blocking=True)
        return t.half() if self.half and t.dtype == torch.float32 else t

    def __call__(self, **feed):
        env = dict(self.consts)
        env.update({k: self._data(v) for k, v in feed.items()})
        env[""] = None
        for op, ins, outs, attrs in self.nodes:
            args = [env[i] for i in ins]
            on_host = outs[0] in self.host
            if not on_host:
                numbers = _HOST_ARGS.get(op, ())
                args = [a if k in numbers else self._data(a) for k, a in enumerate(args)]
            result = _OPS[op](args, attrs)
            if not isinstance(result, tuple):
                result = (result,)
            env.update(zip(outs, result if on_host else map(self._data, result)))
        return {name: env[name] for name in self.outputs}


def _conv(x, attrs):
    # imported here: torch is optional: importing segsynth.engine must not import it
    import torch.nn.functional as F

    inp, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    t, left, bottom, right = pads
    if t == bottom and left == right:
        padding = (t, left)
    else:
        inp, padding = F.pad(inp, (left, right, t, bottom)), (0, 0)
    return F.conv2d(inp, w, b, stride=tuple(attrs.get("strides", [1, 1])), padding=padding,
                    dilation=tuple(attrs.get("dilations", [1, 1])), groups=attrs.get("group", 1))


def _resize(x, attrs):
    # imported here: torch is optional: importing segsynth.engine must not import it
    import torch.nn.functional as F

    data, sizes = x[0], x[3] if len(x) > 3 else None
    scales = x[2] if len(x) > 2 else None
    mode = attrs.get("mode", b"nearest").decode()
    coord = attrs.get("coordinate_transformation_mode", b"half_pixel").decode()
    if sizes is not None and sizes.numel():
        size = [int(s) for s in sizes.tolist()[2:]]
    else:
        size = [int(d * float(s)) for d, s in zip(data.shape[2:], scales.tolist()[2:])]
    if mode == "nearest":
        if coord != "asymmetric" or attrs.get("nearest_mode", b"round_prefer_floor").decode() != "floor":
            raise BackendError(f"torch backend: unsupported nearest Resize ({coord})")
        return F.interpolate(data, size=size, mode="nearest")
    if mode == "linear" and coord in ("align_corners", "half_pixel", "pytorch_half_pixel"):
        return F.interpolate(data, size=size, mode="bilinear", align_corners=coord == "align_corners",
                             antialias=bool(attrs.get("antialias", 0)))
    raise BackendError(f"torch backend: unsupported Resize mode {mode}/{coord}")


def _slice(x, attrs):
    data, starts, ends = x[0], x[1].tolist(), x[2].tolist()
    axes = x[3].tolist() if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = x[4].tolist() if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a] = slice(s, min(e, data.shape[a]) if e >= 0 else e, st)
    return data[tuple(index)]


def _cast(x, attrs):
    # imported here: torch is optional: importing segsynth.engine must not import it
    import torch

    return x[0].to(getattr(torch, _ONNX_TO_TORCH_DTYPE[attrs["to"]]))


def _gemm(x, attrs):
    a, b = x[0], x[1]
    if attrs.get("transA"):
        a = a.t()
    if attrs.get("transB"):
        b = b.t()
    out = attrs.get("alpha", 1.0) * (a @ b)
    return out + attrs.get("beta", 1.0) * x[2] if len(x) > 2 and x[2] is not None else out


def _axes(x, attrs) -> tuple:
    """A Reduce op's axes: its second input (opset 13+ ReduceSum, 18+ the others) or attribute;
    none given means every axis."""
    axes = x[1].tolist() if len(x) > 1 and x[1] is not None else attrs.get("axes")
    return tuple(axes) if axes else tuple(range(x[0].dim()))


def _pad(x, attrs):
    # imported here: torch is optional: importing segsynth.engine must not import it
    import torch.nn.functional as F

    pads = x[1].tolist()
    n = len(pads) // 2
    torch_pads = []
    for axis in reversed(range(n)):
        torch_pads += [pads[axis], pads[axis + n]]
    value = float(x[2]) if len(x) > 2 and x[2] is not None else 0.0
    return F.pad(x[0], torch_pads, mode=attrs.get("mode", b"constant").decode(), value=value)


def _build_ops():
    # imported here: torch is optional: importing segsynth.engine must not import it
    import torch
    import torch.nn.functional as F

    def clip(x, a):
        lo = x[1] if len(x) > 1 and x[1] is not None else None
        hi = x[2] if len(x) > 2 and x[2] is not None else None
        return torch.clamp(x[0], lo, hi)

    return {
        "Conv": _conv, "Resize": _resize, "Slice": _slice, "Cast": _cast, "Gemm": _gemm, "Pad": _pad, "Clip": clip,
        "Relu": lambda x, a: F.relu(x[0]), "LeakyRelu": lambda x, a: F.leaky_relu(x[0], a.get("alpha", 0.01)),
        "Tanh": lambda x, a: torch.tanh(x[0]), "Sigmoid": lambda x, a: torch.sigmoid(x[0]),
        "Round": lambda x, a: torch.round(x[0]),  # half to even, as ONNX
        "HardSigmoid": lambda x, a: torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0, 1),
        "HardSwish": lambda x, a: F.hardswish(x[0]),
        "Add": lambda x, a: x[0] + x[1], "Sub": lambda x, a: x[0] - x[1], "Mul": lambda x, a: x[0] * x[1],
        "Div": _div, "Max": lambda x, a: torch.stack(torch.broadcast_tensors(*x)).amax(0),
        "Equal": lambda x, a: x[0] == x[1], "Greater": lambda x, a: x[0] > x[1], "Less": lambda x, a: x[0] < x[1],
        "Split": _split, "Not": lambda x, a: ~x[0], "Or": lambda x, a: x[0] | x[1],
        "Where": lambda x, a: torch.where(x[0], x[1], x[2]),
        "GlobalAveragePool": lambda x, a: x[0].mean(dim=(2, 3), keepdim=True),
        "AveragePool": lambda x, a: F.avg_pool2d(x[0], a["kernel_shape"], a.get("strides", a["kernel_shape"]),
                                                 a.get("pads", [0, 0, 0, 0])[:2],
                                                 count_include_pad=bool(a.get("count_include_pad", 0))),
        "MaxPool": lambda x, a: F.max_pool2d(x[0], a["kernel_shape"], a.get("strides", a["kernel_shape"]),
                                             a.get("pads", [0, 0, 0, 0])[:2], ceil_mode=bool(a.get("ceil_mode", 0))),
        "InstanceNormalization": lambda x, a: F.instance_norm(x[0], weight=x[1], bias=x[2], eps=a.get("epsilon", 1e-5)),
        "BatchNormalization": lambda x, a: F.batch_norm(x[0], x[3], x[4], x[1], x[2], False, 0.0, a.get("epsilon", 1e-5)),
        "ArgMax": lambda x, a: torch.argmax(x[0], dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1))),
        "Gather": _gather,
        "Shape": lambda x, a: torch.tensor(x[0].shape[a.get("start", 0):a.get("end", None)], dtype=torch.int64),
        "Concat": lambda x, a: torch.cat([t.to(x[0].dtype) for t in x], dim=a.get("axis", 0)),
        "Reshape": lambda x, a: x[0].reshape([d if d != 0 else x[0].shape[i] for i, d in enumerate(x[1].tolist())]),
        "Flatten": lambda x, a: x[0].reshape(int(np.prod(x[0].shape[:a.get("axis", 1)])), -1),
        "Transpose": lambda x, a: x[0].permute(*a["perm"]) if "perm" in a else x[0].permute(*reversed(range(x[0].dim()))),
        "Unsqueeze": lambda x, a: x[0].reshape([*_unsqueezed(x[0].shape, x[1].tolist())]),
        "Squeeze": lambda x, a: x[0].squeeze(*x[1].tolist()) if len(x) > 1 else x[0].squeeze(),
        "MatMul": lambda x, a: x[0] @ x[1], "Identity": lambda x, a: x[0],
        "ReduceMean": lambda x, a: x[0].mean(dim=_axes(x, a), keepdim=bool(a.get("keepdims", 1))),
        "ReduceMax": lambda x, a: x[0].amax(dim=_axes(x, a), keepdim=bool(a.get("keepdims", 1))),
        "ReduceSum": lambda x, a: x[0].sum(dim=_axes(x, a), keepdim=bool(a.get("keepdims", 1))),
        "Exp": lambda x, a: torch.exp(x[0]), "Reciprocal": lambda x, a: torch.reciprocal(x[0]),
        "Expand": lambda x, a: x[0] * torch.ones(x[1].tolist(), dtype=x[0].dtype, device=x[0].device),
        "ConstantOfShape": lambda x, a: torch.from_numpy(np.full(x[0].tolist(), _const_value(a).reshape(-1)[0])),
    }


def _split(x, attrs):
    """Sizes from the second input, else ``num_outputs`` (opset 18) or the ``split`` attribute."""
    axis, n = attrs.get("axis", 0), x[0].shape[attrs.get("axis", 0)]
    if len(x) > 1 and x[1] is not None:
        sizes = [int(v) for v in x[1].tolist()]
    elif "split" in attrs:
        sizes = list(attrs["split"])
    else:
        parts = attrs["num_outputs"]
        sizes = [-(-n // parts)] * (parts - 1)
        sizes.append(n - sum(sizes))
    return tuple(x[0].split(sizes, dim=axis))


def _unsqueezed(shape, axes):
    out = list(shape)
    for axis in sorted(a % (len(shape) + len(axes)) for a in axes):
        out.insert(axis, 1)
    return out


def _const_value(attrs):
    value = attrs.get("value")
    return numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)


def _constant(attrs) -> np.ndarray:
    """A Constant node's value (``value``, ``value_float(s)`` or ``value_int(s)``)."""
    if "value" in attrs:
        return _const_value(attrs)
    (name, value), = attrs.items()
    return np.array(value, np.float32 if name.startswith("value_float") else np.int64)


def _gather(x, attrs):
    # imported here: torch is optional: importing segsynth.engine must not import it
    import torch

    data, index = x
    axis = attrs.get("axis", 0) % data.dim()
    index = torch.where(index < 0, index + data.shape[axis], index)  # ONNX allows negative indices
    out = torch.index_select(data, axis, index.reshape(-1).long())
    return out.reshape((*data.shape[:axis], *index.shape, *data.shape[axis + 1:]))  # a scalar index drops the axis


def _div(x, attrs):
    """ONNX Div: integer division truncates (shape arithmetic), where torch's ``/`` gives floats."""
    # imported here: torch is optional: importing segsynth.engine must not import it
    import torch

    a, b = x
    return a / b if a.is_floating_point() or b.is_floating_point() else torch.div(a, b, rounding_mode="trunc")


class _LazyOps(dict):
    """The op table, built on first use so importing this module does not import torch."""

    def _fill(self):
        if not super().__len__():
            self.update(_build_ops())

    def __contains__(self, key):
        self._fill()
        return super().__contains__(key)

    def __getitem__(self, key):
        self._fill()
        return super().__getitem__(key)


_OPS = _LazyOps()
