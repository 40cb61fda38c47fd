"""Benchmark scenarios. Each returns a dict with its measurements; ratios are computed from
measurements taken in the same run, with warm-up first and medians over repeats."""

from __future__ import annotations

from segsynth.benchmarks.scenarios.common import DEFAULT_SCENARIOS, NAMED_ONLY, SCENARIOS, BenchConfig, Job
from segsynth.benchmarks.scenarios.incremental import incremental
from segsynth.benchmarks.scenarios.live import service, soak, streams, transcode
from segsynth.benchmarks.scenarios.media import passthrough, pipeline, stages
from segsynth.benchmarks.scenarios.models import chain, cpu_efficiency, engine, fused, seg_sizes, tiers

RUN = {"engine": engine, "stages": stages, "pipeline": pipeline, "fused": fused, "passthrough": passthrough,
       "streams": streams, "soak": soak, "service": service, "chain": chain, "transcode": transcode, "tiers": tiers,
       "cpu-efficiency": cpu_efficiency, "seg-sizes": seg_sizes, "incremental": incremental}  # each scenario's function, by name
__all__ = ["BenchConfig", "DEFAULT_SCENARIOS", "Job", "NAMED_ONLY", "RUN", "SCENARIOS", "chain"]
