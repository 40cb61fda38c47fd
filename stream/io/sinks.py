"""Sinks: where a session's pictures go. Owned by the encode thread.

A sink gets ``write(picture, meta)`` for each video frame (H x W x 3 RGB, or H x W ids for the
ids view, with the frame's ``pts``/``time_base`` in ``meta``), ``write_audio(item)`` for the
audio in between, and ``close()`` once at the end. The first picture fixes the output size;
later pictures of another size (a view change, a resolution change mid-stream) are fitted
into it. ``decoded_audio`` names the audio tracks a sink needs decoded (to re-encode them):
the source decodes those, every other track arrives as packets to copy.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import av
import numpy as np
from av.video.frame import PictureType

from segsynth.core import formats
from segsynth.core.errors import OutputError
from segsynth.stream.io import mux, streams
from segsynth.stream.io.live import Backoff
from segsynth.stream.io.tracks import AudioItem, SourceInfo
from segsynth.stream.render import fit_picture

log = logging.getLogger("segsynth")


@dataclass(frozen=True)
class Encoding:
    """Video encoder settings of a sink (validated in StreamConfig)."""

    codec: str = "libx264"
    crf: int = 20
    preset: str = "veryfast"
    bitrate: str | None = None
    low_latency: bool = False  # slice threads: no frames held back by frame threading
    gray: bool = False  # ids: lossless FFV1 grayscale


class Sink(Protocol):
    decoded_audio: set[int]

    def write(self, picture: np.ndarray, meta: dict) -> None: ...

    def write_audio(self, item: AudioItem) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """A video file. Opened at the first picture (so bad input leaves no file); written as
    fragmented MP4 / Matroska under its final name, so a killed run leaves a playable file,
    or (``atomic``) under a temporary name that ``commit()`` renames once the run is complete.
    ``discard()`` removes what a failed run wrote. Audio tracks are copied where the output
    format holds their codec (FFmpeg is asked), and re-encoded otherwise."""

    def __init__(self, path: str | Path, info: SourceInfo, encoding: Encoding = Encoding(), *,
                 atomic: bool = False, tag: str = "", fmt: str | None = None) -> None:
        self.path, self.info, self.encoding, self.atomic = Path(path), info, encoding, atomic
        self.name = str(path)  # for messages (a URL stays a URL)
        unique = f"{os.getpid()}{'-' + tag if tag else ''}"  # two runs writing one name never share a temporary file
        self.target = self.path.parent / f".{self.path.stem}.partial-{unique}{self.path.suffix}" if atomic else self.path
        self.writer = self.container = self.vstream = None
        self.out_size: tuple[int, int] | None = None
        self.templates = streams.AudioTemplates(self.path, info.audio, fmt)  # read now, before any stage runs
        self.decoded_audio = {track for track, copy in self.templates.copy.items() if not copy}
        self.audio: dict[int, streams.AudioOutput] = {}
        self.last_pts: int | None = None
        self.shift = 0  # added to input timestamps after they jumped back
        self.held: list = []  # packets muxed before every track knows its codec configuration
        self.keyframe_every: float | None = None  # seconds: keyframes by time (live outputs), not by frame count
        self._next_key: float | None = None

    def _make_writer(self):
        """The container to write, and whether its video may use B-frames."""
        fragmented = not self.atomic
        fragmented_mp4 = fragmented and self.path.suffix.lower() in (".mp4", ".m4v", ".mov")
        return mux.MediaWriter(self.target, fragmented=fragmented), not fragmented_mp4

    def _open(self, size: tuple[int, int]) -> None:
        enc = self.encoding
        w, h = size
        self.out_size = (w + w % 2, h + h % 2)  # 4:2:0 needs even sizes: pad the last row/column
        self.writer, b_frames = self._make_writer()
        self.container = self.writer.container
        self.vstream = streams.add_video_stream(
            self.container, "ffv1" if enc.gray else enc.codec, self.info, self.out_size, crf=enc.crf,
            preset=enc.preset, bitrate=enc.bitrate, b_frames=b_frames, low_latency=enc.low_latency,
            pix_fmt="gray" if enc.gray else "yuv420p")
        for track in self.info.audio:
            self.audio[track.index] = streams.AudioOutput(self.container, track, self.templates.streams.get(track.index))
        self._templates_used()

    def _templates_used(self) -> None:
        self.templates.close()

    HOLD_LIMIT = 1024  # packets (ffmpeg's muxing queue gives up at about the same point) ...
    HOLD_BYTES = 64 << 20  # ... or bytes

    def _mux(self, packets: list) -> None:
        """Mux, or hold the packets while a copied track still waits for its first packet (the
        header, written with the first mux, needs its configuration)."""
        if self.held or not all(out.ready for out in self.audio.values()):
            self.held += packets
            if not all(out.ready for out in self.audio.values()):
                if len(self.held) > self.HOLD_LIMIT or sum(p.size for p in self.held) > self.HOLD_BYTES:
                    waiting = [i for i, out in self.audio.items() if not out.ready]
                    raise OutputError(f"writing {self.name}: audio stream {waiting[0]} of {self.info.name} sent no "
                                      f"packet in the first {self.HOLD_LIMIT} packets; its codec configuration is "
                                      "unknown")
                return
            packets, self.held = self.held, []
        if packets:
            self.writer.mux(packets)

    def write(self, picture: np.ndarray, meta: dict) -> None:
        if self.container is None:
            self._open(picture.shape[1::-1])
        picture = fit_picture(picture, self.out_size)
        frame = av.VideoFrame.from_ndarray(picture, format="gray" if picture.ndim == 2 else "rgb24")
        tb = self.vstream.codec_context.time_base  # the encoder's (the muxer may pick another for the stream)
        pts = mux.rescale(meta["pts"], meta["time_base"], tb) + self.shift
        if self.last_pts is not None and pts <= self.last_pts:
            # Encoder and muxer need strictly increasing timestamps. A repeat moves on by one
            # tick; a jump back (a timestamp reset, concatenated streams) moves this frame and
            # every later one to one frame after the last, so the timeline goes on from there.
            step = 1 if pts == self.last_pts else max(1, round(1 / (self.info.rate * tb)))
            self.shift += self.last_pts + step - pts
            pts = self.last_pts + step
        frame.pts, frame.time_base, self.last_pts = pts, tb, pts
        if self.keyframe_every:  # dropped frames must not stretch the keyframe interval
            seconds = float(pts * tb)
            if self._next_key is None or seconds >= self._next_key:
                frame.pict_type = PictureType.I
                self._next_key = seconds + self.keyframe_every
        self._mux(self.vstream.encode(frame))

    def write_audio(self, item: AudioItem) -> None:
        if self.container is not None:  # audio before the first picture is muxed after it: see Pipeline
            self._mux(self.audio[item.track].packets(item))

    def close(self) -> None:
        self.templates.close()
        if self.container is None:
            return
        try:
            if not self.writer.broken:  # flush the encoders, unless FFmpeg refused the output already
                self._mux(self.vstream.encode(None))
                for out in self.audio.values():
                    self._mux(out.flush())
                if self.held:
                    self.writer.mux(self.held)  # a track that never sent a packet: as far as it goes
        finally:
            self.writer.close()
            self._release()

    def _release(self) -> None:
        """Drop every PyAV object: the encoders (and their threads) go now, not at garbage collection."""
        self.container = self.vstream = None
        self.audio, self.held = {}, []
        self.info = self.info.released()

    def commit(self) -> None:
        """After ``close`` of a run that finished: an atomic output takes its final name."""
        if self.atomic and self.writer is not None:
            try:
                self.target.replace(self.path)
            except OSError as exc:
                raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def discard(self) -> None:
        """Remove the output of a failed run, or an atomic output of an aborted one (after ``close``)."""
        if self.writer is not None:
            if self.container is not None:
                try:
                    self.writer.close()
                except Exception:  # noqa: BLE001 - the run failed already; the file goes anyway
                    pass
                self._release()
            self.target.unlink(missing_ok=True)


PUSH_FORMATS = {"rtsp": "rtsp", "rtsps": "rtsp", "rtmp": "flv", "rtmps": "flv", "srt": "mpegts"}
_QUERY_FORMATS = {"rtsp": "mpegts", "hls": "mpegts"}  # muxers FFmpeg cannot ask about codecs: what they carry


class StreamingSink(FileSink):
    """An output FFmpeg writes itself (``fmt``, ``options``): RTSP/RTMP/SRT push to a server,
    an HLS playlist with its segments, or a file series cut every few seconds (``segment``).
    Encoded for live viewing: no B-frames and a keyframe every 2 s, so a player can join at any
    segment. A push that fails (the server went away) is reopened with backoff, frames in
    between skipped, at most ``retries`` times in a row (None: forever); then the failure is
    raised (a TeeSink drops this sink and the others go on)."""

    def __init__(self, url: str, info: SourceInfo, encoding: Encoding, *, fmt: str, options: dict,
                 retries: int | None = 0, timeout: float = 5.0, query_format: str | None = None) -> None:
        super().__init__(url, info, encoding, fmt=query_format or _QUERY_FORMATS.get(fmt, fmt))
        self.url, self.fmt, self.options, self.retries, self.timeout = url, fmt, options, retries, timeout
        self.failures = self.reconnects = self.skipped = 0
        self.keyframe_every = 2.0
        self.retry_at: float | None = None

        self.backoff = Backoff()

    def _make_writer(self):
        return mux.URLWriter(self.url, self.fmt, dict(self.options), self.timeout), False

    def _templates_used(self) -> None:
        pass  # kept for a reopen; closed with the sink

    def _guard(self, call) -> None:
        if self.retry_at is not None and time.monotonic() < self.retry_at:
            self.skipped += 1
            return
        self.retry_at = None
        try:
            call()
        except (OutputError, av.FFmpegError, OSError) as exc:
            self._drop_connection()
            self.failures += 1
            if self.retries is not None and self.failures > self.retries:
                raise OutputError(f"{self.url}: {formats.ffmpeg_message(exc)}" +
                                  (f" (after {self.failures - 1} retries)" if self.failures > 1 else "")) from exc
            delay = self.backoff.next()
            self.retry_at = time.monotonic() + delay
            log.warning("output %s failed (%s); retrying in %.1f s", self.url, formats.ffmpeg_message(exc), delay)
            return
        if self.failures and self.writer is not None and self.writer.muxed:  # data went through again
            self.reconnects += 1
            self.failures = 0
            self.backoff.reset()
            log.warning("output %s: reconnected", self.url)

    def _drop_connection(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001 - the connection is gone already
                pass
        self.writer = self.container = self.vstream = None
        self.audio, self.held, self._next_key = {}, [], None

    def _release(self) -> None:
        info = self.info
        super()._release()
        self.info = info  # kept: a push is reopened from it

    def write(self, picture: np.ndarray, meta: dict) -> None:
        self._guard(lambda: FileSink.write(self, picture, meta))

    def write_audio(self, item: AudioItem) -> None:
        if self.container is not None:
            self._guard(lambda: FileSink.write_audio(self, item))

    def close(self) -> None:
        try:
            super().close()
        except (av.FFmpegError, OSError) as exc:
            raise OutputError(f"{self.url}: {formats.ffmpeg_message(exc)}") from exc
        finally:
            self.templates.close()

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        pass  # a stream that was sent is not taken back


def hls_sink(path: str, info: SourceInfo, encoding: Encoding, segment_seconds: float = 2.0,
             keep: int = 6) -> StreamingSink:
    """An HLS playlist and its MPEG-TS segments next to it; segments that fell out of the playlist are deleted."""
    playlist = Path(path)
    options = {"hls_time": f"{segment_seconds:g}", "hls_list_size": str(keep),
               "hls_flags": "delete_segments+independent_segments+temp_file",
               "hls_segment_filename": str(playlist.resolve().with_name(f"{playlist.stem}_%05d.ts"))}
    # absolute: FFmpeg never reads "proto:name" in a path starting with "/" as a protocol
    sink = StreamingSink(str(playlist.resolve()), info, encoding, fmt="hls", options=options)
    sink.name = str(path)
    return sink


def segment_sink(path: str, info: SourceInfo, encoding: Encoding, seconds: float) -> StreamingSink:
    """Files of ``seconds`` each (cut at the next keyframe): ``out-00000.mp4``, ``out-00001.mp4``,
    ... or the names of a pattern with ``%d`` in it. Each is a fragmented MP4 or a Matroska file,
    playable while it is written, starting at time 0 (as recorders such as Frigate write them)."""
    p = Path(path)
    pattern = str(p) if re.search(r"%0?\d*d", p.name) else str(p.with_name(f"{p.stem}-%05d{p.suffix}"))
    fmt = formats.output_format(p) or "matroska"
    options = {"segment_time": f"{seconds:g}", "segment_format": fmt, "reset_timestamps": "1"}
    if fmt in ("mp4", "mov"):
        options["segment_format_options"] = "movflags=frag_keyframe+empty_moov+default_base_moof"
    sink = StreamingSink(str(Path(pattern).resolve()), info, encoding, fmt="segment", options=options,
                         query_format=fmt)
    sink.name = str(path)
    return sink


class MemorySink:
    """Encodes to MPEG-TS in memory, the way a live output would (no disk), keeping only the
    last ``keep`` bytes: memory stays bounded however long the stream runs. ``bytes_out`` and
    ``frames`` count everything written."""

    decoded_audio: set[int] = set()

    def __init__(self, rate: float = 25, keep: int = 1 << 20) -> None:
        self.rate, self.keep = rate, keep
        self.tail = bytearray()
        self.bytes_out = self.frames = 0
        self.container = self.stream = None
        self.broken = False

    def _append(self, data: bytes) -> int:
        self.bytes_out += len(data)
        self.tail += data
        del self.tail[: max(0, len(self.tail) - self.keep)]
        return len(data)

    def write(self, picture: np.ndarray, meta: dict) -> None:
        if self.stream is None:
            self.container = av.open(_Tail(self._append), "w", format="mpegts")
            h, w = picture.shape[:2]
            self.stream = self.container.add_stream("libx264", rate=round(self.rate))
            self.stream.width, self.stream.height = w + w % 2, h + h % 2
            self.stream.pix_fmt, self.stream.options = "yuv420p", {"preset": "ultrafast", "tune": "zerolatency"}
        picture = fit_picture(picture if picture.ndim == 3 else np.repeat(picture[..., None], 3, -1),
                              (self.stream.width, self.stream.height))
        frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
        frame.pts = self.frames
        packets = self.stream.encode(frame)
        self.broken = True  # until the mux returns: a refused packet leaves the muxer unusable
        self.container.mux(packets)
        self.broken = False
        self.frames += 1

    def write_audio(self, item: AudioItem) -> None:
        pass  # video only

    def close(self) -> None:
        try:
            if self.stream is not None and not self.broken:
                self.container.mux(self.stream.encode(None))
        finally:
            if self.container is not None:
                self.container.close()
            self.container = self.stream = None


class _Tail(io.RawIOBase):
    """A write-only file object handing every write to ``append``."""

    def __init__(self, append) -> None:
        super().__init__()
        self._append = append

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._append(bytes(data))


class TeeSink:
    """One result written to several sinks. A sink that fails is closed and dropped with a
    message, and the others go on; when every sink has failed, the first error is raised."""

    def __init__(self, sinks: list) -> None:
        self.sinks, self.failed = list(sinks), []
        self.decoded_audio = set().union(*(s.decoded_audio for s in self.sinks))

    def _guarded(self, sink, call) -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - one sink's failure must not stop the rest
            log.warning("output %s failed and is dropped: %s", getattr(sink, "name", sink), exc)
            self.sinks.remove(sink)
            self.failed.append((sink, exc))
            try:
                sink.close()
            except Exception:  # noqa: BLE001
                pass
            if not self.sinks:
                raise self.failed[0][1] from None

    def write(self, picture: np.ndarray, meta: dict) -> None:
        for sink in list(self.sinks):
            self._guarded(sink, lambda: sink.write(picture, meta))

    def write_audio(self, item: AudioItem) -> None:
        copiers = [s for s in self.sinks if item.track not in s.decoded_audio]
        for sink in list(self.sinks):
            mine = item  # muxing consumes a packet: every copying sink but the last gets its own copy
            if sink in copiers and sink is not copiers[-1]:
                mine = AudioItem(item.track, mux.copy_packet(item.packet), item.frames)
            self._guarded(sink, lambda: sink.write_audio(mine))

    def close(self) -> None:
        for sink in list(self.sinks):
            self._guarded(sink, sink.close)  # a sink failing to close is dropped like one failing to write
