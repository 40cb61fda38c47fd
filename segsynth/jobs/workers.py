"""The workers of a batch: one file as one stream session (``transcode_file``), in worker
processes on this machine (``run_local``: spawned, ending with their driver, holding the output
folder's worker lock) or as tasks on a Ray cluster (``run_ray``); each yields a Record per file."""

from __future__ import annotations

import fcntl
import itertools
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path

from segsynth.core.errors import InputError, SegsynthError
from segsynth.stream.session import StreamSession

log = logging.getLogger("segsynth")
from segsynth.core.config import ModelConfig, StreamTemplate
from segsynth.jobs.batch import Record, Task
from segsynth.jobs.models import load_models

# ---- one file (worker) -------------------------------------------------------------------------
_MODELS: dict = {}  # per worker process: ModelConfig -> its ModelSet


def _models(cfg: ModelConfig):
    """The ModelSet of this process for ``cfg``, loaded on first use; (models, load seconds
    when this call loaded them, else 0)."""
    if cfg in _MODELS:
        return _MODELS[cfg], 0.0
    start = time.perf_counter()
    _MODELS[cfg] = load_models(cfg)
    return _MODELS[cfg], time.perf_counter() - start


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


def transcode_file(task: Task, stream: StreamTemplate, models: ModelConfig, report=None, worker: str = "") -> Record:
    """One file as one stream session (atomic output); never raises for a bad file: the
    record says why it failed."""

    record = Record.of(task, "failed", worker=worker)
    start = time.perf_counter()
    try:
        model_set, record.load_seconds = _models(models)
        Path(task.output).parent.mkdir(parents=True, exist_ok=True)
        progress = _FileProgress(report)
        session = StreamSession(stream.config(task.source, (task.output,)), model_set, progress=progress, atomic=True)
        progress.start = time.perf_counter()
        session.start()  # opens the source (and closes it again when it cannot start)
        while not session.join(0.5):
            pass
        session.release()
        if session.error is not None:
            raise session.error
        record.status, record.frames = "done", session.stats().frames_out
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


def _worker_main(name: str, inbox, results, stream: StreamTemplate, models: ModelConfig, lock: Path | None) -> None:
    """A worker process: files from ``inbox`` until None; ("progress", name, frames) and ("done",
    name, record) to ``results``. SIGINT is the driver's (a Ctrl-C reaches the whole process group).
    It ends with its driver (see _die_with_parent) and holds the folder's worker lock."""

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    held = _hold(lock)  # noqa: F841 - released when the process ends
    while (task := inbox.get()) is not None:
        record = transcode_file(task, stream, models, lambda frames: results.put(("progress", name, frames)),
                                worker=name)
        results.put(("done", name, record))


def run_local(tasks: list[Task], stream: StreamTemplate, models: ModelConfig, *, jobs: int, retry: int = 0,
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
        proc = ctx.Process(target=_worker_main, args=(name, inbox, results, stream, models, lock),
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
def ray_task(task: Task, stream: StreamTemplate, models: ModelConfig) -> Record:
    """One file on a Ray worker (models cached per worker process, as locally)."""
    # imported here: Ray is the ray extra
    import ray

    return transcode_file(task, stream, models, worker=ray.get_runtime_context().get_node_id()[:8])


def run_ray(tasks: list[Task], stream: StreamTemplate, models: ModelConfig, *, address: str, retry: int,
            cpus: int, gpus: float, stop: threading.Event, abort: threading.Event, on_event=None):
    """Yield a Record per task from a Ray cluster (``address``: "auto" for the running one, or
    HOST:PORT): one task per file, ``cpus``/``gpus`` each, retried ``retry`` times when its
    worker or node dies; as many in flight as the cluster has room for, so a stop starts
    nothing new."""
    try:
        # imported here: Ray is the ray extra
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
                flight[remote.remote(task, stream, models)] = task
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
