"""The threaded decode -> infer -> encode pipeline.

    Source ─▶ decode thread ─▶ FrameRing (preallocated, bounded) ─▶ infer thread (batches, staged
          in two alternating upload buffers) ─▶ result queue (bounded) ─▶ encode thread (render,
          encode) ─▶ Sink      audio: Source -> Sink

(``Pipeline._decode``, ``_infer`` and ``_encode``, one thread each.)

Each stage runs on its own thread and owns its codec/scaler contexts; PyAV releases the GIL
while decoding, scaling and encoding, and onnxruntime while inferring, so the stages overlap.

Shutdown is a state machine: ``running`` -> ``draining`` (``stop(drain=True)`` or the end of
the input: the decoder stops reading, everything already read is processed, the encoder is
flushed and the output closed; at the end of the input the state stays ``running`` until it
is ``closed``) -> ``closed``. ``stop(drain=False)``, or an error in any stage,
aborts: every stage stops at its next check and the output is closed as it is (``failed``
when a stage raised). The encode thread is the last to finish: it closes the sink, waits for
the other two stages and then closes the source, so nothing is closed while still in use.
The pipeline never installs signal handlers; whoever owns the process does (the CLI).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from segsynth.core.metrics import STAGES
from segsynth.stream.ring import FrameRing

log = logging.getLogger("segsynth")
_EOS = object()
AUDIO_EOS = object()


class StageTimer:
    """Per-frame durations of one stage: the mean over every frame (a running sum) and
    percentiles over the last ``window`` frames, so a stream that runs for weeks keeps a
    constant amount of memory. Written by one thread; read from any."""

    def __init__(self, window: int = 4096) -> None:
        self.count, self.total = 0, 0.0
        self.recent: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()  # a deque cannot be copied while another thread appends

    def add(self, seconds: float, frames: int = 1) -> None:
        per_frame = seconds / max(1, frames)
        with self._lock:
            self.count += frames
            self.total += seconds
            self.recent.extend([per_frame] * min(frames, self.recent.maxlen))

    def percentiles(self, *qs: float) -> list[float]:
        with self._lock:
            data = np.array(self.recent, float)
        return [float(np.percentile(data, q)) if data.size else 0.0 for q in qs]

    def summary(self) -> dict[str, float]:
        mean = self.total / self.count if self.count else 0.0
        return {"mean_ms": mean * 1000, "p95_ms": self.percentiles(95)[0] * 1000}


@dataclass
class PipelineStats:
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    seconds: float = 0.0
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)  # decode start -> muxed, per frame (recent frames)

    @property
    def fps(self) -> float:
        return self.frames_out / self.seconds if self.seconds else 0.0


class _Staging:
    """Two batch buffers, used in turn, that the infer stage copies each batch into from the
    ring and hands to the model: allocated once by ``allocator`` (page-locked memory from a
    GPU runner, which uploads straight from it; numpy otherwise) and freed by ``close()``.
    Two suffice: a batch is finished before the batch after next is staged."""

    def __init__(self, allocator, batch: int, frame_shape: tuple[int, ...]) -> None:
        self.allocator = allocator
        allocate = allocator or (lambda shape, dtype: np.empty(shape, dtype))
        self.buffers = [allocate((batch, *frame_shape), np.uint8) for _ in range(2)]
        self.turn = 0

    def fill(self, slots) -> np.ndarray:
        buffer = self.buffers[self.turn][:len(slots)]
        self.turn ^= 1
        for row, slot in zip(buffer, slots):
            np.copyto(row, slot.data)
        return buffer

    def close(self) -> None:
        self.buffers = []
        if hasattr(self.allocator, "close"):
            self.allocator.close()


class Pipeline:
    """Runs ``source`` -> ``infer`` -> ``render`` -> ``sink`` on three threads.

    ``source.frames(stop, audio)`` yields ``(model_rgb, meta)`` pairs and hands audio packets
    to ``audio``; ``infer(batch, metas)`` returns one result per frame; ``render(result, meta)``
    makes the picture (default: the result itself); ``sink.write(picture, meta)`` encodes one
    frame, ``sink.write_audio(item)`` muxes audio and ``sink.close()`` flushes; ``source.close()``
    is called once every stage is done. ``allocator`` (optional; ``Runner.pinned_allocator``)
    makes the infer stage's two batch buffers, and its ``close()``, if any, is called once
    the stage is done with them. ``observer`` (optional) gets ``stage(name, seconds,
    frames)``, ``latency(seconds)`` and ``queues(ring, results, dropped)`` calls from the stage threads,
    ``progress.update()`` is called per frame written (from the encode thread), and
    ``on_done(pipeline)`` once at the very end, before ``join()`` returns."""

    def __init__(self, source, infer: Callable, sink, *, model_shape: tuple[int, int, int], batch: int = 1,
                 policy: str = "lossless", ring_slots: int = 8, allocator=None, render: Callable | None = None,
                 progress=None, observer=None, on_done: Callable | None = None, name: str = "segsynth",
                 max_frames: int | None = None, duration: float | None = None) -> None:
        self.ring = FrameRing(ring_slots, model_shape, np.uint8, policy)
        self.allocator = allocator  # for the two batch buffers the infer stage uploads from
        self.source, self.infer, self.sink, self.batch = source, infer, sink, batch
        self.render = render or (lambda result, meta: result)
        # Two batches of results are enough to keep the encoder busy, and keep what an update
        # (a new remap) cannot reach any more to the batches already inferred.
        self.results: queue.Queue = queue.Queue(maxsize=2 * max(1, batch))
        self.audio: queue.Queue = queue.Queue()
        self.progress, self.observer, self.on_done, self.name = progress, observer, on_done, name
        self.max_frames, self.duration = max_frames, duration  # the end of the input, when reached first
        self.stop_reading, self.abort, self.done = threading.Event(), threading.Event(), threading.Event()
        self.errors: list[tuple[str, BaseException]] = []
        self.timers = {stage: StageTimer() for stage in STAGES}
        self.latency = StageTimer()
        self.state = "created"
        self.cut_short = False  # the encoder stopped before the end of what was read (an abort)
        self.frames_in = self.frames_inferred = self.frames_out = 0
        self._state_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._started = self._ended = 0.0
        self._audio_done = False

    # ---- stages ---------------------------------------------------------------------------
    def _decode(self) -> None:
        frames, first = None, None
        try:
            frames = self.source.frames(self.stop_reading, self.audio.put)
            while not self.abort.is_set():
                if self.max_frames is not None and self.frames_in >= self.max_frames and self.ring.policy == "lossless":
                    break  # every frame read is written: read no more (latest may drop some: the encoder counts)
                start = time.perf_counter()
                try:
                    rgb, meta = next(frames)
                except StopIteration:
                    break
                if self.duration is not None:
                    seconds = float(meta["pts"] * meta["time_base"])
                    first = seconds if first is None else first
                    if seconds - first >= self.duration:
                        break
                # A live source says when the frame's packet arrived (waiting for the network is
                # not decoding); latency counts from there, glass to glass
                arrival = meta.pop("arrival", start)
                spent = time.perf_counter() - max(start, arrival)
                self.timers["decode"].add(spent)  # the work, not the wait below
                self._observe("stage", "decode", spent, 1)
                slot = self.ring.acquire()
                if slot is None:
                    break
                np.copyto(slot.data, rgb)
                slot.meta = {**meta, "t0": arrival}
                self.frames_in += 1
                self.ring.publish(slot)
                self._observe("queues", self.ring.depth, self.results.qsize(), self.ring.dropped)
        except BaseException as exc:  # noqa: BLE001 - reported by the pipeline
            self._fail("decode", exc)
        finally:
            if frames is not None and hasattr(frames, "close"):
                frames.close()  # the source's generator ends here, on its own thread, not at garbage collection
            self.ring.close()
            self.audio.put(AUDIO_EOS)

    def _infer(self) -> None:
        """Batches in order. An asynchronous infer step (``submit``/``finish`` on a GPU backend)
        gets batch k+1 started before batch k is finished, so the device computes while this
        thread post-processes; a synchronous one is finished at once (no added latency)."""
        two_phase = bool(getattr(self.infer, "asynchronous", False))
        pending = staging = None  # pending: (handle, metas, seconds spent so far)

        def complete(handle, metas, spent):
            start = time.perf_counter()
            results = self.infer.finish(handle) if two_phase else handle
            spent += time.perf_counter() - start
            self.timers["infer"].add(spent, len(metas))
            self.frames_inferred += len(metas)
            self._observe("stage", "infer", spent, len(metas))
            for result, meta in zip(results, metas):
                self._put(self.results, (result, meta))

        try:
            staging = _Staging(self.allocator, self.batch, self.ring.slots[0].data.shape)
            while not self.abort.is_set():
                slots = self.ring.take(self.batch)
                if not slots:
                    break
                start = time.perf_counter()
                metas = [s.meta for s in slots]
                frames = staging.fill(slots)
                self.ring.release(slots)  # the batch is copied: the decoder may refill the slots
                if not two_phase:
                    complete(self.infer(frames, metas), metas, time.perf_counter() - start)
                    continue
                handle = self.infer.submit(frames, metas)
                spent = time.perf_counter() - start
                if pending is not None:
                    done, pending = pending, None
                    complete(*done)  # before the next batch is staged into its buffer
                pending = (handle, metas, spent)
            if pending is not None and not self.abort.is_set():
                done, pending = pending, None
                complete(*done)
        except BaseException as exc:  # noqa: BLE001
            self._fail("infer", exc)
        finally:
            if pending is not None:  # aborted with a batch in flight: the device may still read its buffer
                try:
                    self.infer.finish(pending[0])
                except BaseException:  # noqa: BLE001 - the results are not wanted; the error is not the cause
                    pass
            if staging is not None:
                staging.close()
            self._put(self.results, _EOS, force=True)

    def _encode(self) -> None:
        try:
            while True:
                item = self.results.get()
                if item is _EOS or self.abort.is_set():
                    self.cut_short = item is not _EOS
                    break
                result, meta = item
                if self.max_frames is not None and self.frames_out >= self.max_frames:
                    self.stop_reading.set()  # --frames N: N frames out, like ffmpeg -frames:v
                    continue
                start = time.perf_counter()
                self.sink.write(self.render(result, meta), meta)  # the first write opens the output
                self._pump_audio(block=False)  # then the audio read so far
                now = time.perf_counter()
                self.timers["encode"].add(now - start)
                self.latency.add(now - meta["t0"])
                self.frames_out += 1
                self._observe("stage", "encode", now - start, 1)
                self._observe("latency", now - meta["t0"])
                if self.progress is not None:
                    self.progress.update()
            if not self.cut_short:
                self._pump_audio(block=True)  # the rest of the audio, up to the end of the input
        except BaseException as exc:  # noqa: BLE001
            self._fail("encode", exc)
        finally:
            try:
                self.sink.close()
            except BaseException as exc:  # noqa: BLE001
                self._fail("encode", exc)
            self._finish()

    def _pump_audio(self, block: bool) -> None:
        while not self._audio_done:
            try:
                item = self.audio.get(timeout=0.2) if block else self.audio.get_nowait()
            except queue.Empty:
                if block and not self.abort.is_set():
                    continue
                self.cut_short = self.cut_short or block  # aborted before the end of the audio
                return
            if item is AUDIO_EOS:
                self._audio_done = True
                return
            self.sink.write_audio(item)

    def _finish(self) -> None:
        """Run by the encode thread, last: wait for the other stages, close the source."""
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
        try:
            self.source.close()
        except BaseException as exc:  # noqa: BLE001
            self._fail("decode", exc)
        self._ended = time.perf_counter()
        try:
            if self.on_done is not None:
                self.on_done(self)
        finally:
            # the owner's callbacks (bound methods: a reference cycle through its owner) go, so
            # what the owner holds is freed when its last reference goes, not by the collector
            self.on_done = self.render = self.observer = self.progress = None
            with self._state_lock:
                self.state = "failed" if self.errors else "closed"
            self.done.set()

    # ---- control ----------------------------------------------------------------------------
    def _observe(self, what: str, *args) -> None:
        if self.observer is not None:
            getattr(self.observer, what)(*args)

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

    def _fail(self, stage: str, exc: BaseException) -> None:
        self.errors.append((stage, exc))
        self.abort.set()
        self.stop_reading.set()
        self.ring.close()

    def start(self) -> None:
        """Start the three stage threads; returns at once."""
        with self._state_lock:
            if self.state != "created":
                raise RuntimeError(f"a pipeline starts once (it is {self.state})")
            self.state = "running"
        self._started = time.perf_counter()
        self._threads = [threading.Thread(target=fn, name=f"{self.name}-{stage}")
                         for stage, fn in zip(STAGES, (self._decode, self._infer, self._encode))]
        for t in self._threads:  # the encode thread, started last, finishes the others
            t.start()

    def stop(self, drain: bool = True) -> None:
        """``drain``: stop reading and finish what was read; otherwise abort at the next check."""
        with self._state_lock:
            if self.state not in ("running", "draining"):
                return  # not started, or finished: a final state is never overwritten
            self.state = "draining"
        self.stop_reading.set()
        if not drain:
            self.abort.set()
            self.ring.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every stage has finished, its thread has ended and the source is closed;
        False on timeout. A source blocked inside a read (a stalled network mount) is waited
        for: sources bound their reads with timeouts of their own."""
        if self.state == "created":
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.done.wait(timeout):
            return False
        last = self._threads[-1]
        last.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not last.is_alive()

    def stats(self) -> PipelineStats:
        end = self._ended or time.perf_counter()
        stats = PipelineStats(self.frames_in, self.frames_out, self.ring.dropped,
                              end - self._started if self._started else 0.0,
                              {name: t.summary() for name, t in self.timers.items()})
        if self.latency.count:
            p50, p95, p99 = self.latency.percentiles(50, 95, 99)
            stats.latency = {"p50_ms": p50 * 1000, "p95_ms": p95 * 1000, "p99_ms": p99 * 1000}
        return stats

    def run(self) -> PipelineStats:
        """start() and join(); raises the first stage error."""
        self.start()
        while not self.join(0.2):
            pass
        if self.errors:
            raise self.errors[0][1]
        return self.stats()


def run_sequential(source, infer: Callable, sink, batch: int = 1, render: Callable | None = None) -> PipelineStats:
    """The same work in one loop on one thread: decode a batch, infer it, encode it. Used by
    the benchmark to show what the threads buy."""
    render = render or (lambda result, meta: result)
    stats, start = PipelineStats(), time.perf_counter()
    stop = threading.Event()
    audio: list = []

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
        for chunk in batches(source.frames(stop, audio.append)):
            stats.frames_in += len(chunk)
            results = infer(np.stack([rgb for rgb, _ in chunk]), [meta for _, meta in chunk])
            for result, (_, meta) in zip(results, chunk):
                sink.write(render(result, meta), meta)  # video first: the first write opens the output
                stats.frames_out += 1
            for item in audio:
                sink.write_audio(item)
            audio.clear()
        for item in audio:
            sink.write_audio(item)
    finally:
        sink.close()
        source.close()
    stats.seconds = time.perf_counter() - start
    return stats
