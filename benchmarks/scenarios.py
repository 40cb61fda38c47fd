"""Benchmark scenarios. Each returns a dict with its measurements; ratios are computed from
measurements taken in the same run, with warm-up first and medians over repeats."""

from __future__ import annotations

import logging
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


log = logging.getLogger("segsynth")
# run only when named: chain needs the export extra (torch), service the serve extra, and the
# rest are long or load other models
NAMED_ONLY = ("service", "chain", "transcode", "tiers", "cpu-efficiency", "seg-sizes")
SCENARIOS = ("engine", "stages", "pipeline", "fused", "passthrough", "streams", "soak", *NAMED_ONLY)
DEFAULT_SCENARIOS = tuple(s for s in SCENARIOS if s not in NAMED_ONLY)


@dataclass(frozen=True)
class BenchConfig:
    scenarios: tuple[str, ...] = SCENARIOS
    size: tuple[int, int] = (1280, 720)  # generated input (W, H)
    frames: int = 300
    batch: tuple[int, ...] = (1,)
    streams: int = 2
    repeats: int = 3
    rate: int = 30
    segmenter: str = "ade20k+voc"
    generator: str = "default"
    threads: int | None = None
    input: Path | None = None
    workdir: Path = Path(".")
    backend: str = "auto"
    fp16: bool = True
    fused: str = "auto"  # the models as one graph (stream.chain); see ModelConfig.fused
    chain_size: tuple[int, int] = (512, 256)  # (W, H) frames for the chain scenario
    models: str = "quality"  # see ModelConfig.models
    seg_size: int | None = None  # see ModelConfig.seg_size
    live_seconds: float = 180.0  # streams: how long each policy runs against a source faster than the model


@dataclass
class Job:
    """The models and the input every scenario shares (the models are loaded once)."""

    cfg: BenchConfig
    input: Path
    models: object  # a ModelSet
    infer: object  # the infer step of one stream (a Synthesize over ``models``)
    view: str
    results: dict = field(default_factory=dict)

    def make_infer(self):
        """A fresh infer step (its own smoother, remap and z) over the shared models."""
        from segsynth.stream.infer.synth import Synthesize

        m = self.models
        gen = m.generator
        return Synthesize(m.segmenter, gen, m.remap(None), m.z(quiet=True), "off", m.fit(None),
                          gen.size if gen is not None else None, chains={"all": m.fused("all")})

    def render(self, result, meta):
        from segsynth.stream.render import compose

        return compose(self.view, meta.get("display"), result.labels, result.synth, self.models.label_set,
                       meta["size"])


def _median_rate(times: list[float], frames: int) -> float:
    return frames / statistics.median(times)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def _timed(fn, *args, calls: int, seconds: float = 0.0) -> list[float]:
    """Seconds of each call of ``fn(*args)``: at least ``calls`` calls, and calls until ``seconds`` have passed."""
    times = []
    budget = time.perf_counter() + seconds
    while time.perf_counter() < budget or len(times) < calls:
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return times


def engine(job: Job) -> dict:
    """Model-only throughput and latency for each batch size."""
    rows = []
    seg, gen = job.models.segmenter, job.models.generator
    w, h = seg.size
    models = [("segmenter", seg, lambda b: np.random.default_rng(0).integers(0, 255, (b, h, w, 3), dtype=np.uint8))]
    if gen is not None:
        gw, gh = gen.size
        models.append(("generator", lambda x: gen(x, job.infer.z),
                       lambda b: np.random.default_rng(0).integers(0, 150, (b, gh, gw), dtype=np.uint8)))
    for name, fn, make in models:
        for batch in job.cfg.batch:
            x = make(batch)
            fn(x)  # warm-up
            lat = _timed(fn, x, calls=job.cfg.repeats, seconds=max(2.0, 0.2 * job.cfg.repeats))
            rows.append({"model": name, "batch": batch, "fps": batch / statistics.median(lat),
                         "p50_ms": _pct(lat, 50) * 1000, "p95_ms": _pct(lat, 95) * 1000})
    return {"rows": rows}


def _source(job: Job, need_display: bool):
    from segsynth.stream.io.sources import FileSource

    source = FileSource(job.input).open()
    source.model_size, source.need_display = job.models.size, need_display
    return source


def _sink(source, out: Path):
    from segsynth.stream.io.sinks import FileSink

    return FileSink(out, source.info)


