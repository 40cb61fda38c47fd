"""`segsynth run`: media correctness of the threaded pipeline on real and generated clips."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from conftest import MEDIA, audio_info, decode_video, run_cli, write_clip

FAST = ["--segmenter", "voc", "--view", "labels", "--no-legend"]  # the 35 ms segmenter keeps tests quick


def _pattern(i: int, w: int = 160, h: int = 96) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 3 + i * 7) % 256, (y * 5) % 256, ((x + y) * 2 + i) % 256], -1).astype(np.uint8)


def _cut(src, dst, seconds: float):
    """The first ``seconds`` of a real clip, remuxed (video + audio packets copied)."""
    import av

    with av.open(str(src)) as c, av.open(str(dst), "w") as o:
        streams = {s.index: o.add_stream_from_template(s) for s in (c.streams.video[0], c.streams.audio[0])}
        for p in c.demux(c.streams.video[0], c.streams.audio[0]):
            if p.dts is None or p.pts * p.time_base >= seconds:
                continue
            p.stream = streams[p.stream.index]
            o.mux(p)
    return dst


def _media(kind: str, d):
    vfr = [Fraction(t, 1000) for t in (0, 40, 80, 160, 200, 280, 320, 400, 440, 520)]
    cfr = [Fraction(i, 25) for i in range(10)]
    frames = [_pattern(i) for i in range(10)]
    if kind == "bbb":
        return _cut(MEDIA / "bbb_h264_aac_720p_10s.mp4", d / "bbb.mp4", 0.5)
    if kind == "tos":
        return _cut(MEDIA / "tos_h264_aac_1280x534.mp4", d / "tos.mp4", 0.5)
    if kind == "vfr":
        return write_clip(d / "vfr.mp4", frames, vfr, audio_seconds=0.6)
    if kind == "rotated":
        return write_clip(d / "rot.mp4", frames, cfr, audio_seconds=0.4, rotation=90)
    if kind == "odd-size":
        return write_clip(d / "odd.mkv", [_pattern(i, 161, 97) for i in range(10)], cfr, audio_seconds=0.4,
                          codec="ffv1")
    if kind == "audio-first":
        return write_clip(d / "afirst.mkv", frames, cfr, audio_seconds=0.4, audio_first=True)
    if kind == "no-audio":
        return write_clip(d / "mute.mp4", frames, vfr)
    raise ValueError(kind)


MEDIA_KINDS = ["bbb", "tos", "vfr", "rotated", "odd-size", "audio-first", "no-audio"]


@pytest.mark.parametrize("kind", MEDIA_KINDS)
@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_lossless_run_keeps_frames_timestamps_and_audio(kind, ext, tmp_path):
    src = _media(kind, tmp_path)
    out = tmp_path / f"out{ext}"
    proc = run_cli("run", src, out, *FAST)
    assert proc.returncode == 0, proc.stderr
    t_in, f_in = decode_video(src)
    t_out, f_out = decode_video(out)
    assert len(t_out) == len(t_in)
    if ext == ".mkv":  # Matroska stores milliseconds: equal up to that rounding
        assert np.abs(np.subtract(t_out, t_in)).max() <= 0.0005, (t_in[:4], t_out[:4])
    else:
        assert t_out == t_in, (t_in[:4], t_out[:4])
    n_in, dur_in, data_in = audio_info(src)
    n_out, dur_out, data_out = audio_info(out)
    assert n_out == n_in and data_out == data_in  # audio packets copied untouched
    frame = 1 / 25
    assert abs(dur_out - dur_in) <= frame
    h, w = f_in[0].shape[:2]
    if kind == "rotated":
        h, w = w, h  # the output is upright, like ffmpeg's autorotate
    assert f_out[0].shape[:2] == (h + h % 2, w + w % 2)
    assert "dropped 0," in proc.stderr


def test_rotation_is_honoured(tmp_path):
    frame = np.zeros((96, 160, 3), np.uint8)
    frame[:, :80] = 255  # left half white in the coded picture
    src = write_clip(tmp_path / "rot.mp4", [frame] * 4, [Fraction(i, 25) for i in range(4)], rotation=90)
    out = tmp_path / "out.mp4"
    assert run_cli("run", src, out, "--segmenter", "voc", "--view", "overlay", "--no-legend").returncode == 0
    _, frames = decode_video(out)
    picture = frames[0].astype(float).mean(-1)
    assert picture.shape == (160, 96)
    assert picture[100:].mean() > picture[:60].mean() + 60  # rotated 90 degrees counter-clockwise: white at the bottom


def test_video_stream_selection(tmp_path):
    src = write_clip(tmp_path / "two.mkv", [_pattern(i) for i in range(5)], [Fraction(i, 25) for i in range(5)],
                     second_video=True, audio_seconds=0.3)
    out = tmp_path / "first.mp4"
    assert run_cli("run", src, out, *FAST).returncode == 0
    assert decode_video(out)[1][0].shape[:2] == (96, 160)
    out2 = tmp_path / "second.mp4"
    assert run_cli("run", src, out2, *FAST, "--stream", "1").returncode == 0
    assert decode_video(out2)[1][0].shape[:2] == (48, 64)
    proc = run_cli("run", src, tmp_path / "x.mp4", *FAST, "--stream", "2")
    assert proc.returncode != 0 and "not a video stream" in proc.stderr and "2:audio" in proc.stderr


def test_audio_is_reencoded_when_the_container_cannot_hold_it(tmp_path):
    src = write_clip(tmp_path / "in.mkv", [_pattern(i) for i in range(10)], [Fraction(i, 25) for i in range(10)],
                     audio_seconds=0.4)
    out = tmp_path / "out.webm"  # WebM holds Opus/Vorbis, not AAC
    proc = run_cli("run", src, out, *FAST, "--codec", "libvpx-vp9")
    assert proc.returncode == 0, proc.stderr
    import av

    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.name == "opus"
    assert abs(audio_info(out)[1] - audio_info(src)[1]) <= 1 / 25 + 0.0065  # Opus frames are 20 ms
    assert decode_video(out)[0] == decode_video(src)[0]


def test_codec_auto_uses_a_working_encoder(tmp_path):
    import av

    from segsynth.core.formats import HARDWARE_H264, pick_encoder

    src = _media("no-audio", tmp_path)
    out = tmp_path / "auto.mp4"
    assert run_cli("run", src, out, *FAST, "--codec", "auto").returncode == 0
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
    import glob

    hardware = [name for name in HARDWARE_H264 if name in av.codecs_available]
    if not glob.glob("/dev/nvidia*") and not glob.glob("/dev/dri/render*"):  # no device any of them could open
        assert pick_encoder("auto") == "libx264", hardware
    else:
        assert pick_encoder("auto") in (*hardware, "libx264")
    proc = run_cli("run", src, tmp_path / "x.mp4", *FAST, "--codec", "no_such_codec")
    assert proc.returncode == 2 and "codec: no_such_codec is not available here" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "x.mp4").exists()
