"""The ``segsynth`` command. Each subcommand builds a config dataclass from its arguments and
hands it to the stage that does the work; heavy modules are imported only by the command
that needs them, so ``segsynth --help`` stays instant and never imports torch."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from segsynth import __version__
from segsynth.errors import SegsynthError

log = logging.getLogger("segsynth")


def _cache_dir(flag: str | None):
    """--cache-dir, else $XDG_CACHE_HOME/segsynth, else ~/.cache/segsynth (read here, at the edge)."""
    import os
    from pathlib import Path

    if flag:
        return Path(flag)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segsynth"


def _segment(args: argparse.Namespace) -> int:
    from segsynth.config import SegmentConfig
    from segsynth.stream.segment import run_segment

    cfg = SegmentConfig(input=args.input, output=args.output, view=args.view, remap=args.remap,
                        segmenter=args.segmenter, label_set=args.label_set, threads=args.threads,
                        legend=not args.no_legend, crf=args.crf, preset=args.preset, backend=args.backend,
                        fp16=not args.fp32, fused=args.fused, stabilize=args.stabilize, models=_tier(args, False),
                        seg_size=args.seg_size)
    summary = run_segment(cfg, quiet=args.quiet)
    log.info("%s", summary.line(cfg))
    return 0


class _StopOnSignals:
    """SIGINT/SIGTERM while a session runs: the first drains it (finish what was read, flush,
    close), a second aborts it. The CLI owns the process's signals; sessions never touch them."""

    def __init__(self, session) -> None:
        self.session, self.signum, self._saved = session, None, {}

    def __enter__(self) -> "_StopOnSignals":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        import signal

        if self.signum is None:
            self.signum = signum
            log.warning("%s: stopping - finishing the frames already read (signal again to abort)",
                        signal.Signals(signum).name)
            self.session.stop(drain=True)
        else:
            self.session.stop(drain=False)

    def __exit__(self, *exc) -> None:
        import signal

        for signum, handler in self._saved.items():
            signal.signal(signum, handler)


def _picture_fields(args: argparse.Namespace) -> dict:
    """StreamConfig's fields of how frames are made and encoded (run and transcode share them)."""
    from pathlib import Path

    return dict(view=args.view, remap=args.remap, style=Path(args.style) if args.style else None, seed=args.seed,
                smooth=args.smooth, stabilize=args.stabilize, fit=args.fit, batch=args.batch, codec=args.codec,
                crf=args.crf, preset=args.preset, bitrate=args.bitrate, stream=args.stream, legend=not args.no_legend)


def _tier(args: argparse.Namespace, live: bool) -> str:
    """--models, or its default: fast for live sources on the CPU backend (near real time on a
    few cores), quality otherwise (files, GPUs)."""
    if args.models:
        return args.models
    if live and args.backend in ("auto", "onnxruntime"):
        from segsynth.engine.select import backend_candidates

        if args.backend == "onnxruntime" or backend_candidates()[0][0] == "onnxruntime":
            log.debug("live input on the CPU: --models fast (int8 graphs); --models quality for the float ones")
            return "fast"
    return "quality"


def _model_fields(args: argparse.Namespace, live: bool = False) -> dict:
    """ModelConfig's fields (run and transcode share them)."""
    from segsynth.config import parse_size

    return dict(segmenter=args.segmenter, generator=args.generator,
                size=parse_size(args.size, "--size", "WxH") if args.size else None, threads=args.threads,
                cache_dir=_cache_dir(args.cache_dir), backend=args.backend, fp16=not args.fp32, batch=args.batch,
                fused=args.fused, models=_tier(args, live), seg_size=args.seg_size)


