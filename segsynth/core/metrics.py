"""Prometheus metrics of stream sessions, in one private registry (never the global one, so
embedding segsynth adds nothing to a host application's /metrics).

Series carry a ``stream`` label (the session id: at most 64 characters from a fixed
alphabet, checked by StreamConfig) and, where it applies, a ``stage`` (decode, infer,
encode: the names the stats and the run summary use too). A session's series exist while it
runs and are removed when it closes, so the label values in the registry stay bounded by the
streams alive at once. ``*_created`` series are left out (WithoutCreated).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)
FPS_WINDOW = 5.0
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

FRAMES = Counter("segsynth_frames", "Frames through a stage of a stream", ["stream", "stage"], registry=REGISTRY)
DROPPED = Counter("segsynth_frames_dropped", "Frames dropped by the latest policy", ["stream"], registry=REGISTRY)
STAGE_SECONDS = Histogram("segsynth_stage_seconds", "Time a stage spends per frame", ["stream", "stage"],
                          buckets=_SECONDS, registry=REGISTRY)
LATENCY = Histogram("segsynth_latency_seconds", "Per frame: arrival at the decoder to muxed output (glass to glass)", ["stream"],
                    buckets=_SECONDS, registry=REGISTRY)
QUEUE_DEPTH = Gauge("segsynth_queue_depth", "Frames waiting between stages", ["stream", "queue"], registry=REGISTRY)
STREAM_UP = Gauge("segsynth_stream_up", "1 while the stream runs and its source delivers, 0 while a live source "
                  "is lost (reconnecting)", ["stream"], registry=REGISTRY)
RECONNECTS = Counter("segsynth_reconnects", "Reconnections of a live source", ["stream"], registry=REGISTRY)
COMPUTED = Gauge("segsynth_stream_computed_ratio", "Share of a stream's frames its model computed rather than reused "
                 "from the frame before (--incremental), since the stream started", ["stream", "model"],
                 registry=REGISTRY)
FPS = Gauge("segsynth_stream_fps", f"Frames a stream wrote per second over the last {FPS_WINDOW:g} seconds", ["stream"],
            registry=REGISTRY)

STAGES = ("decode", "infer", "encode")  # the one vocabulary of the stage label, the stats and the summary
_live: set[str] = set()
_lock = threading.Lock()


class StreamMetrics:
    """The series of one stream; the pipeline's observer (called from its stage threads)."""

    def __init__(self, stream: str) -> None:
        with _lock:
            if stream in _live:
                raise ValueError(f"a stream called {stream!r} is already running")
            _live.add(stream)
        self.stream = stream
        self._frames = {stage: FRAMES.labels(stream, stage) for stage in STAGES}
        self._seconds = {stage: STAGE_SECONDS.labels(stream, stage) for stage in STAGES}
        self._written: deque[tuple[float, int]] = deque()  # (time, frames) of the last FPS_WINDOW seconds
        self._first: float | None = None
        self._fps_lock = threading.Lock()
        FPS.labels(stream).set_function(self._rate)
        self._latency = LATENCY.labels(stream)
        self._depth = {q: QUEUE_DEPTH.labels(stream, q) for q in ("ring", "results")}
        self._dropped, self._reconnects = DROPPED.labels(stream), RECONNECTS.labels(stream)
        self._up = STREAM_UP.labels(stream)
        self._up.set(1)
        self._last_dropped = 0

    def stage(self, stage: str, seconds: float, frames: int) -> None:
        self._frames[stage].inc(frames)
        if stage == "encode":
            self._count_written(frames)
        per_frame = seconds / max(1, frames)
        for _ in range(frames):
            self._seconds[stage].observe(per_frame)

    def _count_written(self, frames: int) -> None:
        now = time.monotonic()
        with self._fps_lock:
            self._first = self._first or now
            self._written.append((now, frames))
            while self._written[0][0] < now - FPS_WINDOW:
                self._written.popleft()

    def _rate(self) -> float:
        """Frames written per second over the last FPS_WINDOW seconds, at scrape time (a stalled
        stream reads 0, not its last rate); the first second is counted as a whole one."""
        now = time.monotonic()
        with self._fps_lock:
            if self._first is None:
                return 0.0
            frames = sum(n for t, n in self._written if t > now - FPS_WINDOW)
            return frames / max(min(FPS_WINDOW, now - self._first), 1.0)

    def computed(self, shares) -> None:
        """``shares()``: {"segmented": share, "painted": share} (stream.infer.reuse), read at scrape time."""
        for model, key in (("segmenter", "segmented"), ("generator", "painted")):
            COMPUTED.labels(self.stream, model).set_function(lambda key=key: shares()[key])

    def latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def queues(self, ring: int, results: int, dropped: int) -> None:
        """Queue depths now, and the stream's drop count so far (the counter follows it)."""
        self._depth["ring"].set(ring)
        self._depth["results"].set(results)
        total = dropped
        if total > self._last_dropped:
            self._dropped.inc(total - self._last_dropped)
            self._last_dropped = total

    def lost(self) -> None:
        """The live source is gone; reconnecting."""
        self._up.set(0)

    def reconnected(self) -> None:
        self._reconnects.inc()
        self._up.set(1)

    def close(self, down: bool = False) -> None:
        """Remove every series of this stream; ``down`` (it failed): all but ``segsynth_stream_up``,
        left at 0 (and the stream's name taken) until a later ``close()``, so the stream-down
        alert sees the failure for as long as the stream is kept."""
        self._up.set(0)
        for metric, labelsets in ((FRAMES, [(self.stream, s) for s in STAGES]),
                                  (STAGE_SECONDS, [(self.stream, s) for s in STAGES]), (FPS, [(self.stream,)]),
                                  (COMPUTED, [(self.stream, m) for m in ("segmenter", "generator")]),
                                  (QUEUE_DEPTH, [(self.stream, q) for q in ("ring", "results")]),
                                  (LATENCY, [(self.stream,)]), (DROPPED, [(self.stream,)]),
                                  (RECONNECTS, [(self.stream,)]), *(() if down else ((STREAM_UP, [(self.stream,)]),))):
            for labels in labelsets:
                try:
                    metric.remove(*labels)
                except KeyError:
                    pass
        if not down:
            with _lock:
                _live.discard(self.stream)


