"""FrameRing: a bounded ring of preallocated frame buffers between the decode and infer stages.

The decoder ``acquire()``s a free slot, fills it, and ``publish()``es it; the infer stage
``take(n)``s up to n filled slots in order and ``release()``s them when done. Buffers are
allocated once (by ``allocator``: numpy by default), so steady-state streaming allocates
nothing per frame. (The pipeline's page-locked upload buffers are its infer stage's, not the
ring's: a batch is copied out of the ring into one of them.)

Back-pressure policies:
* ``lossless``: ``acquire`` blocks until a slot is free; every frame is kept, in order.
* ``latest``: when no slot is free, the oldest filled (not yet taken) slot is dropped and
  reused, so latency never builds up; drops are counted.

Thread-safety: all methods are safe to call from the decode and infer threads; one
producer and one consumer are assumed.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

POLICIES = ("lossless", "latest")


def numpy_allocator(shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.empty(shape, dtype)


@dataclass
class Slot:
    index: int
    data: np.ndarray  # the preallocated buffer (model-size RGB frame)
    meta: dict = field(default_factory=dict)  # per-frame info set by the producer (pts, display frame, ...)


class FrameRing:
    def __init__(self, slots: int, shape: tuple[int, ...], dtype=np.uint8, policy: str = "lossless",
                 allocator: Callable = numpy_allocator) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        if slots < 2:
            raise ValueError("a ring needs at least 2 slots")
        self.policy = policy
        self.slots = [Slot(i, allocator(shape, dtype)) for i in range(slots)]
        self._free = deque(self.slots)
        self._filled: deque[Slot] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0

    def acquire(self, timeout: float | None = None) -> Slot | None:
        """A free slot to fill, or None once the ring is closed (or on timeout)."""
        with self._cond:
            while not self._free and not self._closed:
                if self.policy == "latest" and self._filled:
                    slot = self._filled.popleft()  # drop the oldest queued frame
                    self.dropped += 1
                    slot.meta = {}
                    return slot
                if not self._cond.wait(timeout):
                    return None
            if self._closed:
                return None
            slot = self._free.popleft()
            slot.meta = {}
            return slot

    def publish(self, slot: Slot) -> None:
        with self._cond:
            self._filled.append(slot)
            self._cond.notify_all()

    def take(self, n: int, timeout: float | None = None) -> list[Slot]:
        """Up to n filled slots in order (waits for at least one); [] when closed and empty."""
        with self._cond:
            while not self._filled and not self._closed:
                if not self._cond.wait(timeout):
                    return []
            taken = []
            while self._filled and len(taken) < n:
                taken.append(self._filled.popleft())
            return taken

    def release(self, slots: list[Slot]) -> None:
        with self._cond:
            for slot in slots:
                slot.meta = {}
                self._free.append(slot)
            self._cond.notify_all()

    def close(self) -> None:
        """No more frames will be published: consumers drain what is filled, producers stop."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._filled)
