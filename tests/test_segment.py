"""`segsynth segment` end to end on real pictures and on video with audio."""

from __future__ import annotations

import numpy as np
from PIL import Image

from conftest import REPO, audio_info, decode_video, run_cli
from segsynth.core import labels

ADE = labels.get("ade20k")
PERSON, ANIMAL = ADE.id_of("person"), ADE.id_of("animal")


def test_photo_of_a_person_covers_the_person_and_the_scene(tmp_path):
    out = tmp_path / "ids.png"
    proc = run_cli("segment", REPO / "examples" / "astronaut.png", out, "--view", "ids")
    assert proc.returncode == 0, proc.stderr
    ids = np.asarray(Image.open(out))
    assert ids.dtype == np.uint8 and ids.ndim == 2 and ids.shape == (512, 512)
    person = float((ids == PERSON).mean())
    print(f"\nperson-pixel fraction on astronaut.png: {person:.1%}")
    assert 0.3 < person < 0.7
    # the person is in the middle-bottom of the photo, the wall behind her at the top corners
    assert (ids[300:, 150:350] == PERSON).mean() > 0.8
    present = {ADE.name_of(i) for i in np.unique(ids)}
    assert "wall" in present, present
    assert set(np.unique(ids)) <= set(range(150)) | {255}


def test_remap_recolours_exactly_the_person_pixels(tmp_path):
    src = REPO / "examples" / "astronaut.png"
    plain, remapped, ids = tmp_path / "plain.png", tmp_path / "remapped.png", tmp_path / "ids.png"
    for out, extra in ((plain, []), (remapped, ["--remap", "person=animal"]), (ids, ["--view", "ids"])):
        proc = run_cli("segment", src, out, "--no-legend", *extra)
        assert proc.returncode == 0, proc.stderr
    a, b = np.asarray(Image.open(plain)), np.asarray(Image.open(remapped))
    person = np.asarray(Image.open(ids)) == PERSON
    assert (a[person] == ADE.palette[PERSON]).all()
    assert (b[person] == ADE.palette[ANIMAL]).all()
    assert (a[~person] == b[~person]).all()  # nothing else changed


def test_views_have_the_expected_geometry(tmp_path):
    src = REPO / "examples" / "astronaut.png"
    for view, shape in (("labels", (512, 512, 3)), ("overlay", (512, 512, 3)), ("side-by-side", (512, 1024, 3))):
        out = tmp_path / f"{view}.jpg"
        proc = run_cli("segment", src, out, "--view", view, "--segmenter", "voc")
        assert proc.returncode == 0, proc.stderr
        assert np.asarray(Image.open(out)).shape == shape
    # side-by-side keeps the input untouched on the left
    left = np.asarray(Image.open(tmp_path / "side-by-side.jpg"))[:, :512].astype(int)
    assert np.abs(left - np.asarray(Image.open(src).convert("RGB")).astype(int)).mean() < 4


def test_video_keeps_frames_timestamps_and_audio_and_remaps_people(tmp_path, people_clip):
    out = tmp_path / "ids.mkv"
    proc = run_cli("segment", people_clip, out, "--view", "ids", "--remap", "person=animal")
    assert proc.returncode == 0, proc.stderr
    t_in, _ = decode_video(people_clip)
    t_out, frames = decode_video(out)
    assert len(t_out) == len(t_in) == 8
    assert t_out == t_in  # VFR timestamps kept exactly
    n_in, dur_in, data_in = audio_info(people_clip)
    n_out, dur_out, data_out = audio_info(out)
    assert n_out == n_in and data_out == data_in  # every audio packet copied untouched
    assert abs(dur_out - dur_in) < 0.04  # within one frame (Matroska stores milliseconds)
    for ids in frames:  # lossless ids: the remap turned every person pixel into an animal
        assert not (ids == PERSON).any()
        assert (ids == ANIMAL).mean() > 0.3


def test_video_colour_view_to_mp4(tmp_path, people_clip):
    out = tmp_path / "overlay.mp4"
    proc = run_cli("segment", people_clip, out, "--view", "side-by-side", "--segmenter", "voc")
    assert proc.returncode == 0, proc.stderr
    t_out, frames = decode_video(out)
    assert t_out == decode_video(people_clip)[0]
    assert frames[0].shape == (512, 960, 3)
    assert audio_info(out)[0] == audio_info(people_clip)[0]
    assert "frames" in proc.stderr and "person" in proc.stderr  # the summary line


def test_real_clip_with_audio(tmp_path):
    import av

    src = tmp_path / "bbb.mp4"
    with av.open(str(REPO / "third_party" / "media" / "bbb_h264_aac_720p_10s.mp4")) as c, av.open(str(src), "w") as o:
        streams = {s.index: o.add_stream_from_template(s) for s in (c.streams.video[0], c.streams.audio[0])}
        for p in c.demux(*c.streams.video[:1], *c.streams.audio[:1]):
            if p.dts is None or p.pts * p.time_base >= 0.5:
                continue
            p.stream = streams[p.stream.index]
            o.mux(p)
    out = tmp_path / "seg.mp4"
    proc = run_cli("segment", src, out, "--view", "overlay", "--segmenter", "voc")
    assert proc.returncode == 0, proc.stderr
    assert decode_video(out)[0] == decode_video(src)[0]
    assert audio_info(out) == audio_info(src)
