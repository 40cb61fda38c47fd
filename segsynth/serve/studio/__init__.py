"""The web studio of ``segsynth serve``: a single page (static files in ``static/``, no CDN)
and the endpoints behind it, all in the service's OpenAPI.

    GET  /                              the studio (Doodle, Style, Live)
    GET  /v1/labels                     the label set the generator paints: names, colours, size,
                                        and the generators the studio may pick (``generator=NAME``
                                        on this and the next three: another generator by name)
    POST /v1/segment                    a photo -> its label map (8-bit PNG of ids) + legend
    POST /v1/synthesize                 a label map (+ style image | seed | z) -> the picture (PNG)
    POST /v1/style                      a style image -> z (the encoder's mean)
    GET  /v1/streams/{id}/live.mjpg     input | labels (with legend) | synthesis of a running
                                        stream, side by side, as MJPEG (and live.jpg: one frame)

Uploads are multipart forms, capped at ``MAX_UPLOAD`` bytes (the service's body limit for
these paths) and ``MAX_PIXELS`` pixels per image; label maps must hold ids of the label set.
The models are the service's ModelSet, shared with its streams (thread-safe), or for a
request naming another generator the set the service's ModelSets loads for it (held for the
request; kept loaded for the keep-alive after).
"""

import asyncio
import base64
import contextlib
import io
import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from fastapi import File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from segsynth.core import labels
from segsynth.core.errors import ServiceError
from segsynth.jobs.registry import Registry
from segsynth.serve.model_sets import STUDIO
from segsynth.serve.responses import error_responses
from segsynth.stream.pictures import resize_labels, resize_rgb
from segsynth.stream.render import compose

STATIC = Path(__file__).with_name("static")
MAX_UPLOAD = 8 << 20  # bytes a request to UPLOAD_PATHS may send
MAX_PIXELS = 4096 * 4096  # pixels an uploaded image may have
UPLOAD_PATHS = ("/v1/segment", "/v1/synthesize", "/v1/style")
LIVE_HEIGHT = 240  # pixels: the height of each panel of the live view
LIVE_FPS = 10.0  # at most this many live frames a second per viewer
BOUNDARY = "segsynthframe"
MAX_Z_TEXT = 64 << 10  # characters of the z form field (a few hundred numbers need a few KiB)


def open_image(data: bytes, field: str):
    """An uploaded image, its size checked before its pixels are decoded (PIL reads headers lazily)."""

    if not data:
        raise ServiceError(f"{field}: the file is empty", field)
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise ServiceError(f"{field}: not an image (PNG, JPEG, WebP, ... expected)", field) from None
    except Image.DecompressionBombError:
        image = None
    if image is None or image.width * image.height > MAX_PIXELS:
        size = f"{image.width} x {image.height} pixels" if image is not None else "the image"
        raise ServiceError(f"{field}: {size} is over the limit of {MAX_PIXELS} pixels", field, 413)
    return image


def read_rgb(data: bytes, field: str) -> np.ndarray:
    """An uploaded photo as H x W x 3 uint8 RGB (EXIF rotation applied)."""

    image = open_image(data, field)
    try:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, ValueError, SyntaxError):
        raise ServiceError(f"{field}: the image is damaged or truncated", field) from None


def read_label_map(data: bytes, label_set: labels.LabelSet, field: str = "labels") -> np.ndarray:
    """An 8-bit PNG of class ids (grayscale, or palette: its indices) -> H x W uint8 ids; 422
    for other images and for ids that are not in ``label_set``."""
    image = open_image(data, field)
    if image.format != "PNG" or image.mode not in ("L", "P"):
        raise ServiceError(f"{field}: an 8-bit grayscale (or palette) PNG of class ids is needed, got "
                           f"{image.format or 'an image'} in mode {image.mode}", field)
    try:
        ids = np.asarray(image)
    except (OSError, ValueError, SyntaxError):
        raise ServiceError(f"{field}: the PNG is damaged or truncated", field) from None
    bad = np.unique(ids[(ids >= len(label_set)) & (ids != labels.UNKNOWN)])
    if bad.size:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if bad.size > 5 else "")
        raise ServiceError(f"{field}: ids {shown} are not classes of {label_set.name} (0..{len(label_set) - 1}, "
                           f"and 255 for unknown)", field)
    return ids


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, "L" if array.ndim == 2 else "RGB").save(buf, "PNG")
    return buf.getvalue()


