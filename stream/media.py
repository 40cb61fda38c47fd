"""Opening inputs and writing outputs safely: clear errors for bad files, and outputs that
appear under their final name only when complete (written to a hidden temporary name in
the same directory, renamed on success, removed on failure)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from segsynth.errors import InputError, OutputError

from segsynth.stream.gate import FileGate, Refused

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
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


_PROTOCOLS: dict[str, bool] = {}


def has_protocol(name: str) -> bool:
    """Whether PyAV's FFmpeg has the protocol ``name`` (srt is not in every build): asked once,
    by opening ``name://127.0.0.1:1``, which fails at once either way."""
    import av

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
    import av

    return f"FFmpeg {av.ffmpeg_version_info}"


def open_media(path: str | Path, root: str | Path | None = None) -> "GatedInput":
    """Open a media file for reading; InputError for what FFmpeg cannot read. Every file FFmpeg
    opens for it (a playlist's segments, a concat list's files) passes a FileGate: under
    ``root``, by default the file's own folder."""
    import av

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
    import glob as globbing

    import av

    from segsynth.config import IMAGE_EXTS

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


def decode_audio(packet, problems: list[str]) -> list:
    """The frames of one audio packet; an undecodable packet is skipped (and noted), as ffmpeg does."""
    return _decode(packet.decode, problems)


def _decode(decode, problems: list[str]) -> list:
    import av

    try:
        return decode()
    except av.FFmpegError as exc:
        problems.append(f"skipped an undecodable packet ({ffmpeg_message(exc)})")
        return []


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
    import av

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
    import av

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
    import av

    if asked is not None:
        return asked if holds(fmt, pick_encoder(asked)) else None
    return next((c for c in VIDEO_ENCODERS if c in av.codecs_available and holds(fmt, c)), None)


def is_container(fmt: str) -> bool:
    """A format that keeps timestamps and takes audio: not a raw elementary stream (.h264, .hevc)
    nor a video-only one (.ivf). What an output may keep of its input's extension."""
    import av

    flags = av.format.ContainerFormat(fmt, "w").flags
    return not flags & AVFMT_NOTIMESTAMPS and any(holds(fmt, c) for c in AUDIO_ENCODERS if c in av.codecs_available)


def extension_kind(path: str | Path) -> str | None:
    """What FFmpeg's formats say of ``path``'s extension: "media" (a format claims it: demuxers
    and muxers alike, as many demuxers - MPEG-TS, ASF - name none and probe instead), "picture"
    (only image2 and the *_pipe image formats claim it), or None (no format does)."""
    import av

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
        import av

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
        import av

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


class AudioTemplates:
    """Copies of the input audio streams' codec parameters, made by the thread that builds a
    sink (before any stage runs) in a scratch container of the output's format, in memory:
    ``copy[track]`` says whether that format holds the track's codec as it is (FFmpeg answers:
    avformat_query_codec, which PyAV asks when adding a stream from a template), and
    ``streams[track]`` is a template the encode thread can use without touching an input
    stream, which the decode thread is reading. ``close()`` frees the scratch container."""

    def __init__(self, path: Path, tracks, fmt: str | None = None) -> None:
        import av

        self.copy: dict[int, bool] = {}
        self.streams: dict[int, object] = {}
        fmt = fmt or output_format(path) or "matroska"
        self.scratch = av.open(io.BytesIO(), "w", format=fmt) if tracks else None
        for track in tracks:
            try:
                self.streams[track.index] = self.scratch.add_stream_from_template(track.template)
                self.copy[track.index] = True
            except (ValueError, av.FFmpegError):
                self.copy[track.index] = False

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.close()
            self.scratch = None
        self.streams = {}


