"""The streams of an output: the video encoder's settings per codec, and each audio track
copied where the output's format holds its codec, re-encoded otherwise."""

from __future__ import annotations

import io
import logging
from fractions import Fraction
from pathlib import Path

import av
from av.bitstream import BitStreamFilterContext

from segsynth.core.errors import InputError
from segsynth.core.formats import (
    AUDIO_ENCODERS,
    X264_PRESETS,
    ffmpeg_message,
    holds,
    output_format,
    parse_bitrate,
    pick_encoder,
)
from segsynth.stream.io.mux import rescale

log = logging.getLogger("segsynth")


class AudioTemplates:
    """Copies of the input audio streams' codec parameters, made by the thread that builds a
    sink (before any stage runs) in a scratch container of the output's format, in memory:
    ``copy[track]`` says whether that format holds the track's codec as it is (FFmpeg answers:
    avformat_query_codec, which PyAV asks when adding a stream from a template), and
    ``streams[track]`` is a template the encode thread can use without touching an input
    stream, which the decode thread is reading. ``close()`` frees the scratch container."""

    def __init__(self, path: Path, tracks, fmt: str | None = None) -> None:
        self.copy: dict[int, bool] = {}
        self.streams: dict[int, object] = {}
        fmt = fmt or output_format(path) or "matroska"
        self.scratch = av.open(io.BytesIO(), "w", format=fmt) if tracks else None
        for track in tracks:
            try:
                self.streams[track.index] = self.scratch.add_stream_from_template(track.template)
                self.copy[track.index] = True
            except (ValueError, av.FFmpegError):
                self.copy[track.index] = False

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.close()
            self.scratch = None
        self.streams = {}


class AudioOutput:
    """One output audio track, fed from the encode thread: packets copied into the output, or
    decoded frames re-encoded - AAC (Opus for WebM), resampled to the encoder's sample format,
    layout, rate and frame size, whatever the input had. ``packets(item)`` and ``flush()``
    return what to mux. ADTS AAC (MPEG-TS, HLS) goes through FFmpeg's ``aac_adtstoasc`` into
    formats that need the codec's configuration in their header (MP4, Matroska), as the ffmpeg
    CLI does; ``ready`` stays False until the first packet has given that configuration.
    Channels without an order (AVI and WAV PCM often give only a count) get FFmpeg's default
    order for their count, which MP4 needs."""

    def __init__(self, container, track, template=None) -> None:
        """``template``: the track's copy in an ``AudioTemplates`` (copied), or None (re-encoded)."""

        self.copy, self.bsf, self.resampler, self.next_pts, self.skipped = template is not None, None, None, None, 0
        if self.copy:
            self.stream = container.add_stream_from_template(template)
            if track.layout == f"{track.channels} channels":  # no channel order (AVI, WAV): MP4 wants one
                self.stream.codec_context.layout = av.AudioLayout(f"{track.channels}c")  # FFmpeg's default order
            if track.codec == "aac" and not track.has_config and container.format.name not in ("mpegts", "adts"):
                self.bsf = BitStreamFilterContext("aac_adtstoasc", template)
            self.ready = self.bsf is None
            return
        codec = next(c for c in AUDIO_ENCODERS if c in av.codecs_available and holds(container.format.name, c))
        rate = 48000 if codec in ("libopus", "mp2", "ac3") else (track.sample_rate or 48000)
        self.stream = container.add_stream(codec, rate=rate)
        # The standard layout for the channel count (AAC refuses channels without an order); more
        # than two channels: 5.1 where it is 5.1, otherwise a stereo downmix.
        self.stream.layout = {1: "mono", 6: "5.1"}.get(track.channels, "stereo")
        self.stream.codec_context.open()  # now, for its frame size
        self.ready = True

    def packets(self, item) -> list:
        if not self.copy:
            return [p for frame in item.frames or () for p in self._encode(frame)]

        try:
            out = self.bsf.filter(item.packet) if self.bsf is not None else [item.packet]
        except av.FFmpegError as exc:  # a damaged ADTS header: skip the packet, as ffmpeg does
            if not self.skipped:
                log.warning("warning: skipping damaged audio packets of stream %d (%s)", item.track,
                            ffmpeg_message(exc))
            self.skipped += 1
            return []
        for packet in out:
            if not self.ready and packet.has_sidedata("new_extradata"):
                self.stream.codec_context.extradata = bytes(packet.get_sidedata("new_extradata"))
                self.ready = True
            packet.stream = self.stream
        return out

    def _encode(self, frame) -> list:
        ctx = self.stream.codec_context
        if self.resampler is None:
            self.resampler = av.AudioResampler(format=ctx.format.name, layout=ctx.layout.name, rate=ctx.sample_rate,
                                               frame_size=ctx.frame_size or None)
        at = rescale(frame.pts, frame.time_base, Fraction(1, ctx.sample_rate)) if (
            frame.pts is not None and frame.time_base) else None
        if self.next_pts is None:  # start where the input's audio starts (the video keeps its timestamps too)
            self.next_pts = at or 0
        elif at is not None and at - self.next_pts > ctx.sample_rate // 2:
            self.next_pts = at  # a gap of over half a second (a live source reconnected) stays a gap
        return self._encode_chunks(self.resampler.resample(frame))

    def _encode_chunks(self, chunks) -> list:
        """Consecutive samples, counted from the first frame's time (gaps under half a second closed)."""
        out = []
        rate = self.stream.codec_context.sample_rate
        for chunk in chunks:
            chunk.pts, chunk.time_base = self.next_pts, Fraction(1, rate)
            self.next_pts += chunk.samples
            out += self.stream.encode(chunk)
        return out

    def flush(self) -> list:
        if self.copy:
            return []
        out = self._encode_chunks(self.resampler.resample(None)) if self.resampler is not None else []
        return out + self.stream.encode(None)


