"""``segsynth serve``: many stream sessions in one process, over the model sets they name
(segsynth.serve.model_sets: loaded once, shared, unloaded when unused), behind a small HTTP API
(FastAPI + uvicorn) with Prometheus metrics.

    GET    /v1/streams          the streams and their state
    POST   /v1/streams          start one (the body: ``StreamSpec``) -> 201
    GET    /v1/streams/{id}     its config, state and stats
    PATCH  /v1/streams/{id}     change remap, view or seed while it runs
    DELETE /v1/streams/{id}     drain and close it
    GET    /v1/models           the models by name and the model sets loaded, with their streams
    GET    /healthz, /readyz, /metrics
    GET    /                    the web studio; its endpoints (/v1/labels, /v1/segment,
                                /v1/synthesize, /v1/style, /v1/streams/{id}/live.mjpg): segsynth.serve.studio

``Service`` holds the sessions and is usable without HTTP (tests, embedding); ``create_app``
puts the API in front of it. Bad input is a 4xx with ``{"error": ..., "field": ...}``.
"""


import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from segsynth.core.config import ModelConfig, ServiceConfig, StreamConfig, stream_fields
from segsynth.core.errors import InputError, SegsynthError, ServiceError
from segsynth.core.grammar import LOOPBACK, check_seed, parse_address, sink_kind
from segsynth.serve.model_sets import FIELDS as MODEL_FIELDS
from segsynth.serve.model_sets import ModelSets
from segsynth.stream.session import StreamSession, new_id

log = logging.getLogger("segsynth")
SPEC_FIELDS = (*(f.name for f in stream_fields(api=True)), *MODEL_FIELDS)  # the POST body: core.config's description
PATCH_FIELDS = ("remap", "view", "seed")


