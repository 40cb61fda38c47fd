"""Bulk transcoding (``segsynth transcode``): many files, each one stream session, in parallel
worker processes on this machine or as tasks on a Ray cluster.

    inputs (files, folders, globs) -> tasks (input, mirrored output path, size, sha256)
        -> workers (models loaded once per process; one session per file, written under a
           temporary name and renamed when complete) -> records -> DIR/manifest.jsonl

The manifest is written by the driver only, one JSON line per file as it ends (``done``,
``failed`` or ``skipped``) and flushed to disk at once, so it is complete for what finished
whatever happens to the run. ``resume`` skips files already ``done`` with the same input
bytes and settings. One bad file never stops the batch.

Stopping (``stop``): no new file starts and the running ones finish. Aborting (``abort``):
the workers are killed; their files never reach a final name (the temporary ones are removed).
"""

from __future__ import annotations

import fcntl
import fnmatch
import glob
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from segsynth import __version__
from segsynth.core import formats
from segsynth.core.config import StreamConfig
from segsynth.core.errors import InputError, OutputError, SegsynthError
from segsynth.engine.select import GPU_BACKENDS
from segsynth.stream.infer.models import ModelSet
from segsynth.stream.io import demux
from segsynth.stream.session import StreamSession

log = logging.getLogger("segsynth")
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


def settings_hash(options: dict) -> str:
    """What decides an output: the stream and model options and segsynth's version."""

    text = json.dumps({"version": __version__, **options}, sort_keys=True, default=str)
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


# ---- one file (worker) -------------------------------------------------------------------------
_MODELS: dict = {}  # per worker process: model options -> (ModelSet, seconds it took to load)


def _models(model_options: dict):
    """The ModelSet of this process for ``model_options``, loaded on first use; (models, load
    seconds when this call loaded them, else 0)."""

    key = json.dumps(model_options, sort_keys=True, default=str)
    if key in _MODELS:
        return _MODELS[key], 0.0
    start = time.perf_counter()
    models = ModelSet.load(**model_options)
    _MODELS[key] = models
    return models, time.perf_counter() - start


class _FileProgress:
    """The session's per-frame callback: when the first frame came out, and frames so far
    (reported through ``report(frames)`` every ``every`` frames)."""

    def __init__(self, report=None, every: int = 25) -> None:
        self.frames, self.report, self.every = 0, report, every
        self.start, self.first = time.perf_counter(), None

    def update(self, n: int = 1) -> None:
        self.frames += n
        if self.first is None:
            self.first = time.perf_counter() - self.start
        if self.report is not None and self.frames % self.every == 0:
            self.report(self.frames)


def transcode_file(task: Task, stream_options: dict, model_options: dict, report=None, worker: str = "") -> Record:
    """One file as one stream session (atomic output); never raises for a bad file: the
    record says why it failed."""


    record = Record.of(task, "failed", worker=worker)
    start = time.perf_counter()
    try:
        models, record.load_seconds = _models(model_options)
        Path(task.output).parent.mkdir(parents=True, exist_ok=True)
        cfg = StreamConfig(source=task.source, sinks=(task.output,), **stream_options)
        progress = _FileProgress(report)
        session = StreamSession(cfg, models, progress=progress, atomic=True)
        progress.start = time.perf_counter()
        session.start()  # opens the source (and closes it again when it cannot start)
        while not session.join(0.5):
            pass
        session.release()
        stats = session.stats()
        if session.error is not None:
            raise session.error
        record.status, record.frames = "done", stats["frames_out"]
        record.first_frame_seconds = progress.first
    except SegsynthError as exc:
        record.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - a bug or an odd file: reported in the record, the batch goes on
        log.debug("transcode %s", task.source, exc_info=True)
        record.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    record.seconds = time.perf_counter() - start
    record.fps = record.frames / record.seconds if record.seconds else 0.0
    return record


# ---- local worker processes -------------------------------------------------------------------
def _die_with_parent() -> None:
    """End this worker the moment its driver process ends, however it ends (kill -9 included):
    a thread waits on the sentinel multiprocessing gives every child of its parent."""

    parent = mp.parent_process()

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(70)  # its file never reaches a final name; the next run removes the temporary one

    if parent is not None:
        threading.Thread(target=watch, name="segsynth-parent-watch", daemon=True).start()


def _hold(lock: Path | None):
    """A shared lock on the output folder's worker lock while this worker lives: a later run
    cannot start on the folder until every worker of this one has ended."""

    if lock is None:
        return None
    handle = open(lock, "a")  # noqa: SIM115 - held until the process ends
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle


