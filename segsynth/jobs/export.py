"""``segsynth export``: build the requested graph from checkpoints and write it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from segsynth.core import labels, onnxmeta
from segsynth.core.config import ExportConfig
from segsynth.core.errors import InputError
from segsynth.export.checkpoint import read_state_dict
from segsynth.export.deeplab import build_deeplab
from segsynth.export.onnx_export import (
    ChainGraph,
    EncoderGraph,
    GeneratorGraph,
    SegmenterGraph,
    export,
)
from segsynth.export.spade import NUM_UP_LAYERS, load_spade, read_options
from segsynth.export.student import load_student, receptive_radius
from segsynth.export.tflite import segmenter_from_tflite
from segsynth.jobs.quantize import quantize
from segsynth.stream.io.mux import atomic_output

log = logging.getLogger("segsynth")


def run_export(cfg: ExportConfig) -> str:
    """Do the export; returns a one-line summary."""
    if cfg.what == "deeplab" and cfg.from_tflite:
        return _from_tflite(cfg)
    if cfg.what == "quantize":
        return quantize(cfg.model, cfg.out, list(cfg.calibrate), frames=cfg.frames)

    logging.getLogger("torch").setLevel(logging.ERROR)  # the exporter's notes about torchvision ops
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from inside the exporter, not actionable here
        return {"spade": _spade, "encoder": _encoder, "deeplab": _deeplab, "chain": _chain,
                "student": _student}[cfg.what](cfg)


def _from_tflite(cfg: ExportConfig) -> str:
    model = segmenter_from_tflite(cfg.from_tflite, label_set=cfg.label_set)
    with atomic_output(cfg.out, cfg.from_tflite) as tmp:
        onnx.save(model, str(tmp))
    props = onnxmeta.read(model)
    size = "x".join(str(d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim[2:])
    return f"wrote {cfg.out} ({props[onnxmeta.LABEL_SET]} segmenter, {props[onnxmeta.CLASSES]} classes, input {size})"


def _spade_options(cfg: ExportConfig, size: tuple[int, int] | None):
    """opt.txt with the --opt overrides; ``size`` (H, W) sets crop_size and aspect_ratio."""

    overrides = dict(cfg.overrides)
    if size:
        h, w = size
        opt = read_options(cfg.checkpoint, overrides)
        step = 2 ** NUM_UP_LAYERS[opt.num_upsampling_layers]
        if h % step or w % step:
            raise InputError(f"--size {w}x{h}: SPADE with num_upsampling_layers={opt.num_upsampling_layers} "
                             f"needs both sides to be multiples of {step}")
        overrides.update(crop_size=w, aspect_ratio=w / h)
    return read_options(cfg.checkpoint, overrides)


def _generator_metadata(opt, label_set: str | None) -> dict[str, str]:
    h, w = opt.output_size
    return {onnxmeta.ROLE: "generator", onnxmeta.LABEL_SET: label_set or (labels.by_class_count(opt.label_nc) or ""),
            onnxmeta.LABEL_NC: str(opt.label_nc), onnxmeta.CONTAIN_DONTCARE_LABEL: str(opt.contain_dontcare_label),
            onnxmeta.NO_INSTANCE: str(opt.no_instance), onnxmeta.USE_VAE: str(opt.use_vae),
            onnxmeta.Z_DIM: str(opt.z_dim), onnxmeta.SIZE: f"{h}x{w}"}


def _generator_inputs(opt, batch: int):
    h, w = opt.output_size
    label = torch.randint(0, opt.label_nc, (batch, 1, h, w))
    inputs = {"label": label}
    if not opt.no_instance:
        inputs["instance"] = label.clone()
    if opt.use_vae:
        inputs["z"] = torch.randn(batch, opt.z_dim)
    return inputs


def _spade(cfg: ExportConfig) -> str:
    opt = _spade_options(cfg, cfg.size)
    graph = GeneratorGraph(load_spade(cfg.checkpoint, opt, cfg.epoch))
    inputs = _generator_inputs(opt, cfg.batch or 2)
    export(graph, inputs, ["image"], cfg.out, dynamic_batch=cfg.batch is None,
           metadata=_generator_metadata(opt, cfg.label_set))
    h, w = opt.output_size
    return f"wrote {cfg.out} (SPADE generator, {opt.label_nc} labels, {w}x{h}, inputs {', '.join(inputs)})"


def _student(cfg: ExportConfig) -> str:
    """A student checkpoint (segsynth.export.student) under the generator contract: label, z -> image."""
    net = load_student(cfg.checkpoint)
    opt = net.opt
    inputs = {"label": torch.randint(0, opt.label_nc, (cfg.batch or 2, 1, opt.size, opt.size)),
              "z": torch.randn(cfg.batch or 2, opt.z_dim)}
    metadata = {onnxmeta.ROLE: "generator", onnxmeta.LABEL_SET: cfg.label_set or labels.by_class_count(opt.label_nc) or "",
                onnxmeta.LABEL_NC: str(opt.label_nc), onnxmeta.CONTAIN_DONTCARE_LABEL: "True",
                onnxmeta.NO_INSTANCE: "True", onnxmeta.USE_VAE: "True", onnxmeta.Z_DIM: str(opt.z_dim),
                onnxmeta.SIZE: f"{opt.size}x{opt.size}", onnxmeta.FIT: "stretch", onnxmeta.FAMILY: "student",
                onnxmeta.RECEPTIVE_RADIUS: str(receptive_radius(net))}
    stats = Path(cfg.checkpoint) / "z_stats.npz"
    if stats.is_file():  # the style vectors' spread in training: what seeds are drawn from
        with np.load(stats) as z:
            metadata.update({onnxmeta.Z_MEAN: ",".join(f"{v:.6g}" for v in z["mean"]),
                             onnxmeta.Z_STD: ",".join(f"{v:.6g}" for v in z["std"])})
    export(net, inputs, ["image"], cfg.out, dynamic_batch=cfg.batch is None, metadata=metadata)
    return (f"wrote {cfg.out} (student generator, {opt.label_nc} labels, {opt.size}x{opt.size}, z {opt.z_dim}, "
            f"receptive radius {metadata[onnxmeta.RECEPTIVE_RADIUS]} px)")


def _encoder(cfg: ExportConfig) -> str:
    opt = _spade_options(cfg, None)  # --size is the style image size here
    graph = EncoderGraph(load_spade(cfg.checkpoint, opt, cfg.epoch))
    # The official ConvEncoder is fed the dataset's images (crop_size wide, crop_size/aspect_ratio
    # high: the generator's output size) and resizes them to 256x256 inside its forward, as ours does.
    h, w = cfg.size or opt.output_size
    export(graph, {"style": torch.rand(cfg.batch or 2, 3, h, w) * 2 - 1}, ["mu", "logvar"], cfg.out,
           dynamic_batch=cfg.batch is None, metadata={onnxmeta.ROLE: "encoder", onnxmeta.SIZE: f"{h}x{w}"})
    return f"wrote {cfg.out} (SPADE style encoder, style {w}x{h} -> mu, logvar)"


def _load_deeplab(path: Path):
    return build_deeplab(read_state_dict(path), str(path))


def _check_seg_size(size: tuple[int, int], flag: str) -> None:
    if min(size) < 32:
        raise InputError(f"{flag} {size[1]}x{size[0]}: DeepLab needs at least 32 pixels on each side")


def _deeplab(cfg: ExportConfig) -> str:
    size = cfg.size or (513, 513)
    _check_seg_size(size, "--size")
    deeplab = _load_deeplab(cfg.checkpoint)
    pre = deeplab.preprocess
    label_set = cfg.label_set or (labels.by_class_count(deeplab.n_classes) or "")
    metadata = {onnxmeta.ROLE: "segmenter", onnxmeta.LABEL_SET: label_set,
                onnxmeta.CLASSES: str(deeplab.n_classes), onnxmeta.FAMILY: deeplab.family,
                onnxmeta.INPUT_ORDER: pre.order, onnxmeta.INPUT_MEAN: ",".join(map(repr, pre.mean)),
                onnxmeta.INPUT_STD: ",".join(map(repr, pre.std))}
    image = torch.randn(cfg.batch or 2, 3, *size) * 50
    export(SegmenterGraph(deeplab, cfg.argmax), {"image": image}, ["labels" if cfg.argmax else "logits"],
           cfg.out, dynamic_batch=cfg.batch is None, metadata=metadata)
    return (f"wrote {cfg.out} ({deeplab.family}, {deeplab.n_classes} classes, input {size[1]}x{size[0]}, "
            f"output {'labels' if cfg.argmax else 'logits'})")


def _chain(cfg: ExportConfig) -> str:
    _check_seg_size(cfg.seg_size, "--seg-size")
    deeplab = _load_deeplab(cfg.deeplab)
    opt = _spade_options(cfg, None)  # --size is the frame size here; the generator keeps its own
    spade = load_spade(cfg.checkpoint, opt, cfg.epoch)
    seg_set = cfg.label_set or (labels.by_class_count(deeplab.n_classes) or "")
    gen_set = (labels.by_class_count(opt.label_nc) or "")
    graph = ChainGraph(deeplab, spade, cfg.size, cfg.seg_size)
    batch = cfg.batch or 2
    inputs = {"frames": torch.randint(0, 256, (batch, *cfg.size, 3), dtype=torch.uint8),
              "remap": torch.arange(256, dtype=torch.uint8)}
    if opt.use_vae:
        inputs["z"] = torch.randn(batch, opt.z_dim)
    metadata = {**_generator_metadata(opt, None), onnxmeta.ROLE: "chain", onnxmeta.SEGMENTER_LABEL_SET: seg_set,
                onnxmeta.GENERATOR_LABEL_SET: gen_set, onnxmeta.FRAME_SIZE: "x".join(map(str, cfg.size)),
                onnxmeta.SEG_SIZE: "x".join(map(str, cfg.seg_size))}
    export(graph, inputs, ["image", "labels"], cfg.out, dynamic_batch=cfg.batch is None, metadata=metadata,
           unbatched=("remap",))
    return (f"wrote {cfg.out} (chain: {deeplab.family} [{seg_set or '?'}] -> SPADE [{gen_set or '?'}], "
            f"frames {cfg.size[1]}x{cfg.size[0]})")
