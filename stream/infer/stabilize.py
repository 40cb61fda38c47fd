"""Temporal stabilisation: label maps that do not flicker where the picture did not change,
and pictures that stay still where their labels did.

Per-frame segmentation flips labels on pixels whose input did not change (a cloud is "sky"
in one frame and "wall" in the next), and SPADE repaints every flip as a flash. A session
runs one of these between the segmenter and the generator (``--stabilize``):

* ``off``: the per-frame labels.
* ``majority[:K]``: each pixel's most frequent label over the last K frames (ties: the most
  recent); ``--smooth K`` is its old name.
* ``hysteresis`` (the default for video): each pixel keeps its label until its input has
  changed (by more than ``threshold`` levels in some colour channel somewhere in its 3 x 3
  neighbourhood, compared with the frame its label was set on, so slow drifts add up), a
  prediction more confident than the kept one by ``margin`` arrives (the segmenters'
  ``confidence`` output: the top class's probability), or the segmenter has disagreed for
  ``patience`` frames in a row (a label that was wrong when it was set does not stay
  forever); a scene cut (more than ``cut`` of the picture changed since the frame before)
  starts afresh.
* ``flow``: the same rule on a state carried along by optical flow (OpenCV's DIS flow on
  quarter-size grey frames): labels, their confidence and the reference picture follow
  moving content, so a moving object keeps its labels; motions under ``snap`` pixels are
  taken as none.

With any of them a generator's picture is damped too (``PictureHold``): where a pixel's label
and input did not change, it moves only part of the way to the newly painted picture each
frame (SPADE repaints the whole frame a little differently whenever any label changes);
where they changed, and at scene cuts, the new picture shows at once.

All state belongs to one session and its infer thread.
"""

from __future__ import annotations

import numpy as np

from segsynth.core.errors import InputError
from segsynth.core.grammar import parse_stabilize


def make(spec: str):
    """A fresh label stabiliser for ``spec`` (None for ``off``)."""
    name, k = parse_stabilize(spec)
    return {"off": lambda: None, "majority": lambda: Majority(k), "hysteresis": Hysteresis, "flow": Flow}[name]()


