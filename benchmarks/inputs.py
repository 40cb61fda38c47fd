"""Benchmark inputs, generated with FFmpeg's lavfi sources through PyAV so anyone can
reproduce them: testsrc2 (or mandelbrot) video with a sine tone, H.264 + AAC in MP4."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av


def generate(path: Path, *, size: tuple[int, int] = (1280, 720), rate: int = 30, frames: int = 300,
             source: str = "testsrc2") -> Path:
    """Write ``frames`` frames of ``source`` at ``size`` and ``rate`` fps, with stereo AAC."""

    if path.is_file():
        return path
    w, h = size
    tmp = path.with_name(f".{path.name}.partial")
    with av.open(f"{source}=size={w}x{h}:rate={rate}", format="lavfi") as video, \
            av.open(f"sine=frequency=440:sample_rate=48000:duration={frames / rate + 1}", format="lavfi") as tone, \
            av.open(str(tmp), "w", format="mp4") as out:
        v = out.add_stream("libx264", rate=rate)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        v.options = {"preset": "veryfast", "crf": "23"}
        a = out.add_stream("aac", rate=48000)
        a.layout = "stereo"
        for i, frame in enumerate(video.decode(video=0)):
            if i >= frames:
                break
            frame.pts, frame.time_base = i, Fraction(1, rate)
            out.mux(v.encode(frame))
        out.mux(v.encode(None))
        limit = frames / rate
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=48000)
        for frame in tone.decode(audio=0):
            if frame.pts is not None and frame.pts / 48000 >= limit:
                break
            for chunk in resampler.resample(frame):
                chunk.pts = None
                out.mux(a.encode(chunk))
        out.mux(a.encode(None))
    tmp.rename(path)
    return path
