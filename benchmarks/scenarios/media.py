"""Scenarios of the media path: each stage alone, the threaded pipeline vs one thread, and passthrough vs the ffmpeg CLI."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from pathlib import Path

import av
import numpy as np

from segsynth.benchmarks.scenarios.common import Job, median_rate
from segsynth.stream.io import demux, mux, streams
from segsynth.stream.io.sinks import FileSink
from segsynth.stream.io.sources import FileSource
from segsynth.stream.io.tracks import SourceInfo
from segsynth.stream.pipeline import Pipeline, run_sequential

log = logging.getLogger("segsynth")


def job_source(job: Job, need_display: bool):
    source = FileSource(job.input).open()
    source.model_size, source.need_display = job.models.size, need_display
    return source


def job_sink(source, out: Path):
    return FileSink(out, source.info)


def shows_input(job: Job) -> bool:
    return job.view in ("overlay", "side-by-side", "grid")


def decode_all(job: Job) -> tuple[list, list]:
    """(model frames, metas) of the whole input, decoded once, for the stage-alone measurements."""
    source = job_source(job, shows_input(job))
    try:
        items = list(source.frames(threading.Event(), lambda item: None))
    finally:
        source.close()
    return [rgb for rgb, _ in items], [meta for _, meta in items]


def _infer_alone(job: Job, frames: list, metas: list) -> float:
    batch = job.cfg.batch[0]
    job.infer(np.stack(frames[:batch]), metas[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(frames), batch):
        job.infer(np.stack(frames[i:i + batch]), metas[i:i + batch])
    return time.perf_counter() - start


def stages(job: Job) -> dict:
    """Decode, infer and encode, each alone on the same input."""
    times = {"decode": [], "infer": [], "encode": []}
    frames, metas = decode_all(job)
    n, batch = len(frames), job.cfg.batch[0]
    results = [r for i in range(0, n, batch) for r in job.infer(np.stack(frames[i:i + batch]), metas[i:i + batch])]
    for _ in range(job.cfg.repeats):
        start = time.perf_counter()
        source = job_source(job, shows_input(job))
        for _ in source.frames(threading.Event(), lambda item: None):
            pass
        source.close()
        times["decode"].append(time.perf_counter() - start)
        times["infer"].append(_infer_alone(job, frames, metas))
        source = job_source(job, False)
        sink = job_sink(source, job.cfg.workdir / "stage-encode.mp4")  # no audio in this measurement: only video
        start = time.perf_counter()
        for result, meta in zip(results, metas):
            sink.write(job.render(result, meta), meta)
        sink.close()
        times["encode"].append(time.perf_counter() - start)
        source.close()
    return {"frames": n, **{f"{k}_fps": median_rate(v, n) for k, v in times.items()}}


def pipeline(job: Job) -> dict:
    """The threaded pipeline vs the same work in one sequential loop vs the infer stage alone."""

    frames, metas = decode_all(job)
    n = len(frames)
    w, h = job.models.size
    batch = job.cfg.batch[0]
    times = {"pipelined": [], "sequential": [], "infer_alone": []}
    for r in range(job.cfg.repeats):
        times["infer_alone"].append(_infer_alone(job, frames, metas))
        for mode in ("pipelined", "sequential"):
            source = job_source(job, shows_input(job))
            sink = job_sink(source, job.cfg.workdir / f"pipeline-{mode}.mp4")
            start = time.perf_counter()
            if mode == "pipelined":
                stats = Pipeline(source, job.infer, sink, model_shape=(h, w, 3), batch=batch,
                                 render=job.render).run()
                assert stats.frames_out == n, (stats.frames_out, n)
            else:
                run_sequential(source, job.infer, sink, batch, render=job.render)
            times[mode].append(time.perf_counter() - start)
    fps = {k: median_rate(v, n) for k, v in times.items()}
    return {"frames": n, **{f"{k}_fps": v for k, v in fps.items()},
            "ratios": {"pipeline_over_infer": fps["pipelined"] / fps["infer_alone"],
                       "pipeline_over_sequential": fps["pipelined"] / fps["sequential"]}}


class _PassSource:
    """Decoded frames straight to the encoder (the identity model): no colour conversion."""

    def __init__(self, path: Path) -> None:
        self.container = demux.open_video(path)
        self.video, self.audio = self.container.streams.video[0], list(self.container.streams.audio)
        self.video.thread_type = "AUTO"
        self.problems: list[str] = []

    def frames(self, stop, audio):
        dummy = np.zeros((1, 1, 3), np.uint8)
        for item in demux.demux_decode(self.container, self.video, self.audio, self.problems):
            if isinstance(item, av.Packet):
                audio(item)
            else:
                yield dummy, {"frame": item}

    def close(self) -> None:
        self.container.close()


class _PassSink:
    def __init__(self, source: _PassSource, out: Path) -> None:
        self.writer = mux.MediaWriter(out, fragmented=True)
        c = self.writer.container
        v = source.video
        info = SourceInfo(str(out), v.average_rate or 30, v.time_base)
        self.v = streams.add_video_stream(c, "libx264", info, (v.codec_context.width, v.codec_context.height), crf=20,
                                        preset="veryfast", bitrate=None, b_frames=False)
        self.a = {s.index: c.add_stream_from_template(s) for s in source.audio}

    def write_audio(self, packet) -> None:
        packet.stream = self.a[packet.stream.index]
        self.writer.mux(packet)

    def write(self, result, meta) -> None:
        self.writer.mux(self.v.encode(meta["frame"]))

    def close(self) -> None:
        self.writer.mux(self.v.encode(None))
        self.writer.close()


def passthrough(job: Job) -> dict:
    """decode -> encode with the identity model through segsynth's pipeline, vs the ffmpeg CLI
    doing the same transcode with the same codec settings."""

    src = job.input
    n = job.results.get("frames") or _count_frames(src)
    ours, theirs = [], []
    ffmpeg = shutil.which("ffmpeg")
    for _ in range(job.cfg.repeats):
        start = time.perf_counter()  # like the ffmpeg CLI's time: opening and closing files included
        source = _PassSource(src)
        rate = round(float(source.video.average_rate or 30))  # read while open: the pipeline closes the source
        try:
            sink = _PassSink(source, job.cfg.workdir / "pass-segsynth.mp4")
        except BaseException:
            source.close()
            raise
        Pipeline(source, lambda frames, metas: [None] * len(metas), sink, model_shape=(1, 1, 3)).run()
        ours.append(time.perf_counter() - start)
        if ffmpeg:
            cmd = [ffmpeg, "-v", "error", "-y", "-i", str(src), "-map", "0:v:0", "-map", "0:a?", "-c:v", "libx264",
                   "-preset", "veryfast", "-crf", "20", "-bf", "0", "-g", str(2 * rate), "-pix_fmt", "yuv420p",
                   "-c:a", "copy", "-movflags", "frag_keyframe+empty_moov+default_base_moof", "-frag_duration",
                   "1000000", str(job.cfg.workdir / "pass-ffmpeg.mp4")]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
            theirs.append(time.perf_counter() - start)
    out = {"frames": n, "segsynth_fps": median_rate(ours, n)}
    if theirs:
        out["ffmpeg_fps"] = median_rate(theirs, n)
        out["ratios"] = {"passthrough_over_ffmpeg": out["segsynth_fps"] / out["ffmpeg_fps"]}
    else:
        out["note"] = "no ffmpeg CLI on PATH: no comparison"
    return out


def _count_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for p in c.demux(c.streams.video[0]) if p.size)
