"""``segsynth eval-generator``: how well a generator paints what it was asked to paint.

The SPADE paper's protocol: segment the generated frames with the segmenter and compare
with the label maps they were generated from (mIoU over the classes present in those label
maps, and pixel accuracy, both ignoring unknown pixels); plus PSNR and SSIM of the generated
frames against the real ones. The real frames are scored the same way as a baseline (1.0 by
construction: the labels are the segmenter's own output on them). Frequency-weighted IoU (Long
et al., FCN) is reported beside mIoU: mIoU over "the classes present" weighs a class covering
a few pixels as much as the sky.

``colour_distance`` uses neither network: for each frame and each class in its label map,
the distance (RGB, 0-255 per channel) between the mean colour of the generated and of the
real pixels of that class, averaged with the class's pixel count as weight. It tells whether
the sky comes out sky-coloured and the grass green, so progress cannot come from fooling
the segmenter alone (a generator trained with a feature network's loss could do that).

``baselines`` also scores the real frames slightly degraded (Gaussian blur of 1 pixel, or
noise of sigma 10 grey levels): how far any picture that is not the very frame the labels
came from can get under this protocol. Segmenters are brittle on rare classes, so this
ceiling is far below 1.0, and a generator's score means little without it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageFilter

from segsynth.core import labels, paths
from segsynth.core.errors import InputError
from segsynth.jobs.dataset import load_manifest, read_pair
from segsynth.jobs.models import exported_generator
from segsynth.jobs.progress import Progress
from segsynth.jobs.registry import Registry
from segsynth.stream.infer.generator import load_generator
from segsynth.stream.infer.segmenter import load_segmenter
from segsynth.stream.pictures import resize_labels, resize_rgb

log = logging.getLogger("segsynth")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, size: int = 11) -> np.ndarray:
    """Separable Gaussian filter, 'valid' region only (as SSIM implementations crop the border)."""

    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    g /= g.sum()
    x = sliding_window_view(x, size, axis=1) @ g
    return sliding_window_view(x, size, axis=0) @ g


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03), per channel averaged."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx, my = _gaussian_filter(x), _gaussian_filter(y)
        vx = _gaussian_filter(x * x) - mx * mx
        vy = _gaussian_filter(y * y) - my * my
        cxy = _gaussian_filter(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(s.mean())
    return float(np.mean(values))


class Confusion:
    """Confusion matrix over the label set's classes; ``unmatched`` counts true pixels whose
    prediction was 'unknown' (wrong for their class, but no class's false positive)."""

    def __init__(self, n: int) -> None:
        self.n, self.matrix, self.unmatched = n, np.zeros((n, n), np.int64), np.zeros(n, np.int64)

    def add(self, truth: np.ndarray, pred: np.ndarray) -> None:
        keep = truth < self.n
        t, p = truth[keep].astype(np.int64), np.minimum(pred[keep].astype(np.int64), self.n)
        valid = p < self.n  # a prediction of 'unknown' counts as wrong for its true class
        self.matrix += np.bincount(t[valid] * self.n + p[valid], minlength=self.n**2).reshape(self.n, self.n)
        self.unmatched += np.bincount(t[~valid], minlength=self.n)

    def scores(self) -> tuple[float, float, dict[int, float]]:
        tp = np.diag(self.matrix)
        truth = self.matrix.sum(1) + self.unmatched
        predicted = self.matrix.sum(0)
        present = np.flatnonzero(truth)
        iou = {int(c): float(tp[c] / (truth[c] + predicted[c] - tp[c])) for c in present}
        total = truth.sum()
        return (float(np.mean(list(iou.values()))) if iou else 0.0, float(tp.sum() / total) if total else 0.0, iou)

    def summary(self) -> dict:
        """mIoU over the classes present, pixel accuracy and frequency-weighted IoU."""
        miou, acc, iou = self.scores()
        truth = self.matrix.sum(1) + self.unmatched
        fw = sum(truth[c] * v for c, v in iou.items()) / truth.sum() if iou else 0.0
        return {"miou": miou, "pixel_accuracy": acc, "fw_iou": float(fw)}


class ColourDistance:
    """Pixel-weighted mean distance between a class's mean colour in two pictures (see above)."""

    def __init__(self) -> None:
        self.total, self.pixels = 0.0, 0

    def add(self, label: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        ids = label.ravel().astype(np.int64)
        count = np.bincount(ids, minlength=256)
        present = np.flatnonzero(count)
        means = [np.stack([np.bincount(ids, x[..., ch].ravel().astype(np.float64), minlength=256)[present]
                           for ch in range(3)], 1) / count[present, None] for x in (a, b)]
        self.total += float((np.linalg.norm(means[0] - means[1], axis=1) * count[present]).sum())
        self.pixels += int(count[present].sum())

    @property
    def value(self) -> float:
        return self.total / self.pixels if self.pixels else 0.0


def degraded(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The real frame slightly spoilt, for the protocol's ceiling (see the module docstring)."""
    if kind == "real_blur_1px":
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1)))
    if kind == "real_noise_10":
        return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    raise ValueError(kind)


