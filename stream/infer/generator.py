"""SPADE generators at run time: label maps in, RGB frames out, through a Runner.

A generator is an ONNX graph following the SPADE contract (``label`` [+ ``instance``]
[+ ``z``] -> ``image``), from one of:
* ``default``: the bundled generator the project trained itself (segsynth/models);
* an ``.onnx`` file exported with ``segsynth export spade``;
* an official-layout checkpoint directory, exported once to the cache by
  segsynth.jobs.models (the export extra: torch) and then loaded as the .onnx it became.

Threading: stateless between calls; safe to share between sessions (the runners serialise
where their backend needs it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from segsynth.core import labels, onnxmeta, paths
from segsynth.core.errors import InputError, ModelError
from segsynth.engine.runner import Runner
from segsynth.engine.select import open_runner
from segsynth.stream.pictures import resize_rgb

log = logging.getLogger("segsynth")
CHOICES = "'" + "', '".join([*paths.BUNDLED_GENERATORS, "none"]) + "'"


def bundled_generator(name: str = "default", int8: bool = False) -> Path | None:
    """A bundled generator's graph (None where the package lacks it)."""
    path = paths.bundled(paths.BUNDLED_GENERATORS[name][0])
    if int8:
        path = path.with_suffix(".int8.onnx")
    return path if path.is_file() else None


