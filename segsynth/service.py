"""``segsynth serve``: many stream sessions in one process over one ModelSet, behind a small
HTTP API (FastAPI + uvicorn) with Prometheus metrics.

    GET    /v1/streams          the streams and their state
    POST   /v1/streams          start one (the body: ``StreamSpec``) -> 201
    GET    /v1/streams/{id}     its config, state and stats()
    PATCH  /v1/streams/{id}     change remap, view or seed while it runs
    DELETE /v1/streams/{id}     drain and close it
    GET    /healthz, /readyz, /metrics
    GET    /                    the web studio; its endpoints (/v1/labels, /v1/segment,
                                /v1/synthesize, /v1/style, /v1/streams/{id}/live.mjpg): segsynth.studio

``Service`` holds the sessions and is usable without HTTP (tests, embedding); ``create_app``
puts the API in front of it. Bad input is a 4xx with ``{"error": ..., "field": ...}``.
"""


import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from segsynth.errors import InputError, SegsynthError

log = logging.getLogger("segsynth")
MAX_BODY = 64 << 10  # bytes of JSON a request may send
MAX_DRAIN = 64 << 20  # bytes of a refused body read (and dropped) so that the client sees the 413
SPEC_FIELDS = ("id", "source", "sinks", "view", "remap", "seed", "style", "policy", "smooth", "stabilize", "fit",
               "batch", "segmenter", "generator", "max_frames", "duration", "segment_time", "rtsp_transport",
               "stall_timeout", "reconnect_max")
PATCH_FIELDS = ("remap", "view", "seed")


class ServiceError(InputError):
    """A request the service refuses: ``status`` is the HTTP code, ``field`` the body field at fault."""

    def __init__(self, message: str, field: str | None = None, status: int = 422) -> None:
        super().__init__(message, field=field)
        self.status = status

    @classmethod
    def of(cls, exc: SegsynthError, fields=SPEC_FIELDS) -> "ServiceError":
        """``exc`` as the answer to a request: its status, and the field it names (or starts with)."""
        return cls(str(exc), exc.field or _field_of(str(exc), fields), exc.status)


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


def _field_of(message: str, fields=SPEC_FIELDS) -> str | None:
    """StreamConfig's messages start with the field they are about ("view: unknown view ...")."""
    match = re.match(r"^(\w+):", message)
    return match[1] if match and match[1] in fields else None


class _StreamsCollector:
    """Per stream a service holds: its state (a failed stream stays, at 0 fps, until it is
    deleted: what the stream-down alert sees) and, for live sources, the frame rate the source
    delivers (what the fps alert compares the output with)."""

    def __init__(self, service: "Service") -> None:
        self.service = service

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

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


MAX_STREAMS = 64  # streams a service runs at once (--max-streams)
MAX_OUTPUTS = 8  # outputs a stream may have (--max-outputs)


