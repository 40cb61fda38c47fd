"""Pictures and label maps resized the one way segsynth resizes them: RGB bilinear, ids nearest
(never blended)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_rgb(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear (area-aware when shrinking) resize of an H x W x 3 uint8 image."""
    if frame.shape[1] == width and frame.shape[0] == height:
        return frame

    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))


def resize_labels(label_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of an H x W id map (ids must never be blended)."""
    h, w = label_map.shape[-2:]
    if (h, w) == (height, width):
        return label_map
    ys = ((np.arange(height) + 0.5) * h / height).astype(np.intp)
    xs = ((np.arange(width) + 0.5) * w / width).astype(np.intp)
    return label_map[..., ys[:, None], xs[None, :]]


def black_bars(frame: np.ndarray, threshold: int = 16) -> tuple[float, float, float, float]:
    """The letterbox and pillarbox bars of an RGB frame, as fractions of its height and width:
    (top, bottom, left, right), each the run of rows or columns from that edge whose pixels are
    all darker than ``threshold`` (none when the whole frame is that dark: a black frame has no
    bars, it is black)."""
    dark = frame.max(axis=2) < threshold
    rows, cols = dark.all(axis=1), dark.all(axis=0)
    if rows.all():
        return 0.0, 0.0, 0.0, 0.0

    def run(flags: np.ndarray) -> int:
        return int(np.argmin(flags)) if not flags.all() else len(flags)

    h, w = dark.shape
    return run(rows) / h, run(rows[::-1]) / h, run(cols) / w, run(cols[::-1]) / w


def paint_bars(picture: np.ndarray, bars: tuple[float, float, float, float]) -> np.ndarray:
    """``picture`` with the bars (fractions, from ``black_bars``) painted black, in place."""
    h, w = picture.shape[:2]
    top, bottom, left, right = (round(f * n) for f, n in zip(bars, (h, h, w, w)))
    picture[:top] = 0
    picture[h - bottom:] = 0
    picture[:, :left] = 0
    picture[:, w - right:] = 0
    return picture
