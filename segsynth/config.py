"""Run configuration as data: dataclasses validated once at the edge (CLI, config file or
HTTP API all build these), then passed down unchanged."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from segsynth.errors import Forbidden, InputError, LabelError, at_field

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
SEGMENT_VIEWS = ("labels", "overlay", "side-by-side", "ids")
VIDEO_OUTPUTS = ".mp4, .mkv, .webm, .mov, .avi, .ts, ..."  # for messages: what FFmpeg writes decides


def _kind(path: Path) -> str | None:
    from segsynth.stream.media import output_format

    ext = path.suffix.lower()
    return "image" if ext in IMAGE_EXTS else "video" if output_format(path) else None


def check_video_output(path: str | Path, codec: str | None, *, gray: bool = False) -> None:
    """A video file output: FFmpeg writes its extension, and its container holds ``codec`` (an
    asked-for encoder), or one of the encoders segsynth picks (VP9 for WebM), or lossless FFV1
    grayscale for ``gray`` (the ids view)."""
    from segsynth.stream.media import output_format, video_codec

    fmt = output_format(path)
    if fmt is None:
        raise InputError(f"{path}: the output must be a video container FFmpeg writes ({VIDEO_OUTPUTS}), a stream "
                         "URL (rtsp://, rtmp://, srt://), an .m3u8 playlist or mjpeg://HOST:PORT")
    if gray:
        if video_codec(fmt, "ffv1") is None:
            raise InputError(f"view: ids writes lossless FFV1 grayscale video, which {Path(path).suffix} cannot "
                             "hold; use .mkv", field="view")
    elif codec is not None and video_codec(fmt, codec) is None:
        other = video_codec(fmt)
        raise InputError(f"codec: {path} ({fmt}) cannot hold {codec}; write .mkv or .mp4 instead"
                         + (f", or leave --codec out ({Path(path).suffix} gets {other})" if other else ""),
                         field="codec")
    elif video_codec(fmt) is None:
        raise InputError(f"{path}: FFmpeg's {fmt} holds none of the video encoders here; write .mp4 or .mkv")


@dataclass(frozen=True)
class SegmentConfig:
    """``segsynth segment IN OUT``: label every frame of an image or a video."""

    input: Path
    output: Path
    view: str = "labels"
    remap: str | None = None
    segmenter: str = "ade20k+voc"
    label_set: str | None = None
    threads: int | None = None
    legend: bool = True
    crf: int = 18
    preset: str = "veryfast"
    backend: str = "auto"
    fp16: bool = True
    fused: str = "auto"  # videos: see ModelConfig.fused
    stabilize: str | None = None  # videos: see StreamConfig.stabilize (images have no time to stabilise over)
    models: str = "quality"  # see ModelConfig.models
    seg_size: int | None = None  # see ModelConfig.seg_size

    def __post_init__(self) -> None:
        if self.stabilize is not None:
            from segsynth.stream.stabilize import parse

            parse(self.stabilize)
        object.__setattr__(self, "input", Path(self.input))
        object.__setattr__(self, "output", Path(self.output))
        if self.view not in SEGMENT_VIEWS:
            raise InputError(f"unknown view {self.view!r}; choose one of: {', '.join(SEGMENT_VIEWS)}")
        out_kind = _kind(self.output)
        if out_kind is None:
            raise InputError(f"{self.output}: unknown output type {self.output.suffix!r}; use an image "
                             f"({', '.join(sorted(IMAGE_EXTS))}) or video ({VIDEO_OUTPUTS}) extension")
        in_kind = _kind(self.input) or "video"  # unknown extensions are probed as media
        if in_kind != out_kind:
            raise InputError(f"{self.input} is {'an image' if in_kind == 'image' else 'a video'} "
                             f"but {self.output} names {'an image' if out_kind == 'image' else 'a video'} file")
        if out_kind == "video":
            check_video_output(self.output, None, gray=self.view == "ids")
        if self.threads is not None and self.threads < 1:
            raise InputError("--threads must be at least 1")
        if not 0 <= self.crf <= 51:
            raise InputError("--crf must be between 0 and 51")

    @property
    def is_image(self) -> bool:
        return _kind(self.output) == "image"


def parse_size(text: str, flag: str = "--size", order: str = "HxW") -> tuple[int, int]:
    """'512x256' -> (512, 256) in the order the flag documents (HxW or WxH)."""
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise InputError(f"{flag} {text!r}: expected {order} with two positive integers, e.g. 256x512")
    return int(parts[0]), int(parts[1])


EXPORT_TARGETS = ("spade", "encoder", "deeplab", "chain", "quantize")


@dataclass(frozen=True)
class ExportConfig:
    """``segsynth export WHAT``: write an ONNX graph following the I/O contracts."""

    what: str
    out: Path
    checkpoint: Path | None = None  # SPADE directory (spade/encoder/chain) or DeepLab .pth (deeplab)
    deeplab: Path | None = None  # chain: the DeepLab checkpoint
    from_tflite: Path | None = None  # deeplab: convert a TFLite segmenter instead
    size: tuple[int, int] | None = None  # (H, W)
    seg_size: tuple[int, int] = (513, 513)  # chain: the segmenter's input size (H, W)
    batch: int | None = None  # None = dynamic batch dimension (the default); N = fixed
    argmax: bool = False  # deeplab: output labels (uint8) instead of logits
    label_set: str | None = None
    epoch: str = "latest"
    overrides: tuple[tuple[str, str], ...] = ()  # opt.txt overrides, (key, value)
    model: Path | None = None  # quantize: the float graph
    calibrate: tuple[Path, ...] = ()  # quantize: videos whose frames calibrate the activation ranges
    frames: int = 48  # quantize: how many frames, spread over the videos

    def __post_init__(self) -> None:
        if self.what not in EXPORT_TARGETS:
            raise InputError(f"unknown export target {self.what!r}; choose one of: {', '.join(EXPORT_TARGETS)}")
        if Path(self.out).suffix.lower() != ".onnx":
            raise InputError(f"{self.out}: the output of export must be an .onnx file")
        needs = {"spade": ["checkpoint"], "encoder": ["checkpoint"], "chain": ["checkpoint", "deeplab", "size"],
                 "deeplab": [] if self.from_tflite else ["checkpoint"], "quantize": ["model", "calibrate"]}[self.what]
        missing = [("MODEL.onnx" if n == "model" else f"--{n.replace('_', '-')}") for n in needs
                   if getattr(self, n) in (None, ())]
        if missing:
            raise InputError(f"export {self.what} needs {' and '.join(missing)}")
        if self.batch is not None and not 1 <= self.batch <= 64:
            raise InputError("--batch must be 'dynamic' or between 1 and 64")


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
        from segsynth.stream.preview import parse_address

        parse_address(sink)
    if kind == "push" and sink.lower().startswith("srt://"):
        from segsynth.stream.media import ffmpeg_version, has_protocol

        if not has_protocol("srt"):
            raise InputError(f"{sink}: this FFmpeg ({ffmpeg_version()}, PyAV's) has no SRT support; push "
                             "with rtsp:// or rtmp://")


def check_source(source: str) -> None:
    """A source string: a file or an image sequence, or a live source of a supported kind."""
    from segsynth.stream.live import is_live

    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if is_live(source):
        from segsynth.stream.live import LiveOptions, target

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


FUSED = ("auto", "on", "off")
TIERS = ("quality", "fast")  # --models: the float graphs at 513 / the int8 graphs at FAST_SEG_SIZE
FAST_SEG_SIZE = 321  # bench tiers on examples/demo.mp4: 4.2x quality's fps, labels 0.92, picture 25.5 dB


@dataclass(frozen=True)
class ModelConfig:
    """Which models a ``ModelSet`` loads, and where they run."""

    segmenter: str = "ade20k+voc"
    generator: str = "default"
    label_set: str | None = None  # of a custom segmenter ONNX without segsynth metadata
    size: tuple[int, int] | None = None  # (W, H) synthesis resolution; default: the generator's own
    backend: str = "auto"
    threads: int | None = None
    fp16: bool = True  # GPU backends only; the CPU backend always computes in fp32
    cache_dir: Path | None = None
    batch: int | None = None  # the batch sessions run: GPU engines are tuned for it (None: up to 8)
    fused: str = "auto"  # the models as one graph (stream.chain): on | off | auto (on, or one by one if it fails)
    models: str = "quality"  # quality: the float graphs; fast: the bundled int8 graphs, segmenters at FAST_SEG_SIZE
    seg_size: int | None = None  # the segmenters' input (16k + 1); None: the graph's (fast: FAST_SEG_SIZE)

    @property
    def fast(self) -> bool:
        return self.models == "fast"

    def __post_init__(self) -> None:
        if self.models not in TIERS:
            raise InputError(f"--models {self.models!r}: choose one of {', '.join(TIERS)}")
        if self.seg_size is not None:
            from segsynth.export.seg_size import check_size

            check_size(self.seg_size)
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.fused not in FUSED:
            raise InputError(f"--fused {self.fused!r}: choose one of {', '.join(FUSED)}")
        if self.batch is not None and self.batch < 1:
            raise InputError("--batch must be at least 1")
        if self.size is not None and (self.size[0] % 32 or self.size[1] % 32):
            raise InputError(f"--size {self.size[0]}x{self.size[1]}: SPADE needs multiples of 32")
        if self.threads is not None and self.threads < 1:
            raise InputError("--threads must be at least 1")


@dataclass(frozen=True)
class StreamConfig:
    """One stream session: where frames come from, where results go, and how they are made.
    Validated here, before any model is loaded; the CLI, config files and the HTTP API all
    build this."""

    source: str
    sinks: tuple[str, ...]
    view: str | None = None  # None: synth with a generator, labels without one
    remap: str | None = None
    style: Path | None = None
    seed: int | None = None
    smooth: int = 1  # the old spelling of stabilize="majority:K"
    stabilize: str | None = None  # off | majority[:K] | hysteresis | flow (stream.stabilize); None: the default
    fit: str | None = None  # letterbox | stretch; default: how the generator was trained
    policy: str | None = None  # None: latest for live sources, lossless for files
    batch: int = 1
    codec: str | None = None  # None: libx264, or the first encoder a file's container holds (VP9 for WebM)
    crf: int = 20
    preset: str = "veryfast"
    bitrate: str | None = None
    stream: int | None = None  # absolute index of the video stream to use
    fps: float | None = None  # frame rate of image sequences (default 25, as ffmpeg)
    legend: bool = True
    ring_slots: int | None = None  # frames queued before infer; default 8, or 2 batches for latest (low latency)
    id: str | None = None  # the stream's name in stats and metrics
    max_frames: int | None = None  # stop (drain) after this many frames, like ffmpeg -frames:v
    duration: float | None = None  # ... or after this many seconds of input, like ffmpeg -t
    segment_time: float | None = None  # file outputs: a new file every so many seconds
    rtsp_transport: str = "tcp"
    stall_timeout: float = 5.0  # live: seconds without a frame before the source counts as lost
    reconnect_max: int | None = None  # live: reconnects in a row before giving up (None: forever)
    camera_size: tuple[int, int] | None = None  # (W, H)
    camera_fps: float | None = None
    media_root: Path | None = None  # files read and written must lie under it (the service's --media-root);
    # a source's playlist may then name files under it only (None: under the source's own folder)

    def __post_init__(self) -> None:
        source = str(self.source)
        object.__setattr__(self, "source", source)
        sinks = (self.sinks,) if isinstance(self.sinks, (str, Path)) else tuple(self.sinks)
        object.__setattr__(self, "sinks", tuple(str(s) for s in sinks))
        for name in ("style", "media_root"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        # each field on its own first, each error naming its field; what needs several fields last
        with at_field("source"):
            check_source(source)
        with at_field("sinks"):
            kinds = [sink_kind(s) for s in self.sinks]
            for sink, kind in zip(self.sinks, kinds):
                check_sink(sink, kind, self.codec, gray=self.view == "ids")
            names = [str(Path(s).resolve()) if k in ("file", "hls") else s.rstrip("/")
                     for s, k in zip(self.sinks, kinds)]
            if len(set(names)) < len(names):
                raise InputError("sinks: the same output is named twice")
        for name in ("fps", "duration", "segment_time", "stall_timeout", "camera_fps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise InputError(f"{name}: a finite number is needed", field=name)
        if self.view is not None and self.view not in SESSION_VIEWS:
            raise InputError(f"view: unknown view {self.view!r}; choose one of: {', '.join(SESSION_VIEWS)}",
                             field="view")
        if self.policy is not None and self.policy not in POLICIES:
            raise InputError(f"policy: must be one of: {', '.join(POLICIES)}", field="policy")
        if self.fit is not None and self.fit not in FITS:
            raise InputError(f"fit: must be one of: {', '.join(FITS)}", field="fit")
        if not 1 <= self.smooth <= 15:
            raise InputError("smooth: must be between 1 (off) and 15 frames", field="smooth")
        if self.stabilize is not None:
            from segsynth.stream.stabilize import parse

            with at_field("stabilize"):
                parse(self.stabilize)
            if self.smooth > 1:
                raise InputError("smooth is the old name of stabilize=majority:K; give one of them", field="smooth")
        if not 1 <= self.batch <= 64:
            raise InputError("batch: must be between 1 and 64", field="batch")
        if self.ring_slots is not None and self.ring_slots < max(2, self.batch):
            raise InputError("ring_slots: the frame ring needs at least max(2, batch) slots", field="ring_slots")
        with at_field("seed"):
            check_seed(self.seed)
        if self.style is not None and self.seed is not None:
            raise InputError("style and seed both set z; give one", field="seed")
        if self.fps is not None and not 0 < self.fps <= 1000:
            raise InputError("fps: must be between 0 and 1000", field="fps")
        if self.max_frames is not None and self.max_frames < 1:
            raise InputError("frames: must be at least 1", field="max_frames")
        if self.duration is not None and not self.duration > 0:
            raise InputError("duration: must be more than 0 seconds", field="duration")
        if self.segment_time is not None and not self.segment_time >= 1:
            raise InputError("segment_time: must be at least 1 second", field="segment_time")
        if self.rtsp_transport not in RTSP_TRANSPORTS:
            raise InputError(f"rtsp_transport: must be one of: {', '.join(RTSP_TRANSPORTS)}", field="rtsp_transport")
        if not 0.5 <= self.stall_timeout <= 600:
            raise InputError("stall_timeout: must be between 0.5 and 600 seconds", field="stall_timeout")
        if self.reconnect_max is not None and self.reconnect_max < 0:
            raise InputError("reconnect_max: must be 0 or more", field="reconnect_max")
        if self.camera_fps is not None and not 0 < self.camera_fps <= 240:
            raise InputError("camera_fps: must be between 0 and 240", field="camera_fps")
        if self.id is not None and not _STREAM_ID.fullmatch(self.id):
            raise InputError(f"id: {self.id!r} must be 1-64 letters, digits, '.', '_' or '-'", field="id")
        from segsynth.stream.media import check_encoder_settings

        from segsynth import labels

        try:
            labels.check_rules(self.remap)
        except LabelError as exc:
            raise LabelError(f"remap: {exc}", field="remap") from None
        check_encoder_settings("ffv1" if self.view == "ids" else self.codec or "libx264", crf=self.crf,
                               preset=self.preset, bitrate=self.bitrate)
        if self.view == "ids" and any(k != "file" for k in kinds):
            raise InputError("view: ids writes lossless FFV1 grayscale video to files; use .mkv", field="view")
        if self.media_root is not None:
            self._check_under_root(kinds)
        if not self.sinks:
            raise InputError("sinks: at least one output is needed", field="sinks")

    def local_paths(self, kinds: list[str] | None = None) -> list[tuple[str, str]]:
        """(field, path) of every file this stream reads or writes: a file source, the style
        image, file and HLS outputs."""
        from segsynth.stream.live import is_live

        kinds = kinds or [sink_kind(s) for s in self.sinks]
        paths = [] if is_live(self.source) else [("source", self.source)]
        paths += [("style", str(self.style))] if self.style is not None else []
        return paths + [("sinks", s) for s, k in zip(self.sinks, kinds) if k in ("file", "hls")]

    def _check_under_root(self, kinds: list[str]) -> None:
        root = self.media_root.resolve()
        for field, path in self.local_paths(kinds):
            resolved = Path(path).resolve()
            if resolved != root and root not in resolved.parents:
                raise Forbidden(f"{field}: {path} is outside the media root {root}", field=field)

    @property
    def stabilization(self) -> str:
        """The ``--stabilize`` spec this stream runs: as given, else ``majority:K`` for
        ``smooth`` K > 1, else the default for video (stream.stabilize.DEFAULT)."""
        from segsynth.stream.stabilize import DEFAULT

        return self.stabilize or (f"majority:{self.smooth}" if self.smooth > 1 else DEFAULT)
