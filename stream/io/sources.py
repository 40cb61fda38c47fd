"""Sources: where a session's frames come from.

A source is opened (and checked) by the thread that starts the session, read by the decode
thread, and closed once every stage is done (by the pipeline's encode thread, last). It
yields ``(model_rgb, meta)``: the frame scaled to the segmenter's size, and ``meta`` with
``index``, ``pts``/``time_base`` (output timestamps), ``size`` (the upright frame size) and
``display`` (the full-size RGB frame, only while ``need_display`` is set). Audio packets go
to the ``audio`` callback as ``AudioItem``s, untouched, and decoded as well for the tracks in
``decode_audio`` (those a sink re-encodes). After ``open()``, ``info`` says what the sinks
need to know.
"""

from __future__ import annotations

import time
from fractions import Fraction
from typing import Callable, Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from segsynth.core.errors import InputError
from segsynth.core.grammar import LiveOptions, is_image_sequence, is_live
from segsynth.stream.io import demux
from segsynth.stream.io.live import LiveSource
from segsynth.stream.io.tracks import AudioItem, AudioTrack, Source, SourceInfo, model_input
from segsynth.stream.pictures import resize_rgb


class FileSource:
    """A media file, or an image sequence (a folder, glob or image2 pattern, at ``fps``). Every
    input PyAV object is used by the decode thread only: it demuxes,
    decodes the video (and the audio a sink re-encodes) and hands over self-contained packets
    and frames. What sinks need of the audio streams is read at ``open()`` (``AudioTrack``);
    they copy a stream's codec parameters, never touch its decoder."""

    live = False

    def __init__(self, path, *, stream: int | None = None, fps: float | None = None, root=None) -> None:
        self.path, self.stream_index, self.fps, self.root = path, stream, fps, root  # root: see demux.open_video
        self.container = self.video = None
        self.model_size, self.need_display = (513, 513), False
        self.decode_audio: set[int] = set()
        self.problems: list[str] = []
        self.last_time = 0.0

    def open(self) -> "FileSource":
        sequence = is_image_sequence(str(self.path))
        self.container = (demux.open_image_sequence(self.path, self.fps, self.root) if sequence
                          else demux.open_video(self.path, self.root))
        streams = self.container.streams
        if self.stream_index is not None:
            match = [s for s in streams if s.index == self.stream_index]
            if not match or match[0].type != "video":
                kinds = ", ".join(f"{s.index}:{s.type}" for s in streams)
                self.close()
                raise InputError(f"--stream {self.stream_index}: not a video stream of {self.path} (streams: {kinds})")
            self.video = match[0]
        else:
            self.video = streams.video[0]
        self.video.thread_type = "AUTO"
        v = self.video
        self.info = SourceInfo(str(self.path), Fraction(v.average_rate or v.guessed_rate or 25), v.time_base,
                               tuple(AudioTrack.of(a) for a in streams.audio), v.frames or None)
        return self

    def frames(self, stop, audio: Callable) -> Iterator[tuple[np.ndarray, dict]]:
        scaler = VideoReformatter()  # this thread's own swscale context
        index, best_effort, last = 0, demux.BestEffortTimestamps(), None
        audio_streams = [track.template for track in self.info.audio]
        for item in demux.demux_decode(self.container, self.video, audio_streams, self.problems):
            if stop.is_set():
                return
            if isinstance(item, av.Packet):
                track = item.stream.index
                audio(AudioItem(track, item, demux.decode_audio(item, self.problems) if track in self.decode_audio
                                else None))
                continue
            model_rgb, display, shown = model_input(item, self.model_size, scaler, self.need_display)
            tb = item.time_base or self.info.time_base
            pts = best_effort(item.pts, item.dts)
            if pts is None:  # no timestamps at all: one frame on from the last, at the stream's rate
                pts = 0 if last is None else last + max(1, round(1 / (self.info.rate * tb)))
            yield model_rgb, {"index": index, "pts": pts, "time_base": tb, "size": shown, "display": display}
            index, last = index + 1, pts
            self.last_time = float(pts * tb)
        self._check_complete(index)

    def _check_complete(self, frames: int) -> None:
        """Demuxers may stop at damage without an error: compare with what the file declares."""
        stream = self.video
        duration = float(stream.duration * stream.time_base) if stream.duration else (
            self.container.duration / 1e6 if self.container.duration else None)
        rate = float(self.info.rate)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        if duration and frames and self.last_time < start + duration - 3 / rate and not self.problems:
            self.problems.append(f"the video stopped at {self.last_time:.2f} s of the {duration:.2f} s it declares")

    def close(self) -> None:
        demux.release(self)


class SyntheticSource:
    """Frames from memory: ``pictures`` (full-size RGB) repeated until ``count`` frames, released
    at ``rate`` fps of wall time (a real-time camera: ``live``; each frame's ``arrival`` is when
    it was due, so a reader that falls behind sees the latency grow) or as fast as they are taken
    (``rate=None``). Timestamps count frames at ``rate`` (25 when unpaced). For benchmarks and
    tests of long runs: a million frames cost no disk."""

    def __init__(self, pictures: list[np.ndarray], count: int, rate: float | None = None) -> None:
        if not pictures:
            raise InputError("a synthetic source needs at least one picture")
        self.pictures, self.count, self.rate = pictures, count, rate
        self.live = rate is not None
        self.info = SourceInfo("synthetic", Fraction(rate or 25).limit_denominator(1001),
                               1 / Fraction(rate or 25).limit_denominator(1001), (), count)
        self.model_size, self.need_display = (513, 513), False
        self.decode_audio: set[int] = set()
        self.problems: list[str] = []
        self._scaled: dict[int, np.ndarray] = {}

    def open(self) -> "SyntheticSource":
        return self

    def frames(self, stop, audio: Callable) -> Iterator[tuple[np.ndarray, dict]]:
        start = time.perf_counter()
        for i in range(self.count):
            if stop.is_set():
                return
            if self.rate:
                delay = start + i / self.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            k = i % len(self.pictures)
            picture = self.pictures[k]
            if k not in self._scaled or self._scaled[k].shape[1::-1] != tuple(self.model_size):
                self._scaled[k] = resize_rgb(picture, *self.model_size)
            h, w = picture.shape[:2]
            meta = {"index": i, "pts": i, "time_base": self.info.time_base, "size": (w, h),
                    "display": picture if self.need_display else None}
            if self.rate:  # a camera: the frame arrived when it was due, however late it is read
                meta["arrival"] = start + i / self.rate
            yield self._scaled[k], meta

    def close(self) -> None:
        self._scaled.clear()


def open_source(cfg) -> Source:
    """The source a StreamConfig names, opened: a live stream (network, camera, lavfi graph),
    or a media file or image sequence."""

    if is_live(cfg.source):
        options = LiveOptions(cfg.rtsp_transport, cfg.stall_timeout, reconnect_max=cfg.reconnect_max,
                              camera_size=cfg.camera_size, camera_fps=cfg.camera_fps)
        return LiveSource(cfg.source, options, stream=cfg.stream).open()
    return FileSource(cfg.source, stream=cfg.stream, fps=cfg.fps, root=cfg.media_root).open()
