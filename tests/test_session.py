"""Stream sessions as a library: many sessions over one ModelSet, start/stop at any moment,
live remap updates, config checked before any model loads, metrics that come and go."""

from __future__ import annotations

import os
import random
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import decode_video, run_cli, write_clip
from segsynth.core import labels
from segsynth.core.config import StreamConfig
from segsynth.core.errors import InputError, LabelError

VOC = labels.get("voc")
PERSON, DOG = VOC.id_of("person"), VOC.id_of("dog")


def _clip(path: Path, picture: np.ndarray, frames: int, shift: int, audio: float = 0.0) -> Path:
    pictures = [np.roll(picture, shift * i, axis=1) for i in range(frames)]
    return write_clip(path, pictures, [Fraction(i, 25) for i in range(frames)], audio_seconds=audio)


def _count_sessions(monkeypatch) -> list:
    """Every onnxruntime InferenceSession made from now on (the real class, counted)."""
    import onnxruntime

    made, real = [], onnxruntime.InferenceSession

    class Counted(real):
        def __init__(self, *args, **kwargs):
            made.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Counted)
    return made


def test_eight_sessions_over_one_modelset_match_lone_runs(tmp_path, astronaut, monkeypatch):
    from segsynth.stream import ModelSet, StreamSession

    made = _count_sessions(monkeypatch)
    clips = [_clip(tmp_path / f"in{i}.mp4", astronaut[::4, ::4], 6, 5 * i + 3, audio=0.3) for i in range(8)]
    remaps = [None, "person=dog"] * 4  # per-session state: half of them remap
    with ModelSet.load("voc", "none") as models:
        assert len(made) == 1  # one model, loaded once
        sessions = [StreamSession(StreamConfig(source=clip, sinks=[tmp_path / f"s{i}.mp4"], view="labels",
                                               remap=remap, legend=False), models)
                    for i, (clip, remap) in enumerate(zip(clips, remaps))]
        assert len(made) == 2 and list(models.chains) == ["segment"]  # and the fused part they run, made once
        for s in sessions:
            s.start()
        assert sum(s.state in ("running", "draining", "closed") for s in sessions) == 8
        for s in sessions:
            assert s.join(120) and s.state == "closed", s.stats()
    assert len(made) == 2  # no session loaded a private copy
    for i, (clip, remap) in enumerate(zip(clips, remaps)):
        lone = tmp_path / f"lone{i}.mp4"
        proc = run_cli("run", clip, lone, "--segmenter", "voc", "--generator", "none", "--view", "labels",
                       "--no-legend", *(["--remap", remap] if remap else []))
        assert proc.returncode == 0, proc.stderr
        (t_s, f_s), (t_l, f_l) = decode_video(tmp_path / f"s{i}.mp4"), decode_video(lone)
        assert t_s == t_l == decode_video(clip)[0]
        assert all(np.array_equal(a, b) for a, b in zip(f_s, f_l)), f"session {i} differs from its lone run"
    # the remapped sessions really differ from the plain ones (the dog colour is there)
    dog = VOC.palette[DOG].astype(int)
    assert np.abs(decode_video(tmp_path / "s1.mp4")[1][0].astype(int) - dog).sum(-1).min() < 30


