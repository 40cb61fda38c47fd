"""A tiny segmenter for plumbing benchmarks and tests: one 1x1 convolution from RGB to the
21 PASCAL VOC classes at 64 x 64, following segsynth's DeepLab contract (input ``image``,
output ``logits``, segsynth metadata). It runs in well under a millisecond, so what a run
measures is the pipeline around the model. Made with onnx's helper; no weights to ship."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from segsynth.core import onnxmeta


def segmenter(path: Path, size: tuple[int, int] = (64, 64), batch: int | None = None) -> Path:
    """Write the tiny segmenter to ``path`` (if not there yet) and return the path; ``batch``
    fixes the batch size (default: dynamic)."""

    if path.is_file():
        return path
    w, h = size
    n = batch or "N"
    weights = np.random.default_rng(0).normal(0, 1, (21, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "weight"], ["logits"])], "tiny-segmenter",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [n, 3, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, 21, h, w])],
        [numpy_helper.from_array(weights, "weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.helper.set_model_props(model, {onnxmeta.ROLE: "segmenter", onnxmeta.LABEL_SET: "voc"})
    onnx.checker.check_model(model)
    tmp = path.with_name(f".{path.name}.partial")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path
