"""Live sources: network streams (RTSP, RTMP, SRT, HTTP/HLS), webcams and lavfi test graphs.

A live source reads until it is stopped. When the stream drops, stalls (nothing for
``stall_timeout`` seconds) or fails to reopen, it reconnects with exponential backoff and
jitter, at most ``reconnect_max`` times in a row (None: forever), and rebases timestamps so
the output timeline goes on strictly increasing across the gap (the gap itself is kept: a
frame after it is as far from the last one before as the wall clock says). Every network
source is opened with FFmpeg open/read timeouts; RTSP, RTMP and SRT with an explicit
``protocol_whitelist``, HTTP(S) through an ``HttpGate`` (stream.gate): every URL FFmpeg
opens for it - an HLS playlist's variants, segments, reloads, redirects - is checked and
fetched by the gate, on the host and port the source names.
"""

from __future__ import annotations

import logging
import random
import time
from fractions import Fraction
from typing import Callable, Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from segsynth.core import formats
from segsynth.core.errors import InputError, SourceError
from segsynth.core.grammar import LiveOptions, target
from segsynth.stream.io import demux
from segsynth.stream.io.gate import HttpGate, Refused
from segsynth.stream.io.tracks import AudioItem, AudioTrack, SourceInfo, model_input

log = logging.getLogger("segsynth")
TIME_BASE = Fraction(1, 90000)  # of live output timestamps (RTP's video clock)
JUMP = 1.0  # seconds a real-time stream's timestamps may run off the wall clock before they are re-anchored


class Lost(Exception):
    """The live stream dropped or stalled: reconnect."""


