"""A perceptual (feature-matching) loss through a frozen pretrained network the project ships.

SPADE's official recipe uses VGG-19 features (``lambda_vgg`` 10); no VGG weights can be had
here, so the loss compares activations of the bundled PASCAL VOC DeepLabV3-MobileNetV2
backbone instead: the TFLite model's weights as converted by ``export/tflite.py`` (the graph
``deeplabv3_mnv2_voc.onnx``, which matches the TFLite interpreter, see MODEL_CARD.md), cut
after the expanded activations of four inverted-residual blocks (strides 2, 4, 8 and 16) and
run by PyTorch operations (``engine/onnx_torch.py``), so gradients flow to the generator.

Each activation is normalised to unit length over its channels at every pixel (as LPIPS
does); the loss is the L1 distance between the generated and the real frame's normalised
activations (summed over channels, averaged over pixels), averaged over the four depths.
Not the ADE20K model: that one scores the generator (``eval-generator``), and training
through it would game its own score.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnx.utils import Extractor
from torch import nn

from segsynth.core import paths
from segsynth.core.errors import ModelError
from segsynth.engine.onnx_torch import OnnxTorchModule

VOC_MODEL = "deeplabv3_mnv2_voc.onnx"
# The ReLU6 after the expansion convolution of blocks 1, 3, 6 and 10 of MobileNetV2 (96, 144,
# 192 and 384 channels; output strides 2, 4, 8 and 16) in the converted graph.
TAPS = ("clip_21", "clip_52", "clip_99", "clip_162")


class PerceptualLoss(nn.Module):
    def __init__(self, model: str | Path | None = None, taps: tuple[str, ...] = TAPS) -> None:
        super().__init__()

        path = Path(model) if model else paths.bundled(VOC_MODEL)
        proto = onnx.load(str(path))
        produced = {o for n in proto.graph.node for o in n.output}
        missing = [t for t in taps if t not in produced]
        if missing:
            raise ModelError(f"{path}: no activations named {', '.join(missing)} (not the bundled VOC graph?)")
        cut = Extractor(onnx.shape_inference.infer_shapes(proto)).extract_model([proto.graph.input[0].name], list(taps))
        self.input_name = proto.graph.input[0].name
        self.net = OnnxTorchModule(cut.SerializeToString())
        self.taps = taps

    def to(self, device, *args, **kwargs):  # the graph's constants are not nn parameters
        self.net.to(device)
        return super().to(device, *args, **kwargs)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: N x 3 x H x W in [-1, 1] (the VOC model's x / 128 - 1, near enough)."""
        out = self.net(**{self.input_name: x})
        return [f / (f.norm(dim=1, keepdim=True) + 1e-6) for f in (out[t].float() for t in self.taps)]

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.features(real)
        return sum((a - b).abs().sum(1).mean() for a, b in zip(self.features(fake), target)) / len(target)
