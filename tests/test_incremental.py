"""--incremental on: a frame identical to the one before is not segmented again, a picture whose
labels and style did not change is not painted again, and what is reused is bit-identical to
what the models would compute."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

CLIP = Path(__file__).resolve().parents[1] / "third_party" / "media" / "vtest_people_640x360_6s.mp4"


@pytest.fixture(scope="module")
def models():
    from segsynth.stream import ModelSet

    with ModelSet.load("ade20k+voc", "default", threads=2, models="fast", fused="off") as loaded:
        yield loaded


def frames_of_people(models, count: int) -> list[np.ndarray]:
    """The first ``count`` frames of the vtest clip at the segmenter's size."""
    import av

    from segsynth.stream.pictures import resize_rgb

    with av.open(str(CLIP)) as clip:
        frames = []
        for frame in clip.decode(video=0):
            frames.append(resize_rgb(frame.to_ndarray(format="rgb24"), *models.size))
            if len(frames) == count:
                return frames
    raise AssertionError("the clip is too short")


def infer(models, incremental: bool, batches: list[list[np.ndarray]], z_from: int | None = None):
    """Every batch through one session's infer step; at batch ``z_from`` a new style (seed 7)."""
    from segsynth.stream.infer.synth import Synthesize

    gen = models.generator
    step = Synthesize(models.segmenter, gen, models.remap("person=bear"), gen.seeded_z(0), "hysteresis", "stretch",
                      gen.size, incremental=incremental)
    results = []
    for i, batch in enumerate(batches):
        if i == z_from:
            step.update(z=gen.seeded_z(7))
        results += step(np.stack(batch), [{"size": (640, 360)} for _ in batch])
    return results, step


def test_reused_labels_and_pictures_are_bit_identical_to_computed_ones(models):
    f = frames_of_people(models, 3)
    # a still source (repeats within and across batches), the input moving, a new style mid-way
    batches = [[f[0], f[0]], [f[0], f[1]], [f[1], f[1], f[1]], [f[2]], [f[2], f[2]], [f[2]]]
    full, _ = infer(models, False, batches, z_from=4)
    reused, step = infer(models, True, batches, z_from=4)
    assert len(full) == len(reused) == 11
    for i, (a, b) in enumerate(zip(full, reused)):
        assert np.array_equal(a.labels, b.labels), i
        assert np.array_equal(a.synth, b.synth), i
    # segmented: the three distinct inputs; painted: at most those plus the repaint for the style
    # (the stabiliser may move labels on a repeated input; then it is painted again too)
    r = step.reuse
    assert (r.frames, r.segmented) == (11, 3)
    assert 4 <= r.painted <= 6 and r.pictures == 11, r.painted
    assert step.reuse.shares() == {"segmented": 3 / 11, "painted": r.painted / 11}
    # the pictures differ where they should: the style change repainted the frame
    assert not np.array_equal(reused[7].synth, reused[8].synth)


@pytest.mark.parametrize("stabilize", ["off", "hysteresis"])
def test_through_the_fused_graphs_too(tmp_path, people_clip, stabilize):
    """Unstabilised, one graph segments and paints (a repeated frame skips it whole); stabilised,
    the segment and synth parts run either side of the stabiliser, on the frames that need them."""
    import av

    from segsynth.stream import ModelSet
    from segsynth.stream.infer.synth import Synthesize
    from segsynth.stream.pictures import resize_rgb

    with ModelSet.load("voc", "default", fused="on", cache_dir=tmp_path, backend="onnxruntime") as m:
        with av.open(str(people_clip)) as clip:
            f = [resize_rgb(x.to_ndarray(format="rgb24"), *m.size) for x in clip.decode(video=0)][:3]
        parts = ("all",) if stabilize == "off" else ("segment", "synth")
        outs = {}
        for incremental in (False, True):
            step = Synthesize(m.segmenter, m.generator, m.remap("person=animal"), m.generator.seeded_z(0), stabilize,
                              "letterbox", m.generator.size, chains={p: m.fused(p) for p in parts},
                              incremental=incremental)
            outs[incremental] = []
            for i, batch in enumerate([[f[0], f[0]], [f[0], f[1]], [f[1]], [f[1], f[2]]]):
                if i == 2:  # a new style: through the one graph, the repeated frame is painted again
                    step.update(z=m.generator.seeded_z(3))
                outs[incremental] += step(np.stack(batch), [{"size": (480, 512)}] * len(batch))
        for a, b in zip(*outs.values()):
            assert np.array_equal(a.labels, b.labels) and np.array_equal(a.synth, b.synth)
        assert step.reuse.segmented == (4 if stabilize == "off" else 3) and step.reuse.frames == 7


def test_a_full_repaint_every_n_frames():
    from segsynth.stream.infer.reuse import Reuse

    reuse = Reuse(repaint_every=3)
    still = np.zeros((2, 8, 8, 3), np.uint8)
    todo = [reuse.to_segment(still) for _ in range(4)]  # eight identical frames, two a batch
    assert np.concatenate(todo).tolist() == [True, False, False, False, True, False, False, False]
    canvases, z = np.zeros((3, 4, 4), np.uint8), np.zeros((1, 8), np.float32)
    assert reuse.to_paint(canvases, z).tolist() == [True, False, False]
    assert reuse.to_paint(canvases[:1], z + 1).tolist() == [True]  # a new style is painted
    changed = canvases.copy()
    changed[1, 0, 0] = 1
    assert reuse.to_paint(changed, z + 1).tolist() == [False, True, True]


def test_a_session_reports_what_it_computed_in_stats_and_metrics(tiny_segmenter, astronaut):
    from prometheus_client.parser import text_string_to_metric_families

    from segsynth.core import metrics
    from segsynth.core.config import StreamConfig
    from segsynth.stream import ModelSet, StreamSession
    from segsynth.stream.io.sinks import MemorySink
    from segsynth.stream.io.sources import SyntheticSource

    with ModelSet.load(str(tiny_segmenter), "none") as models:
        for mode, segmented in (("on", 2 / 40), ("off", None)):
            # 40 frames: the photo 20 times, then its mirror image 20 times
            source = SyntheticSource([astronaut[::8, ::8]] * 20 + [astronaut[::8, ::-8]] * 20, count=40, rate=50)
            s = StreamSession(StreamConfig(source="synthetic", sinks=["x.mp4"], view="labels", id=f"still-{mode}",
                                           incremental=mode), models, source=source, sinks=[MemorySink()])
            s.start()
            scraped, deadline = {}, time.monotonic() + 60
            while s.state not in ("closed", "failed") and time.monotonic() < deadline:
                scraped.update({(x.name, x.labels.get("model")): x.value
                                for family in text_string_to_metric_families(metrics.exposition().decode())
                                for x in family.samples if x.labels.get("stream") == f"still-{mode}"})
                time.sleep(0.05)
            assert s.join(30)
            stats = s.stats()
            assert stats.frames_out == 40, stats
            if segmented is None:
                assert stats.computed == {} and ("segsynth_stream_computed_ratio", "segmenter") not in scraped
            else:
                assert stats.computed["segmented"] == pytest.approx(segmented), stats.computed
                assert 0 < scraped[("segsynth_stream_computed_ratio", "segmenter")] < 1, scraped