def add_video_stream(container, codec: str, info, size: tuple[int, int], *, crf: int, preset: str,
                     bitrate: str | None, b_frames: bool = True, pix_fmt: str = "yuv420p", low_latency: bool = False):
    """The output video stream: input time base (so input PTS pass through unchanged) and rate.
    ``b_frames=False`` for fragmented MP4: fragments cannot hold the negative decode times that
    B-frame reordering needs, and the muxer would shift every timestamp to make room.
    Encoders use frame threads like the ffmpeg CLI (PyAV's default, slice threads, encodes 720p
    ~20 % slower with x264) unless ``low_latency``: frame threads hold back a few frames each."""

    rate = info.rate  # a SourceInfo: the input's frame rate and timestamp base
    codec = pick_encoder(codec)
    try:
        stream = container.add_stream(codec, rate=rate)
    except (av.FFmpegError, ValueError) as exc:
        raise InputError(f"codec: {codec} is not available here ({ffmpeg_message(exc)})") from exc
    stream.width, stream.height = size
    stream.pix_fmt = pix_fmt
    stream.codec_context.thread_type = "SLICE" if low_latency else "AUTO"
    stream.time_base = stream.codec_context.time_base = info.time_base
    options = {}
    if codec.startswith("libx26"):
        options = {"preset": preset} if bitrate else {"crf": str(crf), "preset": preset}
    elif codec in ("libvpx-vp9", "libvpx"):  # their own quality scale (0-63) and speed settings
        fast = X264_PRESETS.index(preset) <= X264_PRESETS.index("faster") if preset in X264_PRESETS else True
        options = {"deadline": "realtime" if fast else "good", "cpu-used": "8" if fast else "4", "row-mt": "1"}
        if not bitrate:
            options["crf"] = str(round(crf * 63 / 51))
            stream.bit_rate = 0 if codec == "libvpx-vp9" else 8_000_000  # VP9: constant quality; VP8: a cap
    elif not bitrate:  # MPEG-4 part 2, MPEG-2 and the like: a fixed quantiser for the CRF
        stream.codec_context.qscale = True
        stream.codec_context.global_quality = 118 * max(2, round(crf / 6))  # FF_QP2LAMBDA x q (crf 20 -> q 3)
    if bitrate:
        stream.bit_rate = parse_bitrate(bitrate)
    if not b_frames:
        options["bf"] = "0"
        options["g"] = str(max(1, round(2 * float(rate))))  # a keyframe (and fragment) every 2 s
    stream.options = options
    return stream
