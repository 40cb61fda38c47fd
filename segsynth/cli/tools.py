from __future__ import annotations

import argparse
import logging
from pathlib import Path

from segsynth.cli.common import add_backend, add_cache_dir, add_generator, tier
from segsynth.core import labels, paths
from segsynth.core.errors import InputError, ModelError, SegsynthError
from segsynth.core.grammar import parse_size

log = logging.getLogger("segsynth")


def _bench(args: argparse.Namespace) -> int:
    # imported here: the benchmarks load every stage
    from segsynth.benchmarks.bench import plot, run_bench, write_json
    from segsynth.benchmarks.scenarios import DEFAULT_SCENARIOS, BenchConfig

    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise SegsynthError(f"--batch {args.batch!r}: expected a comma-separated list, e.g. 1,4,8") from None
    cfg = BenchConfig(scenarios=tuple(args.scenarios) or DEFAULT_SCENARIOS, size=parse_size(args.size),
                      frames=args.frames, batch=batches, streams=args.streams, repeats=args.repeats, rate=args.rate,
                      segmenter=args.segmenter, generator=args.generator, threads=args.threads,
                      input=Path(args.input) if args.input else None, backend=args.backend, fp16=not args.fp32,
                      real_input=Path(args.real_input) if args.real_input else None,
                      fused=args.fused, live_seconds=args.live_seconds, models=tier(args, False),
                      seg_size=args.seg_size)
    if cfg.frames < 10 or cfg.repeats < 1 or cfg.streams < 1 or min(batches) < 1:
        raise SegsynthError("--frames must be >= 10, --repeats, --streams and --batch >= 1")
    report = run_bench(cfg)
    if args.json:
        write_json(report, Path(args.json))
        log.info("wrote %s", args.json)
    if args.plot:
        plot(report, Path(args.plot))
        log.info("wrote %s", args.plot)
    return 0


def _engine(args: argparse.Namespace) -> int:
    # imported here: jobs load av and onnxruntime (1 s): --help stays fast
    from segsynth.engine import commands

    root = paths.cache_dir(args.cache_dir)  # engines live in ROOT/engines, as for run and bench
    if args.action == "build":
        if not args.onnx:
            raise SegsynthError("engine build needs --onnx FILE.onnx")
        lo, _, hi = args.batch.partition("..")
        try:
            batch = (int(lo), int(hi), int(hi)) if hi else (1, int(lo), int(lo))  # tuned for the largest batch
        except ValueError:
            raise SegsynthError(f"--batch {args.batch!r}: expected N or MIN..MAX, e.g. 1..8") from None
        log.info("%s", commands.build(Path(args.onnx), fp16=not args.fp32, batch=batch, cache_dir=root / "engines"))
    elif args.action == "check":
        if not args.files:
            raise SegsynthError("engine check needs one or more FILE.onnx")
        # imported here: jobs load av and onnxruntime (1 s): --help stays fast
        from segsynth.engine.graphcheck import tensorrt_problems

        missing = [name for name in args.files if not Path(name).is_file()]
        if missing:
            raise InputError(f"{missing[0]}: no such ONNX file")
        failed = 0
        for name in args.files:
            try:
                problems = tensorrt_problems(Path(name))
            except ModelError as exc:
                raise ModelError(f"{name}: {exc}") from exc
            failed += bool(problems)
            print(f"{name}: " + ("TensorRT-parsable" if not problems else f"{len(problems)} problem(s) for TensorRT"))
            print("".join(f"  {p}\n" for p in problems), end="")
        return 1 if failed else 0
    elif args.action == "info":
        if len(args.files) != 1:
            raise SegsynthError("engine info needs one FILE (.onnx or .engine)")
        print("\n".join(commands.info(Path(args.files[0]))))
    else:
        if len(args.files) != 2:
            raise SegsynthError("engine compare needs two files, A and B")
        report = commands.compare(Path(args.files[0]), Path(args.files[1]), backend_a=args.backend_a,
                                  backend_b=args.backend_b, fp16_a=args.fp16_a, fp16_b=args.fp16_b,
                                  batch=int(args.batch.partition("..")[0]),
                                  inputs_file=Path(args.inputs) if args.inputs else None, cache_dir=root)
        for name, entry in report.items():
            print(f"{name}: " + ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()))
    return 0


