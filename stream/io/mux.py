"""Writing media: outputs that appear under their final name only when complete (written to a
hidden temporary name in the same directory, renamed on success, removed on failure), muxers
written through Python files so a full disk raises, and outputs FFmpeg writes itself (pushes,
HLS, file series)."""

from __future__ import annotations

import contextlib
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from PIL import Image

from segsynth.core.errors import OutputError
from segsynth.core.formats import ffmpeg_message, output_format


def write_image(path: Path, pixels: np.ndarray) -> None:
    mode = "L" if pixels.ndim == 2 else "RGB"
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower())
    Image.fromarray(pixels, mode).save(path, format=fmt or Image.registered_extensions().get(path.suffix.lower()))


class MediaWriter:
    """An output container that writes through a Python file object, so a write error (a full
    disk) raises instead of being swallowed by FFmpeg's buffered I/O. Matroska and MP4 keep
    negative timestamps (AAC priming packets) instead of shifting every stream, so video PTS
    stay exactly those of the input. ``fragmented`` MP4/MOV write a fragment per keyframe and
    at least every second, so a killed writer leaves a playable file (Matroska is playable
    when cut anyway); the first fragment also carries the header (``delay_moov``: codecs such
    as AC-3 and ADTS AAC give the configuration MP4 needs only with their first packet). Owns
    the file and the container; ``close()`` closes both.

    ``mux()`` is the only way in: once FFmpeg has refused a packet (or the header), the
    container is ``broken`` and is never handed another packet - muxing after a failed header
    crashes libavformat - and ``close()`` closes it without writing more."""

    def __init__(self, path: Path, fragmented: bool = False) -> None:
        ext = path.suffix.lower()
        options = {"avoid_negative_ts": "disabled"} if ext in (".mkv", ".webm", ".mp4", ".m4v", ".mov") else {}
        if fragmented and ext in (".mp4", ".m4v", ".mov"):
            options["movflags"] = "frag_keyframe+empty_moov+delay_moov+default_base_moof"
            options["frag_duration"] = "1000000"
        try:
            self.file = open(path, "wb")
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        try:
            self.container = av.open(self.file, "w", format=output_format(path), options=options)
        except (av.FFmpegError, OSError, ValueError) as exc:
            self.file.close()
            raise OutputError(f"cannot write {path}: {ffmpeg_message(exc)}") from exc
        self.path, self.broken, self.muxed = path, False, False

    def mux(self, packets) -> None:
        if self.broken:
            raise OutputError(f"writing {self.path} failed earlier; nothing more is written")
        try:
            self.container.mux(packets)
        except BaseException:
            self.broken = True
            raise
        self.muxed = self.muxed or bool(packets)

    def close(self) -> None:
        try:
            self.container.close()
        finally:
            self.file.close()
            self.container = None  # the muxer goes with its last reference, now

    def __enter__(self) -> "MediaWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class URLWriter:
    """An output FFmpeg writes itself: a network push (RTSP, RTMP, SRT), an HLS playlist and
    its segments, or a segmented file series. The same interface as ``MediaWriter``; opening
    and every write are bounded by ``timeout`` seconds (a server that stops reading)."""

    def __init__(self, url: str, fmt: str, options: dict, timeout: float = 5.0) -> None:
        try:
            self.container = av.open(url, "w", format=fmt, options=options, timeout=timeout)
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise OutputError(f"cannot open {url}: {ffmpeg_message(exc)}") from exc
        self.path, self.broken, self.muxed = url, False, False

    mux = MediaWriter.mux

    def close(self) -> None:
        try:
            self.container.close()
        finally:
            self.container = None


def check_output(path: Path, *inputs: Path) -> None:
    """Fail early (before any work) on an output that cannot be written or would overwrite an input."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: directory {parent} is not writable")
    for src in inputs:
        if Path(src).resolve() == path.resolve():
            raise OutputError(f"{path} would overwrite the input; choose another output name")


def copy_packet(packet):
    """An independent copy of a demuxed packet (muxing consumes the packet it is given)."""

    copy = av.Packet(bytes(packet))
    copy.pts, copy.dts, copy.time_base, copy.duration = packet.pts, packet.dts, packet.time_base, packet.duration
    copy.is_keyframe = packet.is_keyframe
    return copy


def rescale(pts: int, src: Fraction, dst: Fraction) -> int:
    """``pts`` in time base ``src`` expressed in ``dst`` (exact when ``dst`` is the same base)."""
    return pts if src == dst else int(round(pts * Fraction(src) / Fraction(dst)))


@contextlib.contextmanager
def atomic_output(path: str | Path, *inputs: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` when the block succeeds,
    delete it when the block fails. Refuses to overwrite any of ``inputs``."""
    path = Path(path)
    check_output(path, *inputs)
    tmp = path.parent / f".{path.stem}.partial-{os.getpid()}{path.suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
