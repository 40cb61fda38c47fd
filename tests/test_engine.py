"""Engine runtime on the CPU: the Runner interface, the engine cache, the ONNX Runtime runner
against the export stage's PyTorch forward, the torch interpreter against ONNX Runtime,
backend selection and CUDA error messages."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from conftest import make_deeplab_checkpoint, make_spade_checkpoint, run_cli
from segsynth.engine.cache import EngineCache, EngineKey
from segsynth.engine.onnxruntime import OnnxRuntimeRunner
from segsynth.engine.select import make_runner, resolve_backend
from segsynth.core.errors import BackendError
from segsynth.stream.infer.segmenter import bundled_model

SPADE = dict(label_nc=6, contain_dontcare_label=True, no_instance=False, ngf=8, crop_size=64,
             norm_G="spectralspadesyncbatch3x3")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    make_spade_checkpoint(d / "spade", **SPADE)
    make_spade_checkpoint(d / "vae", label_nc=5, no_instance=True, ngf=4, crop_size=256, use_vae=True, z_dim=8,
                          norm_G="spectralspadeinstance3x3")
    make_deeplab_checkpoint(d / "tv.pth", "tv-mobilenet_v3_large", 21)
    for args in (["spade", "--checkpoint", d / "spade", "--out", d / "g.onnx", "--batch", "dynamic"],
                 ["encoder", "--checkpoint", d / "vae", "--out", d / "e.onnx", "--batch", "dynamic"],
                 ["spade", "--checkpoint", d / "vae", "--out", d / "v.onnx"],
                 ["deeplab", "--checkpoint", d / "tv.pth", "--out", d / "d.onnx", "--size", "129x97"]):
        proc = run_cli("export", *args)
        assert proc.returncode == 0, proc.stderr
    return d


def _feed(runner, batch=2):
    from segsynth.engine.commands import _inputs

    return _inputs(runner, batch, None)


def test_runner_interface(exported):
    runner = OnnxRuntimeRunner(exported / "g.onnx")
    with pytest.raises(BackendError, match="before activate"):
        runner.infer({})
    with runner as r:
        assert r.is_active and set(r.inputs) == {"label", "instance"} and list(r.outputs) == ["image"]
        assert r.inputs["label"].shape == ("N", 1, 64, 64) and r.inputs["label"].dtype == np.int64
        assert r.metadata["segsynth.role"] == "generator"
        with pytest.raises(BackendError, match="missing inputs"):
            r.infer({"label": np.zeros((1, 1, 64, 64), np.int64)})
        feed = _feed(r)
        assert np.array_equal(r.wait(r.submit(feed))["image"], r.infer(feed)["image"])
    assert not runner.is_active


def test_onnxruntime_runner_matches_the_pytorch_forward(exported):
    from segsynth.export.onnx_export import GeneratorGraph
    from segsynth.export.spade import load_spade

    graph = GeneratorGraph(load_spade(exported / "spade"))
    for io_binding in (False, True):
        with OnnxRuntimeRunner(exported / "g.onnx", io_binding=io_binding, threads=2) as runner:
            feed = _feed(runner, batch=3)
            got = runner.infer(feed)["image"]
        with torch.no_grad():
            want = graph(torch.from_numpy(feed["label"]), torch.from_numpy(feed["instance"])).numpy()
        assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize("model", ["ade20k", "voc", "g.onnx", "e.onnx", "v.onnx", "d.onnx"])
def test_torch_interpreter_matches_onnxruntime(model, exported):
    from segsynth.engine.torch_runner import TorchCudaRunner

    path = bundled_model(model) if model in ("ade20k", "voc") else exported / model
    with OnnxRuntimeRunner(path) as ort_runner, TorchCudaRunner(path, device="cpu") as torch_runner:
        assert torch_runner.inputs == ort_runner.inputs and torch_runner.outputs.keys() == ort_runner.outputs.keys()
        feed = _feed(ort_runner, batch=1)
        a, b = ort_runner.infer(feed), torch_runner.wait(torch_runner.submit(feed))
    for name in a:
        if a[name].dtype == np.uint8:  # segmenter labels: argmax of nearly equal float logits
            assert (a[name] == b[name]).mean() > 0.999, name
        else:
            err = np.abs(a[name] - b[name]).max() / (np.abs(a[name]).max() + 1e-9)
            assert err < 1e-4, (name, err)


@pytest.mark.parametrize("model", ["g.onnx", "v.onnx", "e.onnx"])
def test_torch_interpreter_in_fp16_runs_every_generator_close_to_fp32(model, exported):
    """FP16 as the torch-cuda backend runs it, on the CPU: float16 throughout, Casts to float
    included (they brought float32 back: 'Input type (float) and bias type (c10::Half)')."""
    from segsynth.engine.onnx_torch import OnnxTorchModule

    with OnnxRuntimeRunner(exported / model) as ort_runner:
        feed = _feed(ort_runner, batch=1)
        want = ort_runner.infer(feed)
    module = OnnxTorchModule(exported / model).to("cpu", half=True)
    with torch.inference_mode():
        got = module(**{k: torch.from_numpy(v) for k, v in feed.items()})
    for name, value in want.items():
        assert got[name].dtype == torch.float16, name
        out = got[name].float().numpy()
        assert np.isfinite(out).all()
        err = np.abs(out - value).max() / (np.abs(value).max() + 1e-9)
        assert err < 0.05, (name, err)  # float16 carries ~3 significant digits


def test_tensorrt_dynamic_dims_are_named_as_the_runner_contract_says():
    from segsynth.engine.runner import TensorMeta
    from segsynth.engine.tensorrt import public_shape

    graph = TensorMeta("label", np.dtype(np.int64), ("batch", 1, 64, 64))
    assert public_shape((-1, 1, 64, 64), graph) == ("batch", 1, 64, 64)
    assert public_shape((-1, 3, 8, 8), None) == ("N", 3, 8, 8)
    assert public_shape((2, 3, 8, 8), graph) == (2, 3, 8, 8)


def test_timing_caches_are_kept_per_gpu_and_tensorrt_version():
    from segsynth.engine.tensorrt import timing_cache_name

    h100 = EngineKey("a" * 64, "NVIDIA H100 80GB HBM3", "9.0", "10.7.0", "fp16", "image:1x3x513x513")
    names = {timing_cache_name(h100),
             timing_cache_name(EngineKey("a" * 64, "NVIDIA H200", "9.0", "10.7.0", "fp16", "image:1x3x513x513")),
             timing_cache_name(EngineKey("a" * 64, "NVIDIA H100 80GB HBM3", "9.0", "10.8.0", "fp16", "x")),
             timing_cache_name(EngineKey("a" * 64, "NVIDIA L4", "8.9", "10.7.0", "fp16", "x"))}
    assert len(names) == 4 and all("/" not in n and " " not in n for n in names)
    other_graph = EngineKey("b" * 64, "NVIDIA H100 80GB HBM3", "9.0", "10.7.0", "fp32", "label:1x1x256x512")
    assert timing_cache_name(other_graph) == timing_cache_name(h100)  # timings are per GPU, shared by graphs


def test_engine_keys_and_stale_entries(tmp_path, caplog):
    key = EngineKey("abc", "NVIDIA H100 80GB HBM3", "9.0", "10.7.0", "fp16", "image:1x3x513x513")
    variants = [key.__class__(**{**key.__dict__, field: value}) for field, value in
                (("gpu", "NVIDIA A100"), ("compute_capability", "8.0"), ("tensorrt", "10.8.0"),
                 ("precision", "fp32"), ("profile", "image:8x3x513x513"), ("graph_sha256", "abd"))]
    assert len({key.digest, *(v.digest for v in variants)}) == 7  # every field changes the key
    cache = EngineCache(tmp_path)
    assert cache.load(key) is None
    path = cache.store(key, b"engine bytes")
    assert cache.load(key) == b"engine bytes" and path.with_suffix(".json").is_file()
    assert cache.entries() == [(key, path)]
    with caplog.at_level(logging.INFO, logger="segsynth"):
        assert cache.load(variants[0]) is None  # same graph, another GPU: rebuild, and say why
    assert "built for NVIDIA H100" in caplog.text and "building one for NVIDIA A100" in caplog.text


def test_backend_selection_here_and_clear_errors(exported):
    from segsynth.core.grammar import GPU_BACKENDS

    with pytest.raises(BackendError, match="unknown backend"):
        resolve_backend("warp")
    if torch.cuda.is_available():
        assert resolve_backend("auto") in GPU_BACKENDS  # a GPU is here: auto must use it
    else:
        assert resolve_backend("auto") == "onnxruntime"
        with pytest.raises(BackendError, match="no CUDA GPU"):
            make_runner(exported / "g.onnx", "torch-cuda").activate()
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(BackendError, match="TensorRT is not installed"):
            make_runner(exported / "g.onnx", "tensorrt").activate()


def test_cuda_errors_are_translated():
    from segsynth.engine import cuda

    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    if cuda.gpu_available():
        pytest.skip("a GPU is present: the no-GPU message cannot be shown")
    with pytest.raises(BackendError) as err:
        cuda.device(0)
    message = str(err.value)
    assert "CUDA error" in message or "no CUDA GPU" in message
    assert ("driver" in message or "GPU" in message) and "\n" not in message


def test_engine_commands(exported, tmp_path):
    proc = run_cli("engine", "info", exported / "d.onnx")
    assert proc.returncode == 0 and "input  image" in proc.stdout and "segsynth.family = tv-mobilenet_v3_large" in proc.stdout
    proc = run_cli("engine", "compare", exported / "d.onnx", exported / "d.onnx", "--backend-b", "onnxruntime")
    assert proc.returncode == 0 and "logits: max_abs 0" in proc.stdout and "argmax_agreement 1" in proc.stdout
    np.savez(tmp_path / "in.npz", label=np.zeros((1, 1, 64, 64), np.int64), instance=np.zeros((1, 1, 64, 64), np.int64))
    proc = run_cli("engine", "compare", exported / "g.onnx", exported / "g.onnx", "--backend-b", "onnxruntime",
                   "--inputs", tmp_path / "in.npz")
    assert proc.returncode == 0 and "image: max_abs 0" in proc.stdout and "psnr_db inf" in proc.stdout
    proc = run_cli("engine", "compare", exported / "g.onnx", exported / "d.onnx", "--backend-b", "onnxruntime")
    assert proc.returncode != 0 and "take different inputs" in proc.stderr
    proc = run_cli("engine", "info", tmp_path / "nope.engine")
    assert proc.returncode != 0 and "no such file" in proc.stderr


def test_auto_falls_back_to_the_next_backend_that_can_serve_the_model(exported, caplog):
    """Here (no GPU, no TensorRT) auto is onnxruntime, silently; a list of backends is tried
    in order, each one that cannot run the model said in one warning; a backend named alone
    fails with its own error."""
    import importlib.util

    from segsynth.engine.select import open_runner

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: torch-cuda would serve, so no fallback can be shown")
    with caplog.at_level(logging.WARNING, logger="segsynth"):
        runner = open_runner(exported / "d.onnx", "auto")
    assert runner.is_active and runner.name == "onnxruntime" and caplog.text == ""
    assert runner.infer(_feed(runner, batch=1))["logits"].shape[0] == 1
    runner.deactivate()
    with caplog.at_level(logging.WARNING, logger="segsynth"):
        runner = open_runner(exported / "g.onnx", ["torch-cuda", "onnxruntime"])
    assert runner.is_active and runner.name == "onnxruntime"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "torch-cuda cannot run g.onnx" in warnings[0] and "using onnxruntime" in warnings[0]
    runner.deactivate()
    with pytest.raises(BackendError, match="no CUDA GPU"):
        open_runner(exported / "g.onnx", "torch-cuda")
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(BackendError, match="TensorRT is not installed"):
            open_runner(exported / "g.onnx", "tensorrt")


def test_tensorrt_versions_10_and_11_are_accepted_and_others_refused(monkeypatch):
    import sys
    import types

    from segsynth.engine.tensorrt import import_tensorrt, strongly_typed

    for version in ("10.7.0", "11.2.1"):
        monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
        assert import_tensorrt().__version__ == version
    for version in ("9.3.0", "12.0.0"):
        monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
        with pytest.raises(BackendError, match=f"TensorRT {version} is installed; segsynth supports TensorRT 10.x and 11.x"):
            import_tensorrt()
    # TensorRT 11's API has no BuilderFlag.FP16: its networks are built strongly typed
    assert not strongly_typed(types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(FP16=1, TF32=2)))
    assert strongly_typed(types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(TF32=2)))


def test_the_tensorrt_profile_follows_the_batch_the_caller_runs(exported, tmp_path):
    from segsynth.engine.tensorrt import TensorRTRunner, batch_profile, batch_range

    assert batch_range(4) == (1, 4, 4) and batch_range((2, 4, 16)) == (2, 4, 16) and batch_range(None) == (1, 1, 8)
    for bad in (0, (4, 2, 8), "many"):
        with pytest.raises(BackendError, match="batch"):
            batch_range(bad)
    shapes = batch_profile((exported / "g.onnx").read_bytes(), batch_range(4))
    assert shapes["label"] == ((1, 1, 64, 64), (4, 1, 64, 64), (4, 1, 64, 64))
    assert make_runner(exported / "g.onnx", "tensorrt", batch=4, cache_dir=tmp_path).max_batch == 4
    assert TensorRTRunner(exported / "g.onnx", batch=(1, 2, 16)).max_batch == 16
    with OnnxRuntimeRunner(exported / "g.onnx") as runner:
        assert runner.max_batch is None  # onnxruntime takes any batch


def test_a_cuda_python_newer_than_the_driver_is_named_with_the_pin_that_fits():
    from segsynth.engine.cuda import driver_mismatch, gpu_problem

    why = driver_mismatch(12040, "13.4.4")  # a CUDA 12.4 driver, cuda-python 13
    assert "CUDA 12.4" in why and "cuda-python==12.*" in why
    assert driver_mismatch(13000, "13.0.1") is None and driver_mismatch(12080, "12.9.0") is None
    assert driver_mismatch(0, "13.0.0") is None  # no driver at all: not a version problem
    assert gpu_problem() == "no NVIDIA driver is installed here"  # these machines: cuda-python, no driver