class Service:
    """The streams of one process, sharing ``models``. ``media_root``: where file sources,
    style images and file outputs may be (None: the service refuses them). At most
    ``max_streams`` streams, each with at most ``max_outputs`` outputs. Thread-safe."""

    def __init__(self, models, *, media_root: Path | None = None, max_streams: int = MAX_STREAMS,
                 max_outputs: int = MAX_OUTPUTS) -> None:
        self.models, self.max_streams, self.max_outputs = models, max_streams, max_outputs
        self.media_root = media_root.resolve() if media_root else None
        self.sessions: dict[str, Any] = {}
        self.specs: dict[str, dict] = {}
        self.removing: set[str] = set()  # streams whose DELETE ran out of time: aborted, listed until gone
        self._lock = threading.Lock()
        self._closing = False
        self.registry = CollectorRegistry(auto_describe=False)  # what /metrics adds: _StreamsCollector
        self.registry.register(_StreamsCollector(self))

    # ---- requests --------------------------------------------------------------------------
    def add(self, spec: dict):
        from segsynth.config import StreamConfig, sink_kind
        from segsynth.stream.session import StreamSession

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
        for name, loaded in (("segmenter", self.models.config.segmenter), ("generator", self.models.config.generator)):
            if spec.get(name) not in (None, loaded):
                raise ServiceError(f"{name}: this service runs {name} {loaded!r}; start another service for "
                                   f"{spec[name]!r}", name)
        fields = {k: v for k, v in spec.items() if k not in ("segmenter", "generator")}
        fields["sinks"] = tuple(fields.get("sinks") or ())
        try:
            config = StreamConfig(**fields, media_root=self.media_root)
        except SegsynthError as exc:
            raise ServiceError.of(exc) from None
        except (TypeError, ValueError) as exc:  # a value of the wrong type, a malformed URL
            raise ServiceError(str(exc)) from None
        if self.media_root is None:  # secure by default: no file of this machine is read or written
            for field, path in config.local_paths():
                raise ServiceError(f"{field}: {path}: this service reads and writes no files (it was started "
                                   "without --media-root DIR, the folder they may be in)", field, 403)
        for sink in config.sinks:
            if sink_kind(sink) == "preview":
                from segsynth.stream.preview import parse_address

                if parse_address(sink)[0] not in LOOPBACK:  # a listener the token does not guard
                    raise ServiceError(f"sinks: {sink}: previews listen on loopback only", "sinks", 403)
        try:
            self.models.remap(config.remap)  # a name no label set knows is refused here
        except InputError as exc:
            raise ServiceError(f"remap: {exc}", "remap") from None
        try:
            session = StreamSession(config, self.models)
        except SegsynthError as exc:
            raise ServiceError.of(exc) from None
        with self._lock:
            if self._closing:
                raise ServiceError("the service is shutting down", status=503)
            if session.id in self.sessions:
                raise ServiceError(f"id: a stream called {session.id!r} exists already", "id", 409)
            if len(self.sessions) >= self.max_streams:
                raise ServiceError(f"at most {self.max_streams} streams (this service's --max-streams); delete one "
                                   "first", status=429)
            self.sessions[session.id] = session  # reserved: a second POST with this id is refused
            self.specs[session.id] = {k: v for k, v in spec.items() if v is not None}
        try:
            session.start()
        except SegsynthError as exc:
            self._forget(session.id)
            raise ServiceError.of(exc) from None
        except BaseException:
            self._forget(session.id)
            raise
        log.info("stream %s: started (%s)", session.id, config.source)
        return session

    def _forget(self, stream_id: str, session=None) -> None:
        with self._lock:
            self.sessions.pop(stream_id, None)
            self.specs.pop(stream_id, None)
            self.removing.discard(stream_id)
        if session is not None:
            session.release()

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
        return {"id": session.id, "state": state, "config": self.specs.get(session.id, {}), "stats": session.stats()}

    def update(self, stream_id: str, patch: dict) -> None:
        from segsynth.config import check_seed

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
            raise ServiceError(str(exc), _field_of(str(exc), PATCH_FIELDS) or next(iter(patch), None)) from None
        self.specs.get(stream_id, {}).update({k: v for k, v in patch.items() if v is not None})

    def remove(self, stream_id: str, timeout: float = 30.0, abort_timeout: float = 10.0) -> tuple[bool, dict]:
        """Drain and close a stream; its metric series go with it. A stream not drained within
        ``timeout`` seconds is aborted; one still not gone ``abort_timeout`` seconds later (an
        output blocked in a write) stays listed, as ``removing``, until its threads have ended.
        Returns (gone, its stats)."""
        session = self._started(stream_id)
        with self._lock:
            if stream_id in self.removing:  # a DELETE ran out of time already: the stream is on its way
                return False, session.stats()
            self.removing.add(stream_id)
        session.stop(drain=True)
        if not session.join(timeout):
            log.warning("stream %s: not drained within %.0f s; aborted", stream_id, timeout)
            session.stop(drain=False)
            if not session.join(abort_timeout):
                threading.Thread(target=self._reap, args=(session,), name=f"segsynth-reap-{stream_id}",
                                 daemon=True).start()
                return False, session.stats()
        self._forget(stream_id, session)
        log.info("stream %s: removed", stream_id)
        return True, session.stats()

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


