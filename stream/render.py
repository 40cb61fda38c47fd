"""Turning label maps into pictures: colour views with a legend of the classes present,
and the raw-id view for datasets and tools."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segsynth.core import labels
from segsynth.core.labels import LabelSet
from segsynth.stream.pictures import resize_labels


@lru_cache(maxsize=8)
def _font(size: int):
    return ImageFont.load_default(size=size)


def draw_legend(image: np.ndarray, label_map: np.ndarray, label_set: LabelSet, *,
                max_items: int = 10, min_fraction: float = 0.005) -> np.ndarray:
    """Draw a box listing the classes present (largest first, with pixel share) in the top-left
    corner of ``image`` (H x W x 3 uint8); returns a new array."""

    present = [(i, f) for i, f in labels.class_fractions(label_map).items() if f >= min_fraction][:max_items]
    if not present:
        return image
    height = image.shape[0]
    size = max(10, min(28, height // 36))
    font, pad, swatch = _font(size), size // 3, size
    rows = [f"{label_set.name_of(i)} {f:.0%}" if f >= 0.01 else f"{label_set.name_of(i)} <1%" for i, f in present]
    text_w = max(font.getbbox(r)[2] for r in rows)
    box_w, row_h = pad * 3 + swatch + text_w, size + pad
    box_h = pad + row_h * len(rows)
    canvas = Image.fromarray(image).convert("RGBA")
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.rectangle([0, 0, box_w, box_h], fill=(0, 0, 0, 170))
    for n, ((idx, _), text) in enumerate(zip(present, rows)):
        y = pad + n * row_h
        color = tuple(int(c) for c in label_set.palette[idx])
        draw.rectangle([pad, y, pad + swatch, y + swatch], fill=color + (255,), outline=(255, 255, 255, 255))
        draw.text((pad * 2 + swatch, y), text, font=font, fill=(255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(canvas, layer).convert("RGB"))


def render(view: str, frame: np.ndarray, label_map: np.ndarray, label_set: LabelSet,
           legend: bool = True) -> np.ndarray:
    """``frame`` H x W x 3 and ``label_map`` H x W (same size) -> the picture for ``view``:
    RGB for the colour views, H x W uint8 ids for ``ids``."""
    if view == "ids":
        return label_map
    color = labels.colorize(label_map, label_set)
    if view in ("labels", "side-by-side"):
        out = color
    elif view == "overlay":
        out = ((frame.astype(np.uint16) + color) // 2).astype(np.uint8)
    else:
        raise ValueError(f"unknown view {view!r}")
    if legend:
        out = draw_legend(out, label_map, label_set)
    if view == "side-by-side":
        out = np.concatenate([frame, out], axis=1)
    return out


def _resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[1::-1] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def pad_to(image: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Pad (repeating the last row/column) to (W, H), by default to the next even size:
    4:2:0 video needs even sizes. Works for RGB and single-channel images."""
    h, w = image.shape[:2]
    tw, th = size or (w + w % 2, h + h % 2)
    pad = [(0, th - h), (0, tw - w)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad, mode="edge") if th != h or tw != w else image


def fit_picture(picture: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``picture`` at (W, H) ``size``: padded when it is at most one pixel smaller (even sizes),
    otherwise scaled to fit, keeping its aspect, on black - or, for class ids, on 255, unknown
    (a new view or input size mid-stream)."""
    h, w = picture.shape[:2]
    tw, th = size
    if (w, h) == (tw, th) or (0 <= tw - w <= 1 and 0 <= th - h <= 1):
        return pad_to(picture, size)

    scale = min(tw / w, th / h)
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    resample = Image.NEAREST if picture.ndim == 2 else Image.BILINEAR  # ids are never blended
    scaled = np.asarray(Image.fromarray(picture).resize((cw, ch), resample))
    out = np.full((th, tw, *picture.shape[2:]), labels.UNKNOWN if picture.ndim == 2 else 0, np.uint8)
    y, x = (th - ch) // 2, (tw - cw) // 2
    out[y:y + ch, x:x + cw] = scaled
    return out


def compose(view: str, display: np.ndarray | None, label_map: np.ndarray, synth: np.ndarray | None,
            label_set: LabelSet, frame_size: tuple[int, int], out_size: tuple[int, int] | None = None,
            legend: bool = True) -> np.ndarray:
    """The picture a session encodes for ``view``, at ``out_size`` (W, H; default: its own).

    ``label_map`` is at the segmenter's size and ``synth`` at the generator's content size;
    both are scaled to ``frame_size`` (the upright input size). Views: synth; labels (colour
    map + legend); overlay (labels blended over the input); side-by-side (input | synthesis,
    or input | labels without a generator); grid (2 x 2: input, labels, synthesis, overlay);
    ids (the class ids as a grayscale picture)."""

    w, h = frame_size
    if view == "grid":
        w, h = w // 2, h // 2
    ids = resize_labels(label_map, w, h)
    synth_up = _resize_rgb(synth, (w, h)) if synth is not None else None
    frame = _resize_rgb(display, (w, h)) if display is not None else None

    def colour() -> np.ndarray:
        picture = labels.colorize(ids, label_set)
        return draw_legend(picture, ids, label_set) if legend else picture

    if view == "ids":
        out = ids
    elif view == "synth":
        out = synth_up
    elif view == "labels":
        out = colour()
    elif view == "overlay":
        out = render("overlay", frame, ids, label_set, legend)
    elif view == "side-by-side":
        out = np.concatenate([frame, synth_up if synth_up is not None else colour()], axis=1)
    elif view == "grid":
        right_bottom = render("overlay", frame, ids, label_set, legend=False)
        bottom_left = synth_up if synth_up is not None else np.zeros_like(frame)
        out = np.concatenate([np.concatenate([frame, colour()], 1), np.concatenate([bottom_left, right_bottom], 1)], 0)
    else:
        raise ValueError(f"unknown view {view!r}")
    return pad_to(out, out_size) if out_size else out
