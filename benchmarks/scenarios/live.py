"""Scenarios of long-running work: live streams under each policy, memory over time (soak), the HTTP service, and bulk transcoding."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import threading
import time

import av
import numpy as np

from segsynth.benchmarks import inputs
from segsynth.benchmarks.scenarios.common import Job, percentile
from segsynth.core.config import StreamConfig, TranscodeConfig
from segsynth.jobs.transcode import transcode as run_batch
from segsynth.serve.service import Service
from segsynth.stream.io.sinks import MemorySink
from segsynth.stream.io.sources import SyntheticSource
from segsynth.stream.session import StreamSession

log = logging.getLogger("segsynth")


def transcode(job: Job) -> dict:
    """``segsynth transcode`` of a folder of generated clips (6 files sharing the input's
    frames) with --jobs 1 and --jobs 2 in one run: files/minute, frames/s, and each file's
    overhead (the models loading in its worker, the time to its first frame)."""

    w, h = job.cfg.size
    folder = job.cfg.workdir / "transcode-in"
    folder.mkdir(exist_ok=True)
    per_file = max(10, job.cfg.frames // 6)
    for i in range(6):
        inputs.generate(folder / f"clip{i}.mp4", size=(w, h), rate=job.cfg.rate, frames=per_file)
    models = dataclasses.replace(job.models.config, threads=None)  # each worker: the cores / --jobs
    rows = []
    for jobs in (1, 2):
        summary = run_batch(TranscodeConfig(inputs=(str(folder),), out=job.cfg.workdir / f"transcode-out-{jobs}",
                                            models=models, jobs=jobs), quiet=True)
        if summary["failed"] or summary["done"] != 6:
            raise RuntimeError(f"transcode --jobs {jobs}: {summary['line']}")
        rows.append({"jobs": jobs, "files": 6, "frames": summary["frames"], "seconds": summary["seconds"],
                     "files_per_minute": summary["files_per_minute"], "fps": summary["fps"],
                     "model_load_s": statistics.mean(summary["model_load_seconds"]),
                     "workers_loading": len(summary["model_load_seconds"]),
                     "first_frame_s": statistics.mean(summary["first_frame_seconds"])})
    return {"rows": rows, "ratios": {"transcode_jobs2_over_jobs1": rows[1]["fps"] / rows[0]["fps"]}}


def _pictures(job: Job, count: int = 250) -> list[np.ndarray]:
    """Up to ``count`` full-size frames of the input, for synthetic (in-memory) sources."""

    with av.open(str(job.input)) as c:
        out = []
        for frame in c.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == count:
                break
    return out


def _session(job: Job, source, sink, policy: str, ring_slots: int = 8, progress=None):
    cfg = StreamConfig(source="synthetic", sinks=("memory.mkv",), view=job.view, policy=policy,
                       ring_slots=ring_slots, legend=False)
    return StreamSession(cfg, job.models, source=source, sinks=[sink], progress=progress)


def streams(job: Job) -> dict:
    """1..N concurrent live streams (latest policy) from a synthetic real-time source, all over
    one ModelSet: per-stream fps, end-to-end latency percentiles and drops, for each count."""

    pictures = _pictures(job)
    count = job.cfg.frames
    table = []
    counts = sorted({1, *[n for n in (2, 4, 8, 16) if n < job.cfg.streams], job.cfg.streams})
    for n in counts:
        sessions = [_session(job, SyntheticSource(pictures, count, job.cfg.rate), MemorySink(job.cfg.rate),
                             "latest", ring_slots=2) for _ in range(n)]
        for s in sessions:
            s.start()
        for s in sessions:
            s.join()
        stats = [s.stats() for s in sessions]
        latencies = [lat * 1000 for s in sessions for lat in s.pipeline.latency.recent]
        row = {"streams": n, "fps_per_stream": statistics.mean(s.fps for s in stats),
               "dropped_per_stream": statistics.mean(s.dropped for s in stats),
               "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95), "p99_ms": percentile(latencies, 99)}
        row["real_time"] = row["fps_per_stream"] >= 0.95 * job.cfg.rate and row["p99_ms"] < 100
        table.append(row)
        job.results.setdefault("latency_samples", {})[n] = latencies
    realtime = [r["streams"] for r in table if r["real_time"]]
    out = {"rate": job.cfg.rate, "rows": table, "max_real_time_streams": max(realtime, default=0)}
    if job.cfg.live_seconds:
        out["live"] = {policy: _live_drift(job, pictures, policy) for policy in ("latest", "lossless")}
    return out


class _Timed:
    """A sink wrapper recording (seconds since start, latency) of each frame as it is written."""

    def __init__(self, sink) -> None:
        self.sink, self.samples, self.start = sink, [], time.perf_counter()
        self.decoded_audio = sink.decoded_audio

    def write(self, picture, meta) -> None:
        self.sink.write(picture, meta)
        now = time.perf_counter()
        self.samples.append((now - self.start, now - meta["t0"]))

    def write_audio(self, item) -> None:
        self.sink.write_audio(item)

    def close(self) -> None:
        self.sink.close()


def _live_drift(job: Job, pictures: list, policy: str) -> dict:
    """One stream from a real-time source for ``live_seconds``: latency p99 over the first
    and the last third of the run. With a model slower than the source, ``latest`` should
    hold it flat (ratio near 1) while ``lossless`` lets the queue, and the latency, grow."""

    seconds = job.cfg.live_seconds
    sink = _Timed(MemorySink(job.cfg.rate))
    session = _session(job, SyntheticSource(pictures, int(seconds * job.cfg.rate), job.cfg.rate), sink, policy,
                       ring_slots=2 if policy == "latest" else 8)
    session.start()
    time.sleep(seconds)
    session.stop(drain=False)  # lossless would otherwise work off its backlog for a long time
    session.join()
    stats = session.stats()
    third = seconds / 3
    first = [lat * 1000 for t, lat in sink.samples if t < third]
    last = [lat * 1000 for t, lat in sink.samples if t >= seconds - third]
    if not first or not last:
        raise RuntimeError(f"live {policy}: no frame was written in the first or the last {third:.0f} s")
    p99_first, p99_last = percentile(first, 99), percentile(last, 99)
    return {"seconds": seconds, "window_s": third, "frames_out": stats.frames_out, "dropped": stats.dropped,
            "fps": stats.frames_out / seconds, "model_slower": stats.frames_in > stats.frames_out * 1.05
            or stats.frames_out / seconds < 0.95 * job.cfg.rate,
            "p99_first_ms": p99_first, "p99_last_ms": p99_last, "p99_last_over_first": p99_last / p99_first}


def soak(job: Job) -> dict:
    """RSS while one stream session runs ``frames`` frames (the input's pictures, repeated, from
    memory, into an in-memory encoder): at 10 % of the run and at the end."""

    n = job.cfg.frames
    probe = _RssProbe(max(1, n // 20))
    session = _session(job, SyntheticSource(_pictures(job), n), MemorySink(), "lossless", progress=probe)
    session.start()
    session.join()
    if session.error is not None:
        raise session.error
    stats = session.stats()
    early = next((rss for done, rss in probe.samples if done >= n // 10), None)
    late = probe.samples[-1][1] if probe.samples else None
    out = {"frames": stats.frames_out, "fps": stats.fps, "rss_mib": probe.samples, "rss_at_10pct_mib": early,
           "rss_at_end_mib": late}
    if early and late:
        out["ratios"] = {"soak_rss_end_over_10pct": late / early}
    return out


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class _RssProbe:
    """Progress stand-in for the encode thread: samples RSS as frames are written."""

    def __init__(self, every: int) -> None:
        self.every, self.done, self.samples = every, 0, []

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done % self.every == 0:
            self.samples.append((self.done, _rss_mib()))


def _cpu_cores(seconds: float) -> float:
    """CPU time of this process over ``seconds`` of wall time, in cores."""
    start = time.process_time()
    time.sleep(seconds)
    return (time.process_time() - start) / seconds


def service(job: Job) -> dict:
    """What a stream costs ``segsynth serve`` when it has little to do: the Service (the layer
    under the HTTP API) with no stream, then with ``streams`` streams from 1 fps lavfi cameras
    at ``--size`` into .mkv files: RSS per added stream, and CPU (in cores) of the idle service
    and per stream. The model's own cost is in it (one frame a second per stream)."""

    n, (w, h) = job.cfg.streams, job.cfg.size
    svc = Service(job.models)
    svc.add({"id": "warm", "source": f"lavfi:color=c=gray:size={w}x{h}:rate=1",
             "sinks": [str(job.cfg.workdir / "warm.mkv")]})  # first-use allocations are not per stream
    time.sleep(2)
    svc.remove("warm")
    idle, rss_before = _cpu_cores(5), _rss_mib()
    for i in range(n):
        svc.add({"id": f"svc{i}", "source": f"lavfi:testsrc2=size={w}x{h}:rate=1",
                 "sinks": [str(job.cfg.workdir / f"svc{i}.mkv")]})
    time.sleep(3)
    busy, rss_with = _cpu_cores(10), _rss_mib()
    frames = sum(s.stats().frames_out for s in svc.sessions.values())
    threads = threading.active_count()
    svc.shutdown(10)
    rss_after = _rss_mib()
    svc = Service(job.models)  # a second round: memory freed by the first is reused, not added to
    for i in range(n):
        svc.add({"id": f"svc{i}", "source": f"lavfi:testsrc2=size={w}x{h}:rate=1",
                 "sinks": [str(job.cfg.workdir / f"svc{i}.mkv")]})
    time.sleep(3)
    svc.shutdown(10)
    rss_second = _rss_mib()
    return {"rss_after_second_round_mib": rss_second,"streams": n, "size": f"{w}x{h}", "frames_out": frames, "threads_with_streams": threads,
            "cpu_cores_idle_service": idle, "cpu_cores_with_streams": busy,
            "cpu_cores_per_stream": (busy - idle) / n, "rss_before_mib": rss_before, "rss_with_streams_mib": rss_with,
            "rss_after_removal_mib": rss_after, "rss_per_stream_mib": (rss_with - rss_before) / n}
