"""The infer step of a stream session: segment a batch, stabilise the labels over time,
remap them, synthesize a new picture from them, and hold the picture still where its
labels are.

The models are shared (a ``ModelSet`` serves many sessions); what belongs to one session -
its stabiliser state, remap table and style vector ``z`` - lives here. ``update()`` may be
called from any thread: the change is picked up by the infer thread at the next batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from segsynth.core import labels
from segsynth.stream.infer import stabilize as stabilizers
from segsynth.stream.infer.reuse import Reuse
from segsynth.stream.pictures import black_bars, paint_bars, resize_labels


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


class Synthesize:
    """Segment -> stabilise -> remap -> synthesize -> hold, for one session. ``segmenter`` and
    ``generator`` (None: labels only) are shared models; ``stabilize`` a ``--stabilize`` spec
    (see stream.stabilize); ``gen_size`` is the generator's (W, H) and ``fit`` how frames
    meet it (letterbox keeps the aspect ratio, padding with dontcare). ``chains``: the same
    models composed into graphs (stream.chain parts by name): ``all`` runs a batch in one
    call when nothing happens between the models; ``segment`` and ``synth`` run either side
    of the stabiliser; missing parts run model by model. ``class_counts`` adds up the pixels
    of every class seen (256 counters). ``paint``: whether the view shows the picture; a view
    that does not (labels, overlay, ids) runs the segmenter only. Letterbox and pillarbox bars of
    the input (stream.pictures.black_bars) stay black in the picture. ``incremental``: a frame
    identical to the one before is not segmented again, a picture whose labels and style are the
    one before is not painted again (stream.infer.reuse; exact), through the fused graphs too."""

    def __init__(self, segmenter, generator, table: labels.RemapTable, z, stabilize: str, fit: str,
                 gen_size: tuple[int, int] | None, chains: dict | None = None, paint: bool = True,
                 incremental: bool = False) -> None:
        self.segmenter, self.generator, self.table, self.z, self.fit = segmenter, generator, table, z, fit
        self.paint = paint and generator is not None
        self.stabilizer = stabilizers.make(stabilize)
        self.hold = stabilizers.PictureHold() if self.stabilizer is not None and generator is not None else None
        self.gen_size = gen_size
        self.chains = {k: v for k, v in (chains or {}).items() if v is not None}
        self.reuse = Reuse() if incremental else None
        self._last_seg = self._last_picture = self._last_whole = None  # the last results, for frames that repeat them
        self.whole = self.chains.get("all") if self.stabilizer is None else None
        first = self.whole or self.chains.get("segment") or segmenter
        self.asynchronous = getattr(first, "asynchronous", False)  # GPU runners overlap batches
        self.class_counts = np.zeros(256, np.int64)
        self._updates: dict = {}
        self._lock = threading.Lock()

    def update(self, *, table: labels.RemapTable | None = None, z: np.ndarray | None = None,
               paint: bool | None = None) -> None:
        """Use a new remap table, style vector or need for the picture from the next batch on (any thread)."""
        with self._lock:
            if table is not None:
                self._updates["table"] = table
            if z is not None:
                self._updates["z"] = z
            if paint is not None:
                self._updates["paint"] = paint and self.generator is not None

    def submit(self, frames: np.ndarray, metas: list[dict]):
        """Start a batch (on GPU backends the device works while the caller goes on); changes
        (``update``) apply from the batch submitted next."""
        with self._lock:
            updates, self._updates = self._updates, {}
        self.table = updates.get("table", self.table)
        if ("z" in updates or updates.get("paint") and not self.paint) and self.hold is not None:
            self.hold.reset()  # a new style, or painting again after a pause, repaints everything
        self.z, self.paint = updates.get("z", self.z), updates.get("paint", self.paint)
        boxes = [self._box(meta) for meta in metas] if self.gen_size else None
        bars = [black_bars(frame) for frame in frames] if self.paint else None  # read now: the buffer is reused
        whole = self.whole is not None and self.paint
        # a frame that repeats the one before is not segmented; through the one graph that also
        # paints, not after a change of remap, style or view either (its results hold the old ones)
        todo = self.reuse.to_segment(frames, again=whole and bool(updates)) if self.reuse is not None else None
        run = frames if todo is None or todo.all() else frames[todo]
        if whole:
            run_boxes = boxes if todo is None else [b for b, t in zip(boxes, todo) if t]
            pending = self.whole.submit(run, self.table.lut, run_boxes, self.z) if len(run) else None
            return pending, metas, boxes, None, bars, todo
        # what the stabiliser reads of the frames is taken now: the batch's buffer is reused
        frames_kept = frames.copy() if getattr(self.stabilizer, "needs_frames", False) else None
        part = self.chains.get("segment")
        pending = (part.submit(run) if part else self.segmenter.submit(run)) if len(run) else None
        return pending, metas, boxes, frames_kept, bars, todo

    def finish(self, handle) -> list[FrameResult]:
        pending, metas, boxes, frames, bars, todo = handle
        moved = [None] * len(metas)  # per frame: where its input moved (True: all, a scene cut), from the stabiliser
        if self.whole is not None and bars is not None:
            out = self.whole.finish(pending) if pending is not None else {}
            ids, synth = out.get("labels"), out.get("pixels")
            if todo is not None:
                pairs = None if ids is None else list(zip(ids, synth))
                pairs, self._last_whole = Reuse.fill(pairs, todo, self._last_whole)
                ids, synth = np.stack([m for m, _ in pairs]), np.stack([p for _, p in pairs])
        else:
            ids, synth = self._stabilised_synthesis(pending, boxes, frames, moved, paint=bars is not None, todo=todo)
        self.class_counts += np.bincount(ids.ravel(), minlength=256)
        if synth is None:
            return [FrameResult(m, None) for m in ids]
        results = []
        for m, s, (x, y, cw, ch), where, edges in zip(ids, synth, boxes, moved, bars):
            picture = paint_bars(np.array(s[y:y + ch, x:x + cw]), edges)
            if self.hold is not None:
                if isinstance(where, np.ndarray):  # at the picture's size
                    where = resize_labels(where.view(np.uint8), cw, ch).view(bool)
                picture = self.hold(resize_labels(m, cw, ch), picture, where)
            results.append(FrameResult(m, picture))
        return results

    def __call__(self, frames: np.ndarray, metas: list[dict]) -> list[FrameResult]:
        return self.finish(self.submit(frames, metas))

    def pinned_allocator(self):
        """Host buffers the first model uploads from fast (see Runner.pinned_allocator)."""
        return (self.whole or self.chains.get("segment") or self.segmenter).pinned_allocator()

    def _stabilised_synthesis(self, pending, boxes, frames, moved: list, paint: bool,
                              todo: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Segment (chain part or models; ``todo``: the frames that were, the others repeat the
        frame before), stabilise on the host (``moved[i]``: where frame i's input moved, as the
        stabiliser saw it), then remap and, when ``paint``, synthesize (only the pictures whose
        labels or style changed, with ``self.reuse``)."""
        part = self.chains.get("segment")
        if pending is None:
            seg = confidence = None
        elif part is not None:
            out = part.finish(pending)
            seg, confidence = out["ids"], out.get("confidence")
        elif self.stabilizer is None:
            seg, confidence = self.segmenter.finish(pending), None
        else:
            seg, confidence = self.segmenter.finish(pending, confidence=True)
        if todo is not None:
            pairs = None if seg is None else list(zip(seg, [None] * len(seg) if confidence is None else confidence))
            pairs, self._last_seg = Reuse.fill(pairs, todo, self._last_seg)
            seg = np.stack([m for m, _ in pairs])
            confidence = None if pairs[0][1] is None else np.stack([c for _, c in pairs])
        if self.stabilizer is not None:
            none, stable = [None] * len(seg), []
            for i, (m, c, f) in enumerate(zip(seg, none if confidence is None else confidence,
                                              none if frames is None else frames)):
                stable.append(self.stabilizer(m, c, f))
                started = getattr(self.stabilizer, "started", False)
                moved[i] = True if started else getattr(self.stabilizer, "moved", None)
            seg = np.stack(stable)
        ids = self.table(seg)
        if not paint:
            return ids, None
        synth_part = self.chains.get("synth")
        canvases = None
        if synth_part is None or self.reuse is not None:  # the generator's input, on the host
            gw, gh = self.gen_size
            canvases = np.full((len(ids), gh, gw), labels.UNKNOWN, np.uint8)
            for canvas, m, (x, y, cw, ch) in zip(canvases, ids, boxes):
                canvas[y:y + ch, x:x + cw] = resize_labels(m, cw, ch)
        todo = self.reuse.to_paint(canvases, self.z) if self.reuse is not None else np.ones(len(ids), bool)
        pictures = None
        if todo.any() and synth_part is not None:
            pictures = synth_part.finish(synth_part.submit(seg[todo], self.table.lut,
                                                           [b for b, t in zip(boxes, todo) if t], self.z))["pixels"]
        elif todo.any():
            pictures = self.generator(canvases[todo], self.z)
        if self.reuse is None:
            return ids, pictures
        pictures, self._last_picture = Reuse.fill(pictures, todo, self._last_picture)
        return ids, np.stack(pictures)

    def _box(self, meta: dict) -> tuple[int, int, int, int]:
        """Where a frame's picture lies on the generator's canvas."""
        gw, gh = self.gen_size
        return content_box(meta["size"], (gw, gh)) if self.fit == "letterbox" else (0, 0, gw, gh)

    def class_fractions(self) -> dict[str, float]:
        """Pixel share of every class seen so far, largest first, by name."""
        counts = self.class_counts.copy()
        total = counts.sum() or 1
        names = self.table.dst
        return {names.name_of(int(i)): float(counts[i] / total) for i in np.argsort(-counts) if counts[i]}
