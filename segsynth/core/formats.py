"""What this machine's FFmpeg (PyAV's) reads and writes, asked of it rather than listed by hand:
the muxer for a file name, whether a muxer holds a codec, which encoder an output gets, which
extensions are media, which protocols exist; and encoder settings checked before anything runs."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av

from segsynth.core.errors import InputError

# ---- what FFmpeg reads and writes: asked, not listed by hand -----------------------------------------
VIDEO_ENCODERS = ("libx264", "libvpx-vp9", "libvpx", "mpeg4", "mpeg2video")  # in the order they are picked


AUDIO_ENCODERS = ("aac", "libopus", "mp2", "ac3", "libmp3lame", "pcm_s16le")  # for audio a format cannot copy


AVFMT_NOTIMESTAMPS = 0x80


_muxers: dict[str, str | None] = {}


_holds: dict[tuple[str, str], bool] = {}


_extensions: dict[str, str] = {}


def output_format(path: str | Path) -> str | None:
    """The name of FFmpeg's muxer for ``path``'s extension (as the ffmpeg CLI picks it), or None
    when FFmpeg has none or writes pictures with it (image2)."""

    ext = Path(path).suffix.lower()
    if ext not in _muxers:
        try:
            with av.open(f"probe{ext}", "w") as scratch:  # guessed from the name; no file is made
                name = scratch.format.name
            _muxers[ext] = None if name.startswith("image2") or not ext else name
        except (ValueError, av.FFmpegError):
            _muxers[ext] = None
    return _muxers[ext]


def holds(fmt: str, codec: str) -> bool:
    """Whether FFmpeg's muxer ``fmt`` takes a stream of ``codec`` (an encoder name): asked by
    writing a header in memory, which is where muxers refuse what they cannot store."""

    key = (fmt, codec)
    if key not in _holds:
        try:
            with av.open(io.BytesIO(), "w", format=fmt) as scratch:
                if av.Codec(codec, "w").type == "audio":
                    scratch.add_stream(codec, rate=48000)
                else:
                    stream = scratch.add_stream(codec, rate=25)
                    stream.width, stream.height, stream.pix_fmt = 64, 48, "gray" if codec == "ffv1" else "yuv420p"
                scratch.start_encoding()
            _holds[key] = True
        except (ValueError, av.FFmpegError, OSError):
            _holds[key] = False
    return _holds[key]


def video_codec(fmt: str, asked: str | None = None) -> str | None:
    """The encoder an output in ``fmt`` gets: ``asked`` if the format holds it (else None);
    without one, the first of VIDEO_ENCODERS this FFmpeg has and the format holds (VP9 for WebM)."""

    if asked is not None:
        return asked if holds(fmt, pick_encoder(asked)) else None
    return next((c for c in VIDEO_ENCODERS if c in av.codecs_available and holds(fmt, c)), None)


def is_container(fmt: str) -> bool:
    """A format that keeps timestamps and takes audio: not a raw elementary stream (.h264, .hevc)
    nor a video-only one (.ivf). What an output may keep of its input's extension."""

    flags = av.format.ContainerFormat(fmt, "w").flags
    return not flags & AVFMT_NOTIMESTAMPS and any(holds(fmt, c) for c in AUDIO_ENCODERS if c in av.codecs_available)


def extension_kind(path: str | Path) -> str | None:
    """What FFmpeg's formats say of ``path``'s extension: "media" (a format claims it: demuxers
    and muxers alike, as many demuxers - MPEG-TS, ASF - name none and probe instead), "picture"
    (only image2 and the *_pipe image formats claim it), or None (no format does)."""

    if not _extensions:
        pictures: set[str] = set()
        media: set[str] = set()
        for name in av.formats_available:
            for mode in ("r", "w"):
                try:
                    fmt = av.format.ContainerFormat(name, mode)
                except ValueError:
                    continue
                (pictures if name.startswith("image2") or name.endswith("_pipe") else media).update(fmt.extensions)
        _extensions.update({e: "media" for e in media} | {e: "picture" for e in pictures - media})
    return _extensions.get(Path(path).suffix.lower().lstrip("."))


_PROTOCOLS: dict[str, bool] = {}


def has_protocol(name: str) -> bool:
    """Whether PyAV's FFmpeg has the protocol ``name`` (srt is not in every build): asked once,
    by opening ``name://127.0.0.1:1``, which fails at once either way."""

    if name not in _PROTOCOLS:
        try:
            av.open(f"{name}://127.0.0.1:1", "r", timeout=0.5).close()
            _PROTOCOLS[name] = True
        except av.error.ProtocolNotFoundError:
            _PROTOCOLS[name] = False
        except (av.FFmpegError, OSError):
            _PROTOCOLS[name] = True  # known, only nothing listens there
    return _PROTOCOLS[name]


def ffmpeg_version() -> str:
    return f"FFmpeg {av.ffmpeg_version_info}"


def ffmpeg_message(exc: Exception) -> str:
    """PyAV's error text without errno noise: 'Invalid data found when processing input'."""
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0]


HARDWARE_H264 = ("h264_nvenc", "h264_qsv", "h264_vaapi")


def pick_encoder(codec: str) -> str:
    """``auto``: the first hardware H.264 encoder that opens here, else libx264."""

    if codec != "auto":
        return codec
    for name in HARDWARE_H264:
        try:
            ctx = av.CodecContext.create(name, "w")
            ctx.width, ctx.height, ctx.pix_fmt, ctx.time_base = 256, 256, "yuv420p", Fraction(1, 25)
            ctx.open()  # PyAV closes it when the object goes
            return name
        except Exception:  # noqa: BLE001 - not built in, no device, or no driver: try the next
            continue
    return "libx264"


X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")  # x264/x265's own names (x264.h); FFmpeg has them only as a free-form string option


def check_encoder_settings(codec: str, *, crf: int, preset: str, bitrate: str | None) -> None:
    """Codec, preset, CRF and bitrate, checked before any model is loaded: the codec (see
    check_encoder) and an x264/x265 preset (the encoders segsynth hands one) one of theirs."""
    if not 0 <= crf <= 51:
        raise InputError(f"crf: {crf} is out of range (0-51)", field="crf")
    if bitrate:
        parse_bitrate(bitrate)
    name = check_encoder(codec)
    if name.startswith("libx26") and preset not in X264_PRESETS:  # (opening one to ask prints x264's own error)
        raise InputError(f"preset: {preset!r} is not a {name} preset; choose one of: {', '.join(X264_PRESETS)}",
                         field="preset")


def check_encoder(codec: str) -> str:
    """The encoder ``codec`` names (``auto`` resolved to what it picks here), which must be a
    video encoder of this FFmpeg; InputError otherwise."""
    name = pick_encoder(codec)
    if name not in av.codecs_available:
        raise InputError(f"codec: {name} is not available here (this FFmpeg has no such encoder)", field="codec")
    try:
        ctx = av.CodecContext.create(name, "w")
    except (av.FFmpegError, ValueError) as exc:
        raise InputError(f"codec: {name} is not an encoder here ({ffmpeg_message(exc)})", field="codec") from exc
    if ctx.type != "video":
        raise InputError(f"codec: {name} is not a video encoder", field="codec")
    return name


def parse_bitrate(text: str) -> int:
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        value = 0
    if value <= 0:
        raise InputError(f"bitrate: {text!r} is not a bitrate; expected e.g. 4M or 800k", field="bitrate")
    return value