def _display(job: Job) -> bool:
    return job.view in ("overlay", "side-by-side", "grid")


def _decode_all(job: Job) -> tuple[list, list]:
    """(model frames, metas) of the whole input, decoded once, for the stage-alone measurements."""
    source = _source(job, _display(job))
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
    frames, metas = _decode_all(job)
    n, batch = len(frames), job.cfg.batch[0]
    results = [r for i in range(0, n, batch) for r in job.infer(np.stack(frames[i:i + batch]), metas[i:i + batch])]
    for _ in range(job.cfg.repeats):
        start = time.perf_counter()
        source = _source(job, _display(job))
        for _ in source.frames(threading.Event(), lambda item: None):
            pass
        source.close()
        times["decode"].append(time.perf_counter() - start)
        times["infer"].append(_infer_alone(job, frames, metas))
        source = _source(job, False)
        sink = _sink(source, job.cfg.workdir / "stage-encode.mp4")  # no audio in this measurement: only video
        start = time.perf_counter()
        for result, meta in zip(results, metas):
            sink.write(job.render(result, meta), meta)
        sink.close()
        times["encode"].append(time.perf_counter() - start)
        source.close()
    return {"frames": n, **{f"{k}_fps": _median_rate(v, n) for k, v in times.items()}}


def pipeline(job: Job) -> dict:
    """The threaded pipeline vs the same work in one sequential loop vs the infer stage alone."""
    from segsynth.stream.pipeline import Pipeline, run_sequential

    frames, metas = _decode_all(job)
    n = len(frames)
    w, h = job.models.size
    batch = job.cfg.batch[0]
    times = {"pipelined": [], "sequential": [], "infer_alone": []}
    for r in range(job.cfg.repeats):
        times["infer_alone"].append(_infer_alone(job, frames, metas))
        for mode in ("pipelined", "sequential"):
            source = _source(job, _display(job))
            sink = _sink(source, job.cfg.workdir / f"pipeline-{mode}.mp4")
            start = time.perf_counter()
            if mode == "pipelined":
                stats = Pipeline(source, job.infer, sink, model_shape=(h, w, 3), batch=batch,
                                 render=job.render).run()
                assert stats.frames_out == n, (stats.frames_out, n)
            else:
                run_sequential(source, job.infer, sink, batch, render=job.render)
            times[mode].append(time.perf_counter() - start)
    fps = {k: _median_rate(v, n) for k, v in times.items()}
    return {"frames": n, **{f"{k}_fps": v for k, v in fps.items()},
            "ratios": {"pipeline_over_infer": fps["pipelined"] / fps["infer_alone"],
                       "pipeline_over_sequential": fps["pipelined"] / fps["sequential"]}}


def fused(job: Job) -> dict:
    """The infer step over the same decoded frames with the models fused into one graph
    (stream.chain: uint8 frames in, labels and pictures out) and with the models one by one,
    alternating in one run; and how far their results differ (GPU FP16 may differ a little)."""
    from segsynth.stream.infer import chain
    from segsynth.stream.infer.synth import Synthesize

    m = job.models
    graph = m.fused("all") or chain.load_chain(m.segmenter, m.generator, backend=m.backend, cache_dir=job.cfg.workdir,
                                               fp16=m.config.fp16, threads=m.config.threads, batch=max(job.cfg.batch))
    try:
        gen = m.generator
        steps = {name: Synthesize(m.segmenter, gen, m.remap(None), m.z(quiet=True), "off", m.fit(None),
                                  gen.size if gen is not None else None, chains={"all": c})
                 for name, c in (("fused", graph), ("separate", None))}
        frames, metas = _decode_all(job)
        n, batch = len(frames), job.cfg.batch[0]
        times = {name: [] for name in steps}
        results = {}
        for _ in range(job.cfg.repeats):
            for name, step in steps.items():
                step(np.stack(frames[:batch]), metas[:batch])  # warm-up
                start = time.perf_counter()
                pending, out = None, []
                for i in range(0, n, batch):  # batch k+1 submitted before batch k is finished, as the pipeline does
                    handle = step.submit(np.stack(frames[i:i + batch]), metas[i:i + batch])
                    if pending is not None:
                        out += step.finish(pending)
                    pending = handle
                out += step.finish(pending)
                times[name].append(time.perf_counter() - start)
                results[name] = out
    finally:
        if graph is not m.chains.get("all"):
            graph.close()
    fps = {name: _median_rate(t, n) for name, t in times.items()}
    a, b = results["fused"], results["separate"]
    agreement = float(np.mean([(x.labels == y.labels).mean() for x, y in zip(a, b)]))
    pixels = max((int(np.abs(x.synth.astype(int) - y.synth).max()) for x, y in zip(a, b) if x.synth is not None),
                 default=0)
    return {"frames": n, "backend": graph.runner.name, "fused_fps": fps["fused"], "separate_fps": fps["separate"],
            "label_agreement": agreement, "pixels_max_abs_diff": pixels,
            "ratios": {"fused_over_separate": fps["fused"] / fps["separate"]}}


