"""The infer step of a stream session: segment a batch, smooth the labels over time, remap
them, and synthesize a new picture from them.

The models are shared (a ``ModelSet`` serves many sessions); what belongs to one session -
its smoother history, remap table and style vector ``z`` - lives here. ``update()`` may be
called from any thread: the change is picked up by the infer thread at the next batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from segsynth import labels

from .segmenter import resize_labels


@dataclass
class FrameResult:
    labels: np.ndarray  # ids at the segmenter's size, in the generator's (or segmenter's) label set
    synth: np.ndarray | None  # RGB at the generator's content size, or None


def content_box(frame_size: tuple[int, int], model_size: tuple[int, int]) -> tuple[int, int, int, int]:
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


class Synthesize:
    """Segment -> smooth -> remap -> synthesize, for one session. ``segmenter`` and
    ``generator`` (None: labels only) are shared models; ``gen_size`` is the generator's
    (W, H) and ``fit`` how frames meet it (letterbox keeps the aspect ratio, padding with
    dontcare). ``chain`` (a ``chain.Chain`` of the same models, or None): run every batch
    through it in one call instead of model by model (the smoother needs the labels on the
    host between the models, so it is not used with one). ``class_counts`` adds up the
    pixels of every class seen (256 counters)."""

    def __init__(self, segmenter, generator, table: labels.RemapTable, z, smooth: int, fit: str,
                 gen_size: tuple[int, int] | None, chain=None) -> None:
        self.segmenter, self.generator, self.table, self.z, self.fit = segmenter, generator, table, z, fit
        self.smoother = LabelSmoother(smooth) if smooth > 1 else None
        self.chain = chain if self.smoother is None else None
        self.gen_size = gen_size
        first = self.chain or segmenter
        self.asynchronous = getattr(first, "asynchronous", False)  # GPU runners overlap batches
        self.class_counts = np.zeros(256, np.int64)
        self._updates: dict = {}
        self._lock = threading.Lock()

    def update(self, *, table: labels.RemapTable | None = None, z: np.ndarray | None = None) -> None:
        """Use a new remap table and/or style vector from the next batch on (any thread)."""
        with self._lock:
            if table is not None:
                self._updates["table"] = table
            if z is not None:
                self._updates["z"] = z

    def submit(self, frames: np.ndarray, metas: list[dict]):
        """Start a batch (on GPU backends the device works while the caller goes on). With a
        chain the whole batch starts here, so changes (``update``) apply from here."""
        if self.chain is None:
            return self.segmenter.submit(frames), metas
        self._take_updates()
        boxes = [self._box(meta) for meta in metas] if self.gen_size else None
        return self.chain.submit(frames, self.table.lut, boxes, self.z), metas

    def finish(self, handle) -> list[FrameResult]:
        pending, metas = handle
        if self.chain is None:
            return self._complete(self.segmenter.finish(pending), metas)
        ids, synth = self.chain.finish(pending)
        self.class_counts += np.bincount(ids.ravel(), minlength=256)
        if synth is None:
            return [FrameResult(m, None) for m in ids]
        crops = [self._box(meta) for meta in metas]
        return [FrameResult(m, s[y:y + ch, x:x + cw]) for m, s, (x, y, cw, ch) in zip(ids, synth, crops)]

    def __call__(self, frames: np.ndarray, metas: list[dict]) -> list[FrameResult]:
        return self.finish(self.submit(frames, metas))

    def pinned_allocator(self):
        """Host buffers the first model uploads from fast (see Runner.pinned_allocator)."""
        return (self.chain or self.segmenter).pinned_allocator()

    def _take_updates(self) -> None:
        with self._lock:
            updates, self._updates = self._updates, {}
        self.table = updates.get("table", self.table)
        self.z = updates.get("z", self.z)

    def _box(self, meta: dict) -> tuple[int, int, int, int]:
        """Where a frame's picture lies on the generator's canvas."""
        gw, gh = self.gen_size
        return content_box(meta["size"], (gw, gh)) if self.fit == "letterbox" else (0, 0, gw, gh)

    def _complete(self, seg: np.ndarray, metas: list[dict]) -> list[FrameResult]:
        self._take_updates()
        if self.smoother is not None:
            seg = np.stack([self.smoother(m) for m in seg])
        ids = self.table(seg)
        self.class_counts += np.bincount(ids.ravel(), minlength=256)
        if self.generator is None:
            return [FrameResult(m, None) for m in ids]
        gw, gh = self.gen_size
        canvases, boxes = [], []
        for m, meta in zip(ids, metas):
            box = self._box(meta)
            canvas = np.full((gh, gw), labels.UNKNOWN, np.uint8)
            x, y, cw, ch = box
            canvas[y:y + ch, x:x + cw] = resize_labels(m, cw, ch)
            canvases.append(canvas)
            boxes.append(box)
        synth = self.generator(np.stack(canvases), self.z)
        return [FrameResult(m, s[y:y + ch, x:x + cw]) for m, s, (x, y, cw, ch) in zip(ids, synth, boxes)]

    def class_fractions(self) -> dict[str, float]:
        """Pixel share of every class seen so far, largest first, by name."""
        counts = self.class_counts.copy()
        total = counts.sum() or 1
        names = self.table.dst
        return {names.name_of(int(i)): float(counts[i] / total) for i in np.argsort(-counts) if counts[i]}
