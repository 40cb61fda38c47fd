"""Where segsynth keeps what it makes and what it ships: the cache folder (exported and
re-shaped graphs, fused chains, FP16 graphs, TensorRT engines) and the bundled models."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def cache_dir(given: str | Path | None = None) -> Path:
    """``given``, else $SEGSYNTH_HOME, else $XDG_CACHE_HOME/segsynth, else ~/.cache/segsynth. Read
    where a config is built (the edge); everything below gets the folder from its config."""
    if given:
        return Path(given)
    if os.environ.get("SEGSYNTH_HOME"):
        return Path(os.environ["SEGSYNTH_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segsynth"


def bundled(name: str) -> Path:
    """A file shipped in the package's models folder (it may be absent in a slimmed install)."""
    return Path(str(resources.files("segsynth.models").joinpath(name)))


# The bundled generators by name: graph, and the style encoder that makes its z. "default": the
# CPU-first student (segsynth.export.student), distilled from "spade2", the SPADE VAE generator
# that was the default before it; both take the same encoder's z. A graph's int8 twin is
# NAME.int8.onnx beside it (--models fast).
BUNDLED_GENERATORS = {"default": ("student_ade20k.onnx", "spade_ade20k-encoder.onnx"),
                      "spade2": ("spade_ade20k.onnx", "spade_ade20k-encoder.onnx")}
