"""incremental: ``--incremental on`` vs ``off`` on generated static-camera clips made from the
first frame of the bench's input at --size (lossless FFV1, so a still pixel stays the same value):
nothing moving, a region of 5, 20 and 50 % of the frame moving over the still picture, and a pan
(every pixel moves: the worst case). Per clip, the whole pipeline's fps each way (synth view, the
default stabiliser, alternating, median of --repeats) and the PSNR of the incremental pictures
against the full ones (inf: identical), same run."""

from __future__ import annotations

import math
import time
from pathlib import Path

import av
import numpy as np

from segsynth.benchmarks.scenarios.common import Job, median_rate
from segsynth.benchmarks.scenarios.media import job_sink, job_source
from segsynth.core.grammar import STABILIZE_DEFAULT
from segsynth.stream.infer.synth import Synthesize
from segsynth.stream.pictures import resize_rgb
from segsynth.stream.pipeline import Pipeline

MOVING = (0.05, 0.2, 0.5)  # share of the frame a moving region covers


def _first_frame(job: Job) -> np.ndarray:
    w, h = job.cfg.size
    with av.open(str(job.input)) as container:
        return resize_rgb(next(container.decode(video=0)).to_ndarray(format="rgb24"), w, h)


def _clips(job: Job, count: int) -> dict[str, Path]:
    still = _first_frame(job)
    h, w = still.shape[:2]
    wide = np.concatenate([still, still[:, ::-1]], axis=1)  # what a pan moves across
    scenes = {"still": lambda i: still, "pan": lambda i: wide[:, (8 * i) % w:(8 * i) % w + w]}
    for share in MOVING:
        pw, ph = round(w * math.sqrt(share)), round(h * math.sqrt(share))
        patch = still[::-1, ::-1][:ph, :pw]  # a textured block unlike what it passes over

        def moving(i, pw=pw, ph=ph, patch=patch):
            frame = still.copy()
            x = (6 * i) % (w - pw + 1)
            frame[(h - ph) // 2:(h - ph) // 2 + ph, x:x + pw] = patch
            return frame
        scenes[f"moving {round(share * 100)}%"] = moving
    clips = {}
    for name, scene in scenes.items():
        path = job.cfg.workdir / f"incremental-{name.replace(' ', '-').replace('%', 'pc')}.mkv"
        with av.open(str(path), "w") as out:
            stream = out.add_stream("ffv1", rate=25)
            stream.width, stream.height, stream.pix_fmt = w, h, "bgr0"
            for i in range(count):
                out.mux(stream.encode(av.VideoFrame.from_ndarray(scene(i), format="rgb24")))
            out.mux(stream.encode())
        clips[name] = path
    return clips


class _Kept:
    """An infer step that keeps the pictures it returns (for the PSNR between the two modes)."""

    def __init__(self, infer) -> None:
        self.infer, self.pictures = infer, []

    def __getattr__(self, name):
        return getattr(self.infer, name)

    def _keep(self, results):
        self.pictures += [r.synth for r in results]
        return results

    def finish(self, handle):
        return self._keep(self.infer.finish(handle))

    def __call__(self, frames, metas):
        return self._keep(self.infer(frames, metas))


def incremental(job: Job) -> dict:
    m = job.models
    if m.generator is None:
        return {"note": "no generator: nothing to paint incrementally"}
    count = min(job.cfg.frames, 48)
    rows = {}
    for name, clip in _clips(job, count).items():
        runs = {mode: Job(job.cfg, clip, m, None, "synth") for mode in ("on", "off")}
        times, kept = {mode: [] for mode in runs}, {}
        for _ in range(job.cfg.repeats):
            for mode, run in runs.items():
                infer = kept[mode] = _Kept(Synthesize(
                    m.segmenter, m.generator, m.remap(None), m.z(quiet=True), STABILIZE_DEFAULT, m.fit(None),
                    m.generator.size, incremental=mode == "on"))
                source = job_source(run, False)
                w, h = m.size
                start = time.perf_counter()
                Pipeline(source, infer, job_sink(source, job.cfg.workdir / f"incremental-{mode}.mp4"),
                         model_shape=(h, w, 3), batch=job.cfg.batch[0], render=run.render).run()
                times[mode].append(time.perf_counter() - start)
        on, off = (np.array(kept[mode].pictures, np.float64) for mode in ("on", "off"))
        mse = float(np.mean((on - off) ** 2))
        shares = kept["on"].infer.reuse.shares()
        rows[name] = {"frames": count, "fps_on": median_rate(times["on"], count),
                      "fps_off": median_rate(times["off"], count),
                      "psnr_db": math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse), **shares}
        rows[name]["on_over_off"] = rows[name]["fps_on"] / rows[name]["fps_off"]
    return {"clips": rows, "ratios": {f"incremental_{k.replace(' ', '_').replace('%', '')}": v["on_over_off"]
                                      for k, v in rows.items()}}