def transcode(job: Job) -> dict:
    """``segsynth transcode`` of a folder of generated clips (6 files sharing the input's
    frames) with --jobs 1 and --jobs 2 in one run: files/minute, frames/s, and each file's
    overhead (the models loading in its worker, the time to its first frame)."""
    from dataclasses import asdict

    from segsynth.jobs.transcode import transcode as run_batch

    from segsynth.benchmarks import inputs

    w, h = job.cfg.size
    folder = job.cfg.workdir / "transcode-in"
    folder.mkdir(exist_ok=True)
    per_file = max(10, job.cfg.frames // 6)
    for i in range(6):
        inputs.generate(folder / f"clip{i}.mp4", size=(w, h), rate=job.cfg.rate, frames=per_file)
    model_options = {k: v for k, v in asdict(job.models.config).items() if k != "threads"}
    rows = []
    for jobs in (1, 2):
        summary = run_batch([str(folder)], job.cfg.workdir / f"transcode-out-{jobs}", stream_options={},
                            model_options=model_options, jobs=jobs, quiet=True)
        if summary["failed"] or summary["done"] != 6:
            raise RuntimeError(f"transcode --jobs {jobs}: {summary['line']}")
        rows.append({"jobs": jobs, "files": 6, "frames": summary["frames"], "seconds": summary["seconds"],
                     "files_per_minute": summary["files_per_minute"], "fps": summary["fps"],
                     "model_load_s": statistics.mean(summary["model_load_seconds"]),
                     "workers_loading": len(summary["model_load_seconds"]),
                     "first_frame_s": statistics.mean(summary["first_frame_seconds"])})
    return {"rows": rows, "ratios": {"transcode_jobs2_over_jobs1": rows[1]["fps"] / rows[0]["fps"]}}


def tiers(job: Job) -> dict:
    """``--models quality`` vs ``--models fast`` in one run: the whole pipeline (decode, infer,
    encode; the bench's view) over the same input, alternating; and how far fast's results are
    from quality's on every frame: label agreement (on the frame's grid) and the picture's PSNR."""
    from dataclasses import replace

    from segsynth.stream.infer.models import ModelSet
    from segsynth.stream.pipeline import Pipeline
    from segsynth.stream.infer.segmenter import resize_labels

    first = job.models.config
    other = replace(first, models="fast" if first.models == "quality" else "quality", seg_size=None)
    with ModelSet.load(**vars(other)) as loaded:
        jobs = {}
        for models in (job.models, loaded):
            tier = Job(job.cfg, job.input, models, None, job.view)
            tier.infer = tier.make_infer()
            jobs[models.config.models] = tier
        times, results = {name: [] for name in jobs}, {}
        for _ in range(job.cfg.repeats):
            for name, tier in jobs.items():
                source = _source(tier, _display(tier))
                w, h = tier.models.size
                start = time.perf_counter()
                Pipeline(source, tier.infer, _sink(source, job.cfg.workdir / f"tiers-{name}.mp4"),
                         model_shape=(h, w, 3), batch=job.cfg.batch[0], render=tier.render).run()
                times[name].append(time.perf_counter() - start)
        for name, tier in jobs.items():
            frames, metas = _decode_all(tier)
            results[name] = [tier.infer(f[None], [m])[0] for f, m in zip(frames, metas)]
            n, size = len(frames), metas[0]["size"]
    fps = {name: _median_rate(t, n) for name, t in times.items()}
    q, f = results["quality"], results["fast"]
    agreement = float(np.mean([(resize_labels(a.labels, *size) == resize_labels(b.labels, *size)).mean()
                               for a, b in zip(q, f)]))
    out = {"frames": n, "quality_fps": fps["quality"], "fast_fps": fps["fast"], "label_agreement": agreement,
           "fast_seg_size": jobs["fast"].models.size[0],
           "ratios": {"fast_over_quality": fps["fast"] / fps["quality"]}}
    if q[0].synth is not None:
        mse = float(np.mean([np.mean((a.synth.astype(np.float64) - b.synth) ** 2) for a, b in zip(q, f)]))
        out["synth_psnr_db"] = 10 * np.log10(255 ** 2 / max(mse, 1e-12))
    return out


def graph_flops(path: Path) -> float:
    """Multiply-adds x 2 of one frame through a graph's Conv, MatMul and Gemm nodes (batch 1,
    shapes inferred by onnx); what the rest does (activations, resizes, argmax) is not counted."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    for value in model.graph.input:
        dim = value.type.tensor_type.shape.dim
        if dim and not dim[0].dim_value:
            dim[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    shapes.update({i.name: list(i.dims) for i in model.graph.initializer})
    producers = {o: n for n in model.graph.node for o in n.output}

    def shape(name: str) -> list[int]:  # through a DequantizeLinear to the quantised weights
        node = producers.get(name)
        return shapes.get(name) or (shape(node.input[0]) if node is not None and node.op_type == "DequantizeLinear"
                                    else [])

    total = 0.0
    for node in model.graph.node:
        if node.op_type == "Conv":
            out, weight = shape(node.output[0]), shape(node.input[1])
            if out and weight:
                total += 2 * float(np.prod(out)) * float(np.prod(weight[1:]))
        elif node.op_type in ("MatMul", "Gemm"):
            a, out = shape(node.input[0]), shape(node.output[0])
            if a and out:
                total += 2 * float(np.prod(out)) * a[-1]
    return total


def _peak(threads: int) -> dict:
    """The machine's measured peak in this run: an fp32 matmul (numpy's BLAS) and an int8 one
    (onnxruntime's MatMulInteger, u8 x s8 -> s32, the kernel int8 convolutions use), GFLOP/s."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = 2048
    a, b = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    a @ b  # warm-up
    fp32 = 2 * n ** 3 / min(_timed(np.matmul, a, b, calls=5)) / 1e9
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "peak",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
                               helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                                .SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": np.random.default_rng(1).integers(0, 255, (n, n), dtype=np.uint8),
            "b": np.random.default_rng(2).integers(-127, 127, (n, n), dtype=np.int8)}
    sess.run(None, feed)
    int8 = 2 * n ** 3 / min(_timed(sess.run, None, feed, calls=5)) / 1e9
    return {"fp32_gflops": fp32, "int8_gops": int8, "matmul_size": n}


