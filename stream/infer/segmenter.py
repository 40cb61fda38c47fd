"""Segmenters: RGB frames in, label maps (uint8 ids of one label set) out.

The default is two DeepLabV3-MobileNetV2 models fused: ADE20K-150 for the scene and
PASCAL VOC-21 for people, animals and vehicles, whose non-background pixels are painted
over the scene map after mapping VOC names to ADE20K ids (person -> person, dog -> animal).

Threading: a segmenter owns its runners and keeps no state between calls, so one instance
serves many stream sessions at once (the runners serialise where their backend needs it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from segsynth.core import labels, onnxmeta, paths
from segsynth.core.errors import InputError, ModelError
from segsynth.core.grammar import FAST_SEG_SIZE
from segsynth.engine.cache import CachedFile, content_key
from segsynth.engine.runner import Runner
from segsynth.engine.select import open_runner
from segsynth.stream.infer.seg_size import argmax_before_upsampling, resize_segmenter

BUNDLED = {
    "ade20k": "deeplabv3_mnv2_ade20k.onnx",
    "voc": "deeplabv3_mnv2_voc.onnx",
}
CHOICES = ("ade20k+voc", "ade20k", "voc")


def bundled_model(name: str, int8: bool = False) -> Path:
    """A bundled segmenter's graph; ``int8``: its quantised twin (``export quantize``)."""
    return paths.bundled(BUNDLED[name].replace(".onnx", ".int8.onnx") if int8 else BUNDLED[name])


def reshaped(path: Path, size: int | None, lowres: bool, cache_dir: Path) -> Path:
    """``path`` re-shaped to size x size input, with the argmax moved before the upsampling
    where ``lowres`` (stream.infer.seg_size), made once in the cache (engine.cache.CachedFile)."""
    model = onnx.load(str(path))
    if model.graph.input[0].type.tensor_type.shape.dim[2].dim_value == size and not lowres:
        return path  # already that size

    def make(tmp: Path) -> None:
        changed = resize_segmenter(model, size) if size else model
        onnx.save(argmax_before_upsampling(changed) if lowres else changed, str(tmp))

    name = f"{path.stem}-{size or 'same'}{'-lowres' if lowres else ''}-{content_key(path)}.onnx"
    return CachedFile(cache_dir / "segmenters" / name)(make)


