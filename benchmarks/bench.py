"""Running scenarios and reporting them.

JSON output (``--json``), stable and documented in benchmarks/RESULTS.md::

    {"version": 1, "machine": {...}, "config": {...},
     "scenarios": {"engine": {...}, "stages": {...}, "pipeline": {...}, ...},
     "ratios": {"pipeline_over_infer": ..., "passthrough_over_ffmpeg": ..., ...}}
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from segsynth.benchmarks import inputs, machine, scenarios, tiny
from segsynth.benchmarks.scenarios import BenchConfig, Job
from segsynth.core.config import ModelConfig
from segsynth.core.errors import InputError
from segsynth.jobs.models import load_models

log = logging.getLogger("segsynth")


def _make_job(cfg: BenchConfig, source: Path) -> Job:
    segmenter = str(tiny.segmenter(cfg.workdir / "tiny-segmenter.onnx")) if cfg.segmenter == "tiny" else cfg.segmenter
    models = load_models(ModelConfig(segmenter, cfg.generator, threads=cfg.threads, backend=cfg.backend, fp16=cfg.fp16,
                                     batch=max(cfg.batch), fused=cfg.fused, models=cfg.models, seg_size=cfg.seg_size))
    job = Job(cfg, source, models, None, "synth" if models.generator is not None else "labels")
    job.infer = job.make_infer()
    return job


def run_bench(cfg: BenchConfig) -> dict:
    unknown = [s for s in cfg.scenarios if s not in scenarios.SCENARIOS]
    if unknown:
        raise InputError(f"unknown scenario {unknown[0]!r}; choose from: {', '.join(scenarios.SCENARIOS)}")
    with tempfile.TemporaryDirectory(prefix="segsynth-bench-") as tmp:
        cfg = replace(cfg, workdir=Path(tmp))
        w, h = cfg.size
        frames = cfg.frames if set(cfg.scenarios) - {"soak"} else min(cfg.frames, 250)  # soak repeats them
        source = cfg.input or inputs.generate(Path(tmp) / f"testsrc2_{w}x{h}_{cfg.rate}.mp4", size=cfg.size,
                                              rate=cfg.rate, frames=frames)
        info = machine.describe()
        log.info("machine: %s", machine.one_line(info))
        log.info("input: %s; segmenter %s, generator %s", source.name if cfg.input else
                 f"lavfi testsrc2 {w}x{h}@{cfg.rate} + sine, {frames} frames", cfg.segmenter, cfg.generator)
        job = _make_job(cfg, source)
        report = {"version": 1, "machine": info, "config": {k: str(v) if isinstance(v, Path) else v
                                                           for k, v in asdict(cfg).items() if k != "workdir"},
                  "scenarios": {}, "ratios": {}}
        try:
            for name in cfg.scenarios:
                log.info("running %s ...", name)
                result = scenarios.RUN[name](job)
                report["scenarios"][name] = result
                report["ratios"].update(result.get("ratios", {}))
                _print(name, result)
        finally:
            job.models.close()
        _derived_ratios(report)
        report["latency_samples"] = {str(k): v for k, v in job.results.get("latency_samples", {}).items()}
        if report["ratios"]:
            log.info("ratios (same run): %s", ", ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()))
    return report


def _derived_ratios(report: dict) -> None:
    """Ratios between scenarios of the same run: end-to-end pipeline vs the models alone, and
    how the latency of a live stream drifts under each policy."""
    for policy, d in report["scenarios"].get("streams", {}).get("live", {}).items():
        report["ratios"][f"live_{policy}_p99_last_over_first"] = d["p99_last_over_first"]
    engine, pipeline = report["scenarios"].get("engine"), report["scenarios"].get("pipeline")
    if engine and pipeline:
        batch = report["config"]["batch"][0]
        per_frame = sum(1 / r["fps"] for r in engine["rows"] if r["batch"] == batch)
        if per_frame:
            report["ratios"]["e2e_over_engine"] = pipeline["pipelined_fps"] * per_frame


def _print(name: str, result: dict) -> None:
    if name == "engine":
        for r in result["rows"]:
            log.info("  %-9s batch %-2d %7.2f fps   p50 %7.1f ms   p95 %7.1f ms", r["model"], r["batch"], r["fps"],
                     r["p50_ms"], r["p95_ms"])
    elif name == "streams":
        for r in result["rows"]:
            log.info("  %2d streams: %5.2f fps/stream, %5.1f dropped/stream, latency p50 %6.0f p95 %6.0f p99 %6.0f ms%s",
                     r["streams"], r["fps_per_stream"], r["dropped_per_stream"], r["p50_ms"], r["p95_ms"],
                     r["p99_ms"], "  (real time)" if r["real_time"] else "")
        for policy, d in result.get("live", {}).items():
            log.info("  live %-8s %3.0f s, model %s the %d fps source: %5.2f fps out, %5d dropped, "
                     "latency p99 first %.0f s %6.0f ms, last %.0f s %6.0f ms: ratio %.2f", policy, d["seconds"],
                     "slower than" if d["model_slower"] else "keeps up with", result["rate"], d["fps"], d["dropped"], d["window_s"], d["p99_first_ms"], d["window_s"],
                     d["p99_last_ms"], d["p99_last_over_first"])
    elif name == "chain":
        for r in result["rows"]:
            log.info("  %s batch %-2d %-16s %7.2f fps", r["precision"], r["batch"],
                     "double-buffered" if r["double_buffered"] else "one at a time", r["fps"])
    elif name == "incremental" and "clips" in result:
        for clip, r in result["clips"].items():
            log.info("  %-11s incremental %.2f fps, full %.2f fps: %.2fx; PSNR %.1f dB; segmented %.0f %%, "
                     "painted %.0f %%", clip, r["fps_on"], r["fps_off"], r["on_over_off"], r["psnr_db"], 100 * r["segmented"],
                     100 * r["painted"])
    elif name == "seg-sizes":
        for r in result["rows"]:
            log.info("  %-6s %-4s %-13s %d: %6.1f ms, labels %.4f of float 513's", r["model"],
                     "int8" if r["int8"] else "fp32", "argmax first" if r["argmax_first"] else "as exported",
                     r["size"], r["ms_per_frame"], r["label_agreement"])
    elif name == "cpu-efficiency":
        p = result["peak"]
        log.info("  peak (%d threads, %d^3 matmul): fp32 %.1f GFLOP/s (numpy BLAS), int8 %.1f GOP/s (onnxruntime "
                 "MatMulInteger)", result["threads"], p["matmul_size"], p["fp32_gflops"], p["int8_gops"])
        for r in result["rows"]:
            log.info("  %-16s %6.2f GFLOP/frame %7.1f ms  %6.1f GFLOP/s  %5.1f %% of peak", r["model"],
                     r["gflops_per_frame"], r["ms_per_frame"], r["gflops_per_s"], r["percent_of_peak"])
    elif name == "transcode":
        for r in result["rows"]:
            log.info("  --jobs %d: %d files, %d frames in %.1f s: %.2f files/min, %.2f frames/s; per file: models "
                     "loaded %.2f s (in %d workers), first frame %.2f s", r["jobs"], r["files"], r["frames"],
                     r["seconds"], r["files_per_minute"], r["fps"], r["model_load_s"], r["workers_loading"],
                     r["first_frame_s"])
    elif name == "service":
        log.info("  %d streams (%s, 1 fps): RSS %.1f -> %.1f MiB (%.2f MiB per stream; %.1f after removal, %.1f after "
                 "a second round), CPU idle %.3f cores, %.3f cores per stream", result["streams"], result["size"], result["rss_before_mib"],
                 result["rss_with_streams_mib"], result["rss_per_stream_mib"], result["rss_after_removal_mib"],
                 result["rss_after_second_round_mib"],
                 result["cpu_cores_idle_service"], result["cpu_cores_per_stream"])
    elif name == "tiers":
        for clip in (result, result.get("real")):
            if clip is None:
                continue
            log.info("  %s (%d frames): quality %.2f fps, fast %.2f fps (seg size %d): %.2fx; labels agree %.3f; "
                     "picture %.1f dB", clip["input"], clip["frames"], clip["quality_fps"], clip["fast_fps"],
                     clip["fast_seg_size"], clip["ratios"]["fast_over_quality"], clip["label_agreement"],
                     clip.get("synth_psnr_db", float("nan")))
            for tier, ratio in clip.get("synth_over_labels", {}).items():
                log.info("    %-7s synth view %.2f fps / labels view %.2f fps (no generator): synth_over_labels %.2f",
                         tier, clip[f"{tier}_fps"], clip["labels_fps"][tier], ratio)
        for tier, g in result.get("generator", {}).items():
            log.info("  generator %-7s %s: %.2f GFLOP, %.1f ms a frame", tier, g["graph"], g["gflop"], g["ms_per_frame"])
    elif name == "soak":
        log.info("  %d frames at %.0f fps: RSS %.0f MiB at 10%%, %.0f MiB at the end", result["frames"], result["fps"],
                 result["rss_at_10pct_mib"] or 0, result["rss_at_end_mib"] or 0)
    else:
        log.info("  %s", ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in result.items() if k != "ratios"))


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps({k: v for k, v in report.items() if k != "latency_samples"}, indent=1) + "\n")


def plot(report: dict, path: Path) -> None:
    """fps per stream vs stream count, and the end-to-end latency histograms."""
    try:
        # imported here: matplotlib is a dev dependency (plots only)
        import matplotlib

        matplotlib.use("Agg")
        # imported here: matplotlib is a dev dependency (plots only)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError("--plot needs matplotlib (pip install matplotlib)") from exc
    streams = report["scenarios"].get("streams")
    if not streams:
        raise InputError("--plot draws the streams scenario; include it in the scenarios")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = streams["rows"]
    left.plot([r["streams"] for r in rows], [r["fps_per_stream"] for r in rows], "o-", label="fps per stream")
    left.axhline(streams["rate"], color="grey", linestyle="--", label=f"real time ({streams['rate']} fps)")
    left.set_xlabel("concurrent streams")
    left.set_ylabel("fps per stream")
    left.legend()
    for n, samples in report.get("latency_samples", {}).items():
        right.hist(samples, bins=40, alpha=0.5, label=f"{n} streams")
    right.set_xlabel("end-to-end latency (ms)")
    right.set_ylabel("frames")
    right.legend()
    fig.suptitle(machine.one_line(report["machine"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
