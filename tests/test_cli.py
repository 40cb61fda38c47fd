"""The command line: help and version, and bad input reported as one clear line with a
non-zero exit and nothing left behind."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import MEDIA, REPO, run_cli

PHOTO = REPO / "examples" / "astronaut.png"


def _not_a_segmenter(path):
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "adder",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _truncated_mp4(path):
    """Big Buck Bunny cut short: its index (moov) is at the end, so nothing is readable."""
    data = (MEDIA / "bbb_h264_aac_720p_10s.mp4").read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def _write(path, data):
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


# case -> (make (input, output name, extra args) in a work dir, expected message)
BAD_INPUTS = {
    "missing file": (lambda d: (d / "nope.png", "out.png", []), "no such file"),
    "zero-byte file": (lambda d: (_write(d / "empty.mp4", b""), "out.mp4", []), "empty file"),
    "corrupt image": (lambda d: (_write(d / "bad.png", np.random.default_rng(0).bytes(5000)), "out.png", []),
                      "not a readable image"),
    "corrupt video": (lambda d: (_write(d / "bad.mp4", np.random.default_rng(1).bytes(50000)), "out.mp4", []),
                      "not a readable video"),
    "text file named .mp4": (lambda d: (_write(d / "notes.mp4", "just some notes\n" * 50), "out.mp4", []),
                             "not a readable video"),
    "truncated video": (lambda d: (_truncated_mp4(d / "cut.mp4"), "out.mp4", []), "not a readable video"),
    "unknown remap class": (lambda d: (PHOTO, "out.png", ["--remap", "preson=animal"]), "did you mean: person"),
    "output dir missing": (lambda d: (PHOTO, "missing/dir/out.png", []), "does not exist"),
    "not a segmenter": (lambda d: (PHOTO, "out.png", ["--segmenter", _not_a_segmenter(d / "adder.onnx")]),
                        "is not a segmenter"),
    "corrupt onnx": (lambda d: (PHOTO, "out.png", ["--segmenter", _write(d / "x.onnx", b"\x00garbage" * 99)]),
                     "not a usable ONNX model"),
    "image to video": (lambda d: (PHOTO, "out.mp4", []), "is an image but"),
    "unknown output type": (lambda d: (PHOTO, "out.xyz", []), "unknown output type"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_nonzero_and_leaves_nothing(case, tmp_path):
    make, message = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    src, out_name, extra = make(work)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = set(work.iterdir())
    proc = run_cli("segment", src, out_dir / out_name, *extra)
    assert proc.returncode not in (0, None), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("segsynth: error:") and message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert list(out_dir.rglob("*")) == [] and set(work.iterdir()) == before  # no output, no partial file


def test_truncated_video_keeps_the_readable_part_and_says_so(tmp_path, astronaut):
    from fractions import Fraction

    from conftest import decode_video, write_clip

    rng = np.random.default_rng(0)  # noise keeps every frame's packet large, so the cut lands mid-stream
    frames = [np.clip(astronaut[::2, ::2] + rng.integers(-40, 40, (256, 256, 3)), 0, 255).astype(np.uint8)
              for _ in range(24)]
    full = write_clip(tmp_path / "full.mp4", frames, [Fraction(i, 24) for i in range(24)], faststart=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    proc = run_cli("segment", cut, tmp_path / "out.mkv", "--view", "ids", "--segmenter", "voc")
    assert proc.returncode == 0, proc.stderr
    assert "looks truncated or damaged" in proc.stderr and "of the 24 frames" in proc.stderr
    times, _ = decode_video(tmp_path / "out.mkv")
    assert 5 < len(times) < 24 and times == decode_video(full)[0][: len(times)]


def test_refuses_to_overwrite_the_input(tmp_path):
    src = tmp_path / "a.png"
    src.write_bytes(PHOTO.read_bytes())
    proc = run_cli("segment", src, tmp_path / "." / "a.png", "-y")  # not even with -y
    assert proc.returncode != 0 and "would overwrite the input" in proc.stderr
    assert src.read_bytes() == PHOTO.read_bytes()


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("segment", tmp_path / "nope.png", tmp_path / "o.png", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_version_and_help_on_every_subcommand():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("segsynth ")
    top = run_cli("--help")
    assert top.returncode == 0
    commands = ["segment", "export", "labels", "dataset", "train"]
    for cmd in commands:
        assert cmd in top.stdout
        sub = run_cli(cmd, "--help")
        assert sub.returncode == 0 and "usage: segsynth " + cmd in sub.stdout, sub.stdout


def test_an_existing_output_is_refused_unless_y(tmp_path):
    out, clip = tmp_path / "o.png", tmp_path / "o.mp4"
    assert run_cli("segment", PHOTO, out, "--segmenter", "voc").returncode == 0
    first = out.read_bytes()
    for extra in ((), ("-n",)):  # ffmpeg's habit; -n says it explicitly
        proc = run_cli("segment", PHOTO, out, "--segmenter", "voc", "--view", "overlay", *extra)
        said = f"segsynth: error: {out} exists; pass -y (--overwrite) to replace it"
        assert proc.returncode == 3 and proc.stderr.strip() == said, proc.stderr
        assert out.read_bytes() == first
    assert run_cli("segment", PHOTO, out, "--segmenter", "voc", "--view", "overlay", "-y").returncode == 0
    assert out.read_bytes() != first
    # run: -t is --duration, as in ffmpeg; a second run into the same file needs -y
    args = ("run", REPO / "examples" / "demo.mp4", clip, "-t", "0.3", "--segmenter", "voc", "--generator", "none")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "frames_out 8," in proc.stderr, proc.stderr  # 0.3 s of a 25 fps clip; the stats' own words
    size = clip.stat().st_size
    proc = run_cli(*args)
    assert proc.returncode == 3 and f"{clip} exists" in proc.stderr and clip.stat().st_size == size
    assert run_cli(*args, "-y").returncode == 0
    assert run_cli("export", "spade", "--checkpoint", tmp_path, "--out", out).returncode == 3  # before any work


ONE_LINE_ERRORS = {  # arguments -> what the one line says
    "mistyped choice": (["run", "in.mp4", "o.mp4", "--view", "side-by-sid"], "did you mean 'side-by-side'?"),
    "mistyped option": (["run", "in.mp4", "o.mp4", "--viwe", "synth"], "did you mean '--view'?"),
    "mistyped command": (["segmnet", "in.png", "o.png"], "did you mean 'segment'?"),
    "size with *": (["run", "in.mp4", "o.mp4", "--size", "640*360"], "expected WxH, two positive integers joined by x"),
    "export's old HxW": (["export", "spade", "--checkpoint", "ckpt", "--out", "g.onnx", "--size", "256x512"],
                         "did you mean 512x256?"),
    "unknown class": (["segment", str(PHOTO), "o.png", "--remap", "person=unicorn", "--segmenter", "voc"],
                      "its 21 classes: segsynth labels show voc"),
}


@pytest.mark.parametrize("case", list(ONE_LINE_ERRORS))
def test_mistakes_are_one_line_with_the_nearest_word(case, tmp_path):
    args, says = ONE_LINE_ERRORS[case]
    proc = run_cli(*args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    if "error: argument" in proc.stderr or "unrecognized" in proc.stderr:  # argparse's own: where the usage is
        assert "--help'" in proc.stderr


def test_every_subcommand_help_has_a_description_an_example_and_its_defaults():
    import argparse
    import re

    from segsynth.cli import build_parser

    problems = []
    commands = build_parser().get_default("commands")
    crf = {name: commands[name].get_default("crf") for name in ("segment", "run", "transcode")}
    assert len(set(crf.values())) == 1, crf  # one default quality wherever frames are encoded
    nested = {f"{name} {action}": sub for name, parser in commands.items() for a in parser._actions
              if isinstance(a, argparse._SubParsersAction) for action, sub in a.choices.items()}  # models list ...
    for name, parser in {**commands, **nested}.items():
        text = parser.format_help()
        if not parser.description:
            problems.append(f"{name}: no description")
        if "example" not in (parser.epilog or ""):
            problems.append(f"{name}: no example line")
        known = {o for a in parser._actions for o in a.option_strings}
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[-1]
            helped = parser._get_formatter()._expand_help(action) if action.help else ""
            if not helped:
                problems.append(f"{name} {flag}: no help")
            if action.default not in (None, False, True, argparse.SUPPRESS) and "default" not in helped:
                problems.append(f"{name} {flag}: default {action.default!r} not said")
            for other in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", helped):
                if other not in known:
                    problems.append(f"{name} {flag}: mentions {other}, which {name} does not have")
        assert f"usage: segsynth {name}" in text
    assert not problems, "\n".join(problems)


def test_labels_command_lists_and_maps():
    proc = run_cli("labels", "map", "voc", "ade20k")
    assert proc.returncode == 0
    assert "15\tperson\t->\t12\tperson" in proc.stdout and "12\tdog\t->\t126\tanimal" in proc.stdout
    assert "coco-stuff\t182 classes" in run_cli("labels", "list").stdout


def test_quiet_prints_nothing_on_success(tmp_path):
    proc = run_cli("segment", PHOTO, tmp_path / "o.png", "--quiet", "--segmenter", "voc")
    assert proc.returncode == 0 and proc.stderr == ""


@pytest.mark.parametrize("where", ["outside the checkout", "checkout root"])
def test_stream_and_engine_import_without_torch(tmp_path, where):
    # outside the checkout the installed package is imported; in its root, the source tree
    cwd = tmp_path if where == "outside the checkout" else REPO
    code = "import segsynth.stream, segsynth.engine, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=cwd)
    code = ("import sys, segsynth.jobs.segment, segsynth.stream.infer.segmenter, segsynth.engine.onnxruntime, "
            "segsynth.jobs.run, segsynth.stream.pipeline, segsynth.stream.infer.generator, segsynth.stream.session, "
            "segsynth.stream.io.sources, segsynth.stream.io.sinks, segsynth.stream.infer.models, segsynth.core.metrics, segsynth.cli; "
            "from segsynth.stream import ModelSet, StreamConfig, StreamSession; "
            "bad = {'torch', 'tensorrt', 'cuda'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=cwd)