def _worker_main(name: str, inbox, results, stream_options: dict, model_options: dict, lock: Path | None) -> None:
    """A worker process: files from ``inbox`` until None; ("progress", name, frames) and ("done",
    name, record) to ``results``. SIGINT is the driver's (a Ctrl-C reaches the whole process group).
    It ends with its driver (see _die_with_parent) and holds the folder's worker lock."""

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    held = _hold(lock)  # noqa: F841 - released when the process ends
    while (task := inbox.get()) is not None:
        record = transcode_file(task, stream_options, model_options,
                                lambda frames: results.put(("progress", name, frames)), worker=name)
        results.put(("done", name, record))


def run_local(tasks: list[Task], stream_options: dict, model_options: dict, *, jobs: int, retry: int = 0,
              stop: threading.Event, abort: threading.Event, on_event=None, lock: Path | None = None):
    """Yield a Record per task as it ends, from ``jobs`` worker processes (spawned: nothing
    inherited but the options), each given its next file when it is free. A worker that dies
    takes its file with it: the file is retried up to ``retry`` times on a new worker, then
    recorded as failed. ``on_event(kind, worker, payload)``: "start" (the input) and
    "progress" (frames so far) as they happen. ``lock``: the worker lock each worker holds
    (shared) while it lives."""

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    pending, attempts = list(reversed(tasks)), dict.fromkeys((t.source for t in tasks), 0)
    workers: dict[str, tuple] = {}  # name -> (process, its inbox)
    busy: dict[str, Task] = {}  # name -> the file it works on
    numbers = itertools.count(1)

    def spawn() -> str:
        name, inbox = f"worker-{next(numbers)}", ctx.Queue()
        proc = ctx.Process(target=_worker_main, args=(name, inbox, results, stream_options, model_options, lock),
                           name=f"segsynth-{name}", daemon=True)
        proc.start()
        workers[name] = (proc, inbox)
        return name

    def assign(name: str) -> None:
        if pending and not stop.is_set():
            task = busy[name] = pending.pop()
            attempts[task.source] += 1
            workers[name][1].put(task)
            if on_event is not None:
                on_event("start", name, task.source)

    for _ in range(min(jobs, len(tasks))):
        assign(spawn())
    checked = time.monotonic()
    try:
        while busy and not abort.is_set():
            try:
                kind, name, payload = results.get(timeout=0.5)
            except queue.Empty:
                kind = None
            if kind is None or time.monotonic() - checked > 1:
                checked = time.monotonic()
                for dead, (proc, _) in list(workers.items()):
                    if proc.is_alive():
                        continue
                    del workers[dead]  # killed, out of memory: its file is retried or failed
                    task = busy.pop(dead, None)
                    if task is not None and attempts[task.source] <= retry:
                        pending.append(task)
                    elif task is not None:
                        yield Record.of(task, "failed", error=f"the worker process died (exit code {proc.exitcode})",
                                        attempts=attempts[task.source], worker=dead)
                    if pending and not stop.is_set():
                        assign(spawn())
            if kind is None:
                continue
            if kind == "progress" and on_event is not None:
                on_event(kind, name, payload)
            if kind == "done":
                busy.pop(name, None)
                payload.attempts = attempts[payload.input]
                yield payload
                assign(name)
    finally:
        for proc, inbox in workers.values():
            inbox.put(None)
        deadline = time.monotonic() + (0 if abort.is_set() else 30)
        for proc, _ in workers.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()


# ---- Ray -------------------------------------------------------------------------------------
def ray_task(task: Task, stream_options: dict, model_options: dict) -> Record:
    """One file on a Ray worker (models cached per worker process, as locally)."""
    import ray

    return transcode_file(task, stream_options, model_options, worker=ray.get_runtime_context().get_node_id()[:8])


