"""GPU checks (marker ``gpu``): run on a machine with a CUDA GPU, e.g. ``pytest -m gpu``.
Skipped elsewhere with the reason. TensorRT tests also skip where ``tensorrt`` is absent."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_spade_checkpoint, run_cli
from segsynth.stream.segmenter import bundled_model

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


def test_double_buffering_overlaps_copies_with_compute():
    """A CUDA-event timeline of two streams, each copying in, computing and copying out:
    the fraction of copy time that runs while the other stream computes is printed."""
    import torch

    n, size = 6, 4096
    host_in = [torch.randn(64, 1024, 1024).pin_memory() for _ in range(2)]
    host_out = [torch.empty(64, 1024, 1024).pin_memory() for _ in range(2)]
    weight = torch.randn(size, size, device="cuda")
    streams = [torch.cuda.Stream() for _ in range(2)]
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    copies, computes = [], []
    for k in range(n):
        s = streams[k % 2]
        with torch.cuda.stream(s):
            e = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            e[0].record()
            dev = host_in[k % 2].to("cuda", non_blocking=True)
            e[1].record()
            acc = weight
            for _ in range(20):
                acc = acc @ weight
            e[2].record()
            host_out[k % 2].copy_(dev, non_blocking=True)
            e[3].record()
            copies.append((e[0], e[1]))
            copies.append((e[2], e[3]))
            computes.append((e[1], e[2]))
    torch.cuda.synchronize()
    span = lambda pair: (start.elapsed_time(pair[0]), start.elapsed_time(pair[1]))  # noqa: E731
    copy_iv, compute_iv = [span(p) for p in copies], [span(p) for p in computes]
    overlap = sum(max(0.0, min(c1, k1) - max(c0, k0)) for c0, c1 in copy_iv for k0, k1 in compute_iv)
    total = sum(c1 - c0 for c0, c1 in copy_iv)
    fraction = overlap / total
    print(f"\ncopy time overlapped by compute: {fraction:.0%} of {total:.1f} ms")
    assert fraction > 0.3


def test_torch_cuda_runner_double_buffers():
    from segsynth.engine.torch_runner import TorchCudaRunner

    x = _normalised(_photos(2))
    with TorchCudaRunner(bundled_model("voc")) as runner:
        first = runner.submit({"image": x})
        second = runner.submit({"image": x[::-1].copy()})
        a, b = runner.wait(first)["labels"], runner.wait(second)["labels"]
    assert np.array_equal(a, b[::-1])


def test_tensorrt_fp16_engine_is_built_cached_and_agrees(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here")
    from segsynth.engine.onnxruntime import OnnxRuntimeRunner
    from segsynth.engine.tensorrt import TensorRTRunner

    x = _normalised(_photos(2))
    with OnnxRuntimeRunner(bundled_model("voc")) as ref:
        want = ref.infer({"image": x})["labels"]
    with TensorRTRunner(bundled_model("voc"), batch=(1, 2, 4), cache_dir=tmp_path) as trt:
        handles = [trt.submit({"image": x}), trt.submit({"image": x[:1]})]
        got, one = trt.wait(handles[0])["labels"], trt.wait(handles[1])["labels"]
        path = trt.engine_path
    assert path.is_file() and (got == want).mean() > 0.99 and np.array_equal(one, got[:1])
    with TensorRTRunner(bundled_model("voc"), batch=(1, 2, 4), cache_dir=tmp_path) as again:
        assert again.engine_path == path  # loaded from the cache, not rebuilt
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