def cpu_efficiency(job: Job) -> dict:
    """For each bundled model, float and int8: Conv/MatMul FLOPs per frame (from the graph), the
    time per frame alone (batch 1), the GFLOP/s that makes, and the share of this machine's
    peak measured in the same run (fp32 matmul for float graphs, int8 matmul for int8 ones)."""
    import os

    from segsynth.core.grammar import FAST_SEG_SIZE
    from segsynth.engine.select import open_runner
    from segsynth.stream.infer.generator import bundled_generator
    from segsynth.stream.infer.segmenter import bundled_model, reshaped

    threads = job.cfg.threads or os.cpu_count() or 1
    peak = _peak(threads)
    rows = []
    graphs = [(f"{name} {kind}", bundled_model(name, kind == "int8")) for name in ("ade20k", "voc")
              for kind in ("fp32", "int8")]
    graphs += [(f"{name} fast int8", reshaped(bundled_model(name, True), FAST_SEG_SIZE, True, job.cfg.workdir))
               for name in ("ade20k", "voc")]  # what --models fast runs
    gen = bundled_generator()
    if gen is not None:
        graphs += [("generator fp32", gen), ("generator int8", gen.with_suffix(".int8.onnx"))]
    for name, path in graphs:
        runner = open_runner(path, "onnxruntime", threads=job.cfg.threads)
        try:
            feed = {}
            for m in runner.inputs.values():
                shape = [d if isinstance(d, int) else 1 for d in m.shape]
                feed[m.name] = (np.zeros(shape, m.dtype) if np.issubdtype(m.dtype, np.integer) else
                                np.random.default_rng(0).standard_normal(shape).astype(np.float32))
            runner.infer(feed)
            times = _timed(runner.infer, feed, calls=3, seconds=max(2.0, 0.5 * job.cfg.repeats))
        finally:
            runner.deactivate()
        flops, seconds = graph_flops(path), statistics.median(times)
        achieved = flops / seconds / 1e9
        top = peak["int8_gops"] if "int8" in name else peak["fp32_gflops"]
        rows.append({"model": name, "gflops_per_frame": flops / 1e9, "ms_per_frame": seconds * 1000,
                     "gflops_per_s": achieved, "percent_of_peak": 100 * achieved / top})
    return {"threads": threads, "peak": peak, "rows": rows}


