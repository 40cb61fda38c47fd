"""Incremental inference for one stream session (``--incremental on``, the default): what the
models would compute again for a frame is taken from the frame before it.

- A frame whose segmenter input is identical to the previous frame's (a still scene, a paused
  or frozen source, a static test pattern) is not segmented again: it gets that frame's labels.
- A picture whose generator input - the label canvas and the style vector - is the previous
  picture's (the labels held by the stabiliser while the input barely moved, a label view
  switched back to the picture) is not painted again.

Both are exact: the models are deterministic, so what is reused is bit-identical to what would
be recomputed (tests/test_incremental.py). Every ``repaint_every`` frames both run regardless,
so nothing can go stale for longer than that. Memory: one frame, one canvas and one picture.
Counters (``frames``, ``segmented``, ``painted``) say how much was computed.
"""

from __future__ import annotations

import numpy as np

REPAINT_EVERY = 250  # frames: 10 s at 25 fps


class Reuse:
    def __init__(self, repaint_every: int = REPAINT_EVERY) -> None:
        self.repaint_every = repaint_every
        self._input = self._canvas = self._z = None
        self._input_age = self._canvas_age = 0  # frames the kept input / canvas has been reused for
        self.frames = self.segmented = self.pictures = self.painted = 0

    def to_segment(self, frames: np.ndarray, again: bool = False) -> np.ndarray:
        """Per frame of a batch (N x H x W x 3): True where it must be segmented, False where it
        repeats the frame before it (in this batch or the last one); ``again``: the batch's first
        frame is segmented whatever it repeats."""
        todo, self._input_age = self._repeats(frames, self._input, not again, self._input_age)
        if len(frames):
            self._input = frames[-1].copy()  # the batch's buffer is reused for the next one
        self.frames += len(frames)
        self.segmented += int(todo.sum())
        return todo

    def to_paint(self, canvases: np.ndarray, z: np.ndarray | None) -> np.ndarray:
        """Per label canvas of a batch: True where it must be painted, False where it (and z) is
        the one painted before it."""
        same_z = (z is None and self._z is None) or (
            z is not None and self._z is not None and np.array_equal(z, self._z))
        todo, self._canvas_age = self._repeats(canvases, self._canvas, same_z, self._canvas_age)
        if len(canvases):
            self._canvas, self._z = canvases[-1].copy(), None if z is None else z.copy()
        self.pictures += len(canvases)
        self.painted += int(todo.sum())
        return todo

    def _repeats(self, items: np.ndarray, kept, first_may_repeat: bool, age: int) -> tuple[np.ndarray, int]:
        """Per item: True where it must be computed, False where it equals the item before it
        (``kept`` before the first; the first only if ``first_may_repeat``) and that result has
        been reused fewer than ``repaint_every`` times in a row (``age``). Returns (todo, age)."""
        todo = np.ones(len(items), bool)
        for i, item in enumerate(items):
            before = kept if i == 0 else items[i - 1]
            if (i > 0 or first_may_repeat) and before is not None and before.shape == item.shape \
                    and age < self.repaint_every and np.array_equal(before, item):
                todo[i] = False
                age += 1
            else:
                age = 0
        return todo, age

    @staticmethod
    def fill(computed, todo: np.ndarray, last):
        """Results for every frame of a batch from those ``computed`` (one per True in ``todo``,
        in order; an array or None): a frame not computed takes the result of the frame before
        it, ``last`` for the batch's first. Returns (a list, the batch's last result)."""
        out, it = [], iter(computed if computed is not None else ())
        for need in todo:
            last = next(it) if need else last
            out.append(last)
        return out, last

    def shares(self) -> dict[str, float]:
        """Share of the frames segmented and of the pictures painted since the start (1: all)."""
        return {"segmented": self.segmented / self.frames if self.frames else 1.0,
                "painted": self.painted / self.pictures if self.pictures else 1.0}
