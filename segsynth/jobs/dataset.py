"""``segsynth dataset make``: image/label pairs for training SPADE, made by the default segmenter.

Inputs are videos, image files, and folders of images. Every N-th frame of each video is
resized (stretched, as the segmenter sees frames) to W x H. An image gives either itself,
stretched the same way (``crops_per_image`` 0, for held-out whole photos), or that many
random crops of W:H shape covering 30-100 % of the largest such crop (multi-scale; positions
and scales from a generator seeded by the image's bytes, so the output is reproducible).
That stored image is what gets labelled, so each label map is exactly the
segmenter's output on its image (evaluating real frames against their labels scores 1.0).
The pair is written as PNGs (RGB image, 8-bit ids) and listed in ``manifest.json``. The
output is deterministic: the same inputs and options give the same files. The directory is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segsynth.core import paths
from segsynth.core.errors import InputError, OutputError
from segsynth.jobs.progress import Progress
from segsynth.jobs.registry import Registry
from segsynth.stream.infer.segmenter import load_segmenter
from segsynth.stream.io import demux
from segsynth.stream.pictures import resize_labels, resize_rgb

log = logging.getLogger("segsynth")
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class DatasetConfig:
    inputs: tuple[Path, ...]  # videos, images, folders of images
    out: Path
    every: int = 1
    size: tuple[int, int] = (256, 256)  # (W, H)
    segmenter: str = "ade20k+voc"
    threads: int | None = None
    crops_per_image: int = 0  # 0: each image whole (stretched); N: N random multi-scale crops

    def __post_init__(self) -> None:
        if not self.inputs:
            raise InputError("dataset make needs at least one video, image or folder")
        if self.every < 1:
            raise InputError("--every must be at least 1")
        if min(self.size) < 16:
            raise InputError("--size must be at least 16x16")
        if not 0 <= self.crops_per_image <= 10000:
            raise InputError("--crops-per-image must be in 0..10000 (0: each image whole)")


def expand_inputs(inputs) -> list[tuple[Path, str]]:
    """(path, "image" | "video") for each input; a folder gives its images, sorted, recursively."""
    out = []
    for path in map(Path, inputs):
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not images:
                raise InputError(f"{path}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})")
            out += [(p, "image") for p in images]
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            if not path.is_file():
                raise InputError(f"{path}: no such image file")
            out.append((path, "image"))
        else:
            demux.check_input(path)
            out.append((path, "video"))
    return out


def image_views(rgb: np.ndarray, size: tuple[int, int], crops: int, seed: bytes):
    """The W x H pictures one image gives: itself stretched (``crops`` 0) or ``crops`` random
    crops of the W:H shape, each 30-100 % (in side length) of the largest one that fits."""

    w, h = size
    im = Image.fromarray(rgb)
    if crops == 0:
        yield np.asarray(im.resize((w, h), Image.LANCZOS)), None
        return
    rng = np.random.default_rng(np.frombuffer(hashlib.sha256(seed).digest()[:8], np.uint64)[0])
    big_w = min(im.width, im.height * w / h)
    for _ in range(crops):
        cw = big_w * rng.uniform(0.3, 1.0)
        ch = cw * h / w
        x, y = rng.uniform(0, im.width - cw), rng.uniform(0, im.height - ch)
        box = (round(x), round(y), round(x + cw), round(y + ch))
        yield np.asarray(im.resize((w, h), Image.LANCZOS, box=box)), list(box)


def make_dataset(cfg: DatasetConfig, *, quiet: bool = False) -> dict:
    inputs = expand_inputs(cfg.inputs)
    out = Path(cfg.out)
    if out.exists():
        raise OutputError(f"{out} already exists; choose a new directory")
    if not out.parent.is_dir():
        raise OutputError(f"cannot write {out}: directory {out.parent} does not exist")
    segmenter = load_segmenter(Registry(paths.cache_dir()).resolve(cfg.segmenter, "segmenter"), threads=cfg.threads)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    w, h = cfg.size
    items, sources = [], []
    try:
        (staging / "images").mkdir(parents=True)
        (staging / "labels").mkdir()

        def add(image: np.ndarray, item: dict) -> None:
            label = resize_labels(segmenter(resize_rgb(image, *segmenter.size)[None])[0], w, h)
            name = f"{len(items):06d}.png"
            Image.fromarray(image).save(staging / "images" / name)
            Image.fromarray(label, "L").save(staging / "labels" / name)
            items.append({"image": f"images/{name}", "label": f"labels/{name}", **item})

        for src_index, (video, kind) in enumerate(inputs):
            if kind == "image":
                data = Path(video).read_bytes()
                views = list(image_views(demux.read_image(video), (w, h), cfg.crops_per_image, data))
                with Progress(f"dataset {Path(video).name}", len(views), unit="pictures",
                              enabled=not quiet and len(views) > 1) as progress:
                    for image, box in views:
                        add(image, {"source": src_index, "crop": box})
                        progress.update()
                sources.append({"path": str(video), "name": Path(video).name, "kind": "image",
                                "sha256": hashlib.sha256(data).hexdigest(), "frames_used": len(views)})
                continue
            container = demux.open_video(video)
            with container:
                stream = container.streams.video[0]
                declared = stream.frames or None
                total = -(-declared // cfg.every) if declared else None
                problems: list[str] = []
                taken = []
                with Progress(f"dataset {Path(video).name}", total, enabled=not quiet) as progress:
                    for index, frame in enumerate(f for f in demux.demux_decode(container, stream, [], problems)):
                        if index % cfg.every:
                            continue
                        image = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
                        seconds = float(frame.pts * frame.time_base) if frame.pts is not None else None
                        add(image, {"source": src_index, "frame": index, "time": seconds})
                        taken.append(index)
                        progress.update()
                for problem in problems:
                    log.warning("warning: %s: %s", video, problem)
            sources.append({"path": str(video), "name": Path(video).name, "kind": "video",
                            "sha256": demux.sha256_of(Path(video)), "frames_used": len(taken)})
        manifest = {"version": 1, "label_set": segmenter.label_set.name, "segmenter": cfg.segmenter,
                    "size": [w, h], "every": cfg.every, "crops_per_image": cfg.crops_per_image,
                    "sources": sources, "items": items}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        segmenter.close()
    return manifest


def load_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise InputError(f"{directory}: not a segsynth dataset (no {MANIFEST}; make one with segsynth dataset make)")
    try:
        manifest = json.loads(path.read_text())
        items = manifest["items"]
    except (ValueError, KeyError) as exc:
        raise InputError(f"{path}: malformed manifest ({exc})") from exc
    if not items:
        raise InputError(f"{directory}: the dataset has no items")
    return manifest


def read_pair(directory: Path, item: dict) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(Image.open(directory / item["image"]).convert("RGB"))
    label = np.asarray(Image.open(directory / item["label"]))
    return image, label