def _check_text(value, field: str) -> None:
    """Strings from a request: no control characters (a NUL cuts a path short in C), valid Unicode."""
    if value is None:
        return
    if not isinstance(value, str):
        raise ServiceError(f"{field}: a string is needed", field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ServiceError(f"{field}: not valid Unicode text", field) from None
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ServiceError(f"{field}: control characters are not allowed", field)


class _StreamsCollector:
    """Per stream a service holds: its state (a failed stream stays, at 0 fps, until it is
    deleted: what the stream-down alert sees) and, for live sources, the frame rate the source
    delivers (what the fps alert compares the output with)."""

    def __init__(self, service: "Service") -> None:
        self.service = service

    def collect(self):
        state = GaugeMetricFamily("segsynth_stream_state", "1 for the state a stream of the service is in",
                                  labels=["stream", "state"])
        target = GaugeMetricFamily("segsynth_stream_target_fps", "Frame rate a running live stream's source delivers",
                                   labels=["stream"])
        with self.service._lock:
            sessions = list(self.service.sessions.values())
        for session in sessions:
            state.add_metric([session.id, session.state], 1)
            source = session.source
            if session.state == "running" and getattr(source, "live", False) and getattr(source, "info", None):
                target.add_metric([session.id], float(source.info.rate))
        yield state
        yield target


class Service:
    """The streams of one process, on ``models`` (the service's own set: the studio's too) or on
    the sets of ``model_sets`` they name (None: ``models`` only). ``media_root``: where file
    sources, style images and file outputs may be (None: the service refuses them). At most
    ``max_streams`` streams, each with at most ``max_outputs`` outputs. Thread-safe."""

    def __init__(self, models, *, model_sets: ModelSets | None = None, media_root: Path | None = None,
                 max_streams: int = ServiceConfig.max_streams, max_outputs: int = ServiceConfig.max_outputs) -> None:
        self.models, self.max_streams, self.max_outputs = models, max_streams, max_outputs
        self.model_sets = model_sets or ModelSets(models, getattr(models, "config", None) or ModelConfig(),
                                                  loader=None, limit=1)
        self.media_root = media_root.resolve() if media_root else None
        self.sessions: dict[str, Any] = {}
        self.specs: dict[str, dict] = {}
        self.removing: set[str] = set()  # streams whose DELETE ran out of time: aborted, listed until gone
        self.reserved: set[str] = set()  # ids of streams being added (their models may be loading)
        self._lock = threading.Lock()
        self._closing = False
        self.registry = CollectorRegistry(auto_describe=False)  # what /metrics adds: _StreamsCollector
        self.registry.register(_StreamsCollector(self))
        self.registry.register(self.model_sets)

    # ---- requests --------------------------------------------------------------------------
    def add(self, spec: dict):
        unknown = sorted(set(spec) - set(SPEC_FIELDS))
        if unknown:
            raise ServiceError(f"unknown field {unknown[0]!r}", unknown[0])
        if not isinstance(spec.get("source"), str) or not spec["source"]:
            raise ServiceError("source: a string is needed (a file, rtsp://..., lavfi:...)", "source")
        if not isinstance(spec.get("sinks", []), (list, tuple)):
            raise ServiceError("sinks: a list of outputs is needed", "sinks")
        if len(spec.get("sinks") or ()) > self.max_outputs:
            raise ServiceError(f"sinks: at most {self.max_outputs} outputs a stream (this service's --max-outputs); "
                               f"got {len(spec['sinks'])}", "sinks")
        for name in ("source", "id", "remap", "style", "view", "policy", "fit", "stabilize"):
            _check_text(spec.get(name), name)
        for sink in spec.get("sinks") or ():
            _check_text(sink, "sinks")
        for name in MODEL_FIELDS:
            self.check_model(name, spec.get(name))
        fields = {k: v for k, v in spec.items() if k not in MODEL_FIELDS}
        fields["sinks"] = tuple(fields.get("sinks") or ())
        try:
            config = StreamConfig(**fields, media_root=self.media_root)
        except SegsynthError as exc:
            raise
        except (TypeError, ValueError) as exc:  # a value of the wrong type, a malformed URL
            raise ServiceError(str(exc)) from None
        if self.media_root is None:  # secure by default: no file of this machine is read or written
            for field, path in config.local_paths():
                raise ServiceError(f"{field}: {path}: this service reads and writes no files (it was started "
                                   "without --media-root DIR, the folder they may be in)", field, 403)
        for sink in config.sinks:
            if sink_kind(sink) == "preview":
                if parse_address(sink)[0] not in LOOPBACK:  # a listener the token does not guard
                    raise ServiceError(f"sinks: {sink}: previews listen on loopback only", "sinks", 403)
        config = dataclasses.replace(config, id=config.id or new_id())
        with self._lock:  # the id is reserved before a model set may load for it: a second POST with it is refused
            self._check_room(config.id)
            self.reserved.add(config.id)
        try:
            models = self.model_sets.acquire(config.id, {k: spec.get(k) for k in MODEL_FIELDS})
            try:
                try:
                    models.remap(config.remap)  # a name no label set knows is refused here
                except InputError as exc:
                    raise ServiceError(f"remap: {exc}", "remap") from None
                session = StreamSession(config, models)
            except BaseException:
                self.model_sets.release(config.id)
                raise
            with self._lock:
                self.sessions[session.id] = session
                self.specs[session.id] = {k: v for k, v in spec.items() if v is not None}
        finally:
            with self._lock:
                self.reserved.discard(config.id)
        try:
            session.start()
        except SegsynthError as exc:
            self._forget(session.id)
            raise
        except BaseException:
            self._forget(session.id)
            raise
        log.info("stream %s: started (%s)", session.id, config.source)
        return session

    def check_model(self, field: str, value: str | None) -> None:
        """A request names models (segsynth models: bundled or installed), or graphs and
        checkpoint folders under --media-root: no other file of this machine is loaded."""
        _check_text(value, field)
        if value is None or field == "models" or value in ("none", getattr(self.model_sets.config, field)) \
                or self.model_sets.known(value):
            return
        path = Path(value)
        if not path.is_absolute():  # a name nobody knows: 422 with the nearest names
            self.model_sets.unknown(field, value)
        if self.media_root is None or not path.resolve().is_relative_to(self.media_root):
            where = f"under {self.media_root}" if self.media_root else "nowhere (no --media-root)"
            raise ServiceError(f"{field}: {value}: not a model name (segsynth models list), and model files may lie "
                               f"{where}", field, 403)

    def _check_room(self, stream_id: str) -> None:
        """Under the lock: whether a stream called ``stream_id`` may start."""
        if self._closing:
            raise ServiceError("the service is shutting down", status=503)
        if stream_id in self.sessions or stream_id in self.reserved:
            raise ServiceError(f"id: a stream called {stream_id!r} exists already", "id", 409)
        if len(self.sessions) + len(self.reserved) >= self.max_streams:
            raise ServiceError(f"at most {self.max_streams} streams (this service's --max-streams); delete one "
                               "first", status=429)

    def _forget(self, stream_id: str, session=None) -> None:
        with self._lock:
            known = self.sessions.pop(stream_id, None) is not None
            self.specs.pop(stream_id, None)
            self.removing.discard(stream_id)
        if session is not None:
            session.release()
        if known:
            self.model_sets.release(stream_id)  # its model set may go, after the keep-alive

    def _started(self, stream_id: str):
        session = self.get(stream_id)
        if session.state == "created":
            raise ServiceError(f"stream {stream_id} is still starting; try again", status=409)
        return session

    def get(self, stream_id: str):
        session = self.sessions.get(stream_id)
        if session is None:
            raise ServiceError(f"no stream called {stream_id!r}", status=404)
        return session

    def describe(self, session) -> dict:
        state = "removing" if session.id in self.removing and session.state != "closed" else session.state
        return {"id": session.id, "state": state, "config": self.specs.get(session.id, {}), "stats": session.stats().to_json()}

    def update(self, stream_id: str, patch: dict) -> None:
        session = self._started(stream_id)
        unknown = sorted(set(patch) - set(PATCH_FIELDS))
        if unknown:
            raise ServiceError(f"unknown field {unknown[0]!r} (a running stream can change: "
                               f"{', '.join(PATCH_FIELDS)})", unknown[0])
        for name in ("remap", "view"):
            _check_text(patch.get(name), name)
        try:
            check_seed(patch.get("seed"))
        except InputError as exc:
            raise ServiceError(str(exc), "seed") from None
        if session.state not in ("running", "created"):
            raise ServiceError(f"stream {stream_id} is {session.state}", status=409)
        try:
            session.update(**patch)
        except TypeError as exc:
            raise ServiceError(str(exc)) from None
        except InputError as exc:
            exc.field = exc.field or next(iter(patch), None)
            raise
        self.specs.get(stream_id, {}).update({k: v for k, v in patch.items() if v is not None})

    def remove(self, stream_id: str, timeout: float = 30.0, abort_timeout: float = 10.0) -> tuple[bool, dict]:
        """Drain and close a stream; its metric series go with it. A stream not drained within
        ``timeout`` seconds is aborted; one still not gone ``abort_timeout`` seconds later (an
        output blocked in a write) stays listed, as ``removing``, until its threads have ended.
        Returns (gone, its stats)."""
        session = self._started(stream_id)
        with self._lock:
            if stream_id in self.removing:  # a DELETE ran out of time already: the stream is on its way
                return False, session.stats().to_json()
            self.removing.add(stream_id)
        session.stop(drain=True)
        if not session.join(timeout):
            log.warning("stream %s: not drained within %.0f s; aborted", stream_id, timeout)
            session.stop(drain=False)
            if not session.join(abort_timeout):
                threading.Thread(target=self._reap, args=(session,), name=f"segsynth-reap-{stream_id}",
                                 daemon=True).start()
                return False, session.stats().to_json()
        self._forget(stream_id, session)
        log.info("stream %s: removed", stream_id)
        return True, session.stats().to_json()

    def _reap(self, session) -> None:
        """Forget an aborted stream once its threads have ended (they stop at their next check)."""
        session.join()
        self._forget(session.id, session)
        log.info("stream %s: removed (after it was aborted)", session.id)

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting, drain every stream, abort what is not done after ``grace`` seconds."""
        with self._lock:
            self._closing = True
            sessions = list(self.sessions.values())
        for s in sessions:
            s.stop(drain=True)
        deadline = time.monotonic() + grace
        for s in sessions:
            if not s.join(max(0.0, deadline - time.monotonic())):
                log.warning("stream %s: not drained within %.0f s; aborted", s.id, grace)
                s.stop(drain=False)
                s.join(10)
        with self._lock:
            self.sessions.clear()
            self.specs.clear()
        for s in sessions:
            s.release()
        self.model_sets.close()


def load_config(path: Path) -> list[dict]:
    """streams.yaml: ``streams:`` a list of POST bodies, started at boot."""
    import yaml  # imported here: PyYAML is the serve extra, and the benchmarks use Service without it

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"--config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    streams = (data or {}).get("streams") if isinstance(data, dict) else None
    if not isinstance(streams, list) or not all(isinstance(s, dict) for s in streams):
        raise InputError(f"--config {path}: expected 'streams:' with a list of streams (source, sinks, ...)")
    return streams