class Generator:
    def __init__(self, runner: Runner, encoder: Runner | None = None, path: Path | None = None) -> None:
        self.runner, self.path = runner.activate(), path  # path: the graph, for the runtime chain
        self.source = getattr(runner, "label", runner.name)
        names = set(runner.inputs)
        meta = runner.metadata
        if "label" not in names or "image" not in runner.outputs or meta.get(onnxmeta.ROLE, "generator") != "generator":
            raise ModelError(f"{self.source} is not a SPADE generator (expected input label[N,1,H,W] and output "
                             f"image[N,3,H,W]; got inputs {sorted(names)} and outputs {sorted(runner.outputs)})")
        h, w = runner.inputs["label"].shape[2:]
        if not (isinstance(h, int) and isinstance(w, int)):
            raise ModelError(f"{self.source}: generators need a fixed size, got {h} x {w}")
        self.size = (w, h)  # (W, H)
        self.uses_instance, self.uses_z = "instance" in names, "z" in names
        self.z_dim = int(runner.inputs["z"].shape[1]) if self.uses_z else 0
        # where seeds are drawn from: the style vectors' spread in training, where the graph says (else N(0, 1))
        self.z_mean = _floats(meta.get(onnxmeta.Z_MEAN), self.z_dim, 0.0)
        self.z_std = _floats(meta.get(onnxmeta.Z_STD), self.z_dim, 1.0)
        self.label_set = labels.get(meta[onnxmeta.LABEL_SET]) if meta.get(onnxmeta.LABEL_SET) else None
        self.fit = meta.get(onnxmeta.FIT, "letterbox")  # how the training frames met the model's size
        # how far (pixels at self.size) a label change reaches in the picture, where the graph says
        radius = meta.get(onnxmeta.RECEPTIVE_RADIUS)
        self.receptive_radius = int(radius) if radius else None
        self.encoder = encoder.activate() if encoder is not None else None
        batch = runner.inputs["label"].shape[0]
        self.batch = batch if isinstance(batch, int) else runner.max_batch  # frames per call; None: any

    def seeded_z(self, seed: int) -> np.ndarray:
        """The style vector of ``seed`` (1 x z_dim): the same seed, the same style."""
        rng = np.random.default_rng(seed)
        return (rng.standard_normal((1, self.z_dim)) * self.z_std + self.z_mean).astype(np.float32)

    def encode_style(self, rgb: np.ndarray) -> np.ndarray:
        """A style image (H x W x 3 uint8) -> z (1 x z_dim): the encoder's mean."""
        if not self.uses_z:
            raise InputError(f"{self.source} has no style input (it is not a VAE generator); --style needs one")
        if self.encoder is None:
            raise InputError(f"{self.source}: no style encoder (latest_net_E.pth) to encode --style with")
        batch, _, *size = self.encoder.inputs["style"].shape

        # the encoder graph's own style size; where a dim is dynamic, the generator's (the size the
        # official encoder saw its training images at; it resizes to 256x256 inside either way)
        h, w = (s if isinstance(s, int) else g for s, g in zip(size, self.size[::-1]))
        x = resize_rgb(rgb, w, h).astype(np.float32) / 127.5 - 1
        x = np.repeat(x.transpose(2, 0, 1)[None], batch if isinstance(batch, int) else 1, 0)  # a fixed batch N
        return self.encoder.infer({"style": x})["mu"][:1, : self.z_dim]

    def __call__(self, label_maps: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
        """N x H x W uint8 ids (at ``self.size``) -> N x H x W x 3 uint8 pixels."""
        outs = []
        step = self.batch or len(label_maps)
        for start in range(0, len(label_maps), step):
            ids = label_maps[start:start + step].astype(np.int64)[:, None]
            feed = {"label": ids}
            if self.uses_instance:
                feed["instance"] = ids
            if self.uses_z:
                feed["z"] = np.repeat(z, len(ids), 0).astype(np.float32)
            image = self.runner.infer(feed)["image"]
            outs.append(((image + 1) * 127.5).round().clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
        return np.concatenate(outs)

    @property
    def runners(self) -> tuple:
        return (self.runner, *((self.encoder,) if self.encoder is not None else ()))

    def close(self) -> None:
        self.runner.deactivate()
        if self.encoder is not None:
            self.encoder.deactivate()


def _floats(text: str | None, n: int, default: float) -> np.ndarray:
    values = np.array([float(v) for v in text.split(",")], np.float32) if text else np.full(n, default, np.float32)
    if values.shape != (n,):
        raise ModelError(f"the graph's z statistics have {values.size} values for z_dim {n}")
    return values


def _encoder_beside(path: Path) -> Path | None:
    """``NAME-encoder.onnx`` beside ``NAME.onnx``: a VAE generator's style encoder, where there is one."""
    sibling = path.with_name(path.stem + "-encoder.onnx")
    return sibling if sibling.is_file() else None


def load_generator(spec: str, *, size: tuple[int, int] | None = None, cache_dir: Path | None = None,
                   threads: int | None = None, backend: str = "onnxruntime", fp16: bool = True,
                   batch: int | None = None, int8: bool = False) -> Generator | None:
    """A bundled generator by name (``default``, ``spade2``: None when the package lacks it),
    ``none`` (segmentation only) or an .onnx file; run on ``backend`` ("auto": the best that can
    serve it); ``int8``: a bundled generator's quantised graph."""
    if spec == "none":
        return None
    if spec in paths.BUNDLED_GENERATORS:
        path = bundled_generator(spec)
        if path is None:
            return None
        encoder = paths.bundled(paths.BUNDLED_GENERATORS[spec][1])
        encoder = encoder if encoder.is_file() else None
        if int8:  # the int8 twin, where there is one
            twin = bundled_generator(spec, int8=True)
            if twin is None:
                log.info("notice: --generator %s has no int8 graph in this package; --models fast runs its "
                         "float graph", spec)
            path = twin or path
    else:
        path = Path(spec)
        if path.is_dir():  # exporting it needs torch: segsynth.export, which the stream library does not import
            raise ModelError(f"--generator {spec}: a checkpoint directory is exported to ONNX first: load it with "
                             "segsynth.jobs.models.load_models (the commands do), or segsynth export spade")
        if path.suffix.lower() != ".onnx" or not path.is_file():
            raise InputError(f"--generator {spec}: expected {CHOICES}, an .onnx file or a checkpoint directory")
        encoder = _encoder_beside(path)
    opened: list[Runner] = []
    try:
        for model in (path, encoder) if encoder else (path,):
            opened.append(open_runner(model, backend, fp16=fp16, threads=threads, cache_dir=cache_dir, batch=batch))
        return Generator(*opened, path=path)
    except BaseException:
        for r in opened:
            r.deactivate()
        raise
