"""Loading the models a command names: ``load_models(ModelConfig)``. Names of installed models
(``segsynth models``, segsynth.jobs.registry) become their graphs; what the stream library's
ModelSet takes - bundled names and ONNX graphs - it loads directly; an official SPADE
checkpoint directory (or a student's, segsynth.export.student) is exported to ONNX first, once, into the cache (keyed by its files'
bytes and the size), which needs the export extra (torch)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from segsynth.core.config import ExportConfig, ModelConfig
from segsynth.core.errors import ModelError
from segsynth.core.paths import BUNDLED_GENERATORS
from segsynth.engine.cache import CachedFile, content_key
from segsynth.jobs.registry import Registry
from segsynth.stream.infer.models import ModelSet

log = logging.getLogger("segsynth")
EXPORT_VERSION = "export-v2"  # v2: dynamic batch, encoder at the checkpoint size


def named(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with model names (segsynth models) replaced by what they name."""
    registry = Registry(cfg.cache_dir)
    return dataclasses.replace(cfg, segmenter=registry.resolve(cfg.segmenter, "segmenter"),
                               generator=registry.resolve(cfg.generator, "generator", cfg.size))


def load_models(cfg: ModelConfig) -> ModelSet:
    """The ModelSet of ``cfg``: names resolved, a checkpoint directory as its generator exported first."""
    cfg = named(cfg)
    generator = Path(cfg.generator)
    if cfg.generator not in (*BUNDLED_GENERATORS, "none") and generator.is_dir():
        cfg = dataclasses.replace(cfg, generator=str(exported_generator(generator, cfg.size, cfg.cache_dir)))
    return ModelSet.from_config(cfg)


def exported_generator(directory: Path, size: tuple[int, int] | None, cache_dir: Path) -> Path:
    """``directory`` (an official SPADE checkpoint, or a student's: student.json) as ONNX in
    ``cache_dir``: the generator, and its style encoder beside it (``NAME-encoder.onnx``) where
    it has one (a student's: the teacher's encoder its training copied, ``encoder.onnx``)."""
    try:  # imported here: the export stage needs torch, an optional extra
        from segsynth.jobs.export import run_export
    except ImportError as exc:
        raise ModelError(f"--generator {directory}: using a checkpoint directory needs the export extra "
                         "(pip install 'segsynth[export]'), or export it first with segsynth export spade") from exc
    if (directory / "student.json").is_file():
        files = [directory / n for n in ("student.json", "student_G.pth", "z_stats.npz", "encoder.onnx")]
        out = cache_dir / f"student-{content_key(EXPORT_VERSION, *(f for f in files if f.is_file()))}.onnx"
        if not out.is_file():
            log.info("exporting %s to ONNX (once; cached in %s)", directory, cache_dir)
        if (directory / "encoder.onnx").is_file():
            CachedFile(out.with_name(f"{out.stem}-encoder.onnx"))(
                lambda tmp: shutil.copyfile(directory / "encoder.onnx", tmp))
        return CachedFile(out)(lambda tmp: run_export(ExportConfig(what="student", out=tmp, checkpoint=directory)))
    files = [directory / n for n in ("opt.txt", "latest_net_G.pth", "latest_net_E.pth") if (directory / n).is_file()]
    key = content_key(f"{size} {EXPORT_VERSION}", *files)
    hw = (size[1], size[0]) if size else None
    out = cache_dir / f"spade-{key}.onnx"
    if not out.is_file():
        log.info("exporting %s to ONNX (once; cached in %s)", directory, cache_dir)
    if (directory / "latest_net_E.pth").is_file():  # first: a generator is loaded with what is beside it
        CachedFile(out.with_name(f"{out.stem}-encoder.onnx"))(
            lambda tmp: run_export(ExportConfig(what="encoder", out=tmp, checkpoint=directory)))
    return CachedFile(out)(lambda tmp: run_export(ExportConfig(what="spade", out=tmp, checkpoint=directory, size=hw)))
