"""Run configuration as data: dataclasses validated once at the edge (CLI, config file or
HTTP API all build these), then passed down unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".nut", ".ts"}
IDS_VIDEO_EXTS = {".mkv", ".nut", ".avi", ".mp4"}  # containers that hold lossless FFV1 grayscale
SEGMENT_VIEWS = ("labels", "overlay", "side-by-side", "ids")


def _kind(path: Path) -> str | None:
    ext = path.suffix.lower()
    return "image" if ext in IMAGE_EXTS else "video" if ext in VIDEO_EXTS else None


@dataclass(frozen=True)
class SegmentConfig:
    """``segsynth segment IN OUT``: label every frame of an image or a video."""

    input: Path
    output: Path
    view: str = "labels"
    remap: str | None = None
    segmenter: str = "ade20k+voc"
    label_set: str | None = None
    threads: int | None = None
    legend: bool = True
    crf: int = 18
    preset: str = "veryfast"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", Path(self.input))
        object.__setattr__(self, "output", Path(self.output))
        if self.view not in SEGMENT_VIEWS:
            raise InputError(f"unknown view {self.view!r}; choose one of: {', '.join(SEGMENT_VIEWS)}")
        out_kind = _kind(self.output)
        if out_kind is None:
            raise InputError(f"{self.output}: unknown output type {self.output.suffix!r}; use an image "
                             f"({', '.join(sorted(IMAGE_EXTS))}) or video ({', '.join(sorted(VIDEO_EXTS))}) extension")
        in_kind = _kind(self.input) or "video"  # unknown extensions are probed as media
        if in_kind != out_kind:
            raise InputError(f"{self.input} is {'an image' if in_kind == 'image' else 'a video'} "
                             f"but {self.output} names {'an image' if out_kind == 'image' else 'a video'} file")
        if self.view == "ids" and out_kind == "video" and self.output.suffix.lower() not in IDS_VIDEO_EXTS:
            raise InputError(f"--view ids writes lossless FFV1 grayscale video, which {self.output.suffix} cannot "
                             "hold; use .mkv")
        if self.threads is not None and self.threads < 1:
            raise InputError("--threads must be at least 1")
        if not 0 <= self.crf <= 51:
            raise InputError("--crf must be between 0 and 51")

    @property
    def is_image(self) -> bool:
        return _kind(self.output) == "image"