class Backoff:
    """Exponential backoff with jitter: ``initial * 2**k`` up to ``cap`` seconds, each delay
    drawn between half and all of it (so many clients of one camera do not retry in step)."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self.initial, self.cap, self.failures = initial, cap, 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        delay = min(self.cap, self.initial * 2 ** min(self.failures, 32))
        self.failures += 1
        return delay * self.rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.failures = 0


class _Timeline:
    """Source seconds -> output seconds, for one stream of one connection, checked against the
    wall clock. Frames may arrive in a burst (a server sends its buffered GOP on connect):
    timestamps running ahead of the clock pull the clock along. A step far ahead of the clock
    (more than JUMP: RTSP's first RTCP report re-synchronising the timestamps, a camera
    rebooting its clock) is a jump, not time that passed: the stream goes on from the clock
    (never before its last frame). A jump back goes on one frame after the last."""

    def __init__(self, offset: float, start: float, wall: float, clocked: bool, step: float) -> None:
        self.offset, self.start, self.wall, self.clocked, self.step = offset, start, wall, clocked, step
        self.last: float | None = None

    def __call__(self, t: float) -> float:
        out = t + self.offset
        on_clock = self.start + time.monotonic() - self.wall
        if self.clocked and out - on_clock > JUMP:
            self.offset = max(on_clock, self.step + (self.last if self.last is not None else self.start)) - t
        elif self.last is not None and out < self.last - JUMP:
            self.offset = self.last + self.step - t
        out = t + self.offset
        if out > on_clock:
            self.wall -= out - on_clock  # a burst: the clock was late
        self.last = out
        return out


class LiveSource:
    """A live stream, read until stopped, or until ``reconnect_max`` reconnects in a row have
    failed: then the stream ends as a file would (what was written is kept) and ``lost`` says
    why. A file over HTTP is read like a file (``live`` is False). Output timestamps are in ``TIME_BASE`` from 0, strictly increasing across
    reconnects; each frame's ``meta["arrival"]`` is when its packet left the demuxer (the
    start of glass-to-glass latency). Audio packets are rebased the same way and copied or
    re-encoded as for files (after a reconnect the stream must keep its audio codec)."""

    live = True

    def __init__(self, spec: str, options: LiveOptions = LiveOptions(), *, stream: int | None = None,
                 on_reconnect: Callable[[], None] | None = None, on_lost: Callable[[], None] | None = None) -> None:
        self.spec, self.opts, self.stream_index = spec, options, stream
        self.target = target(spec, options)
        self.container = self.video = None
        self.model_size, self.need_display = (513, 513), False
        self.decode_audio: set[int] = set()
        self.problems: list[str] = []
        self.reconnects = 0
        self.lost: str | None = None  # why the stream ended, when it was given up
        self.on_reconnect, self.on_lost = on_reconnect, on_lost
        self.backoff = Backoff()
        self._next_out = 0.0  # seconds on the output timeline where the next connection starts
        self._last_pts: int | None = None
        self._last_frame_wall = time.monotonic()
        self._failed_in_a_row = 0  # reconnect attempts since the last frame
        self._audio_dts: dict[int, int] = {}  # per track, across connections: muxers refuse going back
        self._audio_end = 0.0  # output seconds of the latest audio packet
        self.paced, self.hls, self.stall = self.target.paced, False, options.stall_timeout

    # ---- connections ------------------------------------------------------------------------------
    def _connect(self):
        t = self.target
        gate = None
        if t.vod_possible:  # http(s): FFmpeg reads only what the gate fetched; the gate bounds each read
            gate = HttpGate(t.url, timeout=max(self.opts.open_timeout, self.opts.stall_timeout),
                            stall=self.opts.stall_timeout)
        try:
            container = av.open(t.url, "r", format=t.format, options=dict(t.options), io_open=gate,
                                timeout=(self.opts.open_timeout, None if gate else self.stall))
        except Refused:
            gate.close()
            raise
        except (av.FFmpegError, OSError) as exc:
            if gate is not None:
                gate.close()
            raise ConnectionError(formats.ffmpeg_message(exc)) from exc
        if gate is not None:
            container = demux.GatedInput(container, gate)
        if gate is not None and "hls" in container.format.name:
            # at the live edge FFmpeg waits up to a segment inside one read: the stall is the gate's
            self.hls, self.stall = True, gate.stall
        if not container.streams.video:
            container.close()
            raise InputError(f"{self.spec}: has no video stream")
        if self.stream_index is not None:
            match = [s for s in container.streams if s.index == self.stream_index and s.type == "video"]
            if not match:
                container.close()
                raise InputError(f"--stream {self.stream_index}: not a video stream of {self.spec}")
            video = match[0]
        else:
            video = container.streams.video[0]
        video.thread_type = "AUTO"
        return container, video

    def open(self) -> "LiveSource":
        """The first connection: a source that cannot be opened at all fails at once (exit 6),
        as a typo in a URL should; losing it later reconnects."""
        try:
            self.container, self.video = self._connect()
        except ConnectionError as exc:
            raise SourceError(f"cannot open {self.spec}: {exc}") from None
        v = self.video
        if self.target.vod_possible and self.container.duration:
            self.live = False  # a file or a finished HLS playlist over HTTP: read it all, to its end
        elif self.hls:
            self.paced = True  # live HLS comes a segment at a time: release it at its own rate
        rate = Fraction(v.average_rate or v.guessed_rate or self.opts.camera_fps or 25).limit_denominator(1001)
        if not 1 <= rate <= 240:
            rate = Fraction(25)
        self.info = SourceInfo(self.spec, rate, TIME_BASE,
                               tuple(AudioTrack.of(a) for a in self.container.streams.audio), None)
        return self

    def _reconnect(self, stop, cause: str) -> bool:
        """After a loss: close, wait, reopen. False when stopped; SourceError when given up."""
        if self.container is not None:
            self.container.close()
            self.container = None
        if self.on_lost is not None:
            self.on_lost()
        while not stop.is_set():
            attempts = self._failed_in_a_row  # counted until a frame arrives, across reconnects
            if self.opts.reconnect_max is not None and attempts >= self.opts.reconnect_max:
                raise SourceError(f"lost {self.spec} ({cause}); gave up after {attempts} reconnect attempt"
                                  f"{'s' if attempts != 1 else ''}")
            delay = self.backoff.next()
            self._failed_in_a_row += 1
            log.warning("%s: %s; reconnecting in %.1f s (attempt %d)", self.spec, cause, delay, attempts + 1)
            if stop.wait(delay):
                return False
            began = time.monotonic()  # what the new connection sends first is from about now
            try:
                self.container, self.video = self._connect()
            except Refused:
                raise
            except (ConnectionError, InputError) as exc:
                cause = f"reopening failed: {exc}"
                continue
            if self._last_pts is not None:  # the gap, as the wall clock measured it, stays in the output
                self._next_out += max(0.0, began - self._last_frame_wall - float(1 / self.info.rate))
            self.reconnects += 1
            if self.on_reconnect is not None:
                self.on_reconnect()
            log.warning("%s: reconnected (reconnects %d)", self.spec, self.reconnects)
            return True
        return False

    # ---- reading ----------------------------------------------------------------------------------
    def frames(self, stop, audio: Callable) -> Iterator[tuple[np.ndarray, dict]]:
        index = 0
        while not stop.is_set():
            try:
                for item in self._connection(stop, audio, index):
                    index += 1
                    yield item
                if stop.is_set() or not self.live:
                    return  # a file over HTTP ends where it ends
                cause = "the stream ended"
            except Lost as exc:
                if not self.live:  # starting a file again would repeat it
                    raise InputError(f"reading {self.spec} failed: {exc}") from None
                cause = str(exc)
            try:
                if not self._reconnect(stop, cause):
                    return
            except SourceError as exc:  # given up: the end of this stream, not a failed run
                self.lost = str(exc)
                self.problems.append(self.lost)
                return

    def _connection(self, stop, audio: Callable, index: int) -> Iterator[tuple[np.ndarray, dict]]:
        """The frames of one connection, timestamps rebased onto the output timeline."""

        scaler = VideoReformatter()
        w, h = self.model_size
        container, video = self.container, self.video
        tracks = {t.index for t in self.info.audio}
        audio_streams = [s for s in container.streams.audio if s.index in tracks]
        first = None  # (source seconds, wall time) of this connection's first timestamp
        timelines: dict = {}  # "video" or an audio track -> its _Timeline
        last_frame_wall = time.monotonic()
        best_effort = demux.BestEffortTimestamps()
        got_frame = False
        try:
            packets = container.demux(video, *audio_streams)
            while not stop.is_set():
                try:
                    packet = next(packets)
                except StopIteration:
                    return
                except (av.FFmpegError, OSError) as exc:  # OSError: the gate's reads (HTTP)
                    raise Lost(formats.ffmpeg_message(exc)) from None
                arrival = time.perf_counter()
                if time.monotonic() - last_frame_wall > self.stall:
                    raise Lost(f"no video for {self.stall:g} s")
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is None and packet.stream.type != "video":
                    continue  # an audio flush packet; a video one flushes the decoder below
                tb = packet.time_base
                t = float(stamp * tb) if stamp is not None else (first[0] if first else 0.0)
                if first is None:
                    first = (t, time.monotonic())
                kind = packet.stream.index if packet.stream.type == "audio" else "video"
                if kind not in timelines:  # every stream starts on the connection's first timestamp
                    timelines[kind] = _Timeline(self._next_out - first[0], self._next_out, first[1],
                                                self.target.clocked, float(1 / self.info.rate))
                if kind != "video":
                    shift = round(timelines[kind](t) / tb) - round(t / tb)
                    packet.pts = None if packet.pts is None else packet.pts + shift
                    packet.dts = None if packet.dts is None else packet.dts + shift
                    if packet.dts is not None:
                        dts = round(packet.dts * tb / TIME_BASE)
                        if kind in self._audio_dts and dts <= self._audio_dts[kind]:
                            continue  # a muxer takes no audio packet that goes back in time
                        self._audio_dts[kind] = dts
                        self._audio_end = max(self._audio_end, float(packet.dts * tb))
                    audio(AudioItem(kind, packet, demux.decode_audio(packet, self.problems)
                                    if kind in self.decode_audio else None))
                    continue
                try:
                    decoded = packet.decode()
                except av.FFmpegError as exc:
                    self.problems[:] = self.problems[-20:] + [f"skipped an undecodable packet "
                                                              f"({formats.ffmpeg_message(exc)})"]
                    continue
                for frame in decoded:
                    src_pts = best_effort(frame.pts, frame.dts)
                    ft = float(src_pts * frame.time_base) if src_pts is not None else t
                    if self.paced:  # a generated source or live HLS: release it at its own rate
                        delay = first[1] + (ft - first[0]) - time.monotonic()
                        if delay > 0 and stop.wait(delay):
                            return
                        arrival = time.perf_counter()  # released now: as if it had just arrived
                    pts = round(timelines["video"](ft) / TIME_BASE)
                    if self._last_pts is not None and pts <= self._last_pts:
                        pts = self._last_pts + 1
                    self._last_pts = pts
                    model_rgb, display, shown = model_input(frame, self.model_size, scaler, self.need_display)
                    got_frame, self._failed_in_a_row = True, 0
                    yield model_rgb, {"index": index, "pts": pts, "time_base": TIME_BASE,
                                      "size": shown, "display": display, "arrival": arrival}
                    last_frame_wall = time.monotonic()  # after the yield: a busy consumer is no stall
                    index += 1
        finally:
            if got_frame:
                self.backoff.reset()
            if self._last_pts is not None:
                # the next connection starts one frame after this one's last frame, plus the
                # wall time until it delivers (added in ``_reconnect``)
                self._next_out = max(float(self._last_pts * TIME_BASE) + float(1 / self.info.rate), self._audio_end)
                self._last_frame_wall = last_frame_wall

    def close(self) -> None:
        demux.release(self)
