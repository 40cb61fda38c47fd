"""The ``segsynth`` command: one module per command group (media: segment, run, transcode,
devices; serve; models: export, dataset, train, eval-*; registry: models list/pull/add/path/rm;
tools: bench, engine, labels), each
adding its subcommands. A command builds the config dataclasses of its arguments and hands them
to the job that does the work (segsynth.jobs); modules that import torch or FastAPI are imported
by the command that needs them, so ``segsynth --help`` never imports either."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from segsynth import __version__
from segsynth.cli import common, media, models, registry, serve, tools
from segsynth.core.errors import SegsynthError

log = logging.getLogger("segsynth")


def build_parser() -> argparse.ArgumentParser:
    shared = common.shared_options()
    parser = common.Parser(
        prog="segsynth", parents=[shared],
        description="Segment video with DeepLab, rewrite the labels, repaint it with a SPADE-style generator.",
        epilog="example: segsynth run examples/demo.mp4 out.mp4 --remap person=bear; "
               "'segsynth COMMAND --help' for each command")
    parser.add_argument("--version", action="version", version=f"segsynth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (media, serve, models, registry, tools):
        group.add_parsers(sub, shared)
    parser.set_defaults(commands=sub.choices)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("segsynth: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # told by the command's own parser, which knows its options
        args.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
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
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