class AudioOutput:
    """One output audio track, fed from the encode thread: packets copied into the output, or
    decoded frames re-encoded - AAC (Opus for WebM), resampled to the encoder's sample format,
    layout, rate and frame size, whatever the input had. ``packets(item)`` and ``flush()``
    return what to mux. ADTS AAC (MPEG-TS, HLS) goes through FFmpeg's ``aac_adtstoasc`` into
    formats that need the codec's configuration in their header (MP4, Matroska), as the ffmpeg
    CLI does; ``ready`` stays False until the first packet has given that configuration.
    Channels without an order (AVI and WAV PCM often give only a count) get FFmpeg's default
    order for their count, which MP4 needs."""

    def __init__(self, container, track, template=None) -> None:
        """``template``: the track's copy in an ``AudioTemplates`` (copied), or None (re-encoded)."""
        import av
        from av.bitstream import BitStreamFilterContext

        self.copy, self.bsf, self.resampler, self.next_pts, self.skipped = template is not None, None, None, None, 0
        if self.copy:
            self.stream = container.add_stream_from_template(template)
            if track.layout == f"{track.channels} channels":  # no channel order (AVI, WAV): MP4 wants one
                self.stream.codec_context.layout = av.AudioLayout(f"{track.channels}c")  # FFmpeg's default order
            if track.codec == "aac" and not track.has_config and container.format.name not in ("mpegts", "adts"):
                self.bsf = BitStreamFilterContext("aac_adtstoasc", template)
            self.ready = self.bsf is None
            return
        codec = next(c for c in AUDIO_ENCODERS if c in av.codecs_available and holds(container.format.name, c))
        rate = 48000 if codec in ("libopus", "mp2", "ac3") else (track.sample_rate or 48000)
        self.stream = container.add_stream(codec, rate=rate)
        # The standard layout for the channel count (AAC refuses channels without an order); more
        # than two channels: 5.1 where it is 5.1, otherwise a stereo downmix.
        self.stream.layout = {1: "mono", 6: "5.1"}.get(track.channels, "stereo")
        self.stream.codec_context.open()  # now, for its frame size
        self.ready = True

    def packets(self, item) -> list:
        if not self.copy:
            return [p for frame in item.frames or () for p in self._encode(frame)]
        import av

        try:
            out = self.bsf.filter(item.packet) if self.bsf is not None else [item.packet]
        except av.FFmpegError as exc:  # a damaged ADTS header: skip the packet, as ffmpeg does
            if not self.skipped:
                log.warning("warning: skipping damaged audio packets of stream %d (%s)", item.track,
                            ffmpeg_message(exc))
            self.skipped += 1
            return []
        for packet in out:
            if not self.ready and packet.has_sidedata("new_extradata"):
                self.stream.codec_context.extradata = bytes(packet.get_sidedata("new_extradata"))
                self.ready = True
            packet.stream = self.stream
        return out

    def _encode(self, frame) -> list:
        import av

        ctx = self.stream.codec_context
        if self.resampler is None:
            self.resampler = av.AudioResampler(format=ctx.format.name, layout=ctx.layout.name, rate=ctx.sample_rate,
                                               frame_size=ctx.frame_size or None)
        at = rescale(frame.pts, frame.time_base, Fraction(1, ctx.sample_rate)) if (
            frame.pts is not None and frame.time_base) else None
        if self.next_pts is None:  # start where the input's audio starts (the video keeps its timestamps too)
            self.next_pts = at or 0
        elif at is not None and at - self.next_pts > ctx.sample_rate // 2:
            self.next_pts = at  # a gap of over half a second (a live source reconnected) stays a gap
        return self._encode_chunks(self.resampler.resample(frame))

    def _encode_chunks(self, chunks) -> list:
        """Consecutive samples, counted from the first frame's time (gaps under half a second closed)."""
        out = []
        rate = self.stream.codec_context.sample_rate
        for chunk in chunks:
            chunk.pts, chunk.time_base = self.next_pts, Fraction(1, rate)
            self.next_pts += chunk.samples
            out += self.stream.encode(chunk)
        return out

    def flush(self) -> list:
        if self.copy:
            return []
        out = self._encode_chunks(self.resampler.resample(None)) if self.resampler is not None else []
        return out + self.stream.encode(None)


def copy_packet(packet):
    """An independent copy of a demuxed packet (muxing consumes the packet it is given)."""
    import av

    copy = av.Packet(bytes(packet))
    copy.pts, copy.dts, copy.time_base, copy.duration = packet.pts, packet.dts, packet.time_base, packet.duration
    copy.is_keyframe = packet.is_keyframe
    return copy


def rescale(pts: int, src: Fraction, dst: Fraction) -> int:
    """``pts`` in time base ``src`` expressed in ``dst`` (exact when ``dst`` is the same base)."""
    return pts if src == dst else int(round(pts * Fraction(src) / Fraction(dst)))