def exposition() -> bytes:
    """The registry in Prometheus' text format (what /metrics serves)."""
    return generate_latest(WithoutCreated(REGISTRY))


class WithoutCreated:
    """A registry's series without the ``*_created`` ones prometheus-client adds to counters and
    histograms (a timestamp per series, noise for most users). Not prometheus-client's global
    switch: that would change a host application's own /metrics too."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            family.samples = [sample for sample in family.samples if not sample.name.endswith("_created")]
            yield family


_PROCESS: CollectorRegistry | None = None


def process_exposition() -> bytes:
    """Process metrics (CPU seconds, resident memory, open fds, threads) and, where a GPU and
    nvidia-ml-py are there, GPU memory and utilisation: what a service adds to /metrics."""
    global _PROCESS
    with _lock:
        if _PROCESS is None:
            _PROCESS = CollectorRegistry(auto_describe=True)
            ProcessCollector(registry=_PROCESS)
            PlatformCollector(registry=_PROCESS)
            _PROCESS.register(_ThreadsCollector())
            _PROCESS.register(_GpuCollector.create())
    return generate_latest(_PROCESS)


def os_threads() -> int:
    """Threads of this process as the kernel counts them (encoder and decoder threads of
    FFmpeg and x264, onnxruntime's pools, ...): /proc/self/status; Python's threads elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return threading.active_count()


class _ThreadsCollector:
    def collect(self):
        yield GaugeMetricFamily("segsynth_process_threads", "Threads of the process (the kernel's count: native "
                                "threads included)", value=os_threads())


class _GpuCollector:
    """GPU memory and utilisation through NVML (nvidia-ml-py). Without a GPU (or NVML) the
    families are still declared, with no samples, so dashboards and rules see the names."""

    def __init__(self, nvml, handles) -> None:
        self.nvml, self.handles = nvml, handles

    @classmethod
    def create(cls):
        try:
            # imported here: nvidia-ml-py is optional (GPU machines)
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - no package, no driver, no GPU: no GPU samples
            return cls(None, [])
        return cls(pynvml, handles)

    def collect(self):
        used = GaugeMetricFamily("segsynth_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("segsynth_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        util = GaugeMetricFamily("segsynth_gpu_utilization_ratio", "GPU busy fraction", labels=["gpu"])
        for i, h in enumerate(self.handles):
            memory = self.nvml.nvmlDeviceGetMemoryInfo(h)
            used.add_metric([str(i)], memory.used)
            total.add_metric([str(i)], memory.total)
            util.add_metric([str(i)], self.nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100)
        yield used
        yield total
        yield util