def run_ray(tasks: list[Task], stream_options: dict, model_options: dict, *, address: str, retry: int,
            cpus: int, gpus: float, stop: threading.Event, abort: threading.Event, on_event=None):
    """Yield a Record per task from a Ray cluster (``address``: "auto" for the running one, or
    HOST:PORT): one task per file, ``cpus``/``gpus`` each, retried ``retry`` times when its
    worker or node dies; as many in flight as the cluster has room for, so a stop starts
    nothing new."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'segsynth[ray]'") from None
    try:
        host = address.split(":")[0] if address != "auto" else None
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                 **({"_node_ip_address": host} if host in ("127.0.0.1", "localhost") else {}))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"--ray {address}: cannot reach a Ray cluster ({str(exc).splitlines()[0]})") from None
    remote = ray.remote(ray_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=retry)
    room = max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus, 1)))  # files in flight
    pending, flight = list(reversed(tasks)), {}
    try:
        while (flight or (pending and not stop.is_set())) and not abort.is_set():
            while pending and not stop.is_set() and len(flight) < room:
                task = pending.pop()
                flight[remote.remote(task, stream_options, model_options)] = task
                if on_event is not None:
                    on_event("start", "ray", task.source)
            ready, _ = ray.wait(list(flight), num_returns=1, timeout=0.5)
            for ref in ready:
                task = flight.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - retries used up: the worker or node died each time
                    record = Record.of(task, "failed", error=f"Ray: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                                       attempts=retry + 1)
                yield record
    finally:
        for ref in flight:
            ray.cancel(ref, force=True)
        ray.shutdown()


# ---- the batch (driver) ------------------------------------------------------------------------
class _BatchProgress:
    """One overall bar (files, frames, ETA) and a line per worker on a terminal; plain log lines
    (one per file, and the totals every few seconds) otherwise."""

    def __init__(self, total: int, enabled: bool, interval: float = 5.0) -> None:

        self.total, self.enabled, self.interval = total, enabled, interval
        self.files = self.frames = 0
        self.start = self._last = time.monotonic()
        self.running: dict[str, int] = {}  # worker -> frames of its current file
        self.bar = None
        if enabled and sys.stderr.isatty():

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.overall = self.bar.add_task("files", total=total, info="")
            self.lines: dict[str, int] = {}
            self.bar.start()

    def event(self, kind: str, worker: str, payload) -> None:
        if kind == "start":
            self.running[worker] = 0
            if self.bar is not None:
                line = self.lines.get(worker)
                text = f"  {worker}: {Path(payload).name}"
                if line is None:
                    self.lines[worker] = self.bar.add_task(text, total=None, info="")
                else:
                    self.bar.reset(line, description=text, total=None)
        elif kind == "progress":
            self.running[worker] = payload
            if self.bar is not None and worker in self.lines:
                self.bar.update(self.lines[worker], completed=payload, info=f"{payload} frames")
        elif kind == "done":
            self.running.pop(worker, None)
            self.files += 1
            self.frames += payload.frames
            what = "done" if payload.status == "done" else f"failed: {payload.error}"
            if self.bar is not None:
                self.bar.update(self.overall, completed=self.files, info=self._rates())
                self.bar.console.log(f"{Path(payload.input).name}: {what}")
            elif self.enabled:
                log.info("%s: %s (%d frames, %.1f s)", Path(payload.input).name, what, payload.frames,
                         payload.seconds)
        if self.bar is None and self.enabled and time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            log.info("transcode: %d/%d files, %s", self.files, self.total, self._rates())

    def _rates(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        frames = self.frames + sum(self.running.values())
        text = f"{frames} frames, {frames / elapsed:.1f} frames/s"
        if self.files:
            text += f", ETA {(self.total - self.files) * elapsed / self.files:.0f} s"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _locked(out: Path):
    """An exclusive lock on ``out`` for this run (two runs into one folder would fight over its
    files and manifest); released when the process ends, however it ends. Workers of an earlier
    run that outlive their driver for a moment hold WORKER_LOCK (shared): the folder is taken
    until they are gone too."""

    handle = open(out / LOCK, "a")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise OutputError(f"{out} is being written by another segsynth transcode") from None
    with open(out / WORKER_LOCK, "a") as workers:
        try:
            fcntl.flock(workers, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise OutputError(f"{out} is being written by the workers of an earlier segsynth transcode, still "
                              "running; try again in a few seconds") from None
    return handle


def transcode(inputs: list[str], out: Path, *, stream_options: dict, model_options: dict, jobs: int = 1,
              pattern: str | None = None, recursive: bool = False, ext: str | None = None, resume: bool = False,
              retry: int | None = None, ray: str | None = None, stop: threading.Event | None = None,
              abort: threading.Event | None = None, quiet: bool = False, probe: bool = False) -> dict:
    """Run every video of the inputs into ``out``; returns the summary (counts, rates, ``table``,
    ``line``). What is a video, and where each goes: ``expand``."""
    stop, abort = stop or threading.Event(), abort or threading.Event()
    out = Path(out)
    plan = expand(inputs, out, pattern=pattern, recursive=recursive, ext=ext, probe=probe,
                  codec=stream_options.get("codec"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot make {out}: {exc.strerror or exc}") from None
    lock = _locked(out)
    try:
        stale = remove_partials(out)
        if stale:
            log.info("removed %d unfinished outputs of an earlier run", stale)
        manifest = Manifest(out / MANIFEST)
        settings = settings_hash({**stream_options, **{k: v for k, v in model_options.items()
                                                        if k not in ("threads", "cache_dir", "fused")}})
        tasks, records = [], []
        for src, target, note in plan.videos:
            try:
                task = Task(str(src), str(target), src.stat().st_size, demux.sha256_of(src), settings, note)
            except OSError as exc:
                task = Task(str(src), str(target), 0, "", settings, note)
                records.append(Record.of(task, "failed", error=f"cannot read it: {exc.strerror or exc}"))
                continue
            if resume and manifest.done(task):
                records.append(Record.of(task, "skipped", attempts=0))
            else:
                tasks.append(task)
        for record in records:
            manifest.append(record)
        total = len(plan.videos)
        log.info("transcode: %d files, %d to run%s into %s%s", total, len(tasks),
                 f", {total - len(tasks) - sum(r.status == 'failed' for r in records)} done before"
                 if resume else "", out, f"; {_skipped_line(plan.skipped)}" if plan.skipped else "")
        progress = _BatchProgress(len(tasks), enabled=not quiet)
        start = time.monotonic()
        try:
            if ray is not None:
                threads = model_options.get("threads") or 1

                runner = run_ray(tasks, stream_options, {**model_options, "threads": threads}, address=ray,
                                 retry=3 if retry is None else retry, cpus=threads,
                                 gpus=1 if model_options.get("backend") in GPU_BACKENDS else 0, stop=stop,
                                 abort=abort, on_event=progress.event)
            else:
                threads = model_options.get("threads") or max(1, (os.cpu_count() or 1) // jobs)
                runner = run_local(tasks, stream_options, {**model_options, "threads": threads}, jobs=jobs,
                                   retry=retry or 0, stop=stop, abort=abort, on_event=progress.event,
                                   lock=out / WORKER_LOCK)
            for record in runner:
                manifest.append(record)
                records.append(record)
                progress.event("done", record.worker or "ray", record)
        finally:
            progress.close()
            remove_partials(out)  # every worker has ended: what is left was abandoned (a dead node, an abort)
        return _summary(records, total, time.monotonic() - start, out, plan.skipped)
    finally:
        lock.close()


def _summary(records: list[Record], total: int, seconds: float, out: Path, skipped: list[tuple[Path, str]]) -> dict:
    counts = {status: sum(r.status == status for r in records) for status in ("done", "skipped", "failed")}
    ran = [r for r in records if r.status == "done"]
    frames = sum(r.frames for r in ran)
    not_run = total - len(records)
    line = (f"{total} files: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
            + (f", {not_run} not started" if not_run else "")
            + f"; {frames} frames in {seconds:.1f} s ({frames / seconds if seconds else 0:.2f} frames/s, "
              f"{len(ran) * 60 / seconds if seconds else 0:.2f} files/min)")
    rows = [f"transcode into {out}: {line}"]
    if skipped:
        rows.append(_skipped_line(skipped))
    notes: dict[str, list[str]] = {}  # each note once, with the files it is about
    for r in records:
        if r.note and r.status == "done":
            notes.setdefault(r.note, []).append(Path(r.input).name)
    rows += [f"{len(names)} file{'s' if len(names) > 1 else ''} ({', '.join(names[:5])}"
             f"{', ...' if len(names) > 5 else ''}): {note}" for note, names in notes.items()]
    failed = [r for r in records if r.status == "failed"]
    if failed:
        rows.append("failed:")
        rows += [f"  {Path(r.input).name}: {r.error}" for r in failed]
    loads = [r.load_seconds for r in ran if r.load_seconds]
    firsts = [r.first_frame_seconds for r in ran if r.first_frame_seconds is not None]
    return {**counts, "not_started": not_run, "not_videos": [str(src) for src, _ in skipped], "frames": frames,
            "seconds": seconds,
            "fps": frames / seconds if seconds else 0.0,
            "files_per_minute": len(ran) * 60 / seconds if seconds else 0.0,
            "model_load_seconds": loads, "first_frame_seconds": firsts, "line": line, "table": "\n".join(rows)}
