"""Views that show no picture do not pay for one: labels, overlay and ids run the segmenter only,
and a session switched to a view with the picture paints from the next batch on. Letterbox bars
of the input stay black in the picture."""

from __future__ import annotations

import time
from fractions import Fraction

import numpy as np
import pytest

from conftest import decode_video, write_clip


class CountingGenerator:
    """The real generator, counting its calls (isolates what the session asks of it)."""

    def __init__(self, generator) -> None:
        self.generator, self.calls = generator, 0

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.generator(*args, **kwargs)


@pytest.fixture()
def models(tiny_segmenter, tiny_generator):
    from segsynth.stream import ModelSet

    with ModelSet.load(str(tiny_segmenter), str(tiny_generator), fused="off") as loaded:
        loaded.generator = CountingGenerator(loaded.generator)
        yield loaded


@pytest.mark.parametrize("view, paints", [("labels", False), ("overlay", False), ("synth", True),
                                          ("side-by-side", True)])
def test_only_views_with_the_picture_run_the_generator(models, people_clip, tmp_path, view, paints):
    from segsynth.stream import StreamConfig, StreamSession

    s = StreamSession(StreamConfig(source=people_clip, sinks=[tmp_path / "o.mkv"], view=view, stabilize="off"),
                      models)
    s.start()
    assert s.join(120) and s.state == "closed", s.stats()
    frames = s.stats().frames_out
    assert frames == len(decode_video(tmp_path / "o.mkv")[0]) > 0
    assert (models.generator.calls > 0) == paints, (view, models.generator.calls)


def test_a_switch_to_the_picture_paints_from_the_next_batch(models, astronaut):
    from segsynth.stream import StreamConfig, StreamSession
    from segsynth.stream.io.sinks import MemorySink
    from segsynth.stream.io.sources import SyntheticSource

    source = SyntheticSource([astronaut[::4, ::4]], count=400, rate=25)
    # incremental off: every frame here is the same picture, which --incremental paints once
    s = StreamSession(StreamConfig(source="synthetic.mp4", sinks=["o.mkv"], view="labels", stabilize="off",
                                   incremental="off"), models, source=source, sinks=[MemorySink()])
    s.start()
    try:
        deadline = time.monotonic() + 60
        while s.stats().frames_out < 20:
            assert time.monotonic() < deadline, s.stats()
            time.sleep(0.05)
        assert models.generator.calls == 0  # 20 frames of labels, nothing painted
        s.update(view="synth")
        while models.generator.calls < 5:
            assert time.monotonic() < deadline and s.state == "running", s.stats()
            time.sleep(0.05)
    finally:
        s.stop(drain=False)
        s.join(60)


def test_letterbox_bars_of_the_input_stay_black_in_the_picture(tiny_segmenter, tiny_generator, tmp_path):
    from segsynth.stream import ModelSet, StreamConfig, StreamSession

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(6):
        frame = np.zeros((120, 160, 3), np.uint8)
        frame[20:100] = rng.integers(40, 255, (80, 160, 3))  # a 2.0:1 picture in a 4:3 frame
        frames.append(frame)
    clip = write_clip(tmp_path / "letterboxed.mkv", frames, [Fraction(i, 25) for i in range(6)], codec="ffv1")
    with ModelSet.load(str(tiny_segmenter), str(tiny_generator)) as models:
        s = StreamSession(StreamConfig(source=clip, sinks=[tmp_path / "o.mkv"], view="synth", fit="stretch",
                                       codec="ffv1"), models)  # lossless: what is measured is the picture
        s.start()
        assert s.join(120) and s.state == "closed", s.stats()
    _, pictures = decode_video(tmp_path / "o.mkv")
    for picture in pictures:
        h = picture.shape[0]
        top, bottom = picture[: round(h * 20 / 120) - 2], picture[round(h * 100 / 120) + 2:]
        assert top.max() < 8 and bottom.max() < 8, (top.max(), bottom.max())  # the bars (YUV rounding aside)
        assert picture[h // 2].mean() > 10  # the picture between them is painted
