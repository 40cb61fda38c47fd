"""What the scenarios share: the bench config, the job (models and input loaded once), timing helpers."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segsynth.stream.infer.synth import Synthesize
from segsynth.stream.render import compose

log = logging.getLogger("segsynth")


# run only when named: chain needs the export extra (torch), service the serve extra, and the
# rest are long or load other models
NAMED_ONLY = ("service", "chain", "transcode", "tiers", "cpu-efficiency", "seg-sizes", "incremental")


SCENARIOS = ("engine", "stages", "pipeline", "fused", "passthrough", "streams", "soak", *NAMED_ONLY)


DEFAULT_SCENARIOS = tuple(s for s in SCENARIOS if s not in NAMED_ONLY)


@dataclass(frozen=True)
class BenchConfig:
    scenarios: tuple[str, ...] = SCENARIOS
    size: tuple[int, int] = (1280, 720)  # generated input (W, H)
    frames: int = 300
    batch: tuple[int, ...] = (1,)
    streams: int = 2
    repeats: int = 3
    rate: int = 30
    segmenter: str = "ade20k+voc"
    generator: str = "default"
    threads: int | None = None
    input: Path | None = None
    real_input: Path | None = None  # tiers: a clip of real footage, measured beside the main input
    workdir: Path = Path(".")
    backend: str = "auto"
    fp16: bool = True
    fused: str = "auto"  # the models as one graph (stream.chain); see ModelConfig.fused
    chain_size: tuple[int, int] = (512, 256)  # (W, H) frames for the chain scenario
    models: str = "quality"  # see ModelConfig.models
    seg_size: int | None = None  # see ModelConfig.seg_size
    live_seconds: float = 180.0  # streams: how long each policy runs against a source faster than the model


@dataclass
class Job:
    """The models and the input every scenario shares (the models are loaded once)."""

    cfg: BenchConfig
    input: Path
    models: object  # a ModelSet
    infer: object  # the infer step of one stream (a Synthesize over ``models``)
    view: str
    results: dict = field(default_factory=dict)

    def make_infer(self):
        """A fresh infer step (its own smoother, remap and z) over the shared models."""

        m = self.models
        gen = m.generator
        return Synthesize(m.segmenter, gen, m.remap(None), m.z(quiet=True), "off", m.fit(None),
                          gen.size if gen is not None else None, chains={"all": m.fused("all")})

    def render(self, result, meta):
        return compose(self.view, meta.get("display"), result.labels, result.synth, self.models.label_set,
                       meta["size"])


def median_rate(times: list[float], frames: int) -> float:
    return frames / statistics.median(times)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def timed(fn, *args, calls: int, seconds: float = 0.0) -> list[float]:
    """Seconds of each call of ``fn(*args)``: at least ``calls`` calls, and calls until ``seconds`` have passed."""
    times = []
    budget = time.perf_counter() + seconds
    while time.perf_counter() < budget or len(times) < calls:
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return times
