"""``segsynth segment``: label an image or every frame of a video file.

Images are labelled in one call; a video is a stream session without a generator (the
threaded pipeline of ``segsynth run``), written atomically. Video output keeps every frame
with its input timestamp, and audio packets are copied untouched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from segsynth.core import labels, paths
from segsynth.core.config import ModelConfig, SegmentConfig, StreamConfig
from segsynth.jobs.registry import Registry
from segsynth.jobs.run import run
from segsynth.stream.infer.segmenter import load_segmenter
from segsynth.stream.io import demux, mux
from segsynth.stream.pictures import resize_labels, resize_rgb
from segsynth.stream.render import render

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


def run_segment(cfg: SegmentConfig, *, quiet: bool = False) -> SegmentSummary:
    demux.check_input(cfg.input)
    mux.check_output(cfg.output, cfg.input)
    if not cfg.is_image:
        return _segment_video(cfg, quiet)
    segmenter = load_segmenter(Registry(paths.cache_dir()).resolve(cfg.segmenter, "segmenter"), label_set=cfg.label_set, threads=cfg.threads, backend=cfg.backend,
                               fp16=cfg.fp16, fast=cfg.models == "fast", seg_size=cfg.seg_size)
    try:
        remap = labels.RemapTable(cfg.remap, segmenter.label_set)
        for note in remap.notes:
            log.warning("notice: remap: %s", note)
        if remap:
            log.info("remap: %s", remap.describe())
        start = time.monotonic()
        summary = _segment_image(cfg, segmenter, remap)
        summary.seconds = time.monotonic() - start
        return summary
    finally:
        segmenter.close()


def _segment_image(cfg, segmenter, remap) -> SegmentSummary:
    frame = demux.read_image(cfg.input)
    h, w = frame.shape[:2]
    ids = remap(segmenter(resize_rgb(frame, *segmenter.size)[None])[0])
    label_map = resize_labels(ids, w, h)
    picture = render(cfg.view, frame, label_map, segmenter.label_set, legend=cfg.legend)
    with mux.atomic_output(cfg.output, cfg.input) as tmp:
        mux.write_image(tmp, picture)
    counts = np.bincount(label_map.ravel(), minlength=256)
    total = counts.sum() or 1
    fractions = {segmenter.label_set.name_of(int(i)): counts[i] / total for i in np.argsort(-counts) if counts[i]}
    return SegmentSummary(frames=1, fractions=fractions)


def _segment_video(cfg: SegmentConfig, quiet: bool) -> SegmentSummary:
    """A stream session without a generator, written atomically (the output appears when complete)."""

    stream = StreamConfig(source=str(cfg.input), sinks=(str(cfg.output),), view=cfg.view, remap=cfg.remap,
                          crf=cfg.crf, preset=cfg.preset, legend=cfg.legend, stabilize=cfg.stabilize)
    models = ModelConfig(segmenter=cfg.segmenter, generator="none", label_set=cfg.label_set, threads=cfg.threads,
                         backend=cfg.backend, fp16=cfg.fp16, fused=cfg.fused, models=cfg.models, seg_size=cfg.seg_size)
    stats, session = run(stream, models, quiet=quiet, atomic=True, label="segment")
    declared = session.source.info.declared_frames
    problems = stats.problems
    if problems:  # damage, or a video that ends before the time it declares
        of = f" of the {declared} frames it declares" if declared else ""
        log.warning("warning: %s looks truncated or damaged: decoded %d%s and wrote them%s", cfg.input,
                    stats.frames_in, of, f"; {problems[0]}" + (f" (+{len(problems) - 1} more)"
                                                                   if len(problems) > 1 else "") if problems else "")
    return SegmentSummary(frames=stats.frames_out, seconds=stats.seconds,
                          fractions=session.infer.class_fractions())
