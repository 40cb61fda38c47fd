"""The runtime chain (segsynth.stream.infer.chain): the bundled segmenters, a remap table and the
bundled generator composed into one graph give, on onnxruntime, what the host path gives:
labels exactly, pixels within one level; and the composed graph is TensorRT-parsable."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from conftest import assert_tensorrt_parsable, decode_video, run_cli, write_clip
from segsynth.core import labels
from segsynth.engine.graphcheck import tensorrt_problems
from segsynth.engine.onnxruntime import OnnxRuntimeRunner
from segsynth.stream.infer.chain import compose, letterbox_indices
from segsynth.stream.infer.generator import load_generator
from segsynth.stream.infer.segmenter import load_segmenter
from segsynth.stream.pictures import resize_labels
from segsynth.stream.infer.synth import content_box


def _frames():
    import skimage.data as data
    from PIL import Image

    photos = [data.astronaut(), data.chelsea()]
    return np.stack([np.asarray(Image.fromarray(p).resize((513, 513), Image.BILINEAR)) for p in photos])


def _z(gen):
    """A fixed z for VAE generators (the bundled default is one), None for the others."""
    return np.random.default_rng(0).standard_normal((1, gen.z_dim)).astype(np.float32) if gen.uses_z else None


def _host_path(seg, gen, table, frames, box):
    """Synthesize._complete's arithmetic, step by step on the host."""
    ids = table(seg(frames))
    gw, gh = gen.size
    x, y, cw, ch = box
    canvases = np.full((len(ids), gh, gw), labels.UNKNOWN, np.uint8)
    canvases[:, y:y + ch, x:x + cw] = resize_labels(ids, cw, ch)
    return ids, np.concatenate([gen(c[None], _z(gen)) for c in canvases])  # the bundled generator: a frame a call


@pytest.mark.parametrize("spec", ["voc", "ade20k+voc"])
def test_the_chain_gives_what_the_host_path_gives(spec):
    seg, gen = load_segmenter(spec), load_generator("default")
    try:
        table = labels.RemapTable("person=animal", seg.label_set, gen.label_set)
        frames = _frames()
        box = content_box((640, 360), gen.size)  # a 16:9 video letterboxed into the generator's square
        want_ids, want_pixels = _host_path(seg, gen, table, frames, box)
        chain = compose(seg, gen)
        assert tensorrt_problems(chain) == []
        rows, cols = letterbox_indices(seg.size, gen.size, box)
        with OnnxRuntimeRunner(chain.SerializeToString()) as runner:
            z = {"z": _z(gen)} if gen.uses_z else {}
            got = [runner.infer({"frames": f[None], "remap": table.lut, "rows": rows, "cols": cols, **z}) for f in frames]
    finally:
        seg.close()
        gen.close()
    ids = np.concatenate([g["labels"] for g in got])
    pixels = np.concatenate([g["pixels"] for g in got])
    assert len(np.unique(want_ids)) > 2 and (want_ids == labels.get("ade20k").aliases["animal"]).any()
    assert np.array_equal(ids, want_ids)
    assert pixels.shape == want_pixels.shape
    assert np.abs(pixels.astype(int) - want_pixels).max() <= 1


def test_a_chain_without_generator_labels_a_batch():
    seg = load_segmenter("voc")
    try:
        table = labels.RemapTable("person=car", seg.label_set)
        frames = _frames()
        want = table(seg(frames))
        with OnnxRuntimeRunner(compose(seg).SerializeToString()) as runner:
            assert set(runner.inputs) == {"frames", "remap"} and set(runner.outputs) == {"labels"}
            got = runner.infer({"frames": frames, "remap": table.lut})["labels"]
    finally:
        seg.close()
    assert (want == labels.get("voc").aliases["car"]).any()
    assert np.array_equal(got, want)


