"""Run configuration as data: dataclasses validated once at the edge (CLI, config file or
HTTP API all build these), then passed down unchanged."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from segsynth.core import labels, paths
from segsynth.core.errors import Forbidden, InputError, LabelError, at_field
from segsynth.core.formats import check_encoder_settings
from segsynth.core.grammar import (
    _STREAM_ID,
    EXPORT_TARGETS,
    FITS,
    FUSED,
    IMAGE_EXTS,
    LOOPBACK,
    POLICIES,
    RTSP_TRANSPORTS,
    SEGMENT_VIEWS,
    SESSION_VIEWS,
    STABILIZE_CHOICES,
    STABILIZE_DEFAULT,
    TIERS,
    VIDEO_OUTPUTS,
    _kind,
    check_seed,
    check_sink,
    check_size,
    check_source,
    check_video_output,
    is_live,
    parse_stabilize,
    sink_kind,
)

CRF = 20  # the one default quality of every command that encodes (x264's scale)


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
    crf: int = CRF
    preset: str = "veryfast"
    backend: str = "auto"
    fp16: bool = True
    fused: str = "auto"  # videos: see ModelConfig.fused
    stabilize: str | None = None  # videos: see StreamConfig.stabilize (images have no time to stabilise over)
    models: str = "quality"  # see ModelConfig.models
    seg_size: int | None = None  # see ModelConfig.seg_size

    def __post_init__(self) -> None:
        if self.stabilize is not None:
            parse_stabilize(self.stabilize)
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
        needs = {"spade": ["checkpoint"], "encoder": ["checkpoint"], "student": ["checkpoint"],
                 "chain": ["checkpoint", "deeplab", "size"],
                 "deeplab": [] if self.from_tflite else ["checkpoint"], "quantize": ["model", "calibrate"]}[self.what]
        missing = [("MODEL.onnx" if n == "model" else f"--{n.replace('_', '-')}") for n in needs
                   if getattr(self, n) in (None, ())]
        if missing:
            raise InputError(f"export {self.what} needs {' and '.join(missing)}")
        if self.batch is not None and not 1 <= self.batch <= 64:
            raise InputError("--batch must be 'dynamic' or between 1 and 64")


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
            check_size(self.seg_size)
        object.__setattr__(self, "cache_dir", paths.cache_dir(self.cache_dir))  # the environment is read here
        if self.fused not in FUSED:
            raise InputError(f"--fused {self.fused!r}: choose one of {', '.join(FUSED)}")
        if self.batch is not None and self.batch < 1:
            raise InputError("--batch must be at least 1")
        if self.size is not None and (self.size[0] % 32 or self.size[1] % 32):
            raise InputError(f"--size {self.size[0]}x{self.size[1]}: SPADE needs multiples of 32")
        if self.threads is not None and self.threads < 1:
            raise InputError("--threads must be at least 1")


def opt(help: str, *, api: bool = False, flag: str | None = "", metavar: str | None = None,
        choices: tuple[str, ...] | None = None) -> dict:
    """A StreamConfig field's one description, from which the command-line options, the HTTP
    API's request model and docs/stream-fields.md are made: its ``help``, whether the API takes
    it (``api``), its command-line ``flag`` ("": --its-name; None: none of its own), how help
    shows its value (``metavar``) and the values it takes (``choices``)."""
    return {"help": help, "api": api, "flag": flag, "metavar": metavar, "choices": choices}


@dataclass(frozen=True)
class StreamConfig:
    """One stream session: where frames come from, where results go, and how they are made.
    Validated here, before any model is loaded; the CLI, config files and the HTTP API all
    build this."""

    source: str = field(metadata=opt(
        "a video file, an image sequence (a folder, a glob or a pattern like img_%04d.jpg), rtsp://, rtsps://, "
        "rtmp://, srt://, http(s):// (HLS .m3u8 too), a camera (/dev/videoN, v4l2:N) or lavfi:GRAPH", api=True,
        flag=None))
    sinks: tuple[str, ...] = field(metadata=opt(
        "the outputs: video files (.mp4 written fragmented, .mkv, .webm, ...), rtsp://, rtmp:// or srt:// (pushed "
        "to a server), DIR/NAME.m3u8 (HLS), mjpeg://HOST:PORT (a preview)", api=True, flag=None))
    view: str | None = field(default=None, metadata=opt(
        "synth (default with a generator), labels (default without), overlay, side-by-side (input | synthesis), "
        "grid (2x2), ids (class ids, lossless grayscale .mkv)", api=True, choices=SESSION_VIEWS))
    remap: str | None = field(default=None, metadata=opt(
        "rewrite classes before synthesis, e.g. 'person=animal,car=refrigerator'", api=True, metavar="RULES"))
    style: Path | None = field(default=None, metadata=opt(
        "a style image for VAE generators (the style encoder's z)", api=True, metavar="IMAGE"))
    seed: int | None = field(default=None, metadata=opt(
        "a fixed z for VAE generators (one z for the whole video)", api=True))
    smooth: int = field(default=1, metadata=opt("the old name of stabilize majority:K", api=True, metavar="K"))
    stabilize: str | None = field(default=None, metadata=opt(
        f"videos: keep labels (and the picture) still where the input did not change (default {STABILIZE_DEFAULT}: "
        "a label changes where its pixels changed or a clearly more confident class appears; flow: the same along "
        "optical flow; majority:K: the most frequent label of K frames; off: every frame on its own)", api=True,
        metavar=STABILIZE_CHOICES))
    incremental: str = field(default="on", metadata=opt(
        "on: a frame identical to the one before is not segmented again, and a picture whose labels and style did "
        "not change is not painted again (exact: the same result, bit for bit); off: every frame computed",
        api=True, choices=("on", "off")))
    fit: str | None = field(default=None, metadata=opt(
        "how frames meet the synthesis size (default: as the generator was trained; letterbox keeps the aspect "
        "ratio)", api=True, choices=FITS))
    policy: str | None = field(default=None, metadata=opt(
        "lossless: every frame in order (default for files); latest: drop the oldest queued frame under load "
        "(default for live sources)", api=True, choices=POLICIES))
    batch: int = field(default=1, metadata=opt("frames per inference batch", api=True))
    codec: str | None = field(default=None, metadata=opt(
        "the video encoder: libx264, libx265, libvpx-vp9, h264_nvenc, ..., or auto (a hardware H.264 encoder where "
        "one works here, else libx264); default: libx264, or the first encoder the output's container holds (VP9 for "
        ".webm)"))
    crf: int = field(default=CRF, metadata=opt("quality, 0-51 as x264/x265 count it (VP8/VP9: their scale follows)"))
    preset: str = field(default="veryfast", metadata=opt("the x264/x265 preset (VP8/VP9: veryfast and faster run "
                                                          "in real time)"))
    bitrate: str | None = field(default=None, metadata=opt("a target bitrate instead of crf, e.g. 4M"))
    stream: int | None = field(default=None, metadata=opt("which video stream of the input (default: the first)",
                                                          metavar="INDEX"))
    fps: float | None = field(default=None, metadata=opt("the frame rate of an image sequence input (default 25)"))
    legend: bool = field(default=True, metadata=opt("the legend box of label views (--no-legend: none)",
                                                    flag="--no-legend"))
    ring_slots: int | None = field(default=None, metadata=opt(
        "frames queued before infer (default 8, or 2 batches for latest: low latency)", flag=None))
    id: str | None = field(default=None, metadata=opt(
        "the stream's name in stats and metrics: 1-64 letters, digits, '.', '_' or '-'", api=True, flag=None))
    max_frames: int | None = field(default=None, metadata=opt(
        "stop after N frames (like ffmpeg -frames:v)", api=True, flag="--frames", metavar="N"))
    duration: float | None = field(default=None, metadata=opt(
        "stop after this many seconds of input (like ffmpeg -t)", api=True, metavar="SECONDS"))
    segment_time: float | None = field(default=None, metadata=opt(
        "file outputs: start a new file (NAME-00000.mp4, ...) every SECONDS", api=True, metavar="SECONDS"))
    rtsp_transport: str = field(default="tcp", metadata=opt("RTSP input transport", api=True,
                                                            choices=RTSP_TRANSPORTS))
    stall_timeout: float = field(default=5.0, metadata=opt(
        "live: a source that sends no frame this long is lost and reconnected", api=True, metavar="SECONDS"))
    reconnect_max: int | None = field(default=None, metadata=opt(
        "live: give up after N reconnect attempts in a row (default: never)", api=True, metavar="N"))
    camera_size: tuple[int, int] | None = field(default=None, metadata=opt("camera capture size, e.g. 1280x720",
                                                                            metavar="WxH"))
    camera_fps: float | None = field(default=None, metadata=opt("camera capture rate", metavar="N"))
    media_root: Path | None = field(default=None, metadata=opt(
        "files read and written lie under it (the service's --media-root), and so must what a source's playlist "
        "names (None: under the source's own folder)", flag=None))

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
        if self.incremental not in ("on", "off"):
            raise InputError("incremental: must be on or off", field="incremental")
        if self.fit is not None and self.fit not in FITS:
            raise InputError(f"fit: must be one of: {', '.join(FITS)}", field="fit")
        if not 1 <= self.smooth <= 15:
            raise InputError("smooth: must be between 1 (off) and 15 frames", field="smooth")
        if self.stabilize is not None:
            with at_field("stabilize"):
                parse_stabilize(self.stabilize)
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

        return self.stabilize or (f"majority:{self.smooth}" if self.smooth > 1 else STABILIZE_DEFAULT)


@dataclass(frozen=True)
class StreamTemplate:
    """What the streams of a batch share - every StreamConfig field but ``source`` and
    ``sinks`` - checked once, when it is made; ``config(source, sinks)`` is one file's."""

    fields: tuple[tuple[str, object], ...] = ()

    @classmethod
    def of(cls, **fields) -> "StreamTemplate":
        if {"source", "sinks"} & set(fields):
            raise ValueError("a stream template leaves source and sinks to each stream")
        StreamConfig(source="checked.mp4", sinks=("checked.mkv",), **fields)  # the fields' own checks, now
        return cls(tuple(sorted(fields.items())))

    def config(self, source: str, sinks: tuple[str, ...]) -> StreamConfig:
        return StreamConfig(source=source, sinks=sinks, **dict(self.fields))

    def get(self, name: str, default=None):
        return dict(self.fields).get(name, default)


