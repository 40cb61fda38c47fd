"""The string grammars of segsynth, checked before anything runs: sizes, views, outputs and
sources (URLs, cameras, lavfi graphs, image sequences), stabiliser specs, preview addresses,
segmenter sizes. Pure functions of their text (and of what this machine has: cameras, the
FFmpeg build), used by the configs, the CLI and the service alike."""

from __future__ import annotations

import glob
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from segsynth.core import formats
from segsynth.core.errors import InputError
from segsynth.core.formats import (
    ffmpeg_version,
    has_protocol,
    output_format,
    video_codec,
)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


SEGMENT_VIEWS = ("labels", "overlay", "side-by-side", "ids")


VIDEO_OUTPUTS = ".mp4, .mkv, .webm, .mov, .avi, .ts, ..."  # for messages: what FFmpeg writes decides


def _kind(path: Path) -> str | None:
    ext = path.suffix.lower()
    return "image" if ext in IMAGE_EXTS else "video" if output_format(path) else None


def check_video_output(path: str | Path, codec: str | None, *, gray: bool = False) -> None:
    """A video file output: FFmpeg writes its extension, and its container holds ``codec`` (an
    asked-for encoder), or one of the encoders segsynth picks (VP9 for WebM), or lossless FFV1
    grayscale for ``gray`` (the ids view)."""

    fmt = output_format(path)
    if fmt is None:
        raise InputError(f"{path}: the output must be a video container FFmpeg writes ({VIDEO_OUTPUTS}), a stream "
                         "URL (rtsp://, rtmp://, srt://), an .m3u8 playlist or mjpeg://HOST:PORT")
    if gray:
        if video_codec(fmt, "ffv1") is None:
            raise InputError(f"view: ids writes lossless FFV1 grayscale video, which {Path(path).suffix} cannot "
                             "hold; use .mkv", field="view")
    elif codec is not None and video_codec(fmt, formats.check_encoder(codec)) is None:
        other = video_codec(fmt)
        raise InputError(f"codec: {path} ({fmt}) cannot hold {codec}; write .mkv or .mp4 instead"
                         + (f", or leave --codec out ({Path(path).suffix} gets {other})" if other else ""),
                         field="codec")
    elif video_codec(fmt) is None:
        raise InputError(f"{path}: FFmpeg's {fmt} holds none of the video encoders here; write .mp4 or .mkv")


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """'640x360' -> (640, 360): a size is WxH on every command, two positive integers joined by x."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise InputError(f"{flag} {text!r}: expected WxH, two positive integers joined by x, e.g. 640x360",
                         field=flag.lstrip("-").replace("-", "_"))
    return int(parts[0]), int(parts[1])


EXPORT_TARGETS = ("spade", "encoder", "deeplab", "chain", "quantize", "student")


def parse_batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    if not text.isdigit():
        raise InputError(f"--batch {text!r}: expected 'dynamic' or a number")
    return int(text)


def parse_overrides(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--opt {item!r}: expected KEY=VALUE, e.g. --opt label_nc=150")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


RUN_VIEWS = ("synth", "labels", "overlay", "side-by-side", "grid")


SESSION_VIEWS = (*RUN_VIEWS, "ids")  # ids: raw class ids as lossless grayscale (segment)


FITS = ("letterbox", "stretch")


POLICIES = ("lossless", "latest")


_STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


PUSH_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "srt")


RTSP_TRANSPORTS = ("tcp", "udp")


def sink_kind(spec: str) -> str:
    """file | push (RTSP/RTMP/SRT to a server) | hls (a playlist and its segments) | preview (MJPEG over HTTP)."""
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else ""
    if scheme in PUSH_SCHEMES:
        return "push"
    if scheme == "mjpeg":
        return "preview"
    if scheme:
        raise InputError(f"{spec}: outputs are files, rtsp://, rtmp://, srt://, an .m3u8 playlist or "
                         "mjpeg://HOST:PORT (--preview)")
    return "hls" if spec.lower().endswith(".m3u8") else "file"


def check_sink(sink: str, kind: str, codec: str | None = None, gray: bool = False) -> None:
    """One output string, checked before anything runs (a file: see check_video_output)."""
    if kind == "file":
        check_video_output(sink, codec, gray=gray)
    if kind == "preview":
        parse_address(sink)
    if kind == "push" and sink.lower().startswith("srt://"):
        if not has_protocol("srt"):
            raise InputError(f"{sink}: this FFmpeg ({ffmpeg_version()}, PyAV's) has no SRT support; push "
                             "with rtsp:// or rtmp://")


def check_source(source: str) -> None:
    """A source string: a file or an image sequence, or a live source of a supported kind."""

    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if is_live(source):
        target(source, LiveOptions())  # the URL, camera or lavfi graph, and what this FFmpeg can read
        return
    if scheme and scheme != "file":
        raise InputError(f"{source}: not a supported input (files, rtsp://, rtsps://, rtmp://, srt://, http(s)://, "
                         "/dev/videoN, v4l2:N, lavfi:GRAPH)")
    if Path(source).suffix.lower() in IMAGE_EXTS and not is_image_sequence(source):
        raise InputError(f"{source} is an image; run works on video (use segment for images, or an image "
                         "sequence: a folder, a glob or a pattern like img_%04d.jpg)")


def check_seed(seed) -> None:
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**32):
        raise InputError("seed: must be a whole number from 0 to 4294967295")


def is_image_sequence(source: str) -> bool:
    """An image2 pattern (``img_%04d.jpg``), a glob of images, or a folder: a video of images."""
    path = Path(source)
    return (path.suffix.lower() in IMAGE_EXTS and (re.search(r"%0?\d*d", path.name) is not None
                                                  or any(c in path.name for c in "*?["))) or path.is_dir()


LOOPBACK = ("127.0.0.1", "::1", "localhost")  # hosts only this machine reaches
FUSED = ("auto", "on", "off")


TIERS = ("quality", "fast")  # --models: the float graphs at 513 / the int8 graphs at FAST_SEG_SIZE


# the largest size that keeps fast at 4x quality's fps on real footage of people (bench tiers on
# third_party/media/vtest_people_640x360_6s.mp4; 321 was chosen on the cartoon demo and agreed on
# 75 % of the labels there): benchmarks/RESULTS.md
FAST_SEG_SIZE = 385


STABILIZE_METHODS = ("off", "majority", "hysteresis", "flow")


STABILIZE_DEFAULT = "hysteresis"


STABILIZE_CHOICES = "off|majority[:K]|hysteresis|flow"


def parse_stabilize(spec: str) -> tuple[str, int]:
    """``spec`` -> (method, K); K is majority's window (1 otherwise). InputError when malformed."""
    name, _, arg = str(spec).strip().lower().partition(":")
    if name not in STABILIZE_METHODS or (arg and name != "majority"):
        raise InputError(f"stabilize: {spec!r} is not one of {STABILIZE_CHOICES}")
    if name != "majority":
        return name, 1
    if arg and not arg.isdigit():
        raise InputError(f"stabilize: majority:K needs a whole number of frames, got {arg!r}")
    k = int(arg) if arg else 5
    if not 2 <= k <= 15:
        raise InputError("stabilize: majority:K takes K between 2 and 15 frames")
    return name, k


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:8090' (or 'mjpeg://127.0.0.1:8090') -> ('127.0.0.1', 8090)."""
    text = text.removeprefix("mjpeg://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InputError(f"--preview {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8090")
    return host.strip("[]") or "127.0.0.1", int(port)


SEG_SIZES = (513, 385, 321, 257)


def check_size(size: int) -> None:
    if size < 33 or (size - 1) % 16:
        raise InputError(f"--seg-size {size}: DeepLab takes 16k + 1 pixels (e.g. {', '.join(map(str, SEG_SIZES))})")


NETWORK = {"rtsp": "rtsp,rtsps,rtp,srtp,udp,tcp,tls", "rtsps": "rtsp,rtsps,rtp,srtp,udp,tcp,tls",
           "rtmp": "rtmp,rtmps,tcp,tls", "rtmps": "rtmp,rtmps,tcp,tls", "srt": "srt,udp",
           "http": "http,https,tcp,tls,crypto", "https": "http,https,tcp,tls,crypto"}


def is_live(spec: str) -> bool:
    """Whether a source string names a live source (a network URL, a camera, a lavfi graph)."""
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else ""
    return scheme in NETWORK or spec.startswith(("lavfi:", "v4l2:", "/dev/video"))


# lavfi graphs may use these filters only: generators and plain picture transforms, none of
# which reads a file or opens a URL (movie, drawtext's textfile, ... are not among them)
LAVFI_FILTERS = {"color", "testsrc", "testsrc2", "smptebars", "smptehdbars", "rgbtestsrc", "yuvtestsrc", "pal75bars",
                 "pal100bars", "mandelbrot", "life", "cellauto", "gradients", "nullsrc", "allrgb", "allyuv",
                 "sine", "anullsrc", "scale", "format", "fps", "setpts", "hflip", "vflip", "crop", "pad", "hue",
                 "boxblur", "noise", "null", "transpose", "rotate", "eq", "negate"}


def check_lavfi(graph: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_=:.,;#+\-]*", graph):
        raise InputError(f"lavfi:{graph}: only letters, digits and = : . , ; # + - are allowed in a lavfi graph")
    for part in re.split(r"[,;]", graph):
        name = part.split("=", 1)[0].strip()
        if name and name not in LAVFI_FILTERS:
            raise InputError(f"lavfi:{graph}: filter {name!r} is not allowed here (generators and plain transforms "
                             f"only: {', '.join(sorted(LAVFI_FILTERS))})")


@dataclass(frozen=True)
class LiveOptions:
    rtsp_transport: str = "tcp"
    stall_timeout: float = 5.0  # seconds without a frame: the source is lost
    open_timeout: float = 10.0
    reconnect_max: int | None = None  # reconnects in a row; None: forever
    camera_size: tuple[int, int] | None = None  # (W, H)
    camera_fps: float | None = None


@dataclass(frozen=True)
class Target:
    """What ``av.open`` gets for a source string."""

    url: str
    format: str | None
    options: dict
    paced: bool = False  # produced faster than real time (lavfi): released at its own rate
    clocked: bool = False  # frames arrive as they are captured: timestamps should follow the wall clock
    vod_possible: bool = False  # HTTP: a file or a finished playlist (a known duration) is not live


def target(spec: str, opts: LiveOptions) -> Target:
    """The FFmpeg URL, format and options of a live source string; InputError for what is refused."""
    if spec.startswith("lavfi:"):
        graph = spec[len("lavfi:"):]
        if not graph:
            raise InputError("lavfi: needs a filter graph, e.g. lavfi:testsrc2=size=640x360:rate=30")
        check_lavfi(graph)
        return Target(graph, "lavfi", {}, paced=True)
    if spec.startswith(("v4l2:", "/dev/video")):
        device = f"/dev/video{spec[5:]}" if spec.startswith("v4l2:") else spec
        if not re.fullmatch(r"/dev/video\d+", device):
            raise InputError(f"{spec}: a camera is /dev/videoN or v4l2:N")
        if not Path(device).exists():
            raise InputError(f"{device}: no such device (cameras here: {', '.join(list_cameras()) or 'none'})")
        options = {}
        if opts.camera_size:
            options["video_size"] = f"{opts.camera_size[0]}x{opts.camera_size[1]}"
        if opts.camera_fps:
            options["framerate"] = f"{opts.camera_fps:g}"
        return Target(device, "v4l2", options, clocked=True)
    try:
        parts = urllib.parse.urlsplit(spec)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError as exc:
        raise InputError(f"{spec}: not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in NETWORK:
        raise InputError(f"{spec}: not a supported live source (rtsp://, rtsps://, rtmp://, srt://, http(s)://, "
                         "/dev/videoN, v4l2:N, lavfi:GRAPH)")
    if not parts.hostname:
        raise InputError(f"{spec}: no host in the URL")
    if scheme == "srt" and not formats.has_protocol("srt"):
        raise InputError(f"{spec}: this FFmpeg (PyAV's {formats.ffmpeg_version()}) has no SRT support; use rtsp://, "
                         "rtmp:// or http(s)://")
    options = {"protocol_whitelist": NETWORK[scheme]}
    if scheme in ("rtsp", "rtsps"):
        options["rtsp_transport"] = opts.rtsp_transport
    if scheme in ("http", "https"):  # FFmpeg's own HTTP client is not used: the gate fetches (see _connect)
        options = {"http_persistent": "0"}  # HLS: a fresh request per URL, each through the gate
    return Target(spec, None, options, clocked=scheme in ("rtsp", "rtsps", "rtmp", "rtmps", "srt"),
                  vod_possible=scheme in ("http", "https"))


def list_cameras() -> list[str]:
    return sorted(glob.glob("/dev/video[0-9]*"), key=lambda p: int(re.sub(r"\D", "", p) or 0))


def describe_cameras() -> list[tuple[str, str]]:
    """(device, name) of each V4L2 camera, as the kernel names them."""
    out = []
    for device in list_cameras():
        name_file = Path("/sys/class/video4linux") / Path(device).name / "name"
        try:
            name = name_file.read_text().strip()
        except OSError:
            name = "?"
        out.append((device, name))
    return out


BACKENDS = ("auto", "tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime")


GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda", "torch-cuda")
