"""ONNX graphs with segsynth's I/O contracts, and the export step itself.

Contracts (DESIGN.md):
* SPADE generator: ``label`` N x 1 x H x W int64 (255 = dontcare) [+ ``instance`` N x 1 x H x W
  int64 when the model uses instances] [+ ``z`` N x z_dim float32 for VAE models] ->
  ``image`` N x 3 x H x W float32 in [-1, 1].
* SPADE encoder: ``style`` N x 3 x H x W float32 in [-1, 1] -> ``mu``, ``logvar``.
* DeepLab: ``image`` N x 3 x H x W float32, preprocessed as the checkpoint expects ->
  ``logits`` N x C x H x W (or ``labels`` N x H x W uint8 with the argmax inside).
* Chain: ``frames`` N x H x W x 3 uint8 + ``remap`` (256,) uint8 [+ ``z``] -> ``image``
  N x H x W x 3 uint8 and ``labels`` (the remapped ids the generator saw).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from segsynth.core.errors import ModelError, OutputError
from segsynth.export.deeplab import LoadedDeepLab
from segsynth.export.spade import LoadedSpade, SemanticInput, frozen

OPSET = 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf cannot hold more than 2 GB in one file


class GeneratorGraph(nn.Module):
    def __init__(self, spade: LoadedSpade) -> None:
        super().__init__()
        self.opt = spade.opt
        self.semantic = SemanticInput(spade.opt)
        self.generator = frozen(spade.generator)

    def forward(self, label, instance=None, z=None):
        return self.generator(self.semantic(label, instance), z)


class EncoderGraph(nn.Module):
    def __init__(self, spade: LoadedSpade) -> None:
        super().__init__()
        if spade.encoder is None:
            raise ModelError("this checkpoint has no style encoder (use_vae with latest_net_E.pth)")
        self.encoder = frozen(spade.encoder)

    def forward(self, style):
        return self.encoder(style)


class SegmenterGraph(nn.Module):
    def __init__(self, deeplab: LoadedDeepLab, argmax: bool = False) -> None:
        super().__init__()
        self.model, self.argmax = frozen(deeplab.model), argmax

    def forward(self, image):
        logits = self.model(image)
        return logits.argmax(1).to(torch.uint8) if self.argmax else logits


class ChainGraph(nn.Module):
    """Frames -> resize/normalise -> DeepLab -> argmax -> remap LUT -> one-hot/edges -> SPADE -> frames.

    The remap table is an input, so rules (and the bridge between label sets) change without
    re-export. DeepLab gives no instance maps, so for generators that use instances the edge
    map is taken from the label map itself (edges at class boundaries)."""

    def __init__(self, deeplab: LoadedDeepLab, spade: LoadedSpade, frame_size: tuple[int, int],
                 seg_size: tuple[int, int]) -> None:
        super().__init__()
        pre = deeplab.preprocess
        self.segmenter = frozen(deeplab.model)
        self.bgr = pre.order == "bgr"
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1), persistent=False)
        self.generator = GeneratorGraph(spade)
        self.frame_size, self.seg_size, self.gen_size = frame_size, seg_size, spade.opt.output_size

    def forward(self, frames, remap, z=None):
        # uint8 only at the edges (TensorRT takes uint8 as a network input read by a Cast, or an
        # output written by one): cast first, gather on int32, cast back last
        x = frames.float().permute(0, 3, 1, 2)
        if self.bgr:
            x = x.flip(1)
        x = F.interpolate(x, size=self.seg_size, mode="bilinear", align_corners=False)
        labels = self.segmenter((x - self.mean) / self.std).argmax(1)
        ids = remap.to(torch.int32)[labels]
        label = F.interpolate(ids[:, None].float(), size=self.gen_size, mode="nearest").long()
        instance = label if not self.generator.opt.no_instance else None
        image = self.generator(label, instance, z)
        image = F.interpolate(image, size=self.frame_size, mode="bilinear", align_corners=False)
        pixels = ((image + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8)
        return pixels, ids.to(torch.uint8)


def export(module: nn.Module, inputs: dict[str, torch.Tensor], output_names: list[str], out: str | Path, *,
           dynamic_batch: bool, metadata: dict[str, str], unbatched: tuple[str, ...] = (),
           external_data_bytes: int = EXTERNAL_DATA_BYTES) -> Path:
    """Export ``module`` (called with ``inputs`` as keyword arguments, in order) to ``out``.

    The file appears only when complete: it is written to a temporary directory next to
    ``out`` (with its external-data file when the weights pass ``external_data_bytes``),
    checked with onnx's checker and shape inference, then moved into place. With
    ``dynamic_batch`` the first axis of every input except those in ``unbatched`` is dynamic."""

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise OutputError(f"{out}: the output of export must be an .onnx file")
    if not out.parent.is_dir():
        raise OutputError(f"cannot write {out}: directory {out.parent} does not exist")
    module = module.eval()
    batch = torch.export.Dim("N", min=1, max=64)
    dims = {name: (None if name in unbatched else {0: batch}) for name in inputs}
    try:
        with torch.no_grad():
            program = torch.onnx.export(module, (), kwargs=dict(inputs), dynamo=True, opset_version=OPSET,
                                        input_names=list(inputs), output_names=output_names,
                                        dynamic_shapes=dims if dynamic_batch else None, optimize=True,
                                        verbose=False, report=False)
    except Exception as exc:
        raise ModelError(f"ONNX export failed: {str(exc).strip().splitlines()[0][:300]}") from exc
    model = program.model_proto
    onnx.helper.set_model_props(model, metadata)
    weight_bytes = sum(int(t.raw_data.__len__()) for t in model.graph.initializer)
    external = weight_bytes > external_data_bytes
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.stem}.export-", dir=out.parent))
    try:
        staged = workdir / out.name
        onnx.save(model, str(staged), save_as_external_data=external, all_tensors_to_one_file=True,
                  location=f"{out.name}.data" if external else None)
        onnx.checker.check_model(str(staged), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(staged), str(workdir / "inferred.onnx"))
        if external:
            os.replace(workdir / f"{out.name}.data", out.parent / f"{out.name}.data")
        os.replace(staged, out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def store_weights_fp16(path: str | Path, min_elements: int = 1024) -> None:
    """Rewrite an ONNX file so that large float32 weights are stored as float16 and cast back
    to float32 when the session loads (onnxruntime folds the casts): half the file size, the
    arithmetic still fp32. The weights are rounded to fp16 once (for SPADE graphs, whose
    spectral norm is folded into the weights at export, that moves outputs by ~1e-4)."""

    model = onnx.load(str(path))
    graph = model.graph
    casts, keep = [], []
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT and int(np.prod(tensor.dims)) >= min_elements:
            half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name + "_fp16")
            keep.append(half)
            casts.append(helper.make_node("Cast", [half.name], [tensor.name], to=TensorProto.FLOAT,
                                          name=tensor.name + "_to_fp32"))
        else:
            keep.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    tmp = Path(path).with_name(f".{Path(path).name}.fp16tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
