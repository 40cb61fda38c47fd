"""``segsynth run IN OUT``: the main job, assembled from a source, an infer step and a sink
driven by the threaded pipeline."""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from segsynth import labels
from segsynth.config import RunConfig
from segsynth.errors import InputError, OutputError

from . import media
from .generator import load_generator
from .pipeline import Pipeline, PipelineStats
from .progress import Progress
from .render import compose
from .segmenter import load_segmenter, resize_labels

log = logging.getLogger("segsynth")
_AUDIO_EOS = object()


class VideoSource:
    """The decode side. The container is opened (and checked) and finally closed by the main
    thread; in between the decode thread reads it and the encode thread only reads its
    stream parameters (as templates for the output). Audio goes to ``audio_out`` as packets
    to copy, or as decoded frames where the output container needs the audio re-encoded."""

    def __init__(self, cfg: RunConfig, audio_out: queue.Queue):
        self.container = media.open_video(cfg.input)
        streams = self.container.streams
        if cfg.stream is not None:
            match = [s for s in streams if s.index == cfg.stream]
            if not match or match[0].type != "video":
                kinds = ", ".join(f"{s.index}:{s.type}" for s in streams)
                self.container.close()
                raise InputError(f"--stream {cfg.stream}: not a video stream of {cfg.input} (streams: {kinds})")
            self.video = match[0]
        else:
            self.video = streams.video[0]
        self.video.thread_type = "AUTO"
        self.audio = list(streams.audio)
        self.transcode = {a.index: media.audio_needs_transcode(a, cfg.output) for a in self.audio}
        self.audio_out = audio_out
        self.model_size, self.need_display = (513, 513), False  # set by the job once the models are known
        self.declared = self.video.frames or None
        self.problems: list[str] = []
        self.last_time = 0.0

    def frames(self, stop):
        import av
        from av.video.reformatter import VideoReformatter

        scaler = VideoReformatter()  # this thread's own swscale context
        w, h = self.model_size
        index = 0
        try:
            for item in media.demux_decode(self.container, self.video, self.audio, self.problems):
                if stop.is_set():
                    break
                if isinstance(item, av.Packet):
                    if self.transcode[item.stream.index]:
                        for frame in item.decode():
                            self.audio_out.put((item.stream.index, frame))
                    else:
                        self.audio_out.put((item.stream.index, item))
                    continue
                rotation = (item.rotation // 90) % 4 if item.rotation else 0
                if rotation:  # turn the picture upright, as players (and ffmpeg's autorotate) do
                    display = np.ascontiguousarray(np.rot90(item.to_ndarray(format="rgb24"), rotation))
                    model = av.VideoFrame.from_ndarray(display, format="rgb24")
                    model_rgb = scaler.reformat(model, w, h, "rgb24", interpolation="BILINEAR").to_ndarray()
                else:
                    display = item.to_ndarray(format="rgb24") if self.need_display else None
                    model_rgb = scaler.reformat(item, w, h, "rgb24", interpolation="BILINEAR").to_ndarray()
                dh, dw = (item.height, item.width) if rotation % 2 == 0 else (item.width, item.height)
                pts, tb = item.pts, item.time_base
                if pts is None:  # raw streams without timestamps: frame index at the stream's rate
                    pts, tb = index, 1 / Fraction(self.video.average_rate or self.video.guessed_rate or 25)
                yield model_rgb, {"index": index, "pts": pts, "time_base": tb, "size": (dw, dh),
                                  "display": display if self.need_display else None}
                index += 1
                self.last_time = float(pts * tb)
            if not stop.is_set():
                self._check_complete(index)
        finally:
            self.audio_out.put(_AUDIO_EOS)

    def _check_complete(self, frames: int) -> None:
        """Demuxers may stop at damage without an error: compare with what the file declares."""
        stream = self.video
        duration = float(stream.duration * stream.time_base) if stream.duration else (
            self.container.duration / 1e6 if self.container.duration else None)
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        if duration and frames and self.last_time < start + duration - 3 / rate and not self.problems:
            self.problems.append(f"the video stopped at {self.last_time:.2f} s of the {duration:.2f} s it declares")

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class FrameResult:
    labels: np.ndarray  # ids at the segmenter's size, in ``label_set``
    synth: np.ndarray | None  # RGB at the generator's content size, or None


class Synthesize:
    """The infer stage: segment a batch, smooth, remap, re-synthesize."""

    def __init__(self, segmenter, generator, table: labels.RemapTable, z, smooth: int, fit: str,
                 gen_size: tuple[int, int] | None) -> None:
        self.segmenter, self.generator, self.table, self.z, self.fit = segmenter, generator, table, z, fit
        self.smoother = LabelSmoother(smooth) if smooth > 1 else None
        self.gen_size = gen_size
        self.asynchronous = getattr(segmenter, "asynchronous", False)  # GPU runners overlap batches

    def submit(self, frames: np.ndarray, metas: list[dict]):
        """Start segmenting a batch (on GPU backends the device works while the caller goes on)."""
        return self.segmenter.submit(frames), metas

    def finish(self, handle) -> list[FrameResult]:
        pending, metas = handle
        return self._complete(self.segmenter.finish(pending), metas)

    def __call__(self, frames: np.ndarray, metas: list[dict]) -> list[FrameResult]:
        return self.finish(self.submit(frames, metas))

    def _complete(self, seg: np.ndarray, metas: list[dict]) -> list[FrameResult]:
        if self.smoother is not None:
            seg = np.stack([self.smoother(m) for m in seg])
        ids = self.table(seg)
        if self.generator is None:
            return [FrameResult(m, None) for m in ids]
        gw, gh = self.gen_size
        canvases, boxes = [], []
        for m, meta in zip(ids, metas):
            box = _content_box(meta["size"], (gw, gh)) if self.fit == "letterbox" else (0, 0, gw, gh)
            canvas = np.full((gh, gw), labels.UNKNOWN, np.uint8)
            x, y, cw, ch = box
            canvas[y:y + ch, x:x + cw] = resize_labels(m, cw, ch)
            canvases.append(canvas)
            boxes.append(box)
        synth = self.generator(np.stack(canvases), self.z)
        return [FrameResult(m, s[y:y + ch, x:x + cw]) for m, s, (x, y, cw, ch) in zip(ids, synth, boxes)]


def _content_box(frame_size: tuple[int, int], model_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x, y, w, h) of a frame of ``frame_size`` fitted into ``model_size`` keeping its aspect."""
    fw, fh = frame_size
    mw, mh = model_size
    scale = min(mw / fw, mh / fh)
    cw, ch = max(1, round(fw * scale)), max(1, round(fh * scale))
    return (mw - cw) // 2, (mh - ch) // 2, cw, ch


class LabelSmoother:
    """Temporal majority vote over the last K label maps (ties go to the most recent), which
    damps the flicker of per-frame segmentation. Owned by the infer thread."""

    def __init__(self, k: int) -> None:
        self.k, self.history = k, []

    def __call__(self, label_map: np.ndarray) -> np.ndarray:
        self.history = (self.history + [label_map])[-self.k:]
        best = self.history[-1].copy()
        best_count = np.zeros(best.shape, np.int16)
        for candidate in reversed(self.history):  # most recent first: it wins ties
            count = sum((h == candidate).astype(np.int16) for h in self.history)
            better = count > best_count
            best[better], best_count[better] = candidate[better], count[better]
        return best


class VideoSink:
    """The encode side: renders the view, encodes video, copies or re-encodes audio, muxes.
    The output is opened at the first frame (so bad input leaves no file) and written as
    fragmented MP4 / Matroska under its final name, so a killed run leaves a playable file.
    Owned by the encode thread."""

    def __init__(self, cfg: RunConfig, source: VideoSource, label_set: labels.LabelSet, view: str,
                 audio_in: queue.Queue) -> None:
        self.cfg, self.source, self.label_set, self.view, self.audio_in = cfg, source, label_set, view, audio_in
        self.container = self.vstream = None
        self.astreams: dict[int, object] = {}
        self.out_size = None
        self.audio_done = False

    def _open(self, size: tuple[int, int]) -> None:
        cfg, src = self.cfg, self.source
        w, h = size
        if self.view == "side-by-side":
            w *= 2
        self.out_size = (w + w % 2, h + h % 2)  # 4:2:0 needs even sizes: pad the last row/column
        self.writer = media.MediaWriter(cfg.output, fragmented=True)
        self.container = self.writer.container
        fragmented_mp4 = cfg.output.suffix.lower() in (".mp4", ".m4v", ".mov")
        self.vstream = media.add_video_stream(self.container, cfg.codec, src.video, self.out_size, crf=cfg.crf,
                                              preset=cfg.preset, bitrate=cfg.bitrate, b_frames=not fragmented_mp4,
                                              low_latency=cfg.policy == "latest")
        for a in src.audio:
            self.astreams[a.index] = (media.add_audio_encoder(self.container, a, cfg.output) if src.transcode[a.index]
                                      else self.container.add_stream_from_template(a))

    def _pump_audio(self, block: bool) -> None:
        import av

        while not self.audio_done:
            try:
                item = self.audio_in.get(block=block, timeout=1.0 if block else None)
            except queue.Empty:
                if block:
                    continue
                return
            if item is _AUDIO_EOS:
                self.audio_done = True
                for index, stream in self.astreams.items():
                    if self.source.transcode[index]:
                        self.container.mux(stream.encode(None))
                return
            index, payload = item
            out = self.astreams[index]
            if isinstance(payload, av.Packet):
                payload.stream = out
                self.container.mux(payload)
            else:
                payload.pts = None  # let the encoder count samples
                self.container.mux(out.encode(payload))

    def write(self, result: FrameResult, meta: dict) -> None:
        import av

        if self.container is None:
            self._open(meta["size"])
        self._pump_audio(block=False)
        picture = compose(self.view, meta.get("display"), result.labels, result.synth, self.label_set,
                          meta["size"], self.out_size, legend=self.cfg.legend)
        frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
        frame.pts, frame.time_base = meta["pts"], meta["time_base"]
        self.container.mux(self.vstream.encode(frame))

    def close(self) -> None:
        if self.container is None:
            return
        try:
            self.container.mux(self.vstream.encode(None))
            self._pump_audio(block=True)
        finally:
            self.writer.close()


def run(cfg: RunConfig, *, quiet: bool = False) -> tuple[PipelineStats, dict]:
    import av

    media.check_output(cfg.output, cfg.input)
    media.check_encoder(cfg.codec)
    audio: queue.Queue = queue.Queue()
    with VideoSource(cfg, audio) as source:  # bad input fails here, before any model is loaded
        from segsynth.engine.select import resolve_backend

        backend = resolve_backend(cfg.backend)
        models = dict(threads=cfg.threads, backend=backend, fp16=cfg.fp16, cache_dir=cfg.cache_dir)
        segmenter = load_segmenter(cfg.segmenter, **models)
        generator = None
        try:
            generator = load_generator(cfg.generator, size=cfg.size, **models)
            view = _view(cfg, generator)
            target = generator.label_set if generator is not None and generator.label_set else segmenter.label_set
            table = labels.RemapTable(cfg.remap, segmenter.label_set, target)
            if table:
                log.info("remap: %s", table.describe())
            fit = cfg.fit or (generator.fit if generator is not None else "stretch")
            infer = Synthesize(segmenter, generator, table, _style(cfg, generator), cfg.smooth, fit,
                               generator.size if generator else None)
            source.model_size, source.need_display = segmenter.size, view in ("overlay", "side-by-side", "grid")
            sink = VideoSink(cfg, source, target, view, audio)
            w, h = segmenter.size
            with Progress(f"run {cfg.input.name}", source.declared, enabled=not quiet) as progress:
                pipeline = Pipeline(source, infer, sink, model_shape=(h, w, 3), batch=cfg.batch, policy=cfg.policy,
                                    ring_slots=cfg.ring_slots, progress=progress,
                                    allocator=segmenter.pinned_allocator())  # page-locked on GPU backends
                try:
                    stats = pipeline.run()
                except BaseException as exc:
                    if sink.container is not None:
                        cfg.output.unlink(missing_ok=True)  # a failed run leaves no half-written output
                    if isinstance(exc, (OSError, av.FFmpegError)):
                        raise OutputError(f"writing {cfg.output} failed: {media.ffmpeg_message(exc)}") from exc
                    raise
        finally:
            segmenter.close()
            if generator is not None:
                generator.close()
    if stats.frames_out == 0:
        raise InputError(f"{cfg.input}: no decodable video frames" +
                         (f"; {source.problems[0]}" if source.problems else ""))
    info = {"view": view, "problems": source.problems, "declared": source.declared,
            "interrupted": pipeline.interrupted}
    return stats, info


def _view(cfg: RunConfig, generator) -> str:
    if generator is not None:
        if cfg.size and tuple(cfg.size) != generator.size:
            raise InputError(f"--size {cfg.size[0]}x{cfg.size[1]}: {generator.source} is exported at "
                             f"{generator.size[0]}x{generator.size[1]}; give a checkpoint directory to re-export")
        return cfg.view or "synth"
    if cfg.view in ("synth", "grid", "side-by-side") or cfg.style or cfg.seed is not None:
        why = "--generator none" if cfg.generator == "none" else "no bundled default"
        raise InputError(f"no generator is available ({why}); pass --generator DIR|FILE.onnx or use --view labels|overlay")
    if cfg.view is None and cfg.generator != "none":
        log.warning("notice: no default generator is available; showing --view labels (pass --generator "
                    "DIR|FILE.onnx to synthesize)")
    return cfg.view or "labels"


def _style(cfg: RunConfig, generator):
    if generator is None or not generator.uses_z:
        if cfg.style is not None:
            raise InputError("--style needs a VAE generator (use_vae) with a style encoder")
        if cfg.seed is not None:
            log.warning("notice: --seed has no effect: this generator is deterministic (no z input)")
        return None
    if cfg.style is not None:
        return generator.encode_style(media.read_image(cfg.style))
    rng = np.random.default_rng(cfg.seed or 0)  # one z for the whole video: the style does not flicker
    return rng.standard_normal((1, generator.z_dim)).astype(np.float32)
