"""Distilling the student generator (segsynth.export.student) from a teacher generator.

    pairs (label map, real picture) of a dataset  ->  teacher pictures, made once and cached:
        z from the style encoder on the real picture, the teacher's picture recoloured to the
        real picture's colour statistics: the student learns the teacher's structure and takes
        its colours from the style vector (which the teacher hardly does)
    ->  the student trained on them: L1 + a perceptual loss (the bundled VOC backbone)
    ->  the style vectors' spread (``z_stats``): seeds are drawn from it, so a seed is a
        plausible style, and two seeds two different ones

Resumable (``out/train_state.pth``, saved every ``save_every`` steps), CPU-first (``threads``),
progress with an ETA; the held-out sets of the recipe (scripts/train-student) are never read.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from segsynth.core.errors import InputError
from segsynth.export.perceptual import PerceptualLoss
from segsynth.export.student import StudentGenerator, StudentOptions
from segsynth.jobs.dataset import load_manifest, read_pair
from segsynth.jobs.progress import Progress
from segsynth.stream.infer.generator import load_generator

log = logging.getLogger("segsynth")


@dataclass(frozen=True)
class DistillConfig:
    data: Path  # a dataset made by ``segsynth dataset make`` (pairs at the student's size)
    out: Path  # the checkpoint: student.json, student_G.pth, z_stats.npz, encoder.onnx; train_state.pth, log.jsonl, teacher/
    teacher: Path  # the teacher generator's ONNX graph, its style encoder beside it (NAME-encoder.onnx)
    steps: int = 6000
    batch: int = 8
    crop: int | None = 128  # train on random crops this size (a multiple of 8; None: whole pictures)
    lr: float = 1e-3
    lambda_l1: float = 1.0
    lambda_perceptual: float = 1.0
    save_every: int = 200
    threads: int | None = None
    seed: int = 0
    options: StudentOptions = StudentOptions()

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise InputError("distill: steps and batch must be at least 1")
        if self.crop is not None and not (self.crop % 8 == 0 and 32 <= self.crop <= self.options.size):
            raise InputError(f"distill: crop must be a multiple of 8 from 32 to {self.options.size}")


def recolour(picture: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``picture`` with each channel's mean and spread matched to ``like``'s (uint8 RGB)."""
    src, ref = picture.astype(np.float32), like.astype(np.float32)
    out = (src - src.mean((0, 1))) / (src.std((0, 1)) + 1e-3) * ref.std((0, 1)) + ref.mean((0, 1))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def teacher_set(cfg: DistillConfig) -> list[dict]:
    """The teacher's pictures for every pair, made once into ``out/teacher`` (index.json lists
    them: label map, target picture, z)."""
    folder = cfg.out / "teacher"
    index = folder / "index.json"
    if index.is_file():
        return json.loads(index.read_text())
    manifest = load_manifest(cfg.data)
    teacher = load_generator(str(cfg.teacher), backend="onnxruntime", threads=cfg.threads)
    if teacher is None or not teacher.uses_z or teacher.encoder is None:
        raise InputError(f"{cfg.teacher}: the teacher must be a VAE generator with its style encoder beside it")
    size = (cfg.options.size, cfg.options.size)
    if teacher.size != size:
        raise InputError(f"{cfg.teacher}: paints {teacher.size[0]}x{teacher.size[1]}; the student is {size[0]}")
    folder.mkdir(parents=True, exist_ok=True)
    items, styles = [], []
    with Progress("teacher pictures", len(manifest["items"]), unit="pictures") as progress:
        for i, item in enumerate(manifest["items"]):
            real, label = read_pair(cfg.data, item)
            if real.shape[:2] != size[::-1]:
                raise InputError(f"{cfg.data}: pairs are {real.shape[1]}x{real.shape[0]}; the student needs {size[0]}")
            z = teacher.encode_style(real)
            name = f"{i:05d}.png"
            Image.fromarray(recolour(teacher(label[None], z)[0], real)).save(folder / name)
            styles.append(z[0])
            np.save(folder / f"{i:05d}.npy", z[0])
            items.append({"label": str(cfg.data / item["label"]), "target": name, "z": f"{i:05d}.npy"})
            progress.update()
    teacher.close()
    styles = np.stack(styles)
    np.savez(cfg.out / "z_stats.npz", mean=styles.mean(0), std=styles.std(0))  # what seeds are drawn from
    index.write_text(json.dumps(items))
    return items


