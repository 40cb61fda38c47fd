"""StreamSession: one stream - a source, the infer step over a shared ModelSet, one or more
sinks - running on the threaded pipeline, started, changed and stopped by a program.

    models = ModelSet.load(segmenter="ade20k+voc", generator="default")
    s = StreamSession(StreamConfig(source="in.mp4", sinks=["out.mp4"]), models)
    s.start()                        # returns at once
    s.update(remap="person=animal")  # from the next batch on; no restart, no rebuild
    s.stop(drain=True); s.join(timeout=30)
    s.state, s.stats()

States: created -> running -> draining -> closed | failed. A session owns its threads and
closes its source, outputs and metric series (also a source or sinks handed to it); it never
installs signal handlers
(the CLI and the service own signals). ``update``, ``stop``, ``join``, ``state``,
``stats``, ``watch`` and ``unwatch`` may be called from any thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import av

from segsynth.core import formats
from segsynth.core.config import StreamConfig
from segsynth.core.errors import (
    InputError,
    OutputError,
    SegsynthError,
    SourceError,
    at_field,
)
from segsynth.core.grammar import (
    SESSION_VIEWS,
    check_seed,
    is_image_sequence,
    is_live,
    sink_kind,
)
from segsynth.core.metrics import StreamMetrics
from segsynth.stream import claims
from segsynth.stream.infer.models import ModelSet
from segsynth.stream.infer.synth import Synthesize
from segsynth.stream.io import mux
from segsynth.stream.io.preview import PreviewSink
from segsynth.stream.io.sinks import (
    PUSH_FORMATS,
    Encoding,
    FileSink,
    StreamingSink,
    TeeSink,
    hls_sink,
    segment_sink,
)
from segsynth.stream.io.sources import open_source
from segsynth.stream.pipeline import Pipeline
from segsynth.stream.render import compose

log = logging.getLogger("segsynth")
DISPLAY_VIEWS = ("overlay", "side-by-side", "grid")  # views that show the input frame itself
PICTURE_VIEWS = ("synth", "side-by-side", "grid")  # views that show the synthesis: the others do not pay for one
_ids = itertools.count(1)


def new_id() -> str:
    """A stream id no other stream of this process has been given ("stream-N")."""
    return f"stream-{next(_ids)}"


class StreamSession:
    """``source`` and ``sinks`` override what ``config`` names (a SyntheticSource, a
    MemorySink...); ``atomic`` file outputs appear under their name only when complete;
    ``progress.update()`` is called per frame written."""

    def __init__(self, config: StreamConfig, models: ModelSet, *, source=None, sinks: list | None = None,
                 progress=None, atomic: bool = False) -> None:
        self.config, self.models = config, models
        self.id = config.id or new_id()
        self.view = models.view(config.view, style=config.style, seed=config.seed)
        table = models.remap(config.remap)
        z = models.z(style=config.style, seed=config.seed)
        gen = models.generator
        stabilize = config.stabilization
        parts = ("all",) if stabilize == "off" else ("segment", "synth")
        self.infer = Synthesize(models.segmenter, gen, table, z, stabilize, models.fit(config.fit),
                                gen.size if gen is not None else None,
                                chains={part: models.fused(part) for part in parts}, paint=self.view in PICTURE_VIEWS,
                                incremental=config.incremental == "on")
        self._source, self._sinks, self.progress, self.atomic = source, sinks, progress, atomic
        self.source = self.sink = self.pipeline = self.metrics = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop_requested: bool | None = None  # the drain flag of the first stop() (or an abort after it)
        self.policy = config.policy
        self._watchers: set = set()  # see watch()

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> "StreamSession":
        """Open the source and start the stages; InputError/OutputError for what cannot be opened."""

        with self._lock:
            if self.pipeline is not None or self._stop_requested is not None:
                raise RuntimeError(f"session {self.id} was started or stopped already")
            cfg = self.config
            self._claim()
            try:
                with at_field("source"):
                    source = self._source or open_source(cfg)
            except BaseException:
                claims.release(self.id)
                raise
            sinks = []
            try:
                source.model_size, source.need_display = self.models.size, self._needs_display(self.view)
                self.policy = cfg.policy or ("latest" if source.live else "lossless")
                sinks = self._sinks or []
                for spec in () if self._sinks else cfg.sinks:
                    with at_field("sinks"):
                        sinks.append(self._make_sink(spec, source))
                source.decode_audio = set().union(*(s.decoded_audio for s in sinks))
                self.source, self.sinks = source, sinks
                self.sink = sinks[0] if len(sinks) == 1 else TeeSink(sinks)
                try:
                    self.metrics = StreamMetrics(self.id)
                    if self.infer.reuse is not None:
                        self.metrics.computed(self.infer.reuse.shares)
                except ValueError as exc:
                    raise InputError(f"id: {exc}") from None
                if hasattr(source, "on_reconnect"):
                    source.on_reconnect, source.on_lost = self.metrics.reconnected, self.metrics.lost
                w, h = self.models.size
                self.pipeline = Pipeline(source, self.infer, self.sink, model_shape=(h, w, 3), batch=cfg.batch,
                                         policy=self.policy,
                                         ring_slots=cfg.ring_slots or (2 * cfg.batch if self.policy == "latest" else 8),
                                         allocator=self.infer.pinned_allocator(), render=self._render,
                                         progress=self.progress, observer=self.metrics, on_done=self._finished,
                                         name=f"segsynth-{self.id}", max_frames=cfg.max_frames,
                                         duration=cfg.duration)
                self.pipeline.start()
            except BaseException:
                self.pipeline = None
                if self.metrics is not None:
                    self.metrics.close()
                for sink in sinks:
                    sink.close()  # nothing was written yet; this releases what the sink holds
                source.close()
                claims.release(self.id)
                raise
        if self._stop_requested is not None:  # a stop (a signal) arrived while starting
            self.pipeline.stop(self._stop_requested)
        return self

    def _claim(self) -> None:
        """The files this session will write and read, claimed before anything is opened: one
        writer per path in this process, and never a path another stream reads (Conflict)."""

        cfg = self.config
        writes = [] if self._sinks else [s for s in cfg.sinks if sink_kind(s) in ("file", "hls")]
        reads = [] if self._source or is_live(cfg.source) or is_image_sequence(cfg.source) else [cfg.source]
        claims.claim(self.id, writes, reads)

    def _make_sink(self, spec: str, source):
        """The sink an output string names: a file (or a file series), a push to a server, an
        HLS playlist, an MJPEG preview."""

        cfg, kind = self.config, sink_kind(spec)
        if kind == "preview":
            return PreviewSink(spec)
        live = kind in ("push", "hls") or self.policy == "latest"
        # no --codec: libx264 for streams, the first encoder a file's container holds (VP9 for WebM)
        codec = cfg.codec or (formats.video_codec(formats.output_format(spec)) if kind == "file" else "libx264")
        encoding = Encoding(codec, cfg.crf, cfg.preset, cfg.bitrate, low_latency=live, gray=self.view == "ids")
        if kind == "push":
            scheme = spec.split("://", 1)[0].lower()
            options = {"rtsp_transport": "tcp"} if scheme.startswith("rtsp") else {}
            return StreamingSink(spec, source.info, encoding, fmt=PUSH_FORMATS[scheme], options=options,
                                 retries=cfg.reconnect_max)
        mux.check_output(Path(spec), *([Path(source.info.name)] if not source.live else []))
        if kind == "hls":
            return hls_sink(spec, source.info, encoding)
        if cfg.segment_time:
            return segment_sink(spec, source.info, encoding, cfg.segment_time)
        return FileSink(spec, source.info, encoding, atomic=self.atomic, tag=self.id)

    def stop(self, drain: bool = True) -> None:
        """``drain``: stop reading and finish (encode, flush, close) what was read; otherwise
        abort: stop at the next check and close the outputs as they are. Safe from a signal
        handler, also while ``start()`` runs on the same thread."""
        if self._stop_requested is None or not drain:
            self._stop_requested = drain
        pipeline = self.pipeline
        if pipeline is not None:
            pipeline.stop(drain)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the session is closed or failed; False if ``timeout`` ran out first."""
        return True if self.pipeline is None else self.pipeline.join(timeout)

    @property
    def state(self) -> str:
        if self.pipeline is None:
            return "closed" if self._stop_requested is not None else "created"
        state = self.pipeline.state
        return "failed" if state == "closed" and self.error is not None else state

    def release(self) -> None:
        """Remove what the session still shows of itself once it is over (the down series of a
        failed stream, which stays until then so an alert can see it)."""
        if self.metrics is not None and self.state in ("closed", "failed"):
            self.metrics.close()

    def _finished(self, pipeline: Pipeline) -> None:
        """Called by the pipeline's last thread once everything is closed: a failed run leaves
        no half-written output, a run cut short no atomic output; a finished one commits them.
        An output dropped while the others went on (a full disk, a push that gave up) keeps
        what it recorded, unless it is atomic. Each sink is settled on its own, so one failing
        rename leaves no other output unsettled. A live source given up after ``reconnect_max``
        ends the run with its outputs kept, and the session ``failed`` with the reason."""
        if pipeline.errors:
            self.error = self._explain(*pipeline.errors[0])
        dropped = {id(sink) for sink, _ in getattr(self.sink, "failed", [])}  # by a TeeSink
        for sink in self.sinks:
            atomic = getattr(sink, "atomic", False)
            try:
                if pipeline.errors or (atomic and (id(sink) in dropped or pipeline.cut_short)):
                    getattr(sink, "discard", lambda: None)()
                elif id(sink) not in dropped:
                    getattr(sink, "commit", lambda: None)()
            except BaseException as exc:  # noqa: BLE001 - a commit that fails (rename) fails the session
                if self.error is None:
                    self.error = self._explain("encode", exc)
                pipeline.errors.append(("encode", exc))
        lost = getattr(self.source, "lost", None)
        if lost and self.error is None:
            self.error = SourceError(lost)
        claims.release(self.id)
        self.metrics.close(down=self.error is not None)

    def _explain(self, stage: str, exc: BaseException) -> BaseException:
        """Media errors as one line that says which side failed; bugs keep their traceback."""

        if isinstance(exc, SegsynthError) or not isinstance(exc, (OSError, av.FFmpegError)):
            return exc
        if stage == "decode":
            err = InputError(f"reading {self.source.info.name} failed: {formats.ffmpeg_message(exc)}")
        else:
            err = OutputError(f"writing {', '.join(self.config.sinks) or 'the output'} failed: "
                              f"{formats.ffmpeg_message(exc)}")
        err.__cause__ = exc
        return err

    # ---- changes while running ----------------------------------------------------------------
    def update(self, *, remap: str | None = None, view: str | None = None, seed: int | None = None,
               style=None) -> None:
        """Change the remap rules, the view, or z (``seed`` or ``style`` image) of a running
        session; each takes effect from the next batch. Bad values raise InputError and change
        nothing."""

        check_seed(seed)
        table = self.models.remap(remap) if remap is not None else None
        z = self.models.z(style=style, seed=seed) if seed is not None or style is not None else None
        if view is not None:
            if view not in SESSION_VIEWS:
                raise InputError(f"view: unknown view {view!r}; choose one of: {', '.join(SESSION_VIEWS)}")
            if (view == "ids") != (self.view == "ids"):
                raise InputError("view: ids writes grayscale video; it cannot be switched to or from while running")
            self.models.view(view)
        self.infer.update(table=table, z=z, paint=None if view is None else self._needs_picture(view))
        if view is not None:
            self.view = view
            if self.source is not None:
                self.source.need_display = self._needs_display(view)

    def watch(self, watcher) -> None:
        """Call ``watcher(display, result)`` for every frame from now on (in the encode thread:
        keep it short): ``display`` the input frame (RGB, upright), ``result`` its FrameResult.
        While any watcher is attached the source decodes the input frames for display too, and
        the picture is painted whatever the view."""
        self._watchers.add(watcher)
        self.infer.update(paint=True)
        if self.source is not None:
            self.source.need_display = True

    def unwatch(self, watcher) -> None:
        self._watchers.discard(watcher)
        self.infer.update(paint=self._needs_picture(self.view))
        if self.source is not None:
            self.source.need_display = self._needs_display(self.view)

    def _needs_display(self, view: str) -> bool:
        return view in DISPLAY_VIEWS or bool(self._watchers)

    def _needs_picture(self, view: str) -> bool:
        return view in PICTURE_VIEWS or bool(self._watchers)  # a watcher (the studio's live view) shows it

    def _render(self, result, meta):
        """The picture for the current view (encode thread). Frames read before a switch to a
        view that shows the input have no input frame: they show the synthesis (or the labels)."""
        for watcher in list(self._watchers):
            watcher(meta.get("display"), result)
        view = self.view
        if view in DISPLAY_VIEWS and meta.get("display") is None:
            view = "synth" if result.synth is not None else "labels"
        if view in PICTURE_VIEWS and result.synth is None and self.models.generator is not None:
            view = "labels"  # inferred before a switch to a view with the picture (without a generator:
            # side-by-side and grid show the input and the labels)
        return compose(view, meta.get("display"), result.labels, result.synth, self.models.label_set, meta["size"],
                       legend=self.config.legend)

    # ---- reporting ------------------------------------------------------------------------------
    def stats(self) -> StreamStats:
        """What the session did so far: frames, drops, rates, latency and stage times (percentiles
        over the most recent frames: bounded memory), each output's state, problems, the error."""
        p = self.pipeline
        stats = StreamStats(self.id, self.state, self.config.source, list(self.config.sinks), self.view,
                            problems=list(self.source.problems) if self.source is not None else [],
                            error=str(self.error) if self.error is not None else None)
        if p is not None:
            s = p.stats()
            failed = {id(sink): exc for sink, exc in getattr(self.sink, "failed", [])}
            stats.outputs = [OutputStats(getattr(k, "name", str(k)), id(k) not in failed,
                                         str(failed[id(k)]).splitlines()[0] if id(k) in failed else None,
                                         getattr(k, "reconnects", 0), getattr(k, "skipped", 0)) for k in self.sinks]
            stats.reconnects = getattr(self.source, "reconnects", 0)
            stats.frames_in, stats.frames_inferred, stats.frames_out = s.frames_in, p.frames_inferred, s.frames_out
            stats.dropped, stats.fps, stats.seconds, stats.stages = s.dropped, s.fps, s.seconds, s.stages
            stats.latency_ms = {k.removesuffix("_ms"): v for k, v in s.latency.items()}
            stats.queues = {"ring": p.ring.depth, "results": p.results.qsize()}
            stats.computed = self.infer.reuse.shares() if self.infer.reuse is not None else {}
        return stats


@dataclass
class OutputStats:
    """One output of a stream: whether it is still written (a failed one was dropped, the
    others went on), why not, and a push's reconnects and skipped frames."""

    name: str
    ok: bool = True
    error: str | None = None
    reconnects: int = 0
    skipped: int = 0


@dataclass
class StreamStats:
    """A StreamSession's figures: what the CLI's summary, the service's JSON (``to_json``) and
    its metrics read. ``latency_ms``: p50/p95/p99 from a frame's arrival to its mux; ``stages``:
    per stage (decode, infer, encode) mean_ms and p95_ms; ``computed``: with --incremental on, the
    share of the frames segmented and of the pictures painted (the rest reused, exactly)."""

    id: str
    state: str
    source: str
    sinks: list[str]
    view: str
    frames_in: int = 0
    frames_inferred: int = 0
    frames_out: int = 0
    dropped: int = 0
    reconnects: int = 0
    fps: float = 0.0
    seconds: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    queues: dict[str, int] = field(default_factory=dict)
    computed: dict[str, float] = field(default_factory=dict)  # --incremental: share segmented, share painted
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    outputs: list[OutputStats] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
