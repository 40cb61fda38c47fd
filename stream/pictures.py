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
