"""The float16 graph converter (engine/fp16.py) on the graphs segsynth ships: valid ONNX,
TensorRT-parsable, I/O types unchanged, float32 left only where ONNX requires it, and the
same labels / nearly the same pixels as the float32 graph on real photos and video frames.
The float16 graphs run with onnxruntime (CPU) and with the torch interpreter, whose CPU
kernels compute in float16 (onnxruntime's CPU provider may widen some nodes to float32)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import MEDIA, make_deeplab_checkpoint, make_spade_checkpoint, run_cli
from segsynth.engine.fp16 import cached_float16, to_float16
from segsynth.engine.graphcheck import tensorrt_problems
from segsynth.engine.onnxruntime import OnnxRuntimeRunner
from segsynth.engine.select import Float16OnnxRuntimeRunner
from segsynth.engine.torch_runner import TorchCudaRunner
from segsynth.stream.infer.generator import bundled_generator
from segsynth.stream.infer.segmenter import OnnxSegmenter, bundled_model
from segsynth.stream.pictures import resize_labels, resize_rgb

GRAPHS = {"voc": lambda: bundled_model("voc"), "ade20k": lambda: bundled_model("ade20k"),
          "generator": bundled_generator}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (float32 path, float16 path): each shipped graph converted once."""
    d = tmp_path_factory.mktemp("fp16")
    out = {}
    for name, where in GRAPHS.items():
        path = where()
        onnx.save(to_float16(onnx.load(str(path))), str(d / f"{name}.onnx"))
        out[name] = (path, d / f"{name}.onnx")
    return out


@pytest.fixture(scope="module")
def frames(astronaut):
    """Two real pictures at the segmenters' 513 x 513: a photo of a person and a video frame."""
    import av

    with av.open(str(MEDIA / "bbb_h264_aac_720p_10s.mp4")) as container:
        stream = container.streams.video[0]
        container.seek(int(4 / stream.time_base), stream=stream)
        frame = next(container.decode(stream)).to_ndarray(format="rgb24")
    return np.stack([resize_rgb(np.ascontiguousarray(p), 513, 513) for p in (astronaut, frame)])


def _io(model):
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
            for v in (*model.graph.input, *model.graph.output)]


@pytest.mark.parametrize("name", list(GRAPHS))
def test_io_types_kept_and_float32_left_only_where_onnx_requires_it(name, converted):
    source, path = converted[name]
    before, after = onnx.load(str(source)), onnx.load(str(path))
    onnx.checker.check_model(after, full_check=True)  # strict shape and type inference
    assert tensorrt_problems(after) == []
    assert _io(after) == _io(before)
    assert {p.key: p.value for p in after.metadata_props} == {p.key: p.value for p in before.metadata_props}

    inferred = onnx.shape_inference.infer_shapes(after, strict_mode=True).graph
    io = {v.name for v in (*inferred.input, *inferred.output)}
    kinds = {v.name: v.type.tensor_type.elem_type for v in inferred.value_info}
    kinds.update({t.name: t.data_type for t in inferred.initializer})
    inside = collections.Counter(kind for n, kind in kinds.items() if n not in io)
    float32 = [n for n, kind in kinds.items() if kind == TensorProto.FLOAT and n not in io]
    readers = {n: [(node.op_type, list(node.input).index(n)) for node in inferred.node if n in node.input]
               for n in float32}
    # the one float32 the generator keeps is Resize's scales, which ONNX types tensor(float) only
    assert all(r and all(use == ("Resize", 2) for use in r) for r in readers.values()), readers
    assert len(float32) == {"voc": 0, "ade20k": 0, "generator": 1}[name], float32
    weights = [t for t in inferred.initializer if any(t.name == n.input[1] for n in inferred.node if n.op_type == "Conv")]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    assert inside[TensorProto.FLOAT16] > 0.8 * sum(inside.values()), inside  # the compute really is float16