HARDWARE_H264 = ("h264_nvenc", "h264_qsv", "h264_vaapi")


def pick_encoder(codec: str) -> str:
    """``auto``: the first hardware H.264 encoder that opens here, else libx264."""
    import av

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
    """Codec, preset, CRF and bitrate, checked before any model is loaded: the codec (``auto``
    resolved to what it picks here) must be a video encoder of this FFmpeg, and an x264/x265
    preset (the encoders segsynth hands one) one of theirs."""
    import av

    if not 0 <= crf <= 51:
        raise InputError(f"crf: {crf} is out of range (0-51)")
    if bitrate:
        parse_bitrate(bitrate)
    name = pick_encoder(codec)
    if name not in av.codecs_available:
        raise InputError(f"codec: {name} is not available here (this FFmpeg has no such encoder)")
    try:
        ctx = av.CodecContext.create(name, "w")
    except (av.FFmpegError, ValueError) as exc:
        raise InputError(f"codec: {name} is not an encoder here ({ffmpeg_message(exc)})") from exc
    if ctx.type != "video":
        raise InputError(f"codec: {name} is not a video encoder")
    if name.startswith("libx26") and preset not in X264_PRESETS:  # (opening one to ask prints x264's own error)
        raise InputError(f"preset: {preset!r} is not a {name} preset; choose one of: {', '.join(X264_PRESETS)}")


def parse_bitrate(text: str) -> int:
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        value = 0
    if value <= 0:
        raise InputError(f"bitrate: {text!r} is not a bitrate; expected e.g. 4M or 800k")
    return value


def add_video_stream(container, codec: str, info, size: tuple[int, int], *, crf: int, preset: str,
                     bitrate: str | None, b_frames: bool = True, pix_fmt: str = "yuv420p", low_latency: bool = False):
    """The output video stream: input time base (so input PTS pass through unchanged) and rate.
    ``b_frames=False`` for fragmented MP4: fragments cannot hold the negative decode times that
    B-frame reordering needs, and the muxer would shift every timestamp to make room.
    Encoders use frame threads like the ffmpeg CLI (PyAV's default, slice threads, encodes 720p
    ~20 % slower with x264) unless ``low_latency``: frame threads hold back a few frames each."""
    import av

    rate = info.rate  # a SourceInfo: the input's frame rate and timestamp base
    codec = pick_encoder(codec)
    try:
        stream = container.add_stream(codec, rate=rate)
    except (av.FFmpegError, ValueError) as exc:
        raise InputError(f"codec: {codec} is not available here ({ffmpeg_message(exc)})") from exc
    stream.width, stream.height = size
    stream.pix_fmt = pix_fmt
    stream.codec_context.thread_type = "SLICE" if low_latency else "AUTO"
    stream.time_base = stream.codec_context.time_base = info.time_base
    options = {}
    if codec.startswith("libx26"):
        options = {"preset": preset} if bitrate else {"crf": str(crf), "preset": preset}
    elif codec in ("libvpx-vp9", "libvpx"):  # their own quality scale (0-63) and speed settings
        fast = X264_PRESETS.index(preset) <= X264_PRESETS.index("faster") if preset in X264_PRESETS else True
        options = {"deadline": "realtime" if fast else "good", "cpu-used": "8" if fast else "4", "row-mt": "1"}
        if not bitrate:
            options["crf"] = str(round(crf * 63 / 51))
            stream.bit_rate = 0 if codec == "libvpx-vp9" else 8_000_000  # VP9: constant quality; VP8: a cap
    elif not bitrate:  # MPEG-4 part 2, MPEG-2 and the like: a fixed quantiser for the CRF
        stream.codec_context.qscale = True
        stream.codec_context.global_quality = 118 * max(2, round(crf / 6))  # FF_QP2LAMBDA x q (crf 20 -> q 3)
    if bitrate:
        stream.bit_rate = parse_bitrate(bitrate)
    if not b_frames:
        options["bf"] = "0"
        options["g"] = str(max(1, round(2 * float(rate))))  # a keyframe (and fragment) every 2 s
    stream.options = options
    return stream


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
