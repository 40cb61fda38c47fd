from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from segsynth.cli.common import (
    PICTURE,
    Signals,
    add_backend,
    add_overwrite,
    add_picture_options,
    add_stabilize,
    add_stream_options,
    check_new_outputs,
    model_config,
    stream_options,
    tier,
)
from segsynth.core.config import SegmentConfig, StreamConfig, StreamTemplate, TranscodeConfig
from segsynth.core.errors import InputError, Interrupted, OutputError
from segsynth.core.grammar import SEGMENT_VIEWS, describe_cameras, is_live, sink_kind

log = logging.getLogger("segsynth")
LIVE = ("max_frames", "duration", "segment_time", "rtsp_transport", "stall_timeout", "reconnect_max", "camera_size",
        "camera_fps", "policy", "fps")  # run's stream fields beyond the picture's: inputs, limits, live sources


def _segment(args: argparse.Namespace) -> int:
    # imported here: jobs load av and onnxruntime (1 s): --help stays fast
    from segsynth.jobs.segment import run_segment

    check_new_outputs([Path(args.output)], args.overwrite)
    cfg = SegmentConfig(input=args.input, output=args.output, view=args.view, remap=args.remap,
                        segmenter=args.segmenter, label_set=args.label_set, threads=args.threads,
                        legend=args.legend, crf=args.crf, preset=args.preset, backend=args.backend,
                        fp16=not args.fp32, fused=args.fused, stabilize=args.stabilize, models=tier(args, False),
                        seg_size=args.seg_size)
    summary = run_segment(cfg, quiet=args.quiet)
    log.info("%s", summary.line(cfg))
    return 0


def _run(args: argparse.Namespace) -> int:
    # imported here: jobs load av and onnxruntime (1 s): --help stays fast
    from segsynth.jobs.run import run

    outputs = [*args.outputs, *(args.out or []), *([f"mjpeg://{args.preview}"] if args.preview else [])]
    if not outputs:
        raise InputError("run needs an output: run IN OUT [OUT ...], --out OUT or --preview HOST:PORT")
    cfg = StreamConfig(source=args.input, sinks=tuple(outputs), **stream_options(args, PICTURE + LIVE))
    files = [Path(out) for out in outputs if sink_kind(out) in ("file", "hls")]  # an HLS playlist is a file too
    check_new_outputs([*files, *([Path(args.stats_json)] if args.stats_json else [])], args.overwrite)
    models = model_config(args, live=is_live(args.input))
    signals = []

    def control(session):
        signals.append(Signals(lambda: session.stop(drain=True), lambda: session.stop(drain=False),
                               "stopping - finishing the frames already read"))
        return signals[0]

    stats, session = run(cfg, models, quiet=args.quiet, control=control, stats_json=args.stats_json)
    _summary(cfg, stats, session.source)
    signum = signals[0].signum if signals else None
    if signum is not None:
        raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} after {stats.frames_out} frames; "
                                  "the output holds them and is closed")
    failed = [out for out in stats.outputs if not out.ok]
    if failed:  # the others went on to the end; the run still failed
        written = [out.name for out in stats.outputs if out.ok]
        raise OutputError(f"output {failed[0].name} failed: {failed[0].error}"
                          + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")
                          + (f"; {', '.join(written)} complete" if written else ""))
    return 0


def _summary(cfg: StreamConfig, stats, source) -> None:
    """What a run did, on stderr: problems, outputs, frames and rates, stage times, latency."""
    if stats.problems and source.live:
        log.warning("warning: %s: %d problems, e.g. %s", cfg.source, len(stats.problems), stats.problems[0])
    elif stats.problems:  # damage, or a video that ends before the time it declares
        declared = source.info.declared_frames
        of = f" of the {declared} it declares" if declared else ""
        log.warning("warning: %s looks truncated or damaged: decoded %d frames%s and wrote them: %s",
                    cfg.source, stats.frames_in, of, stats.problems[0])
    written = [out.name for out in stats.outputs if out.ok]
    # in the words of --stats-json, GET /v1/streams and /metrics (StreamStats' fields)
    log.info("wrote %s (view %s): frames_in %d, frames_out %d, dropped %d, reconnects %d, seconds %.1f, fps %.2f",
             ", ".join(written) or "nothing", stats.view, stats.frames_in, stats.frames_out, stats.dropped,
             stats.reconnects, stats.seconds, stats.fps)
    for out in stats.outputs:
        if not out.ok or out.reconnects or out.skipped:
            log.info("  output %s: %s, reconnects %d, skipped %d", out.name,
                     "ok" if out.ok else f"FAILED ({out.error}); what it recorded is kept", out.reconnects,
                     out.skipped)
    for name, t in stats.stages.items():
        log.info("  stage %-6s mean_ms %7.1f   p95_ms %7.1f", name, t["mean_ms"], t["p95_ms"])
    if stats.computed:
        log.info("  computed: segmented %.0f %% of the frames, painted %.0f %% (the rest repeated the frame before; "
                 "--incremental)", 100 * stats.computed["segmented"], 100 * stats.computed["painted"])
    if stats.latency_ms:
        lat = stats.latency_ms
        log.info("  latency_ms p50 %.0f, p95 %.0f, p99 %.0f (arrival to mux)", lat["p50"], lat["p95"], lat["p99"])


