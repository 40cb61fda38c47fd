"""The torch interpreter keeps shape arithmetic on the host: on a GPU, reading a shape from a
device tensor (``.tolist()``, ``float()``) waits for the GPU to go idle, so batches could not
overlap. PyTorch's "meta" device holds no data, so any such read raises there: running the
graphs with the constants and feed on "meta" shows no call reads device data. On the CPU the
outputs still match ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import make_spade_checkpoint, run_cli
from segsynth.engine.onnx_torch import OnnxTorchModule
from segsynth.engine.onnxruntime import OnnxRuntimeRunner
from segsynth.stream.infer.segmenter import bundled_model


def _ints(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _shape_arithmetic_graph() -> bytes:
    """Dynamic-batch shape arithmetic as torch.onnx's dynamo exporter writes it: Shape,
    Gather, Slice, Unsqueeze, Squeeze, Concat, integer Div, Cast, Equal/Where and Constant
    nodes computing Reshape/Resize/Expand/ConstantOfShape/ReduceMean arguments, plus a
    shape-derived value used as data."""
    node = helper.make_node
    nodes = [
        node("Shape", ["x"], ["s"]),
        node("Constant", [], ["zero"], value=helper.make_tensor("v", TensorProto.INT64, [], [0])),
        node("Gather", ["s", "zero"], ["n"]),
        node("Unsqueeze", ["n", "axis0"], ["n1"]),
        node("Concat", ["n1", "minus1"], ["flat_shape"], axis=0),
        node("Reshape", ["x", "flat_shape"], ["flat"]),
        node("Slice", ["s", "start0", "start2"], ["nc"]),
        node("Slice", ["s", "start2", "end4"], ["hw"]),
        node("Constant", [], ["four"], value_int=4),
        node("Constant", [], ["two"], value_ints=[2]),
        node("Div", ["four", "two"], ["factor"]),
        node("Mul", ["hw", "factor"], ["hw2"]),
        node("Concat", ["nc", "hw2"], ["sizes"], axis=0),
        node("Resize", ["x", "", "", "sizes"], ["up"], mode="nearest", coordinate_transformation_mode="asymmetric",
             nearest_mode="floor"),
        node("ReduceMean", ["x", "axes23"], ["mean"], keepdims=0),
        node("Slice", ["s", "start1", "start2"], ["c1"]),
        node("Squeeze", ["c1", "axis0"], ["c"]),
        node("Cast", ["c"], ["c_float"], to=TensorProto.FLOAT),
        node("Mul", ["mean", "c_float"], ["scaled"]),
        node("Concat", ["n1", "three"], ["n3"], axis=0),
        node("ConstantOfShape", ["n3"], ["halves"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        node("Expand", ["bias", "n3"], ["bias_n"]),
        node("Add", ["halves", "bias_n"], ["filled"]),
        node("Equal", ["n1", "one"], ["single"]),
        node("Where", ["single", "two", "n1"], ["rows"]),
        node("Concat", ["rows", "minus1"], ["rows_shape"], axis=0),
        node("Reshape", ["x", "rows_shape"], ["by_rows"]),
    ]
    inits = [_ints("axis0", [0]), _ints("minus1", [-1]), _ints("start0", [0]), _ints("start1", [1]),
             _ints("start2", [2]), _ints("end4", [4]), _ints("axes23", [2, 3]), _ints("three", [3]), _ints("one", [1]),
             helper.make_tensor("bias", TensorProto.FLOAT, [1, 3], [1.0, 2.0, 3.0])]
    outputs = {"flat": ["N", 144], "up": ["N", 4, 12, 12], "scaled": ["N", 4], "filled": ["N", 3],
               "by_rows": [None, None]}
    graph = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """name -> (ONNX path, expected output shapes at batch 3)."""
    d = tmp_path_factory.mktemp("onnx_torch")
    make_spade_checkpoint(d / "spade", label_nc=6, contain_dontcare_label=True, no_instance=False, ngf=8,
                          crop_size=64, norm_G="spectralspadesyncbatch3x3")
    proc = run_cli("export", "spade", "--checkpoint", d / "spade", "--out", d / "g.onnx", "--batch", "dynamic")
    assert proc.returncode == 0, proc.stderr
    (d / "shapes.onnx").write_bytes(_shape_arithmetic_graph())
    return {"voc": (bundled_model("voc"), {"labels": (3, 513, 513), "confidence": (3, 513, 513)}),
            "spade": (d / "g.onnx", {"image": (3, 3, 64, 64)}),
            "shapes": (d / "shapes.onnx", {"flat": (3, 144), "up": (3, 4, 12, 12), "scaled": (3, 4), "filled": (3, 3),
                                           "by_rows": (3, 144)})}


def _feed(path, batch, infer=False):
    """(the feed the engine commands make up for ``path``, ONNX Runtime's outputs for it, or
    where not ``infer`` its output dtypes)."""
    from segsynth.engine.commands import _inputs

    with OnnxRuntimeRunner(path) as runner:
        feed = _inputs(runner, batch, None)
        return feed, runner.infer(feed) if infer else {k: meta.dtype for k, meta in runner.outputs.items()}


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", ["voc", "spade", "shapes"])
def test_a_call_reads_no_device_data(name, half, graphs):
    """Constants and feed on "meta": a ``.tolist()``/``float()`` of a device tensor (a Slice's
    starts, a Resize's sizes, an Expand's shape taken from a device Shape) would raise."""
    path, shapes = graphs[name]
    feed, dtypes = _feed(path, batch=3)
    module = OnnxTorchModule(path).to("meta", half=half)
    with torch.inference_mode():
        out = module(**{k: torch.from_numpy(v).to("meta") for k, v in feed.items()})
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    for k, v in out.items():
        assert v.device.type == "meta", k
        dtype = np.dtype(dtypes[k])
        assert v.dtype == (torch.float16 if half and dtype == np.float32 else getattr(torch, dtype.name)), k


@pytest.mark.parametrize("name", ["voc", "spade", "shapes"])
def test_outputs_on_the_cpu_match_onnxruntime(name, graphs):
    path, shapes = graphs[name]
    feed, want = _feed(path, batch=2, infer=True)
    with torch.inference_mode():
        got = OnnxTorchModule(path).to("cpu")(**{k: torch.from_numpy(v) for k, v in feed.items()})
    for k, value in want.items():
        out = got[k].numpy()
        assert out.shape == value.shape == (2, *shapes[k][1:]) and out.dtype == value.dtype, k
        if value.dtype == np.uint8:  # segmenter labels: argmax of nearly equal float logits
            assert (out == value).mean() > 0.999, k
        else:
            assert np.abs(out - value).max() / (np.abs(value).max() + 1e-9) < 1e-4, k