def _labels(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name in labels.LABEL_SETS:
            print(f"{name}\t{len(labels.get(name))} classes")
    elif args.action == "show":
        ls = labels.get(args.sets[0] if args.sets else "ade20k")
        for i, cls in enumerate(ls.classes):
            print(f"{i}\t{cls}")
        print(f"{labels.UNKNOWN}\tunknown")
    else:
        if len(args.sets) != 2:
            raise SegsynthError("labels map needs two label sets, e.g. segsynth labels map voc ade20k")
        src, dst = labels.get(args.sets[0]), labels.get(args.sets[1])
        lut = labels.mapping(src, dst)
        for i, cls in enumerate(src.classes):
            print(f"{i}\t{cls}\t->\t{lut[i]}\t{dst.name_of(lut[i])}")
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench", parents=[common], help="measure fps, latency and scaling, side by side",
                       description="Scenarios: engine (model only), stages (decode/infer/encode alone), pipeline "
                                   "(threaded vs sequential vs infer alone), fused (the models as one graph vs one by one), "
                                   "passthrough (vs the ffmpeg CLI), streams "
                                   "(N live streams), soak (memory over time); chain (the fused graph, FP16 vs TF32 on "
                                   "GPUs, CUDA-event timed, double-buffered; needs torch), service, transcode (a folder "
                                   "of clips, --jobs 1 vs 2), tiers (--models quality vs fast), cpu-efficiency (FLOPs "
                                   "and share of the CPU's peak), seg-sizes (each --seg-size) and incremental "
                                   "(--incremental on vs off on still, partly moving and panning clips) only when "
                                   "named. "
                                   "Ratios come from one run.",
                       epilog="example: segsynth bench tiers --input examples/demo.mp4 --size 640x360 --json tiers.json")
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help="default: all but chain, service, transcode, tiers, cpu-efficiency, seg-sizes, incremental")
    p.add_argument("--size", default="1280x720", metavar="WxH", help="generated input size")
    p.add_argument("--rate", type=int, default=30, help="generated input / live source fps")
    p.add_argument("--frames", type=int, default=300, help="frames per measurement (soak: in all)")
    p.add_argument("--batch", default="1", metavar="1,4,8", help="batch sizes (engine); the first is used elsewhere")
    p.add_argument("--streams", type=int, default=2, help="most concurrent live streams")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement; medians are reported")
    p.add_argument("--input", help="a video to use instead of the generated one")
    p.add_argument("--real-input", metavar="VIDEO", help="tiers: a clip of real footage (people), measured beside "
                                                         "--input (a cartoon, say) in the same run")
    p.add_argument("--live-seconds", type=float, default=180, metavar="S",
                   help="streams: run one live stream S seconds per policy and compare the latency p99 of the first "
                   "and last third (default 180; 0 skips)")
    p.add_argument("--segmenter", default="ade20k+voc", metavar="NAME|FILE.onnx", help="the segmenter")
    add_generator(p)
    p.add_argument("--threads", type=int, help="inference threads (default: all cores)")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="plot fps vs streams and latency histograms")
    add_backend(p)
    p.set_defaults(func=_bench)
    p = sub.add_parser("engine", parents=[common], help="build, inspect and compare inference engines",
                       description="build --onnx X.onnx: a TensorRT engine in the cache; info FILE: bindings, shapes, "
                                   "precision, GPU; compare A B: outputs side by side (e.g. FP16 vs FP32); check "
                                   "FILE...: whether TensorRT's ONNX parser takes each graph (on the CPU, no TensorRT "
                                   "needed; exit 1 when one does not).",
                       epilog="example: segsynth engine check segsynth/models/student_ade20k.onnx")
    p.add_argument("action", choices=["build", "info", "compare", "check"], help="what to do")
    p.add_argument("files", nargs="*", help="info: FILE; compare: A B; check: FILE... (ONNX files)")
    p.add_argument("--onnx", help="build: the ONNX graph")
    p.add_argument("--fp32", action="store_true", help="build: FP32 instead of FP16")
    p.add_argument("--batch", default="1..8", help="build: batch range MIN..MAX; compare: batch")
    p.add_argument("--backend-a", default="onnxruntime", help="compare: the backend that runs A")
    p.add_argument("--backend-b", default="auto", help="compare: the backend that runs B")
    p.add_argument("--fp16-a", action="store_true", help="compare: run A in FP16 (GPU backends)")
    p.add_argument("--fp16-b", action="store_true", help="compare: run B in FP16 (GPU backends)")
    p.add_argument("--inputs", metavar="FILE.npz", help="compare: inputs by name (default: random ones)")
    add_cache_dir(p, "segsynth cache; engines go in its engines/")
    p.set_defaults(func=_engine)
    p = sub.add_parser("labels", parents=[common], help="list label sets, their classes and mappings",
                       description="Inspect label sets: list (the default), show SET, map SRC DST.",
                       epilog="example: segsynth labels show ade20k")
    p.add_argument("action", nargs="?", default="list", choices=["list", "show", "map"], help="what to show")
    p.add_argument("sets", nargs="*", help="label set names (ade20k, voc, coco-stuff, cityscapes)")
    p.set_defaults(func=_labels)
