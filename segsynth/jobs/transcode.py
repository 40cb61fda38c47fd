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
import logging
import os
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from segsynth.core.errors import OutputError
from segsynth.core.grammar import GPU_BACKENDS
from segsynth.stream.io import demux

log = logging.getLogger("segsynth")
import dataclasses

from segsynth.core.config import TranscodeConfig
from segsynth.jobs.batch import (
    LOCK,
    MANIFEST,
    WORKER_LOCK,
    Manifest,
    Record,
    Task,
    _skipped_line,
    expand,
    remove_partials,
    settings_hash,
)
from segsynth.jobs.workers import run_local, run_ray


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


def transcode(job: TranscodeConfig, *, stop: threading.Event | None = None, abort: threading.Event | None = None,
              quiet: bool = False) -> dict:
    """Run every video of ``job.inputs`` into ``job.out``; returns the summary (counts, rates,
    ``table``, ``line``). What is a video, and where each goes: batch.expand."""
    stop, abort = stop or threading.Event(), abort or threading.Event()
    out = job.out
    plan = expand(list(job.inputs), out, pattern=job.pattern, recursive=job.recursive, ext=job.ext, probe=job.probe,
                  codec=job.stream.get("codec"))
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
        settings = settings_hash(job.stream, job.models)
        tasks, records = [], []
        for src, target, note in plan.videos:
            try:
                task = Task(str(src), str(target), src.stat().st_size, demux.sha256_of(src), settings, note)
            except OSError as exc:
                task = Task(str(src), str(target), 0, "", settings, note)
                records.append(Record.of(task, "failed", error=f"cannot read it: {exc.strerror or exc}"))
                continue
            if job.resume and manifest.done(task):
                records.append(Record.of(task, "skipped", attempts=0))
            else:
                tasks.append(task)
        for record in records:
            manifest.append(record)
        total = len(plan.videos)
        log.info("transcode: %d files, %d to run%s into %s%s", total, len(tasks),
                 f", {total - len(tasks) - sum(r.status == 'failed' for r in records)} done before"
                 if job.resume else "", out, f"; {_skipped_line(plan.skipped)}" if plan.skipped else "")
        progress = _BatchProgress(len(tasks), enabled=not quiet)
        start = time.monotonic()
        try:
            if job.ray is not None:
                models = dataclasses.replace(job.models, threads=job.models.threads or 1)
                runner = run_ray(tasks, job.stream, models, address=job.ray,
                                 retry=3 if job.retry is None else job.retry, cpus=models.threads,
                                 gpus=1 if models.backend in GPU_BACKENDS else 0, stop=stop, abort=abort,
                                 on_event=progress.event)
            else:
                models = dataclasses.replace(job.models, threads=job.models.threads or max(1, (os.cpu_count() or 1)
                                                                                          // job.jobs))
                runner = run_local(tasks, job.stream, models, jobs=job.jobs, retry=job.retry or 0, stop=stop,
                                   abort=abort, on_event=progress.event, lock=out / WORKER_LOCK)
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
