"""GPU checks (marker ``gpu``): run on a machine with a CUDA GPU, e.g. ``pytest -m gpu``.
Skipped elsewhere with the reason. TensorRT tests also skip where ``tensorrt`` is absent."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_spade_checkpoint, run_cli
from segsynth.stream.infer.segmenter import bundled_model

pytestmark = pytest.mark.gpu


def _photos(n=4):
    import skimage.data as data
    from PIL import Image

    photos = [data.astronaut(), data.coffee(), data.rocket(), data.chelsea()][:n]
    return np.stack([np.asarray(Image.fromarray(p).resize((513, 513), Image.BILINEAR)) for p in photos])


def _normalised(frames):
    return ((frames.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)


def test_torch_cuda_fp16_deeplab_agrees_with_fp32():
    from segsynth.engine.torch_runner import TorchCudaRunner

    x = _normalised(_photos())
    with TorchCudaRunner(bundled_model("ade20k"), fp16=False) as fp32, TorchCudaRunner(bundled_model("ade20k")) as fp16:
        a, b = fp32.infer({"image": x})["labels"], fp16.infer({"image": x})["labels"]
    agreement = float((a == b).mean())
    print(f"\nADE20K DeepLab on CUDA: FP16 vs FP32 argmax agreement {agreement:.4%}")
    assert agreement >= 0.995


def test_torch_cuda_fp16_spade_psnr(tmp_path):
    from segsynth.engine.commands import compare_outputs
    from segsynth.engine.torch_runner import TorchCudaRunner

    make_spade_checkpoint(tmp_path / "g", label_nc=150, contain_dontcare_label=True, no_instance=True, ngf=16,
                          crop_size=256, norm_G="spectralspadeinstance3x3")
    out = tmp_path / "g.onnx"
    assert run_cli("export", "spade", "--checkpoint", tmp_path / "g", "--out", out, "--batch", "dynamic").returncode == 0
    rng = np.random.default_rng(0)
    label = rng.integers(0, 150, (4, 1, 16, 16)).repeat(16, 2).repeat(16, 3).astype(np.int64)
    with TorchCudaRunner(out, fp16=False) as fp32, TorchCudaRunner(out) as fp16:
        report = compare_outputs(fp32.infer({"label": label}), fp16.infer({"label": label}))
    print(f"\nSPADE on CUDA: FP16 vs FP32 {report['image']}")
    assert report["image"]["psnr_db"] >= 35


def test_pinned_buffers_round_trip_through_the_gpu():
    from segsynth.engine import cuda

    src, dst = cuda.PinnedBuffer((4, 513, 513, 3), np.uint8), cuda.PinnedBuffer((4, 513, 513, 3), np.uint8)
    device, stream = cuda.DeviceBuffer(src.nbytes), cuda.Stream()
    try:
        src.array[:] = np.random.default_rng(0).integers(0, 255, src.array.shape, dtype=np.uint8)
        stream.copy_to_device(device, src, src.nbytes)
        stream.copy_to_host(dst, device, src.nbytes)
        stream.synchronize()
        assert np.array_equal(src.array, dst.array)
    finally:
        for obj in (src, dst, device, stream):
            obj.close()


def test_pinned_pool_knows_its_memory_and_frees_it():
    from segsynth.engine import cuda

    closed = []
    pool = cuda.PinnedPool(on_close=closed.append)
    a = pool((2, 8, 8, 3), np.uint8)
    assert pool.address(a) == a.__array_interface__["data"][0]
    assert pool.address(a[1:]) == pool.address(a) + a[0].nbytes  # a batch view inside it
    assert pool.address(a[:, ::2]) is None and pool.address(np.empty_like(a)) is None  # strided; pageable
    pool.close()
    assert closed == [pool] and pool.buffers == []


def test_tensorrt_uploads_straight_from_its_pinned_pool(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here")
    from segsynth.engine.tensorrt import TensorRTRunner

    with TensorRTRunner(bundled_model("voc"), batch=2, cache_dir=tmp_path) as runner:
        pool = runner.pinned_allocator()
        x = pool((2, 3, 513, 513), np.float32)
        x[:] = _normalised(_photos(2))
        assert runner._pinned_address(x) is not None and runner._pinned_address(x.copy()) is None
        assert np.array_equal(runner.infer({"image": x})["labels"], runner.infer({"image": x.copy()})["labels"])
        pool.close()
        assert runner._pools == []


def test_a_gpu_session_runs_the_fused_chain_and_agrees_with_the_cpu(tmp_path):
    """The fused graph on a GPU backend: uint8 frames in, labels and pictures out of one graph;
    the result agrees with the CPU's."""
    from segsynth.stream import ModelSet
    from segsynth.stream.infer.synth import Synthesize

    frames, metas = _photos(2), [{"size": (640, 360)}] * 2
    results = {}
    for backend in ("onnxruntime", "torch-cuda"):
        with ModelSet.load("ade20k+voc", "default", backend=backend, cache_dir=tmp_path) as m:
            infer = Synthesize(m.segmenter, m.generator, m.remap("person=animal"), None, "off", "letterbox",
                               m.generator.size, chains={"all": m.fused("all")})
            assert infer.asynchronous == (backend == "torch-cuda")
            results[backend] = infer.finish(infer.submit(frames, metas))
    cpu, gpu = results["onnxruntime"], results["torch-cuda"]
    agreement = float(np.mean([(a.labels == b.labels).mean() for a, b in zip(cpu, gpu)]))
    mse = np.mean([((a.synth.astype(float) - b.synth) ** 2).mean() for a, b in zip(cpu, gpu)])
    psnr = 10 * np.log10(255 ** 2 / max(mse, 1e-9))
    print(f"\nfused chain on torch-cuda (fp16) vs the CPU one by one: labels {agreement:.2%}, pictures {psnr:.1f} dB")
    assert agreement >= 0.98 and psnr >= 20


