"""An MJPEG preview over HTTP: a sink that serves the newest picture to browsers.

    GET /              a page showing the stream
    GET /stream.mjpg   multipart/x-mixed-replace JPEG frames (what <img> and VLC play)
    GET /snapshot.jpg  the newest frame

Pictures are JPEG-encoded only while someone watches (at most ``max_fps`` a second), and
each client gets the newest frame when it is ready for one: a slow client skips frames and
never makes the stream wait or memory grow.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from segsynth.core.errors import OutputError
from segsynth.core.grammar import parse_address

log = logging.getLogger("segsynth")
BOUNDARY = "segsynthframe"


class PreviewSink:
    decoded_audio: set[int] = set()

    def __init__(self, address: str, *, max_fps: float = 15.0, quality: int = 80, max_clients: int = 8) -> None:
        host, port = parse_address(address)
        self.max_fps, self.quality, self.max_clients = max_fps, quality, max_clients
        self.name = address
        self.frame: bytes | None = None
        self.seq = self.clients = 0
        self.closed = False
        self._last = 0.0
        self._cond = threading.Condition()
        try:
            self.server = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as exc:
            raise OutputError(f"--preview {host}:{port}: cannot listen ({exc.strerror or exc})") from exc
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"preview-{self.port}", daemon=True)
        self._thread.start()
        log.info("preview: %s", self.url)

    def write(self, picture: np.ndarray, meta: dict) -> None:
        now = time.monotonic()
        if not self.clients or now - self._last < 1 / self.max_fps:
            return

        buf = io.BytesIO()
        Image.fromarray(picture, "L" if picture.ndim == 2 else "RGB").save(buf, "JPEG", quality=self.quality)
        with self._cond:
            self.frame, self.seq, self._last = buf.getvalue(), self.seq + 1, now
            self._cond.notify_all()

    def write_audio(self, item) -> None:
        pass  # pictures only

    def next_frame(self, after: int, timeout: float = 1.0) -> tuple[int, bytes | None]:
        with self._cond:
            self._cond.wait_for(lambda: self.seq != after or self.closed, timeout)
            return self.seq, self.frame

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def _handler(sink: PreviewSink):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        timeout = 30  # seconds a viewer may stop reading before it is dropped

        def log_message(self, fmt, *args) -> None:
            log.debug("preview: " + fmt, *args)

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = self.path.split("?")[0]
            if path == "/":
                self._reply(200, "text/html", b'<!doctype html><title>segsynth</title>'
                            b'<body style="margin:0;background:#111"><img src="/stream.mjpg" style="max-width:100%">')
            elif path == "/snapshot.jpg":
                self._watch(snapshot=True)
            elif path == "/stream.mjpg":
                self._watch(snapshot=False)
            else:
                self._reply(404, "text/plain", b"not found\n")

        def _reply(self, code: int, kind: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _watch(self, snapshot: bool) -> None:
            with sink._cond:
                if sink.clients >= sink.max_clients:
                    return self._reply(503, "text/plain", b"too many viewers\n")
                sink.clients += 1
            try:
                if snapshot:  # a frame made after the request (none are made while nobody watches)
                    _, frame = sink.next_frame(sink.seq, 5)
                    return self._reply(200, "image/jpeg", frame) if frame else self._reply(
                        503, "text/plain", b"no frame yet\n")
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                seq = 0
                while not sink.closed:
                    new, frame = sink.next_frame(seq)  # the newest frame, once there is a newer one
                    if new == seq or frame is None:
                        continue
                    seq = new
                    self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                     f"{len(frame)}\r\n\r\n".encode() + frame + b"\r\n")
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
            finally:
                with sink._cond:
                    sink.clients -= 1

    return Handler