@dataclass(frozen=True)
class TranscodeConfig:
    """``segsynth transcode``: which files (``inputs``: files, folders, globs; ``pattern``,
    ``recursive``, ``probe``: see segsynth.jobs.batch.expand), into which folder (``out``; ``ext``:
    another extension), made how (``stream``, ``models``), by how many workers (``jobs`` local
    processes, or ``ray``: "auto" or HOST:PORT of a Ray cluster), ``resume``-able, each file
    retried ``retry`` times when its worker dies (None: 0 locally, 3 on Ray)."""

    inputs: tuple[str, ...]
    out: Path
    stream: StreamTemplate = StreamTemplate()
    models: ModelConfig = field(default_factory=ModelConfig)
    jobs: int = 1
    pattern: str | None = None
    recursive: bool = False
    ext: str | None = None
    probe: bool = False
    resume: bool = False
    retry: int | None = None
    ray: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(map(str, self.inputs)))
        object.__setattr__(self, "out", Path(self.out))
        if self.jobs < 1 or (self.retry is not None and self.retry < 0):
            raise InputError("--jobs must be at least 1 and --retry at least 0", field="jobs")


@dataclass(frozen=True)
class ServiceConfig:
    """``segsynth serve``: where it listens, what it may touch and how much a request may start."""

    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = field(default=None, repr=False)  # every /v1 call needs it (beyond loopback: must)
    media_root: Path | None = None  # file sources, style images and file outputs lie under it (None: no files)
    config: Path | None = None  # streams.yaml: streams started at boot
    protect_metrics: bool = False  # /metrics needs the token too
    grace: float = 10.0  # seconds SIGTERM/SIGINT drain the streams before aborting them
    max_streams: int = 64  # streams at once
    max_outputs: int = 8  # outputs a stream may have
    max_model_sets: int = 2  # model sets loaded at once (the service's own included)
    model_keep_alive: float = 60.0  # seconds an unused model set stays loaded

    def __post_init__(self) -> None:
        for name in ("media_root", "config"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.host not in LOOPBACK and not self.token:
            raise InputError(f"--host {self.host}: listening beyond loopback needs --token-file (or SEGSYNTH_TOKEN)",
                             field="host")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port {self.port}: not a port number", field="port")
        if self.max_streams < 1 or self.max_outputs < 1 or self.max_model_sets < 1:
            raise InputError("--max-streams, --max-outputs and --max-model-sets must be at least 1",
                             field="max_streams")
        if not (math.isfinite(self.model_keep_alive) and self.model_keep_alive >= 0):
            raise InputError("--model-keep-alive must be 0 seconds or more", field="model_keep_alive")
        if not (math.isfinite(self.grace) and self.grace >= 0):
            raise InputError("--grace must be 0 seconds or more", field="grace")
        if self.media_root is not None and not self.media_root.is_dir():
            raise InputError(f"--media-root {self.media_root}: not a directory", field="media_root")


def stream_fields(*, api: bool | None = None) -> list:
    """StreamConfig's fields (dataclasses.Field, with ``metadata`` from ``opt``); ``api``: only
    those the HTTP API takes (True) or only those it does not (False)."""
    return [f for f in dataclasses.fields(StreamConfig) if api is None or f.metadata["api"] == api]


def stream_field_types() -> dict[str, object]:
    """Each StreamConfig field's type (its annotation, resolved)."""
    return typing.get_type_hints(StreamConfig)


def stream_fields_table() -> str:
    """docs/stream-fields.md's table: what a stream takes, in the HTTP API and on the command line."""
    rows = ["| field | type | default | command line | HTTP API | what |", "| --- | --- | --- | --- | --- | --- |"]
    types = stream_field_types()
    for f in stream_fields():
        flag = f.metadata["flag"]
        flag = "" if flag is None else flag or "--" + f.name.replace("_", "-")
        kind = str(types[f.name]).replace("typing.", "").replace("pathlib.", "").replace("<class '", "").replace(
            "'>", "").replace(" | None", "").replace("NoneType", "None")
        default = "—" if f.default is dataclasses.MISSING else "" if f.default is None else f"`{f.default}`"
        values = f" ({', '.join(f.metadata['choices'])})" if f.metadata["choices"] else ""
        rows.append(f"| `{f.name}` | {kind} | {default} | {f'`{flag}`' if flag else ''} | "
                    f"{'yes' if f.metadata['api'] else ''} | {f.metadata['help'].replace('|', '&#124;')}{values} |")
    return "\n".join(rows) + "\n"
