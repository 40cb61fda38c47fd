"""The CPU-side TensorRT parsability check: it passes the graphs segsynth ships and finds
each kind of graph onnx-tensorrt refuses. (Every graph exported anywhere in the suite is
checked too: see conftest.run_cli.)"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import REPO, assert_tensorrt_parsable, run_cli
from segsynth.engine.graphcheck import tensorrt_problems
from segsynth.stream.infer.segmenter import bundled_model
from segsynth.stream.infer.generator import bundled_generator


@pytest.mark.parametrize("name", ["ade20k", "voc", "generator"])
def test_shipped_graphs_are_tensorrt_parsable(name):
    assert_tensorrt_parsable(bundled_generator() if name == "generator" else bundled_model(name))


def _model(nodes, inputs, outputs, inits=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, kind, shape):
    return helper.make_tensor_value_info(name, kind, shape)


def _lut_graph(lut_type, cast_at_the_end):
    """argmax -> Gather(lookup table) -> labels, as the TFLite converter wrote it before (uint8 table)
    and writes it now (int32 table, Cast to uint8)."""
    lut = numpy_helper.from_array(np.arange(256).astype(lut_type), "lut")
    nodes = [helper.make_node("ArgMax", ["x"], ["a"], axis=1, keepdims=0)]
    if cast_at_the_end:
        nodes += [helper.make_node("Gather", ["lut", "a"], ["ids"]),
                  helper.make_node("Cast", ["ids"], ["labels"], to=TensorProto.UINT8)]
    else:
        nodes += [helper.make_node("Gather", ["lut", "a"], ["labels"])]
    return _model(nodes, [_vi("x", TensorProto.FLOAT, [1, 4, 2, 2])], [_vi("labels", TensorProto.UINT8, [1, 2, 2])],
                  [lut])


def test_uint8_lookup_inside_is_found_and_the_int32_form_passes():
    problems = tensorrt_problems(_lut_graph(np.uint8, False))
    assert any("lut is uint8 inside" in p for p in problems)
    assert any("uint8 output labels is made by Gather" in p for p in problems)
    assert tensorrt_problems(_lut_graph(np.int32, True)) == []


def test_uint8_input_must_be_read_by_a_cast():
    frames = _vi("frames", TensorProto.UINT8, [1, 2, 2, 3])
    out = _vi("y", TensorProto.FLOAT, [1, 3, 2, 2])
    bad = _model([helper.make_node("Transpose", ["frames"], ["t"], perm=[0, 3, 1, 2]),
                  helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT)], [frames], [out])
    good = _model([helper.make_node("Cast", ["frames"], ["c"], to=TensorProto.FLOAT),
                   helper.make_node("Transpose", ["c"], ["y"], perm=[0, 3, 1, 2])], [frames], [out])
    problems = tensorrt_problems(bad)
    assert any("uint8 input frames is read by Transpose" in p for p in problems)
    assert any("tensor t is uint8 inside" in p for p in problems)
    assert tensorrt_problems(good) == []


def test_unsupported_ops_modes_types_and_runtime_axes_are_found():
    x = _vi("x", TensorProto.FLOAT, [1, 1, 4, 4])
    sizes = numpy_helper.from_array(np.array([1, 1, 2, 2], np.int64), "sizes")
    resize = _model([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear", antialias=1)],
                    [x], [_vi("y", TensorProto.FLOAT, [1, 1, 2, 2])], [sizes])
    assert any("antialias" in p for p in tensorrt_problems(resize))
    cubic = _model([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic")],
                   [x], [_vi("y", TensorProto.FLOAT, [1, 1, 2, 2])], [sizes])
    assert any("mode=cubic" in p for p in tensorrt_problems(cubic))
    det = _model([helper.make_node("Det", ["m"], ["d"])], [_vi("m", TensorProto.FLOAT, [3, 3])],
                 [_vi("d", TensorProto.FLOAT, [])])
    assert any("Det" in p and "support matrix" in p for p in tensorrt_problems(det))
    double = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)], [x],
                    [_vi("y", TensorProto.DOUBLE, [1, 1, 4, 4])])
    assert any("float64" in p for p in tensorrt_problems(double))
    axes = _model([helper.make_node("Unsqueeze", ["x", "axes"], ["y"])],
                  [x, _vi("axes", TensorProto.INT64, [1])], [_vi("y", TensorProto.FLOAT, None)])
    assert any("must be an initializer or Constant" in p for p in tensorrt_problems(axes))
    clip_int = _model([helper.make_node("Clip", ["i"], ["o"])], [_vi("i", TensorProto.INT32, [4])],
                      [_vi("o", TensorProto.INT32, [4])])
    assert any("int32, which TensorRT's Clip does not take" in p for p in tensorrt_problems(clip_int))
    relu22 = _model([helper.make_node("Relu", ["x"], ["y"])], [x], [_vi("y", TensorProto.FLOAT, [1, 1, 4, 4])],
                    opset=22)
    assert any("opset 22" in p for p in tensorrt_problems(relu22))


def test_engine_check_command(tmp_path):
    bad = tmp_path / "bad.onnx"
    onnx.save(_lut_graph(np.uint8, False), str(bad))
    proc = run_cli("engine", "check", bad)
    assert proc.returncode == 1 and "uint8 inside" in proc.stdout
    proc = run_cli("engine", "check", bundled_model("voc"))
    assert proc.returncode == 0 and "TensorRT-parsable" in proc.stdout
    proc = run_cli("engine", "check", tmp_path / "missing.onnx", bundled_model("voc"))
    assert proc.returncode == 2 and "no such ONNX file" in proc.stderr and not proc.stdout
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not an onnx file at all")
    proc = run_cli("engine", "check", corrupt)
    assert proc.returncode == 4 and "not a valid ONNX graph" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_gpu_check_script_runs_to_the_end_here_with_its_gpu_steps_skipped(tmp_path):
    import json
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: scripts/gpu-check runs its GPU steps for real there")
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "scripts/gpu-check", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = json.loads(out.read_text())["steps"]
    assert steps["graph-check"]["ok"] and set(steps["graph-check"]["problems"]) >= {"deeplabv3_mnv2_voc.onnx"}
    for name in ("pytest-gpu", "bench-chain", "bench-pipeline"):
        assert "no CUDA GPU" in steps[name]["skipped"]
    assert "skipped" in steps["trt-parse"] or steps["trt-parse"]["ok"]
