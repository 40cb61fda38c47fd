"""The HTTP face of a Service (FastAPI + uvicorn): the app factory - middleware (the token,
checked first; body limits), error handlers, the streams router and the studio's, each 4xx in the
OpenAPI - and ``serve``, which runs it until SIGTERM/SIGINT drain every stream.

    GET    /v1/streams          the streams and their state
    POST   /v1/streams          start one (the body: ``StreamSpec``) -> 201
    GET    /v1/streams/{id}     its config, state and stats
    PATCH  /v1/streams/{id}     change remap, view or seed while it runs
    DELETE /v1/streams/{id}     drain and close it (202 while an aborted one is still ending)
    GET    /v1/models           models by name; the model sets loaded, their streams, load time, memory
    GET    /healthz, /readyz, /metrics
    GET    /                    the web studio (segsynth.serve.studio)
"""


import contextlib
import hmac
import logging
import signal
import typing
from contextlib import asynccontextmanager
from pathlib import Path
from types import UnionType

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from pydantic import BaseModel, ConfigDict, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from segsynth import __version__
from segsynth.core import metrics
from segsynth.core.config import ServiceConfig, stream_field_types, stream_fields
from segsynth.core.errors import InputError, SegsynthError
from segsynth.jobs.registry import Registry
from segsynth.serve import studio
from segsynth.serve.responses import error_responses
from segsynth.serve.service import MODEL_FIELDS, Service, load_config

log = logging.getLogger("segsynth")
MAX_BODY = 64 << 10  # bytes of JSON a request may send
MAX_DRAIN = 64 << 20  # bytes of a refused body read (and dropped) so that the client sees the 413


def stream_spec() -> type[BaseModel]:
    """The POST body of a stream: StreamConfig's fields the API takes (core.config describes them
    once, for the command line too), each optional but ``source``, plus the models it may name."""
    types = stream_field_types()
    fields = {}
    for f in stream_fields(api=True):
        kind = types[f.name]
        base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None)) if typing.get_origin(
            kind) in (typing.Union, UnionType) else kind
        base = list[str] if typing.get_origin(base) is tuple else str if base is Path else base
        fields[f.name] = (base, ...) if f.name == "source" else (base | None, None)
    fields.update({name: (str | None, None) for name in MODEL_FIELDS})
    return create_model("StreamSpec", __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
                        __doc__="A stream to start: what ``segsynth run`` takes, as JSON (docs/stream-fields.md).",
                        **fields)


def create_app(service: Service, *, token: str | None = None, protect_metrics: bool = False,
               grace: float = 10.0) -> FastAPI:
    StreamSpec = stream_spec()

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

    @app.get("/v1/models", responses=error_responses(401))
    def list_models() -> dict:
        sets = service.model_sets
        available = [{k: row[k] for k in ("name", "roles", "label_set", "state", "licence")}
                     for row in Registry(sets.config.cache_dir).listing()]
        return {"available": available, "loaded": sets.status(), "max_model_sets": sets.limit,
                "keep_alive_seconds": sets.keep_alive}

    studio.add_routes(app, service)
    return app


def serve(cfg: ServiceConfig, models, model_sets=None) -> int:
    """Run the service of ``cfg`` over ``models`` (and the other sets ``model_sets`` loads for
    the streams that name them) until SIGTERM/SIGINT (then drain every stream, 0)."""

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

    boot = load_config(cfg.config) if cfg.config else []
    service = Service(models, model_sets=model_sets, media_root=cfg.media_root, max_streams=cfg.max_streams,
                      max_outputs=cfg.max_outputs)
    try:
        for i, spec in enumerate(boot, 1):  # a bad stream in the config stops the service before it listens
            try:
                service.add(spec)
            except SegsynthError as exc:
                raise InputError(f"--config {cfg.config}: stream {i}: {exc}") from None
    except BaseException:
        service.shutdown(cfg.grace)
        raise
    app = create_app(service, token=cfg.token, protect_metrics=cfg.protect_metrics, grace=cfg.grace)
    server = Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                   timeout_graceful_shutdown=cfg.grace, lifespan="on"))
    log.info("serving on http://%s:%d (%d streams at boot)", cfg.host, cfg.port, len(boot))
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        server.started = False
    if not server.started:
        service.shutdown(cfg.grace)
        raise InputError(f"cannot listen on {cfg.host}:{cfg.port} (in use, or not an address of this machine)")
    log.info("stopped: every stream drained and closed")
    return 0