def seg_sizes(job: Job) -> dict:
    """Each bundled segmenter, float and int8, at each --seg-size, with the argmax after the
    upsampling (as exported) and before it (--models fast): time per frame alone and label
    agreement with the float graph at 513 on the input's frames (every 8th, on the 513 grid)."""
    from segsynth.engine.select import open_runner
    from segsynth.core.grammar import SEG_SIZES
    from segsynth.stream.infer.segmenter import OnnxSegmenter, bundled_model, reshaped, resize_labels, resize_rgb

    source = _source(job, True)
    try:
        frames = [meta["display"] for i, (_, meta) in enumerate(source.frames(threading.Event(), lambda item: None))
                  if i % 8 == 0]
    finally:
        source.close()
    rows = []
    for name in ("ade20k", "voc"):
        reference = None
        for int8 in (False, True):
            for lowres in (False, True):
                for size in SEG_SIZES:
                    path = reshaped(bundled_model(name, int8), size, lowres, job.cfg.workdir)
                    seg = OnnxSegmenter(open_runner(path, "onnxruntime", threads=job.cfg.threads), path=path)
                    try:
                        out = [resize_labels(seg(resize_rgb(f, size, size)[None])[0], 513, 513) for f in frames]
                        x = resize_rgb(frames[0], size, size)[None]
                        times = _timed(seg, x, calls=max(3, job.cfg.repeats))
                    finally:
                        seg.close()
                    reference = out if reference is None else reference  # float, 513, as exported: first
                    rows.append({"model": name, "int8": int8, "argmax_first": lowres, "size": size,
                                 "ms_per_frame": 1000 * statistics.median(times),
                                 "label_agreement": float(np.mean([(a == b).mean() for a, b in zip(out, reference)]))})
    return {"frames": len(frames), "rows": rows}


class _PassSource:
    """Decoded frames straight to the encoder (the identity model): no colour conversion."""

    def __init__(self, path: Path) -> None:
        from segsynth.stream.io import demux

        self.container = demux.open_video(path)
        self.video, self.audio = self.container.streams.video[0], list(self.container.streams.audio)
        self.video.thread_type = "AUTO"
        self.problems: list[str] = []

    def frames(self, stop, audio):
        import av

        from segsynth.stream.io import demux

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
        from segsynth.stream.io import mux, streams
        from segsynth.stream.io.sources import SourceInfo

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
    import shutil

    from segsynth.stream.pipeline import Pipeline

    src = job.input
    n = job.results.get("frames") or _count_frames(src)
    ours, theirs = [], []
    ffmpeg = shutil.which("ffmpeg")
    for _ in range(job.cfg.repeats):
        start = time.perf_counter()  # like the ffmpeg CLI's time: opening and closing files included
        source = _PassSource(src)
        try:
            sink = _PassSink(source, job.cfg.workdir / "pass-segsynth.mp4")
        except BaseException:
            source.close()
            raise
        Pipeline(source, lambda frames, metas: [None] * len(metas), sink, model_shape=(1, 1, 3)).run()
        ours.append(time.perf_counter() - start)
        if ffmpeg:
            rate = round(float(source.video.average_rate or 30))
            cmd = [ffmpeg, "-v", "error", "-y", "-i", str(src), "-map", "0:v:0", "-map", "0:a?", "-c:v", "libx264",
                   "-preset", "veryfast", "-crf", "20", "-bf", "0", "-g", str(2 * rate), "-pix_fmt", "yuv420p",
                   "-c:a", "copy", "-movflags", "frag_keyframe+empty_moov+default_base_moof", "-frag_duration",
                   "1000000", str(job.cfg.workdir / "pass-ffmpeg.mp4")]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
            theirs.append(time.perf_counter() - start)
    out = {"frames": n, "segsynth_fps": _median_rate(ours, n)}
    if theirs:
        out["ffmpeg_fps"] = _median_rate(theirs, n)
        out["ratios"] = {"passthrough_over_ffmpeg": out["segsynth_fps"] / out["ffmpeg_fps"]}
    else:
        out["note"] = "no ffmpeg CLI on PATH: no comparison"
    return out


