"""``segsynth serve`` on loopback: a real uvicorn server started here (the installed command),
its HTTP API and /metrics, scraped by a real Prometheus; and the Service under it, in
process, for the leak check (16 streams added and removed 50 times)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.network
RED = "lavfi:color=c=red:size=160x120:rate=10"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, method: str, path: str, body=None, *, raw: bytes | None = None, headers: dict | None = None):
    """(status, decoded JSON or text) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            status, text = reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@contextlib.contextmanager
def service(tmp_path: Path, segmenter: Path, *args, generator: str | Path = "none", env: dict | None = None):
    port = free_port()
    root = tmp_path / "media"
    root.mkdir(exist_ok=True)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("segsynth")), "serve", "--port", str(port),
                             "--segmenter", str(segmenter), "--generator", str(generator), "--media-root", str(root),
                             "--grace", "10", *map(str, args)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if api(base, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the service did not come up"
            time.sleep(0.2)
        yield base, root, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def series(base: str, name: str, /, **labels) -> float | None:
    """The value of one series in /metrics, or None when it is not there."""
    status, text = api(base, "GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m[1] for k, v in labels.items()):
            return float(m[2])
    return None


def snapshot(url: str) -> np.ndarray:
    from PIL import Image

    with urllib.request.urlopen(url, timeout=30) as reply:
        return np.asarray(Image.open(io.BytesIO(reply.read())).convert("RGB"))


def voc_class_of_red(segmenter: Path) -> str:
    """The class the tiny segmenter gives a flat red picture (onnxruntime run here, on the
    DeepLab contract's input: RGB scaled to -1..1, NCHW)."""
    import onnxruntime

    from segsynth.core import labels

    sess = onnxruntime.InferenceSession(str(segmenter), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 3, 64, 64), np.float32)
    x[:, 0], x[:, 1:] = 1.0, -1.0
    ids = np.argmax(sess.run(None, {sess.get_inputs()[0].name: x})[0], axis=1)
    return labels.get("voc").classes[int(np.bincount(ids.ravel()).argmax())]


def test_streams_metrics_live_patch_and_delete_on_a_real_server(tmp_path, tiny_segmenter, people_clip):
    with service(tmp_path, tiny_segmenter) as (base, root, _):
        preview = free_port()
        status, live = api(base, "POST", "/v1/streams", {"id": "cam", "source": RED, "view": "labels",
                                                          "sinks": [str(root / "cam.mkv"), f"mjpeg://127.0.0.1:{preview}"]})
        assert status == 201, live
        assert live["id"] == "cam" and live["state"] == "running"
        shutil.copy(people_clip, root / "clip.mp4")
        status, clip = api(base, "POST", "/v1/streams", {"source": str(root / "clip.mp4"), "stabilize": "flow",
                                                          "sinks": [str(root / "clip-out.mp4")]})
        assert status == 201, clip
        assert clip["config"]["stabilize"] == "flow"
        # frames flow: the counter grows between two scrapes
        first = series(base, "segsynth_frames_total", stream="cam", stage="encode") or 0
        time.sleep(1.5)
        assert series(base, "segsynth_frames_total", stream="cam", stage="encode") > first
        # the file stream ends by itself, with every frame
        deadline = time.monotonic() + 30
        while api(base, "GET", f"/v1/streams/{clip['id']}")[1]["state"] != "closed":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert api(base, "GET", f"/v1/streams/{clip['id']}")[1]["stats"]["frames_out"] == 8
        # PATCH the remap: the picture changes without a restart
        before = snapshot(f"http://127.0.0.1:{preview}/snapshot.jpg")[60, 40]
        name = voc_class_of_red(tiny_segmenter)
        target = "cat" if name != "cat" else "dog"
        status, patched = api(base, "PATCH", "/v1/streams/cam", {"remap": f"{name}={target}"})
        assert status == 200, patched
        assert patched["config"]["remap"] == f"{name}={target}"
        deadline = time.monotonic() + 20
        while np.abs(snapshot(f"http://127.0.0.1:{preview}/snapshot.jpg")[60, 40].astype(int) - before).max() < 40:
            assert time.monotonic() < deadline, "the remap did not reach the picture"
            time.sleep(0.3)
        status, listed = api(base, "GET", "/v1/streams")
        assert status == 200 and {s["id"] for s in listed["streams"]} == {"cam", clip["id"]}
        # DELETE drains the stream and removes its series
        status, gone = api(base, "DELETE", "/v1/streams/cam")
        assert status == 200 and gone["stats"]["state"] == "closed"
        assert series(base, "segsynth_frames_total", stream="cam", stage="encode") is None
        assert series(base, "segsynth_stream_up", stream="cam") is None
        assert api(base, "GET", "/v1/streams/cam")[0] == 404
        assert api(base, "DELETE", f"/v1/streams/{clip['id']}")[0] == 200
        # the outputs are complete files
        from conftest import decode_video

        assert len(decode_video(root / "clip-out.mp4")[0]) == 8
        assert len(decode_video(root / "cam.mkv")[0]) >= 10


def test_streams_on_two_model_sets_share_each_and_an_unused_set_goes_after_the_keep_alive(tmp_path, tiny_segmenter):
    """One service, streams on voc (its own set) and on ade20k+voc (loaded on first use, shared
    by the streams that name it, unloaded a keep-alive after the last of them was deleted)."""
    def loaded(base) -> dict:
        status, body = api(base, "GET", "/v1/models")
        assert status == 200, body
        return {(s["segmenter"], s["generator"]): s for s in body["loaded"]}

    with service(tmp_path, "voc", "--max-model-sets", "2", "--model-keep-alive", "1",
                 env={"SEGSYNTH_HOME": str(tmp_path / "home")}) as (base, root, proc):  # no model installed
        for sid, extra in (("a", {}), ("b", {"segmenter": "ade20k+voc"}), ("c", {"segmenter": "ade20k+voc"})):
            status, body = api(base, "POST", "/v1/streams", {"id": sid, "source": RED, "view": "labels",
                                                              "sinks": [str(root / f"{sid}.mkv")], **extra})
            assert status == 201, body
        sets = loaded(base)
        assert sets.keys() == {("voc", "none"), ("ade20k+voc", "none")}
        assert sets["voc", "none"]["streams"] == ["a"] and sets["voc", "none"]["default"]
        assert sets["ade20k+voc", "none"]["streams"] == ["b", "c"] and sets["ade20k+voc", "none"]["load_seconds"] > 0
        assert series(base, "segsynth_model_loaded", name="ade20k+voc") == 1
        assert series(base, "segsynth_model_set_streams", segmenter="ade20k+voc") == 2
        names = {m["name"]: m for m in api(base, "GET", "/v1/models")[1]["available"]}
        assert names["voc"]["state"] == "bundled" and names["coco"]["state"] == "not installed"
        # model files load from under --media-root only
        status, body = api(base, "POST", "/v1/streams", {"source": RED, "sinks": [str(root / "x.mkv")],
                                                          "segmenter": str(tiny_segmenter)})
        assert status == 403 and body["field"] == "segmenter", body
        # a third set does not fit: refused with the reason, nothing loaded
        shutil.copy(tiny_segmenter, root / "tiny.onnx")
        third = {"source": RED, "sinks": [str(root / "d.mkv")], "segmenter": str(root / "tiny.onnx")}
        status, body = api(base, "POST", "/v1/streams", third)
        assert status == 503 and "--max-model-sets" in body["error"], body
        status, body = api(base, "POST", "/v1/streams", {"source": RED, "sinks": [str(root / "e.mkv")],
                                                          "segmenter": "ade20k+vocc"})
        assert status == 422 and body["field"] == "segmenter" and "did you mean" in body["error"], body
        # deleting its last stream: still loaded for the keep-alive, then gone (and there is room)
        assert api(base, "DELETE", "/v1/streams/b")[0] == 200
        assert loaded(base)["ade20k+voc", "none"]["streams"] == ["c"]
        assert api(base, "DELETE", "/v1/streams/c")[0] == 200
        deadline = time.monotonic() + 20
        while ("ade20k+voc", "none") in loaded(base):
            assert time.monotonic() < deadline, "the unused model set was not unloaded"
            time.sleep(0.2)
        assert series(base, "segsynth_model_loaded", name="ade20k+voc") is None
        status, body = api(base, "POST", "/v1/streams", third)
        assert status == 201, body
        assert loaded(base)[str(root / "tiny.onnx"), "none"]["streams"] == [body["id"]]
        for sid in ("a", body["id"]):
            assert api(base, "DELETE", f"/v1/streams/{sid}")[0] == 200
    assert len(re.findall(r"model set ade20k\+voc\+none\+\w+: loaded", proc.stderr.read())) == 1  # once, for b and c


def test_bad_requests_are_4xx_with_a_clear_json_error(tmp_path, tiny_segmenter):
    with service(tmp_path, tiny_segmenter) as (base, root, _):
        out = str(root / "o.mkv")
        cases = [
            ({"source": RED, "sinks": [out], "colour": "red"}, 422, "colour"),
            ({"source": RED, "sinks": [out], "remap": "person=unobtainium"}, 422, "remap"),
            ({"source": "gopher://127.0.0.1/x", "sinks": [out]}, 422, "source"),
            ({"source": "/etc/hostname", "sinks": [out]}, 403, "source"),
            ({"source": RED, "sinks": ["/tmp/elsewhere.mkv"]}, 403, "sinks"),
            ({"source": RED, "sinks": [out], "view": "sepia"}, 422, "view"),
            ({"source": RED, "sinks": [out], "stabilize": "median"}, 422, "stabilize"),
            ({"source": RED, "sinks": [out], "seed": "many"}, 422, "seed"),
            ({"source": RED, "sinks": [out], "segmenter": "no-such-model"}, 422, "segmenter"),
            ({"source": RED, "sinks": [out], "models": "fastest"}, 422, "models"),
            ({"sinks": [out]}, 422, "source"),
            ({"source": "lavfi:color=s=64x64,drawtext=textfile=/etc/passwd", "sinks": [out]}, 422, "source"),
            ({"source": "http://[", "sinks": [out]}, 422, "source"),
            ({"source": RED, "sinks": ["mjpeg://0.0.0.0:9"]}, 403, "sinks"),
            ({"source": RED, "sinks": [out], "seed": -1}, 422, "seed"),
            ({"source": RED, "sinks": [out], "style": "/etc/hostname"}, 403, "style"),
            ({"source": "a\u0000b", "sinks": [out]}, 422, "source"),
        ]
        for body, code, field in cases:
            status, reply = api(base, "POST", "/v1/streams", body)
            assert status == code and reply["field"] == field and reply["error"], (body, status, reply)
        status, reply = api(base, "POST", "/v1/streams", raw=b'{"source": ')
        assert status == 400 and "malformed JSON" in reply["error"]
        status, reply = api(base, "POST", "/v1/streams", raw=json.dumps({"source": "x" * 70000}).encode())
        assert status == 413 and "65536 bytes" in reply["error"]
        for method in ("GET", "PATCH", "DELETE"):
            status, reply = api(base, method, "/v1/streams/nope", {} if method == "PATCH" else None)
            assert status == 404 and "nope" in reply["error"], (method, reply)
        status, made = api(base, "POST", "/v1/streams", {"id": "twice", "source": RED, "sinks": [out]})
        assert status == 201
        assert api(base, "POST", "/v1/streams", {"id": "twice", "source": RED, "sinks": [str(root / "p.mkv")]})[0] == 409
        status, reply = api(base, "PATCH", "/v1/streams/twice", {"view": "ids"})
        assert status == 422 and reply["field"] == "view"
        status, reply = api(base, "PATCH", "/v1/streams/twice", {"source": "x"})
        assert status == 422 and reply["field"] == "source"
        assert {p.name for p in root.iterdir()} <= {"o.mkv"}  # refused streams wrote nothing
        # the OpenAPI document, and schemathesis finds no server error in it
        status, schema = api(base, "GET", "/openapi.json")
        assert status == 200 and "/v1/streams" in schema["paths"]
        st = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
        r = subprocess.run([st, "--no-color", "run", f"{base}/openapi.json", "--checks", "not_a_server_error",
                            "--max-examples", "25"], capture_output=True, text=True, timeout=300,
                           cwd=root)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_tokens_guard_the_api_and_non_loopback_needs_one(tmp_path, tiny_segmenter):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    with service(tmp_path, tiny_segmenter, "--token-file", token_file) as (base, _, _):
        assert api(base, "GET", "/v1/streams")[0] == 401
        assert api(base, "GET", "/v1/streams", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert api(base, "GET", "/v1/streams", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert api(base, "GET", "/metrics")[0] == 200 and api(base, "GET", "/healthz")[0] == 200
        status, ready = api(base, "GET", "/readyz")
        assert status == 200 and ready["status"] == "ready"
    from conftest import run_cli

    r = run_cli("serve", "--host", "0.0.0.0", "--generator", "none", timeout=60)
    assert r.returncode == 2 and "needs --token" in r.stderr, r.stderr


def test_boot_config_streams_and_sigterm_drains_them(tmp_path, tiny_segmenter):
    root = tmp_path / "media"
    root.mkdir()
    config = tmp_path / "streams.yaml"
    config.write_text(f"streams:\n  - id: boot\n    source: \"{RED}\"\n    sinks: [\"{root / 'boot.mp4'}\"]\n")
    with service(tmp_path, tiny_segmenter, "--config", config) as (base, _, proc):
        status, boot = api(base, "GET", "/v1/streams/boot")
        assert status == 200 and boot["state"] == "running"
        time.sleep(1)
        proc.terminate()
        assert proc.wait(30) == 0
    from conftest import decode_video

    times, _ = decode_video(root / "boot.mp4")  # drained: flushed and closed
    assert len(times) >= 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("streams:\n  - source: gopher://x\n    sinks: [o.mp4]\n")
    from conftest import run_cli

    r = run_cli("serve", "--config", bad, "--segmenter", tiny_segmenter, "--generator", "none",
                "--port", free_port(), timeout=60)
    assert r.returncode == 2 and "stream 1: gopher://x: not a supported input" in r.stderr, r.stderr


def test_prometheus_scrapes_the_service(tmp_path, tiny_segmenter):
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prometheus and promtool) and os.environ.get("CI") != "true":
        pytest.skip("prometheus not installed (apt-get install prometheus; .ci/run does)")
    with service(tmp_path, tiny_segmenter) as (base, root, _):
        for name in ("scraped", "second"):
            assert api(base, "POST", "/v1/streams", {"id": name, "source": RED,
                                                     "sinks": [str(root / f"{name}.mkv")]})[0] == 201
        time.sleep(2)
        status, text = api(base, "GET", "/metrics")
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout + lint.stderr
        assert "_created" not in text  # prometheus-client's timestamps per series: left out
        assert 'segsynth_stream_fps{stream="scraped"}' in text and 'segsynth_stream_fps{stream="second"}' in text
        stages = {m for m in re.findall(r'segsynth_frames_total\{[^}]*stage="(\w+)"', text)}
        assert stages == {"decode", "infer", "encode"}, stages  # the stats' words (GET /v1/streams' "stages")
        port = free_port()
        (tmp_path / "prom.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: segsynth\n    static_configs:\n      - targets: ['{base[7:]}']\n")
        prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prom.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            query = urllib.parse.quote('rate(segsynth_frames_total{stage="encode"}[30s]) > 0')
            deadline, result = time.monotonic() + 60, []
            while not result and time.monotonic() < deadline:
                time.sleep(1)
                try:
                    status, reply = api(f"http://127.0.0.1:{port}", "GET", f"/api/v1/query?query={query}")
                except OSError:
                    continue
                result = reply["data"]["result"] if status == 200 else []
            assert result, "Prometheus saw no frames"
            assert result[0]["metric"]["stream"] == "scraped" and float(result[0]["value"][1]) > 0
        finally:
            prom.terminate()
            prom.wait(30)


def test_sixteen_streams_added_and_removed_fifty_times_leak_nothing(tmp_path, tiny_segmenter):
    from segsynth.core import metrics
    from segsynth.serve.service import Service
    from segsynth.stream.infer.models import ModelSet

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with ModelSet.load(str(tiny_segmenter), "none") as models:
        svc = Service(models, media_root=tmp_path)
        svc.add({"id": "warm", "source": RED, "sinks": [str(tmp_path / "warm.mkv")]})  # first-use allocations
        svc.remove("warm")
        threads, handles = threading.active_count(), fds()
        for round_ in range(50):
            for i in range(16):
                svc.add({"id": f"s{i}", "source": "lavfi:color=c=blue:size=32x32:rate=5",
                         "sinks": [str(tmp_path / f"s{i}.mkv")], "policy": "latest"})
            if round_ == 0:
                assert threading.active_count() >= threads + 16 * 3
            for i in range(16):
                svc.remove(f"s{i}")
        assert threading.active_count() == threads
        assert fds() == handles
        assert 'stream="s' not in metrics.exposition().decode()
        assert svc.sessions == {} and svc.specs == {}


def test_the_service_reports_each_streams_state_and_a_live_sources_rate():
    """/metrics' per-stream state (a failed stream stays there until deleted) and target fps."""
    from fractions import Fraction
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from segsynth.serve.service import Service

    service = Service(models=None)
    live = SimpleNamespace(live=True, info=SimpleNamespace(rate=Fraction(30000, 1001)))
    service.sessions = {"cam": SimpleNamespace(id="cam", state="running", source=live),
                        "door": SimpleNamespace(id="door", state="failed", source=live),
                        "file": SimpleNamespace(id="file", state="running", source=SimpleNamespace(live=False))}
    text = generate_latest(service.registry).decode()
    assert 'segsynth_stream_state{state="running",stream="cam"} 1.0' in text
    assert 'segsynth_stream_state{state="failed",stream="door"} 1.0' in text
    assert re.findall(r"^segsynth_stream_target_fps\{(.*)\} (.*)$", text, re.M) == [('stream="cam"', "29.97002997002997")]
    service.sessions.clear()
    assert "stream=" not in generate_latest(service.registry).decode()


class _FakeSet:
    """Stands for a loaded ModelSet in the model-set bookkeeping tests (what is tested is ModelSets)."""

    def __init__(self, cfg=None) -> None:
        self.config, self.closed = cfg, 0

    def close(self) -> None:
        self.closed += 1


def test_model_sets_evict_idle_sets_share_failures_and_unload_after_the_keep_alive():
    """ModelSets alone, in process: an idle set makes room for another; a load that fails fails
    every request waiting for it and leaves nothing behind; a set loaded while the service
    shut down is closed; a released set goes after its keep-alive; holders are unique."""
    from segsynth.core.config import ModelConfig
    from segsynth.core.errors import ModelError, ServiceError
    from segsynth.serve.model_sets import ModelSets

    made, gate, fail = [], threading.Event(), {"ade20k"}

    def loader(cfg):
        gate.wait(10)
        if cfg.segmenter in fail:
            raise ModelError(f"--segmenter {cfg.segmenter}: broken")
        made.append(_FakeSet(cfg))
        return made[-1]

    own = _FakeSet()
    sets = ModelSets(own, ModelConfig(segmenter="voc", generator="none"), loader=loader, limit=2, keep_alive=0.2)
    errors = []

    def take(holder, segmenter="ade20k"):
        try:
            sets.acquire(holder, {"segmenter": segmenter})
        except ServiceError as exc:
            errors.append(exc)

    waiting = [threading.Thread(target=take, args=(f"s{i}",)) for i in range(3)]
    for t in waiting:
        t.start()
    time.sleep(0.3)
    gate.set()
    for t in waiting:
        t.join(10)
    assert len(errors) == 3 and all("broken" in str(e) and e.field == "segmenter" for e in errors)
    assert not sets._loading and len(sets.sets) == 1 and made == []  # one load tried, shared by the three
    first = sets.acquire("a", {"segmenter": "ade20k+voc"})
    with pytest.raises(RuntimeError):
        sets.acquire("a", {"segmenter": "voc"})  # one set a holder
    with pytest.raises(ServiceError) as full:
        sets.acquire("b", {"segmenter": str(Path(__file__))})  # limit 2, both held
    assert full.value.status == 503 and "--max-model-sets" in str(full.value)
    sets.release("a")
    sets.release("nobody")  # nothing held: nothing happens
    second = sets.acquire("b", {"generator": "default"})  # the idle set is unloaded early for it
    assert first.closed == 1 and second is made[-1] and second.closed == 0
    assert [s["streams"] for s in sets.status()] == [[], ["b"]]
    sets.release("b")
    deadline = time.monotonic() + 5
    while len(sets.sets) > 1:  # the keep-alive runs out
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert second.closed == 1 and own.closed == 0
    # a set whose load ends after the shutdown is closed, not kept
    gate.clear()
    late = threading.Thread(target=take, args=("c", "ade20k+voc"))
    late.start()
    time.sleep(0.2)
    sets.close()
    gate.set()
    late.join(10)
    assert errors[-1].status == 503 and made[-1].closed == 1 and len(sets.sets) == 1
