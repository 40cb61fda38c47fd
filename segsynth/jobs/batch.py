"""A batch's plan and bookkeeping (``segsynth transcode``): which files are videos and where each
goes (``expand``), each file's ``Task`` and ``Record``, the settings hash ``--resume`` compares,
and ``DIR/manifest.jsonl`` (``Manifest``)."""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from segsynth import __version__
from segsynth.core import formats
from segsynth.core.errors import InputError, OutputError
from segsynth.stream.io import demux

log = logging.getLogger("segsynth")
import dataclasses

from segsynth.core.config import ModelConfig, StreamTemplate

MANIFEST = "manifest.jsonl"


LOCK = ".segsynth-transcode.lock"


WORKER_LOCK = ".segsynth-transcode.workers.lock"


PARTIAL = ".*.partial-*"  # FileSink's temporary names for atomic outputs


@dataclass(frozen=True)
class Task:
    source: str  # the input file (absolute)
    output: str  # its output (absolute), under the output folder
    size: int
    sha256: str
    settings: str  # hash of everything that decides the output
    note: str | None = None  # why the output's extension is not the input's


@dataclass
class Record:
    input: str
    output: str
    size: int
    sha256: str
    settings: str
    status: str  # done | failed | skipped
    frames: int = 0
    seconds: float = 0.0
    fps: float = 0.0
    error: str | None = None
    load_seconds: float = 0.0  # models loaded for this file (a worker's first file only)
    first_frame_seconds: float | None = None  # from the session's start to its first frame out
    attempts: int = 1
    worker: str = ""
    note: str | None = None  # why the output's extension is not the input's
    finished: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @classmethod
    def of(cls, task: Task, status: str, **fields) -> Record:
        """A record of ``task`` (its input, output, size, hash, settings, note) with ``status``."""
        return cls(task.source, task.output, task.size, task.sha256, task.settings, status, note=task.note, **fields)


