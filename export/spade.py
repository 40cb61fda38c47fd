"""SPADE (GauGAN) generator and VAE style encoder, as NVlabs/SPADE defines them.

Module and parameter names follow the official code exactly, so the official checkpoint
files (``latest_net_G.pth``, ``latest_net_E.pth``) load with strict key matching:
spectral norm is ``torch.nn.utils.spectral_norm`` (``weight_orig``/``weight_u``/
``weight_v``), the parameter-free norms are BatchNorm (``running_mean``/``running_var``,
the official SyncBatchNorm has the same keys) or InstanceNorm (no state).

Inference follows the official test-time semantics: modules in eval mode, BatchNorm uses
the stored running statistics, spectral norm divides by ``u . (W v)`` with the stored
u/v and no power iteration, labels become one-hot maps with 255 -> the dontcare channel,
and the instance map becomes an edge map.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import remove_spectral_norm, spectral_norm
from torch.nn.utils.spectral_norm import SpectralNorm

from segsynth.core.errors import ModelError
from segsynth.export.checkpoint import load_strict, read_state_dict

NUM_UP_LAYERS = {"normal": 5, "more": 6, "most": 7}


@dataclass
class SpadeOptions:
    """The options of the official code that shape the networks (names as in opt.txt)."""

    label_nc: int = 182
    contain_dontcare_label: bool = False
    no_instance: bool = False
    ngf: int = 64
    norm_G: str = "spectralspadesyncbatch3x3"
    norm_E: str = "spectralinstance"
    num_upsampling_layers: str = "normal"
    crop_size: int = 512
    aspect_ratio: float = 1.0
    use_vae: bool = False
    z_dim: int = 256
    netG: str = "spade"

    def __post_init__(self) -> None:
        if self.netG != "spade":
            raise ModelError(f"netG={self.netG!r} is not supported (only the SPADE generator, netG=spade)")
        if self.num_upsampling_layers not in NUM_UP_LAYERS:
            raise ModelError(f"num_upsampling_layers={self.num_upsampling_layers!r}: "
                             f"choose one of {', '.join(NUM_UP_LAYERS)}")
        if not re.fullmatch(r"(spectral)?spade(syncbatch|batch|instance)\dx\d", self.norm_G):
            raise ModelError(f"norm_G={self.norm_G!r} is not a SPADE norm "
                             "([spectral]spade{syncbatch,batch,instance}KxK)")
        if not re.fullmatch(r"(spectral)?(sync_batch|batch|instance|none|)", self.norm_E):
            raise ModelError(f"norm_E={self.norm_E!r}: expected [spectral]{{instance,batch,sync_batch,none}}")
        for name in ("label_nc", "ngf", "crop_size", "z_dim"):
            if getattr(self, name) < 1:
                raise ModelError(f"{name} must be positive, got {getattr(self, name)}")
        if self.aspect_ratio <= 0:
            raise ModelError(f"aspect_ratio must be positive, got {self.aspect_ratio}")

    @property
    def semantic_nc(self) -> int:
        return self.label_nc + int(self.contain_dontcare_label) + int(not self.no_instance)

    @property
    def latent_size(self) -> tuple[int, int]:
        """(sh, sw): the generator's first feature map, as compute_latent_vector_size does."""
        sw = self.crop_size // (2 ** NUM_UP_LAYERS[self.num_upsampling_layers])
        return round(sw / self.aspect_ratio), sw

    @property
    def output_size(self) -> tuple[int, int]:
        sh, sw = self.latent_size
        scale = 2 ** NUM_UP_LAYERS[self.num_upsampling_layers]
        return sh * scale, sw * scale

    @classmethod
    def from_opt_txt(cls, path: str | Path, overrides: dict | None = None) -> "SpadeOptions":
        """Parse the official ``opt.txt`` (``key: value  [default: x]`` per line); options that do
        not shape the networks are ignored. ``overrides`` win over the file."""
        kinds = {f.name: f.type for f in fields(cls)}
        texts = read_opt_txt(path)
        for key, value in (overrides or {}).items():
            if key not in kinds:
                raise ModelError(f"unknown SPADE option {key!r}; known: {', '.join(sorted(kinds))}")
            texts[key] = str(value)
        return cls(**{k: _parse_value(k, v, kinds[k]) for k, v in texts.items() if k in kinds})