def luma(frame: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB -> H x W float32 grey (BT.601 weights)."""
    return frame[..., 0] * np.float32(0.299) + frame[..., 1] * np.float32(0.587) + frame[..., 2] * np.float32(0.114)


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Boolean dilation by a (2 radius + 1)^2 square (the max over each pixel's neighbourhood)."""
    out = mask
    for _ in range(radius):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        rows = grown.copy()
        grown[:, 1:] |= rows[:, :-1]
        grown[:, :-1] |= rows[:, 1:]
        out = grown
    return out


def _differ(a: np.ndarray, b: np.ndarray, threshold: int) -> np.ndarray:
    """Where two H x W x 3 uint8 pictures differ by more than ``threshold`` in some channel."""
    return (np.maximum(a, b) - np.minimum(a, b)).max(-1) > threshold


class Majority:
    """Temporal majority vote over the last K label maps (ties go to the most recent)."""

    needs_frames = False

    def __init__(self, k: int) -> None:
        self.k, self.history = k, []

    def __call__(self, ids: np.ndarray, confidence=None, frame=None) -> np.ndarray:
        self.history = (self.history + [ids])[-self.k:]
        best = self.history[-1].copy()
        best_count = np.zeros(best.shape, np.int16)
        for candidate in reversed(self.history):  # most recent first: it wins ties
            count = sum((h == candidate).astype(np.int16) for h in self.history)
            better = count > best_count
            best[better], best_count[better] = candidate[better], count[better]
        return best


class Hysteresis:
    """Keep labels where the input did not change since they were set (see the module)."""

    needs_frames = True

    def __init__(self, threshold: int = 10, margin: float = 0.3, cut: float = 0.5, patience: int = 72) -> None:
        self.threshold, self.margin, self.cut, self.patience = threshold, margin, cut, patience
        self.labels = self.confidence = self.reference = self.against = None
        self.started = False  # the last frame started afresh (the first frame, a scene cut)
        self.moved = None  # where the last frame's input changed since the frame before
        self.last = None  # the last frame
        self.resets = 0  # scene cuts (and size changes) seen

    def __call__(self, ids: np.ndarray, confidence: np.ndarray | None, frame: np.ndarray) -> np.ndarray:
        """One frame: its per-frame ``ids`` (H x W uint8), their ``confidence`` (H x W float in
        [0, 1], or None: then only input changes update a label) and the ``frame`` (H x W x 3
        uint8 at the same size) -> the stabilised ids."""
        confidence = np.full(ids.shape, 0.5, np.float32) if confidence is None else confidence.astype(np.float32)
        state = self._follow(frame) if self.labels is not None and self.labels.shape == ids.shape else None
        if state is None:
            return self._reset(ids, confidence, frame)
        labels, kept, reference, against = state
        # any channel, not grey alone: new content of the same brightness is new content
        moved = _differ(frame, self.last, self.threshold)
        if moved.mean() > self.cut:  # abrupt: a cut, not a fade or a pan
            return self._reset(ids, confidence, frame)
        self.last, self.started, self.moved = frame.copy(), False, dilate(moved)
        changed = dilate(_differ(frame, reference, self.threshold))
        agree = ids == labels
        against = np.where(agree, 0, against + 1).astype(np.int16)  # frames in a row the segmenter disagreed
        take = changed | (~agree & ((confidence > kept + self.margin) | (against > self.patience)))
        self.labels = np.where(take, ids, labels)
        self.confidence = np.where(take, confidence, np.where(agree, np.maximum(kept, confidence), kept))
        self.reference = np.where(take[..., None], frame, reference)
        self.against = np.where(take, 0, against).astype(np.int16)
        return self.labels.copy()

    def _follow(self, frame: np.ndarray):
        """The state as it applies to this frame: (labels, their confidence, reference picture,
        frames of disagreement)."""
        return self.labels, self.confidence, self.reference, self.against

    def _reset(self, ids, confidence, frame) -> np.ndarray:
        self.labels, self.confidence, self.reference, self.last = ids.copy(), confidence, frame.copy(), frame.copy()
        self.against = np.zeros(ids.shape, np.int16)
        self.started, self.moved = True, np.ones(ids.shape, bool)
        self.resets += 1
        return ids.copy()


class Flow(Hysteresis):
    """Hysteresis on a state carried along by DIS optical flow (see the module)."""

    def __init__(self, scale: int = 4, snap: float = 0.5, **options) -> None:
        super().__init__(**options)
        try:
            # imported here: OpenCV is the flow extra
            import cv2
        except ImportError:
            raise InputError("--stabilize flow needs OpenCV: pip install opencv-python-headless "
                             "(or 'segsynth[flow]')") from None
        self.cv2, self.scale, self.snap = cv2, scale, snap
        self.flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
        self.previous = None

    def _small(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        return self.cv2.resize(luma(frame), (max(8, w // self.scale), max(8, h // self.scale)),
                               interpolation=self.cv2.INTER_AREA).round().astype(np.uint8)

    def _follow(self, frame: np.ndarray):
        cv2 = self.cv2
        small = self._small(frame)
        flow = self.flow.calc(small, self.previous, None)  # where each pixel of this frame was in the last
        self.previous = small
        flow[np.abs(flow).max(-1) < self.snap] = 0
        if not flow.any():
            return self.labels, self.confidence, self.reference, self.against
        h, w = frame.shape[:2]
        full = cv2.resize(flow, (w, h), interpolation=cv2.INTER_LINEAR) * np.float32(w / small.shape[1])
        full += np.mgrid[0:h, 0:w][::-1].transpose(1, 2, 0).astype(np.float32)
        x, y = full[..., 0], full[..., 1]
        warp = dict(borderMode=cv2.BORDER_REPLICATE)
        return (cv2.remap(self.labels, x, y, cv2.INTER_NEAREST, **warp),
                cv2.remap(self.confidence, x, y, cv2.INTER_LINEAR, **warp),
                cv2.remap(self.reference, x, y, cv2.INTER_LINEAR, **warp),
                cv2.remap(self.against, x, y, cv2.INTER_NEAREST, **warp))

    def _reset(self, ids, confidence, frame) -> np.ndarray:
        self.previous = self._small(frame)
        return super()._reset(ids, confidence, frame)


class PictureHold:
    """A generator's picture kept from flickering. Where the input moved (since the frame
    before) or the labels within ``radius`` pixels changed, the new picture is shown; elsewhere
    the picture moves only ``follow`` of the way to the new one each frame. SPADE paints each
    pixel from the whole label map, so a still pixel's paint flickers with every change far
    away: that is damped, while a real change (a sky painted dark while the frame was dark,
    repainted once the scene lit up) still comes through, gradually. A scene cut shows the new
    picture at once."""

    def __init__(self, radius: int = 0, follow: float = 0.2) -> None:
        self.radius, self.follow = radius, np.float32(follow)
        self.labels = self.picture = None

    def reset(self) -> None:
        """Repaint everything next frame (a new style, a new size)."""
        self.labels = self.picture = None

    def __call__(self, labels: np.ndarray, picture: np.ndarray, moved: np.ndarray | bool | None = None) -> np.ndarray:
        """``labels`` (h x w ids the picture was painted from, at its size), the new ``picture``
        (h x w x 3 uint8) and ``moved``: where the input changed (h x w bool), True for all of
        it (a scene cut), None when unknown -> the picture to show."""
        fresh = picture.astype(np.float32)
        if moved is True or self.picture is None or self.picture.shape != fresh.shape:
            self.labels, self.picture = labels.copy(), fresh
            return picture
        changed = dilate(labels != self.labels, self.radius)
        if moved is not None:
            changed |= moved
        self.picture = np.where(changed[..., None], fresh, self.picture + self.follow * (fresh - self.picture))
        self.labels = labels.copy()
        return self.picture.round().astype(np.uint8)
