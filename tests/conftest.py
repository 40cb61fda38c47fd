"""Shared fixtures: media made with PyAV/lavfi or taken from the repo's third_party assets,
and a helper that runs the installed ``segsynth`` command like a user would."""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO / "third_party" / "media"
MODELS = REPO / "third_party" / "models"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``segsynth`` console script (``env``: variables added to this process's);
    returns the completed process (text output)."""
    script = Path(sys.executable).with_name("segsynth")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "segsynth.cli"]
    proc = subprocess.run([*cmd, *map(str, args)], cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if args and args[0] == "export" and proc.returncode == 0 and "--out" in args:
        assert_tensorrt_parsable(Path(cwd or ".") / str(args[list(args).index("--out") + 1]))
    return proc


def assert_tensorrt_parsable(path) -> None:
    """Every graph the project writes must be one TensorRT's ONNX parser takes (checked on the
    CPU: no uint8 inside, only supported ops, types and modes); every export in the suite is."""
    from segsynth.engine.graphcheck import tensorrt_problems

    problems = tensorrt_problems(path)
    assert not problems, f"{path} is not TensorRT-parsable: {problems}"


def decode_video(path: Path) -> tuple[list[float], list[np.ndarray]]:
    """Presentation times (seconds) and frames (rgb24, or gray for gray streams) of the first video stream."""
    import av

    times, frames = [], []
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        gray = stream.codec_context.pix_fmt == "gray"
        for f in c.decode(stream):
            times.append(float(f.pts * f.time_base))
            frames.append(f.to_ndarray(format="gray" if gray else "rgb24"))
    return times, frames


def audio_info(path: Path) -> tuple[int, float, str]:
    """(packet count, duration in seconds, sha256 of all packet payloads) of the first audio
    stream: equal hashes mean the audio was copied untouched."""
    import hashlib

    import av

    with av.open(str(path)) as c:
        if not c.streams.audio:
            return 0, 0.0, ""
        stream = c.streams.audio[0]
        packets = [(p.pts, p.duration, p.time_base, bytes(p)) for p in c.demux(stream) if p.dts is not None]
    end = max(float((pts + dur) * tb) for pts, dur, tb, _ in packets)
    start = min(float(pts * tb) for pts, _, tb, _ in packets)
    digest = hashlib.sha256(b"".join(data for *_, data in packets)).hexdigest()
    return len(packets), end - start, digest


def write_clip(path: Path, frames: list[np.ndarray], times: list[Fraction], *, audio_seconds: float = 0.0,
               codec: str = "libx264", faststart: bool = False, rotation: int = 0, audio_first: bool = False,
               pix_fmt: str = "yuv420p", second_video: bool = False) -> Path:
    """Encode RGB frames at the given presentation times (VFR allowed) plus an optional
    sine-wave AAC track, like a phone or camera would. ``rotation`` writes a display matrix;
    ``audio_first`` makes the audio stream #0; ``second_video`` adds another video stream."""
    import av

    tb = Fraction(1, 1000)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        a = None
        if audio_seconds and audio_first:
            a = c.add_stream("aac", rate=44100)
        v = c.add_stream(codec, rate=25)
        v.width, v.height = frames[0].shape[1], frames[0].shape[0]
        v.pix_fmt, v.time_base = pix_fmt, tb
        if rotation:
            v.set_display_rotation(rotation)
        v2 = None
        if second_video:
            v2 = c.add_stream(codec, rate=25)
            v2.width, v2.height, v2.pix_fmt, v2.time_base = 64, 48, pix_fmt, tb
        if audio_seconds and not audio_first:
            a = c.add_stream("aac", rate=44100)
        if a is not None:
            a.layout = "stereo"
        for img, t in zip(frames, times):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = int(t / tb), tb
            c.mux(v.encode(f))
            if v2 is not None:
                g = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 200, np.uint8), format="rgb24")
                g.pts, g.time_base = int(t / tb), tb
                c.mux(v2.encode(g))
        c.mux(v.encode(None))
        if v2 is not None:
            c.mux(v2.encode(None))
        if a is not None:
            n = int(44100 * audio_seconds)
            samples = (0.2 * np.sin(2 * np.pi * 440 * np.arange(n) / 44100)).astype(np.float32)
            for start in range(0, n, 1024):
                chunk = np.repeat(samples[None, start:start + 1024], 2, 0)
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="stereo")
                fr.sample_rate, fr.pts = 44100, start
                c.mux(a.encode(fr))
            c.mux(a.encode(None))
    return path


