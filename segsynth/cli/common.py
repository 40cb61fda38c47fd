"""What the commands share: the options every command has, the options of a stream (made from
StreamConfig's one description of its fields), of the models and backends, and the one helper
through which every command owns SIGINT and SIGTERM."""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import signal
import threading
import types
import typing

from segsynth.core.config import ModelConfig, stream_field_types, stream_fields
from segsynth.core.errors import OutputError
from segsynth.core.grammar import BACKENDS, FAST_SEG_SIZE, FUSED, TIERS, parse_size
from segsynth.core.paths import BUNDLED_GENERATORS

log = logging.getLogger("segsynth")
PICTURE = ("view", "remap", "style", "seed", "stabilize", "smooth", "incremental", "fit", "batch", "codec", "crf",
           "preset", "bitrate", "stream", "legend")  # how frames are made and encoded: run's and transcode's stream fields
SHORT = {"duration": "-t"}  # ffmpeg's short options, where its users reach for them


class Parser(argparse.ArgumentParser):
    """argparse with errors as one line: what is wrong, the nearest valid word ("did you mean"),
    and where the usage is (``--help``), instead of the usage block first; and defaults shown in
    every option's help (see HelpFormatter). Subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        hint = self._nearest(message)
        self.exit(2, f"{self.prog}: error: {message}{hint}; see '{self.prog} --help'\n")

    def _nearest(self, message: str) -> str:
        """' (did you mean X?)' for a mistyped choice or option, else ''."""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            word, options = choice[1], re.findall(r"'([^']*)'", choice[2])
        else:
            unknown = re.search(r"unrecognized arguments: (\S+)", message)
            if not unknown or not unknown[1].startswith("-"):
                return ""
            word, options = unknown[1].split("=")[0], [o for a in self._actions for o in a.option_strings]
        near = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
        return f" (did you mean {near[0]!r}?)" if near else ""


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default not in (None, False, True, argparse.SUPPRESS) and "default" not in text
                and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))
                and action.option_strings):
            text += f" (default {' '.join(map(str, default)) if isinstance(default, list) else default})"
        return text


def check_new_outputs(paths, overwrite: bool | None, flag: str = "OUTPUT") -> None:
    """ffmpeg's habit: an output file that exists is refused (OutputError, exit 3) unless
    ``overwrite`` (-y); ``overwrite`` None or False both refuse (-n says so explicitly)."""
    for path in paths:
        if not overwrite and path.exists() and path.is_file():
            raise OutputError(f"{path} exists; pass -y (--overwrite) to replace it", field=flag)


def add_overwrite(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("-y", "--overwrite", action="store_true", default=None,
                       help="replace output files that exist (without it they are refused, as ffmpeg does)")
    group.add_argument("-n", "--no-overwrite", dest="overwrite", action="store_false",
                       help="refuse output files that exist (what happens without -y; for scripts to say so)")


class Signals:
    """SIGINT/SIGTERM while a command runs: the first calls ``first`` (finish what was read) and
    logs ``what``, a second calls ``again`` (abandon it). The CLI owns the process's signals;
    sessions and jobs never touch them. ``signum``: the first signal received, if any."""

    def __init__(self, first, again, what: str) -> None:
        self.first, self.again, self.what = first, again, what
        self.signum: int | None = None
        self._saved: dict = {}

    def __enter__(self) -> "Signals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("%s: %s (signal again to abandon it)", signal.Signals(signum).name, self.what)
            self.first()
        else:
            self.again()

    def __exit__(self, *exc) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)


def add_stream_options(p: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """The options of StreamConfig's fields ``names``, as core.config describes them once (the
    HTTP API's request model and docs/stream-fields.md come from the same description)."""
    fields = {f.name: f for f in stream_fields()}
    for name in names:
        f, meta = fields[name], fields[name].metadata
        flags = [flag for flag in (SHORT.get(name), meta["flag"] or "--" + name.replace("_", "-")) if flag]
        default = f.default
        kind = _base_type(name)
        if kind is bool:
            p.add_argument(*flags, dest=name, action="store_false" if default else "store_true", help=meta["help"])
        else:
            p.add_argument(*flags, dest=name, default=default, metavar=meta["metavar"], choices=meta["choices"],
                           type=kind if kind in (int, float) else str, help=meta["help"])


def stream_options(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """StreamConfig's keyword arguments of fields ``names`` from ``args`` (see add_stream_options)."""
    out = {name: getattr(args, name) for name in names}
    for name, value in out.items():
        if value is not None and typing.get_origin(_base_type(name)) is tuple:  # sizes: WxH
            out[name] = parse_size(value, "--" + name.replace("_", "-"))
    return out


def _base_type(name: str):
    """A StreamConfig field's type without its None: ``int | None`` -> int."""
    kind = stream_field_types()[name]
    return next(t for t in typing.get_args(kind) or (kind,) if t is not type(None)) if typing.get_origin(
        kind) in (typing.Union, types.UnionType) else kind


def tier(args: argparse.Namespace, live: bool) -> str:
    """--models, or its default: fast for live sources on the CPU backend (near real time on a
    few cores), quality otherwise (files, GPUs)."""
    if args.models:
        return args.models
    if live and args.backend in ("auto", "onnxruntime"):
        # imported here: asking which backends work loads onnxruntime, and --help should not wait for it
        from segsynth.engine.select import backend_candidates

        if args.backend == "onnxruntime" or backend_candidates()[0][0] == "onnxruntime":
            log.debug("live input on the CPU: --models fast (int8 graphs); --models quality for the float ones")
            return "fast"
    return "quality"


def model_config(args: argparse.Namespace, live: bool = False) -> ModelConfig:
    """The models run and transcode load, checked now (before any file is read)."""
    return ModelConfig(segmenter=args.segmenter, generator=args.generator,
                       size=parse_size(args.size) if args.size else None, threads=args.threads,
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


def add_generator(p: argparse.ArgumentParser) -> None:
    names = "|".join(BUNDLED_GENERATORS)
    p.add_argument("--generator", default="default", metavar=f"{names}|none|DIR|FILE.onnx",
                   help="the generator: a bundled one by name (default: the CPU-first student; spade2: the SPADE "
                        "it was distilled from), none (labels only), a checkpoint directory (official SPADE, or a "
                        "student's) or an exported ONNX")


def add_picture_options(p: argparse.ArgumentParser, threads: str) -> None:
    """How frames are made and encoded, and by which models: run's and transcode's options."""
    add_stream_options(p, PICTURE)
    add_generator(p)
    p.add_argument("--segmenter", default="ade20k+voc", metavar="NAME|FILE.onnx",
                   help="ade20k+voc (scene + people/animals/vehicles), ade20k, voc, or a segmenter ONNX")
    p.add_argument("--size", metavar="WxH", help="synthesis resolution (default: the generator's own)")
    p.add_argument("--threads", type=int, help=threads)
    add_cache_dir(p, "where exported generators, fused and re-shaped graphs and engines are cached")
    add_backend(p)


def add_cache_dir(p: argparse.ArgumentParser, what: str) -> None:
    """--cache-dir, ``what`` goes there, and where it is by default (core.paths.cache_dir)."""
    p.add_argument("--cache-dir", help=f"{what} (default $SEGSYNTH_HOME, else $XDG_CACHE_HOME/segsynth or "
                                       "~/.cache/segsynth)")


def add_stabilize(p: argparse.ArgumentParser) -> None:
    add_stream_options(p, ("stabilize",))


def add_backend(p: argparse.ArgumentParser) -> None:
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
                        "batch (auto: fused, or one by one with a warning where it cannot be)")