class OnnxSegmenter:
    """One ONNX segmenter that follows the DeepLab contract: input ``image`` N x 3 x H x W
    float32 (channels in ``segsynth.input_order``, normalised as ``(x - mean) / std`` from the
    graph's metadata; DeepLab's TensorFlow default ``x / 127.5 - 1`` when absent), output
    ``labels`` N x H x W ints (argmax inside the graph) or ``logits`` N x C x H x W."""

    def __init__(self, runner: Runner, label_set: str | None = None, path: Path | None = None) -> None:
        self.runner, self.path = runner.activate(), path  # path: the graph, for the runtime chain
        self.source = getattr(runner, "label", runner.name)
        self.asynchronous = runner.name in ("tensorrt", "torch-cuda")  # submit() returns before the work is done
        image = [m for m in runner.inputs.values() if len(m.shape) == 4 and m.shape[1] == 3]
        outs = [m for m in runner.outputs.values() if m.name in ("labels", "logits")]
        meta = runner.metadata
        if len(runner.inputs) != 1 or not image or not outs or meta.get(onnxmeta.ROLE, "segmenter") != "segmenter":
            ins = ", ".join(f"{m.name}{list(m.shape)}" for m in runner.inputs.values())
            got = ", ".join(f"{m.name}{list(m.shape)}" for m in runner.outputs.values())
            raise ModelError(f"{self.source} is not a segmenter: expected input image[N,3,H,W] and output "
                             f"labels[N,H,W] or logits[N,C,H,W], got inputs {ins or 'none'} and outputs {got or 'none'}")
        self.input_name, self.output_name = image[0].name, outs[0].name
        # the top class's probability per pixel, where the graph gives it (segsynth's exports do)
        self.confidence = "confidence" in runner.outputs or self.output_name == "logits"
        # frames per call: the graph's fixed batch, else the runner's largest (None: any)
        self.batch = image[0].shape[0] if isinstance(image[0].shape[0], int) else runner.max_batch
        h, w = image[0].shape[2:]
        if not (isinstance(h, int) and isinstance(w, int)):
            raise ModelError(f"{self.source}: segmenters need a fixed input size, got {h} x {w}")
        self.size = (w, h)
        try:
            mean = [float(v) for v in meta.get(onnxmeta.INPUT_MEAN, "127.5,127.5,127.5").split(",")]
            std = [float(v) for v in meta.get(onnxmeta.INPUT_STD, "127.5,127.5,127.5").split(",")]
        except ValueError:
            raise ModelError(f"{self.source}: malformed segsynth.input_mean/std metadata") from None
        self.bgr = meta.get(onnxmeta.INPUT_ORDER, "rgb") == "bgr"
        scale = 1 / np.asarray(std, np.float32)
        self.scale, self.offset = scale.reshape(1, 3, 1, 1), (-np.asarray(mean, np.float32) * scale).reshape(1, 3, 1, 1)
        name = label_set or meta.get(onnxmeta.LABEL_SET)
        if name is None:
            raise ModelError(f"{self.source} does not say which label set it predicts; pass --label-set")
        self.label_set = labels.get(name)

    def submit(self, frames: np.ndarray):
        """Start N x H x W x 3 uint8 frames (at ``self.size``); ``finish`` returns their labels."""
        x = frames[..., ::-1] if self.bgr else frames
        x = np.ascontiguousarray(x.astype(np.float32).transpose(0, 3, 1, 2) * self.scale + self.offset)
        step = self.batch or len(x)  # a fixed batch size (graph or engine) takes the frames in chunks of it
        return [self.runner.submit({self.input_name: x[i:i + step]}) for i in range(0, len(x), step)]

    def finish(self, handles, confidence: bool = False):
        """The labels of a submitted batch; with ``confidence``, (labels, confidence or None)."""
        outs = [self.runner.wait(h) for h in handles]
        out = np.concatenate([o[self.output_name] for o in outs])
        conf = np.concatenate([o["confidence"] for o in outs]) if "confidence" in outs[0] else None
        if self.output_name == "logits":
            if confidence and conf is None:  # the softmax maximum, 1 / sum(exp(x - max))
                conf = 1 / np.exp(out - out.max(1, keepdims=True)).sum(1)
            out = out.argmax(1)
        labels = out.astype(np.uint8, copy=False)
        return (labels, conf) if confidence else labels

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 frames at ``self.size`` -> N x H x W uint8 label ids."""
        return self.finish(self.submit(frames))

    def pinned_allocator(self):
        return self.runner.pinned_allocator()

    @property
    def runners(self) -> tuple:
        return (self.runner,)

    def close(self) -> None:
        self.runner.deactivate()


class FusedSegmenter:
    """Scene segmenter + object segmenter: object pixels (non-background) painted over the scene,
    their ids mapped by class name into the scene's label set."""

    def __init__(self, scene: OnnxSegmenter, objects: OnnxSegmenter) -> None:
        if scene.size != objects.size:
            raise ModelError(f"fused segmenters need one input size, got {scene.size} and {objects.size}")
        self.scene, self.objects = scene, objects
        self.label_set, self.size = scene.label_set, scene.size
        self.asynchronous = scene.asynchronous
        self.bridge = labels.mapping(objects.label_set, scene.label_set)
        self.confidence = scene.confidence and objects.confidence

    def submit(self, frames: np.ndarray):
        return self.scene.submit(frames), self.objects.submit(frames)

    def finish(self, handle, confidence: bool = False):
        """The fused labels; with ``confidence``, (labels, each pixel's confidence from the model
        its label came from, or None)."""
        scene, objects = handle
        out, scene_conf = self.scene.finish(scene, confidence=True)
        painted, objects_conf = self.objects.finish(objects, confidence=True)
        painted = self.bridge[painted]
        known = painted != labels.UNKNOWN
        fused = np.where(known, painted, out)
        if not confidence:
            return fused
        both = scene_conf is not None and objects_conf is not None
        return fused, np.where(known, objects_conf, scene_conf) if both else None

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return self.finish(self.submit(frames))

    def pinned_allocator(self):
        return self.scene.pinned_allocator()

    @property
    def runners(self) -> tuple:
        return (*self.scene.runners, *self.objects.runners)

    def close(self) -> None:
        self.scene.close()
        self.objects.close()


def load_segmenter(spec: str = "ade20k+voc", *, label_set: str | None = None, threads: int | None = None,
                   backend: str = "onnxruntime", fp16: bool = True, cache_dir: Path | None = None,
                   batch: int | None = None, fast: bool = False, seg_size: int | None = None):
    """``ade20k``, ``voc``, ``ade20k+voc`` (the bundled models) or a path to a segmenter ONNX,
    run on ``backend`` ("auto": the best that can serve it, see segsynth.engine.select);
    ``batch``: the frames per call GPU engines are tuned for; ``seg_size``: the graphs re-shaped
    to that input size; ``fast``: the bundled models' int8 graphs at ``seg_size`` (default
    FAST_SEG_SIZE) with the argmax taken before the upsampling (a graph given as a file is
    used as it is, re-shaped only to an explicit ``seg_size``)."""

    bundled = spec in BUNDLED or spec == "ade20k+voc"
    lowres = fast and bundled
    size = seg_size or (FAST_SEG_SIZE if lowres else None)

    def one(path: Path, ls: str | None = None) -> OnnxSegmenter:
        if size is not None or lowres:
            path = reshaped(path, size, lowres, cache_dir or paths.cache_dir())
        runner = open_runner(path, backend, fp16=fp16, threads=threads, cache_dir=cache_dir, batch=batch)
        try:
            return OnnxSegmenter(runner, ls, path)
        except BaseException:
            runner.deactivate()
            raise

    if spec in BUNDLED:
        return one(bundled_model(spec, fast))
    if spec == "ade20k+voc":
        return FusedSegmenter(one(bundled_model("ade20k", fast)), one(bundled_model("voc", fast)))
    path = Path(spec)
    if path.suffix.lower() != ".onnx":
        raise InputError(f"unknown segmenter {spec!r}; choose {', '.join(CHOICES)} or a path to an .onnx file")
    if not path.is_file():
        raise InputError(f"{path}: no such segmenter file")
    return one(path, label_set)
