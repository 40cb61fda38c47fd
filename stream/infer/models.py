"""ModelSet: the segmenter and generator, loaded once and shared by every stream session of
a process (the CLI's one run, the service's many streams, a bulk worker's files). Unless
``fused="off"``, it also gives sessions the models composed into one graph (``fused()``,
see stream.chain), made on first use: one upload per batch on GPUs (on the CPU, about as
fast as the models one by one: benchmarks/RESULTS.md).

Thread-safety: the models keep no per-call state and their runners serialise calls where
the backend needs it (see segsynth.engine.runner), so any number of sessions may use one
ModelSet at once. ``close()`` releases the models; the owner calls it after the sessions
that use it have been joined.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from segsynth.core import labels
from segsynth.core.config import ModelConfig
from segsynth.core.errors import BackendError, InputError, ModelError
from segsynth.stream.infer import chain as chain_module
from segsynth.stream.infer.generator import Generator, load_generator
from segsynth.stream.infer.segmenter import load_segmenter
from segsynth.stream.io import demux

log = logging.getLogger("segsynth")


class ModelSet:
    def __init__(self, segmenter, generator: Generator | None, *, backend: str = "onnxruntime",  # the segmenter's
                 config: ModelConfig | None = None) -> None:
        self.segmenter, self.generator, self.backend = segmenter, generator, backend
        self.config = config or ModelConfig()
        # The label set sessions produce: the generator's (it paints those ids), else the segmenter's.
        self.label_set = generator.label_set if generator is not None and generator.label_set else segmenter.label_set
        self.chains: dict[str, chain_module.Chain | None] = {}  # made by fused(), on first use
        self._chain_lock = threading.Lock()

    @classmethod
    def load(cls, segmenter: str = "ade20k+voc", generator: str = "default", **options) -> "ModelSet":
        """Load each model once: ``segmenter`` (ade20k+voc, ade20k, voc or FILE.onnx) and
        ``generator`` (default, none or FILE.onnx; a checkpoint directory: segsynth.jobs.models);
        ``options`` are ModelConfig's fields."""
        return cls.from_config(ModelConfig(segmenter=segmenter, generator=generator, **options))

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "ModelSet":
        # each model takes the best backend that can serve it ("auto" falls back model by model)
        common = dict(threads=cfg.threads, backend=cfg.backend, fp16=cfg.fp16, cache_dir=cfg.cache_dir, batch=cfg.batch)
        seg = load_segmenter(cfg.segmenter, label_set=cfg.label_set, fast=cfg.fast, seg_size=cfg.seg_size, **common)
        gen = None
        try:
            gen = load_generator(cfg.generator, size=cfg.size, int8=cfg.fast, **common)
            if gen is not None and cfg.size and tuple(cfg.size) != gen.size:
                raise InputError(f"--size {cfg.size[0]}x{cfg.size[1]}: {gen.source} is exported at "
                                 f"{gen.size[0]}x{gen.size[1]}; give a checkpoint directory to re-export")
        except BaseException:
            seg.close()
            if gen is not None:
                gen.close()
            raise
        backends = dict.fromkeys(r.name for r in (*seg.runners, *(gen.runners if gen is not None else ())))
        log.log(logging.INFO if set(backends) != {"onnxruntime"} else logging.DEBUG, "backend: %s", ", ".join(backends))
        return cls(seg, gen, backend=next(iter(backends)), config=cfg)

    def fused(self, part: str = "all"):
        """The models composed into one graph (``part`` of it: see stream.chain), made on first
        use and shared by every session; None with ``fused="off"``, or (``auto``) where it
        cannot be made or run, said in one warning (the models then run one by one)."""
        if self.config.fused == "off" or (part == "synth" and self.generator is None):
            return None
        with self._chain_lock:
            if part not in self.chains:
                self.chains[part] = self._load_chain(part)
            return self.chains[part]

    def _load_chain(self, part: str):
        cfg = self.config
        try:
            chain = chain_module.load_chain(self.segmenter, self.generator, backend=self.backend, part=part,
                                            cache_dir=cfg.cache_dir,
                                            fp16=cfg.fp16, threads=cfg.threads, batch=cfg.batch)
        except (BackendError, ModelError) as exc:
            if cfg.fused == "on":
                raise
            log.warning("warning: the fused chain (%s) cannot run on %s here (%s); running the models one by one",
                        part, self.backend, exc)
            return None
        log.debug("fused chain (%s): %s", part, chain.source)
        return chain

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the frames the segmenter takes."""
        return self.segmenter.size

    def view(self, requested: str | None, *, style=None, seed: int | None = None) -> str:
        """The view a session shows: ``requested``, or synth with a generator and labels
        without; InputError for views (and z options) that need a generator when there is none."""
        if self.generator is not None:
            return requested or "synth"
        if requested in ("synth", "grid") or style is not None or seed is not None:
            why = "--generator none" if self.config.generator == "none" else "no bundled default"
            raise InputError(f"no generator is available ({why}); pass --generator DIR|FILE.onnx or use "
                             "--view labels|overlay|side-by-side")
        if requested is None and self.config.generator != "none":
            log.warning("notice: no default generator is available; showing --view labels (pass --generator "
                        "DIR|FILE.onnx to synthesize)")
        return requested or "labels"

    def remap(self, rules: str | None) -> labels.RemapTable:
        """Rules compiled for these models: segmenter ids in, generator ids out."""
        table = labels.RemapTable(rules, self.segmenter.label_set, self.label_set)
        for note in table.notes:
            log.warning("notice: remap: %s", note)
        if table:
            log.info("remap: %s", table.describe())
        return table

    def z(self, *, style: Path | None = None, seed: int | None = None, quiet: bool = False) -> np.ndarray | None:
        """The style vector for VAE generators: encoded from ``style``, else drawn from ``seed``
        (one z for the whole video, so the style does not flicker); None for the others."""
        gen = self.generator
        if gen is None or not gen.uses_z:
            if style is not None:
                raise InputError("--style needs a VAE generator (use_vae) with a style encoder")
            if seed is not None and not quiet:
                log.warning("notice: --seed has no effect: this generator is deterministic (no z input)")
            return None
        if style is not None:
            return gen.encode_style(style if isinstance(style, np.ndarray) else demux.read_image(style))
        return gen.seeded_z(seed or 0)

    def fit(self, requested: str | None) -> str:
        return requested or (self.generator.fit if self.generator is not None else "stretch")

    def close(self) -> None:
        self.segmenter.close()
        for model in (self.generator, *self.chains.values()):
            if model is not None:
                model.close()
        self.chains = {}

    def __enter__(self) -> "ModelSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