def _timeline(runner, n=8):
    """Device spans (ms, CUDA events of the runner) of ``n`` VOC batches of 8 from a pinned
    buffer, first one at a time, then double-buffered (batch k+1 submitted before batch k is
    collected). Batches of 8 keep the device, not the host, the bottleneck."""
    x = runner.pinned_allocator()((8, 3, 513, 513), np.float32)
    x[:] = np.concatenate([_normalised(_photos())] * 2)
    feed = {"image": x}
    for _ in range(2):  # warm-up: first use of each of the runner's two streams
        runner.infer(feed)
    single = []
    for _ in range(n):
        handle = runner.submit(feed)
        runner.wait(handle)
        single.append(runner.device_span(handle))
    handles = [runner.submit(feed)]
    for _ in range(n - 1):
        handles.append(runner.submit(feed))
        runner.wait(handles[-2])
    runner.wait(handles[-1])
    return single, [runner.device_span(h) for h in handles]


def _assert_double_buffering_overlaps(name, single, buffered):
    assert None not in single and None not in buffered, "a GPU runner has a device clock"
    one_at_a_time = sum(end - start for start, end in single)
    together = buffered[-1][1] - buffered[0][0]
    overlapping = sum(nxt[0] < cur[1] for cur, nxt in zip(buffered, buffered[1:]))
    print(f"\n{name}: {len(single)} batches of 8 one at a time {one_at_a_time:.1f} ms (sum of spans), "
          f"double-buffered {together:.1f} ms; {overlapping}/{len(buffered) - 1} batches started on the device "
          "before the previous one ended")
    assert overlapping == len(buffered) - 1
    assert together < one_at_a_time


def test_torch_cuda_runner_double_buffering_overlaps_batches():
    from segsynth.engine.torch_runner import TorchCudaRunner

    with TorchCudaRunner(bundled_model("voc")) as runner:
        single, buffered = _timeline(runner)
    _assert_double_buffering_overlaps("torch-cuda", single, buffered)


