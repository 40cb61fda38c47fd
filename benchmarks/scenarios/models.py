"""Scenarios of the models: engine alone, fused vs one by one, the tiers, CPU efficiency (FLOPs), segmenter sizes, and the fused chain on GPUs."""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from segsynth.benchmarks.scenarios.common import Job, median_rate, percentile, timed
from segsynth.benchmarks.scenarios.media import decode_all, job_sink, job_source, shows_input
from segsynth.core.config import ExportConfig
from segsynth.core.grammar import FAST_SEG_SIZE, GPU_BACKENDS, SEG_SIZES
from segsynth.engine.select import make_runner, open_runner
from segsynth.jobs.models import load_models
from segsynth.stream.infer import chain as chains
from segsynth.stream.infer.generator import bundled_generator
from segsynth.stream.infer.segmenter import OnnxSegmenter, bundled_model, reshaped
from segsynth.stream.infer.synth import Synthesize
from segsynth.stream.pictures import resize_labels, resize_rgb
from segsynth.stream.pipeline import Pipeline

log = logging.getLogger("segsynth")


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
            lat = timed(fn, x, calls=job.cfg.repeats, seconds=max(2.0, 0.2 * job.cfg.repeats))
            rows.append({"model": name, "batch": batch, "fps": batch / statistics.median(lat),
                         "p50_ms": percentile(lat, 50) * 1000, "p95_ms": percentile(lat, 95) * 1000})
    return {"rows": rows}


def fused(job: Job) -> dict:
    """The infer step over the same decoded frames with the models fused into one graph
    (stream.chain: uint8 frames in, labels and pictures out) and with the models one by one,
    alternating in one run; and how far their results differ (GPU FP16 may differ a little)."""

    m = job.models
    graph = m.fused("all") or chains.load_chain(m.segmenter, m.generator, backend=m.backend, cache_dir=job.cfg.workdir,
                                               fp16=m.config.fp16, threads=m.config.threads, batch=max(job.cfg.batch))
    try:
        gen = m.generator
        steps = {name: Synthesize(m.segmenter, gen, m.remap(None), m.z(quiet=True), "off", m.fit(None),
                                  gen.size if gen is not None else None, chains={"all": c})
                 for name, c in (("fused", graph), ("separate", None))}
        frames, metas = decode_all(job)
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
    fps = {name: median_rate(t, n) for name, t in times.items()}
    a, b = results["fused"], results["separate"]
    agreement = float(np.mean([(x.labels == y.labels).mean() for x, y in zip(a, b)]))
    pixels = max((int(np.abs(x.synth.astype(int) - y.synth).max()) for x, y in zip(a, b) if x.synth is not None),
                 default=0)
    return {"frames": n, "backend": graph.runner.name, "fused_fps": fps["fused"], "separate_fps": fps["separate"],
            "label_agreement": agreement, "pixels_max_abs_diff": pixels,
            "ratios": {"fused_over_separate": fps["fused"] / fps["separate"]}}


def tiers(job: Job) -> dict:
    """``--models quality`` vs ``--models fast`` in one run, on the bench's input and (with
    ``real_input``) on a clip of real footage too: each tier's whole pipeline (decode, infer,
    encode; the bench's view) over the same input, alternating; how far fast's results are from
    quality's on every frame (label agreement on the frame's grid, the picture's PSNR); per tier,
    ``synth_over_labels`` (the synth view's fps over the labels view's with no generator loaded,
    same input) and the generator's GFLOP and ms per frame alone."""
    first = job.models.config
    other = replace(first, models="fast" if first.models == "quality" else "quality", seg_size=None)
    with load_models(other) as loaded:
        by_tier = {m.config.models: m for m in (job.models, loaded)}
        with load_models(replace(first, generator="none")) as plain, load_models(
                replace(other, generator="none")) as plain_other:
            labels_only = {m.config.models: m for m in (plain, plain_other)}
            out = _tiers_on(job, job.input, by_tier, labels_only)
            if job.cfg.real_input is not None:
                out["real"] = _tiers_on(job, job.cfg.real_input, by_tier, labels_only)
                out["ratios"]["fast_over_quality_real"] = out["real"]["ratios"]["fast_over_quality"]
        out["generator"] = {name: _generator_cost(m) for name, m in by_tier.items() if m.generator is not None}
    return out


