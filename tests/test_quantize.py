"""The fast tier: int8 graphs made by `segsynth export quantize` (onnxruntime QDQ, calibrated on
frames of the bundled clips), segmenters re-shaped to another input size (export.seg_size), the
argmax taken before the upsampling, and `--models fast` through the CLI. Accuracy is measured
against the float graphs on frames none of them was calibrated on (examples/demo.mp4: Big Buck
Bunny seconds 7-9; the calibration takes seconds 0-7) and on a photo."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import REPO, run_cli

MODELS = REPO / "segsynth" / "models"
SEGMENTERS = {"ade20k": ("deeplabv3_mnv2_ade20k", 127.5), "voc": ("deeplabv3_mnv2_voc", 128.0)}


def held_out_frames() -> list[np.ndarray]:
    import av

    with av.open(str(REPO / "examples" / "demo.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(c.decode(video=0)) if i % 8 == 0]
    return frames + [np.asarray(Image.open(REPO / "examples" / "astronaut.png").convert("RGB"))]


def session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def labels_of(sess: ort.InferenceSession, frame: np.ndarray, mean: float) -> np.ndarray:
    size = sess.get_inputs()[0].shape[2]
    x = (np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR), np.float32) - mean) / mean
    out = sess.run(["labels"], {"image": np.ascontiguousarray(x.transpose(2, 0, 1)[None])})[0][0]
    return np.asarray(Image.fromarray(out).resize((513, 513), Image.NEAREST))


def fw_iou(ours: np.ndarray, reference: np.ndarray) -> float:
    """Frequency-weighted IoU of a label map against a reference one (weights: the reference's
    class frequencies)."""
    total = 0.0
    for c, count in zip(*np.unique(reference, return_counts=True)):
        a, b = ours == c, reference == c
        total += count / reference.size * (a & b).sum() / (a | b).sum()
    return float(total)


def test_int8_graphs_against_the_float_ones(capsys):
    """Label agreement of each int8 segmenter with its float graph (the same 513 input), and the
    int8 default generator's picture against the float one's, on the float labels."""
    frames = held_out_frames()
    agreement, fwiou = {}, {}
    for name, (stem, mean) in SEGMENTERS.items():
        floats, ints = session(MODELS / f"{stem}.onnx"), session(MODELS / f"{stem}.int8.onnx")
        pairs = [(labels_of(ints, f, mean), labels_of(floats, f, mean)) for f in frames]
        agreement[name] = float(np.mean([(a == b).mean() for a, b in pairs]))
        fwiou[name] = float(np.mean([fw_iou(a, b) for a, b in pairs]))
        model = onnx.load(str(MODELS / f"{stem}.int8.onnx"))
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["segsynth.role"] == "segmenter" and "bbb_h264_aac_720p_10s.mp4#0-7" in meta["segsynth.calibration"]
        assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 50
    from segsynth.stream.infer.segmenter import load_segmenter
    from segsynth.stream.pictures import resize_labels, resize_rgb

    seg = load_segmenter("ade20k+voc")
    size = {i.name: i.shape for i in session(MODELS / "student_ade20k.onnx").get_inputs()}["label"][-1]
    label_maps = [resize_labels(seg(resize_rgb(f, 513, 513)[None]), size, size) for f in frames]
    seg.close()
    from segsynth.stream.infer.generator import load_generator

    default = load_generator("default")
    z = default.seeded_z(0)
    default.close()
    pictures = {}
    for kind in ("", ".int8"):
        sess = session(MODELS / f"student_ade20k{kind}.onnx")
        feeds = [{"label": m.astype(np.int64)[:, None], "z": z} for m in label_maps]
        pictures[kind] = np.array([((sess.run(["image"], f)[0] + 1) * 127.5).round().clip(0, 255) for f in feeds])
    psnr = 10 * np.log10(255 ** 2 / np.mean((pictures[""] - pictures[".int8"]) ** 2))
    with capsys.disabled():
        print(f"\nint8 vs float on {len(frames)} held-out frames: ADE20K labels {agreement['ade20k']:.4f} "
              f"(fwIoU {fwiou['ade20k']:.4f}), VOC labels {agreement['voc']:.4f} (fwIoU {fwiou['voc']:.4f}), "
              f"default generator picture {psnr:.2f} dB PSNR")
    # measured: ADE20K 0.907, VOC 0.978, the generator (the student) 37.6 dB (SPADE's int8 graph:
    # 29.4 dB); the floors 1.5 dB and about 0.01 under them
    assert agreement["ade20k"] >= 0.89 and agreement["voc"] >= 0.97 and psnr >= 36
    assert fwiou["ade20k"] >= 0.8 and fwiou["voc"] >= 0.95


@pytest.mark.slow  # three calibrations
def test_the_shipped_int8_graphs_are_what_the_recipe_makes(tmp_path):
    script = REPO / "scripts" / "quantize-bundled"
    env = {**os.environ, "SEGSYNTH": str(Path(os.sys.executable).with_name("segsynth")), "PYTHON": os.sys.executable}
    r = subprocess.run([str(script), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    from onnx import numpy_helper

    for stem in ("deeplabv3_mnv2_ade20k", "deeplabv3_mnv2_voc", "student_ade20k"):
        made, shipped = onnx.load(str(tmp_path / f"{stem}.int8.onnx")), onnx.load(str(MODELS / f"{stem}.int8.onnx"))
        assert [n.op_type for n in made.graph.node] == [n.op_type for n in shipped.graph.node]
        ours = {i.name: numpy_helper.to_array(i) for i in made.graph.initializer}
        for init in shipped.graph.initializer:  # the same weights and ranges (float sums may round apart)
            a, b = ours[init.name], numpy_helper.to_array(init)
            if a.dtype.kind == "f":
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=init.name)
            else:
                assert np.abs(a.astype(int) - b).max() <= 1, init.name


def test_quantize_refuses_what_it_cannot_take(tmp_path):
    clip = REPO / "examples" / "demo.mp4"
    text = tmp_path / "notes.onnx"
    text.write_text("not a graph")
    for args, message in (
            ((text, "--calibrate", clip), "not an ONNX model"),
            ((MODELS / "deeplabv3_mnv2_voc.int8.onnx", "--calibrate", clip), "quantised already"),
            ((MODELS / "deeplabv3_mnv2_voc.onnx",), "needs --calibrate"),
            ((MODELS / "deeplabv3_mnv2_voc.onnx", "--calibrate", f"{clip}#5-1"), "START must be before END"),
            ((MODELS / "deeplabv3_mnv2_voc.onnx", "--calibrate", tmp_path / "none.mp4"), "cannot read it")):
        r = run_cli("export", "quantize", *args, "--out", tmp_path / "out.onnx", timeout=120)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert not (tmp_path / "out.onnx").exists()


def test_segmenters_reshaped_to_other_sizes_and_argmax_before_upsampling():
    from segsynth.core.errors import InputError
    from segsynth.stream.infer.seg_size import argmax_before_upsampling, resize_segmenter

    model = onnx.load(str(MODELS / "deeplabv3_mnv2_voc.onnx"))
    frames = held_out_frames()
    full = session(model)
    reference = [labels_of(full, f, 128.0) for f in frames]
    assert resize_segmenter(model, 513).SerializeToString() == model.SerializeToString()
    for size in (385, 321, 257):
        small = resize_segmenter(model, size)
        assert [d.dim_value for d in small.graph.input[0].type.tensor_type.shape.dim[2:]] == [size, size]
        sess = session(small)
        out = sess.run(["labels", "confidence"], {"image": np.zeros((1, 3, size, size), np.float32)})
        assert out[0].shape == out[1].shape == (1, size, size)
        agree = np.mean([(labels_of(sess, f, 128.0) == r).mean() for f, r in zip(frames, reference)])
        assert agree >= 0.9, (size, agree)
        low = argmax_before_upsampling(small)
        def modes(m):
            return sorted(onnx.helper.get_attribute_value(a).decode() for n in m.graph.node if n.op_type == "Resize"
                          for a in n.attribute if a.name == "mode")

        assert modes(small) == ["linear"] * 3 and modes(low) == ["linear", "linear", "nearest"]  # logits not upsampled
        moved = np.mean([(labels_of(session(low), f, 128.0) == labels_of(sess, f, 128.0)).mean() for f in frames])
        assert 0.95 <= moved < 1.0, moved  # only boundary pixels move
    for bad in (300, 16, 514):
        with pytest.raises(InputError, match="16k \\+ 1"):
            resize_segmenter(model, bad)


def test_models_fast_on_the_command_line(tmp_path):
    clip = REPO / "examples" / "demo.mp4"
    r = run_cli("run", clip, tmp_path / "fast.mp4", "--models", "fast", "--frames", "8",
                "--cache-dir", tmp_path / "cache", timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "segmenters").glob("*.onnx")) == [
        "deeplabv3_mnv2_ade20k.int8", "deeplabv3_mnv2_voc.int8"]
    r = run_cli("segment", REPO / "examples" / "astronaut.png", tmp_path / "labels.png", "--models", "fast",
                "--seg-size", "257", timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "labels.png").size == (512, 512)
    for args, message in ((("--models", "turbo"), "invalid choice"), (("--seg-size", "300"), "16k + 1")):
        r = run_cli("run", clip, tmp_path / "x.mp4", *args, timeout=120)
        assert r.returncode == 2 and message in r.stderr, r.stderr
