"""``segsynth dataset make``: image/label pairs for training SPADE, made by the default segmenter.

Every N-th frame of each video is resized (stretched, as the segmenter sees frames) to
W x H, and that stored image is what gets labelled, so each label map is exactly the
segmenter's output on its image (evaluating real frames against their labels scores 1.0).
The pair is written as PNGs (RGB image, 8-bit ids) and listed in ``manifest.json``. The output is deterministic: the same videos and options give the same
files. The directory is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segsynth.errors import InputError, OutputError

from . import media
from .progress import Progress
from .segmenter import load_segmenter, resize_labels, resize_rgb

log = logging.getLogger("segsynth")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DatasetConfig:
    videos: tuple[Path, ...]
    out: Path
    every: int = 1
    size: tuple[int, int] = (256, 256)  # (W, H)
    segmenter: str = "ade20k+voc"
    threads: int | None = None

    def __post_init__(self) -> None:
        if not self.videos:
            raise InputError("dataset make needs at least one video")
        if self.every < 1:
            raise InputError("--every must be at least 1")
        if min(self.size) < 16:
            raise InputError("--size must be at least 16x16")


def make_dataset(cfg: DatasetConfig, *, quiet: bool = False) -> dict:
    from PIL import Image

    for video in cfg.videos:
        media.check_input(video)
    out = Path(cfg.out)
    if out.exists():
        raise OutputError(f"{out} already exists; choose a new directory")
    if not out.parent.is_dir():
        raise OutputError(f"cannot write {out}: directory {out.parent} does not exist")
    segmenter = load_segmenter(cfg.segmenter, threads=cfg.threads)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    w, h = cfg.size
    items, sources = [], []
    try:
        (staging / "images").mkdir(parents=True)
        (staging / "labels").mkdir()
        for src_index, video in enumerate(cfg.videos):
            container = media.open_video(video)
            with container:
                stream = container.streams.video[0]
                declared = stream.frames or None
                total = -(-declared // cfg.every) if declared else None
                problems: list[str] = []
                taken = []
                with Progress(f"dataset {Path(video).name}", total, enabled=not quiet) as progress:
                    for index, frame in enumerate(f for f in media.demux_decode(container, stream, [], problems)):
                        if index % cfg.every:
                            continue
                        image = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
                        label = resize_labels(segmenter(resize_rgb(image, *segmenter.size)[None])[0], w, h)
                        name = f"{len(items):06d}.png"
                        Image.fromarray(image).save(staging / "images" / name)
                        Image.fromarray(label, "L").save(staging / "labels" / name)
                        seconds = float(frame.pts * frame.time_base) if frame.pts is not None else None
                        items.append({"image": f"images/{name}", "label": f"labels/{name}", "source": src_index,
                                      "frame": index, "time": seconds})
                        taken.append(index)
                        progress.update()
                for problem in problems:
                    log.warning("warning: %s: %s", video, problem)
            sources.append({"path": str(video), "name": Path(video).name, "sha256": media.sha256_of(Path(video)),
                            "frames_used": len(taken)})
        manifest = {"version": 1, "label_set": segmenter.label_set.name, "segmenter": cfg.segmenter,
                    "size": [w, h], "every": cfg.every, "sources": sources, "items": items}
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
    from PIL import Image

    image = np.asarray(Image.open(directory / item["image"]).convert("RGB"))
    label = np.asarray(Image.open(directory / item["label"]))
    return image, label