def test_letterbox_indices_point_outside_the_box_at_the_padding():
    rows, cols = letterbox_indices((8, 4), (6, 6), (1, 2, 4, 2))
    assert rows.tolist() == [4, 4, 1, 3, 4, 4]  # the label map's 4 rows read at 2 rows' centres; pad row 4
    assert cols.tolist() == [8, 1, 3, 5, 7, 8]


def _spy_submits(runner) -> list:
    """Count the calls a real runner's submit() gets (it still does the work)."""
    calls, real = [], runner.submit

    def submit(feed):
        calls.append(len(next(iter(feed.values()))))
        return real(feed)

    runner.submit = submit
    return calls


@pytest.mark.parametrize("stabilize", ["off", "hysteresis"])
def test_a_session_through_the_chain_writes_what_the_models_write_one_by_one(tmp_path, people_clip, stabilize):
    """The fused graphs in a real session (VFR clip with audio, batches of 2, letterbox, a remap):
    the same frames and timestamps as the models one by one. Unstabilised, one graph does it
    all; stabilised, the segment and synth parts run either side of the stabiliser."""
    from segsynth.core.config import StreamConfig
    from segsynth.stream import ModelSet, StreamSession

    parts = ("all",) if stabilize == "off" else ("segment", "synth")
    outs = {}
    for fused in ("off", "on"):
        with ModelSet.load("voc", "default", fused=fused, cache_dir=tmp_path, backend="onnxruntime") as models:
            outs[fused] = tmp_path / f"{fused}.mp4"
            s = StreamSession(StreamConfig(source=people_clip, sinks=[outs[fused]], view="side-by-side",
                                           remap="person=animal", fit="letterbox", batch=2, crf=0,
                                           stabilize=stabilize), models)
            assert sorted(models.chains) == ([] if fused == "off" else sorted(parts))
            calls = {part: _spy_submits(models.chains[part].runner) for part in models.chains}
            s.start()
            assert s.join(120) and s.state == "closed", s.stats()
            for part, sizes in calls.items():  # every frame went through, in batches of up to 2
                assert sum(sizes) == 8 and max(sizes) <= 2, (part, sizes)
    (t_off, f_off), (t_on, f_on) = decode_video(outs["off"]), decode_video(outs["on"])
    assert t_on == t_off == decode_video(people_clip)[0] and len(f_on) == 8
    assert all(np.array_equal(a, b) for a, b in zip(f_on, f_off))