def _fp16_runner(path, executor):
    return OnnxRuntimeRunner(path) if executor == "onnxruntime" else TorchCudaRunner(path, device="cpu", fp16=False)


@pytest.mark.parametrize("executor", ["onnxruntime", "torch"])
@pytest.mark.parametrize("name", ["voc", "ade20k"])
def test_float16_segmenters_label_real_pictures_like_float32(name, executor, converted, frames):
    source, path = converted[name]
    want = OnnxSegmenter(OnnxRuntimeRunner(source))(frames)
    segmenter = OnnxSegmenter(_fp16_runner(path, executor))
    try:
        got = segmenter(frames)
    finally:
        segmenter.close()
    assert got.dtype == np.uint8 and got.shape == want.shape == (2, 513, 513)
    assert len(np.unique(want)) > 2, "the pictures should hold several classes"
    agreement = (got == want).mean()
    print(f"{name} on {executor}: float16 labels agree with float32 on {agreement:.4%} of pixels")
    assert agreement >= 0.98


@pytest.mark.parametrize("executor", ["onnxruntime", "torch"])
def test_float16_generator_paints_nearly_the_float32_image(executor, converted, frames):
    source, path = converted["generator"]
    scenes = OnnxSegmenter(OnnxRuntimeRunner(bundled_model("ade20k")))(frames)
    with OnnxRuntimeRunner(source) as fp32, _fp16_runner(path, executor) as fp16:
        h, w = fp32.inputs["label"].shape[2:]
        for scene in scenes:
            feed = {"label": resize_labels(scene, w, h).astype(np.int64)[None, None]}
            if "z" in fp32.inputs:  # a VAE generator (the bundled default is one): a fixed style
                feed["z"] = np.random.default_rng(0).standard_normal((1, fp32.inputs["z"].shape[1])).astype(np.float32)
            want, got = fp32.infer(feed)["image"], fp16.infer(feed)["image"]
            assert got.dtype == np.float32 and got.shape == want.shape
            diff = np.abs(got.astype(np.float64) - want)
            psnr = 10 * np.log10(2.0**2 / (diff**2).mean())  # images span [-1, 1]
            print(f"generator on {executor}: PSNR {psnr:.1f} dB, max abs {diff.max():.4f}")
            assert psnr > 40 and diff.max() < 0.1


