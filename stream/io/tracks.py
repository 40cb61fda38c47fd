"""What sources hand to sinks besides their frames: the demuxed audio (``AudioItem``), what a
sink knows of each input audio stream (``AudioTrack``) and of the source (``SourceInfo``), the
``Source`` protocol every source follows, and how a decoded frame becomes the model's input."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator, Protocol

import av
import numpy as np


@dataclass
class AudioItem:
    """One demuxed audio packet: ``packet`` to copy; ``frames``, decoded by the source where a
    sink re-encodes the track."""

    track: int  # the input stream index
    packet: object = None
    frames: list | None = None


@dataclass(frozen=True)
class AudioTrack:
    """What sinks know of an input audio stream, read when the source is opened."""

    index: int
    codec: str
    sample_rate: int
    channels: int
    layout: str  # FFmpeg's name: "stereo", "5.1", or "2 channels" when the file gives no channel order
    has_config: bool  # the codec's configuration is in the stream header (not for ADTS AAC)
    template: object  # the input stream: its codec parameters are copied for stream copies, nothing else

    @classmethod
    def of(cls, stream) -> "AudioTrack":
        ctx = stream.codec_context
        layout = ctx.layout
        return cls(stream.index, ctx.name, ctx.sample_rate or 0, layout.nb_channels if layout else 0,
                   layout.name if layout else "", bool(ctx.extradata), stream)


@dataclass(frozen=True)
class SourceInfo:
    name: str  # for messages: a path or URL
    rate: Fraction  # the video's average frame rate
    time_base: Fraction  # of the ``pts`` in each frame's meta
    audio: tuple[AudioTrack, ...] = ()
    declared_frames: int | None = None

    def released(self) -> "SourceInfo":
        """The same, holding no input stream any more (once the source is closed)."""

        return dataclasses.replace(self, audio=tuple(dataclasses.replace(t, template=None) for t in self.audio))


class Source(Protocol):
    live: bool
    info: SourceInfo
    model_size: tuple[int, int]
    need_display: bool
    decode_audio: set[int]
    problems: list[str]

    def open(self) -> "Source": ...

    def frames(self, stop, audio: Callable) -> Iterator[tuple[np.ndarray, dict]]: ...

    def close(self) -> None: ...


def model_input(frame, size: tuple[int, int], scaler, display: bool) -> tuple[np.ndarray, np.ndarray | None,
                                                                               tuple[int, int]]:
    """A decoded video frame as the models take it: upright (turned as its rotation says, as
    players and ffmpeg's autorotate do) and scaled to ``size`` (W, H) RGB by ``scaler`` (the
    reading thread's own swscale context). Returns (model RGB, the upright full-size RGB frame
    when ``display``, else None, its upright (W, H))."""
    w, h = size
    rotation = (frame.rotation // 90) % 4 if frame.rotation else 0
    if rotation:
        upright = np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), rotation))
        model_rgb = scaler.reformat(av.VideoFrame.from_ndarray(upright, format="rgb24"), w, h, "rgb24",
                                    interpolation="BILINEAR").to_ndarray()
    else:
        upright = frame.to_ndarray(format="rgb24") if display else None
        model_rgb = scaler.reformat(frame, w, h, "rgb24", interpolation="BILINEAR").to_ndarray()
    shown = (frame.width, frame.height) if rotation % 2 == 0 else (frame.height, frame.width)
    return model_rgb, upright if display else None, shown
