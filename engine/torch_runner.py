"""The torch-cuda backend: segsynth's ONNX graphs (through the torch interpreter in
``onnx_torch``) or the export stage's PyTorch modules, in FP16 on a CUDA GPU.

Double buffering: ``submit()`` copies a batch from pinned host memory to the GPU and
launches it on one of two CUDA streams, then returns at once; ``wait()`` returns that
batch's outputs. With two batches in flight, the host-to-device copy of batch k+1 and the
device-to-host copy of batch k-1 overlap the compute of batch k. The same class runs on
the CPU (device="cpu", fp32), which is how its interface is tested where there is no GPU.

Threading: submit() is serialised by the runner's lock; handles are independent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segsynth.core.errors import BackendError
from segsynth.engine.onnx_torch import OnnxTorchModule
from segsynth.engine.onnxruntime import describe_onnx
from segsynth.engine.runner import Runner


class TorchCudaRunner(Runner):
    name = "torch-cuda"

    def __init__(self, model: str | Path, *, device: str = "cuda", fp16: bool = True, compile: bool = False) -> None:
        super().__init__()
        self.model_path, self.device_name, self.fp16, self.compile = Path(model), device, fp16, compile
        self.label = self.model_path.name
        self._slot = 0

    def _activate_impl(self) -> None:
        try:
            # imported here: torch is optional: importing segsynth.engine must not import it
            import torch
        except ImportError as exc:
            raise BackendError("the torch-cuda backend needs torch (pip install 'segsynth[export]')") from exc

        if self.device_name.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError("torch-cuda: torch sees no CUDA GPU here (a CPU-only torch build, or no driver)")
        self.torch = torch
        self.device = torch.device(self.device_name)
        half = self.fp16 and self.device.type == "cuda"
        self.half = half
        self.module = OnnxTorchModule(self.model_path).to(self.device, half=half)
        if self.device.type == "cuda":  # the copies and .half() ran on the default stream; inference uses side streams
            torch.cuda.synchronize(self.device)
        self.inputs, self.outputs, self.metadata = describe_onnx(self.module.proto)
        self.forward = torch.compile(self.module.__call__, mode="reduce-overhead") if self.compile else self.module.__call__
        self.streams = [torch.cuda.Stream(self.device) for _ in range(2)] if self.device.type == "cuda" else None
        if self.streams is not None:  # the zero of device_span's clock
            self.epoch = torch.cuda.Event(enable_timing=True)
            self.epoch.record(self.streams[0])

    def _to_device(self, feed: dict[str, np.ndarray]):
        torch = self.torch
        tensors = {}
        for name, array in feed.items():
            t = torch.from_numpy(np.ascontiguousarray(array))
            if self.device.type == "cuda":
                if not t.is_pinned():  # buffers from pinned_allocator() upload without a staging copy
                    t = t.pin_memory()
                t = t.to(self.device, non_blocking=True)
            if self.half and t.dtype == torch.float32:
                t = t.half()
            tensors[name] = t
        return tensors

    def _run(self, feed):
        torch = self.torch
        with torch.inference_mode():
            outs = self.forward(**self._to_device(feed))
            host = {}
            for name, t in outs.items():
                if t.dtype == torch.float16:
                    t = t.float()
                host[name] = t.to("cpu", non_blocking=self.device.type == "cuda")
        return host

    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.wait(self.submit(feed))

    def submit(self, feed: dict[str, np.ndarray]):
        """Start a batch on the next of two CUDA streams; returns a handle for ``wait``."""
        with self._guard:
            if self.streams is None:
                return self._run(feed), None
            stream = self.streams[self._slot]
            self._slot ^= 1
            torch = self.torch
            started, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                started.record(stream)
                host = self._run(feed)
                done.record(stream)
            return host, (started, done)

    def wait(self, handle) -> dict[str, np.ndarray]:
        host, events = handle
        if events is not None:
            events[1].synchronize()
        return {name: t.numpy() for name, t in host.items()}

    def device_span(self, handle) -> tuple[float, float] | None:
        events = handle[1]
        return None if events is None else tuple(self.epoch.elapsed_time(e) for e in events)

    def pinned_allocator(self):
        """Page-locked host buffers for the frame ring (fast, asynchronous uploads)."""
        torch = self.torch

        def allocate(shape, dtype):
            t = torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), pin_memory=self.device.type == "cuda")
            return t.numpy()

        return allocate

    def _deactivate_impl(self) -> None:
        if self.streams is not None:
            for s in self.streams:
                s.synchronize()
        self.module = self.forward = self.streams = None