def _rules_graph():
    """Shape arithmetic past float16's exact integers, Resize scales computed in float, a
    weight beyond float16's range, a Range (no float16 form) and a ConstantOfShape."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array([1, 1, 2, 1], np.float32), "base"),
             numpy_helper.from_array(np.array(1e6, np.float32), "big"),
             numpy_helper.from_array(np.array(0.0, np.float32), "r0"),
             numpy_helper.from_array(np.array(4.0, np.float32), "r1"),
             numpy_helper.from_array(np.array([1, 4], np.int64), "cshape")]
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["sf"], to=f32),
             helper.make_node("Add", ["sf", "one"], ["sf1"]), helper.make_node("Cast", ["sf1"], ["n"], to=i64),
             helper.make_node("Mul", ["base", "one"], ["scales"]),
             helper.make_node("Resize", ["x", "", "scales"], ["xr"], mode="nearest"),
             helper.make_node("Min", ["xr", "big"], ["y"]),
             helper.make_node("Range", ["r0", "r1", "one"], ["r"]),
             helper.make_node("ConstantOfShape", ["cshape"], ["c"],
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Mul", ["z", "r"], ["zr"]), helper.make_node("Add", ["zr", "c"], ["y2"])]
    graph = helper.make_graph(nodes, "rules", [helper.make_tensor_value_info("x", f32, [1, 1, 2, 2049]),
                                               helper.make_tensor_value_info("z", f32, [1, 4])],
                              [helper.make_tensor_value_info("n", i64, [4]),
                               helper.make_tensor_value_info("y", f32, [1, 1, 4, 2049]),
                               helper.make_tensor_value_info("y2", f32, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_the_rules_on_a_graph_made_to_break_them():
    import onnxruntime as ort

    model = _rules_graph()
    half = to_float16(model)
    onnx.checker.check_model(half, full_check=True)
    assert tensorrt_problems(half) == [] and _io(half) == _io(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in onnx.shape_inference.infer_shapes(half, strict_mode=True).graph.value_info}
    inits = {t.name: numpy_helper.to_array(t) for t in half.graph.initializer}
    assert types["sf1"] == types["scales"] == types["r"] == TensorProto.FLOAT  # shape maths, scales, Range
    assert types["xr"] == types["zr"] == types["c"] == TensorProto.FLOAT16
    assert inits["big"].dtype == np.float16 and inits["big"] == 65504  # clamped, not inf
    assert inits["base"].dtype == np.float32  # read only to compute Resize's scales

    rng = np.random.default_rng(0)
    feed = {"x": rng.uniform(-3, 3, (1, 1, 2, 2049)).astype(np.float32), "z": rng.uniform(-1, 1, (1, 4)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)  # noqa: E731
    (n32, y32, z32), (n16, y16, z16) = run(model), run(half)
    assert n16.tolist() == n32.tolist() == [2, 2, 3, 2050]  # 2049 + 1 in float16 would be 2048
    assert y16.dtype == np.float32 and y16.shape == y32.shape and np.abs(y16 - y32).max() < 3 * 2**-10
    assert np.abs(z16 - z32).max() < 1e-2 and not np.array_equal(y16, y32)  # rounded to float16 inside


def test_onnxruntime_float16_runner_converts_once_into_the_cache(tmp_path, frames):
    source = bundled_model("voc")
    want = OnnxSegmenter(OnnxRuntimeRunner(source))(frames[:1])
    runner = Float16OnnxRuntimeRunner(source, tmp_path)
    segmenter = OnnxSegmenter(runner)
    got = segmenter(frames[:1])
    segmenter.close()
    (cached,) = (tmp_path / "fp16").iterdir()
    assert runner.label == source.name and runner.inputs["image"].dtype == np.float32
    assert any(t.data_type == TensorProto.FLOAT16 for t in onnx.load(str(cached)).graph.initializer)
    assert (got == want).mean() >= 0.98
    stamp = cached.stat().st_mtime_ns
    assert cached_float16(source, tmp_path) == cached and cached.stat().st_mtime_ns == stamp  # found, not rewritten
    assert isinstance(cached_float16(source, None), bytes)  # no cache: bytes for OnnxRuntimeRunner


@pytest.mark.slow  # the export takes about a minute on two cores
def test_float16_chain_keeps_its_uint8_edges_and_its_pixels(tmp_path):
    import onnxruntime as ort

    seg = make_deeplab_checkpoint(tmp_path / "deeplab.pth", "kazuto", 21, n_blocks=(3, 4, 6, 3))
    make_spade_checkpoint(tmp_path / "spade", label_nc=182, contain_dontcare_label=True, no_instance=False, ngf=8,
                          crop_size=64)
    proc = run_cli("export", "chain", "--deeplab", seg, "--checkpoint", tmp_path / "spade", "--size", "96x64",
                   "--seg-size", "65x65", "--batch", "dynamic", "--out", tmp_path / "chain.onnx")
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(tmp_path / "chain.onnx"))
    half = to_float16(model)
    onnx.checker.check_model(half, full_check=True)
    assert tensorrt_problems(half) == [] and _io(half) == _io(model)
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (2, 8, 12, 3)).repeat(8, 1).repeat(8, 2).astype(np.uint8)  # blocky, like a scene
    feed = {"frames": frames, "remap": np.arange(256, dtype=np.uint8)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)  # noqa: E731
    (image32, labels32), (image16, labels16) = run(model), run(half)
    assert image16.dtype == labels16.dtype == np.uint8
    assert (labels16 == labels32).mean() >= 0.98
    assert np.abs(image16.astype(int) - image32.astype(int)).max() <= 2