def _count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(1 for p in c.demux(c.streams.video[0]) if p.size)


def _pictures(job: Job, count: int = 250) -> list[np.ndarray]:
    """Up to ``count`` full-size frames of the input, for synthetic (in-memory) sources."""
    import av

    with av.open(str(job.input)) as c:
        out = []
        for frame in c.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == count:
                break
    return out


def _session(job: Job, source, sink, policy: str, ring_slots: int = 8, progress=None):
    from segsynth.core.config import StreamConfig
    from segsynth.stream.session import StreamSession

    cfg = StreamConfig(source="synthetic", sinks=("memory.mkv",), view=job.view, policy=policy,
                       ring_slots=ring_slots, legend=False)
    return StreamSession(cfg, job.models, source=source, sinks=[sink], progress=progress)


def streams(job: Job) -> dict:
    """1..N concurrent live streams (latest policy) from a synthetic real-time source, all over
    one ModelSet: per-stream fps, end-to-end latency percentiles and drops, for each count."""
    from segsynth.stream.io.sinks import MemorySink
    from segsynth.stream.io.sources import SyntheticSource

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
        row = {"streams": n, "fps_per_stream": statistics.mean(s["fps"] for s in stats),
               "dropped_per_stream": statistics.mean(s["dropped"] for s in stats),
               "p50_ms": _pct(latencies, 50), "p95_ms": _pct(latencies, 95), "p99_ms": _pct(latencies, 99)}
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
    from segsynth.stream.io.sinks import MemorySink
    from segsynth.stream.io.sources import SyntheticSource

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
    p99_first, p99_last = _pct(first, 99), _pct(last, 99)
    return {"seconds": seconds, "window_s": third, "frames_out": stats["frames_out"], "dropped": stats["dropped"],
            "fps": stats["frames_out"] / seconds, "model_slower": stats["frames_in"] > stats["frames_out"] * 1.05
            or stats["frames_out"] / seconds < 0.95 * job.cfg.rate,
            "p99_first_ms": p99_first, "p99_last_ms": p99_last, "p99_last_over_first": p99_last / p99_first}


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


def soak(job: Job) -> dict:
    """RSS while one stream session runs ``frames`` frames (the input's pictures, repeated, from
    memory, into an in-memory encoder): at 10 % of the run and at the end."""
    from segsynth.stream.io.sinks import MemorySink
    from segsynth.stream.io.sources import SyntheticSource

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
    out = {"frames": stats["frames_out"], "fps": stats["fps"], "rss_mib": probe.samples, "rss_at_10pct_mib": early,
           "rss_at_end_mib": late}
    if early and late:
        out["ratios"] = {"soak_rss_end_over_10pct": late / early}
    return out


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
    from segsynth.serve.service import Service

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
    frames = sum(s.stats()["frames_out"] for s in svc.sessions.values())
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


def _chain_batches(runner, feed: dict, buffered: bool, min_batches: int, min_s: float = 1.0,
                   max_s: float = 30.0) -> tuple[int, float, str]:
    """Run ``feed`` through ``runner`` one batch at a time or double-buffered (batch k+1
    submitted before batch k is collected) until at least ``min_batches`` and ``min_s`` have
    run, stopping at ``max_s`` (slow CPUs) or 100 x ``min_batches``. Returns (batches, seconds,
    clock): seconds on the runner's device clock where it has one (CUDA events: the last
    batch's end minus the first one's start), else by wall clock."""
    handles = []
    start = time.perf_counter()

    def more() -> bool:
        elapsed = time.perf_counter() - start
        return (elapsed < max_s and len(handles) < 100 * min_batches
                and (len(handles) < min_batches or elapsed < min_s))

    if buffered:
        pending = runner.submit(feed)
        while pending is not None:
            handles.append(pending)
            nxt = runner.submit(feed) if more() else None
            runner.wait(pending)
            pending = nxt
    else:
        while more():
            handles.append(runner.submit(feed))
            runner.wait(handles[-1])
    wall = time.perf_counter() - start
    first, last = runner.device_span(handles[0]), runner.device_span(handles[-1])
    if first is None or last is None:
        return len(handles), wall, "wall"
    return len(handles), (last[1] - first[0]) / 1000, "cuda-events"


