from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from segsynth.core.grammar import (
    FAST_SEG_SIZE,
    FITS,
    FUSED,
    SESSION_VIEWS,
    STABILIZE_CHOICES,
    STABILIZE_DEFAULT,
    TIERS,
    parse_size,
)

log = logging.getLogger("segsynth")



class StopOnSignals:
    """SIGINT/SIGTERM while a session runs: the first drains it (finish what was read, flush,
    close), a second aborts it. The CLI owns the process's signals; sessions never touch them."""

    def __init__(self, session) -> None:
        self.session, self.signum, self._saved = session, None, {}

    def __enter__(self) -> "StopOnSignals":

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:

        if self.signum is None:
            self.signum = signum
            log.warning("%s: stopping - finishing the frames already read (signal again to abort)",
                        signal.Signals(signum).name)
            self.session.stop(drain=True)
        else:
            self.session.stop(drain=False)

    def __exit__(self, *exc) -> None:

        for signum, handler in self._saved.items():
            signal.signal(signum, handler)


def picture_fields(args: argparse.Namespace) -> dict:
    """StreamConfig's fields of how frames are made and encoded (run and transcode share them)."""

    return dict(view=args.view, remap=args.remap, style=Path(args.style) if args.style else None, seed=args.seed,
                smooth=args.smooth, stabilize=args.stabilize, fit=args.fit, batch=args.batch, codec=args.codec,
                crf=args.crf, preset=args.preset, bitrate=args.bitrate, stream=args.stream, legend=not args.no_legend)


def tier(args: argparse.Namespace, live: bool) -> str:
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


def model_fields(args: argparse.Namespace, live: bool = False) -> dict:
    """ModelConfig's fields (run and transcode share them)."""

    return dict(segmenter=args.segmenter, generator=args.generator,
                size=parse_size(args.size, "--size", "WxH") if args.size else None, threads=args.threads,
                cache_dir=args.cache_dir, backend=args.backend, fp16=not args.fp32, batch=args.batch,
                fused=args.fused, models=tier(args, live), seg_size=args.seg_size)


def shared_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="more log output")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only errors; no progress bar")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for errors")
    return common


def add_picture_options(p: argparse.ArgumentParser, threads: str) -> None:
    """How frames are made and encoded: run's and transcode's options."""

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
    add_stabilize(p)
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
    add_backend(p)


def add_stabilize(p: argparse.ArgumentParser) -> None:

    p.add_argument("--stabilize", metavar=STABILIZE_CHOICES,
                   help=f"videos: keep labels (and the picture) still where the input did not change (default "
                        f"{STABILIZE_DEFAULT}: a label changes where its pixels changed or a clearly more confident class "
                        "appears; flow: the same along optical flow; majority:K: the most frequent label of K "
                        "frames; off: every frame on its own)")


def add_backend(p: argparse.ArgumentParser) -> None:
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
