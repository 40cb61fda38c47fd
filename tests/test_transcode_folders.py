"""transcode on a folder as users have them: camcorder, broadcast, web and raw files made here
with the ffmpeg CLI (lavfi), each found by what FFmpeg reads, each written into a container
that holds its codec; what is not a video is skipped and named; broken files fail with their
reason. And run's rule for an output's extension and --codec."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli

FAST = ["--segmenter", "voc", "--generator", "none", "--view", "labels", "--stabilize", "off"]
SRC = ["-f", "lavfi", "-i", "testsrc2=size={size}:rate=10", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"]
# name -> (ffmpeg output arguments, picture size); every clip is 1 s: 10 frames
KINDS = {
    "camcorder.m2ts": (["-c:v", "libx264", "-c:a", "aac", "-f", "mpegts"], "160x120"),
    "dvd.mpg": (["-c:v", "mpeg2video", "-c:a", "mp2", "-f", "mpeg"], "160x120"),
    "old.wmv": (["-c:v", "wmv2", "-c:a", "wmav2"], "160x120"),
    "flash.flv": (["-c:v", "flv", "-c:a", "aac"], "160x120"),
    "free.ogv": (["-c:v", "libtheora", "-c:a", "libvorbis"], "160x120"),
    "web.webm": (["-c:v", "libvpx-vp9", "-c:a", "libopus", "-deadline", "realtime", "-cpu-used", "8"], "160x120"),
    "vp8.ivf": (["-c:v", "libvpx", "-an"], "160x120"),
    "raw.hevc": (["-c:v", "libx265", "-an", "-f", "hevc"], "160x120"),
    "phone.mov": (["-c:v", "libx264", "-c:a", "aac"], "160x120"),
}
# what each becomes: raw elementary streams (no container) -> .mp4; the rest keep theirs
OUTPUTS = {"camcorder.m2ts": "camcorder.m2ts", "dvd.mpg": "dvd.mpg", "old.wmv": "old.wmv", "flash.flv": "flash.flv",
           "free.ogv": "free.ogv", "web.webm": "web.webm", "vp8.ivf": "vp8.mp4", "raw.hevc": "raw.mp4",
           "phone.mov": "phone.mov"}


def _make(path: Path, args: list[str], size: str) -> None:
    source = [a.format(size=size) for a in SRC]
    if "-an" in args:
        source = source[:4]
    subprocess.run(["ffmpeg", "-v", "error", "-y", *source, "-t", "1", "-shortest", *args, str(path)], check=True,
                   timeout=120)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("real-folder") / "in"
    d.mkdir()
    for name, (args, size) in KINDS.items():
        _make(d / name, args, size)
    upright = d / "upright.mov"  # a phone held upright: rotation metadata (as ffmpeg 5 writes it, on a copy)
    (d / "phone.mov").rename(upright)
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(upright), "-c", "copy", "-metadata:s:v", "rotate=90",
                    str(d / "phone.mov")], check=True, timeout=60)
    upright.unlink()
    good = d / "phone.mov"
    (d / "no-moov.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # cut before its index
    (d / "text.mp4").write_text("not a video\n" * 50)
    (d / "notes.txt").write_text("shot list\n")
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=64x48", "-frames:v", "1",
                    str(d / "cover.jpg")], check=True, timeout=60)
    return d


def _frames(path: Path) -> list:
    """Frames decoded from the first video stream (MPEG-PS keeps no timestamp for frames that
    share a pack, so frames are counted, not their times)."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_every_video_of_a_real_folder_is_transcoded_into_a_container_that_holds_it(tmp_path, folder):
    out = tmp_path / "out"
    r = run_cli("transcode", folder, "--out", out, "--jobs", "2", *FAST, timeout=600)
    assert r.returncode == 1, r.stderr  # two files failed
    records = {Path(rec["input"]).name: rec for rec in _manifest(out)}
    assert {n: rec["status"] for n, rec in records.items()} == {
        **{name: "done" for name in KINDS}, "no-moov.mp4": "failed", "text.mp4": "failed"}, records
    assert "not a readable video" in records["text.mp4"]["error"]
    assert records["no-moov.mp4"]["error"]
    for name, output in OUTPUTS.items():
        assert Path(records[name]["output"]) == out / output and (out / output).is_file(), records[name]
        frames = _frames(out / output)
        assert len(frames) == 10, name
        assert frames[0].shape[:2] == ((160, 120) if name == "phone.mov" else (120, 160)), name  # upright
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [*OUTPUTS.values(), "manifest.jsonl"])  # nothing half-written, nothing for the failed files
    assert "skipped 2 files that are not videos: cover.jpg (a picture), notes.txt (not media FFmpeg reads)" in r.stdout, r.stdout
    webm = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(out / "web.webm")],
                          capture_output=True, text=True, check=True).stdout
    assert {s["codec_name"] for s in json.loads(webm)["streams"]} == {"vp9", "opus"}  # WebM's own codecs
    again = run_cli("transcode", folder, "--out", out, "--jobs", "2", "--resume", *FAST, timeout=600)
    assert again.returncode == 1, again.stderr
    statuses = {Path(rec["input"]).name: rec["status"] for rec in _manifest(out)[len(records):]}
    assert all(statuses[name] == "skipped" for name in KINDS), statuses  # nothing done is redone


def test_an_asked_for_codec_the_container_cannot_hold_moves_the_output(tmp_path, folder):
    src = tmp_path / "in"
    src.mkdir()
    (src / "web.webm").symlink_to(folder / "web.webm")
    out = tmp_path / "out"
    r = run_cli("transcode", src, "--out", out, "--codec", "libx264", *FAST, timeout=300)
    assert r.returncode == 0, r.stderr
    [record] = _manifest(out)
    assert record["output"] == str(out / "web.mkv") and "libx264" in record["note"] and ".webm" in record["note"]
    assert len(_frames(out / "web.mkv")) == 10
    assert r.stdout.count("written as .mkv") == 1, r.stdout


def test_run_picks_the_containers_codec_or_refuses_an_asked_for_one_before_loading_models(tmp_path, folder):
    r = run_cli("run", folder / "phone.mov", tmp_path / "o.webm", *FAST, timeout=300)
    assert r.returncode == 0, r.stderr
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(tmp_path / "o.webm")],
                           capture_output=True, text=True, check=True).stdout
    assert {s["codec_name"] for s in json.loads(probe)["streams"]} == {"vp9", "opus"}
    r = run_cli("run", folder / "phone.mov", tmp_path / "x.webm", "--codec", "libx264", *FAST, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "cannot hold libx264" in lines[0], r.stderr
    assert not (tmp_path / "x.webm").exists()
