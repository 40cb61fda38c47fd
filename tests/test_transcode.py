"""segsynth transcode: a folder of clips with bad files among them, kill -9 and --resume,
signals, and the same batch on a real local Ray cluster whose second node dies mid-task."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import decode_video, run_cli, write_clip

# plumbing: the small VOC segmenter, no generator (the pipeline is what is tested)
FAST = ["--segmenter", "voc", "--generator", "none", "--view", "labels", "--stabilize", "off"]


def _batch(root: Path, frames: int = 6) -> Path:
    """6 files: 3 clips at the top, 1 in a subfolder, a corrupt .mp4, a text file named .mp4."""
    src = root / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a.mp4", "b.mp4", "c.mp4", "sub/d.mp4"]):
        pictures = [np.roll(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), k, 1) for k in range(frames)]
        write_clip(src / name, pictures, [Fraction(k, 25) for k in range(frames)], audio_seconds=0.2 if i == 0 else 0)
    (src / "broken.mp4").write_bytes(rng.bytes(30000))
    (src / "notes.mp4").write_text("not a video\n" * 40)
    return src


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _final_outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.mp4") if not p.name.startswith("."))


def test_a_folder_with_bad_files_gives_four_outputs_and_two_reasons(tmp_path):
    src, out = _batch(tmp_path), tmp_path / "out"
    proc = run_cli("transcode", src, "--out", out, "--recursive", "--jobs", "2", *FAST)
    assert proc.returncode == 1, proc.stderr  # not everything succeeded
    assert [p.relative_to(out).as_posix() for p in _final_outputs(out)] == ["a.mp4", "b.mp4", "c.mp4", "sub/d.mp4"]
    for path in _final_outputs(out):
        assert len(decode_video(path)[0]) == 6
    records = {Path(r["input"]).name: r for r in _manifest(out)}
    assert {n: r["status"] for n, r in records.items()} == {"a.mp4": "done", "b.mp4": "done", "c.mp4": "done",
                                                            "d.mp4": "done", "broken.mp4": "failed",
                                                            "notes.mp4": "failed"}
    for name in ("broken.mp4", "notes.mp4"):
        assert "not a readable video" in records[name]["error"]
    done = records["a.mp4"]
    assert done["frames"] == 6 and done["sha256"] and done["size"] == (src / "a.mp4").stat().st_size and done["fps"] > 0
    assert len({r["worker"] for r in records.values() if r["status"] == "done"}) == 2  # two workers shared the files
    assert sum(r["load_seconds"] > 0 for r in records.values()) == 2  # models loaded once per worker
    assert "6 files: 4 done, 0 skipped, 2 failed" in proc.stdout
    assert "broken.mp4: " in proc.stdout and "notes.mp4: " in proc.stdout
    assert not list(out.rglob(".*.partial-*"))
    # --resume: the good files are skipped, the bad ones tried again; other settings run again
    proc = run_cli("transcode", src, "--out", out, "--recursive", "--resume", *FAST)
    assert proc.returncode == 1 and "6 files: 0 done, 4 skipped, 2 failed" in proc.stdout
    proc = run_cli("transcode", src / "a.mp4", "--out", out, "--resume", *FAST[:-2], "--stabilize", "hysteresis")
    assert proc.returncode == 0 and "1 files: 1 done, 0 skipped" in proc.stdout


def test_bad_arguments_fail_before_any_work(tmp_path):
    src = _batch(tmp_path)
    assert run_cli("transcode", tmp_path / "nowhere", "--out", tmp_path / "o", *FAST).returncode == 2
    proc = run_cli("transcode", src, "--out", tmp_path / "o", "--pattern", "*.avi", *FAST)
    assert proc.returncode == 2 and "no input files" in proc.stderr
    proc = run_cli("transcode", src, "--out", tmp_path / "o", "--ext", "txt", *FAST)
    assert proc.returncode == 2 and "--ext" in proc.stderr
    proc = run_cli("transcode", src, "--out", tmp_path / "o", "--jobs", "0", *FAST)
    assert proc.returncode == 2


def _start(args: list, **kwargs) -> subprocess.Popen:
    script = Path(sys.executable).with_name("segsynth")
    return subprocess.Popen([str(script), "transcode", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, **kwargs)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_kill_9_half_way_then_resume_finishes_only_the_rest(tmp_path):
    src, out = _batch(tmp_path, frames=40), tmp_path / "out"
    proc = _start([src, "--out", out, "--recursive", *FAST], start_new_session=True)
    try:
        _wait_for(lambda: (out / "manifest.jsonl").is_file() and
                  sum(r["status"] == "done" for r in _manifest(out)) >= 2, 240, "two files done")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-file
        proc.communicate()
    before = {r["input"] for r in _manifest(out) if r["status"] == "done"}
    for path in _final_outputs(out):  # whatever has a final name is complete
        assert len(decode_video(path)[0]) == 40, path
    resumed = run_cli("transcode", src, "--out", out, "--recursive", "--resume", *FAST)
    assert resumed.returncode == 1, resumed.stderr  # the two bad files fail again
    records = _manifest(out)[-6:]
    assert {r["input"] for r in records if r["status"] == "skipped"} == before
    assert {r["input"] for r in records if r["status"] == "done"} == {
        str(p.resolve()) for p in (src / "a.mp4", src / "b.mp4", src / "c.mp4", src / "sub" / "d.mp4")} - before
    assert len(_final_outputs(out)) == 4 and not list(out.rglob(".*.partial-*"))
    for path in _final_outputs(out):
        assert len(decode_video(path)[0]) == 40, path


def test_sigterm_starts_no_new_file_and_lets_the_running_one_finish(tmp_path):
    src, out = _batch(tmp_path, frames=40), tmp_path / "out"
    proc = _start([src, "--out", out, "--recursive", "--jobs", "1", *FAST])
    try:
        _wait_for(lambda: any(out.rglob(".*.partial-*")), 240, "a file being written")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    records = _manifest(out)
    assert len(records) == 1 and records[0]["status"] == "done"  # the running file finished; nothing new started
    assert len(_final_outputs(out)) == 1 and not list(out.rglob(".*.partial-*"))
    assert "5 not started" in stdout


def test_a_worker_that_dies_mid_file_is_replaced_and_its_file_retried(tmp_path):
    import psutil

    src, out = _batch(tmp_path, frames=40), tmp_path / "out"
    for bad in ("broken.mp4", "notes.mp4"):
        (src / bad).unlink()
    proc = _start([src, "--out", out, "--recursive", "--jobs", "1", "--retry", "1", *FAST])
    try:
        _wait_for(lambda: any(out.rglob(".*.partial-*")), 240, "a file being written")
        (worker,) = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        worker.kill()
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    records = _manifest(out)
    assert [r["status"] for r in records] == ["done"] * 4
    assert sorted(r["attempts"] for r in records) == [1, 1, 1, 2]  # the killed file, once more on a new worker
    assert {r["worker"] for r in records} == {"worker-2"}  # the first died on its first file: its replacement
    assert len(_final_outputs(out)) == 4
    assert not list(out.rglob(".*.partial-*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raylet_of(port: int):
    import psutil

    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "raylet" and f"--node_manager_port={port}" in " ".join(p.info["cmdline"] or []):
            return p
    return None


@pytest.mark.slow  # a real Ray cluster of two nodes: about a minute
def test_the_batch_on_a_ray_cluster_survives_a_node_dying_mid_task(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    import psutil

    ray_cli = str(Path(sys.executable).with_name("ray"))
    src, out = _batch(tmp_path, frames=60), tmp_path / "out"
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head, node_port = _free_port(), _free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([ray_cli, "start", "--head", "--port", str(head), "--include-dashboard", "false",
                        "--temp-dir", temp, *common], check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([ray_cli, "start", "--address", f"127.0.0.1:{head}", "--node-manager-port", str(node_port),
                        *common], check=True, env=env, capture_output=True, timeout=120)
        raylet = _raylet_of(node_port)
        assert raylet is not None
        import ray

        ray.init(address=f"127.0.0.1:{head}", _node_ip_address="127.0.0.1", logging_level="ERROR")
        try:
            second = next(n["NodeID"] for n in ray.nodes() if n["NodeManagerPort"] == node_port)[:8]
        finally:
            ray.shutdown()
        proc = _start([src, "--out", out, "--recursive", "--ray", f"127.0.0.1:{head}", "--retry", "2", *FAST],
                      env=env)
        try:
            # the second node's worker takes a file: kill its raylet while the file is being written
            _wait_for(lambda: any("ray_task" in " ".join(c.cmdline()) or c.name().startswith("ray::ray_task")
                                  for c in raylet.children(recursive=True) if c.is_running()), 240,
                      "a file on the second node")
            time.sleep(1.0)
            raylet.kill()
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 1, stderr  # the two bad files
        records = {Path(r["input"]).name: r for r in _manifest(out)}
        assert sorted(n for n, r in records.items() if r["status"] == "done") == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]
        assert {records[n]["status"] for n in ("broken.mp4", "notes.mp4")} == {"failed"}
        assert len(_final_outputs(out)) == 4 and not list(out.rglob(".*.partial-*"))
        for path in _final_outputs(out):
            assert len(decode_video(path)[0]) == 60, path
        # the file the second node was writing when it died was done again by the first
        assert second not in {r["worker"] for r in records.values()}
        assert not psutil.pid_exists(raylet.pid) or raylet.status() == psutil.STATUS_ZOMBIE
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
