"""The student generator: a CPU-first SPADE replacement, distilled from the bundled SPADE default.

Same contract as every segsynth generator (label ids N x 1 x H x W, style vector z N x z_dim ->
image N x 3 x H x W in [-1, 1]), at a fraction of the work:

* **Class-adaptive modulation** (CLADE, Tan et al. 2021): each layer's per-class scale and shift
  are looked up from the label map (an embedding table: a Gather in ONNX) instead of computed by
  SPADE's convolutional branch, which is most of SPADE's cost.
* **No statistics over the image**: no batch or instance normalisation. Global appearance comes
  from the style vector (an affine per layer from z, as AdaIN without its statistics), local
  structure from the labels nearby. A uniform label map therefore still paints its class, and a
  change in one region changes the picture only near it.
* **A bounded receptive field**: it starts from the labels at 1/8 of the size and works its way
  up; ``receptive_radius()`` measures how far a change reaches (at 256 x 256: under 64 pixels).

Layout (256 x 256, z_dim 256): 32 x 32 x 96 (3 convolutions) -> 64 x 64 x 64 (2) -> 128 x 128 x 32
(2) -> 256 x 256 x 12 (1) -> RGB; 2.7 GFLOP a frame against the SPADE generator's 116 (it was the default before).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segsynth.core.errors import ModelError

DONTCARE = 255  # the contract's "unknown" id; the student gives it a class of its own


@dataclass(frozen=True)
class StudentOptions:
    label_nc: int = 150  # classes of the label set (ADE20K); one more for unknown
    z_dim: int = 256
    size: int = 256  # output H = W
    widths: tuple[int, ...] = (96, 64, 32, 12)  # channels at 1/8, 1/4, 1/2 and full size
    convs: tuple[int, ...] = (3, 2, 2, 1)  # 3 x 3 convolutions at each
    style_dim: int = 128

    @classmethod
    def load(cls, path: Path) -> "StudentOptions":
        data = json.loads(Path(path).read_text())
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


class ClassAffine(nn.Module):
    """Per-class scale and shift, looked up per pixel from the label map (CLADE)."""

    def __init__(self, classes: int, channels: int) -> None:
        super().__init__()
        self.scale = nn.Embedding(classes, channels)
        self.shift = nn.Embedding(classes, channels)
        nn.init.zeros_(self.scale.weight)
        nn.init.normal_(self.shift.weight, std=0.02)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        scale = self.scale(ids).permute(0, 3, 1, 2)
        shift = self.shift(ids).permute(0, 3, 1, 2)
        return x * (1 + scale) + shift


class StyleAffine(nn.Module):
    """Per-channel scale and shift from the style vector (AdaIN's affine, without its statistics)."""

    def __init__(self, style_dim: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(style_dim, 2 * channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(style)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + scale) + shift


class Layer(nn.Module):
    """A 3 x 3 convolution, then the class and style modulations and a leaky ReLU."""

    def __init__(self, cin: int, cout: int, classes: int, style_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.classes = ClassAffine(classes, cout)
        self.style = StyleAffine(style_dim, cout)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.style(self.classes(self.conv(x), ids), style), 0.2)


class StudentGenerator(nn.Module):
    def __init__(self, opt: StudentOptions = StudentOptions()) -> None:
        super().__init__()
        self.opt = opt
        classes = opt.label_nc + 1
        self.embed = nn.Embedding(classes, opt.widths[0])
        self.style = nn.Sequential(nn.Linear(opt.z_dim, opt.style_dim), nn.LeakyReLU(0.2),
                                   nn.Linear(opt.style_dim, opt.style_dim), nn.LeakyReLU(0.2))
        self.levels = nn.ModuleList()
        cin = opt.widths[0]
        for width, count in zip(opt.widths, opt.convs):
            self.levels.append(nn.ModuleList([Layer(cin if i == 0 else width, width, classes, opt.style_dim)
                                              for i in range(count)]))
            cin = width
        self.to_rgb = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, label: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``label``: N x 1 x H x W int64 ids (DONTCARE = unknown); ``z``: N x z_dim."""
        ids = label[:, 0]  # DONTCARE, and any other id past the label set: the "unknown" class
        ids = torch.where(ids > self.opt.label_nc - 1, torch.full_like(ids, self.opt.label_nc), ids)
        style = self.style(z)
        steps = len(self.levels)
        x = None
        for level, layers in enumerate(self.levels):
            stride = 2 ** (steps - 1 - level)
            at = ids[:, stride // 2::stride, stride // 2::stride] if stride > 1 else ids  # nearest, centred
            x = self.embed(at).permute(0, 3, 1, 2) if x is None else F.interpolate(x, scale_factor=2.0,
                                                                                     mode="nearest")
            for layer in layers:
                x = layer(x, at, style)
        return torch.tanh(self.to_rgb(x))


def flops(opt: StudentOptions = StudentOptions()) -> float:
    """Multiply-adds x 2 of one frame through the convolutions and linear layers."""
    total, cin = 0.0, opt.widths[0]
    steps = len(opt.widths)
    for level, (width, count) in enumerate(zip(opt.widths, opt.convs)):
        side = opt.size // 2 ** (steps - 1 - level)
        for i in range(count):
            total += 2 * 9 * (cin if i == 0 else width) * width * side * side
        cin = width
    total += 2 * 9 * cin * 3 * opt.size * opt.size
    return total + 2 * (opt.z_dim * opt.style_dim + opt.style_dim ** 2)


def receptive_radius(net: StudentGenerator) -> int:
    """How far, in pixels, a change of one pixel's label reaches in the picture, measured: the
    label of each pixel of an 8 x 8 block at the centre (every alignment with the coarser
    levels' sampling grids) is changed in turn, and the farthest output pixel that moves is
    found (Chebyshev distance)."""
    size, z = net.opt.size, torch.zeros(1, net.opt.z_dim)
    base = torch.zeros(1, 1, size, size, dtype=torch.long)
    reach = 0
    with torch.no_grad():
        before = net(base, z)
        for dy in range(8):
            for dx in range(8):
                y, x = size // 2 - 4 + dy, size // 2 - 4 + dx
                moved = base.clone()
                moved[0, 0, y, x] = 1
                changed = (net(moved, z) - before).abs().amax(1)[0] > 0
                ys, xs = changed.nonzero(as_tuple=True)
                if len(ys):
                    reach = max(reach, int((ys - y).abs().max()), int((xs - x).abs().max()))
    return reach


def load_student(directory: str | Path) -> StudentGenerator:
    """A student checkpoint directory: ``student.json`` (its options) and ``student_G.pth``."""
    directory = Path(directory)
    try:
        net = StudentGenerator(StudentOptions.load(directory / "student.json"))
        net.load_state_dict(torch.load(directory / "student_G.pth", map_location="cpu", weights_only=True))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"{directory}: not a student generator checkpoint ({exc})") from exc
    return net.eval()