BASELINES = ("real_blur_1px", "real_noise_10")


def evaluate(generator_spec: str, data: Path, *, segmenter: str = "ade20k+voc", limit: int | None = None,
             cache_dir: Path | None = None, threads: int | None = None, quiet: bool = False,
             backend: str = "auto", grid: Path | None = None, grid_rows: int = 4, baselines: bool = False) -> dict:

    manifest = load_manifest(data)
    items = manifest["items"][:limit] if limit else manifest["items"]
    registry = Registry(paths.cache_dir(cache_dir))
    seg = load_segmenter(registry.resolve(segmenter, "segmenter"), threads=threads, backend=backend, cache_dir=cache_dir)
    try:
        generator_spec = registry.resolve(generator_spec, "generator")
        if Path(generator_spec).is_dir():  # an official checkpoint: exported once, into the cache
            generator_spec = str(exported_generator(Path(generator_spec), None, paths.cache_dir(cache_dir)))
        gen = load_generator(generator_spec, cache_dir=cache_dir, threads=threads, backend=backend)
    except BaseException:
        seg.close()
        raise
    if gen is None:
        seg.close()
        raise InputError("no bundled default generator is available to evaluate")
    try:
        label_set = labels.get(manifest["label_set"])
        if gen.label_set is not None and gen.label_set.name != label_set.name:
            raise InputError(f"{data} is labelled in {label_set.name} but the generator paints {gen.label_set.name}")
        z = gen.seeded_z(0) if gen.uses_z else None  # as run paints without --style or --seed
        fake_conf, real_conf = Confusion(len(label_set)), Confusion(len(label_set))
        base_conf = {kind: Confusion(len(label_set)) for kind in (BASELINES if baselines else ())}
        rng = np.random.default_rng(0)
        psnrs, ssims, rows, colour = [], [], [], ColourDistance()
        pick = set(np.linspace(0, len(items) - 1, min(grid_rows, len(items))).astype(int).tolist())
        with Progress(f"eval {Path(str(generator_spec)).name}", len(items), enabled=not quiet) as progress:
            for item in items:
                real, label = read_pair(Path(data), item)
                h, w = label.shape
                fake = gen(resize_labels(label, *gen.size)[None], z)[0]
                fake = resize_rgb(fake, w, h)
                scored = [(fake, fake_conf), (real, real_conf)]
                scored += [(degraded(real, kind, rng), conf) for kind, conf in base_conf.items()]
                for image, conf in scored:
                    predicted = seg(resize_rgb(image, *seg.size)[None])[0]
                    conf.add(label, resize_labels(predicted, w, h))
                colour.add(label, fake, real)
                psnrs.append(psnr(fake, real))
                ssims.append(ssim(fake, real))
                if grid is not None and len(psnrs) - 1 in pick:
                    rows.append(np.concatenate([labels.colorize(label, label_set), real, fake], 1))
                progress.update()
        if grid is not None:
            Image.fromarray(np.concatenate(rows, 0)).save(grid)
        per_class = fake_conf.scores()[2]
        return {"generator": str(generator_spec), "data": str(data), "frames": len(items), **fake_conf.summary(),
                "psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "colour_distance": colour.value,
                "real_frames": real_conf.summary(),
                "baselines": {kind: conf.summary() for kind, conf in base_conf.items()},
                "per_class_iou": {label_set.name_of(c): v for c, v in sorted(per_class.items(), key=lambda kv: -kv[1])},
                "label_set": label_set.name, "segmenter": segmenter}
    finally:
        seg.close()
        gen.close()


def print_table(result: dict) -> None:
    columns = {"generated": result, "real": result["real_frames"], **result["baselines"]}
    log.info("%-22s" + " %14s" * len(columns), "", *columns)
    for key, name in (("miou", "mIoU (classes present)"), ("pixel_accuracy", "pixel accuracy"),
                      ("fw_iou", "freq.-weighted IoU")):
        log.info("%-22s" + " %14.3f" * len(columns), name, *(c[key] for c in columns.values()))
    log.info("%-22s %10.2f", "PSNR (dB)", result["psnr"])
    log.info("%-22s %10.3f", "SSIM", result["ssim"])
    log.info("%-22s %10.1f", "class colour distance", result["colour_distance"])
    top = ", ".join(f"{k} {v:.2f}" for k, v in list(result["per_class_iou"].items())[:8])
    log.info("per-class IoU: %s (%d frames)", top, result["frames"])


def write_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=1) + "\n")
