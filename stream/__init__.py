"""segsynth.stream: sources, the threaded pipeline, sinks and the stream sessions built on them.

    from segsynth.stream import ModelSet, StreamConfig, StreamSession

Names are imported on first use, so ``import segsynth.stream`` stays light (and never
imports torch, TensorRT or CUDA).
"""

from __future__ import annotations

import importlib

from segsynth.core import config

_EXPORTS = {
    "ModelSet": "models", "StreamSession": "session", "Pipeline": "pipeline",
    "FileSource": "sources", "SyntheticSource": "sources", "Source": "sources", "SourceInfo": "sources",
    "FileSink": "sinks", "MemorySink": "sinks", "TeeSink": "sinks", "Sink": "sinks", "Encoding": "sinks",
    "Synthesize": "synth", "FrameResult": "synth",
}
__all__ = ["ModelConfig", "StreamConfig", *_EXPORTS]


def __getattr__(name: str):
    if name in ("StreamConfig", "ModelConfig"):

        return getattr(config, name)
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
