"""DeepLab segmenters in PyTorch, loading their published checkpoint formats unchanged.

* DeepLab v2 ResNet-101 with the MSC (multi-scale input) wrapper, in the format of the
  widely used PyTorch re-implementation kazuto1011/deeplab-pytorch (COCO-Stuff-164k: 182
  classes; keys ``base.layer1.conv1.conv.weight`` ...). Caffe preprocessing: BGR, mean
  (104.008, 116.669, 122.675) subtracted, no scaling.
* torchvision DeepLabV3 state dicts (ResNet-50/101 and MobileNetV3-Large backbones; keys
  ``backbone.*``, ``classifier.*``, ``aux_classifier.*``), rebuilt here because torchvision
  is not available for this torch build. ImageNet preprocessing: RGB / 255, mean
  (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).

Every model's ``forward`` returns logits upsampled (bilinear) to the input size, as both
projects do before their argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segsynth.core.errors import ModelError
from segsynth.export.checkpoint import load_strict


@dataclass(frozen=True)
class Preprocess:
    """How a checkpoint expects its input: channel order, then (pixel - mean) / std per channel."""

    order: str  # "rgb" or "bgr"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CAFFE = Preprocess("bgr", (104.008, 116.669, 122.675), (1.0, 1.0, 1.0))
IMAGENET = Preprocess("rgb", (0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255))


def _up(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


# ---- kazuto1011/deeplab-pytorch: DeepLab v2 ----------------------------------------------

class _ConvBnReLU(nn.Sequential):
    def __init__(self, cin, cout, k, stride, padding, dilation, relu=True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout, eps=1e-5))
        if relu:
            self.add_module("relu", nn.ReLU())


class _CaffeBottleneck(nn.Module):
    def __init__(self, cin, cout, stride, dilation, downsample):
        super().__init__()
        mid = cout // 4
        self.reduce = _ConvBnReLU(cin, mid, 1, stride, 0, 1)
        self.conv3x3 = _ConvBnReLU(mid, mid, 3, 1, dilation, dilation)
        self.increase = _ConvBnReLU(mid, cout, 1, 1, 0, 1, relu=False)
        self.shortcut = _ConvBnReLU(cin, cout, 1, stride, 0, 1, relu=False) if downsample else nn.Identity()

    def forward(self, x):
        return F.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


class _ResLayer(nn.Sequential):
    def __init__(self, n, cin, cout, stride, dilation):
        super().__init__()
        for i in range(n):
            self.add_module(f"block{i + 1}", _CaffeBottleneck(cin if i == 0 else cout, cout,
                                                              stride if i == 0 else 1, dilation, i == 0))


class _Stem(nn.Sequential):
    def __init__(self, cout):
        super().__init__()
        self.add_module("conv1", _ConvBnReLU(3, cout, 7, 2, 3, 1))
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class _ASPPv2(nn.Module):
    def __init__(self, cin, cout, rates):
        super().__init__()
        for i, rate in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(cin, cout, 3, 1, padding=rate, dilation=rate, bias=True))

    def forward(self, x):
        return sum(stage(x) for stage in self.children())


class DeepLabV2(nn.Sequential):
    """Dilated ResNet + ASPP, output stride 8 (logits at 1/8 of the input)."""

    def __init__(self, n_classes, n_blocks=(3, 4, 23, 3), atrous_rates=(6, 12, 18, 24)):
        super().__init__()
        ch = [64 * 2 ** p for p in range(6)]
        self.add_module("layer1", _Stem(ch[0]))
        self.add_module("layer2", _ResLayer(n_blocks[0], ch[0], ch[2], 1, 1))
        self.add_module("layer3", _ResLayer(n_blocks[1], ch[2], ch[3], 2, 1))
        self.add_module("layer4", _ResLayer(n_blocks[2], ch[3], ch[4], 1, 2))
        self.add_module("layer5", _ResLayer(n_blocks[3], ch[4], ch[5], 1, 4))
        self.add_module("aspp", _ASPPv2(ch[5], n_classes, atrous_rates))


class MSC(nn.Module):
    """Multi-scale inputs: the pixel-wise max of the logits at scales 1, 0.5 and 0.75."""

    def __init__(self, base: nn.Module, scales=(0.5, 0.75)):
        super().__init__()
        self.base, self.scales = base, tuple(scales)

    def forward(self, x):
        logits = self.base(x)
        size = logits.shape[2:]
        pyramid = [self.base(F.interpolate(x, scale_factor=p, mode="bilinear", align_corners=False))
                   for p in self.scales]
        return torch.stack([logits] + [_up(p, size) for p in pyramid]).max(dim=0)[0]


class KazutoDeepLab(nn.Module):
    """MSC(DeepLabV2) or a bare DeepLabV2, returning logits at the input size."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return _up(self.net(x), x.shape[2:])


