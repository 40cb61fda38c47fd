"""``segsynth run IN OUT``: one stream session from a file to a file, with progress.

Bad input fails before any model is loaded: the source is opened and the outputs checked
first. Signals are the caller's business: ``control(session)`` (a context manager, e.g.
the CLI's SIGINT/SIGTERM handler) is entered while the session runs.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from segsynth.core.config import ModelConfig, StreamConfig
from segsynth.core.errors import InputError
from segsynth.core.grammar import sink_kind
from segsynth.jobs.models import load_models
from segsynth.jobs.progress import Progress
from segsynth.stream.io import mux
from segsynth.stream.io.sources import open_source
from segsynth.stream.session import StreamSession, StreamStats


def run(cfg: StreamConfig, model_cfg: ModelConfig, *, quiet: bool = False, control=None,
        atomic: bool = False, label: str = "run", stats_json: str | None = None) -> tuple[StreamStats, StreamSession]:
    """Run the session to its end; returns its final ``stats()`` and the session. Raises the
    session's error (InputError, OutputError, ...) if it failed. ``stats_json``: where the
    final stats are written (also when the session failed)."""

    source = open_source(cfg)
    session = None
    try:
        for sink in cfg.sinks:
            if sink_kind(sink) in ("file", "hls"):
                mux.check_output(Path(sink), *([] if source.live else [Path(cfg.source)]))
        if stats_json:
            mux.check_output(Path(stats_json), *([] if source.live else [Path(cfg.source)]))
        with load_models(model_cfg) as models:
            total = cfg.max_frames if source.live else min(filter(None, (source.info.declared_frames, cfg.max_frames)),
                                                           default=None)
            with Progress(f"{label} {cfg.source if source.live else Path(cfg.source).name}", total,
                          enabled=not quiet) as progress:
                session = StreamSession(cfg, models, source=source, progress=progress, atomic=atomic)
                with (control(session) if control else contextlib.nullcontext()):
                    try:
                        session.start()
                        while not session.join(0.2):  # short waits: the main thread stays free for signals
                            pass
                    except BaseException:  # e.g. KeyboardInterrupt without a handler: abort, wait, re-raise
                        session.stop(drain=False)
                        _join_through_interrupts(session)  # the models and the source outlive the stages
                        raise
    except BaseException:
        if session is None or session.pipeline is None:
            source.close()  # not handed over: a started session closes its source itself
        raise
    finally:
        if stats_json and session is not None and session.pipeline is not None:
            _write_json(Path(stats_json), session.stats().to_json())
    if session.error is not None:  # a source given up: the outputs are complete and kept; the run still failed
        raise session.error
    stats = session.stats()
    if stats.frames_out == 0:
        raise InputError(f"{cfg.source}: no decodable video frames" +
                         (f"; {stats.problems[0]}" if stats.problems else ""))
    return stats, session


def _join_through_interrupts(session: StreamSession) -> None:
    while True:
        try:
            session.join()
            return
        except KeyboardInterrupt:
            continue


def _write_json(path: Path, stats: dict) -> None:
    with mux.atomic_output(path) as tmp:
        tmp.write_text(json.dumps(stats, indent=2) + "\n")