def _run(args: argparse.Namespace) -> int:
    import signal

    from segsynth.config import ModelConfig, StreamConfig, parse_size
    from segsynth.errors import InputError, Interrupted, OutputError
    from segsynth.stream.run import run

    outputs = [*args.outputs, *(args.out or []), *([f"mjpeg://{args.preview}"] if args.preview else [])]
    if not outputs:
        raise InputError("run needs an output: run IN OUT [OUT ...], --out OUT or --preview HOST:PORT")
    cfg = StreamConfig(source=args.input, sinks=tuple(outputs), **_picture_fields(args), policy=args.policy,
                       fps=args.fps, max_frames=args.frames, duration=args.duration,
                       segment_time=args.segment_time, rtsp_transport=args.rtsp_transport,
                       stall_timeout=args.stall_timeout, reconnect_max=args.reconnect_max,
                       camera_size=parse_size(args.camera_size, "--camera-size", "WxH") if args.camera_size else None,
                       camera_fps=args.camera_fps)
    from segsynth.stream.live import is_live

    models = ModelConfig(**_model_fields(args, live=is_live(args.input)))
    controls = []

    def control(session):
        controls.append(_StopOnSignals(session))
        return controls[0]

    stats, session = run(cfg, models, quiet=args.quiet, control=control, stats_json=args.stats_json)
    declared = session.source.info.declared_frames
    signum = controls[0].signum if controls else None
    if stats["problems"] and session.source.live:
        log.warning("warning: %s: %d problems, e.g. %s", cfg.source, len(stats["problems"]), stats["problems"][0])
    elif stats["problems"]:  # damage, or a video that ends before the time it declares
        of = f" of the {declared} it declares" if declared else ""
        first = f": {stats['problems'][0]}" if stats["problems"] else ""
        log.warning("warning: %s looks truncated or damaged: decoded %d frames%s and wrote them%s",
                    cfg.source, stats["frames_in"], of, first)
    failed = [out for out in stats.get("outputs", []) if not out["ok"]]
    written = [out["name"] for out in stats.get("outputs", []) if out["ok"]]
    log.info("wrote %s (%s): %d frames in, %d out, %d dropped, reconnects %d, %.1f s, %.2f fps",
             ", ".join(written) or "nothing", stats["view"], stats["frames_in"], stats["frames_out"], stats["dropped"],
             stats["reconnects"], stats["seconds"], stats["fps"])
    for out in stats.get("outputs", []):
        if not out["ok"] or out["reconnects"] or out["skipped"]:
            log.info("  output %s: %s, reconnects %d, %d frames skipped", out["name"],
                     "ok" if out["ok"] else f"FAILED ({out['error']}); what it recorded is kept", out["reconnects"],
                     out["skipped"])
    for name, t in stats["stages"].items():
        log.info("  %-7s mean %7.1f ms   p95 %7.1f ms", name, t["mean_ms"], t["p95_ms"])
    if stats["latency_ms"]:
        lat = stats["latency_ms"]
        log.info("  latency p50 %.0f ms, p95 %.0f ms, p99 %.0f ms (arrival to mux)", lat["p50"], lat["p95"],
                 lat["p99"])
    if signum is not None:
        raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} after {stats['frames_out']} frames; "
                                  "the output holds them and is closed")
    if failed:  # the others went on to the end; the run still failed
        raise OutputError(f"output {failed[0]['name']} failed: {failed[0]['error']}"
                          + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")
                          + (f"; {', '.join(written)} complete" if written else ""))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from segsynth.config import ModelConfig
    from segsynth.errors import InputError
    from segsynth.service import check_listen, serve
    from segsynth.stream.models import ModelSet

    import os

    token = os.environ.get("SEGSYNTH_TOKEN") or None  # read here, at the edge
    if args.token:
        log.warning("warning: --token is visible to every user of this machine in its process list; use "
                    "--token-file FILE or SEGSYNTH_TOKEN")
        token = args.token
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise InputError(f"--token-file {args.token_file}: {exc.strerror or exc}") from None
        if not token:
            raise InputError(f"--token-file {args.token_file}: the file is empty")
    if args.max_streams < 1 or args.max_outputs < 1:
        raise InputError("--max-streams and --max-outputs must be at least 1")
    check_listen(args.host, token)  # before any model loads
    if args.media_root and not Path(args.media_root).is_dir():
        raise InputError(f"--media-root {args.media_root}: not a directory")
    model_cfg = ModelConfig(segmenter=args.segmenter, generator=args.generator, threads=args.threads,
                            cache_dir=_cache_dir(args.cache_dir), backend=args.backend, fp16=not args.fp32,
                            fused=args.fused, models=_tier(args, True), seg_size=args.seg_size)
    with ModelSet.load(**vars(model_cfg)) as models:
        return serve(host=args.host, port=args.port, models=models, token=token,
                     config=Path(args.config) if args.config else None,
                     media_root=Path(args.media_root) if args.media_root else None,
                     protect_metrics=args.protect_metrics, grace=args.grace, max_streams=args.max_streams,
                     max_outputs=args.max_outputs)