def test_tensorrt_runner_double_buffering_overlaps_batches(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here")
    from segsynth.engine.tensorrt import TensorRTRunner

    with TensorRTRunner(bundled_model("voc"), batch=(1, 8, 8), cache_dir=tmp_path) as runner:
        single, buffered = _timeline(runner)
    _assert_double_buffering_overlaps("tensorrt", single, buffered)


def test_torch_cuda_runner_double_buffers():
    from segsynth.engine.torch_runner import TorchCudaRunner

    x = _normalised(_photos(2))
    with TorchCudaRunner(bundled_model("voc")) as runner:
        first = runner.submit({"image": x})
        second = runner.submit({"image": x[::-1].copy()})
        a, b = runner.wait(first)["labels"], runner.wait(second)["labels"]
    assert np.array_equal(a, b[::-1])


def test_tensorrt_fp16_engine_is_built_cached_and_agrees(tmp_path, monkeypatch):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here")
    from segsynth.engine import tensorrt
    from segsynth.engine.onnxruntime import OnnxRuntimeRunner
    from segsynth.engine.tensorrt import TensorRTRunner

    builds, real_build = [], tensorrt.build_engine

    def counted_build(*args, **kwargs):
        builds.append(args)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(tensorrt, "build_engine", counted_build)
    x = _normalised(_photos(2))
    with OnnxRuntimeRunner(bundled_model("voc")) as ref:
        want = ref.infer({"image": x})["labels"]
    with TensorRTRunner(bundled_model("voc"), batch=(1, 2, 4), cache_dir=tmp_path) as trt:
        handles = [trt.submit({"image": x}), trt.submit({"image": x[:1]})]
        got, one = trt.wait(handles[0])["labels"], trt.wait(handles[1])["labels"]
        path = trt.engine_path
    assert len(builds) == 1 and path.is_file()
    assert (got == want).mean() > 0.99 and np.array_equal(one, got[:1])
    stamp, engine_bytes = path.stat().st_mtime_ns, path.read_bytes()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the second activation rebuilt the engine instead of loading it from the cache")

    monkeypatch.setattr(tensorrt, "build_engine", no_rebuild)
    with TensorRTRunner(bundled_model("voc"), batch=(1, 2, 4), cache_dir=tmp_path) as again:
        assert again.engine_path == path
        assert (again.infer({"image": x})["labels"] == got).mean() > 0.999
    assert path.stat().st_mtime_ns == stamp and path.read_bytes() == engine_bytes
    proc = run_cli("engine", "info", path)
    assert proc.returncode == 0 and "fp16" in proc.stdout


def test_run_on_the_gpu_backend(tmp_path):
    from fractions import Fraction

    from conftest import decode_video, write_clip

    clip = write_clip(tmp_path / "c.mp4", [np.full((96, 160, 3), 40 * i, np.uint8) for i in range(6)],
                      [Fraction(i, 25) for i in range(6)])
    proc = run_cli("run", clip, tmp_path / "o.mp4", "--view", "labels", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "backend: onnxruntime " not in proc.stderr  # a GPU backend was chosen
    assert decode_video(tmp_path / "o.mp4")[0] == decode_video(clip)[0]


def test_torch_cuda_submit_never_waits_for_the_gpu():
    """With torch's sync debug mode set to error, any call that makes the host wait for the
    device raises: submit() of segsynth's torch-cuda runner must not (its shape arithmetic
    stays on the host); only wait() synchronises."""
    import torch

    from segsynth.engine.torch_runner import TorchCudaRunner

    x = _normalised(_photos(2))
    with TorchCudaRunner(bundled_model("voc")) as runner:
        runner.wait(runner.submit({"image": x}))  # warm-up: first-use allocations
        pinned = torch.from_numpy(x).pin_memory().numpy()
        torch.cuda.set_sync_debug_mode("error")
        try:
            handle = runner.submit({"image": pinned})
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert runner.wait(handle)["labels"].shape == (2, 513, 513)
