"""`segsynth run`: stopping (SIGTERM/SIGINT/SIGKILL) and bad input."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import MEDIA, decode_video, run_cli, write_clip

FAST = ["--segmenter", "voc", "--view", "labels", "--no-legend"]


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """400 frames (16 s at 25 fps) with audio: long enough to stop mid-run."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (96, 160, 3), dtype=np.uint8)
    frames = [np.roll(base, 3 * i, axis=1) for i in range(400)]
    return write_clip(tmp_path_factory.mktemp("long") / "long.mp4", frames, [Fraction(i, 25) for i in range(400)],
                      audio_seconds=16)


def _start(args, **kwargs):
    script = Path(sys.executable).with_name("segsynth")
    return subprocess.Popen([str(script), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, **kwargs)


def _wait_for_output(path: Path, proc, min_bytes: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= min_bytes:
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError("the output never appeared")


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_run_drains_and_leaves_a_playable_file(long_clip, tmp_path, signum, code):
    out = tmp_path / "out.mp4"
    proc = _start(["run", long_clip, out, *FAST])
    _wait_for_output(out, proc)
    time.sleep(1.0)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert signal.Signals(signum).name in err and "output holds them" in err
    t_in, _ = decode_video(long_clip)
    t_out, _ = decode_video(out)
    assert 0 < len(t_out) < len(t_in)
    assert t_out == t_in[: len(t_out)]  # the frames done so far, with their timestamps


def test_sigkill_still_leaves_a_playable_fragmented_mp4(long_clip, tmp_path):
    out = tmp_path / "out.mp4"
    proc = _start(["run", long_clip, out, *FAST])
    _wait_for_output(out, proc, min_bytes=20_000)  # a few fragments written
    proc.kill()
    proc.communicate(timeout=60)
    t_out, frames = decode_video(out)
    assert len(t_out) >= 25 and t_out == decode_video(long_clip)[0][: len(t_out)]


def _write(path: Path, data) -> Path:
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


BAD = {
    "missing file": (lambda d: d / "nope.mp4", "no such file"),
    "zero-byte file": (lambda d: _write(d / "empty.mp4", b""), "empty file"),
    "text file named .mp4": (lambda d: _write(d / "notes.mp4", "some notes\n" * 100), "not a readable video"),
    "random bytes": (lambda d: _write(d / "noise.mkv", np.random.default_rng(2).bytes(40000)), "not a readable video"),
    "truncated, index at the end": (lambda d: _write(d / "cut.mp4", (MEDIA / "bbb_h264_aac_720p_10s.mp4")
                                                     .read_bytes()[:500_000]), "not a readable video"),
    "absurd declared size": (lambda d: _write(d / "huge.y4m", b"YUV4MPEG2 W60000 H60000 F25:1 Ip A1:1 C420jpeg\n"
                                                             b"FRAME\n" + b"x" * 100), "not a readable video"),
    "an image": (lambda d: d.parent / "x.png", "is an image; run works on video"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_nothing_written(case, tmp_path):
    make, message = BAD[case]
    work = tmp_path / "in"
    work.mkdir()
    src = make(work)
    out = tmp_path / "out" / "result.mp4"
    out.parent.mkdir()
    proc = run_cli("run", src, out, *FAST)
    assert proc.returncode not in (0, None)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segsynth: error:") and message in lines[0], proc.stderr
    assert list(out.parent.iterdir()) == []


def test_output_must_not_overwrite_the_input_and_its_dir_must_exist(long_clip, tmp_path):
    proc = run_cli("run", long_clip, long_clip.parent / "." / long_clip.name, *FAST, "-y")  # not even with -y
    assert proc.returncode == 3 and "would overwrite the input" in proc.stderr
    proc = run_cli("run", long_clip, tmp_path / "no" / "such" / "dir" / "o.mp4", *FAST)
    assert proc.returncode == 3 and "does not exist" in proc.stderr


def test_a_full_disk_is_reported_and_leaves_no_half_written_output(long_clip, tmp_path):
    out = tmp_path / "out.mp4"

    def small_disk():  # writes past 20 kB (some 40 frames in) fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run([str(Path(sys.executable).with_name("segsynth")), "run", str(long_clip), str(out), *FAST],
                          capture_output=True, text=True, preexec_fn=small_disk, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "writing" in proc.stderr and "failed" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_damaged_middle_is_skipped_and_reported(tmp_path):
    frames = [np.full((96, 160, 3), (i * 20) % 255, np.uint8) for i in range(12)]
    src = write_clip(tmp_path / "in.mkv", frames, [Fraction(i, 25) for i in range(12)], codec="ffv1")
    data = bytearray(src.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 3000] = np.random.default_rng(3).bytes(3000)
    damaged = _write(tmp_path / "damaged.mkv", bytes(data))
    out = tmp_path / "out.mp4"
    proc = run_cli("run", damaged, out, *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "looks truncated or damaged" in proc.stderr
    assert 2 <= len(decode_video(out)[0]) < 12


def test_latest_policy_accounts_for_every_frame(long_clip, tmp_path):
    proc = run_cli("run", long_clip, tmp_path / "o.mp4", *FAST, "--policy", "latest", "--batch", "2")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "frames_in" in ln)
    n_in, n_out, dropped = (int(line.split(f"{w} ")[1].split(",")[0]) for w in ("frames_in", "frames_out", "dropped"))
    assert n_in == 400 and n_out + dropped == n_in