def _transcode(args: argparse.Namespace) -> int:
    # imported here: jobs load av and onnxruntime (1 s): --help stays fast
    from segsynth.jobs.transcode import transcode

    job = TranscodeConfig(inputs=tuple(args.inputs), out=Path(args.out), stream=StreamTemplate.of(
        **stream_options(args, PICTURE)), models=model_config(args), jobs=args.jobs, pattern=args.pattern,
        recursive=args.recursive, ext=args.ext, probe=args.probe, resume=args.resume, retry=args.retry, ray=args.ray)
    stop, abort = threading.Event(), threading.Event()
    with Signals(stop.set, abort.set, "no new file starts; the running ones finish") as signals:
        summary = transcode(job, stop=stop, abort=abort, quiet=args.quiet)
    print(summary["table"])
    if signals.signum is not None:
        raise Interrupted(signals.signum, f"stopped by {signal.Signals(signals.signum).name}: {summary['line']}")
    return 0 if not summary["failed"] else 1


def _devices(args: argparse.Namespace) -> int:
    cameras = describe_cameras()
    if not cameras:
        print("no cameras found (no /dev/video* devices)")
    for device, name in cameras:
        print(f"{device}\t{name}")
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("segment", parents=[common], help="label an image or every frame of a video",
                       description="Segment an image or a video file into labelled classes.",
                       epilog="example: segsynth segment examples/demo.mp4 labels.mp4 --view overlay")
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
    add_stream_options(p, ("legend",))
    p.add_argument("--crf", type=int, default=SegmentConfig.crf, help="x264 quality for video output (0-51)")
    p.add_argument("--preset", default="veryfast", help="x264 preset for video output")
    add_stabilize(p)
    add_backend(p)
    add_overwrite(p)
    p.set_defaults(func=_segment)
    p = sub.add_parser("run", parents=[common], help="segment, remap and re-synthesize every frame of a video",
                       description="The main job: DeepLab labels every frame, --remap rewrites the labels, SPADE "
                                   "paints a new frame; threaded decode -> infer -> encode, timestamps and audio kept. "
                                   "An output file that exists is refused unless -y.",
                       epilog="examples: segsynth run examples/demo.mp4 out.mp4 --remap person=bear; "
                              "segsynth run rtsp://cam/stream out.m3u8 --preview 127.0.0.1:8090 -t 60")
    p.add_argument("input", help="input: a video file, an image sequence, rtsp:// rtsps:// rtmp:// srt:// "
                   "http(s):// (incl. HLS .m3u8), a camera (/dev/videoN, v4l2:N) or lavfi:GRAPH")
    p.add_argument("outputs", nargs="*", metavar="OUTPUT",
                   help="one or more outputs: video files (.mp4 written fragmented, .mkv, ...), rtsp:// or "
                   "rtmp:// or srt:// (pushed to a server), DIR/NAME.m3u8 (HLS)")
    p.add_argument("--out", action="append", metavar="OUTPUT",
                   help="another output, written as well as the positional ones (may be repeated)")
    p.add_argument("--preview", metavar="HOST:PORT", help="serve an MJPEG preview, e.g. 127.0.0.1:8090")
    p.add_argument("--stats-json", metavar="FILE", help="write the final statistics as JSON")
    add_stream_options(p, LIVE)
    add_picture_options(p, threads="inference threads per model (default: all cores)")
    add_overwrite(p)
    p.set_defaults(func=_run)
    p = sub.add_parser("transcode", parents=[common], help="run every video of files and folders, in parallel or "
                                                           "on a Ray cluster, resumable",
                       description="Bulk transcoding: each input file is run (as segsynth run would) into --out, "
                                   "the folder structure mirrored; outputs appear under their names only when "
                                   "complete; every file is recorded in OUT/manifest.jsonl (done, failed, skipped, "
                                   "why); --resume skips files done with the same settings. Exit 0 only when every "
                                   "file succeeded. SIGINT/SIGTERM: no new file starts, running ones finish; a "
                                   "second signal abandons them (nothing left under a final name).",
                       epilog="example: segsynth transcode clips/ --out painted/ --jobs 2 --remap person=bear")
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
    add_picture_options(p, threads="inference threads per file (default: the cores / --jobs; 1 on Ray)")
    p.set_defaults(func=_transcode)
    p = sub.add_parser("devices", parents=[common], help="list the cameras run can read (/dev/videoN)",
                       description="List the V4L2 cameras (/dev/videoN) with their names: what run takes as a "
                                   "source (/dev/videoN or v4l2:N).",
                       epilog="example: segsynth devices")
    p.set_defaults(func=_devices)
