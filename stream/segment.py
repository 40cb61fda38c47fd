"""``segsynth segment``: label an image or every frame of a video file.

The video path is a simple single-threaded loop (demux -> decode -> segment -> render ->
encode -> mux); the threaded pipeline lives in ``segsynth.stream.pipeline``. Video output
keeps every frame with its input timestamp, and audio packets are copied untouched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from segsynth import labels
from segsynth.config import SegmentConfig
from segsynth.errors import InputError

from . import media
from .progress import Progress
from .render import pad_to, render
from .segmenter import load_segmenter, resize_labels, resize_rgb

log = logging.getLogger("segsynth")


@dataclass
class SegmentSummary:
    frames: int = 0
    seconds: float = 0.0
    fractions: dict[str, float] = field(default_factory=dict)  # class name -> pixel share, all frames

    def line(self, cfg: SegmentConfig) -> str:
        top = ", ".join(f"{n} {f:.1%}" for n, f in list(self.fractions.items())[:8])
        fps = self.frames / self.seconds if self.seconds else 0.0
        what = "image" if cfg.is_image else f"{self.frames} frames, {fps:.1f} fps"
        return f"wrote {cfg.output} ({what}); classes: {top or 'none'}"


class _ClassCounter:
    def __init__(self) -> None:
        self.counts = np.zeros(256, np.int64)

    def add(self, label_map: np.ndarray) -> None:
        self.counts += np.bincount(label_map.ravel(), minlength=256)

    def fractions(self, label_set: labels.LabelSet) -> dict[str, float]:
        total = self.counts.sum() or 1
        return {label_set.name_of(i): self.counts[i] / total for i in np.argsort(-self.counts) if self.counts[i]}


def run_segment(cfg: SegmentConfig, *, quiet: bool = False) -> SegmentSummary:
    from segsynth.engine.select import resolve_backend

    media.check_input(cfg.input)
    media.check_output(cfg.output, cfg.input)
    segmenter = load_segmenter(cfg.segmenter, label_set=cfg.label_set, threads=cfg.threads,
                               backend=resolve_backend(cfg.backend), fp16=cfg.fp16)
    try:
        remap = labels.RemapTable(cfg.remap, segmenter.label_set)
        if remap:
            log.info("remap: %s", remap.describe())
        start = time.monotonic()
        summary = (_segment_image if cfg.is_image else _segment_video)(cfg, segmenter, remap, quiet)
        summary.seconds = time.monotonic() - start
        return summary
    finally:
        segmenter.close()


def _label(segmenter, remap: labels.RemapTable, model_input: np.ndarray, width: int, height: int) -> np.ndarray:
    ids = remap(segmenter(model_input[None])[0])
    return resize_labels(ids, width, height)


def _segment_image(cfg, segmenter, remap, quiet) -> SegmentSummary:
    frame = media.read_image(cfg.input)
    h, w = frame.shape[:2]
    label_map = _label(segmenter, remap, resize_rgb(frame, *segmenter.size), w, h)
    picture = render(cfg.view, frame, label_map, segmenter.label_set, legend=cfg.legend)
    with media.atomic_output(cfg.output, cfg.input) as tmp:
        media.write_image(tmp, picture)
    counter = _ClassCounter()
    counter.add(label_map)
    return SegmentSummary(frames=1, fractions=counter.fractions(segmenter.label_set))


def _segment_video(cfg, segmenter, remap, quiet) -> SegmentSummary:
    import av

    src = media.open_video(cfg.input)
    counter = _ClassCounter()
    frames = 0
    with src, media.atomic_output(cfg.output, cfg.input) as tmp:
        vin = src.streams.video[0]
        vin.thread_type = "AUTO"
        width, height = vin.codec_context.width, vin.codec_context.height
        if not width or not height:
            raise InputError(f"{cfg.input}: video stream has no frame size")
        out_w = width * (2 if cfg.view == "side-by-side" else 1)
        with media.MediaWriter(tmp) as writer:
            dst = writer.container
            ids = cfg.view == "ids"
            vout = media.add_video_stream(dst, "ffv1" if ids else "libx264", vin, (out_w + out_w % 2, height + height % 2),
                                          crf=cfg.crf, preset=cfg.preset, bitrate=None,
                                          pix_fmt="gray" if ids else "yuv420p")
            audio = {a.index: dst.add_stream_from_template(a) for a in src.streams.audio}
            problems: list[str] = []
            with Progress(f"segment {cfg.input.name}", vin.frames or None, enabled=not quiet) as progress:
                for item in media.demux_decode(src, vin, list(src.streams.audio), problems):
                    if isinstance(item, av.Packet):
                        item.stream = audio[item.stream.index]
                        dst.mux(item)
                        continue
                    model_input = item.reformat(width=segmenter.size[0], height=segmenter.size[1],
                                                format="rgb24").to_ndarray()
                    label_map = _label(segmenter, remap, model_input, width, height)
                    counter.add(label_map)
                    rgb = item.to_ndarray(format="rgb24") if not ids else None
                    picture = pad_to(render(cfg.view, rgb, label_map, segmenter.label_set, legend=cfg.legend))
                    out = av.VideoFrame.from_ndarray(picture, format="gray" if ids else "rgb24")
                    out.pts, out.time_base = item.pts, item.time_base
                    dst.mux(vout.encode(out))
                    frames += 1
                    progress.update()
            if frames == 0:
                raise InputError(f"{cfg.input}: no decodable video frames" + (f"; {problems[0]}" if problems else ""))
            dst.mux(vout.encode(None))
    if problems or (vin.frames and frames < vin.frames):
        declared = f" of the {vin.frames} frames it declares" if vin.frames else ""
        log.warning("warning: %s looks truncated or damaged: decoded %d%s and wrote them%s", cfg.input, frames,
                    declared, f"; {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
                    if problems else "")
    return SegmentSummary(frames=frames, fractions=counter.fractions(segmenter.label_set))