def _fp32_name(runner) -> str:
    """What an FP32 run computes in: GPU backends use TF32 for convolutions by default
    (TensorRT's TF32 builder flag, torch's cudnn.allow_tf32, onnxruntime CUDA's use_tf32)."""
    from segsynth.engine.select import GPU_BACKENDS

    if runner.name not in GPU_BACKENDS:  # CPU, or onnxruntime-cuda fallen back to the CPU
        return "fp32"
    if runner.name == "torch-cuda":
        import torch

        return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return "tf32"


def chain(job: Job) -> dict:
    """The fused chain graph (uint8 frames + remap -> uint8 frames; a torchvision
    DeepLabV3-MobileNetV3 and a SPADE generator, random weights: speed does not depend on
    them) on the chosen backend: fps and ms per batch for each batch size, FP16 vs the
    backend's FP32 (TF32 on GPU backends: the rows say "tf32"), double-buffered vs one at a
    time. Timed by CUDA events where the runner has a device clock ("clock": "cuda-events"),
    else by wall clock ("wall"); at least max(20, 2 x repeats) batches and 1 s per row, after
    a warm-up of each of the runner's two streams."""
    import torch

    from segsynth.core.config import ExportConfig
    from segsynth.engine.select import make_runner
    from segsynth.jobs.export import run_export
    from segsynth.export.deeplab import TVDeepLabV3
    from segsynth.export.spade import SPADEGenerator, SpadeOptions, write_opt_txt

    d = job.cfg.workdir / "chain"
    (d / "spade").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(TVDeepLabV3("mobilenet_v3_large", 21, aux=False).state_dict(), d / "deeplab.pth")
    opt = SpadeOptions(label_nc=182, contain_dontcare_label=True, no_instance=True, ngf=32, crop_size=256,
                       aspect_ratio=2.0, norm_G="spectralspadesyncbatch3x3")
    torch.save(SPADEGenerator(opt).state_dict(), d / "spade" / "latest_net_G.pth")
    write_opt_txt(opt, d / "spade" / "opt.txt")
    w, h = job.cfg.chain_size
    onnx_path = d / "chain.onnx"
    run_export(ExportConfig(what="chain", out=onnx_path, checkpoint=d / "spade", deeplab=d / "deeplab.pth",
                            size=(h, w), seg_size=(h, w), batch=None))
    backend = job.models.backend
    precisions = (False, True) if backend != "onnxruntime" else (False,)
    min_batches = max(20, 2 * job.cfg.repeats)
    rows = []
    for fp16 in precisions:
        with make_runner(onnx_path, backend, fp16=fp16, threads=job.cfg.threads,
                         batch=(1, max(job.cfg.batch), max(job.cfg.batch))) as runner:
            precision = "fp16" if fp16 else _fp32_name(runner)
            allocate = runner.pinned_allocator() or np.empty
            for batch in job.cfg.batch:
                frames = allocate((batch, h, w, 3), np.uint8)  # page-locked on GPU backends
                frames[:] = np.random.default_rng(0).integers(0, 255, frames.shape, dtype=np.uint8)
                feed = {"frames": frames, "remap": np.arange(256, dtype=np.uint8)}
                for _ in range(2):  # warm-up: first use of each of the runner's two streams
                    runner.infer(feed)
                for buffered in (False, True):
                    n, seconds, clock = _chain_batches(runner, feed, buffered, min_batches)
                    rows.append({"precision": precision, "batch": batch, "double_buffered": buffered,
                                 "fps": n * batch / seconds, "ms_per_batch": 1000 * seconds / n, "batches": n,
                                 "clock": clock})
    out = {"backend": backend, "frame_size": f"{w}x{h}", "rows": rows}
    best = {}
    for r in rows:
        best[r["precision"]] = max(best.get(r["precision"], 0), r["fps"])
    full = next((p for p in best if p != "fp16"), None)
    if "fp16" in best and full:
        out["ratios"] = {f"fp16_over_{full}": best["fp16"] / best[full]}
    return out