def _devices(args: argparse.Namespace) -> int:
    from segsynth.stream.live import describe_cameras

    cameras = describe_cameras()
    if not cameras:
        print("no cameras found (no /dev/video* devices)")
    for device, name in cameras:
        print(f"{device}\t{name}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from segsynth.benchmarks.bench import plot, run_bench, write_json
    from segsynth.benchmarks.scenarios import DEFAULT_SCENARIOS, BenchConfig
    from segsynth.config import parse_size

    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise SegsynthError(f"--batch {args.batch!r}: expected a comma-separated list, e.g. 1,4,8") from None
    cfg = BenchConfig(scenarios=tuple(args.scenarios) or DEFAULT_SCENARIOS, size=parse_size(args.size, "--size", "WxH"),
                      frames=args.frames, batch=batches, streams=args.streams, repeats=args.repeats, rate=args.rate,
                      segmenter=args.segmenter, generator=args.generator, threads=args.threads,
                      input=Path(args.input) if args.input else None, backend=args.backend, fp16=not args.fp32,
                      fused=args.fused, live_seconds=args.live_seconds, models=_tier(args, False),
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


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from segsynth.config import ExportConfig, parse_batch, parse_overrides, parse_size

    def path(value):
        return Path(value) if value else None

    cfg = ExportConfig(
        what=args.what, out=Path(args.out), checkpoint=path(args.checkpoint), deeplab=path(args.deeplab),
        from_tflite=path(args.from_tflite), size=parse_size(args.size) if args.size else None,
        seg_size=parse_size(args.seg_size, "--seg-size"), batch=parse_batch(args.batch), argmax=args.argmax,
        label_set=args.label_set, epoch=args.epoch, overrides=parse_overrides(args.opt), model=path(args.model),
        calibrate=tuple(map(Path, args.calibrate or ())), frames=args.frames)
    from segsynth.export.commands import run_export

    log.info("%s", run_export(cfg))
    return 0


def _dataset(args: argparse.Namespace) -> int:
    from pathlib import Path

    from segsynth.config import parse_size
    from segsynth.stream.dataset import DatasetConfig, make_dataset

    cfg = DatasetConfig(inputs=tuple(Path(v) for v in args.inputs), out=Path(args.out), every=args.every,
                        size=parse_size(args.size, "--size", "WxH"), segmenter=args.segmenter, threads=args.threads,
                        crops_per_image=args.crops_per_image)
    manifest = make_dataset(cfg, quiet=args.quiet)
    log.info("wrote %s: %d image/label pairs (%s, %dx%d)", cfg.out, len(manifest["items"]), manifest["label_set"],
             *manifest["size"])
    return 0


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from segsynth.export.train import TrainConfig, train

    cfg = TrainConfig(data=Path(args.data), out=Path(args.out), config=args.config, steps=args.steps,
                      device=args.device, resume=args.resume, batch=args.batch,
                      init_from=Path(args.init_from) if args.init_from else None, sample_every=args.sample_every,
                      save_every=args.save_every, threads=args.threads, seed=args.seed, vae=args.vae,
                      ema=args.ema, lambda_perceptual=args.lambda_perceptual, lambda_l1=args.lambda_l1,
                      lambda_kld=args.lambda_kld)
    result = train(cfg, quiet=args.quiet)
    last = result["history"][-1] if result["history"] else {}
    log.info("trained %d steps; checkpoint in %s (official layout: latest_net_G.pth, latest_net_D.pth, opt.txt)%s",
             result["steps"], cfg.out, f"; last L1 {last.get('G_L1', 0):.3f}" if last else "")
    return 0


def _eval_generator(args: argparse.Namespace) -> int:
    from pathlib import Path

    from segsynth.stream.evaluate import evaluate, print_table, write_json

    result = evaluate(args.checkpoint, Path(args.data), segmenter=args.segmenter, limit=args.limit,
                      cache_dir=_cache_dir(args.cache_dir), grid=Path(args.grid) if args.grid else None,
                      threads=args.threads, quiet=args.quiet, backend=args.backend, baselines=args.baselines)
    print_table(result)
    if args.grid:
        log.info("wrote %s", args.grid)
    if args.json:
        write_json(result, Path(args.json))
        log.info("wrote %s", args.json)
    return 0


def _transcode(args: argparse.Namespace) -> int:
    import signal
    import threading
    from pathlib import Path

    from segsynth.config import ModelConfig
    from segsynth.errors import InputError, Interrupted
    from segsynth.stream.bulk import transcode

    if args.jobs < 1 or (args.retry is not None and args.retry < 0):
        raise InputError("--jobs must be at least 1 and --retry at least 0")
    picture = _picture_fields(args)
    model = _model_fields(args)
    ModelConfig(**model)  # checked before any file is read
    stop, abort, received = threading.Event(), threading.Event(), []

    def handle(signum, _frame):
        received.append(signum)
        if not stop.is_set():
            log.warning("%s: no new files start; running ones finish (signal again to abandon them)",
                        signal.Signals(signum).name)
            stop.set()
        else:
            abort.set()

    saved = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = transcode(args.inputs, Path(args.out), stream_options=picture, model_options=model,
                            jobs=args.jobs, pattern=args.pattern, recursive=args.recursive, ext=args.ext,
                            resume=args.resume, retry=args.retry, ray=args.ray, stop=stop, abort=abort,
                            quiet=args.quiet, probe=args.probe)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    print(summary["table"])
    if received:
        raise Interrupted(received[0], f"stopped by {signal.Signals(received[0]).name}: {summary['line']}")
    return 0 if not summary["failed"] else 1


def _eval_temporal(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from segsynth.config import ModelConfig
    from segsynth.errors import InputError
    from segsynth.stream import media
    from segsynth.stream.models import ModelSet
    from segsynth.stream.progress import Progress
    from segsynth.stream.stabilize import DEFAULT, parse
    from segsynth.stream.temporal import evaluate

    clip = Path(args.video)
    media.check_input(clip)
    stabilize = args.stabilize or DEFAULT
    parse(stabilize)
    if args.frames is not None and args.frames < 2:
        raise InputError("--frames must be at least 2 (the measures compare consecutive frames)")
    cfg = ModelConfig(segmenter=args.segmenter, generator=args.generator, threads=args.threads,
                      cache_dir=_cache_dir(args.cache_dir), backend=args.backend, fp16=not args.fp32, fused=args.fused,
                      models=_tier(args, False), seg_size=args.seg_size)
    with ModelSet.load(**vars(cfg)) as models, Progress("eval-temporal", args.frames,
                                                        enabled=not args.quiet) as progress:
        report = evaluate(clip, models, stabilize=stabilize, remap=args.remap, fit=args.fit, seed=args.seed,
                          max_frames=args.frames, grid=Path(args.grid) if args.grid else None, progress=progress)
    print(f"{clip.name}: {report['frames']} frames")
    print(f"{'stabilize':<14} {'static flips':>12} {'motion agree':>12} {'synth delta':>11} {'static px':>9} "
          f"{'fps':>6}")
    for spec, m in report["methods"].items():
        delta = "-" if m["synth_static_delta"] is None else f"{m['synth_static_delta']:.3f}"
        print(f"{spec:<14} {m['static_flip_rate']:>12.5f} {m['motion_agreement']:>12.3f} {delta:>11} "
              f"{m['static_fraction']:>9.2f} {m['fps']:>6.2f}")
    for name, value in report["ratios"].items():
        print(f"{name}: {'-' if value is None else f'{value:.2f}'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        log.info("wrote %s", args.json)
    return 0


def _engine(args: argparse.Namespace) -> int:
    from pathlib import Path

    from segsynth.engine import commands

    root = _cache_dir(args.cache_dir)  # engines live in ROOT/engines, as for run and bench
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
        from segsynth.engine.graphcheck import tensorrt_problems
        from segsynth.errors import InputError, ModelError

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
    from segsynth import labels

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


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="more log output")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only errors; no progress bar")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for errors")
    return common


def _add_picture_options(p: argparse.ArgumentParser, threads: str) -> None:
    """How frames are made and encoded: run's and transcode's options."""
    from segsynth.config import FITS, SESSION_VIEWS

    p.add_argument("--view", choices=SESSION_VIEWS, help="synth (default with a generator), labels (default "
                                                         "without), overlay, side-by-side (input | synthesis), grid "
                                                         "(2x2), ids (class ids, lossless grayscale .mkv)")
    p.add_argument("--remap", metavar="RULES", help="rewrite classes before synthesis, e.g. 'person=animal'")
    p.add_argument("--generator", default="default", metavar="default|none|DIR|FILE.onnx",
                   help="SPADE generator: the bundled default, none (labels only), an official checkpoint directory, "
                        "or an exported ONNX")
    p.add_argument("--segmenter", default="ade20k+voc", metavar="NAME|FILE.onnx", help="as for segment")
    p.add_argument("--style", metavar="IMAGE", help="style image for VAE generators (encoder -> z)")
    p.add_argument("--seed", type=int, help="fixed z for VAE generators (one z for the whole video)")
    _add_stabilize(p)
    p.add_argument("--smooth", type=int, default=1, metavar="K", help="the old name of --stabilize majority:K")
    p.add_argument("--size", metavar="WxH", help="synthesis resolution (default: the generator's own)")
    p.add_argument("--fit", choices=FITS, help="how frames meet the synthesis size (default: as the generator "
                                               "was trained; letterbox keeps the aspect ratio)")
    p.add_argument("--batch", type=int, default=1, help="frames per inference batch (default 1)")
    p.add_argument("--codec",
                   help="video encoder: libx264, libx265, libvpx-vp9, h264_nvenc, ..., or auto (a hardware H.264 "
                        "encoder when one works here, else libx264); default: libx264, or the first encoder the "
                        "output's container holds (VP9 for .webm)")
    p.add_argument("--crf", type=int, default=20, help="x264/x265 quality (0-51, default 20)")
    p.add_argument("--preset", default="veryfast", help="x264/x265 preset (default veryfast)")
    p.add_argument("--bitrate", help="target bitrate instead of --crf, e.g. 4M")
    p.add_argument("--stream", type=int, metavar="INDEX", help="which video stream (default: the first)")
    p.add_argument("--threads", type=int, help=threads)
    p.add_argument("--no-legend", action="store_true", help="omit the legend box")
    p.add_argument("--cache-dir", help="where exported generators are cached (default ~/.cache/segsynth)")
    _add_backend(p)


def _add_stabilize(p: argparse.ArgumentParser) -> None:
    from segsynth.stream.stabilize import CHOICES, DEFAULT

    p.add_argument("--stabilize", metavar=CHOICES,
                   help=f"videos: keep labels (and the picture) still where the input did not change (default "
                        f"{DEFAULT}: a label changes where its pixels changed or a clearly more confident class "
                        "appears; flow: the same along optical flow; majority:K: the most frequent label of K "
                        "frames; off: every frame on its own)")


def _add_backend(p: argparse.ArgumentParser) -> None:
    from segsynth.config import FAST_SEG_SIZE, FUSED, TIERS
    from segsynth.engine.select import BACKENDS

    p.add_argument("--models", choices=TIERS,
                   help=f"quality: the float graphs, segmenters at 513 x 513; fast: the bundled int8 graphs "
                        f"(segmenters and default generator), segmenters at {FAST_SEG_SIZE} x {FAST_SEG_SIZE}, labels "
                        "from the low-resolution logits (default: fast for live inputs on the CPU, else quality)")
    p.add_argument("--seg-size", type=int, metavar="N",
                   help=f"the segmenters' input size, 16k + 1: 513, 385, 321, 257 (default 513; {FAST_SEG_SIZE} "
                        "with --models fast)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="inference backend (auto: TensorRT > onnxruntime-cuda > torch-cuda > onnxruntime CPU)")
    p.add_argument("--fp32", action="store_true", help="GPU backends: compute in FP32 instead of FP16")
    p.add_argument("--fused", choices=FUSED, default="auto",
                   help="run the models as one graph: uint8 frames in, labels and picture out, one upload per "
                        "batch (auto: fused, or one by one with a warning where it cannot be; --smooth runs them "
                        "one by one)")


def build_parser() -> argparse.ArgumentParser:
    from segsynth.config import EXPORT_TARGETS, FITS, SEGMENT_VIEWS
    from segsynth.service import MAX_OUTPUTS, MAX_STREAMS

    common = _common()
    parser = argparse.ArgumentParser(
        prog="segsynth", parents=[common],
        description="Segment video with DeepLab, rewrite the labels, repaint it with SPADE.")
    parser.add_argument("--version", action="version", version=f"segsynth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("segment", parents=[common], help="label an image or every frame of a video",
                       description="Segment an image or a video file into labelled classes.")
    p.add_argument("input", help="image (.png/.jpg/...) or video file")
    p.add_argument("output", help="output image or video; same kind as the input")
    p.add_argument("--view", choices=SEGMENT_VIEWS, default="labels",
                   help="labels: colour map with legend; overlay: blended over the input; side-by-side: "
                        "input | labels; ids: raw class ids as 8-bit grayscale (PNG, or lossless FFV1 video)")
    p.add_argument("--remap", metavar="RULES", help="rewrite classes, e.g. 'person=animal,car=refrigerator'")
    p.add_argument("--segmenter", default="ade20k+voc", metavar="NAME|FILE.onnx",
                   help="ade20k+voc (default: scene + people/animals/vehicles), ade20k, voc, or a segmenter ONNX")
    p.add_argument("--label-set", help="label set of a custom segmenter ONNX without segsynth metadata")
    p.add_argument("--threads", type=int, help="inference threads (default: all cores)")
    p.add_argument("--no-legend", action="store_true", help="omit the legend box")
    p.add_argument("--crf", type=int, default=18, help="x264 quality for video output (0-51, default 18)")
    p.add_argument("--preset", default="veryfast", help="x264 preset for video output (default veryfast)")
    _add_stabilize(p)
    _add_backend(p)
    p.set_defaults(func=_segment)

    p = sub.add_parser("run", parents=[common], help="segment, remap and re-synthesize every frame of a video",
                       description="The main job: DeepLab labels every frame, --remap rewrites the labels, SPADE "
                                   "paints a new frame; threaded decode -> infer -> encode, timestamps and audio kept.")
    p.add_argument("input", help="input: a video file, an image sequence, rtsp:// rtsps:// rtmp:// srt:// "
                   "http(s):// (incl. HLS .m3u8), a camera (/dev/videoN, v4l2:N) or lavfi:GRAPH")
    p.add_argument("outputs", nargs="*", metavar="OUTPUT",
                   help="one or more outputs: video files (.mp4 written fragmented, .mkv, ...), rtsp:// or "
                   "rtmp:// or srt:// (pushed to a server), DIR/NAME.m3u8 (HLS)")
    p.add_argument("--out", action="append", metavar="OUTPUT", help="another output (may be repeated)")
    p.add_argument("--preview", metavar="HOST:PORT", help="serve an MJPEG preview, e.g. 127.0.0.1:8090")
    p.add_argument("--frames", type=int, metavar="N", help="stop after N frames (like ffmpeg -frames:v)")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this much input (like ffmpeg -t)")
    p.add_argument("--stats-json", metavar="FILE", help="write the final statistics as JSON")
    p.add_argument("--segment-time", type=float, metavar="SECONDS",
                   help="file outputs: start a new file (NAME-00000.mp4, ...) every SECONDS")
    p.add_argument("--rtsp-transport", choices=["tcp", "udp"], default="tcp", help="RTSP input transport (tcp)")
    p.add_argument("--stall-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="live: a source that sends no frame this long is lost and reconnected (default 5)")
    p.add_argument("--reconnect-max", type=int, metavar="N",
                   help="live: give up after N reconnect attempts in a row (default: never)")
    p.add_argument("--camera-size", metavar="WxH", help="camera capture size, e.g. 1280x720")
    p.add_argument("--camera-fps", type=float, metavar="N", help="camera capture rate")
    p.add_argument("--policy", choices=["lossless", "latest"], default=None,
                   help="lossless: every frame in order (default for files); latest: drop the oldest queued frame "
                   "under load (default for live sources)")
    p.add_argument("--fps", type=float, help="frame rate of an image sequence input (default 25)")
    _add_picture_options(p, threads="inference threads per model (default: all cores)")
    p.set_defaults(func=_run)

    p = sub.add_parser("transcode", parents=[common], help="run every video of files and folders, in parallel or "
                                                           "on a Ray cluster, resumable",
                       description="Bulk transcoding: each input file is run (as segsynth run would) into --out, "
                                   "the folder structure mirrored; outputs appear under their names only when "
                                   "complete; every file is recorded in OUT/manifest.jsonl (done, failed, skipped, "
                                   "why); --resume skips files done with the same settings. Exit 0 only when every "
                                   "file succeeded. SIGINT/SIGTERM: no new file starts, running ones finish; a "
                                   "second signal abandons them (nothing left under a final name).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="video files, folders and globs")
    p.add_argument("--out", required=True, metavar="DIR", help="the output folder (made when missing)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="files at a time, each in its own worker "
                                                                     "process with the models loaded once (default 1)")
    p.add_argument("--pattern", metavar="GLOB", help="files of folders to take (default: every file with an "
                                                      "extension FFmpeg reads; what is not a video is skipped, and "
                                                      "named in the summary)")
    p.add_argument("--recursive", action="store_true", help="folders' subfolders too")
    p.add_argument("--ext", metavar="EXT", help="the outputs' extension (default: each input's own, or .mp4 for raw "
                                                 "streams such as .h264 and .ivf; .mkv where --codec does not fit)")
    p.add_argument("--probe", action="store_true", help="also look inside files whose extension no FFmpeg format "
                                                         "claims (videos without a telling name)")
    p.add_argument("--resume", action="store_true", help="skip files done with the same input and settings")
    p.add_argument("--retry", type=int, metavar="K", help="times a file is retried when its worker process (or Ray "
                                                           "node) dies (default 0 locally, 3 on Ray)")
    p.add_argument("--ray", nargs="?", const="auto", metavar="auto|ADDRESS",
                   help="run the files as tasks on a Ray cluster (the ray extra): auto = the running one, or "
                        "HOST:PORT; --out must be a path every node reaches")
    _add_picture_options(p, threads="inference threads per file (default: the cores / --jobs; 1 on Ray)")
    p.set_defaults(func=_transcode)

    p = sub.add_parser("serve", parents=[common], help="many live streams in one service: HTTP API and /metrics",
                       description="Run stream sessions over one set of models behind an HTTP API "
                       "(/v1/streams, /healthz, /readyz, /metrics; OpenAPI at /openapi.json).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback; others need a token)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--config", metavar="streams.yaml", help="streams to start at boot ('streams:' list of POST bodies)")
    p.add_argument("--token-file", metavar="FILE", help="every /v1 call needs 'Authorization: Bearer TOKEN', the "
                                                         "token read from FILE (or from $SEGSYNTH_TOKEN)")
    p.add_argument("--token", help="the token itself (visible in the process list: prefer --token-file)")
    p.add_argument("--protect-metrics", action="store_true", help="/metrics needs the token too")
    p.add_argument("--media-root", metavar="DIR", help="file sources, style images and file outputs must lie under "
                                                       "DIR (default: none; without it the service reads and writes "
                                                       "no files, only live sources and network outputs)")
    p.add_argument("--max-streams", type=int, default=MAX_STREAMS, metavar="N",
                   help=f"streams at once (default {MAX_STREAMS}; more get 429)")
    p.add_argument("--max-outputs", type=int, default=MAX_OUTPUTS, metavar="N",
                   help=f"outputs a stream may have (default {MAX_OUTPUTS})")
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT: drain streams this long, then abort them (default 10)")
    p.add_argument("--segmenter", default="ade20k+voc", metavar="NAME|FILE.onnx")
    p.add_argument("--generator", default="default", metavar="default|none|DIR|FILE.onnx")
    p.add_argument("--threads", type=int, help="inference threads per model")
    p.add_argument("--cache-dir", help="where exported generators are cached")
    _add_backend(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("devices", parents=[common], help="list the cameras run can read (/dev/videoN)")
    p.set_defaults(func=_devices)

    p = sub.add_parser("bench", parents=[common], help="measure fps, latency and scaling, side by side",
                       description="Scenarios: engine (model only), stages (decode/infer/encode alone), pipeline "
                                   "(threaded vs sequential vs infer alone), fused (the models as one graph vs one by one), "
                                   "passthrough (vs the ffmpeg CLI), streams "
                                   "(N live streams), soak (memory over time); chain (the fused graph, FP16 vs TF32 on "
                                   "GPUs, CUDA-event timed, double-buffered; needs torch), service, transcode (a folder "
                                   "of clips, --jobs 1 vs 2), tiers (--models quality vs fast), cpu-efficiency (FLOPs "
                                   "and share of the CPU's peak) and seg-sizes (each --seg-size) only when named. "
                                   "Ratios come from one run.")
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help="default: all but chain, service, transcode, tiers, cpu-efficiency, seg-sizes")
    p.add_argument("--size", default="1280x720", metavar="WxH", help="generated input size (default 1280x720)")
    p.add_argument("--rate", type=int, default=30, help="generated input / live source fps (default 30)")
    p.add_argument("--frames", type=int, default=300, help="frames per measurement (soak: total; default 300)")
    p.add_argument("--batch", default="1", metavar="1,4,8", help="batch sizes (engine); the first is used elsewhere")
    p.add_argument("--streams", type=int, default=2, help="most concurrent live streams (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement; medians are reported")
    p.add_argument("--input", help="a video to use instead of the generated one")
    p.add_argument("--live-seconds", type=float, default=180, metavar="S",
                   help="streams: run one live stream S seconds per policy and compare the latency p99 of the first "
                   "and last third (default 180; 0 skips)")
    p.add_argument("--segmenter", default="ade20k+voc")
    p.add_argument("--generator", default="default")
    p.add_argument("--threads", type=int, help="inference threads")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="plot fps vs streams and latency histograms")
    _add_backend(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser(
        "export", parents=[common], help="export SPADE / DeepLab / the fused chain to ONNX",
        description="Write ONNX graphs following segsynth's I/O contracts. spade: label [+instance] [+z] -> image; "
                    "encoder: style -> mu, logvar; deeplab: image -> logits (or labels); chain: uint8 frames + remap "
                    "table [+z] -> uint8 frames + labels; quantize: a float graph -> int8 (QDQ, calibrated on video frames). "
                    "Needs the export extra (torch), except --from-tflite and quantize.")
    p.add_argument("what", choices=EXPORT_TARGETS, help="which graph to export")
    p.add_argument("model", nargs="?", metavar="MODEL.onnx", help="quantize: the float segmenter or generator graph")
    p.add_argument("--calibrate", nargs="+", metavar="VIDEO", help="quantize: videos (VIDEO or VIDEO#START-END seconds) to calibrate activation ranges on")
    p.add_argument("--frames", type=int, default=48, help="quantize: calibration frames, spread over the videos (48)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="SPADE: an official checkpoint directory (opt.txt, latest_net_G.pth[, latest_net_E.pth]); "
                        "deeplab: a kazuto1011 DeepLab v2 or torchvision DeepLabV3 .pth")
    p.add_argument("--deeplab", metavar="FILE.pth", help="chain: the DeepLab checkpoint")
    p.add_argument("--from-tflite", metavar="FILE", help="deeplab: convert a DeepLab TFLite model instead")
    p.add_argument("--out", required=True, help="output .onnx file (written only when complete)")
    p.add_argument("--size", metavar="HxW", help="spade: output size (sets crop_size/aspect_ratio); encoder: style "
                                                 "size (default: the checkpoint's, crop_size/aspect_ratio x "
                                                 "crop_size); deeplab: input size (default 513x513); chain: frame size")
    p.add_argument("--seg-size", metavar="HxW", default="513x513", help="chain: segmenter input size (513x513)")
    p.add_argument("--batch", default="dynamic", metavar="N|dynamic",
                   help="'dynamic' (the default: a symbolic batch dimension, which Triton and trtexec shape "
                        "profiles need) or N (1..64) for a fixed batch size")
    p.add_argument("--argmax", action="store_true", help="deeplab: output uint8 labels instead of logits")
    p.add_argument("--label-set", help="label set of the segmenter (default: guessed from its class count)")
    p.add_argument("--epoch", default="latest", help="SPADE: which {epoch}_net_G.pth to load (default latest)")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="SPADE: override an opt.txt option")
    p.set_defaults(func=_export)

    p = sub.add_parser("dataset", parents=[common], help="make image/label training pairs from videos and photos",
                       description="dataset make INPUTS... --out DIR: label video frames and images (or random crops "
                                   "of them) with the default segmenter.")
    p.add_argument("action", choices=["make"])
    p.add_argument("inputs", nargs="+", help="video files, image files, folders of images")
    p.add_argument("--out", required=True, help="new output directory (images/, labels/, manifest.json)")
    p.add_argument("--every", type=int, default=1, help="take every N-th frame (default 1)")
    p.add_argument("--crops-per-image", type=int, default=0, metavar="N",
                   help="images: N random crops of the pair's shape at 30-100%% of the largest that fits "
                        "(default 0: each image whole, stretched)")
    p.add_argument("--size", default="256x256", metavar="WxH", help="pair size (default 256x256)")
    p.add_argument("--segmenter", default="ade20k+voc", help="segmenter used for the labels (default ade20k+voc)")
    p.add_argument("--threads", type=int, help="inference threads")
    p.set_defaults(func=_dataset)

    p = sub.add_parser("train", parents=[common], help="train a SPADE generator on a dataset (needs torch)",
                       description="Train SPADE (hinge GAN + multiscale PatchGAN + feature matching + L1); "
                                   "checkpoints in the official NVlabs layout.")
    p.add_argument("--data", required=True, help="a directory made by segsynth dataset make")
    p.add_argument("--out", required=True, help="checkpoint directory (latest_net_G.pth, latest_net_D.pth, opt.txt)")
    p.add_argument("--config", default="small", choices=["tiny", "small", "base"], help="model size (default small)")
    p.add_argument("--steps", type=int, default=1000, help="total training steps (default 1000)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--init-from", metavar="CKPT_DIR",
                   help="start the generator (and style encoder) from this checkpoint directory: same --config, any "
                        "size, with or without --vae (a missing or differently sized z layer is re-made); D starts "
                        "afresh")
    p.add_argument("--batch", type=int, help="batch size (default: the config's)")
    p.add_argument("--sample-every", type=int, default=100, help="write a sample grid every K steps")
    p.add_argument("--save-every", type=int, default=200, help="write the checkpoint every K steps")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", action="store_true", help="also train the VAE style encoder (--style IMAGE at run time)")
    p.add_argument("--lambda-perceptual", type=float, default=2.0, metavar="W",
                   help="weight of the perceptual loss through the bundled VOC MobileNetV2 backbone (default 2; 0: off)")
    p.add_argument("--lambda-l1", type=float, default=1.0, metavar="W", help="weight of the pixel L1 loss (default 1)")
    p.add_argument("--lambda-kld", type=float, default=0.05, metavar="W",
                   help="--vae: weight of the KL term (default 0.05, as officially; lower lets z carry more of "
                        "the style image)")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="save a moving average of the generator's weights (e.g. 0.999; default 0: off); the "
                        "trained weights stay in train_state.pth for --resume")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval-generator", parents=[common], help="score a generator: mIoU, pixel accuracy, PSNR, SSIM, "
                                                                        "class colour distance",
                       description="Segment the generated frames and compare with the label maps they came from "
                                   "(the SPADE paper's protocol), plus PSNR/SSIM against the real frames.")
    p.add_argument("checkpoint", metavar="CKPT", help="'default', an exported .onnx, or a SPADE checkpoint directory")
    p.add_argument("--data", required=True, help="a held-out dataset made by segsynth dataset make")
    p.add_argument("--json", metavar="OUT", help="write the scores as JSON (miou, pixel_accuracy, fw_iou, psnr, "
                                                 "ssim, colour_distance, frames, real_frames, baselines)")
    p.add_argument("--segmenter", default="ade20k+voc")
    p.add_argument("--limit", type=int, help="evaluate the first N pairs only")
    p.add_argument("--grid", metavar="OUT.png", help="also write a sample grid: label | real | generated rows")
    p.add_argument("--baselines", action="store_true",
                   help="also score the real frames blurred by 1 pixel and with noise (sigma 10): the ceiling of "
                        "the protocol for any picture that is not the very frame the labels came from")
    p.add_argument("--threads", type=int)
    p.add_argument("--cache-dir", help="where exported generators are cached")
    p.add_argument("--backend", default="auto", help="inference backend (see segsynth run --help)")
    p.set_defaults(func=_eval_generator)

    p = sub.add_parser("eval-temporal", parents=[common], help="measure flicker: label flips where the input "
                                                               "did not change, with and without stabilisation",
                       description="Run a clip through --stabilize (default: the default for video) and through off "
                                   "in the same run: static_flip_rate (labels that change where the input did not), "
                                   "motion_agreement (stabilised labels = the frame's own where it did), "
                                   "synth_static_delta (picture change on static pixels) and fps.")
    p.add_argument("video", help="a video file")
    _add_stabilize(p)
    p.add_argument("--remap", metavar="RULES", help="remap rules, as for run")
    p.add_argument("--segmenter", default="ade20k+voc", metavar="NAME|FILE.onnx")
    p.add_argument("--generator", default="default", metavar="default|none|DIR|FILE.onnx")
    p.add_argument("--fit", choices=FITS, help="how frames meet the synthesis size (as for run)")
    p.add_argument("--seed", type=int, help="fixed z for VAE generators")
    p.add_argument("--frames", type=int, metavar="N", help="the first N frames only")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument("--grid", metavar="OUT.png", help="also write a frame grid: input | labels off | labels "
                                                     "stabilised | picture off | picture stabilised, consecutive rows")
    p.add_argument("--threads", type=int)
    p.add_argument("--cache-dir", help="where exported generators and fused graphs are cached")
    _add_backend(p)
    p.set_defaults(func=_eval_temporal)

    p = sub.add_parser("engine", parents=[common], help="build, inspect and compare inference engines",
                       description="build --onnx X.onnx: a TensorRT engine in the cache; info FILE: bindings, shapes, "
                                   "precision, GPU; compare A B: outputs side by side (e.g. FP16 vs FP32); check "
                                   "FILE...: whether TensorRT's ONNX parser takes each graph (on the CPU, no TensorRT "
                                   "needed; exit 1 when one does not).")
    p.add_argument("action", choices=["build", "info", "compare", "check"])
    p.add_argument("files", nargs="*", help="info: FILE; compare: A B; check: FILE... (ONNX files)")
    p.add_argument("--onnx", help="build: the ONNX graph")
    p.add_argument("--fp32", action="store_true", help="build: FP32 instead of FP16")
    p.add_argument("--batch", default="1..8", help="build: batch range MIN..MAX (default 1..8); compare: batch")
    p.add_argument("--backend-a", default="onnxruntime")
    p.add_argument("--backend-b", default="auto")
    p.add_argument("--fp16-a", action="store_true", help="compare: run A in FP16 (GPU backends)")
    p.add_argument("--fp16-b", action="store_true", help="compare: run B in FP16 (GPU backends)")
    p.add_argument("--inputs", metavar="FILE.npz", help="compare: inputs by name (default: random ones)")
    p.add_argument("--cache-dir", help="segsynth cache; engines go in its engines/ (default ~/.cache/segsynth)")
    p.set_defaults(func=_engine)

    p = sub.add_parser("labels", parents=[common], help="list label sets, their classes and mappings",
                       description="Inspect label sets: list, show SET, map SRC DST.")
    p.add_argument("action", choices=["list", "show", "map"])
    p.add_argument("sets", nargs="*", help="label set names (ade20k, voc, coco-stuff, cityscapes)")
    p.set_defaults(func=_labels)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("segsynth: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("verbose", "quiet", "debug"):
        setattr(args, flag, getattr(args, flag, False))
    _setup_logging(args)
    try:
        return args.func(args)
    except SegsynthError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"segsynth: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("segsynth: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. head, which stopped reading
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
