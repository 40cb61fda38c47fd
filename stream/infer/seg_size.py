"""A DeepLab segmenter graph at another input size (``--seg-size``).

DeepLabV3's convolutions do not depend on the input size; what does is written into the graph
as constants: the input's H x W, the sizes each align-corners Resize scales to (the ASPP branch
back to the feature map, the decoder, the logits to the input), and the output shapes. For the
sizes DeepLab is made for, 16k + 1 (513, 385, 321, 257), every feature map keeps an odd size,
so each strided convolution's SAME padding stays what it is at 513 and only those constants
change: a size s on the 513 grid becomes (s - 1) * (S - 1) / 512 + 1.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from segsynth.core import onnxmeta
from segsynth.core.errors import InputError
from segsynth.core.grammar import check_size


def resize_segmenter(model, size: int):
    """A copy of ``model`` (an onnx ModelProto of a segsynth DeepLab segmenter) taking
    size x size frames."""

    check_size(size)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    image = model.graph.input[0].type.tensor_type.shape.dim
    old = (image[2].dim_value, image[3].dim_value)
    if old[0] != old[1] or not old[0] or (old[0] - 1) % 16:
        raise InputError(f"the segmenter's input is {old[0]} x {old[1]}; --seg-size needs a square 16k + 1 input")
    if old[0] == size:
        return model

    def scaled(v: int) -> int:
        return (v - 1) * (size - 1) // (old[0] - 1) + 1

    image[2].dim_value = image[3].dim_value = size
    consts = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        sizes = producers.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if sizes is None or sizes.op_type != "Concat":
            raise InputError(f"{node.name}: a Resize whose sizes are not [N, C] + constant; cannot change its size")
        const = next((consts[i] for i in sizes.input if i in consts), None)
        value = numpy_helper.to_array(const)
        if value.shape != (2,) or any((int(v) - 1) * (size - 1) % (old[0] - 1) for v in value):
            raise InputError(f"{node.name}: Resize sizes {value.tolist()} do not scale to a {size} input")
        const.CopyFrom(numpy_helper.from_array(np.array([scaled(int(v)) for v in value], value.dtype), const.name))
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        for d in dims[-2:]:
            if d.dim_value == old[0]:
                d.dim_value = size
    del model.graph.value_info[:]  # intermediate shapes of the 513 graph
    for prop in model.metadata_props:
        if prop.key == onnxmeta.INPUT_SIZE:
            prop.value = f"{size}x{size}"
    onnx.checker.check_model(model)
    return model


def argmax_before_upsampling(model):
    """A copy of ``model`` that takes the argmax of the low-resolution logits and upsamples the
    labels (nearest), instead of upsampling every class's logits (bilinear) and taking the argmax
    at full size: the same labels away from class boundaries, for a fraction of the work (for
    ADE20K at 321 x 321 the upsampling and argmax of 151 channels are two thirds of the graph).
    Labels along boundaries can move by up to half a low-resolution pixel."""

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    argmax = next((n for n in graph.node if n.op_type == "ArgMax"), None)
    node = producers.get(argmax.input[0]) if argmax is not None else None
    while node is not None and node.op_type in ("DequantizeLinear", "QuantizeLinear"):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Resize":
        raise InputError("the segmenter's argmax does not follow an upsampling Resize; nothing to move")
    sizes = producers[node.input[3]]
    size = next(numpy_helper.to_array(i) for i in graph.initializer if i.name in sizes.input)
    argmax.input[0] = node.input[0]
    labels = next(o for o in graph.output if o.name == "labels")
    last = producers[labels.name]
    last.output[0] = "labels_lowres"
    graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "lowres_start"),
                              numpy_helper.from_array(np.array([1], np.int64), "lowres_end"),
                              numpy_helper.from_array(size.astype(np.int64), "lowres_size")])
    graph.node.extend([
        helper.make_node("Shape", ["labels_lowres"], ["lowres_shape"]),
        helper.make_node("Slice", ["lowres_shape", "lowres_start", "lowres_end"], ["lowres_batch"]),
        helper.make_node("Concat", ["lowres_batch", "lowres_size"], ["lowres_sizes"], axis=0),
        helper.make_node("Resize", ["labels_lowres", "", "", "lowres_sizes"], ["labels"], mode="nearest",
                         coordinate_transformation_mode="align_corners", nearest_mode="round_prefer_ceil")])
    needed, keep = {o.name for o in graph.output}, []
    for n in reversed(graph.node):  # drop what no output needs any more (the full-size logits)
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    kept = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model
