"""The ONNX Runtime runner's device path, checked on the CPU: a CUDA provider that onnxruntime
lists but cannot use is detected from the session's own providers and said, and the reused
per-thread IO bindings give the same outputs as plain runs from several threads at once."""

from __future__ import annotations

import logging
import threading
import warnings

import numpy as np
import onnxruntime

from segsynth.engine.onnxruntime import OnnxRuntimeRunner
from segsynth.stream.infer.segmenter import bundled_model

CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")


def _frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 513, 513)).astype(np.float32)


def test_a_listed_cuda_provider_that_does_not_load_is_said_and_runs_on_the_cpu(monkeypatch, caplog):
    # onnxruntime-gpu lists CUDA when its package is installed, whether or not its libraries load;
    # this CPU build then builds a CPU session, which is that case exactly.
    listed = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *listed])
    model = bundled_model("voc")
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, "segsynth"):
        warnings.simplefilter("ignore", UserWarning)  # onnxruntime's own note about the missing provider
        with OnnxRuntimeRunner(model, providers=CUDA, io_binding=True, threads=1) as runner:
            feed = {"image": _frames(1, 0)}
            got = runner.infer(feed)["labels"]
            assert (runner.device, runner.name) == ("cpu", "onnxruntime")
    assert "could not use CUDAExecutionProvider" in caplog.text and "running on the CPU" in caplog.text
    with OnnxRuntimeRunner(model, threads=1) as plain:
        assert np.array_equal(got, plain.infer(feed)["labels"])


def test_no_fallback_is_said_for_the_cpu_provider(caplog):
    with caplog.at_level(logging.WARNING, "segsynth"), OnnxRuntimeRunner(bundled_model("voc"), threads=1) as r:
        assert r.device == "cpu"
    assert "running on the CPU" not in caplog.text


def test_io_bindings_are_per_thread_and_match_plain_runs():
    model = bundled_model("voc")
    feeds = [{"image": _frames(1, seed)} for seed in range(3)]
    with OnnxRuntimeRunner(model, threads=1) as plain:
        want = [plain.infer(f)["labels"] for f in feeds]
    got = [None] * len(feeds)
    with OnnxRuntimeRunner(model, io_binding=True, threads=1) as bound:
        def work(k: int) -> None:
            for _ in range(2):  # the second call reuses this thread's binding
                got[k] = bound.infer(feeds[k])["labels"]

        threads = [threading.Thread(target=work, args=(k,)) for k in range(len(feeds))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for g, w in zip(got, want):
        assert np.array_equal(g, w)
