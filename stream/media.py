"""Opening inputs and writing outputs safely: clear errors for bad files, and outputs that
appear under their final name only when complete (written to a hidden temporary name in
the same directory, renamed on success, removed on failure)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from segsynth.errors import InputError, OutputError

def check_input(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a media file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    return path


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 H x W x 3, with EXIF orientation applied."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = check_input(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from exc


def write_image(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    mode = "L" if pixels.ndim == 2 else "RGB"
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower())
    Image.fromarray(pixels, mode).save(path, format=fmt or Image.registered_extensions().get(path.suffix.lower()))


def ffmpeg_message(exc: Exception) -> str:
    """PyAV's error text without errno noise: 'Invalid data found when processing input'."""
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0]


def open_video(path: str | Path):
    """Open a media file for reading; InputError for anything that is not a video."""
    import av

    path = check_input(path)
    try:
        container = av.open(str(path), "r")
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable video ({ffmpeg_message(exc)})") from exc
    if not container.streams.video:
        container.close()
        raise InputError(f"{path}: has no video stream")
    return container


def demux_decode(container, video, audio: list, problems: list[str]):
    """Yield, in file order, audio packets (untouched, for remuxing) and decoded video frames.

    Reading stops at the first unreadable packet (a truncated or damaged file) and the
    decoder is then flushed, so frames it was still holding are not lost; a packet that
    reads but does not decode is skipped, as ffmpeg does. Each problem is appended to
    ``problems`` as one line for the caller to report.
    """
    import av

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


def _decode(decode, problems: list[str]) -> list:
    import av

    try:
        return decode()
    except av.FFmpegError as exc:
        problems.append(f"skipped an undecodable packet ({ffmpeg_message(exc)})")
        return []


def open_output(path: Path):
    """Open a media file for writing. Matroska keeps negative timestamps (e.g. AAC priming
    packets) instead of shifting every stream, so video PTS stay exactly those of the input."""
    import av

    options = {"avoid_negative_ts": "disabled"} if path.suffix.lower() in (".mkv", ".webm") else {}
    return av.open(str(path), "w", options=options)


@contextlib.contextmanager
def atomic_output(path: str | Path, *inputs: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` when the block succeeds,
    delete it when the block fails. Refuses to overwrite any of ``inputs``."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: directory {parent} is not writable")
    for src in inputs:
        if Path(src).resolve() == path.resolve():
            raise OutputError(f"{path} would overwrite the input; choose another output name")
    tmp = parent / f".{path.stem}.partial-{os.getpid()}{path.suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
