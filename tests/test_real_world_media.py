"""`segsynth run` on the kinds of real-world files the ffmpeg CLI handles: MPEG-TS and HLS with
ADTS AAC, AVI with PCM, WMV with WMA, broadcast MPEG-2 TS cut mid-GOP with two AC-3 tracks and
a large start time, mid-stream resolution changes, packed B-frames, two 10-bit HEVC tracks,
image sequences, bad encoder settings. Every input is made here with the ffmpeg CLI from lavfi
sources; every run goes through the threaded pipeline, as users run it. The ffmpeg CLI doing
the same transcode (`ffmpeg -i IN -c:v libx264 -fps_mode passthrough OUT.mp4`: input timestamps
kept, as segsynth keeps them) is the reference for what can be done."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import decode_video, run_cli

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI (apt-get install ffmpeg)")
FAST = ["--segmenter", "voc", "--generator", "none", "--view", "labels", "--no-legend"]
VIDEO = ["-f", "lavfi", "-i", "testsrc2=size=160x96:rate=25"]
TONE = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"]


def ffmpeg(*args) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *map(str, args)], check=True, stdin=subprocess.DEVNULL,
                   timeout=120)


def audio_seconds(path: Path) -> list[tuple[float, float]]:
    """(decoded duration, first timestamp) of every audio stream, in seconds (what a listener gets, when)."""
    import av

    with av.open(str(path)) as c:
        samples = {s.index: 0 for s in c.streams.audio}
        starts: dict[int, float] = {}
        for packet in c.demux(*c.streams.audio) if samples else ():  # one pass: no seeking back between tracks
            for frame in packet.decode():
                samples[packet.stream.index] += frame.samples
                starts.setdefault(packet.stream.index, float(frame.pts * frame.time_base))
        return [(samples[s.index] / s.codec_context.sample_rate, starts.get(s.index, 0.0)) for s in c.streams.audio]


def check_like_ffmpeg(src: Path, tmp_path: Path, *extra: str, audio_tracks: int | None = None,
                      ext: str = ".mp4") -> tuple[list, list]:
    """Run segsynth and the ffmpeg CLI on ``src``; both must succeed, and segsynth must keep as
    many frames as ffmpeg, with strictly increasing timestamps, and the audio, in sync."""
    ours, theirs = tmp_path / f"ours{ext}", tmp_path / "ffmpeg.mp4"
    proc = run_cli("run", src, ours, *FAST, *extra)
    assert proc.returncode == 0, proc.stderr
    ffmpeg("-i", src, "-map", "0:v:0", "-map", "0:a?", "-c:v", "libx264", "-preset", "veryfast", "-fps_mode",
           "passthrough", theirs)
    (t_ours, f_ours), (t_ref, _) = decode_video(ours), decode_video(theirs)
    assert len(t_ours) >= len(t_ref) > 0, (len(t_ours), len(t_ref))
    assert all(b > a for a, b in zip(t_ours, t_ours[1:])), "output timestamps must increase strictly"
    # the same span (ffmpeg moves the start to 0; segsynth keeps the input's timestamps)
    assert abs((t_ours[-1] - t_ours[0]) - (t_ref[-1] - t_ref[0])) <= 0.05, (t_ours[::20], t_ref[::20])
    a_ours, a_ref = audio_seconds(ours), audio_seconds(theirs)
    assert len(a_ours) == (audio_tracks if audio_tracks is not None else len(a_ref))
    for (ours_s, ours_t0), (ref_s, ref_t0) in zip(a_ours, a_ref):
        assert abs(ours_s - ref_s) <= 0.05, (a_ours, a_ref)
        # in sync: the audio starts where it does against the video, as in ffmpeg's output
        assert abs((ours_t0 - t_ours[0]) - (ref_t0 - t_ref[0])) <= 0.05, (ours_t0, t_ours[0], ref_t0, t_ref[0])
    return t_ours, f_ours


def test_mpeg_ts_with_adts_aac_to_mp4(tmp_path):
    src = tmp_path / "in.ts"
    ffmpeg(*VIDEO, *TONE, "-t", "2", "-c:v", "libx264", "-c:a", "aac", "-f", "mpegts", src)
    times, _ = check_like_ffmpeg(src, tmp_path)
    assert len(times) == 50


def test_hls_playlist_of_ts_segments_with_aac_to_mp4(tmp_path):
    playlist = tmp_path / "hls" / "index.m3u8"
    playlist.parent.mkdir()
    ffmpeg(*VIDEO, *TONE, "-t", "3", "-c:v", "libx264", "-g", "25", "-c:a", "aac", "-f", "hls", "-hls_time", "1",
           "-hls_list_size", "0", "-hls_segment_type", "mpegts", playlist)
    assert len(list(playlist.parent.glob("*.ts"))) >= 2
    times, _ = check_like_ffmpeg(playlist, tmp_path)
    assert len(times) == 75


@pytest.mark.parametrize("codec, channels", [("pcm_s16le", 1), ("pcm_s16le", 2), ("pcm_u8", 1), ("pcm_u8", 2)])
def test_avi_with_pcm_audio_to_mp4(tmp_path, codec, channels):
    src = tmp_path / "in.avi"  # AVI gives a channel count but no channel order
    ffmpeg(*VIDEO, *TONE, "-t", "2", "-c:v", "mpeg4", "-q:v", "5", "-c:a", codec, "-ac", channels, src)
    check_like_ffmpeg(src, tmp_path, audio_tracks=1)
    import av

    with av.open(str(tmp_path / "ours.mp4")) as c:
        assert c.streams.audio[0].codec_context.layout.nb_channels == channels


def test_ts_starting_late_re_encoded_for_webm_keeps_audio_in_sync(tmp_path):
    src = tmp_path / "late.ts"  # WebM cannot hold AAC: the audio is re-encoded to Opus
    ffmpeg(*VIDEO, *TONE, "-t", "2", "-c:v", "libx264", "-c:a", "aac", "-output_ts_offset", "100", src)
    times, _ = check_like_ffmpeg(src, tmp_path, "--codec", "libvpx-vp9", ext=".webm")
    assert times[0] > 100


def test_wmv_with_wma_audio_to_mp4(tmp_path):
    src = tmp_path / "in.wmv"
    ffmpeg(*VIDEO, *TONE, "-t", "2", "-c:v", "wmv2", "-c:a", "wmav2", src)
    check_like_ffmpeg(src, tmp_path, audio_tracks=1)


def test_broadcast_mpeg2_ts_cut_mid_gop_with_two_ac3_tracks_and_a_large_start_time(tmp_path):
    full = tmp_path / "full.ts"
    ffmpeg(*VIDEO, *TONE, "-f", "lavfi", "-i", "sine=frequency=880:sample_rate=48000", "-t", "4",
           "-map", "0", "-map", "1", "-map", "2", "-c:v", "mpeg2video", "-g", "12", "-bf", "2", "-b:v", "400k",
           "-c:a", "ac3", "-output_ts_offset", "43000", full)
    data = full.read_bytes()
    start = (len(data) * 2 // 5) // 188 * 188  # a cut at a TS packet boundary, inside a GOP
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[start:])
    times, _ = check_like_ffmpeg(cut, tmp_path, audio_tracks=2)
    assert times[0] > 43000


def _ivf_concat(parts: list[Path], out: Path) -> Path:
    """One IVF stream from several (the first one's header; each later part's frame times
    continue after the previous part's last one): an AV1 stream whose size changes."""
    body, offset, header = b"", 0, None
    for part in parts:
        data = part.read_bytes()
        hdr_len = struct.unpack_from("<H", data, 6)[0]
        header = header or data[:hdr_len]
        pos, last = hdr_len, 0
        while pos + 12 <= len(data):
            size, pts = struct.unpack_from("<IQ", data, pos)
            body += struct.pack("<IQ", size, pts + offset) + data[pos + 12:pos + 12 + size]
            last = pts + offset
            pos += 12 + size
        offset = last + 1
    out.write_bytes(header + body)
    return out


def test_av1_ivf_whose_resolution_changes_mid_stream(tmp_path):
    parts = []
    for i, size in enumerate(("160x96", "320x240")):
        part = tmp_path / f"p{i}.ivf"
        ffmpeg("-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25", "-t", "1", "-c:v", "libaom-av1", "-cpu-used", "8",
               "-g", "25", "-b:v", "200k", part)
        parts.append(part)
    src = _ivf_concat(parts, tmp_path / "changes.ivf")
    times, frames = check_like_ffmpeg(src, tmp_path)
    assert len(times) == 50 and {f.shape for f in frames} == {(96, 160, 3)}  # scaled to the first size


def test_packed_b_frames_mpeg4_avi(tmp_path):
    src = tmp_path / "packed.avi"
    ffmpeg(*VIDEO, "-t", "2", "-c:v", "libxvid", "-bf", "2", "-q:v", "5", src)  # xvid packs B-frames in AVI
    times, _ = check_like_ffmpeg(src, tmp_path)
    assert len(times) == 48  # 50 packets, two of them the empty placeholders of packed B-frames


def test_mp4_with_two_hevc_main10_tracks_takes_the_first(tmp_path):
    src = tmp_path / "two10bit.mp4"
    ffmpeg(*VIDEO, "-f", "lavfi", "-i", "testsrc=size=128x64:rate=25", "-t", "1", "-map", "0", "-map", "1",
           "-c:v", "libx265", "-pix_fmt", "yuv420p10le", "-x265-params", "log-level=error", src)
    times, frames = check_like_ffmpeg(src, tmp_path)
    assert len(times) == 25 and frames[0].shape == (96, 160, 3)


def test_image2_pattern_folder_and_glob(tmp_path):
    shots = tmp_path / "shots"
    shots.mkdir()
    ffmpeg(*VIDEO, "-frames:v", "12", "-start_number", "100", shots / "image_%04d.jpg")  # ffmpeg's own search: 0-4
    for spec, fps in ((shots / "image_%04d.jpg", None), (shots, "12"), (shots / "*.jpg", "10")):
        out = tmp_path / "seq.mp4"
        proc = run_cli("run", spec, out, *FAST, *(["--fps", fps] if fps else []), "-y")  # one output, replaced
        assert proc.returncode == 0, proc.stderr
        times, _ = decode_video(out)
        rate = float(fps or 25)
        assert len(times) == 12 and times == pytest.approx([i / rate for i in range(12)])
    proc = run_cli("run", shots / "nothing_%04d.jpg", tmp_path / "x.mp4", *FAST)
    assert proc.returncode == 2 and "no image matches the pattern" in proc.stderr


def test_bad_encoder_settings_fail_up_front_naming_the_option(tmp_path):
    src = tmp_path / "in.mp4"
    ffmpeg(*VIDEO, "-t", "0.2", "-c:v", "libx264", src)
    for args, message in ((["--preset", "quality"], "preset: 'quality' is not a libx264 preset; choose one of: "
                                                    "ultrafast, superfast, veryfast"),
                          (["--crf", "60"], "crf: 60 is out of range (0-51)"),
                          (["--bitrate", "lots"], "bitrate: 'lots' is not a bitrate"),
                          (["--codec", "pcm_s16le"], "codec: pcm_s16le is not a video encoder"),
                          (["--codec", "auto", "--preset", "quality"], "preset: 'quality' is not a libx264 preset")):
        proc = run_cli("run", src, tmp_path / "x.mp4", *args)  # the default models: a late failure would be slow
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
        assert not (tmp_path / "x.mp4").exists()