@pytest.fixture(scope="session")
def tiny_segmenter(tmp_path_factory) -> Path:
    """A 1x1-convolution VOC segmenter at 64x64 (benchmarks/tiny.py): plumbing tests measure
    the pipeline, not the model."""
    from segsynth.benchmarks import tiny

    return tiny.segmenter(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


# A tiny random-init generator for ADE20K's 150 classes at 64 x 64: plumbing tests that need one
TINY_ADE_SPADE = dict(label_nc=150, contain_dontcare_label=True, no_instance=True, ngf=4, crop_size=64,
                      norm_G="spectralspadeinstance3x3")


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory) -> Path:
    """TINY_ADE_SPADE exported to ONNX (the bundled 256 x 256 one runs at about 1.6 fps here)."""
    d = tmp_path_factory.mktemp("tiny-generator")
    make_spade_checkpoint(d / "ckpt", **TINY_ADE_SPADE)
    proc = run_cli("export", "spade", "--checkpoint", d / "ckpt", "--out", d / "spade.onnx")
    assert proc.returncode == 0, proc.stderr
    return d / "spade.onnx"


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(REPO / "examples" / "astronaut.png").convert("RGB"))


@pytest.fixture(scope="session")
def people_clip(tmp_path_factory, astronaut) -> Path:
    """8 frames of a person (the astronaut photo, drifting sideways) at variable frame rate,
    with 0.6 s of stereo AAC audio."""
    frames = [np.roll(astronaut[:, :480], shift=6 * i, axis=1) for i in range(8)]
    times = [Fraction(k, 1000) for k in (0, 40, 80, 160, 200, 280, 320, 400)]  # VFR
    return write_clip(tmp_path_factory.mktemp("media") / "people.mp4", frames, times, audio_seconds=0.6)


@pytest.fixture(scope="session")
def real_photos() -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image (BSD-3 / public domain)."""
    from skimage import data

    gray = data.camera()
    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "rocket": data.rocket(),
            "chelsea": data.chelsea(), "motorcycle": data.stereo_motorcycle()[0],
            "camera": np.repeat(gray[..., None], 3, -1)}


def make_spade_checkpoint(directory: Path, seed: int = 0, **options) -> dict:
    """A tiny random-init SPADE checkpoint in the official layout (opt.txt, latest_net_G.pth,
    latest_net_E.pth for VAE models). A few training-mode passes first give the BatchNorm
    running statistics and the spectral-norm u/v vectors non-trivial stored values."""
    import torch

    from segsynth.export.spade import ConvEncoder, SPADEGenerator, SpadeOptions, write_opt_txt

    torch.manual_seed(seed)
    opt = SpadeOptions(**options)
    directory.mkdir(parents=True, exist_ok=True)
    g = SPADEGenerator(opt).train()
    h, w = opt.output_size
    with torch.no_grad():
        for _ in range(2):
            g(torch.rand(2, opt.semantic_nc, h, w).round(), torch.randn(2, opt.z_dim))
    torch.save(g.state_dict(), directory / "latest_net_G.pth")
    if opt.use_vae:
        e = ConvEncoder(opt).train()
        with torch.no_grad():
            e(torch.rand(2, 3, 256, 256) * 2 - 1)
        torch.save(e.state_dict(), directory / "latest_net_E.pth")
    write_opt_txt(opt, directory / "opt.txt", {"name": "tiny", "gpu_ids": "0", "batchSize": 1, "isTrain": True,
                                                "dataset_mode": "custom", "load_size": opt.crop_size})
    return {f: getattr(opt, f) for f in opt.__dataclass_fields__}


def make_deeplab_checkpoint(path: Path, family: str, n_classes: int, seed: int = 0, **kwargs) -> Path:
    """A random-init DeepLab state dict in its published format: ``kazuto`` (DeepLabV2 in the
    MSC wrapper, keys ``base.…``), ``tv-resnet50``/``tv-resnet101``/``tv-mobilenet_v3_large``
    (torchvision DeepLabV3 with its aux head). BatchNorm statistics are randomised."""
    import torch

    from segsynth.export import deeplab as dl

    torch.manual_seed(seed)
    if family == "kazuto":
        net = dl.MSC(dl.DeepLabV2(n_classes, kwargs.get("n_blocks", (3, 4, 23, 3))))
    else:
        net = dl.TVDeepLabV3(family[3:], n_classes, aux=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.3, 1.0, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
    torch.save(net.state_dict(), path)
    return path


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "no CUDA GPU here (run on the GPU machine: pytest -m gpu)"


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if "gpu" in item.keywords:
            reason = reason or _cuda_reason() or ""
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@contextlib.contextmanager
def http_server(handler):
    """An HTTP server on a free loopback port, serving in a thread: yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
