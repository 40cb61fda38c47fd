"""The one inference interface every backend implements (after Polygraphy's runners).

A Runner is created cheaply, then ``activate()``d (sessions, engines and device memory are
made there) and ``deactivate()``d (everything released). ``infer(feed)`` maps input names
to numpy arrays and returns a dict of output arrays. Runners are context managers.

Threading: a Runner may be shared by several threads (one ``ModelSet`` serves many stream
sessions). Backends whose sessions are thread-safe (onnxruntime) set ``thread_safe`` and run
calls concurrently; for the others, ``infer``/``submit``/``wait`` are serialised by the
runner's own lock, and a ``submit`` handle belongs to its caller until ``wait``.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import numpy as np

from segsynth.core.errors import BackendError


@dataclass(frozen=True)
class TensorMeta:
    """Name, numpy dtype and shape of a graph input or output; dynamic dims are strings."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]


class Runner:
    """Base class: subclasses implement ``_activate_impl``, ``_infer_impl``, ``_deactivate_impl``
    and fill ``inputs``/``outputs``/``metadata`` in ``_activate_impl``.

    ``max_batch``: the largest batch (first input dimension) one ``infer``/``submit`` takes,
    None for any. Backends built for a shape range set it (TensorRT: its optimisation
    profile's max); callers split larger batches into chunks of ``max_batch``."""

    name = "runner"
    thread_safe = False  # True where the backend itself allows concurrent calls

    def __init__(self) -> None:
        self.is_active = False
        self.max_batch: int | None = None  # the largest batch one call takes; None: any
        self._guard = contextlib.nullcontext() if self.thread_safe else threading.RLock()
        self.inputs: dict[str, TensorMeta] = {}
        self.outputs: dict[str, TensorMeta] = {}
        self.metadata: dict[str, str] = {}  # the graph's custom metadata (segsynth.* keys)

    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate_impl()
            self.is_active = True
        return self

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise BackendError(f"{self.name} runner used before activate()")
        missing = set(self.inputs) - set(feed)
        if missing:
            raise BackendError(f"{self.name}: missing inputs {sorted(missing)}")
        with self._guard:
            return self._infer_impl(feed)

    def submit(self, feed: dict[str, np.ndarray]):
        """Start ``feed`` and return a handle for ``wait``. Backends with their own streams
        (GPU) overlap copies and compute of consecutive batches; the default runs at once."""
        return self.infer(feed)

    def wait(self, handle) -> dict[str, np.ndarray]:
        return handle

    def device_span(self, handle) -> tuple[float, float] | None:
        """(start, end) in milliseconds on this runner's device clock (CUDA events recorded on
        its streams) of a batch already ``wait``ed for; None where the backend has no device
        clock (CPU backends, onnxruntime), where wall time is the measure."""
        return None

    def pinned_allocator(self):
        """An allocator ``(shape, dtype) -> array`` for host buffers this backend uploads fast
        (page-locked on GPUs), or None when plain numpy memory is as good (CPU backends). Each
        call gives a new allocator; one with a ``close()`` frees its buffers there (else they
        are freed with their arrays). An input in such memory may be read asynchronously:
        leave it unchanged until its batch is ``wait``ed for."""
        return None

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        raise NotImplementedError
