"""segsynth.stream, the streaming library: sources, sinks and media I/O (``stream.io``), the
models (``stream.infer``) and the runtime that joins them - the threaded pipeline, the frame
ring, stream sessions, rendering.

    from segsynth.stream import ModelSet, StreamConfig, StreamSession

Importing it never imports torch, TensorRT or CUDA (tests/test_cli.py checks).
"""

from __future__ import annotations

from segsynth.core.config import ModelConfig, StreamConfig
from segsynth.stream.infer.models import ModelSet
from segsynth.stream.infer.synth import FrameResult, Synthesize
from segsynth.stream.io.sinks import Encoding, FileSink, MemorySink, Sink, TeeSink
from segsynth.stream.io.sources import FileSource, SyntheticSource
from segsynth.stream.io.tracks import Source, SourceInfo
from segsynth.stream.pipeline import Pipeline
from segsynth.stream.session import StreamSession, StreamStats

__all__ = ["Encoding", "FileSink", "FileSource", "FrameResult", "MemorySink", "ModelConfig", "ModelSet", "Pipeline",
           "Sink", "Source", "SourceInfo", "StreamConfig", "StreamSession", "StreamStats", "Synthesize",
           "SyntheticSource", "TeeSink"]