def read_opt_txt(path: str | Path) -> dict[str, str]:
    """Every option of an official ``opt.txt`` as text, ``[default: x]`` notes dropped."""
    texts: dict[str, str] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        if ":" not in line or line.strip().startswith("-"):
            continue
        key, _, rest = line.partition(":")
        texts[key.strip()] = rest.split("\t[default:")[0].strip()
    return texts


def _parse_value(key: str, text: str, kind: str):
    try:
        if kind == "bool":
            if text not in ("True", "False"):
                raise ValueError(text)
            return text == "True"
        return {"int": int, "float": float}.get(kind, str)(text)
    except ValueError:
        raise ModelError(f"opt.txt: {key}={text!r} is not a valid {kind}") from None


def _maybe_spectral(module: nn.Module, norm: str) -> nn.Module:
    return spectral_norm(module) if "spectral" in norm else module


@dataclass
class LabelMap:
    """The semantic map as class ids instead of one-hot channels (a training-speed path).

    ``ids`` N x H x W int64 in [0, nc) (any other value is an all-zero pixel), ``dense`` the
    extra non-one-hot channels (the edge map) or None. Convolving a one-hot map is the same
    as summing, per kernel tap, the weight column of the class under the tap, which turns
    SPADE's dominant cost (a 3x3 conv from ~150 one-hot channels) into 9 table lookups; the
    results equal the one-hot path (tests/test_export_spade.py checks it)."""

    ids: torch.Tensor
    nc: int
    dense: torch.Tensor | None = None

    def resized(self, size) -> "LabelMap":
        """Nearest-neighbour resize with F.interpolate(mode='nearest')'s index rule."""
        h, w = self.ids.shape[-2:]
        if (h, w) == tuple(size):
            return self
        ys = torch.clamp((torch.arange(size[0], device=self.ids.device) * (h / size[0])).floor().long(), max=h - 1)
        xs = torch.clamp((torch.arange(size[1], device=self.ids.device) * (w / size[1])).floor().long(), max=w - 1)
        dense = F.interpolate(self.dense, size=size, mode="nearest") if self.dense is not None else None
        return LabelMap(self.ids[:, ys][:, :, xs], self.nc, dense)

    def conv(self, conv: nn.Conv2d) -> torch.Tensor:
        """``conv(one_hot [+ dense])`` computed from the ids (zero padding, stride 1)."""
        k = conv.kernel_size[0]
        p = k // 2
        weight = conv.weight
        ids = torch.where((self.ids >= 0) & (self.ids < self.nc), self.ids, torch.full_like(self.ids, self.nc))
        ids = F.pad(ids, (p, p, p, p), value=self.nc)
        table = torch.cat([weight[:, : self.nc].permute(2, 3, 1, 0),
                           weight.new_zeros(k, k, 1, weight.shape[0])], 2)  # k x k x (nc + 1) x out
        h, w = self.ids.shape[-2:]
        out = sum(F.embedding(ids[:, dy:dy + h, dx:dx + w], table[dy, dx]) for dy in range(k) for dx in range(k))
        out = out.permute(0, 3, 1, 2)
        if conv.bias is not None:
            out = out + conv.bias.view(1, -1, 1, 1)
        if self.dense is not None:
            out = out + F.conv2d(self.dense, weight[:, self.nc:], padding=p)
        return out