def _tiers_on(job: Job, clip: Path, by_tier: dict, labels_only: dict) -> dict:
    jobs = {}
    for name, models in by_tier.items():
        jobs[name] = tier = Job(job.cfg, clip, models, None, job.view)
        tier.infer = tier.make_infer()
        if models.generator is not None:  # the labels view of the same tier, no generator loaded
            jobs[f"{name}-labels"] = plain = Job(job.cfg, clip, labels_only[name], None, "labels")
            plain.infer = plain.make_infer()
    times = {name: [] for name in jobs}
    for _ in range(job.cfg.repeats):
        for name, tier in jobs.items():
            source = job_source(tier, shows_input(tier))
            w, h = tier.models.size
            start = time.perf_counter()
            Pipeline(source, tier.infer, job_sink(source, job.cfg.workdir / f"tiers-{name}.mp4"),
                     model_shape=(h, w, 3), batch=job.cfg.batch[0], render=tier.render).run()
            times[name].append(time.perf_counter() - start)
    results = {}
    for name in by_tier:
        frames, metas = decode_all(jobs[name])
        results[name] = [jobs[name].infer(f[None], [m])[0] for f, m in zip(frames, metas)]
        n, size = len(frames), metas[0]["size"]
    fps = {name: median_rate(t, n) for name, t in times.items()}
    q, f = results["quality"], results["fast"]
    agreement = float(np.mean([(resize_labels(a.labels, *size) == resize_labels(b.labels, *size)).mean()
                               for a, b in zip(q, f)]))
    out = {"input": clip.name, "frames": n, "quality_fps": fps["quality"], "fast_fps": fps["fast"],
           "label_agreement": agreement, "fast_seg_size": jobs["fast"].models.size[0],
           "ratios": {"fast_over_quality": fps["fast"] / fps["quality"]}}
    if "quality-labels" in fps:
        out["labels_fps"] = {name: fps[f"{name}-labels"] for name in by_tier}
        out["synth_over_labels"] = {name: fps[name] / fps[f"{name}-labels"] for name in by_tier}
    if q[0].synth is not None:
        mse = float(np.mean([np.mean((a.synth.astype(np.float64) - b.synth) ** 2) for a, b in zip(q, f)]))
        out["synth_psnr_db"] = float(10 * np.log10(255 ** 2 / max(mse, 1e-12)))
    return out


def _generator_cost(models) -> dict:
    """A generator's GFLOP (its graph's convolutions and matrix products) and ms per frame alone."""
    gen = models.generator
    w, h = gen.size
    ids = np.random.default_rng(0).integers(0, 150, (1, h, w)).astype(np.uint8)
    z = models.z(seed=0, quiet=True)
    gen(ids, z)  # warm
    times = timed(gen, ids, z, calls=5, seconds=1.0)
    return {"gflop": graph_flops(gen.path) / 1e9, "ms_per_frame": 1000 * statistics.median(times),
            "graph": Path(gen.path).name}


def graph_flops(path: Path) -> float:
    """Multiply-adds x 2 of one frame through a graph's Conv, MatMul and Gemm nodes (batch 1,
    shapes inferred); what the rest does (activations, resizes, argmax) is not counted."""

    model = onnx.load(str(path))
    del model.graph.value_info[:]  # shapes an exporter stored with a symbolic batch: inferred again at batch 1
    for value in model.graph.input:
        dim = value.type.tensor_type.shape.dim
        if dim and not dim[0].dim_value:
            dim[0].dim_value = 1
    # onnxruntime's symbolic inference follows sizes computed in the graph (SPADE's Resize of the
    # label map to each block), which onnx's own leaves unknown
    model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = {v.name: [d.dim_value or (1 if i == 0 else 0) for i, d in enumerate(v.type.tensor_type.shape.dim)]
              for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}  # an unknown batch: 1
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

    n = 2048
    a, b = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    a @ b  # warm-up
    fp32 = 2 * n ** 3 / min(timed(np.matmul, a, b, calls=5)) / 1e9
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
    int8 = 2 * n ** 3 / min(timed(sess.run, None, feed, calls=5)) / 1e9
    return {"fp32_gflops": fp32, "int8_gops": int8, "matmul_size": n}


def cpu_efficiency(job: Job) -> dict:
    """For each bundled model, float and int8: Conv/MatMul FLOPs per frame (from the graph), the
    time per frame alone (batch 1), the GFLOP/s that makes, and the share of this machine's
    peak measured in the same run (fp32 matmul for float graphs, int8 matmul for int8 ones)."""

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
            times = timed(runner.infer, feed, calls=3, seconds=max(2.0, 0.5 * job.cfg.repeats))
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

    source = job_source(job, True)
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
                        times = timed(seg, x, calls=max(3, job.cfg.repeats))
                    finally:
                        seg.close()
                    reference = out if reference is None else reference  # float, 513, as exported: first
                    rows.append({"model": name, "int8": int8, "argmax_first": lowres, "size": size,
                                 "ms_per_frame": 1000 * statistics.median(times),
                                 "label_agreement": float(np.mean([(a == b).mean() for a, b in zip(out, reference)]))})
    return {"frames": len(frames), "rows": rows}


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

    if runner.name not in GPU_BACKENDS:  # CPU, or onnxruntime-cuda fallen back to the CPU
        return "fp32"
    if runner.name == "torch-cuda":
        # imported here: torch is the export extra (the chain scenario only)
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
    # imported here: torch is the export extra (the chain scenario only)
    import torch

    # imported here: the export stage needs torch
    from segsynth.export.deeplab import TVDeepLabV3
    from segsynth.export.spade import SPADEGenerator, SpadeOptions, write_opt_txt
    from segsynth.jobs.export import run_export

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