def _wait_for_frames(session, frames: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while session.stats().frames_out < frames:
        assert session.state not in ("failed", "closed"), session.stats()
        assert time.monotonic() < deadline, f"fewer than {frames} frames after {timeout} s"
        time.sleep(0.01)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fifty_start_stop_cycles_leave_threads_and_files_as_they_were(tmp_path, astronaut, tiny_segmenter):
    from segsynth.stream import ModelSet, StreamSession

    clip = _clip(tmp_path / "in.mp4", astronaut[::4, ::4], 60, 3, audio=2.4)
    rng = random.Random(0)
    with ModelSet.load(str(tiny_segmenter), "none") as models:
        warm = StreamSession(StreamConfig(source=clip, sinks=[tmp_path / "warm.mp4"], view="labels"), models)
        warm.start()
        assert warm.join(60)
        threads, fds = threading.active_count(), _open_fds()
        outcomes = {"before any frame": 0, "mid-stream": 0, "after the end": 0}
        for cycle in range(50):
            out = tmp_path / f"o{cycle}.mp4"
            s = StreamSession(StreamConfig(source=clip, sinks=[out], view="labels", batch=rng.choice([1, 2])),
                              models)
            s.start()
            time.sleep(rng.choice([0, 0.001, 0.01, 0.05, 0.2, 0.5]))
            s.stop(drain=rng.random() < 0.5)
            assert s.join(60), f"cycle {cycle} did not stop"
            assert s.state == "closed" and s.error is None, (s.stats(), repr(s.error))
            written = s.stats().frames_out
            outcomes["before any frame" if not written else "after the end" if written == 60 else "mid-stream"] += 1
            if written:
                times, frames = decode_video(out)  # playable, with every frame the session wrote
                assert len(times) == written and times == sorted(times)
            else:
                assert not out.exists()
            assert threading.active_count() == threads, f"cycle {cycle}: threads left behind"
            assert _open_fds() == fds, f"cycle {cycle}: files left open"
    print(f"\nstop moments over 50 cycles: {outcomes}")
    assert outcomes["mid-stream"] >= 5


@pytest.mark.parametrize("fused", ["off", "on"])  # on: the remap table is an input of the one graph
def test_remap_update_changes_the_output_two_batches_later_only_where_the_class_was(tmp_path, astronaut, fused):
    from segsynth.stream import ModelSet, StreamSession
    from segsynth.stream.io.sources import SyntheticSource

    out = tmp_path / "ids.mkv"
    picture = astronaut[::2, ::2]
    with ModelSet.load("voc", "none", fused=fused, cache_dir=tmp_path) as models:
        source = SyntheticSource([picture], count=40, rate=12)  # slower than the model: no backlog
        s = StreamSession(StreamConfig(source="synthetic", sinks=[out], view="ids", batch=2, policy="lossless",
                                       stabilize="off"),  # (a stabiliser keeps labels of a still picture anyway)
                          models, source=source)  # a live source defaults to latest; this test needs every frame
        assert (models.fused("all") is not None) == (fused == "on")
        s.start()
        _wait_for_frames(s, 12)
        inferred = s.stats().frames_inferred
        s.update(remap="person=dog")
        with pytest.raises(LabelError, match="did you mean"):
            s.update(remap="persn=dog")  # a bad rule changes nothing
        assert s.join(60) and s.state == "closed"
    _, frames = decode_video(out)
    assert len(frames) == 40
    before = frames[0]
    assert (before == PERSON).mean() > 0.2  # the photo's person
    for i, ids in enumerate(frames):
        if i < inferred:  # labelled before the update: untouched
            assert np.array_equal(ids, before), i
        elif i >= inferred + 2 * 2:  # from at most two batches later: person became dog, nothing else changed
            assert not (ids == PERSON).any(), i
            assert np.array_equal(ids == DOG, (before == PERSON) | (before == DOG)), i
            assert np.array_equal(ids[before != PERSON], before[before != PERSON]), i


def test_config_is_checked_before_any_model_is_loaded(monkeypatch, tmp_path):
    made = _count_sessions(monkeypatch)
    cases = {
        "remap: unknown class 'persn'": dict(remap="persn=animal"),
        "remap rule 'person' is not of the form": dict(remap="person"),
        "preset: 'quality' is not a libx264 preset": dict(preset="quality"),
        "codec: nope is not available": dict(codec="nope"),
        "bitrate: 'fast' is not a bitrate": dict(bitrate="fast"),
        "crf: 70 is out of range": dict(crf=70),
        "view: unknown view": dict(view="xray"),
        "policy: must be one of": dict(policy="sometimes"),
        "id: 'a b' must be": dict(id="a b"),
        "sinks: at least one output": dict(sinks=()),
    }
    for message, fields in cases.items():
        with pytest.raises(InputError, match=message):
            StreamConfig(**{"source": "in.mp4", "sinks": ("out.mp4",), **fields})
    StreamConfig(source="in.mp4", sinks=["out.mp4"], remap="person=bear")  # COCO-Stuff has bear: fine here
    assert made == []


def test_a_class_only_another_set_has_maps_to_its_nearest_by_meaning(tmp_path):
    from PIL import Image

    from conftest import REPO

    ade = labels.get("ade20k")
    proc = run_cli("segment", REPO / "examples" / "astronaut.png", tmp_path / "ids.png", "--view", "ids",
                   "--remap", "person=bear")
    assert proc.returncode == 0, proc.stderr
    assert "'bear' is not a class of ade20k" in proc.stderr and "nearest class 'animal'" in proc.stderr
    ids = np.asarray(Image.open(tmp_path / "ids.png"))
    assert (ids == ade.id_of("animal")).mean() > 0.3 and not (ids == ade.id_of("person")).any()
    proc = run_cli("segment", REPO / "examples" / "astronaut.png", tmp_path / "x.png", "--remap", "person=wombat")
    assert proc.returncode == 2 and "unknown class 'wombat'" in proc.stderr and not (tmp_path / "x.png").exists()


def test_metrics_follow_a_session_and_vanish_with_it(tmp_path, astronaut, tiny_segmenter):
    from prometheus_client.parser import text_string_to_metric_families

    from segsynth.core import metrics
    from segsynth.stream import ModelSet, StreamSession
    from segsynth.stream.io.sinks import MemorySink
    from segsynth.stream.io.sources import SyntheticSource

    def series(stream: str) -> dict:
        found = {}
        for family in text_string_to_metric_families(metrics.exposition().decode()):
            for sample in family.samples:
                if sample.labels.get("stream") == stream:
                    found[(sample.name, sample.labels.get("stage") or sample.labels.get("queue"))] = sample.value
        return found

    with ModelSet.load(str(tiny_segmenter), "none") as models:
        sink = MemorySink(keep=4096)
        s = StreamSession(StreamConfig(source="synthetic", sinks=["x.mp4"], view="labels", id="cam-1"), models,
                          source=SyntheticSource([astronaut[::8, ::8]], count=400, rate=100), sinks=[sink])
        s.start()
        _wait_for_frames(s, 50)
        live = series("cam-1")
        assert live[("segsynth_stream_up", None)] == 1
        assert live[("segsynth_frames_total", "decode")] >= 50 and ("segsynth_frames_total", "encode") in live
        # the stage label speaks the stats' words; no *_created series; a rate per stream (100 fps source)
        assert {stage for name, stage in live if name == "segsynth_frames_total"} == set(s.stats().stages) == {
            "decode", "infer", "encode"}
        assert not [name for name, _ in live if name.endswith("_created")]
        assert live[("segsynth_stream_fps", None)] > 5
        assert live[("segsynth_stage_seconds_count", "infer")] >= 50 and ("segsynth_latency_seconds_bucket", None) in live
        with pytest.raises(ValueError, match="already running"):  # one set of series per stream id
            metrics.StreamMetrics("cam-1")
        s.metrics.lost()  # what a live source calls when it loses its connection ...
        assert series("cam-1")[("segsynth_stream_up", None)] == 0
        s.metrics.reconnected()  # ... and when it is back
        assert series("cam-1")[("segsynth_stream_up", None)] == 1
        assert series("cam-1")[("segsynth_reconnects_total", None)] == 1
        s.stop()
        assert s.join(30)
    assert series("cam-1") == {}  # a closed session's series are removed
    assert sink.frames == s.stats().frames_out and len(sink.tail) <= 4096 < sink.bytes_out


def test_stage_timers_keep_constant_memory_and_exact_means():
    from segsynth.stream.pipeline import StageTimer

    timer = StageTimer(window=1000)
    for i in range(100_000):
        timer.add(0.001 * (i % 10))
    assert len(timer.recent) == 1000
    assert timer.summary()["mean_ms"] == pytest.approx(4.5)
    assert timer.percentiles(100)[0] == pytest.approx(0.009)


def test_sessions_can_be_stopped_before_they_start_and_start_only_once(tmp_path, tiny_segmenter):
    from segsynth.stream import ModelSet, StreamSession
    from segsynth.stream.io.sinks import MemorySink
    from segsynth.stream.io.sources import SyntheticSource

    with ModelSet.load(str(tiny_segmenter), "none") as models:
        s = StreamSession(StreamConfig(source="synthetic", sinks=["x.mp4"]), models,
                          source=SyntheticSource([np.zeros((32, 32, 3), np.uint8)], count=5), sinks=[MemorySink()])
        s.stop()
        assert s.state == "closed" and s.join(0)
        with pytest.raises(RuntimeError, match="started or stopped already"):
            s.start()
        missing = StreamSession(StreamConfig(source=tmp_path / "nope.mp4", sinks=[tmp_path / "o.mp4"]), models)
        with pytest.raises(InputError, match="no such file"):
            missing.start()
        assert missing.state == "created" and not (tmp_path / "o.mp4").exists()


def test_a_segmenter_with_a_fixed_batch_size_takes_larger_batches_in_chunks(tmp_path):
    from segsynth.benchmarks import tiny
    from segsynth.stream.infer.segmenter import load_segmenter

    fixed = load_segmenter(str(tiny.segmenter(tmp_path / "b1.onnx", batch=1)), backend="onnxruntime")
    dynamic = load_segmenter(str(tiny.segmenter(tmp_path / "bn.onnx")), backend="onnxruntime")
    frames = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    try:
        assert fixed.batch == 1 and dynamic.batch is None
        labels_fixed = fixed(frames)
        assert labels_fixed.shape == (3, 64, 64) and np.array_equal(labels_fixed, dynamic(frames))
        assert len(np.unique(labels_fixed)) > 3
    finally:
        fixed.close()
        dynamic.close()


def test_view_update_switches_the_picture_and_keeps_the_output_size(tmp_path, astronaut, tiny_segmenter):
    from segsynth.stream import ModelSet, StreamSession
    from segsynth.stream.io.sources import SyntheticSource

    out = tmp_path / "v.mkv"
    picture = astronaut[::4, ::4]  # 128 x 128
    with ModelSet.load(str(tiny_segmenter), "none") as models:
        s = StreamSession(StreamConfig(source="synthetic", sinks=[out], view="labels", legend=False, crf=0), models,
                          source=SyntheticSource([picture], count=30, rate=30))
        s.start()
        _wait_for_frames(s, 5)
        with pytest.raises(InputError, match="cannot be switched"):
            s.update(view="ids")
        for view in ("overlay", "labels", "side-by-side", "labels", "overlay"):  # faster than frames arrive
            s.update(view=view)  # frames read before a switch have no input picture: never a failure
        time.sleep(0.2)
        s.update(view="side-by-side")  # input | labels, 256 x 128, fitted into the 128 x 128 output
        assert s.join(30) and s.state == "closed", s.stats()
    _, frames = decode_video(out)
    first, last = frames[0].astype(int), frames[-1].astype(int)
    assert first.shape == last.shape == (128, 128, 3)
    assert first[:32].mean() > 20 and last[:30].max() < 20  # letterbox bars above and below the wide view
    from PIL import Image

    half = np.asarray(Image.fromarray(picture).resize((64, 64), Image.BILINEAR)).astype(int)
    left = last[32:96, :64]  # the input, scaled to half: the photo itself, not the colour map
    assert np.abs(left - half).mean() < 10 < np.abs(first[32:96, :64] - half).mean()


def test_a_segmenter_splits_batches_larger_than_its_runner_takes(tmp_path):
    # a GPU engine built for batch 2 (TensorRT profile 1..2) takes at most 2 frames a call
    from segsynth.benchmarks import tiny
    from segsynth.engine.onnxruntime import OnnxRuntimeRunner
    from segsynth.stream.infer.segmenter import OnnxSegmenter

    class Recording(OnnxRuntimeRunner):
        def _infer_impl(self, feed):
            self.calls.append(len(next(iter(feed.values()))))
            return super()._infer_impl(feed)

    def runner(path):
        r = Recording(path, threads=1)
        r.calls, r.max_batch = [], 2
        return r

    frames = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    seg_runner = runner(tiny.segmenter(tmp_path / "s.onnx"))
    segmenter = OnnxSegmenter(seg_runner)
    whole = OnnxSegmenter(OnnxRuntimeRunner(tmp_path / "s.onnx"))  # any batch: one call
    got, want = segmenter(frames), whole(frames)
    assert seg_runner.calls == [2, 2, 1] and np.array_equal(got, want) and len(np.unique(want)) > 3
    segmenter.close()
    whole.close()
