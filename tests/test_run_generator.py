"""`segsynth run` with SPADE generators: views, remap, checkpoint directories, style and seed."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from conftest import TINY_ADE_SPADE as ADE
from conftest import decode_video, make_spade_checkpoint, run_cli, write_clip


@pytest.fixture(scope="module")
def setup(tmp_path_factory, astronaut):
    d = tmp_path_factory.mktemp("gen")
    make_spade_checkpoint(d / "ckpt", **ADE)
    make_spade_checkpoint(d / "vae", **{**ADE, "use_vae": True, "z_dim": 8, "crop_size": 256, "ngf": 2})
    onnx_path = d / "g.onnx"
    assert run_cli("export", "spade", "--checkpoint", d / "ckpt", "--out", onnx_path).returncode == 0
    frames = [np.roll(astronaut[::2, ::2], 4 * i, axis=1)[:, :, :] for i in range(6)]
    clip = write_clip(d / "people.mp4", frames, [Fraction(i, 25) for i in range(6)], audio_seconds=0.3)
    return d, onnx_path, clip


@pytest.mark.parametrize("view, shape", [("synth", (256, 256, 3)), ("side-by-side", (256, 512, 3)),
                                         ("grid", (256, 256, 3))])
def test_views_with_a_generator(setup, tmp_path, view, shape):
    d, onnx_path, clip = setup
    out = tmp_path / "o.mp4"
    proc = run_cli("run", clip, out, "--generator", onnx_path, "--view", view, "--segmenter", "voc")
    assert proc.returncode == 0, proc.stderr
    times, frames = decode_video(out)
    assert times == decode_video(clip)[0] and frames[0].shape == shape


def test_synth_is_the_default_view_and_remap_changes_the_picture(setup, tmp_path):
    d, onnx_path, clip = setup
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    proc = run_cli("run", clip, a, "--generator", onnx_path, "--crf", "0")
    assert proc.returncode == 0 and "(view synth)" in proc.stderr, proc.stderr
    assert run_cli("run", clip, b, "--generator", onnx_path, "--crf", "0", "--remap", "person=animal").returncode == 0
    fa, fb = decode_video(a)[1][0].astype(int), decode_video(b)[1][0].astype(int)
    assert np.abs(fa - fb).mean() > 1  # the person region was repainted


def test_checkpoint_directory_is_exported_once_and_cached(setup, tmp_path):
    d, _, clip = setup
    cache = tmp_path / "cache"
    first = run_cli("run", clip, tmp_path / "1.mp4", "--generator", d / "ckpt", "--cache-dir", cache, "--segmenter", "voc")
    assert first.returncode == 0, first.stderr
    assert "exporting" in first.stderr and len(list(cache.glob("spade-*.onnx"))) == 1
    second = run_cli("run", clip, tmp_path / "2.mp4", "--generator", d / "ckpt", "--cache-dir", cache, "--segmenter", "voc")
    assert second.returncode == 0 and "exporting" not in second.stderr


def test_vae_generator_seed_fixes_the_style(setup, tmp_path):
    d, _, clip = setup
    cache = tmp_path / "cache"
    outs = {}
    for name, extra in (("s1", ["--seed", "1"]), ("s1b", ["--seed", "1"]), ("s2", ["--seed", "2"]),
                        ("style", ["--style", str(d.parent / "x.png")])):
        if name == "style":
            from PIL import Image

            Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(d.parent / "x.png")
        out = tmp_path / f"{name}.mkv"
        proc = run_cli("run", clip, out, "--generator", d / "vae", "--cache-dir", cache, "--segmenter", "voc",
                       "--crf", "0", *extra)
        assert proc.returncode == 0, proc.stderr
        outs[name] = decode_video(out)[1]
    assert np.array_equal(outs["s1"][0], outs["s1b"][0])  # same seed, same picture
    assert not np.array_equal(outs["s1"][0], outs["s2"][0])
    assert not np.array_equal(outs["style"][0], outs["s1"][0])


def test_style_needs_a_vae_generator_and_size_must_match(setup, tmp_path, astronaut):
    d, onnx_path, clip = setup
    proc = run_cli("run", clip, tmp_path / "o.mp4", "--generator", onnx_path, "--style", clip)
    assert proc.returncode == 2 and "VAE generator" in proc.stderr
    proc = run_cli("run", clip, tmp_path / "o.mp4", "--generator", onnx_path, "--size", "128x128")
    assert proc.returncode == 2 and "exported at 64x64" in proc.stderr
    proc = run_cli("run", clip, tmp_path / "o.mp4", "--generator", onnx_path, "--size", "100x100")
    assert proc.returncode == 2 and "multiples of 32" in proc.stderr


def test_smoothing_outvotes_a_one_frame_flicker(tmp_path, astronaut):
    still, black = astronaut[::2, ::2], np.zeros((256, 256, 3), np.uint8)
    flicker = write_clip(tmp_path / "flicker.mkv", [still] * 3 + [black] + [still] * 3,
                         [Fraction(i, 25) for i in range(7)], codec="ffv1")  # lossless: equal frames decode equal
    ids = {}
    for k, option in (("1", ["--stabilize", "off"]), ("3", ["--smooth", "3"])):  # --smooth K: majority:K
        out = tmp_path / f"smooth{k}.mkv"
        proc = run_cli("run", flicker, out, "--segmenter", "voc", "--generator", "none", "--view", "ids", *option)
        assert proc.returncode == 0, proc.stderr
        ids[k] = decode_video(out)[1]
    assert (ids["1"][2] == 15).mean() > 0.2 and not (ids["1"][3] == 15).any()  # per frame: the person blinks out
    assert np.array_equal(ids["3"][3], ids["3"][2]) and np.array_equal(ids["3"][3], ids["1"][2])  # smoothed: no blink
    assert np.array_equal(ids["3"][4], ids["1"][2])  # and after it


def test_letterbox_keeps_the_aspect_ratio_and_stretch_does_not(setup, tmp_path, astronaut):
    _, onnx_path, _ = setup
    wide = write_clip(tmp_path / "wide.mkv", [astronaut[::2, ::2][64:192]] * 2, [Fraction(i, 25) for i in range(2)],
                      codec="ffv1")
    square = write_clip(tmp_path / "square.mkv", [astronaut[::2, ::2]] * 2, [Fraction(i, 25) for i in range(2)],
                        codec="ffv1")
    pictures = {}
    for clip in (wide, square):
        for fit in ("letterbox", "stretch"):
            out = tmp_path / f"{clip.stem}-{fit}.mkv"
            proc = run_cli("run", clip, out, "--generator", onnx_path, "--segmenter", "voc", "--fit", fit,
                           "--batch", "2", "--crf", "0")
            assert proc.returncode == 0, proc.stderr
            pictures[clip.stem, fit] = decode_video(out)[1][0].astype(int)
    assert pictures["wide", "letterbox"].shape == pictures["wide", "stretch"].shape == (128, 256, 3)
    assert np.abs(pictures["wide", "letterbox"] - pictures["wide", "stretch"]).mean() > 2  # another generator input
    assert np.array_equal(pictures["square", "letterbox"], pictures["square", "stretch"])  # a square fits either way


def test_bundled_default_generator_synthesizes_out_of_the_box_and_none_opts_out(setup, tmp_path):
    _, _, clip = setup
    synth, labels_only = tmp_path / "s.mp4", tmp_path / "l.mp4"
    proc = run_cli("run", clip, synth, "--segmenter", "voc")
    assert proc.returncode == 0 and "(view synth)" in proc.stderr, proc.stderr
    proc = run_cli("run", clip, labels_only, "--segmenter", "voc", "--generator", "none")
    assert proc.returncode == 0 and "(view labels)" in proc.stderr and "notice" not in proc.stderr, proc.stderr
    (ts, fs), (tl, fl) = decode_video(synth), decode_video(labels_only)
    assert ts == tl == decode_video(clip)[0] and fs[0].shape == fl[0].shape
    assert np.abs(fs[0].astype(int) - fl[0].astype(int)).mean() > 10  # painted, not the colour map
    bad = run_cli("run", clip, tmp_path / "x.mp4", "--generator", "none", "--view", "synth")
    assert bad.returncode != 0 and "--generator none" in bad.stderr and not (tmp_path / "x.mp4").exists()