def load_config(path: Path) -> list[dict]:
    """streams.yaml: ``streams:`` a list of POST bodies, started at boot."""
    import yaml

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


# ---- HTTP ----------------------------------------------------------------------------------------
ERRORS = {400: "malformed JSON", 401: "no valid 'Authorization: Bearer TOKEN' (services with a token)",
          403: "a file outside --media-root (or any file without one), a listener beyond loopback",
          404: "no such stream", 409: "the stream exists, is starting or not running, or an output is another "
          "stream's", 413: "the body is over its limit", 422: "a field is invalid: `field` names it",
          429: "the service runs --max-streams streams already", 503: "the service is shutting down"}


def error_responses(*codes: int) -> dict:
    """OpenAPI ``responses`` for the errors an endpoint gives: ``{"error": ..., "field": ...}``."""
    schema = {"type": "object", "required": ["error", "field"],
              "properties": {"error": {"type": "string"}, "field": {"type": ["string", "null"]}}}
    return {code: {"description": ERRORS[code], "content": {"application/json": {"schema": schema}}} for code in codes}


def create_app(service: Service, *, token: str | None = None, protect_metrics: bool = False,
               grace: float = 10.0):
    import hmac
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from segsynth import __version__, metrics, studio

    class StreamSpec(BaseModel):
        """A stream to start: what ``segsynth run`` takes, as JSON."""

        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        source: str
        sinks: list[str] = []
        id: str | None = None
        view: str | None = None
        remap: str | None = None
        seed: int | None = None
        style: str | None = None
        policy: str | None = None
        smooth: int | None = None
        stabilize: str | None = None
        fit: str | None = None
        batch: int | None = None
        segmenter: str | None = None
        generator: str | None = None
        max_frames: int | None = None
        duration: float | None = None
        segment_time: float | None = None
        rtsp_transport: str | None = None
        stall_timeout: float | None = None
        reconnect_max: int | None = None

    class StreamPatch(BaseModel):
        """What a running stream can change."""

        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        remap: str | None = None
        view: str | None = None
        seed: int | None = None

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(service.shutdown, grace)  # SIGTERM/SIGINT: uvicorn stops accepting first

    app = FastAPI(title="segsynth", version=__version__, lifespan=lifespan)

    @app.exception_handler(SegsynthError)
    async def refused(request, exc: SegsynthError):
        return JSONResponse({"error": str(exc), "field": exc.field}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse({"error": f"malformed JSON: {first.get('msg')}", "field": None}, status_code=400)
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = "unknown field"
        return JSONResponse({"error": f"{'.'.join(loc) + ': ' if loc else ''}{message}",
                             "field": loc[0] if loc else None}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail), "field": None}, status_code=exc.status_code)

    @app.middleware("http")
    async def cap_body(request: Request, call_next):
        cap = studio.MAX_UPLOAD if request.url.path in studio.UPLOAD_PATHS else MAX_BODY  # images, or JSON
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cap):
            return await too_large(request, cap, int(length) if length.isdigit() else None)
        if length is None and request.method in ("POST", "PATCH", "PUT"):
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > cap:
                    return await too_large(request, cap, None)
            request._body = body  # read once: handlers get it from here
        return await call_next(request)

    @app.middleware("http")  # added last, so it runs first: nothing of a request is read before its token
    async def check_token(request: Request, call_next):
        path = request.url.path
        if token is not None and (path.startswith("/v1/") or (protect_metrics and path == "/metrics")):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"error": "a valid 'Authorization: Bearer TOKEN' header is needed",
                                     "field": None}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    async def too_large(request: Request, cap: int, length: int | None) -> JSONResponse:
        """413. What the client still sends (up to MAX_DRAIN bytes) is read and dropped first, as
        nginx's lingering close does: a client still sending would see a reset, not this answer."""
        from starlette.requests import ClientDisconnect

        if length is None or length <= MAX_DRAIN:
            drained = 0
            try:
                async for chunk in request.stream():
                    drained += len(chunk)
                    if drained > MAX_DRAIN:
                        break
            except ClientDisconnect:
                pass
        return JSONResponse({"error": f"request body over {cap} bytes", "field": None}, status_code=413)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict:
        m = service.models
        return {"status": "ready", "segmenter": m.config.segmenter, "generator": m.config.generator,
                "models": m.config.models, "backend": m.backend, "fused": sorted(part for part, c in m.chains.items() if c is not None),
                "streams": len(service.sessions)}

    @app.get("/metrics", responses=error_responses(401) if protect_metrics else None)
    def metrics_endpoint() -> Response:
        return Response(metrics.exposition() + metrics.process_exposition() + generate_latest(service.registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/streams", responses=error_responses(401))
    def list_streams() -> dict:
        return {"streams": [service.describe(s) for s in list(service.sessions.values())]}

    @app.post("/v1/streams", status_code=201, responses=error_responses(400, 401, 403, 409, 413, 422, 429, 503))
    def add_stream(spec: StreamSpec) -> dict:
        return service.describe(service.add(spec.model_dump(exclude_none=True)))

    @app.get("/v1/streams/{stream_id}", responses=error_responses(401, 404))
    def get_stream(stream_id: str) -> dict:
        return service.describe(service.get(stream_id))

    @app.patch("/v1/streams/{stream_id}", responses=error_responses(400, 401, 404, 409, 413, 422))
    def patch_stream(stream_id: str, patch: StreamPatch) -> dict:
        service.update(stream_id, patch.model_dump(exclude_none=True))
        return service.describe(service.get(stream_id))

    @app.delete("/v1/streams/{stream_id}", responses={
        202: {"description": "not drained in time: aborted, and listed as `removing` until its threads end"},
        **error_responses(401, 404, 409)})
    def delete_stream(stream_id: str):
        gone, stats = service.remove(stream_id)
        return JSONResponse({"id": stream_id, "state": "closed" if gone else "removing", "stats": stats},
                            status_code=200 if gone else 202)

    studio.add_routes(app, service)
    return app


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_listen(host: str, token: str | None) -> None:
    if host not in LOOPBACK and not token:
        raise InputError(f"--host {host}: listening beyond loopback needs --token or --token-file")


def serve(*, host: str, port: int, models, token: str | None, config: Path | None, media_root: Path | None,
          protect_metrics: bool, grace: float, max_streams: int = MAX_STREAMS, max_outputs: int = MAX_OUTPUTS) -> int:
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """SIGTERM/SIGINT stop the service gracefully (stop accepting, drain every stream) and
        ``serve`` returns 0; uvicorn itself would re-raise the signal after its shutdown."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    check_listen(host, token)
    boot = load_config(config) if config else []
    service = Service(models, media_root=media_root, max_streams=max_streams, max_outputs=max_outputs)
    try:
        for i, spec in enumerate(boot, 1):  # a bad stream in the config stops the service before it listens
            try:
                service.add(spec)
            except ServiceError as exc:
                raise InputError(f"--config {config}: stream {i}: {exc}") from None
    except BaseException:
        service.shutdown(grace)
        raise
    app = create_app(service, token=token, protect_metrics=protect_metrics, grace=grace)
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=grace, lifespan="on"))
    log.info("serving on http://%s:%d (%d streams at boot)", host, port, len(boot))
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        server.started = False
    if not server.started:
        service.shutdown(grace)
        raise InputError(f"cannot listen on {host}:{port} (in use, or not an address of this machine)")
    log.info("stopped: every stream drained and closed")
    return 0