class _Batches:
    """Random batches of (label ids, z, target in [-1, 1]), flipped left-right at random and
    cropped to ``crop`` x ``crop`` at offsets on the coarsest level's 8-pixel grid (the student is
    fully convolutional with a receptive radius far under a crop: what it learns on crops holds
    on whole pictures, at a quarter of the work for 128 of 256)."""

    def __init__(self, items: list[dict], folder: Path, batch: int, seed: int, crop: int | None = None) -> None:
        self.labels = np.stack([np.asarray(Image.open(i["label"])) for i in items]).astype(np.int64)
        self.targets = np.stack([np.asarray(Image.open(folder / i["target"]).convert("RGB")) for i in items])
        self.z = np.stack([np.load(folder / i["z"]) for i in items]).astype(np.float32)
        self.batch, self.crop, self.rng = batch, crop, np.random.default_rng(seed)

    def __call__(self):
        pick = self.rng.integers(0, len(self.labels), self.batch)
        labels, targets = self.labels[pick], self.targets[pick]
        flip = self.rng.random(self.batch) < 0.5
        labels[flip], targets[flip] = labels[flip, :, ::-1], targets[flip, :, ::-1]
        if self.crop:
            side = labels.shape[1]
            top, left = (self.rng.integers(0, (side - self.crop) // 8 + 1, 2) * 8).tolist()
            labels = labels[:, top:top + self.crop, left:left + self.crop]
            targets = targets[:, top:top + self.crop, left:left + self.crop]
        x = torch.from_numpy(np.ascontiguousarray(labels))[:, None]
        y = torch.from_numpy(np.ascontiguousarray(targets)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return x, torch.from_numpy(self.z[pick]), y


def distill(cfg: DistillConfig, quiet: bool = False) -> dict:
    """Train (or resume) the student; returns {"steps", "history"} (the last losses)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    items = teacher_set(cfg)
    # the style encoder whose z the student learns from, kept with it (an export finds it there)
    encoder = cfg.teacher.with_name(f"{cfg.teacher.stem}-encoder.onnx")
    if not (cfg.out / "encoder.onnx").is_file():
        shutil.copyfile(encoder, cfg.out / "encoder.onnx")
    batches = _Batches(items, cfg.out / "teacher", cfg.batch, cfg.seed, cfg.crop)
    net = StudentGenerator(cfg.options)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.5, 0.99))
    perceptual = PerceptualLoss() if cfg.lambda_perceptual else None
    state_path, step, history = cfg.out / "train_state.pth", 0, []
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        step, history = state["step"], state["history"]
        batches.rng = np.random.default_rng(cfg.seed + step)
        log.info("distill: resumed at step %d of %d", step, cfg.steps)
    cfg.options.save(cfg.out / "student.json")
    began, done_before = time.monotonic(), step
    with Progress("distill", cfg.steps, unit="steps", enabled=not quiet, initial=step) as progress, \
            open(cfg.out / "log.jsonl", "a") as journal:
        while step < cfg.steps:
            for group in opt.param_groups:  # cosine decay to a tenth
                group["lr"] = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
            label, z, target = batches()
            fake = net(label, z)
            l1 = F.l1_loss(fake, target)
            loss = cfg.lambda_l1 * l1
            losses = {"l1": float(l1)}
            if perceptual is not None:
                p = perceptual(fake, target)
                loss = loss + cfg.lambda_perceptual * p
                losses["perceptual"] = float(p)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            progress.update()
            if step % 20 == 0 or step == cfg.steps:
                rate = (step - done_before) / max(time.monotonic() - began, 1e-9)
                record = {"step": step, **losses, "steps_per_s": rate}
                history.append(record)
                journal.write(json.dumps(record) + "\n")
                journal.flush()
            if step % cfg.save_every == 0 or step == cfg.steps:
                _save(cfg.out, net, opt, step, history)
    return {"steps": step, "history": history[-5:], "config": {k: str(v) for k, v in asdict(cfg).items()}}


def _save(out: Path, net, opt, step: int, history: list) -> None:
    """The weights (student_G.pth) and the state to resume from, each replaced whole."""
    for name, obj in (("student_G.pth", net.state_dict()),
                      ("train_state.pth", {"net": net.state_dict(), "opt": opt.state_dict(), "step": step,
                                           "history": history})):
        tmp = out / f".{name}.partial"
        torch.save(obj, tmp)
        tmp.replace(out / name)
