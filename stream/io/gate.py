"""One gate for every URL FFmpeg opens for an input.

FFmpeg's demuxers open more than the URL they are given: an HLS playlist names variant
playlists, segments and keys, a concat list or a playlist on disk names other files, and the
HTTP client follows redirects. Every input segsynth opens therefore goes through PyAV's
``io_open`` hook with one of these gates: FFmpeg asks the gate for each URL, the gate checks
it and fetches it itself, and FFmpeg only ever sees bytes the gate fetched. The check and the
fetch are one act, made by one client, so a server cannot show the check one answer and
FFmpeg another (by User-Agent, encoding or redirect).

* ``FileGate``: ``file`` only, absolute paths, and every file under one folder (the service's
  ``--media-root``; for ``run``, the input's own folder), symlinks resolved first.
* ``HttpGate``: http(s) only, on the host and port of the URL given (redirects included),
  fetched with Python's HTTP client; no ``crypto``, ``data`` or other protocols.

The first refusal raises ``Refused`` (PyAV hands it to the thread reading the input at its
next call); any later URL gets an empty file, so FFmpeg, which skips segments it cannot
open, goes on to nothing, and no second error is dropped on the floor.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from segsynth.core.errors import InputError

log = logging.getLogger("segsynth")
AVIO_FLAG_WRITE = 2
PLAYLIST_BYTES = 4 << 20  # larger playlists are refused
INFLATED_BYTES = 256 << 20  # a compressed reply may inflate to at most this much
USER_AGENT = "segsynth"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class Refused(InputError):
    """A URL an input named that its gate does not open."""


def playlist_uris(text: bytes) -> list[str]:
    """The URIs an HLS playlist names: its segment and variant lines and every URI="..." attribute
    (keys, maps, renditions)."""
    body = text.decode("utf-8", "replace")
    uris = [line.strip() for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return uris + [quoted or bare for quoted, bare in re.findall(r'URI=(?:"([^"]*)"|([^,\s]+))', body)]


class _Gate:
    """What both gates share: the first refusal is raised, the ones after it are empty files."""

    def __init__(self, name: str) -> None:
        self.name = name  # the input, for messages
        self.refused: str | None = None  # the first refusal
        self.opened: list[str] = []  # every URL fetched (the first 64), for tests and --debug
        self._files: list = []  # open files handed to FFmpeg (it never closes the input's first one)

    def __call__(self, url: str, flags: int, options: dict):
        if flags & AVIO_FLAG_WRITE:
            return self._refuse(url, "writing is not allowed")
        if self.refused is not None:
            return io.BytesIO(b"")
        file = self._open(url)
        self._files = [f for f in self._files if not f.closed] + [file]
        return file

    def close(self) -> None:
        """Close every file still open (after the container: FFmpeg leaves a custom input's
        first file to its opener)."""
        for file in self._files:
            file.close()
        self._files = []

    def _refuse(self, url: str, why: str):
        if self.refused is not None:
            return io.BytesIO(b"")
        self.refused = f"{self.name}: {url} refused ({why})"
        log.debug("%s", self.refused)
        raise Refused(self.refused)

    def _note(self, url: str) -> None:
        if len(self.opened) < 64:
            self.opened.append(url)

    def _open(self, url: str):
        raise NotImplementedError


class FileGate(_Gate):
    """Files under ``root`` (resolved), and ``main`` itself; nothing else. ``url()`` is what
    ``av.open`` gets for ``main``: ``file:`` and its absolute path, so a name such as
    ``pipe:9.mp4`` is never read as a protocol."""

    def __init__(self, main: str | Path, root: str | Path | None = None) -> None:
        main = Path(os.path.abspath(main))
        super().__init__(str(main))
        self.main = main
        self.root = Path(os.path.realpath(root if root is not None else main.parent))

    def url(self, path: str | Path | None = None) -> str:
        return "file:" + os.path.abspath(path if path is not None else self.main)

    def _path(self, url: str) -> Path | str:
        """The path ``url`` names, or why it is refused (a string)."""
        scheme = _SCHEME.match(url)
        if scheme and scheme[1].lower() != "file":
            return f"only files are read here, not {scheme[1]}: URLs"
        name = url[len("file:"):] if scheme else url
        if name.startswith("/"):
            name = "/" + name.lstrip("/")  # file:///path and file://path are paths too
        if not os.path.isabs(name):
            return "not an absolute path"
        path = Path(os.path.normpath(name))
        real = Path(os.path.realpath(path))
        if path != self.main and real != self.root and self.root not in real.parents:
            return f"outside {self.root}"
        return path

    def _why(self, url: str) -> str | None:
        path = self._path(url)
        return path if isinstance(path, str) else None

    def _open(self, url: str):
        path = self._path(url)
        if isinstance(path, str):
            return self._refuse(url, path)
        real = Path(os.path.realpath(path))
        self._note(str(path))
        if real.suffix.lower() in (".m3u8", ".m3u"):  # read whole and checked: its names must pass too
            body = real.read_bytes()[:PLAYLIST_BYTES + 1]
            if len(body) > PLAYLIST_BYTES:
                return self._refuse(url, f"a playlist over {PLAYLIST_BYTES >> 20} MiB")
            for uri in playlist_uris(body):
                named = uri if _SCHEME.match(uri) or uri.startswith("/") else str(path.parent / uri)
                why = self._why(named)
                if why is not None:
                    return self._refuse(uri, f"named by {path.name}: {why}")
            return io.BytesIO(body)
        return open(real, "rb")  # noqa: SIM115 - FFmpeg closes it (PyAV's io_close)


class HttpGate(_Gate):
    """http(s) URLs on the host and port of ``url``, fetched here. Each read waits at most
    ``timeout`` seconds. For live HLS, ``stall`` says how long the input may go without a new
    segment (from the playlists' target durations); a playlist reload after that long is an
    error (the source then reconnects)."""

    def __init__(self, url: str, timeout: float, stall: float) -> None:
        super().__init__(url)
        self.origin = urllib.parse.urlsplit(url)
        self.timeout, self.min_stall = timeout, stall
        self.target_duration = 0.0  # the longest #EXT-X-TARGETDURATION seen
        self.last_data = time.monotonic()  # when a segment last gave bytes
        self.playlists = 0  # playlists fetched (reloads included)
        self._opener = urllib.request.build_opener(_SameHostRedirects(self))

    @property
    def stall(self) -> float:
        """Seconds without new video before the input counts as lost."""
        if self.target_duration:  # at the live edge FFmpeg waits up to a segment inside one read
            return max(self.min_stall, 2 * self.target_duration + 1)
        return self.min_stall

    def check(self, url: str, verb: str = "names") -> str | None:
        """Why ``url`` is refused, or None."""
        if re.match(r"^(crypto|data)[+:]", url, re.I):
            return f"the input {verb} {url.split(':', 1)[0]}: URLs, which are not read here (encrypted HLS is " \
                   "not supported)"
        try:
            parts = urllib.parse.urlsplit(url)
            same = parts.scheme.lower() in ("http", "https") and (parts.hostname, parts.port) == (
                self.origin.hostname, self.origin.port)
        except ValueError:
            same = False
        if not same:
            return f"the input {verb} it, outside {self.origin.scheme}://{self.origin.netloc}; only http(s) URLs " \
                   "on the host and port of the input are read"
        return None

    def _open(self, url: str):
        why = self.check(url)
        if why is not None:
            return self._refuse(url, why)
        playlist_like = url == self.origin.geturl() or urllib.parse.urlsplit(url).path.lower().endswith(
            (".m3u8", ".m3u"))
        if playlist_like and self.playlists and self.target_duration:
            quiet = time.monotonic() - self.last_data
            if quiet > self.stall:
                raise ConnectionError(f"no new segment for {quiet:.0f} s")
        self._note(url)
        try:
            reply = HttpFile(self, url)
        except Refused:
            raise
        except (OSError, ValueError) as exc:
            if playlist_like:
                raise ConnectionError(_reason(exc) if url == self.origin.geturl() else f"{url}: {_reason(exc)}") from exc
            log.warning("%s: skipping %s (%s)", self.name, url, _reason(exc))  # as FFmpeg skips a missing segment
            return io.BytesIO(b"")
        if reply.playlist is not None:  # every URL it names must pass too: refused here, with the reason
            for uri in playlist_uris(reply.playlist):
                why = self.check(urllib.parse.urljoin(url, uri), "names")
                if why is not None:
                    return self._refuse(uri, why)
            self.playlists += 1
            durations = re.findall(rb"#EXT-X-TARGETDURATION:\s*([\d.]+)", reply.playlist)
            self.target_duration = max([self.target_duration, *map(float, durations)])
            return io.BytesIO(reply.playlist)
        return reply

    def request(self, url: str, start: int = 0):
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "gzip, deflate"}
        if start:
            headers["Range"] = f"bytes={start}-"
        return self._opener.open(urllib.request.Request(url, headers=headers), timeout=self.timeout)

    def saw_data(self) -> None:
        self.last_data = time.monotonic()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are followed (by this client, never by FFmpeg) only on the input's host and port."""

    def __init__(self, gate: HttpGate) -> None:
        self.gate = gate

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        why = self.gate.check(target, "redirects to")
        if why is not None:
            self.gate._refuse(target, why)
            raise Refused(f"{self.gate.name}: {target} refused ({why})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class HttpFile(io.RawIOBase):
    """One HTTP reply as a file for FFmpeg: read as it arrives (never waiting for a full
    buffer, which would hold up a live stream), inflated when the server compressed it,
    seekable by range requests where the server takes them. A playlist (a reply starting with
    ``#EXTM3U``) is read whole into ``playlist`` (at most PLAYLIST_BYTES)."""

    def __init__(self, gate: HttpGate, url: str) -> None:
        super().__init__()
        self.gate, self.url = gate, url
        self.pos, self.reply = 0, None
        self._pending = b""
        self._open(0)
        self.length = None if self._inflate is not None else _int(self.reply.headers.get("Content-Length"))
        self.ranges = self._inflate is None and self.length is not None and (
            self.reply.headers.get("Accept-Ranges", "").lower() == "bytes")
        self.playlist = None
        head = self._read(4096)
        if head.lstrip().startswith(b"#EXTM3U"):
            body = head
            while len(body) <= PLAYLIST_BYTES and (chunk := self._read(1 << 16)):
                body += chunk
            self.close()
            if len(body) > PLAYLIST_BYTES:
                raise Refused(f"{gate.name}: {url} refused (a playlist over {PLAYLIST_BYTES >> 20} MiB)")
            self.playlist = body
        else:
            self._pending = head

    def _open(self, start: int) -> None:
        if self.reply is not None:
            self.reply.close()
        self.reply = self.gate.request(self.url, start)
        if start and self.reply.status != 206:
            raise OSError(f"{self.url}: the server ignored a range request (HTTP {self.reply.status})")
        encoding = self.reply.headers.get("Content-Encoding", "identity").lower()
        if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise Refused(f"{self.gate.name}: {self.url} refused (an unknown Content-Encoding {encoding!r})")
        self._inflate = None if encoding == "identity" else zlib.decompressobj(47 if "gzip" in encoding else 15)
        self._inflated = 0
        self.pos, self._pending = start, b""

    def _read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body, inflated; b"" at its end."""
        while True:
            if self._inflate is None:
                return self.reply.read1(size)
            if self._inflate.unconsumed_tail:
                data = self._inflate.decompress(self._inflate.unconsumed_tail, size)
            else:
                raw = self.reply.read1(size)
                data = self._inflate.decompress(raw, size) if raw else self._inflate.flush()
                if not raw and not data:
                    return b""
            self._inflated += len(data)
            if self._inflated > INFLATED_BYTES:
                raise Refused(f"{self.gate.name}: {self.url} refused (inflates to over {INFLATED_BYTES >> 20} MiB)")
            if data:
                return data

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = size if size and size > 0 else 1 << 16
        if self._pending:
            data, self._pending = self._pending[:size], self._pending[size:]
        else:
            data = self._read(size)
        if data:
            self.pos += len(data)
            self.gate.saw_data()
        return data

    def seekable(self) -> bool:
        return self.ranges

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        target = {0: offset, 1: self.pos + offset, 2: (self.length or 0) + offset}[whence]
        if target != self.pos:
            if not self.ranges or not 0 <= target <= (self.length or 0):
                raise OSError(f"{self.url}: cannot seek to byte {target}")
            self._open(target)
        return self.pos

    def close(self) -> None:
        if self.reply is not None:
            self.reply.close()
        super().close()


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None
