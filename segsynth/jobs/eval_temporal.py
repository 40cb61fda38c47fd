"""How still labels and pictures stay over time (``segsynth eval-temporal``).

Over consecutive frames, a pixel is *static* where its input did not change: the grey level
moved by less than ``threshold`` everywhere in its 3 x 3 neighbourhood, at the labels'
resolution (the segmenter's input frame). Then:

* ``static_flip_rate``: among static pixels, the fraction whose label changed;
* ``motion_agreement``: among the other (moving) pixels, the fraction whose label is the one
  that frame's own per-frame segmentation gives (stabilisation must not smear what moves);
* ``synth_static_delta``: the mean absolute change of the synthesized picture (grey levels,
  all channels) between consecutive frames on static pixels, at the picture's size.

``evaluate`` runs a clip through the chosen stabilisation and through ``off`` in the same
run, frame by frame in turn, and reports both with their throughput.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from segsynth.core import labels
from segsynth.stream.infer.stabilize import dilate, luma
from segsynth.stream.infer.synth import Synthesize
from segsynth.stream.io.sources import FileSource
from segsynth.stream.pictures import resize_labels

log = logging.getLogger("segsynth")
STATIC_THRESHOLD = 3.0  # grey levels


def static_pixels(previous: np.ndarray, frame: np.ndarray, threshold: float = STATIC_THRESHOLD) -> np.ndarray:
    """H x W bool: where no grey level in the 3 x 3 neighbourhood moved by ``threshold`` or more
    between two H x W x 3 uint8 frames."""
    return ~dilate(np.abs(luma(frame) - luma(previous)) >= threshold)


@dataclass
class Stability:
    """The three measures over a clip, added up frame by frame."""

    flips: int = 0
    static: int = 0
    agree: int = 0
    moving: int = 0
    synth_delta: float = 0.0
    synth_static: int = 0
    frames: int = 0
    seconds: float = 0.0

    def add(self, static: np.ndarray, previous, current, own: np.ndarray) -> None:
        """``static`` of this frame vs the last; ``previous``/``current`` FrameResults;
        ``own``: this frame's per-frame labels."""
        self.flips += int((static & (current.labels != previous.labels)).sum())
        self.static += int(static.sum())
        moving = ~static
        self.agree += int((moving & (current.labels == own)).sum())
        self.moving += int(moving.sum())
        if current.synth is not None and previous.synth is not None and current.synth.shape == previous.synth.shape:
            h, w = current.synth.shape[:2]
            still = resize_labels(static.astype(np.uint8), w, h).astype(bool)
            diff = np.abs(current.synth.astype(np.int16) - previous.synth).mean(-1)
            self.synth_delta += float(diff[still].sum())
            self.synth_static += int(still.sum())

    def report(self) -> dict:
        return {"static_flip_rate": self.flips / self.static if self.static else 0.0,
                "motion_agreement": self.agree / self.moving if self.moving else 1.0,
                "synth_static_delta": self.synth_delta / self.synth_static if self.synth_static else None,
                "static_fraction": self.static / (self.static + self.moving) if self.static + self.moving else 0.0,
                "frames": self.frames, "fps": self.frames / self.seconds if self.seconds else 0.0}


def evaluate(clip: Path, models, *, stabilize: str, remap: str | None = None, fit: str | None = None,
             seed: int | None = None, max_frames: int | None = None, grid: Path | None = None,
             progress=None) -> dict:
    """``stabilize`` and ``off`` over ``clip`` in one run (each frame through both in turn,
    alternating which goes first); the report of each and their ratios."""

    table, z = models.remap(remap), models.z(seed=seed, quiet=True)
    gen = models.generator
    methods = ["off", stabilize] if stabilize != "off" else ["off"]
    steps = {}
    for spec in methods:
        parts = ("all",) if spec == "off" else ("segment", "synth")
        steps[spec] = Synthesize(models.segmenter, gen, table, z, spec, models.fit(fit), gen.size if gen else None,
                                 chains={part: models.fused(part) for part in parts})
    stats = {spec: Stability() for spec in methods}
    last: dict = {}
    samples: dict[int, dict] = {}
    source = FileSource(clip).open()
    source.model_size, source.need_display = models.size, False
    try:
        known = [n for n in (source.info.declared_frames, max_frames) if n]
        picks = _grid_frames(min(known) if known else 0) if grid else set()
        previous = None
        for index, (frame, meta) in enumerate(source.frames(threading.Event(), lambda item: None)):
            if max_frames is not None and index >= max_frames:
                break
            results = {}
            for spec in methods if index % 2 == 0 else methods[::-1]:
                start = time.perf_counter()
                (results[spec],) = steps[spec](frame[None], [meta])
                stats[spec].seconds += time.perf_counter() - start
                stats[spec].frames += 1
            if previous is not None:
                static = static_pixels(previous, frame)
                for spec in methods:
                    stats[spec].add(static, last[spec], results[spec], results["off"].labels)
            if index in picks:
                samples[index] = {"frame": frame.copy(), **results}
            previous, last = frame.copy(), results
            if progress is not None:
                progress.update()
    finally:
        source.close()
    report = {"clip": str(clip), "frames": stats["off"].frames, "stabilize": stabilize,
              "methods": {spec: s.report() for spec, s in stats.items()}, "ratios": {}}
    if stabilize != "off":
        off, on = report["methods"]["off"], report["methods"][stabilize]
        report["ratios"] = {
            "static_flip_rate_off_over_stabilized": _ratio(off["static_flip_rate"], on["static_flip_rate"]),
            "synth_static_delta_off_over_stabilized": _ratio(off["synth_static_delta"], on["synth_static_delta"]),
            "fps_stabilized_over_off": _ratio(on["fps"], off["fps"])}
    if grid is not None and samples:
        write_grid(grid, samples, methods, models.label_set)
    return report


def _ratio(a, b):
    if a is None or b is None:
        return None
    return a / b if b else float("inf")


def _grid_frames(count: int) -> set[int]:
    """Three consecutive frames at a third and at two thirds of the clip."""
    return {start + i for start in (count // 3, 2 * count // 3) for i in range(3)} if count >= 9 else set(range(3))


def write_grid(path: Path, samples: dict, methods: list[str], label_set) -> None:
    """Rows: the sampled frames in order; columns: the input, then the labels and the picture of
    each method (off | stabilised), so flicker shows as rows that differ."""

    side = 128

    def cell(rgb: np.ndarray, resample=Image.NEAREST) -> np.ndarray:
        return np.asarray(Image.fromarray(rgb).resize((side, side), resample))

    pictures = [m for m in methods if samples[min(samples)][m].synth is not None]
    head = ["input", *(f"labels {m}" for m in methods), *(f"picture {m}" for m in pictures)]
    rows = []
    for index in sorted(samples):
        sample = samples[index]
        rows.append(np.concatenate([cell(sample["frame"], Image.BILINEAR),
                                    *(cell(labels.colorize(sample[m].labels, label_set)) for m in methods),
                                    *(cell(sample[m].synth) for m in pictures)], 1))
    image = Image.fromarray(np.concatenate(rows, 0))
    canvas = Image.new("RGB", (image.width, image.height + 18), "white")
    canvas.paste(image, (0, 18))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(head):
        draw.text((i * side + 4, 3), text, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    log.info("wrote %s (rows: frames %s)", path, ", ".join(map(str, sorted(samples))))
