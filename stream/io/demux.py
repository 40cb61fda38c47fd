"""Reading media: opening inputs (every file FFmpeg opens through a FileGate), demuxing and
decoding with damage reported, not fatal; timestamps as FFmpeg's best effort picks them.
InputError for anything that is not readable media."""

from __future__ import annotations

import glob as globbing
import hashlib
import logging
import os
import re
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segsynth.core.errors import InputError
from segsynth.core.formats import ffmpeg_message
from segsynth.core.grammar import IMAGE_EXTS
from segsynth.stream.io.gate import FileGate, Refused

log = logging.getLogger("segsynth")


MAX_SIDE = 16384  # larger declared frame sizes are damaged or hostile files


def check_input(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a media file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    return path


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 H x W x 3, with EXIF orientation applied."""

    path = check_input(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from exc


READ_BUFFER = 1 << 18  # bytes FFmpeg asks of a file at a time (through the gate: Python reads)


class GatedInput:
    """A PyAV input container and the gate every file it reads came through: attributes are the
    container's; ``close()`` closes both (FFmpeg leaves the first file of a custom input open)."""

    def __init__(self, container, gate) -> None:
        self.container, self.gate = container, gate

    def __getattr__(self, name: str):
        return getattr(self.container, name)

    def close(self) -> None:
        try:
            self.container.close()
        finally:
            self.gate.close()

    def __enter__(self) -> "GatedInput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_media(path: str | Path, root: str | Path | None = None) -> "GatedInput":
    """Open a media file for reading; InputError for what FFmpeg cannot read. Every file FFmpeg
    opens for it (a playlist's segments, a concat list's files) passes a FileGate: under
    ``root``, by default the file's own folder."""

    path = check_input(path)
    gate = FileGate(path, root)
    try:
        return GatedInput(av.open(gate.url(), "r", io_open=gate, buffer_size=READ_BUFFER), gate)
    except Refused:
        gate.close()
        raise
    except (av.FFmpegError, UnicodeDecodeError, OSError) as exc:
        gate.close()
        raise InputError(f"{path}: not a readable video ({ffmpeg_message(exc)})") from exc


def open_video(path: str | Path, root: str | Path | None = None) -> "GatedInput":
    """``open_media``, refusing what holds no video (or an implausible one)."""
    container = open_media(path, root)
    if not container.streams.video:
        container.close()
        raise InputError(f"{path}: has no video stream")
    for stream in container.streams.video:
        w, h = stream.codec_context.width, stream.codec_context.height
        if w > MAX_SIDE or h > MAX_SIDE:
            container.close()
            raise InputError(f"{path}: declares an implausible frame size {w}x{h} (at most {MAX_SIDE} per side)")
    return container


def release(source) -> None:
    """Close a source's container now: its decoders (and their threads) go at once, not at
    garbage collection; its ``info`` keeps what it said, without the PyAV objects."""
    if source.container is not None:
        source.container.close()
    source.container = source.video = None
    if hasattr(source, "info"):
        source.info = source.info.released()


def probe(path: str | Path, root: str | Path | None = None) -> str | None:
    """What ``path`` holds, by its content: None for a video, else why it is not one ("a
    picture", "text", "no video stream"). InputError when FFmpeg cannot read it at all."""
    with open_media(path, root) as container:
        name = container.format.name
        if name.startswith("image2") or name.endswith("_pipe"):
            return "a picture"
        if name == "tty":  # FFmpeg shows a text file as ANSI art
            return "text"
        if not container.streams.video:
            return "no video stream" + (" (audio only)" if container.streams.audio else "")
    return None


class BestEffortTimestamps:
    """A decoded frame's timestamp the way FFmpeg's ``best_effort_timestamp`` picks it
    (libavcodec's guess_correct_pts, which PyAV does not expose): its pts, unless the stream's
    pts have gone backwards more often than its dts (packed B-frames, broken muxers), then its
    dts. None when the frame has neither. One per video stream, owned by the decode thread."""

    def __init__(self) -> None:
        self.faulty_pts = self.faulty_dts = 0
        self.last_pts = self.last_dts = None

    def __call__(self, pts: int | None, dts: int | None) -> int | None:
        if dts is not None:
            self.faulty_dts += self.last_dts is not None and dts <= self.last_dts
            self.last_dts = dts
        if pts is not None:
            self.faulty_pts += self.last_pts is not None and pts <= self.last_pts
            self.last_pts = pts
        if pts is not None and (self.faulty_pts <= self.faulty_dts or dts is None):
            return pts
        return dts


def open_image_sequence(spec: str | Path, fps: float | None = None, root: str | Path | None = None):
    """A folder of images, a glob (``shots/*.png``) or an image2 pattern (``img_%04d.jpg``)
    opened as a video at ``fps`` (25 by default, as ffmpeg), in name order."""

    spec = Path(spec)
    options = {"framerate": str(fps or 25), "pattern_type": "glob"}
    if spec.is_dir():
        files = [p for p in spec.iterdir() if p.suffix.lower() in IMAGE_EXTS]
        if not files:
            raise InputError(f"{spec}: a folder with no images ({', '.join(sorted(IMAGE_EXTS))})")
        ext = max({p.suffix for p in files}, key=lambda e: sum(p.suffix == e for p in files))
        pattern = str(spec / f"*{ext}")
    elif "%" in spec.name:
        match = re.fullmatch(r"(.*?)%0?\d*d(.*)", spec.name)
        if match is None:
            raise InputError(f"{spec}: not an image2 pattern (expected one %d, e.g. img_%04d.jpg)")
        numbered = re.compile(re.escape(match[1]) + r"(\d+)" + re.escape(match[2]))
        folder = spec.parent if spec.parent.is_dir() else None
        numbers = sorted(int(m[1]) for p in (folder.iterdir() if folder else ()) if (m := numbered.fullmatch(p.name)))
        if not numbers:
            raise InputError(f"{spec}: no image matches the pattern")
        # the first number there: ffmpeg itself looks for a start only in 0-4
        pattern, options["pattern_type"], options["start_number"] = str(spec), "sequence", str(numbers[0])
    else:
        pattern = str(spec)
        if not globbing.glob(pattern):
            raise InputError(f"{spec}: no image matches the pattern")

    pattern = os.path.abspath(pattern)  # image2 opens each picture by this name: never a protocol
    gate = FileGate(pattern, root)
    try:
        container = GatedInput(av.open(pattern, "r", format="image2", options=options, io_open=gate,
                                       buffer_size=READ_BUFFER), gate)
    except Refused:
        gate.close()
        raise
    except (av.FFmpegError, UnicodeDecodeError, OSError) as exc:
        gate.close()
        raise InputError(f"{spec}: not a readable image sequence ({ffmpeg_message(exc)})") from exc
    if not container.streams.video:
        container.close()
        raise InputError(f"{spec}: has no pictures")
    return container


def demux_decode(container, video, audio: list, problems: list[str]):
    """Yield, in file order, audio packets (untouched, for remuxing) and decoded video frames.

    Reading stops at the first unreadable packet (a truncated or damaged file) and the
    decoder is then flushed, so frames it was still holding are not lost; a packet that
    reads but does not decode is skipped, as ffmpeg does. Each problem is appended to
    ``problems`` as one line for the caller to report.
    """

    packets = container.demux(video, *audio)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError as exc:
            problems.append(f"stopped reading at a damaged or missing part ({ffmpeg_message(exc)})")
            yield from _decode(lambda: video.codec_context.decode(None), problems)
            return
        if packet.stream.type == "video":
            yield from _decode(packet.decode, problems)  # the final empty packet flushes the decoder
        elif packet.dts is not None:  # audio; the demuxer's empty flush packets carry no data
            yield packet


def decode_audio(packet, problems: list[str]) -> list:
    """The frames of one audio packet; an undecodable packet is skipped (and noted), as ffmpeg does."""
    return _decode(packet.decode, problems)


def _decode(decode, problems: list[str]) -> list:
    try:
        return decode()
    except av.FFmpegError as exc:
        problems.append(f"skipped an undecodable packet ({ffmpeg_message(exc)})")
        return []