class SPADE(nn.Module):
    """Parameter-free normalisation, then scale and bias predicted from the segmentation map."""

    def __init__(self, config: str, norm_nc: int, label_nc: int) -> None:
        super().__init__()
        parsed = re.fullmatch(r"spade(\D+)(\d)x\d", config)
        kind, ks = parsed.group(1), int(parsed.group(2))
        if kind == "instance":
            self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        else:  # syncbatch (the official SynchronizedBatchNorm2d has BatchNorm's keys) or batch
            self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False)
        nhidden, pw = 128, ks // 2
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, ks, padding=pw), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(nhidden, norm_nc, ks, padding=pw)
        self.mlp_beta = nn.Conv2d(nhidden, norm_nc, ks, padding=pw)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor | LabelMap) -> torch.Tensor:
        normalized = self.param_free_norm(x)
        if isinstance(segmap, LabelMap):
            actv = F.relu(segmap.resized(x.shape[2:]).conv(self.mlp_shared[0]))
        else:
            actv = self.mlp_shared(F.interpolate(segmap, size=x.shape[2:], mode="nearest"))
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    def __init__(self, fin: int, fout: int, opt: SpadeOptions) -> None:
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = _maybe_spectral(nn.Conv2d(fin, fmiddle, 3, padding=1), opt.norm_G)
        self.conv_1 = _maybe_spectral(nn.Conv2d(fmiddle, fout, 3, padding=1), opt.norm_G)
        if self.learned_shortcut:
            self.conv_s = _maybe_spectral(nn.Conv2d(fin, fout, 1, bias=False), opt.norm_G)
        config = opt.norm_G.replace("spectral", "")
        self.norm_0 = SPADE(config, fin, opt.semantic_nc)
        self.norm_1 = SPADE(config, fmiddle, opt.semantic_nc)
        if self.learned_shortcut:
            self.norm_s = SPADE(config, fin, opt.semantic_nc)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return x_s + dx


class SPADEGenerator(nn.Module):
    """Takes the semantic map (one-hot labels [+ dontcare] [+ edges]) and optionally z."""

    def __init__(self, opt: SpadeOptions) -> None:
        super().__init__()
        self.opt = opt
        nf = opt.ngf
        self.sh, self.sw = opt.latent_size
        if self.sh < 1 or self.sw < 1:
            raise ModelError(f"crop_size {opt.crop_size} is too small for num_upsampling_layers="
                             f"{opt.num_upsampling_layers} (needs at least {2 ** NUM_UP_LAYERS[opt.num_upsampling_layers]})")
        if opt.use_vae:
            self.fc = nn.Linear(opt.z_dim, 16 * nf * self.sw * self.sh)
        else:
            self.fc = nn.Conv2d(opt.semantic_nc, 16 * nf, 3, padding=1)
        self.head_0 = SPADEResnetBlock(16 * nf, 16 * nf, opt)
        self.G_middle_0 = SPADEResnetBlock(16 * nf, 16 * nf, opt)
        self.G_middle_1 = SPADEResnetBlock(16 * nf, 16 * nf, opt)
        self.up_0 = SPADEResnetBlock(16 * nf, 8 * nf, opt)
        self.up_1 = SPADEResnetBlock(8 * nf, 4 * nf, opt)
        self.up_2 = SPADEResnetBlock(4 * nf, 2 * nf, opt)
        self.up_3 = SPADEResnetBlock(2 * nf, 1 * nf, opt)
        final_nc = nf
        if opt.num_upsampling_layers == "most":
            self.up_4 = SPADEResnetBlock(1 * nf, nf // 2, opt)
            final_nc = nf // 2
        self.conv_img = nn.Conv2d(final_nc, 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, seg: torch.Tensor | LabelMap, z: torch.Tensor | None = None) -> torch.Tensor:
        if self.opt.use_vae:
            if z is None:
                n, device = (seg.ids if isinstance(seg, LabelMap) else seg).shape[0], self.fc.weight.device
                z = torch.randn(n, self.opt.z_dim, dtype=torch.float32, device=device)
            x = self.fc(z).view(-1, 16 * self.opt.ngf, self.sh, self.sw)
        elif isinstance(seg, LabelMap):
            x = seg.resized((self.sh, self.sw)).conv(self.fc)
        else:
            x = self.fc(F.interpolate(seg, size=(self.sh, self.sw)))
        x = self.head_0(x, seg)
        x = self.up(x)
        x = self.G_middle_0(x, seg)
        if self.opt.num_upsampling_layers in ("more", "most"):
            x = self.up(x)
        x = self.G_middle_1(x, seg)
        for block in (self.up_0, self.up_1, self.up_2, self.up_3):
            x = block(self.up(x), seg)
        if self.opt.num_upsampling_layers == "most":
            x = self.up_4(self.up(x), seg)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))


