"""Temporal stabilisation (--stabilize) and its measures (eval-temporal): on synthetic clips
whose truth is known, and on the real clips in third_party/media."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from conftest import MEDIA, decode_video, run_cli, write_clip
from segsynth.core.errors import InputError
from segsynth.core.grammar import parse_stabilize
from segsynth.stream.infer import stabilize
from segsynth.stream.infer.synth import FrameResult
from segsynth.jobs.eval_temporal import Stability, static_pixels

RNG = np.random.default_rng(7)


def _textured(h=96, w=128, seed=0) -> np.ndarray:
    """A still picture with texture everywhere (so any motion changes its pixels)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (h // 4, w // 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 4, 0), 4, 1)


def _measure(frames, predictions, stabilizer, confidences=None):
    """(off, stabilised) Stability reports of per-frame ``predictions`` over ``frames``."""
    stats = {"off": Stability(), "on": Stability()}
    last = None
    confidences = confidences or [None] * len(frames)
    for i, (frame, own, conf) in enumerate(zip(frames, predictions, confidences)):
        results = {"off": FrameResult(own, None), "on": FrameResult(stabilizer(own, conf, frame), None)}
        if last is not None:
            static = static_pixels(frames[i - 1], frame)
            for k in stats:
                stats[k].add(static, last[k], results[k], own)
        last = results
    return stats["off"].report(), stats["on"].report()


def test_a_still_scene_with_label_noise_stops_flickering():
    """The truth is one label map; each frame 5 % of its pixels are flipped to another class
    with low confidence. Off: ~10 % of the static pixels flip per frame; hysteresis: none."""
    picture = _textured()
    truth = np.where(np.arange(128)[None, :] < 64, 3, 7).astype(np.uint8).repeat(96, 0)
    frames, predictions, confidences = [], [], []
    for _ in range(30):
        noisy = truth.copy()
        flip = RNG.random(truth.shape) < 0.05
        noisy[flip] = 11
        frames.append(picture)
        predictions.append(noisy)
        confidences.append(np.where(flip, 0.4, 0.9).astype(np.float32))
    off, on = _measure(frames, predictions, stabilize.Hysteresis(), confidences)
    assert off["static_fraction"] == 1.0
    assert 0.07 < off["static_flip_rate"] < 0.13
    assert on["static_flip_rate"] < off["static_flip_rate"] / 20
    assert abs(stabilize.Hysteresis()(predictions[0], confidences[0], picture).mean() - predictions[0].mean()) < 1e-9
    majority = _measure(frames, predictions, stabilize.Majority(5))[1]
    assert on["static_flip_rate"] < majority["static_flip_rate"] < off["static_flip_rate"]  # majority: in between


def _moving_square(n=20, step=4):
    """A textured square moving ``step`` px a frame over a textured still background; the
    per-frame labels are the truth (1 on the square) with noise on the background."""
    background, square = _textured(seed=1), _textured(32, 32, seed=2)
    frames, truths, predictions = [], [], []
    for i in range(n):
        x = 8 + step * i
        frame, truth = background.copy(), np.zeros((96, 128), np.uint8)
        frame[32:64, x:x + 32], truth[32:64, x:x + 32] = square, 1
        noisy = truth.copy()
        noisy[(RNG.random(truth.shape) < 0.03) & (truth == 0)] = 2
        frames.append(frame)
        truths.append(truth)
        predictions.append(noisy)
    return frames, truths, predictions


@pytest.mark.parametrize("method", ["hysteresis", "flow"])
def test_a_moving_square_keeps_its_labels_and_they_follow_it(method):
    frames, truths, predictions = _moving_square()
    stabilizer = stabilize.make(method)
    off, on = _measure(frames, predictions, stabilizer)
    assert on["motion_agreement"] >= 0.95  # what moves is labelled as each frame says
    assert on["static_flip_rate"] < off["static_flip_rate"] / 5  # the noisy still background is not
    replay = stabilize.make(method)
    for frame, truth, prediction in zip(frames, truths, predictions):
        labels = replay(prediction, None, frame)
        assert (labels[truth == 1] == 1).mean() > 0.97  # the square is where it is, not where it was
        assert (labels[(truth == 0) & (labels != 2)] == 0).all()  # no trail of square labels behind it


def test_a_scene_cut_starts_afresh():
    first, second = _textured(seed=3), _textured(seed=4)
    a, b = np.full((96, 128), 3, np.uint8), np.full((96, 128), 9, np.uint8)
    s = stabilize.Hysteresis()
    for _ in range(5):
        assert (s(a, np.full(a.shape, 0.99, np.float32), first) == 3).all()
    resets = s.resets
    out = s(b, np.full(b.shape, 0.5, np.float32), second)  # a confident old label, a new picture: still b
    assert (out == 9).all() and s.resets == resets + 1


def test_a_contradicted_label_gives_way_after_patience_frames():
    """A still picture whose first label was wrong: the segmenter says otherwise (not more
    confidently) every frame after; the label changes once, after ``patience`` frames."""
    picture = _textured(seed=5)
    s = stabilize.Hysteresis(patience=10)
    s(np.full((96, 128), 3, np.uint8), np.full((96, 128), 0.9, np.float32), picture)
    outs = [s(np.full((96, 128), 4, np.uint8), np.full((96, 128), 0.8, np.float32), picture)[0, 0]
            for _ in range(15)]
    assert outs == [3] * 10 + [4] * 5


def test_the_picture_is_damped_where_labels_and_input_hold_and_new_where_they_change():
    hold = stabilize.PictureHold(radius=0, follow=0.2)
    labels, still = np.zeros((16, 16), np.uint8), np.zeros((16, 16), bool)
    assert (hold(labels, np.full((16, 16, 3), 100, np.uint8), still) == 100).all()
    assert (hold(labels, np.full((16, 16, 3), 150, np.uint8), still) == 110).all()  # flicker damped: 1/5 of it
    relabelled, moved = labels.copy(), still.copy()
    relabelled[8, 8], moved[2, 3] = 5, True
    out = hold(relabelled, np.full((16, 16, 3), 160, np.uint8), moved)
    assert out[8, 8, 0] == 160 and out[2, 3, 0] == 160  # a new label, an input that moved: shown at once
    assert out[0, 0, 0] == 120  # elsewhere: 110 + (160 - 110) / 5
    assert (hold(relabelled, np.full((16, 16, 3), 7, np.uint8), True) == 7).all()  # a scene cut: all new
    hold.reset()
    assert (hold(relabelled, np.full((16, 16, 3), 9, np.uint8), still) == 9).all()  # a new style: all new


@pytest.mark.parametrize("spec, parsed", [("off", ("off", 1)), ("majority", ("majority", 5)),
                                          ("majority:3", ("majority", 3)), ("HYSTERESIS", ("hysteresis", 1))])
def test_stabilize_specs(spec, parsed):
    assert parse_stabilize(spec) == parsed


@pytest.mark.parametrize("spec", ["", "median", "majority:1", "majority:x", "flow:3", "majority:99"])
def test_bad_stabilize_specs_are_refused(spec):
    with pytest.raises(InputError, match="stabilize"):
        parse_stabilize(spec)


def test_smooth_is_majority_and_the_default_is_hysteresis(tmp_path):
    from segsynth.core.config import StreamConfig

    clip = str(tmp_path / "in.mp4")
    assert StreamConfig(source=clip, sinks=["o.mp4"]).stabilization == "hysteresis"
    assert StreamConfig(source=clip, sinks=["o.mp4"], smooth=4).stabilization == "majority:4"
    assert StreamConfig(source=clip, sinks=["o.mp4"], stabilize="off").stabilization == "off"
    with pytest.raises(InputError, match="give one of them"):
        StreamConfig(source=clip, sinks=["o.mp4"], smooth=4, stabilize="flow")
    proc = run_cli("run", clip, tmp_path / "o.mp4", "--stabilize", "median")
    assert proc.returncode == 2 and "stabilize: 'median' is not one of" in proc.stderr


def test_a_stabilised_ids_video_is_the_stabilised_labels_losslessly(tmp_path, astronaut):
    """run --view ids with hysteresis writes exactly what a stabiliser makes of the per-frame
    labels of the same frames (FFV1 is lossless), and differs from --stabilize off (a person
    in a noisy still picture, and a square crossing it)."""
    import threading

    from PIL import Image

    from segsynth.stream.infer.models import ModelSet
    from segsynth.stream.pictures import resize_labels
    from segsynth.stream.io.sources import FileSource

    background = np.asarray(Image.fromarray(astronaut).resize((256, 192), Image.BILINEAR))
    square = _textured(64, 64, seed=8)
    pictures = []
    for i in range(10):
        frame = background.copy()
        frame[64:128, 16 + 12 * i:80 + 12 * i] = square
        frame = np.clip(frame.astype(int) + RNG.integers(-2, 3, frame.shape), 0, 255).astype(np.uint8)  # noise
        pictures.append(frame)
    clip = write_clip(tmp_path / "in.mp4", pictures, [Fraction(i, 25) for i in range(10)], codec="libx264rgb",
                      pix_fmt="rgb24")
    outs = {}
    for spec in ("hysteresis", "off"):
        outs[spec] = tmp_path / f"{spec}.mkv"
        proc = run_cli("run", clip, outs[spec], "--segmenter", "voc", "--generator", "none", "--view", "ids",
                       "--stabilize", spec)
        assert proc.returncode == 0, proc.stderr
    with ModelSet.load("voc", "none") as models:
        source = FileSource(clip).open()
        source.model_size, source.need_display = models.size, False
        frames = [f for f, _ in source.frames(threading.Event(), lambda item: None)]
        source.close()
        segment = models.fused("segment")
        stabilizer = stabilize.Hysteresis()
        want = []
        for frame in frames:
            out = segment.finish(segment.submit(frame[None]))
            want.append(stabilizer(out["ids"][0], out["confidence"][0], frame))
    got = decode_video(outs["hysteresis"])[1]
    want = [resize_labels(w, 256, 192) for w in want]  # the ids view is at the frame's own size
    assert len(got) == 10 and all(np.array_equal(g, w) for g, w in zip(got, want))
    assert any(not np.array_equal(a, b) for a, b in zip(got, decode_video(outs["off"])[1]))


@pytest.mark.parametrize("clip, method, generator, fewer_flips", [
    ("tos_h264_aac_1280x534.mp4", "hysteresis", "default", 3),
    ("bbb_h264_aac_720p_10s.mp4", "hysteresis", "default", 3),
    ("bbb_h264_aac_720p_10s.mp4", "flow", "none", 1.2),
    ("bbb_h264_aac_720p_10s.mp4", "majority:5", "none", 1.2),
])
def test_each_method_on_a_real_clip(tmp_path, clip, method, generator, fewer_flips):
    """eval-temporal on the first frames of the real clips (the default segmenter): each method
    flips fewer labels where the input stands still (by at least ``fewer_flips`` times here:
    majority and flow less than hysteresis, see docs/temporal.md), follows what moves, and
    costs little."""
    out = tmp_path / "t.json"
    proc = run_cli("eval-temporal", MEDIA / clip, "--stabilize", method, "--generator", generator,
                   "--frames", "14", "--json", out, "--grid", tmp_path / "grid.png", timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    off, on = report["methods"]["off"], report["methods"][method]
    print(f"\n{clip} {method}: static flips {off['static_flip_rate']:.4f} -> {on['static_flip_rate']:.4f}, "
          f"motion agreement {on['motion_agreement']:.3f}, ratios {report['ratios']}")
    assert report["frames"] == 14 and off["motion_agreement"] == 1.0
    assert report["ratios"]["static_flip_rate_off_over_stabilized"] > fewer_flips
    assert on["motion_agreement"] >= 0.85  # (over whole clips: >= 0.93, docs/temporal.md; here few pixels move)
    assert report["ratios"]["fps_stabilized_over_off"] > 0.5
    if generator == "default":
        assert report["ratios"]["synth_static_delta_off_over_stabilized"] > 1.5
    assert (tmp_path / "grid.png").stat().st_size > 10_000
