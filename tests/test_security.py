"""Every door checked (docs/security.md): hostile HLS servers and playlists, limits on what a
request can multiply, one writer per output, outputs and sources that fail say so, transcode
workers that die with their parent, and the small validation holes. Real servers on loopback
(a hostile HTTP server here, ``segsynth serve``, GStreamer's RTSP camera, promtool), each
bounded in time."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import decode_video, http_server, run_cli, write_clip
from test_live import needs_rtsp_server, rtsp_camera
from test_serve import RED, api, free_port, series, service

pytestmark = pytest.mark.network
FAST = ["--segmenter", "voc", "--generator", "none", "--view", "labels", "--stabilize", "off"]


# ---- one gate for every URL FFmpeg opens -------------------------------------------------------------
class Trap:
    """A TCP listener standing for "another host": it records every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port, self.connections, self._stop = self.sock.getsockname()[1], 0, threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def segments(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile-hls")
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=10", "-t", "3",
                    "-c:v", "libx264", "-g", "10", "-f", "hls", "-hls_time", "1", "-hls_list_size", "0",
                    str(d / "good.m3u8")], check=True, timeout=60)
    return d


@contextlib.contextmanager
def hostile_server(directory: Path, trap: Trap):
    """An HTTP server that tells FFmpeg's client (User-Agent Lavf) something else than other
    clients, sends playlists gzip-encoded, redirects, and nests playlists: every trick points
    at ``trap``, another port of this host."""
    elsewhere = f"http://127.0.0.1:{trap.port}"
    evil = f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{elsewhere}/seg.ts\n#EXT-X-ENDLIST\n".encode()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, *args) -> None:
            pass

        def _send(self, body: bytes, headers: dict | None = None, code: int = 200) -> None:
            self.send_response(code)
            for k, v in {"Content-Type": "application/vnd.apple.mpegurl", "Content-Length": str(len(body)),
                         **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            ffmpeg = "Lavf" in self.headers.get("User-Agent", "")
            path = urllib.parse.urlsplit(self.path).path
            if path == "/ua.m3u8":  # FFmpeg sees another host; others the good playlist
                return self._send(evil) if ffmpeg else self._send((directory / "good.m3u8").read_bytes())
            if path == "/redirect-ffmpeg.m3u8":  # only FFmpeg is sent elsewhere
                if ffmpeg:
                    return self._send(b"", {"Location": f"{elsewhere}/x.m3u8"}, 302)
                return self._send((directory / "good.m3u8").read_bytes())
            if path == "/redirect.m3u8":  # everybody is sent elsewhere
                return self._send(b"", {"Location": f"{elsewhere}/x.m3u8"}, 302)
            if path == "/gzip.m3u8":  # a compressed playlist a checker that does not inflate takes for data
                return self._send(gzip.compress(evil), {"Content-Encoding": "gzip"})
            if path == "/gzip-good.m3u8":
                return self._send(gzip.compress((directory / "good.m3u8").read_bytes()), {"Content-Encoding": "gzip"})
            if path == "/nested.m3u8":  # master -> variant -> another host
                return self._send(b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nlevel2.m3u8\n")
            if path == "/deep.m3u8":  # master -> master -> variant -> another host
                return self._send(b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nlevel1.m3u8\n")
            if path == "/level1.m3u8":
                return self._send(b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nlevel2.m3u8\n")
            if path == "/level2.m3u8":
                return self._send(evil)
            if path == "/key.m3u8":  # a key on another host
                body = f'#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXT-X-KEY:METHOD=AES-128,URI="{elsewhere}/k"\n' \
                       '#EXTINF:1.0,\ngood0.ts\n#EXT-X-ENDLIST\n'
                return self._send(body.encode())
            return super().do_GET()

    with http_server(Handler) as url:
        yield url


def _read(url: str, frames: int = 5) -> int:
    """Open ``url`` as segsynth does and read up to ``frames`` frames; how many came."""
    from segsynth.core.grammar import LiveOptions
    from segsynth.stream.io.live import LiveSource

    source = LiveSource(url, LiveOptions(open_timeout=10, reconnect_max=0)).open()
    got = 0
    try:
        for _ in source.frames(threading.Event(), lambda item: None):
            got += 1
            if got == frames:
                break
    finally:
        source.close()
    return got


@pytest.mark.parametrize("name", ["ua.m3u8", "redirect-ffmpeg.m3u8", "gzip-good.m3u8"])
def test_what_ffmpeg_reads_is_what_the_gate_fetched(segments, name):
    """A server that answers FFmpeg's client differently never gets to: FFmpeg reads only the
    bytes the gate fetched (inflated where the server compressed them)."""
    trap = Trap()
    try:
        with hostile_server(segments, trap) as base:
            assert _read(f"{base}/{name}") == 5
    finally:
        trap.close()
    assert trap.connections == 0


@pytest.mark.parametrize("name, why", [("gzip.m3u8", "outside http://127.0.0.1"),
                                       ("redirect.m3u8", "redirects to"),
                                       ("nested.m3u8", "outside http://127.0.0.1"),
                                       ("key.m3u8", "outside http://127.0.0.1")])
def test_a_playlist_that_shows_another_host_is_refused_before_a_byte_is_read_there(segments, name, why):
    from segsynth.core.errors import InputError

    trap = Trap()
    try:
        with hostile_server(segments, trap) as base, pytest.raises(InputError, match="refused") as caught:
            _read(f"{base}/{name}")
    finally:
        trap.close()
    assert why in str(caught.value) and f":{trap.port}" in str(caught.value)
    assert trap.connections == 0


def test_a_master_playlist_inside_a_master_reads_nothing_elsewhere(segments):
    """PyAV 18.1.0's FFmpeg followed a master inside a master, and the gate refused the third level;
    18.1.1's refuses the nesting itself. Either way the input fails and the other port sees nothing."""
    from segsynth.core.errors import InputError, SourceError

    trap = Trap()
    try:
        with hostile_server(segments, trap) as base, pytest.raises((InputError, SourceError)):
            _read(f"{base}/deep.m3u8")
    finally:
        trap.close()
    assert trap.connections == 0


def test_run_refuses_a_hostile_playlist_with_one_line(tmp_path, segments):
    trap = Trap()
    try:
        with hostile_server(segments, trap) as base:
            r = run_cli("run", f"{base}/nested.m3u8", tmp_path / "o.mp4", *FAST, timeout=120)
    finally:
        trap.close()
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "refused" in lines[0], r.stderr
    assert trap.connections == 0 and not (tmp_path / "o.mp4").exists()


def _local_playlist(folder: Path, segment: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    playlist = folder / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{segment}\n#EXT-X-ENDLIST\n")
    return playlist


def test_a_local_playlist_names_only_files_beside_it(tmp_path, segments):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(segments / "good0.ts", outside / "seg.ts")
    for target in (outside / "seg.ts", "../outside/seg.ts"):
        r = run_cli("run", _local_playlist(tmp_path / "videos", target), tmp_path / "o.mp4", *FAST, timeout=120)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "refused" in lines[0] and "outside" in lines[0], r.stderr
        assert not (tmp_path / "o.mp4").exists()
    shutil.copy(segments / "good0.ts", tmp_path / "videos" / "seg.ts")  # beside it: read
    r = run_cli("run", _local_playlist(tmp_path / "videos", Path("seg.ts")), tmp_path / "o.mp4", *FAST, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(decode_video(tmp_path / "o.mp4")[0]) == 10


def test_file_names_never_reach_ffmpeg_as_protocols(tmp_path, people_clip):
    odd = tmp_path / "pipe:9.mp4"
    shutil.copy(people_clip, odd)
    r = run_cli("run", odd, tmp_path / "o.mp4", *FAST, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(decode_video(tmp_path / "o.mp4")[0]) == len(decode_video(people_clip)[0])


def test_srt_works_or_is_refused_with_the_reason():
    from segsynth.core.config import StreamConfig
    from segsynth.core.errors import InputError
    from segsynth.core.formats import has_protocol

    if has_protocol("srt"):
        pytest.skip("this PyAV's FFmpeg has SRT: it is accepted")
    for source, sinks in (("srt://127.0.0.1:9000", ("o.mp4",)), ("lavfi:testsrc2", ("srt://127.0.0.1:9000",))):
        with pytest.raises(InputError, match="has no SRT support"):
            StreamConfig(source=source, sinks=sinks)


# ---- the service: limits, exclusive outputs, truthful states, validation ----------------------------
def test_limits_exclusive_outputs_and_validation_over_http(tmp_path, tiny_segmenter):
    with service(tmp_path, tiny_segmenter, "--max-outputs", 4) as (base, root, _):
        many = [f"s{i}.mkv" for i in range(2000)]  # a 24 KB body (files under the service's folder, the root)
        status, reply = api(base, "POST", "/v1/streams", {"source": RED, "sinks": many})
        assert status == 422 and reply["field"] == "sinks" and "at most 4 outputs" in reply["error"], reply
        status, reply = api(base, "POST", "/v1/streams", {"source": RED, "sinks": many[:300]})
        assert status == 422 and reply["field"] == "sinks"
        # one writer per path: a second stream on the same file, or on a file another stream reads
        status, _ = api(base, "POST", "/v1/streams", {"id": "first", "source": RED, "sinks": [many[0]]})
        assert status == 201
        status, reply = api(base, "POST", "/v1/streams", {"id": "second", "source": RED, "sinks": [many[0]]})
        assert status == 409 and reply["field"] == "sinks" and "'first'" in reply["error"], reply
        clip = root / "clip.mkv"
        write_clip(clip, [np.full((48, 64, 3), 90, np.uint8)] * 200, [Fraction(i, 25) for i in range(200)])
        status, _ = api(base, "POST", "/v1/streams", {"id": "reader", "source": str(clip), "sinks": [many[1]],
                                                      "policy": "latest"})
        assert status == 201
        status, reply = api(base, "POST", "/v1/streams", {"id": "clobber", "source": RED, "sinks": [str(clip)]})
        assert status == 409 and "source of stream 'reader'" in reply["error"], reply
        # every number finite; each error names its own field
        body = b'{"source": "%s", "sinks": ["%s"], "duration": Infinity}' % (RED.encode(), many[2].encode())
        status, reply = api(base, "POST", "/v1/streams", raw=body)
        assert status == 422 and reply["field"] == "duration", reply
        status, reply = api(base, "POST", "/v1/streams", {"source": RED, "view": "sepia"})
        assert status == 422 and reply["field"] == "view", reply  # not "sinks: at least one output"
        status, reply = api(base, "POST", "/v1/streams", {"source": RED, "sinks": [str(root / "no" / "o.mkv")]})
        assert status == 422 and reply["field"] == "sinks" and "does not exist" in reply["error"], reply
        for stream in ("first", "reader"):
            assert api(base, "DELETE", f"/v1/streams/{stream}")[0] == 200
        # a path is free again once its stream is gone
        assert api(base, "POST", "/v1/streams", {"id": "again", "source": RED, "sinks": [many[0]]})[0] == 201


def test_the_token_comes_before_the_body_and_deep_form_fields_are_422(tmp_path, tiny_segmenter, tiny_generator):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    auth = {"Authorization": "Bearer s3cret"}
    with service(tmp_path, tiny_segmenter, "--token-file", token_file, generator=tiny_generator) as (base, _, _):
        for raw in (b'{"source": ', b'{"source": "x", "duration": Infinity}', b"[" * 100000):
            assert api(base, "POST", "/v1/streams", raw=raw)[0] == 401  # not 400/413/422: nothing was read
        assert api(base, "POST", "/v1/streams", raw=b'{"source": ', headers=auth)[0] == 400
        import io
        import urllib.request

        from PIL import Image

        png = io.BytesIO()
        Image.fromarray(np.zeros((64, 64), np.uint8), "L").save(png, "PNG")
        for z, limit in (("[" * 5000 + "]" * 5000, "a JSON list"), ("1," * 40000, "at most")):
            boundary = "b0undary"
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"labels\"; filename=\"l.png\"\r\n"
                    "Content-Type: image/png\r\n\r\n").encode() + png.getvalue() + (
                   f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"z\"\r\n\r\n{z}\r\n"
                   f"--{boundary}--\r\n").encode()
            req = urllib.request.Request(f"{base}/v1/synthesize", data=body, method="POST", headers={
                **auth, "Content-Type": f"multipart/form-data; boundary={boundary}"})
            try:
                urllib.request.urlopen(req, timeout=60)
                status, reply = 200, {}
            except urllib.error.HTTPError as exc:
                status, reply = exc.code, json.loads(exc.read())
            assert status == 422 and reply["field"] == "z" and limit in reply["error"], (status, reply)


def test_without_a_media_root_the_service_reads_and_writes_no_files(tmp_path, tiny_segmenter):
    from segsynth.core.errors import ServiceError
    from segsynth.serve.service import Service
    from segsynth.stream.infer.models import ModelSet

    with ModelSet.load(str(tiny_segmenter), "none") as models:
        svc = Service(models)
        for spec, field in (({"source": "/etc/passwd", "sinks": ["rtmp://127.0.0.1:1/x"]}, "source"),
                            ({"source": RED, "sinks": [str(tmp_path / "o.mkv")]}, "sinks")):
            with pytest.raises(ServiceError, match="without --media-root") as caught:
                svc.add(spec)
            assert caught.value.status == 403 and caught.value.field == field
        assert not (tmp_path / "o.mkv").exists()


def test_token_on_the_command_line_is_warned_about():
    r = run_cli("serve", "--token", "visible", "--host", "0.0.0.0", "--max-streams", "0", timeout=60)
    assert r.returncode == 2 and "visible to every user" in r.stderr and "--token-file" in r.stderr, r.stderr


def test_a_delete_that_times_out_aborts_and_the_stream_stays_listed_until_gone():
    """Service.remove with a session whose threads take long to end (a fake session, isolating
    the service's bookkeeping): aborted, listed as removing, forgotten once it has ended."""
    from segsynth.serve.service import Service

    class SlowSession:
        id, state, released = "slow", "running", False

        def __init__(self) -> None:
            self.stops, self.ended = [], threading.Event()

        def stop(self, drain=True):
            self.stops.append(drain)

        def join(self, timeout=None):
            return self.ended.wait(timeout)

        def stats(self):
            from segsynth.stream import StreamStats

            return StreamStats(self.id, self.state, "lavfi:testsrc2", [], "labels")

        def release(self):
            self.released = True

    svc = Service(models=None)
    slow = SlowSession()
    svc.sessions["slow"] = slow
    gone, _ = svc.remove("slow", timeout=0.2, abort_timeout=0.2)
    assert not gone and slow.stops == [True, False]  # drained, then aborted
    assert svc.describe(slow)["state"] == "removing" and "slow" in svc.sessions
    assert svc.remove("slow", timeout=5)[0] is False  # a second DELETE does not wait again
    slow.ended.set()
    deadline = time.monotonic() + 5
    while "slow" in svc.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "slow" not in svc.sessions and slow.released


def test_add_and_delete_free_encoders_and_their_threads_without_the_collector(tmp_path, tiny_segmenter):
    import gc

    from segsynth.core import metrics
    from segsynth.serve.service import Service
    from segsynth.stream.infer.models import ModelSet

    with ModelSet.load(str(tiny_segmenter), "none") as models:
        svc = Service(models, media_root=tmp_path)

        def cycle(i: int) -> None:  # x264 with frame threads, and an H.264 decoder with its own
            svc.add({"id": f"c{i}", "source": str(clip), "sinks": [str(tmp_path / f"c{i}.mp4")], "policy": "latest"})
            time.sleep(0.3)
            assert svc.remove(f"c{i}")[0]

        clip = tmp_path / "in.mp4"
        write_clip(clip, [np.full((120, 160, 3), i, np.uint8) for i in range(100)], [Fraction(i, 25) for i in range(100)])
        cycle(0)  # first-use allocations (onnxruntime's pool, ...)
        gc.collect()
        gc.disable()
        try:
            before = metrics.os_threads()
            for i in range(1, 21):
                cycle(i)
            after = metrics.os_threads()
        finally:
            gc.enable()
    assert after == before, (before, after)
    text = metrics.process_exposition().decode()
    value = float(re.search(r"^segsynth_process_threads (\S+)$", text, re.MULTILINE)[1])
    assert value == metrics.os_threads() > threading.active_count()  # the kernel's count: native threads too


@needs_rtsp_server
def test_a_camera_given_up_is_failed_in_the_api_and_in_metrics_and_the_alert_fires(tmp_path, tiny_segmenter):
    port = free_port()
    with service(tmp_path, tiny_segmenter) as (base, root, _):
        with rtsp_camera(port, lifetime=5):  # goes away for good
            status, _ = api(base, "POST", "/v1/streams", {"id": "door", "source": f"rtsp://127.0.0.1:{port}/live",
                                                          "sinks": [str(root / "door.mkv")], "reconnect_max": 1})
            assert status == 201
            deadline = time.monotonic() + 60
            while api(base, "GET", "/v1/streams/door")[1]["state"] != "failed":
                assert time.monotonic() < deadline, api(base, "GET", "/v1/streams/door")
                time.sleep(0.5)
        status, door = api(base, "GET", "/v1/streams/door")
        assert re.search(r"gave up after 1 reconnect attempt", door["stats"]["error"]), door
        assert series(base, "segsynth_stream_up", stream="door") == 0
        assert series(base, "segsynth_stream_state", stream="door", state="failed") == 1
        assert len(decode_video(root / "door.mkv")[0]) >= 5  # what was recorded is kept
        _assert_alert_fires(base, "door", tmp_path)
        assert api(base, "DELETE", "/v1/streams/door")[0] == 200
        assert series(base, "segsynth_stream_up", stream="door") is None


def _assert_alert_fires(base: str, stream: str, tmp_path: Path) -> None:
    """The shipped SegsynthStreamDown rule, fed the stream's series as scraped now (held for
    5 minutes), fires within its 1 minute (promtool test rules)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            raise AssertionError("promtool is missing (.ci/run installs prometheus)")
        return
    from conftest import REPO

    status, text = api(base, "GET", "/metrics")
    lines = [ln for ln in text.splitlines() if re.match(rf"segsynth_stream_(up|state)\{{.*stream=\"{stream}\"", ln)]
    assert lines, text
    inputs = [{"series": line.rsplit(" ", 1)[0][:-1] + ', job="segsynth", instance="s:8080"}',
               "values": f"{float(line.rsplit(' ', 1)[1]):g}x20"} for line in lines]
    import yaml

    rules = REPO / "deploy" / "prometheus" / "alerts.yml"
    rule = next(r for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == "SegsynthStreamDown")

    def expected(line: str) -> dict:
        labels = {**json.loads(_labels(line)), "job": "segsynth", "instance": "s:8080"}
        annotations = {k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m[1]], v)
                       for k, v in rule["annotations"].items()}
        return {"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": annotations}

    test = {"rule_files": [str(rules)], "evaluation_interval": "15s",
            "tests": [{"interval": "15s", "input_series": inputs, "alert_rule_test": [
                {"eval_time": "2m", "alertname": "SegsynthStreamDown",
                 "exp_alerts": [expected(line) for line in lines if _fires(line)]}]}]}
    path = tmp_path / "scraped.test.yml"
    path.write_text(json.dumps(test))
    r = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _labels(line: str) -> str:
    return json.dumps(dict(re.findall(r'(\w+)="([^"]*)"', line.split("{", 1)[1].rsplit("}", 1)[0])))


def _fires(line: str) -> bool:
    value = float(line.rsplit(" ", 1)[1])
    return (line.startswith("segsynth_stream_up") and value == 0) or ('state="failed"' in line and value == 1)


# ---- outputs that fail: a full disk ---------------------------------------------------------------------
@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or 'mount failed'}); needs root or "
                    "CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_fails_run_with_3_and_keeps_both_outputs(tmp_path, people_clip):
    clip = tmp_path / "long.mkv"
    write_clip(clip, [np.random.default_rng(i).integers(0, 255, (120, 160, 3), np.uint8) for i in range(150)],
               [Fraction(i, 25) for i in range(150)])
    with small_tmpfs(tmp_path / "full", "64k") as full:  # side by side: the noise too, 3 MB or so
        r = run_cli("run", clip, full / "o.mp4", tmp_path / "ok.mp4", *FAST, "--view", "side-by-side", timeout=300)
        recorded = (full / "o.mp4").stat().st_size if (full / "o.mp4").exists() else 0
    assert r.returncode == 3, r.stderr
    assert re.search(rf"error: output {re.escape(str(full / 'o.mp4'))} failed: .*; {re.escape(str(tmp_path))}"
                     r"/ok\.mp4 complete", r.stderr), r.stderr
    assert f"wrote {tmp_path / 'ok.mp4'} (" in r.stderr  # the summary names what was written, only that
    assert recorded > 0  # what it recorded before the disk filled is kept
    assert len(decode_video(tmp_path / "ok.mp4")[0]) == 150


# ---- transcode: workers die with their parent -----------------------------------------------------------
def test_killing_the_transcode_parent_leaves_no_worker_and_no_unrecorded_output(tmp_path):
    import psutil

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(4):
        write_clip(src / f"{i}.mp4", [np.random.default_rng(k).integers(0, 255, (96, 128, 3), np.uint8)
                                      for k in range(120)], [Fraction(k, 25) for k in range(120)])
    proc = subprocess.Popen([str(Path(sys.executable).with_name("segsynth")), "transcode", str(src), "--out", str(out),
                             "--jobs", "2", *FAST], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob(".*.partial-*"))) < 2:  # both workers are writing
            assert time.monotonic() < deadline and proc.poll() is None, "the workers did not start"
            time.sleep(0.1)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2
        proc.kill()  # the driver only; its workers are not signalled
        proc.wait(10)
        killed = time.monotonic()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers alive {time.monotonic() - killed:.1f} s after their parent was killed: {alive}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
    manifest = out / "manifest.jsonl"
    recorded = {json.loads(line)["output"] for line in manifest.read_text().splitlines()} if manifest.exists() else set()
    finals = {str(p) for p in out.glob("*.mp4") if not p.name.startswith(".")}
    assert finals <= recorded  # no output finished behind the manifest's back
    r = run_cli("transcode", src, "--out", out, "--resume", *FAST, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("*.mp4"))) == 4 and not list(out.glob(".*.partial-*"))