def _nonspade_norm(norm: str, conv: nn.Conv2d) -> nn.Module:
    """The official get_nonspade_norm_layer: [spectral] conv, then an optional norm (conv bias dropped)."""
    sub = norm[len("spectral"):] if norm.startswith("spectral") else norm
    layer = spectral_norm(conv) if norm.startswith("spectral") else conv
    if sub in ("none", ""):
        return layer
    del layer.bias
    layer.register_parameter("bias", None)
    channels = conv.out_channels
    norm_layer = {"batch": lambda: nn.BatchNorm2d(channels, affine=True),
                  "sync_batch": lambda: nn.BatchNorm2d(channels, affine=True),
                  "instance": lambda: nn.InstanceNorm2d(channels, affine=False)}[sub]()
    return nn.Sequential(layer, norm_layer)


class ConvEncoder(nn.Module):
    """The VAE style encoder (``netE``): image in [-1, 1] -> (mu, logvar), 256-dimensional."""

    def __init__(self, opt: SpadeOptions) -> None:
        super().__init__()
        # Any crop_size: like the official encoder, it resizes every style image to 256 x 256.
        kw, pw, ndf = 3, 1, opt.ngf
        norm = opt.norm_E
        self.layer1 = _nonspade_norm(norm, nn.Conv2d(3, ndf, kw, stride=2, padding=pw))
        self.layer2 = _nonspade_norm(norm, nn.Conv2d(ndf, ndf * 2, kw, stride=2, padding=pw))
        self.layer3 = _nonspade_norm(norm, nn.Conv2d(ndf * 2, ndf * 4, kw, stride=2, padding=pw))
        self.layer4 = _nonspade_norm(norm, nn.Conv2d(ndf * 4, ndf * 8, kw, stride=2, padding=pw))
        self.layer5 = _nonspade_norm(norm, nn.Conv2d(ndf * 8, ndf * 8, kw, stride=2, padding=pw))
        self.layer6 = _nonspade_norm(norm, nn.Conv2d(ndf * 8, ndf * 8, kw, stride=2, padding=pw))
        self.so = 4
        self.fc_mu = nn.Linear(ndf * 8 * 4 * 4, 256)
        self.fc_var = nn.Linear(ndf * 8 * 4 * 4, 256)
        self.actvn = nn.LeakyReLU(0.2, False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[2] != 256 or x.shape[3] != 256:
            x = F.interpolate(x, size=(256, 256), mode="bilinear")
        x = self.layer1(x)
        for layer in (self.layer2, self.layer3, self.layer4, self.layer5, self.layer6):
            x = layer(self.actvn(x))
        x = self.actvn(x).reshape(x.shape[0], -1)
        return self.fc_mu(x), self.fc_var(x)


class SemanticInput(nn.Module):
    """The official preprocessing: ids (N x 1 x H x W, 255 = dontcare) -> one-hot channels,
    plus the instance edge map when the generator uses instances."""

    def __init__(self, opt: SpadeOptions) -> None:
        super().__init__()
        self.label_nc, self.dontcare, self.with_edges = opt.label_nc, opt.contain_dontcare_label, not opt.no_instance
        nc = opt.label_nc + int(opt.contain_dontcare_label)
        self.register_buffer("classes", torch.arange(nc).view(1, nc, 1, 1), persistent=False)

    def forward(self, label: torch.Tensor, instance: torch.Tensor | None = None) -> torch.Tensor:
        label = label.long()
        if self.dontcare:  # the official datasets turn 255 into label_nc, the dontcare channel
            label = torch.where(label == 255, torch.full_like(label, self.label_nc), label)
        semantics = (label == self.classes).float()  # ids outside the set give an all-zero pixel
        if self.with_edges:
            semantics = torch.cat([semantics, edges(label if instance is None else instance)], 1)
        return semantics

    def label_map(self, label: torch.Tensor, instance: torch.Tensor | None = None) -> LabelMap:
        """The same semantics as ``forward``, as a LabelMap (ids instead of one-hot channels)."""
        label = label.long()
        if self.dontcare:
            label = torch.where(label == 255, torch.full_like(label, self.label_nc), label)
        dense = edges(label if instance is None else instance) if self.with_edges else None
        return LabelMap(label[:, 0], self.classes.shape[1], dense)


def edges(t: torch.Tensor) -> torch.Tensor:
    """Official get_edges: 1 where a pixel differs from a 4-neighbour, for N x 1 x H x W maps."""
    dx = (t[:, :, :, 1:] != t[:, :, :, :-1]).float()
    dy = (t[:, :, 1:, :] != t[:, :, :-1, :]).float()
    horizontal = torch.maximum(F.pad(dx, (1, 0)), F.pad(dx, (0, 1)))
    vertical = torch.maximum(F.pad(dy, (0, 0, 1, 0)), F.pad(dy, (0, 0, 0, 1)))
    return torch.maximum(horizontal, vertical)


@dataclass
class LoadedSpade:
    opt: SpadeOptions
    generator: SPADEGenerator  # eval mode, spectral norm hooks still in place (as loaded)
    encoder: ConvEncoder | None


def read_options(directory: str | Path, overrides: dict | None = None) -> SpadeOptions:
    """The options of an official-layout checkpoint directory (its ``opt.txt``), with overrides."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"{directory}: not a checkpoint directory")
    opt_file = directory / "opt.txt"
    if not opt_file.is_file():
        raise ModelError(f"{directory}: no opt.txt (an official SPADE checkpoint directory holds opt.txt "
                         "and latest_net_G.pth)")
    return SpadeOptions.from_opt_txt(opt_file, overrides)


def load_spade(directory: str | Path, opt: SpadeOptions | None = None, epoch: str = "latest") -> LoadedSpade:
    """Load an official-layout checkpoint directory: ``opt.txt``, ``{epoch}_net_G.pth`` and,
    for VAE models, ``{epoch}_net_E.pth`` (optional: without it styles cannot be encoded)."""

    directory = Path(directory)
    opt = opt or read_options(directory)
    hint = (f" from opt.txt (label_nc={opt.label_nc}, contain_dontcare_label={opt.contain_dontcare_label}, "
            f"no_instance={opt.no_instance}, ngf={opt.ngf}, use_vae={opt.use_vae}, crop_size={opt.crop_size}, "
            f"aspect_ratio={opt.aspect_ratio}, num_upsampling_layers={opt.num_upsampling_layers})")
    g_path = directory / f"{epoch}_net_G.pth"
    generator = SPADEGenerator(opt)
    load_strict(generator, read_state_dict(g_path), str(g_path), hint)
    encoder = None
    e_path = directory / f"{epoch}_net_E.pth"
    if opt.use_vae and e_path.is_file():
        encoder = ConvEncoder(opt)
        load_strict(encoder, read_state_dict(e_path), str(e_path), hint)
    return LoadedSpade(opt, generator.eval(), encoder.eval() if encoder is not None else None)


def frozen(module: nn.Module) -> nn.Module:
    """An inference copy: eval mode, spectral norm folded into plain weights using the stored
    u/v without a power-iteration step (exactly what the eval-mode hook computes)."""

    module = copy.deepcopy(module).eval()
    for sub in module.modules():
        if any(isinstance(h, SpectralNorm) for h in sub._forward_pre_hooks.values()):
            remove_spectral_norm(sub)
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def write_opt_txt(opt: SpadeOptions, path: str | Path, extra: dict | None = None) -> None:
    """Write ``opt.txt`` in the official format (``{key:>25}: {value:<30}`` per line, sorted)."""
    values = {f.name: getattr(opt, f.name) for f in fields(opt)}
    values.update(extra or {})
    lines = ["----------------- Options ---------------"]
    lines += ["{:>25}: {:<30}".format(str(k), str(v)) for k, v in sorted(values.items())]
    lines.append("----------------- End -------------------")
    Path(path).write_text("\n".join(lines) + "\n")
