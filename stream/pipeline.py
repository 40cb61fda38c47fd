"""The threaded decode -> infer -> encode pipeline.

    Source ─▶ DecodeStage ─▶ FrameRing (preallocated, bounded) ─▶ InferStage (batches)
          ─▶ result queue (bounded) ─▶ EncodeStage ─▶ Sink            audio: Source -> Sink

Each stage runs on its own thread and owns its codec/scaler contexts; PyAV releases the GIL
while decoding, scaling and encoding, and onnxruntime while inferring, so the stages overlap.

Shutdown is a state machine: ``running`` -> ``draining`` (SIGINT/SIGTERM or the end of the
input: the decoder stops reading, everything already read is processed, the encoder is
flushed and the output closed) -> ``closed``. A second signal, or an error in any stage,
aborts: every stage stops at its next check and the output is closed as it is.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from segsynth.errors import Interrupted

from .ring import FrameRing

log = logging.getLogger("segsynth")
_EOS = object()


class StageTimer:
    """Per-frame durations of one stage (milliseconds), for mean/p95 in the summary."""

    def __init__(self, name: str) -> None:
        self.name, self.samples = name, []

    def add(self, seconds: float, frames: int = 1) -> None:
        self.samples.extend([seconds * 1000 / frames] * frames)

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {"mean_ms": 0.0, "p95_ms": 0.0}
        data = np.asarray(self.samples)
        return {"mean_ms": float(data.mean()), "p95_ms": float(np.percentile(data, 95))}


@dataclass
class PipelineStats:
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    seconds: float = 0.0
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)  # decode start -> muxed, per frame
    stopped_by: str | None = None

    @property
    def fps(self) -> float:
        return self.frames_out / self.seconds if self.seconds else 0.0


class Pipeline:
    """Runs ``source`` -> ``infer`` -> ``sink`` on three threads.

    ``source.frames()`` yields ``(model_rgb, meta)`` pairs (and forwards audio to the sink
    itself); ``infer(batch, metas)`` returns one result per frame; ``sink.write(result, meta)``
    encodes one frame and ``sink.close()`` flushes. ``progress.update()`` is called per frame
    written (from the encode thread)."""

    def __init__(self, source, infer: Callable, sink, *, model_shape: tuple[int, int, int], batch: int = 1,
                 policy: str = "lossless", ring_slots: int = 8, allocator=None, progress=None) -> None:
        kwargs = {"allocator": allocator} if allocator is not None else {}
        self.ring = FrameRing(ring_slots, model_shape, np.uint8, policy, **kwargs)
        self.source, self.infer, self.sink, self.batch = source, infer, sink, batch
        self.results: queue.Queue = queue.Queue(maxsize=max(2, ring_slots // max(1, batch)))
        self.progress = progress
        self.stop_reading, self.abort = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        self.timers = {name: StageTimer(name) for name in ("decode", "infer", "encode")}
        self.latencies: list[float] = []
        self.state = "running"
        self.frames_in = self.frames_out = 0
        self._signal: int | None = None
        self.interrupted: Interrupted | None = None

    # ---- stages ---------------------------------------------------------------------------
    def _decode(self) -> None:
        try:
            frames = iter(self.source.frames(self.stop_reading))
            while not self.abort.is_set():
                start = time.perf_counter()
                try:
                    rgb, meta = next(frames)
                except StopIteration:
                    break
                self.timers["decode"].add(time.perf_counter() - start)  # the work, not the wait below
                slot = self.ring.acquire()
                if slot is None:
                    break
                np.copyto(slot.data, rgb)
                slot.meta = {**meta, "t0": start}
                self.frames_in += 1
                self.ring.publish(slot)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._fail(exc)
        finally:
            self.ring.close()

    def _infer(self) -> None:
        """Batches in order. An asynchronous infer step (``submit``/``finish`` on a GPU backend)
        gets batch k+1 started before batch k is finished, so the device computes while this
        thread post-processes; a synchronous one is finished at once (no added latency)."""
        two_phase = bool(getattr(self.infer, "asynchronous", False))
        pending = None  # (handle, metas, seconds spent so far)

        def complete(handle, metas, spent):
            start = time.perf_counter()
            results = self.infer.finish(handle) if two_phase else handle
            self.timers["infer"].add(spent + time.perf_counter() - start, len(metas))
            for result, meta in zip(results, metas):
                self._put(self.results, (result, meta))

        try:
            while not self.abort.is_set():
                slots = self.ring.take(self.batch)
                if not slots:
                    break
                start = time.perf_counter()
                metas = [s.meta for s in slots]
                frames = np.stack([s.data for s in slots])
                self.ring.release(slots)  # the batch is copied: the decoder may refill the slots
                handle = self.infer.submit(frames, metas) if two_phase else self.infer(frames, metas)
                spent = time.perf_counter() - start
                if pending is not None:
                    complete(*pending)
                pending = (handle, metas, spent)
            if pending is not None and not self.abort.is_set():
                complete(*pending)
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
        finally:
            self._put(self.results, _EOS, force=True)

    def _encode(self) -> None:
        try:
            while True:
                item = self.results.get()
                if item is _EOS or self.abort.is_set():
                    break
                result, meta = item
                start = time.perf_counter()
                self.sink.write(result, meta)
                now = time.perf_counter()
                self.timers["encode"].add(now - start)
                self.latencies.append(now - meta["t0"])
                self.frames_out += 1
                if self.progress is not None:
                    self.progress.update()
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
        finally:
            try:
                self.sink.close()
            except BaseException as exc:  # noqa: BLE001
                self._fail(exc)

    # ---- control ----------------------------------------------------------------------------
    def _put(self, q: queue.Queue, item, force: bool = False) -> None:
        while True:
            if self.abort.is_set() and not force:
                return
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                if force and self.abort.is_set():
                    try:  # make room: the consumer is stopping anyway
                        q.get_nowait()
                    except queue.Empty:
                        pass

    def _fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.abort.set()
        self.stop_reading.set()
        self.ring.close()

    def _on_signal(self, signum, _frame) -> None:
        if self._signal is None:
            self._signal = signum
            self.state = "draining"
            self.stop_reading.set()
            log.warning("%s: stopping - finishing the frames already read (signal again to abort)",
                        signal.Signals(signum).name)
        else:
            self.abort.set()
            self.ring.close()

    def run(self) -> PipelineStats:
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                handlers[signum] = signal.signal(signum, self._on_signal)
        threads = [threading.Thread(target=fn, name=f"segsynth-{name}")
                   for name, fn in (("decode", self._decode), ("infer", self._infer), ("encode", self._encode))]
        start = time.perf_counter()
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.2)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        self.state = "closed"
        if self.errors:
            raise self.errors[0]
        stats = PipelineStats(self.frames_in, self.frames_out, self.ring.dropped, time.perf_counter() - start,
                              {name: t.summary() for name, t in self.timers.items()})
        if self.latencies:
            lat = np.asarray(self.latencies) * 1000
            stats.latency = {"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                             "p99_ms": float(np.percentile(lat, 99))}
        if self._signal is not None:
            stats.stopped_by = signal.Signals(self._signal).name
            self.interrupted = Interrupted(self._signal, f"stopped by {stats.stopped_by} after {self.frames_out} "
                                                         "frames; the output holds them and is closed")
        return stats


def run_sequential(source, infer: Callable, sink, batch: int = 1) -> PipelineStats:
    """The same work in one loop on one thread: decode a batch, infer it, encode it. Used by
    the benchmark to show what the threads buy."""
    stats, start = PipelineStats(), time.perf_counter()
    stop = threading.Event()

    def batches(items: Iterable):
        chunk = []
        for item in items:
            chunk.append(item)
            if len(chunk) == batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    try:
        for chunk in batches(source.frames(stop)):
            stats.frames_in += len(chunk)
            results = infer(np.stack([rgb for rgb, _ in chunk]), [meta for _, meta in chunk])
            for result, (_, meta) in zip(results, chunk):
                sink.write(result, meta)
                stats.frames_out += 1
    finally:
        sink.close()
    stats.seconds = time.perf_counter() - start
    return stats
