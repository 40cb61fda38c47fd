"""Live video on loopback, against real servers and receivers started here: GStreamer's
gst-rtsp-server (a camera publishing H.264 + AAC), ffmpeg listening for RTSP and RTMP pushes,
a Python HTTP server for HLS. Every server is bounded in time and stops by itself."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, http_server, run_cli

pytestmark = pytest.mark.network
SERVER = REPO / "tests" / "helpers" / "rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_rtsp_server() -> bool:
    probe = ("import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer, Gst;"
             "Gst.init(None); assert all(Gst.ElementFactory.find(e) for e in "
             "('x264enc', 'avenc_aac', 'rtph264pay', 'rtpmp4gpay', 'videotestsrc', 'audiotestsrc'))")
    try:
        return subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_rtsp_server = pytest.mark.skipif(
    os.environ.get("CI") != "true" and not _has_rtsp_server(),
    reason="gst-rtsp-server not installed (apt-get install gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gi "
           "gstreamer1.0-plugins-ugly gstreamer1.0-libav; .ci/run does)")


@contextlib.contextmanager
def rtsp_camera(port: int, lifetime: float = 90):
    """gst-rtsp-server publishing live video + audio at rtsp://127.0.0.1:PORT/live."""
    proc = subprocess.Popen([SYSTEM_PYTHON, str(SERVER), str(port), "--lifetime", str(lifetime)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), f"the RTSP server did not start: {line} {proc.stderr.read()}"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def video_times(path: Path) -> list[float]:
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        return sorted(float(p.pts * p.time_base) for p in c.demux(stream) if p.pts is not None)


def probe(path: Path | str) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def segsynth_cmd(*args) -> list[str]:
    return [str(Path(sys.executable).with_name("segsynth")), *map(str, args)]


# ---- RTSP in, with the server killed and restarted mid-run -------------------------------------
@needs_rtsp_server
def test_rtsp_run_reconnects_across_a_server_restart(tmp_path, tiny_segmenter):
    port = free_port()
    out, stats_file = tmp_path / "live.mp4", tmp_path / "stats.json"
    with rtsp_camera(port) as server:
        run = subprocess.Popen(segsynth_cmd("run", f"rtsp://127.0.0.1:{port}/live", out, "--duration", 16,
                                            "--segmenter", tiny_segmenter, "--generator", "none",
                                            "--stats-json", stats_file),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not (out.exists() and out.stat().st_size > 2000) and time.monotonic() < deadline:
                time.sleep(0.2)  # the first frames are written
            time.sleep(1)
            server.kill()  # the camera drops off the network
            server.wait(10)
            down = time.monotonic()
            time.sleep(3)
            with rtsp_camera(port):  # ... and comes back on the same address
                up = time.monotonic()
                _, err = run.communicate(timeout=90)
        finally:
            run.kill()
    assert run.returncode == 0, err
    stats = json.loads(stats_file.read_text())
    assert stats["reconnects"] >= 1, err
    assert re.search(r"rtsp://127\.0\.0\.1:\d+/live: .+; reconnecting in [\d.]+ s \(attempt 1\)", err), err
    assert f"reconnects {stats['reconnects']}" in err  # the summary line
    info = probe(out)
    kinds = sorted(s["codec_type"] for s in info["streams"])
    assert kinds == ["audio", "video"], info
    times = video_times(out)
    gaps = np.diff(times)
    assert (gaps > 0).all(), "output timestamps must strictly increase across the reconnect"
    # The outage stays in the timeline as the wall clock measured it (at least the 3 s the
    # server was away), and what follows it is new video: frames keep coming after the gap.
    i = int(np.argmax(gaps))
    assert 3.0 <= gaps[i] <= up - down + 4, (gaps[i], up - down)  # + backoff and the reconnect itself
    assert times[-1] - times[i + 1] >= 3.0, ("too little video after the reconnect", times[i], gaps[i], times[-1])
    assert len(times) - (i + 1) >= 10
    assert 14.0 <= times[-1] - times[0] <= 16.5  # --duration 16 of input time
    assert stats["latency_ms"]["p99"] > 0
    assert stats["frames_out"] + stats["dropped"] == stats["frames_in"]  # every frame read was written or dropped


@needs_rtsp_server
def test_a_stalled_camera_counts_as_lost_within_the_stall_timeout():
    from segsynth.core.grammar import LiveOptions
    from segsynth.stream.io.live import LiveSource

    port = free_port()
    with rtsp_camera(port) as server:
        lost = []  # the hook that sets segsynth_stream_up to 0
        source = LiveSource(f"rtsp://127.0.0.1:{port}/live", LiveOptions(stall_timeout=1.0, reconnect_max=0),
                            on_lost=lambda: lost.append(time.monotonic())).open()
        stop = threading.Event()
        frames = source.frames(stop, lambda item: None)
        try:
            for _ in range(5):
                next(frames)
            os.kill(server.pid, signal.SIGSTOP)  # the camera hangs: the connection stays open, nothing comes
            start = time.monotonic()
            for _ in frames:
                assert time.monotonic() - start < 10
            assert time.monotonic() - start < 6  # 1 s stall timeout (+ FFmpeg's own shutdown)
            assert re.fullmatch(r"lost rtsp://.* gave up after 0 reconnect attempts", source.lost), source.lost
            assert len(lost) == 1 and lost[0] - start < 6
        finally:
            os.kill(server.pid, signal.SIGCONT)
            frames.close()
            source.close()


@needs_rtsp_server
def test_a_camera_given_up_after_reconnect_max_keeps_what_was_recorded(tmp_path, tiny_segmenter):
    port = free_port()
    out = tmp_path / "kept.mp4"
    with rtsp_camera(port, lifetime=6):  # goes away for good after 6 s
        r = run_cli("run", f"rtsp://127.0.0.1:{port}/live", out, "--reconnect-max", 1, "--segmenter", tiny_segmenter,
                    "--generator", "none", "--stats-json", tmp_path / "s.json", timeout=120)
    assert r.returncode == 6, r.stderr  # a source lost for good (SourceError)
    assert re.search(r"error: lost rtsp://127\.0\.0\.1:\d+/live \(reopening failed: .*\); gave up after 1 "
                     r"reconnect attempt$", r.stderr.strip()), r.stderr
    times = video_times(out)  # complete and playable, under its name
    assert len(times) >= 10 and (np.diff(times) > 0).all()
    assert json.loads((tmp_path / "s.json").read_text())["frames_out"] == len(times)


# ---- outputs: RTSP and RTMP push, HLS, MJPEG preview, file series -------------------------------
def _receiver(args: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen(["ffmpeg", "-nostdin", "-v", "error", *args, "-c", "copy", "-y", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _mjpeg_frames(url: str, count: int, timeout: float = 20) -> list[bytes]:
    """Read ``count`` JPEG parts of a multipart/x-mixed-replace stream."""
    frames = []
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        kind = reply.headers["Content-Type"]
        boundary = re.search(r"boundary=(\S+)", kind)[1].encode()
        while len(frames) < count:
            line = reply.readline()
            if line.strip() == b"--" + boundary:
                headers = {}
                while (h := reply.readline().strip()):
                    k, _, v = h.decode().partition(":")
                    headers[k.lower()] = v.strip()
                assert headers["content-type"] == "image/jpeg"
                frames.append(reply.read(int(headers["content-length"])))
    return frames


def test_push_hls_preview_and_file_series_outputs_at_once(tmp_path, tiny_segmenter):
    from PIL import Image

    rtsp_port, rtmp_port, preview_port = free_port(), free_port(), free_port()
    rtsp_got, rtmp_got = tmp_path / "rtsp.mkv", tmp_path / "rtmp.flv"
    receivers = [_receiver(["-rtsp_flags", "listen", "-timeout", "30", "-i", f"rtsp://127.0.0.1:{rtsp_port}/out"],
                           rtsp_got),
                 _receiver(["-listen", "1", "-timeout", "30", "-i", f"rtmp://127.0.0.1:{rtmp_port}/live/key"],
                           rtmp_got)]
    hls = tmp_path / "hls" / "index.m3u8"
    hls.parent.mkdir()
    try:
        time.sleep(1)  # the receivers listen
        run = subprocess.Popen(segsynth_cmd(
            "run", "lavfi:testsrc2=size=320x240:rate=15", f"rtsp://127.0.0.1:{rtsp_port}/out",
            f"rtmp://127.0.0.1:{rtmp_port}/live/key", hls, "--out", tmp_path / "rec.mp4", "--segment-time", 2,
            "--preview", f"127.0.0.1:{preview_port}", "--duration", 17, "--segmenter", tiny_segmenter,
            "--generator", "none", "--stats-json", tmp_path / "stats.json"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        frames = None
        while frames is None and time.monotonic() < deadline:
            try:
                frames = _mjpeg_frames(f"http://127.0.0.1:{preview_port}/stream.mjpg", 3)
            except OSError:
                time.sleep(0.3)
        with urllib.request.urlopen(f"http://127.0.0.1:{preview_port}/snapshot.jpg", timeout=10) as reply:
            snapshot = reply.read()
        _, err = run.communicate(timeout=120)
        for r in receivers:
            r.wait(30)
    finally:
        for p in [*receivers, *(locals().get("run") and [run] or [])]:
            p.kill()
    assert run.returncode == 0, err
    # the preview: JPEG frames of the output picture
    assert frames is not None and len(frames) == 3
    for jpeg in [*frames, snapshot]:
        with Image.open(__import__("io").BytesIO(jpeg)) as img:
            assert img.format == "JPEG" and img.size == (320, 240)
    # RTSP and RTMP pushes arrived, decodable, about as long as the run
    for got in (rtsp_got, rtmp_got):
        times = video_times(got)
        assert len(times) >= 30, got
        assert times[-1] - times[0] >= 12, (got, times[-1] - times[0])
        assert (np.diff(times) >= 0).all()  # (a receiver may stamp its first two RTP packets alike)
    # HLS: a playlist ffprobe plays, of at most 6 segments, the oldest deleted
    text = hls.read_text()
    listed = re.findall(r"^index_\d+\.ts$", text, re.MULTILINE)
    assert 1 <= len(listed) <= 6 and "#EXT-X-ENDLIST" in text
    on_disk = sorted(p.name for p in hls.parent.glob("index_*.ts"))
    assert "index_00000.ts" not in on_disk and set(listed) <= set(on_disk)
    assert probe(hls)["streams"][0]["codec_name"] == "h264"
    # the file series: one file per ~2 s (cut at keyframes), each playable on its own from 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    series = sorted(tmp_path.glob("rec-*.mp4"))
    assert len(series) >= 6, series
    counts = []
    for part in series[:-1]:
        times = video_times(part)
        assert times[0] == 0 and 1.5 <= times[-1] <= 2.6, (part, times[-1])
        counts.append(len(times))
    counts.append(len(video_times(series[-1])))
    assert sum(counts) == stats["frames_out"]
    assert all(o["ok"] for o in stats["outputs"]) and len(stats["outputs"]) == 5


def test_a_failing_push_is_retried_then_dropped_and_the_file_goes_on(tmp_path, tiny_segmenter):
    nobody = free_port()  # nothing listens there
    out = tmp_path / "kept.mp4"
    r = run_cli("run", "lavfi:testsrc2=size=160x120:rate=15", out, f"rtmp://127.0.0.1:{nobody}/live/x",
                "--reconnect-max", 1, "--frames", 40, "--segmenter", tiny_segmenter, "--generator", "none",
                "--stats-json", tmp_path / "s.json", timeout=120)
    assert r.returncode == 3, r.stderr  # an output failed: the run did, though the file is complete
    assert re.search(rf"output rtmp://127\.0\.0\.1:{nobody}/live/x failed .*; retrying in", r.stderr), r.stderr
    assert re.search(rf"output rtmp://127\.0\.0\.1:{nobody}/live/x failed and is dropped", r.stderr), r.stderr
    assert re.search(rf"error: output rtmp://127\.0\.0\.1:{nobody}/live/x failed: .*; {re.escape(str(out))} "
                     "complete$", r.stderr.strip()), r.stderr
    stats = json.loads((tmp_path / "s.json").read_text())
    assert [o["ok"] for o in stats["outputs"]] == [True, False]
    assert stats["frames_out"] == 40 and len(video_times(out)) == 40


# ---- HLS input and its safety --------------------------------------------------------------------
@contextlib.contextmanager
def http_dir(directory: Path):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    with http_server(handler) as url:
        yield url


@pytest.fixture(scope="module")
def hls_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hls-in")
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=10", "-t", "3",
                    "-c:v", "libx264", "-g", "10", "-f", "hls", "-hls_time", "1", "-hls_list_size", "0",
                    str(d / "ok.m3u8")], check=True, timeout=60)
    segment = "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{}\n#EXT-X-ENDLIST\n"
    (d / "local.m3u8").write_text(segment.format("file:///etc/passwd"))
    (d / "elsewhere.m3u8").write_text(segment.format("http://127.0.0.2:9/ok0.ts"))
    (d / "master.m3u8").write_text("#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=100000\nlocal.m3u8\n")
    (d / "crypto.m3u8").write_text(segment.format("crypto+file:///etc/passwd"))
    return d


def test_hls_over_http_is_read_like_a_file(tmp_path, hls_dir, tiny_segmenter):
    with http_dir(hls_dir) as base:
        r = run_cli("run", f"{base}/ok.m3u8", tmp_path / "o.mp4", "--segmenter", tiny_segmenter, "--generator",
                    "none", "--stats-json", tmp_path / "s.json", timeout=120)
    assert r.returncode == 0, r.stderr
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["frames_out"] == 30 and stats["dropped"] == 0 and stats["reconnects"] == 0  # all of it, once


@pytest.mark.parametrize("name, why", [("local.m3u8", "file:///etc/passwd"), ("elsewhere.m3u8", "127.0.0.2"),
                                       ("master.m3u8", "file:///etc/passwd"), ("crypto.m3u8", "crypto")])
def test_hls_playlists_that_leave_their_host_are_refused(tmp_path, hls_dir, name, why):
    with http_dir(hls_dir) as base:
        r = run_cli("run", f"{base}/{name}", tmp_path / "o.mp4", "--generator", "none", timeout=60)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refused" in lines[0] and why in lines[0], r.stderr
    assert not (tmp_path / "o.mp4").exists()


# ---- cameras and bad live inputs -------------------------------------------------------------------
def test_devices_lists_cameras_or_says_there_are_none():
    r = run_cli("devices")
    assert r.returncode == 0, r.stderr
    cameras = sorted(Path("/dev").glob("video[0-9]*"))
    if cameras:
        assert all(str(c) in r.stdout for c in cameras)
    else:
        assert "no cameras found" in r.stdout


@pytest.mark.parametrize("source, message", [
    ("/dev/video9", "/dev/video9: no such device"),
    ("v4l2:9", "/dev/video9: no such device"),
    ("lavfi:movie=/etc/passwd", "only letters, digits"),
    ("lavfi:movie@x=f", "only letters, digits"),
    ("lavfi:color=s=64x64,drawtext=textfile=a", "filter 'drawtext' is not allowed"),
    ("http://[", "not a valid URL"),
    ("gopher://127.0.0.1/x", "not a supported input"),
])
def test_bad_live_inputs_fail_with_one_line_and_exit_2(tmp_path, source, message):
    if Path("/dev/video9").exists() and "video9" in message:
        pytest.skip("this machine has a /dev/video9")
    source = source.format(port=free_port())
    r = run_cli("run", source, tmp_path / "o.mp4", "--generator", "none", timeout=60)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_an_unreachable_camera_fails_at_once_with_exit_6(tmp_path):
    r = run_cli("run", f"rtsp://127.0.0.1:{free_port()}/nothing", tmp_path / "o.mp4", "--generator", "none",
                timeout=60)
    assert r.returncode == 6, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(r"cannot open rtsp://127\.0\.0\.1:\d+/nothing: Connection refused",
                                         lines[0]), r.stderr


def test_frames_duration_and_stats_json_on_a_lavfi_source(tmp_path, tiny_segmenter, people_clip):
    r = run_cli("run", "lavfi:testsrc2=size=160x120:rate=25", tmp_path / "a.mp4", "--duration", 2,
                "--segmenter", tiny_segmenter, "--generator", "none", "--policy", "lossless",
                "--stats-json", tmp_path / "a.json", timeout=60)
    assert r.returncode == 0, r.stderr
    times = video_times(tmp_path / "a.mp4")
    assert len(times) == 50 and times[-1] - times[0] == pytest.approx(1.96, abs=0.01)
    stats = json.loads((tmp_path / "a.json").read_text())
    assert stats["frames_out"] == 50 and stats["seconds"] >= 1.8  # released in real time, not at once
    r = run_cli("run", "lavfi:testsrc2=size=160x120:rate=25", tmp_path / "b.mkv", "--frames", 7,
                "--segmenter", tiny_segmenter, "--generator", "none", timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(video_times(tmp_path / "b.mkv")) == 7
    # files too: the first 3 of the clip's 8 frames, with its own timestamps, and the stats
    r = run_cli("run", people_clip, tmp_path / "c.mp4", "--frames", 3, "--segmenter", tiny_segmenter,
                "--generator", "none", "--stats-json", tmp_path / "c.json", timeout=60)
    assert r.returncode == 0, r.stderr
    assert video_times(tmp_path / "c.mp4") == pytest.approx([0.0, 0.04, 0.08])
    stats = json.loads((tmp_path / "c.json").read_text())
    assert stats["frames_out"] == 3 and stats["dropped"] == 0 and stats["state"] == "closed"


# ---- units: backoff, timeline rebasing, output strings ----------------------------------------------
def test_backoff_grows_exponentially_with_jitter_up_to_its_cap_and_resets():
    import random

    from segsynth.stream.io.live import Backoff

    b = Backoff(initial=0.5, cap=8.0, rng=random.Random(1))
    delays = [b.next() for _ in range(8)]
    for k, d in enumerate(delays):
        full = min(8.0, 0.5 * 2 ** k)
        assert full / 2 <= d <= full, (k, d)
    assert len({round(d / min(8.0, 0.5 * 2 ** k), 6) for k, d in enumerate(delays)}) > 1  # jittered, not in step
    b.reset()
    assert b.next() <= 0.5


def test_timeline_keeps_bursts_and_backlogs_and_cuts_jumps(monkeypatch):
    from segsynth.stream.io import live

    clock = [100.0]
    monkeypatch.setattr(live.time, "monotonic", lambda: clock[0])
    tl = live._Timeline(offset=10.0 - 5.0, start=10.0, wall=100.0, clocked=True, step=0.04)
    assert tl(5.0) == 10.0
    # a burst: 0.8 s of frames at once are kept as they are (the clock was late)
    assert [round(tl(5.0 + k * 0.2), 3) for k in range(1, 5)] == [10.2, 10.4, 10.6, 10.8]
    clock[0] += 1.0
    assert round(tl(6.0), 3) == 11.0  # and then in step with the clock
    # a single step 3 s ahead of the clock (which the burst moved to 11.8) is a jump: the
    # stream goes on from the clock, and keeps its own pace from there
    assert round(tl(9.04), 3) == 11.8
    clock[0] += 0.5
    assert round(tl(9.54), 3) == 12.3
    # back by more than a second: goes on one frame after the last
    assert round(tl(2.0), 3) == 12.34
    # a backlog (behind the clock) is kept: frames read late are not moved
    clock[0] += 5.0
    assert round(tl(2.04), 3) == 12.38


@pytest.mark.parametrize("sinks, message", [
    (("ftp://127.0.0.1/x",), "outputs are files, rtsp://"),
    (("out.txt",), "the output must be a video"),
    (("a.m3u8", "a.m3u8"), "the same output is named twice"),
    (("mjpeg://127.0.0.1",), "expected HOST:PORT"),
])
def test_output_strings_are_checked_before_anything_runs(sinks, message):
    from segsynth.core.config import StreamConfig
    from segsynth.core.errors import InputError

    with pytest.raises(InputError, match=message):
        StreamConfig(source="in.mp4", sinks=sinks)
    with pytest.raises(InputError, match="ids writes lossless"):
        StreamConfig(source="in.mp4", sinks=("rtsp://127.0.0.1/x",), view="ids")