# ---- planning (driver) -----------------------------------------------------------------------
@dataclass
class Plan:
    """What a batch will do: ``videos`` (input, output, note: why the output's extension differs
    from the input's, if it does) and ``skipped`` (input, why: not videos; named in the summary)."""

    videos: list[tuple[Path, Path, str | None]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _found(inputs: list[str], pattern: str | None, recursive: bool) -> list[tuple[Path, Path]]:
    """(file, its path under the output folder): files as given, folders' files (matching
    ``pattern`` when given), globs."""
    found: list[tuple[Path, Path]] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            files = path.rglob("*") if recursive else path.iterdir()
            found += [(f, f.relative_to(path)) for f in sorted(files) if f.is_file() and not f.name.startswith(".")
                      and (not pattern or fnmatch.fnmatch(f.name.lower(), pattern.lower()))]
        elif path.is_file():
            found.append((path, Path(path.name)))
        elif glob.has_magic(spec):
            found += [(Path(f), Path(Path(f).name)) for f in sorted(glob.glob(spec, recursive=recursive))
                      if Path(f).is_file()]
        else:
            raise InputError(f"{spec}: no such file or folder")
    if not found:
        raise InputError(f"no input files found in {', '.join(inputs)}" + (f" matching {pattern!r}" if pattern else ""))
    return found


def _output(src: Path, target: Path, ext: str | None, codec: str | None) -> tuple[Path, str | None]:
    """Where ``src`` is written, and a note when that is not its own extension: a raw stream
    (.h264, .ivf: no container) -> .mp4; an asked-for codec its container cannot hold -> .mkv.
    Without an asked-for codec a container gets one it holds (VP9 for WebM: see formats.video_codec)."""
    if ext:
        return target, None
    fmt = formats.output_format(target)
    if fmt is None or not formats.is_container(fmt) or formats.video_codec(fmt) is None:
        return target.with_suffix(".mp4"), f"{src.suffix} is not a container segsynth writes: written as .mp4"
    if codec and formats.video_codec(fmt, codec) is None:
        return target.with_suffix(".mkv"), f"{codec} does not fit {src.suffix}: written as .mkv"
    return target, None


def expand(inputs: list[str], out: Path, *, pattern: str | None = None, recursive: bool = False,
           ext: str | None = None, probe: bool = False, codec: str | None = None) -> Plan:
    """The plan of a batch. What FFmpeg reads decides what is a video: a file with an extension
    one of FFmpeg's formats claims (or any file matching ``pattern``, or any file at all with
    ``probe``) is opened and looked at; pictures, text, audio and what FFmpeg cannot read are
    not videos. Outputs mirror the inputs' folders under ``out`` with the input's extension
    (``ext``: another one), in a container that holds their codec (see _output)."""
    out = out.resolve()
    if ext:
        ext = "." + ext.lstrip(".")
        fmt = formats.output_format(f"x{ext}")
        if fmt is None or formats.video_codec(fmt, codec) is None:
            raise InputError(f"--ext {ext}: FFmpeg writes no video{' in ' + codec if codec else ''} into {ext} files")
    plan, seen = Plan(), {}
    for src, rel in _found(inputs, pattern, recursive):
        kind = formats.extension_kind(src)
        if kind != "media" and not (pattern or probe):
            plan.skipped.append((src, "a picture" if kind == "picture" else "no media extension (--probe looks "
                                                                              "inside)"))
            continue
        target = out / (rel.with_suffix(ext) if ext else rel)
        try:
            why = demux.probe(src)
        except InputError:
            # named as media (clip.mp4) but unreadable: a video, which its worker fails and says why;
            # otherwise (notes.txt) not a video
            why = None if formats.output_format(src) is not None else "not media FFmpeg reads"
        if why is not None:
            plan.skipped.append((src, why))
            continue
        target, note = _output(src, target, ext, codec)
        if target in seen:
            raise InputError(f"{src} and {seen[target]} would both be written to {target}")
        if target.resolve() == src.resolve():
            raise OutputError(f"{target} would overwrite its input; choose another --out")
        seen[target] = src
        plan.videos.append((src.resolve(), target, note))
    if not plan.videos:
        raise InputError(f"no videos found in {', '.join(inputs)}: " + _skipped_line(plan.skipped))
    return plan


def _skipped_line(skipped: list[tuple[Path, str]]) -> str:
    names = sorted(f"{src.name} ({why})" for src, why in skipped)
    return f"skipped {len(names)} file{'s' if len(names) != 1 else ''} that {'are' if len(names) != 1 else 'is'} " \
           f"not {'videos' if len(names) != 1 else 'a video'}: {', '.join(names[:20])}" + (
               f" and {len(names) - 20} more" if len(names) > 20 else "")


def settings_hash(stream: StreamTemplate, models: ModelConfig) -> str:
    """What decides an output: the stream's and the models' settings (not where or how fast they
    run: threads, the cache, fusing) and segsynth's version."""
    kept = {k: v for k, v in dataclasses.asdict(models).items() if k not in ("threads", "cache_dir", "fused")}
    text = json.dumps({"version": __version__, **dict(stream.fields), **kept}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Manifest:
    """``DIR/manifest.jsonl``: one record per line, appended and synced as files end; the last
    record of an input is its state."""

    def __init__(self, path: Path) -> None:
        self.path, self.last = path, {}
        if path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                    self.last[record["input"]] = record
                except (ValueError, KeyError, TypeError):
                    log.warning("warning: %s line %d is not a record (a run killed mid-write?); ignored", path, number)

    def done(self, task: Task) -> bool:
        record = self.last.get(task.source)
        return (record is not None and record.get("status") in ("done", "skipped") and record.get("sha256") ==
                task.sha256 and record.get("settings") == task.settings and Path(task.output).is_file())

    def append(self, record: Record) -> None:
        line = json.dumps(asdict(record)) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.last[record.input] = asdict(record)


def remove_partials(out: Path) -> int:
    """Remove the temporary files of outputs that never completed (a killed or aborted run)."""
    removed = 0
    for path in out.rglob(PARTIAL) if out.is_dir() else ():
        path.unlink(missing_ok=True)
        removed += 1
    return removed