def test_the_models_are_fused_by_default_and_the_chain_is_written_once(tmp_path, monkeypatch):
    from segsynth.stream import ModelSet
    from segsynth.stream.infer import chain as chain_module

    with ModelSet.load("voc", "none", fused="off") as models:
        assert models.fused("all") is None and models.fused("segment") is None
    composed, real = [], chain_module.compose
    monkeypatch.setattr(chain_module, "compose", lambda *a: composed.append(a) or real(*a))
    for fused in ("auto", "on"):
        with ModelSet.load("voc", "none", fused=fused, cache_dir=tmp_path) as models:
            assert models.chains == {}  # made on first use
            whole, segment = models.fused("all"), models.fused("segment")
            assert models.fused("all") is whole and models.fused("synth") is None  # shared; no generator
            assert set(whole.runner.inputs) == {"frames", "remap"} and set(whole.runner.outputs) == {"labels"}
            assert set(segment.runner.inputs) == {"frames"} and set(segment.runner.outputs) == {"ids", "confidence"}
    assert len(composed) == 2  # the second load found both in the cache
    for written in (tmp_path / "chains").iterdir():
        assert_tensorrt_parsable(written)
    # the CLI flag reaches the models; a bad value is refused by argparse
    clip = tmp_path / "in.mp4"
    write_clip(clip, [np.zeros((48, 64, 3), np.uint8)] * 3, [Fraction(i, 25) for i in range(3)])
    proc = run_cli("run", clip, tmp_path / "out.mp4", "--segmenter", "voc", "--generator", "none", "--fused", "on",
                   "--cache-dir", tmp_path / "cli-cache", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "fused chain (segment)" in proc.stderr  # run stabilises by default: the segment part, then the host
    assert [p.name.split("-")[1] for p in (tmp_path / "cli-cache" / "chains").iterdir()] == ["segment"]
    proc = run_cli("run", clip, tmp_path / "out2.mp4", "--fused", "maybe")
    assert proc.returncode == 2 and "--fused" in proc.stderr


def test_models_that_cannot_be_fused_are_said_once_and_run_one_by_one(tmp_path, caplog):
    """auto falls back with a warning; on makes it an error. The composition really fails here:
    a segmenter that takes batches of exactly 2 cannot share one graph with a generator that
    takes exactly 1 (one by one, each model gets its own batch)."""
    import onnx

    from segsynth.core.errors import ModelError
    from segsynth.stream import ModelSet
    from segsynth.stream.infer.generator import bundled_generator
    from segsynth.stream.infer.segmenter import bundled_model

    pairs = onnx.load(str(bundled_model("voc")))
    pairs.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    custom = tmp_path / "pairs.onnx"
    onnx.save(pairs, str(custom))
    one = onnx.load(str(bundled_generator()))  # the bundled generator, made to take batches of exactly 1
    for value in (*one.graph.input, *one.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    single = tmp_path / "single.onnx"
    onnx.save(one, str(single))
    with caplog.at_level("WARNING", logger="segsynth"):
        with ModelSet.load(str(custom), str(single), label_set="voc", cache_dir=tmp_path, fused="auto") as models:
            assert models.fused("all") is None and models.fused("all") is None and models.segmenter.runner.is_active
    (warning,) = [r.getMessage() for r in caplog.records if "fused chain" in r.getMessage()]  # said once
    assert "fixed batches of different sizes (1, 2)" in warning and "one by one" in warning
    with ModelSet.load(str(custom), str(single), label_set="voc", cache_dir=tmp_path, fused="on") as models:
        with pytest.raises(ModelError, match="cannot be composed"):
            models.fused("all")


def test_the_torch_interpreter_runs_the_chain_as_onnxruntime_does(tmp_path):
    """What torch-cuda runs on a GPU, on the CPU: float32 gives onnxruntime's result; float16
    (the GPU default) stays close. Ops the chain adds (Round, int32 Pad/Gather, Where) included."""
    import torch

    from segsynth.engine.onnx_torch import OnnxTorchModule
    from segsynth.engine.torch_runner import TorchCudaRunner
    from segsynth.stream.infer.chain import write_chain

    seg, gen = load_segmenter("voc"), load_generator("default")
    try:
        path = write_chain(seg, gen, tmp_path)
        table = labels.RemapTable("person=animal", seg.label_set, gen.label_set)
    finally:
        seg.close()
        gen.close()
    rows, cols = letterbox_indices((513, 513), gen.size, content_box((640, 360), gen.size))
    feed = {"frames": _frames()[:1], "remap": table.lut, "rows": rows, "cols": cols}
    if gen.uses_z:
        feed["z"] = _z(gen)
    with OnnxRuntimeRunner(path) as ort_runner, TorchCudaRunner(path, device="cpu") as torch_runner:
        want, got = ort_runner.infer(feed), torch_runner.infer(feed)
    assert np.array_equal(got["labels"], want["labels"])
    assert np.abs(got["pixels"].astype(int) - want["pixels"]).max() <= 1
    half = OnnxTorchModule(path).to(torch.device("cpu"), half=True)
    with torch.inference_mode():
        out = half(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()})
    assert out["labels"].dtype == torch.uint8 and out["pixels"].dtype == torch.uint8
    agreement = float((out["labels"].numpy() == want["labels"]).mean())
    mean_diff = float(np.abs(out["pixels"].numpy().astype(float) - want["pixels"]).mean())
    print(f"\nthe chain in float16 (torch, CPU) vs float32: labels {agreement:.2%}, pixels mean |diff| {mean_diff:.2f}")
    assert agreement >= 0.99 and mean_diff < 3