def cover(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The middle of ``rgb`` with the aspect ratio of (W, H) ``size``, scaled to it."""

    h, w = rgb.shape[:2]
    tw, th = size
    cw, ch = (w, round(w * th / tw)) if w * th < h * tw else (round(h * tw / th), h)
    x, y = (w - cw) // 2, (h - ch) // 2
    return resize_rgb(np.ascontiguousarray(rgb[y:y + ch, x:x + cw]), tw, th)


def legend(ids: np.ndarray, label_set: labels.LabelSet) -> list[dict]:
    """The classes present, largest first: id, name, colour and pixel share."""
    return [{"id": i, "name": label_set.name_of(i), "color": hex_color(label_set.palette[i]),
             "fraction": round(float(f), 4)} for i, f in labels.class_fractions(ids).items()]


def hex_color(rgb) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


class Studio:
    """What the studio's endpoints do, over ``models`` (a ModelSet). Thread-safe: it keeps no
    state of its own."""

    def __init__(self, models) -> None:
        self.models = models

    @property
    def generator(self):
        return self.models.generator

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the doodle canvas: the generator's size (the segmenter's without one)."""
        return self.generator.size if self.generator is not None else self.models.size

    def info(self) -> dict:
        ls, gen = self.models.label_set, self.generator
        return {"label_set": ls.name, "size": list(self.size), "generator": gen is not None,
                "z_dim": gen.z_dim if gen is not None else 0,
                "style": gen is not None and gen.uses_z and gen.encoder is not None,
                "segmenter_label_set": self.models.segmenter.label_set.name,
                "classes": [{"id": i, "name": name, "color": hex_color(ls.palette[i]),
                             "doodle": hex_color(labels.doodle_colour(ls, i))} for i, name in enumerate(ls.classes)],
                "unknown": {"id": labels.UNKNOWN, "name": "unknown", "color": hex_color(ls.palette[labels.UNKNOWN])}}

    def segment(self, rgb: np.ndarray) -> np.ndarray:
        """A photo -> ids of the generator's label set at the canvas size (the photo's middle,
        cropped to the canvas' aspect ratio)."""

        seg = self.models.segmenter
        ids = seg(cover(rgb, seg.size)[None])[0]
        bridge = labels.RemapTable(None, seg.label_set, self.models.label_set)  # segmenter set -> generator set
        return resize_labels(bridge(ids), *self.size)

    def _need_generator(self):
        if self.generator is None:
            raise ServiceError("no generator is loaded (the service runs --generator none)", status=409)
        return self.generator

    def _need_z(self, field: str):
        gen = self._need_generator()
        if not gen.uses_z:
            raise ServiceError(f"{field}: {gen.source} has no style input (it is not a VAE generator)", field)
        return gen

    def style(self, rgb: np.ndarray) -> np.ndarray:
        gen = self._need_z("style")
        if gen.encoder is None:
            raise ServiceError(f"style: {gen.source} has no style encoder (NAME-encoder.onnx beside it)", "style")
        return gen.encode_style(rgb)

    def z(self, *, style: np.ndarray | None, seed: int | None, z: str | None) -> np.ndarray | None:
        """The style vector of one synthesis: from ``z`` (JSON list), a style image, or ``seed``
        (default 0); None for generators without one (a seed is then ignored)."""
        given = [name for name, value in (("style", style), ("seed", seed), ("z", z)) if value is not None]
        if len(given) > 1:
            raise ServiceError(f"{given[1]}: give one of style, seed and z, not {' and '.join(given)}", given[1])
        if style is not None:
            return self.style(style)
        if z is not None:  # its form first, then whether the generator takes one
            try:
                values = np.asarray(json.loads(z), np.float32).reshape(1, -1)
            except (ValueError, TypeError, RecursionError):  # RecursionError: lists nested thousands deep
                raise ServiceError("z: a JSON list of numbers is needed", "z") from None
        gen = self._need_generator()
        if z is not None:
            self._need_z("z")
            if values.shape[1] != gen.z_dim or not np.isfinite(values).all():
                raise ServiceError(f"z: {gen.z_dim} finite numbers are needed, got {values.shape[1]}", "z")
            return values
        return self.models.z(seed=seed, quiet=True)

    def synthesize(self, ids: np.ndarray, z: np.ndarray | None) -> np.ndarray:
        """Ids of the label set (any size; scaled to the generator's, nearest) -> RGB at its size."""

        gen = self._need_generator()
        return gen(resize_labels(ids, *gen.size)[None], z)[0]


def triptych(display: np.ndarray, result, label_set: labels.LabelSet, height: int = LIVE_HEIGHT) -> np.ndarray:
    """Input | labels (with legend) | synthesis, each ``height`` pixels high (the input's aspect)."""

    h, w = display.shape[:2]
    size = (max(2, round(w * height / h)), height)
    panels = [resize_rgb(display, *size), compose("labels", None, result.labels, None, label_set, size)]
    if result.synth is not None:
        panels.append(compose("synth", None, result.labels, result.synth, label_set, size))
    return np.concatenate(panels, axis=1)


class LiveView:
    """The newest frame of one session for one viewer: a watcher (see StreamSession.watch) that
    keeps references only (the encode thread never waits on a viewer); the viewer's request
    composes and encodes the frames it shows."""

    def __init__(self, label_set: labels.LabelSet) -> None:
        self.label_set = label_set
        self.seq, self.frame = 0, None
        self._cond = threading.Condition()

    def __call__(self, display, result) -> None:
        if display is None:  # read before the watching began: the source did not keep the input frame
            return
        with self._cond:
            self.seq, self.frame = self.seq + 1, (display, result)
            self._cond.notify_all()

    def next_jpeg(self, after: int, timeout: float) -> tuple[int, bytes | None]:
        """(seq, JPEG) of the newest frame once one newer than ``after`` is there; (after, None)
        after ``timeout`` seconds without one."""

        with self._cond:
            if not self._cond.wait_for(lambda: self.seq != after, timeout):
                return after, None
            seq, (display, result) = self.seq, self.frame
        buf = io.BytesIO()
        Image.fromarray(triptych(display, result, self.label_set)).save(buf, "JPEG", quality=80)
        return seq, buf.getvalue()


def add_routes(app, service) -> None:
    """The studio's page and endpoints on ``app`` (create_app's), over ``service``'s models (or
    the generator a request names)."""

    png_reply = {200: {"content": {"image/png": {}}, "description": "a PNG"}, **error_responses(401, 409, 413, 422)}
    upload_errors = error_responses(401, 409, 413, 422)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/studio", StaticFiles(directory=STATIC), name="studio")

    @contextlib.contextmanager
    def studio_of(generator: str | None):
        """The Studio over the service's models, or over the set with ``generator`` (a name)."""
        own = service.model_sets.config.generator
        if generator is None or generator == own:
            yield Studio(service.models)
            return
        service.check_model("generator", generator)
        holder = f"{STUDIO}{uuid.uuid4().hex[:12]}"
        models = service.model_sets.acquire(holder, {"generator": generator})
        try:
            yield Studio(models)
        finally:
            service.model_sets.release(holder)

    def picked():
        return Form(None, max_length=200, description="another generator, by name (GET /v1/labels lists them)")

    @app.get("/v1/labels", responses=error_responses(401, 403, 409, 422, 503))
    def label_set(generator: str | None = Query(None, max_length=200, description="another generator, by name")
                  ) -> dict:
        """The label set the studio paints with (the generator's): names, colours, canvas size;
        and ``generators``, the names the studio may pick (bundled and installed)."""
        with studio_of(generator) as studio:
            info = studio.info()
        available = Registry(service.model_sets.config.cache_dir).listing()
        own = service.model_sets.config.generator
        info["generators"] = [own, *(m["name"] for m in available if "generator" in m["roles"]
                                     and m["state"] != "not installed" and m["name"] != own)]
        info["generator_name"] = generator or own
        return info

    @app.post("/v1/segment", responses=upload_errors)
    def segment(image: UploadFile = File(description="a photo"), generator: str | None = picked()) -> dict:
        """A photo -> its label map at the canvas size (``labels``: a data URL of an 8-bit PNG
        of class ids) and the classes present (``legend``)."""
        with studio_of(generator) as studio:
            ids = studio.segment(read_rgb(image.file.read(), "image"))
        return {"width": int(ids.shape[1]), "height": int(ids.shape[0]), "label_set": studio.models.label_set.name,
                "labels": "data:image/png;base64," + base64.b64encode(png(ids)).decode(),
                "legend": legend(ids, studio.models.label_set)}

    @app.post("/v1/synthesize", response_class=Response, responses=png_reply)
    def synthesize(labels: UploadFile = File(description="an 8-bit PNG of class ids of the label set"),
                   style: UploadFile | None = File(None, description="a style image (VAE generators)"),
                   seed: int | None = Form(None, ge=0, lt=2**32, description="z drawn from this seed (default 0)"),
                   z: str | None = Form(None, max_length=MAX_Z_TEXT,
                                        description="z as a JSON list of numbers (from /v1/style)"),
                   generator: str | None = picked()) -> Response:
        """A label map -> the generator's picture (PNG at its size); z from ``style``, ``seed`` or ``z``."""
        with studio_of(generator) as studio:
            ids = read_label_map(labels.file.read(), studio.models.label_set)
            style_rgb = read_rgb(style.file.read(), "style") if style is not None else None
            picture = studio.synthesize(ids, studio.z(style=style_rgb, seed=seed, z=z))
        return Response(png(picture), media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/v1/style", responses=upload_errors)
    def style_vector(image: UploadFile = File(description="a style image"), generator: str | None = picked()) -> dict:
        """A style image -> z (the VAE encoder's mean), to send back to /v1/synthesize."""
        with studio_of(generator) as studio:
            z = studio.style(read_rgb(image.file.read(), "image"))
        return {"z": [float(v) for v in z[0]], "z_dim": int(z.shape[1])}

    def running(stream_id: str):
        session = service.get(stream_id)
        if session.state != "running":
            raise ServiceError(f"stream {stream_id} is {session.state}", status=409)
        return session

    @app.get("/v1/streams/{stream_id}/live.jpg", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, **error_responses(401, 404, 409, 503)})
    def live_frame(stream_id: str) -> Response:
        """The next frame of a running stream: input | labels (with legend) | synthesis."""
        session = running(stream_id)
        view = LiveView(session.models.label_set)
        session.watch(view)
        try:
            _, jpeg = view.next_jpeg(0, 10)
        finally:
            session.unwatch(view)
        if jpeg is None:
            raise ServiceError(f"stream {stream_id} made no frame within 10 s", status=503)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.get("/v1/streams/{stream_id}/live.mjpg", response_class=StreamingResponse,
             responses={200: {"content": {f"multipart/x-mixed-replace; boundary={BOUNDARY}": {}}},
                        **error_responses(401, 404, 409)})
    def live_stream(stream_id: str, request: Request) -> StreamingResponse:
        """A running stream as MJPEG (input | labels | synthesis), at most 10 frames a second,
        until the stream ends or the viewer leaves."""
        session = running(stream_id)
        view = LiveView(session.models.label_set)

        async def frames():
            session.watch(view)
            try:
                seq, sent = 0, 0.0
                while session.state == "running" and not await request.is_disconnected():
                    await asyncio.sleep(max(0.0, sent + 1 / LIVE_FPS - time.monotonic()))
                    seq, jpeg = await run_in_threadpool(view.next_jpeg, seq, 1.0)
                    if jpeg is not None:
                        sent = time.monotonic()
                        yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                               .encode() + jpeg + b"\r\n")
            finally:
                session.unwatch(view)

        return StreamingResponse(frames(), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                                 headers={"Cache-Control": "no-store"})