# ---- torchvision DeepLabV3 ----------------------------------------------------------------

class _TVBottleneck(nn.Module):
    def __init__(self, cin, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class TVResNetBackbone(nn.Module):
    """torchvision ResNet-50/101 with replace_stride_with_dilation=[False, True, True], up to layer4."""

    def __init__(self, layers):
        super().__init__()
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2, dilate=True)
        self.layer4 = self._make_layer(512, layers[3], stride=2, dilate=True)

    def _make_layer(self, planes, blocks, stride=1, dilate=False):
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [_TVBottleneck(self.inplanes, planes, stride, downsample, previous)]
        self.inplanes = planes * 4
        layers += [_TVBottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _cna(cin, cout, k, stride=1, groups=1, act=nn.ReLU, dilation=1, eps=1e-5):
    """torchvision Conv2dNormActivation: conv (no bias) -> BN -> activation."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 * dilation, dilation, groups, bias=False),
              nn.BatchNorm2d(cout, eps=eps)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def _divisible(v, divisor=8):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class _SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        scale = F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))
        return F.hardsigmoid(self.fc2(scale)) * x


class _InvertedResidual(nn.Module):
    def __init__(self, cin, k, expanded, cout, use_se, act, stride, dilation):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expanded != cin:
            layers.append(_cna(cin, expanded, 1, act=act, eps=1e-3))
        layers.append(_cna(expanded, expanded, k, 1 if dilation > 1 else stride, expanded, act, dilation, 1e-3))
        if use_se:
            layers.append(_SqueezeExcitation(expanded, _divisible(expanded // 4)))
        layers.append(_cna(expanded, cout, 1, act=None, eps=1e-3))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res_connect else out


# MobileNetV3-Large (input, kernel, expanded, out, SE, hard-swish, stride, dilation), dilated=True
_MNV3_LARGE = [
    (16, 3, 16, 16, False, False, 1, 1), (16, 3, 64, 24, False, False, 2, 1), (24, 3, 72, 24, False, False, 1, 1),
    (24, 5, 72, 40, True, False, 2, 1), (40, 5, 120, 40, True, False, 1, 1), (40, 5, 120, 40, True, False, 1, 1),
    (40, 3, 240, 80, False, True, 2, 1), (80, 3, 200, 80, False, True, 1, 1), (80, 3, 184, 80, False, True, 1, 1),
    (80, 3, 184, 80, False, True, 1, 1), (80, 3, 480, 112, True, True, 1, 1), (112, 3, 672, 112, True, True, 1, 1),
    (112, 5, 672, 160, True, True, 2, 2), (160, 5, 960, 160, True, True, 1, 2), (160, 5, 960, 160, True, True, 1, 2),
]


def mobilenet_v3_large_features() -> nn.Sequential:
    layers = [_cna(3, 16, 3, 2, act=nn.Hardswish, eps=1e-3)]
    for cin, k, exp, cout, se, hs, stride, dil in _MNV3_LARGE:
        layers.append(_InvertedResidual(cin, k, exp, cout, se, nn.Hardswish if hs else nn.ReLU, stride, dil))
    layers.append(_cna(160, 960, 1, act=nn.Hardswish, eps=1e-3))
    return nn.Sequential(*layers)


class _ASPPPooling(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x):
        return _up(super().forward(x), x.shape[-2:])


class _ASPP(nn.Module):
    def __init__(self, cin, rates=(12, 24, 36), cout=256):
        super().__init__()
        convs = [nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())]
        convs += [nn.Sequential(nn.Conv2d(cin, cout, 3, padding=r, dilation=r, bias=False), nn.BatchNorm2d(cout),
                                nn.ReLU()) for r in rates]
        convs.append(_ASPPPooling(cin, cout))
        self.convs = nn.ModuleList(convs)
        self.project = nn.Sequential(nn.Conv2d(len(convs) * cout, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x):
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


def deeplab_head(cin, n_classes):
    return nn.Sequential(_ASPP(cin), nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
                         nn.Conv2d(256, n_classes, 1))


def fcn_head(cin, n_classes):
    mid = cin // 4
    return nn.Sequential(nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                         nn.Dropout(0.1), nn.Conv2d(mid, n_classes, 1))


class TVDeepLabV3(nn.Module):
    """torchvision's DeepLabV3 (backbone + DeepLabHead [+ FCN aux head, training only])."""

    def __init__(self, backbone: str, n_classes: int, aux: bool):
        super().__init__()
        if backbone == "mobilenet_v3_large":
            self.backbone, cout, aux_in = mobilenet_v3_large_features(), 960, 40
        else:
            self.backbone = TVResNetBackbone([3, 4, 6, 3] if backbone == "resnet50" else [3, 4, 23, 3])
            cout, aux_in = 2048, 1024
        self.classifier = deeplab_head(cout, n_classes)
        self.aux_classifier = fcn_head(aux_in, n_classes) if aux else None

    def forward(self, x):
        return _up(self.classifier(self.backbone(x)), x.shape[-2:])


# ---- loading ------------------------------------------------------------------------------

@dataclass
class LoadedDeepLab:
    model: nn.Module  # eval mode; image (preprocessed) -> logits at the input size
    family: str  # "deeplabv2-msc", "deeplabv2", "tv-resnet50", "tv-resnet101", "tv-mobilenet_v3_large"
    n_classes: int
    preprocess: Preprocess


def build_deeplab(state: dict, source: str = "checkpoint") -> LoadedDeepLab:
    """Recognise the checkpoint format from its keys, build the matching network, load strictly."""

    keys = set(state)
    if "base.layer1.conv1.conv.weight" in keys or "layer1.conv1.conv.weight" in keys:
        prefix = "base." if "base.layer1.conv1.conv.weight" in keys else ""
        n_classes = state[f"{prefix}aspp.c0.weight"].shape[0]
        depth = 1 + bool(prefix)  # position of "blockN" in "[base.]layerK.blockN.…"
        n_blocks = [len({k.split(".")[depth] for k in keys if k.startswith(f"{prefix}layer{i}.")}) for i in (2, 3, 4, 5)]
        n_branches = sum(f"{prefix}aspp.c{i}.weight" in keys for i in range(4))
        base = DeepLabV2(n_classes, n_blocks, [6, 12, 18, 24][:n_branches])
        net = MSC(base) if prefix else base
        load_strict(net, state, source)
        family = "deeplabv2-msc" if prefix else "deeplabv2"
        model, preprocess = KazutoDeepLab(net), CAFFE
    elif "backbone.conv1.weight" in keys or "backbone.0.0.weight" in keys:
        if "backbone.0.0.weight" in keys:
            backbone = "mobilenet_v3_large"
        else:
            backbone = "resnet101" if any(k.startswith("backbone.layer3.22.") for k in keys) else "resnet50"
        n_classes = state["classifier.4.weight"].shape[0] if "classifier.4.weight" in keys else 0
        model = TVDeepLabV3(backbone, n_classes, aux=any(k.startswith("aux_classifier.") for k in keys))
        load_strict(model, state, source)
        family, preprocess = f"tv-{backbone}", IMAGENET
    else:
        sample = ", ".join(sorted(keys)[:3])
        raise ModelError(f"{source} is not a DeepLab checkpoint of a known format "
                         f"(kazuto1011 DeepLab v2 or torchvision DeepLabV3); its keys start {sample}")
    return LoadedDeepLab(model.eval(), family, int(n_classes), preprocess)
