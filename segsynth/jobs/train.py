"""``segsynth train``: train the SPADE generator on image/label pairs (``segsynth dataset make``).

Losses as in SPADE's pix2pix model: hinge GAN loss against a multiscale PatchGAN
discriminator (the official MultiscaleDiscriminator/NLayerDiscriminator structure and key
names), discriminator feature matching (lambda_feat = 10), and a perceptual loss; no VGG
weights are available here, so it compares features of the bundled VOC MobileNetV2 backbone
(``perceptual.py``; ``lambda_perceptual``), plus a small L1 reconstruction term.
Adam with TTUR (G lr/2, D lr*2, betas 0/0.9). With ``vae`` the style encoder is trained
too (z = mu + eps sigma from the real frame, KL term weighted 0.05, as officially). Checkpoints use the official layout
(``latest_net_G.pth``, ``latest_net_D.pth``, ``opt.txt``), so ``segsynth export spade``
loads them like official ones; ``train_state.pth`` holds optimiser state for ``--resume``.

With ``ema`` (e.g. 0.999) the generator that is saved as ``latest_net_G.pth`` is an
exponential moving average of the trained weights (as in Karras et al.'s progressive GANs and
StyleGAN; it smooths out the step-to-step jitter of GAN training); the trained weights
themselves are kept in ``train_state.pth`` to resume from (``--resume --ema`` on a run trained
without it starts the average at the step it resumes from). Buffers (spectral norm's u/v,
BatchNorm statistics) are copied from the trained generator.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils import spectral_norm

from segsynth.core import labels as L
from segsynth.core.errors import InputError, ModelError
from segsynth.export.checkpoint import load_strict, read_state_dict
from segsynth.export.perceptual import PerceptualLoss
from segsynth.export.spade import (
    ConvEncoder,
    SemanticInput,
    SPADEGenerator,
    SpadeOptions,
    write_opt_txt,
)
from segsynth.jobs.dataset import load_manifest, read_pair
from segsynth.jobs.progress import Progress

log = logging.getLogger("segsynth")

CONFIGS = {
    # name: generator options, discriminator (ndf, n_layers_D, num_D), batch size.
    # tiny: for tests; small: the bundled CPU-trained default (instance norm suits small
    # batches); base: the official sizes, for a GPU.
    "tiny": (dict(ngf=4, norm_G="spectralspadeinstance3x3"), (8, 2, 2), 2),
    "small": (dict(ngf=8, norm_G="spectralspadeinstance3x3"), (32, 3, 2), 4),
    "base": (dict(ngf=64, norm_G="spectralspadesyncbatch3x3"), (64, 4, 2), 8),
}


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    out: Path
    config: str = "small"
    steps: int = 1000
    device: str = "cpu"
    resume: bool = False
    init_from: Path | None = None  # start G (and E) from this checkpoint directory (any size; see _init_from)
    batch: int | None = None  # default: the config's
    lr: float = 0.0002
    lambda_feat: float = 10.0
    lambda_l1: float = 1.0
    lambda_perceptual: float = 2.0  # 0: off
    vae: bool = False  # also train the style encoder (use_vae; KL term weight lambda_kld)
    lambda_kld: float = 0.05
    ema: float = 0.0  # decay of the generator's moving average (0: off; 0.999 typical)
    sample_every: int = 100
    save_every: int = 200
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.config not in CONFIGS:
            raise InputError(f"unknown --config {self.config!r}; choose one of: {', '.join(CONFIGS)}")
        if self.steps < 1:
            raise InputError("--steps must be at least 1")
        if self.device not in ("cpu", "cuda"):
            raise InputError("--device must be cpu or cuda")
        if not 0 <= self.ema < 1:
            raise InputError("--ema must be in [0, 1) (e.g. 0.999; 0 turns it off)")
        if min(self.lambda_perceptual, self.lambda_l1, self.lambda_kld) < 0:
            raise InputError("--lambda-perceptual, --lambda-l1 and --lambda-kld must not be negative")
        if self.resume and self.init_from is not None:
            raise InputError("--resume and --init-from exclude each other (resume continues the run in --out)")


class NLayerDiscriminator(nn.Module):
    """PatchGAN (official structure: model0..modelN, spectral norm + instance norm)."""

    def __init__(self, input_nc: int, ndf: int, n_layers: int) -> None:
        super().__init__()
        kw, padw = 4, 2
        sequence = [[nn.Conv2d(input_nc, ndf, kw, 2, padw), nn.LeakyReLU(0.2, False)]]
        nf = ndf
        for n in range(1, n_layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            stride = 1 if n == n_layers - 1 else 2
            conv = spectral_norm(nn.Conv2d(nf_prev, nf, kw, stride, padw, bias=False))
            sequence.append([conv, nn.InstanceNorm2d(nf, affine=False), nn.LeakyReLU(0.2, False)])
        sequence.append([nn.Conv2d(nf, 1, kw, 1, padw)])
        for i, layers in enumerate(sequence):
            self.add_module(f"model{i}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for sub in self.children():
            x = sub(x)
            features.append(x)
        return features  # intermediate features for feature matching; the last is the prediction


class MultiscaleDiscriminator(nn.Module):
    def __init__(self, input_nc: int, ndf: int, n_layers: int, num_d: int) -> None:
        super().__init__()
        for i in range(num_d):
            self.add_module(f"discriminator_{i}", NLayerDiscriminator(input_nc, ndf, n_layers))

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for d in self.children():
            out.append(d(x))
            x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        return out


class PairData:
    """The whole dataset in memory as uint8 arrays (it is small), sampled with random flips."""

    def __init__(self, directory: Path, label_nc: int, seed: int) -> None:
        manifest = load_manifest(directory)
        pairs = [read_pair(directory, item) for item in manifest["items"]]
        self.images = np.stack([p[0] for p in pairs])
        self.labels = np.stack([p[1] for p in pairs])
        self.label_set = manifest["label_set"]
        self.size = tuple(manifest["size"])  # (W, H)
        bad = (self.labels >= label_nc) & (self.labels != 255)
        if bad.any():
            raise InputError(f"{directory}: label ids above {label_nc - 1} found; is it an ADE20K dataset?")
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, n: int, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.rng.integers(0, len(self), n) if indices is None else np.asarray(indices)
        images, labels = self.images[idx], self.labels[idx]
        if indices is None:
            flip = self.rng.random(n) < 0.5
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
            labels = np.where(flip[:, None, None], labels[:, :, ::-1], labels)
        real = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return real, torch.from_numpy(np.ascontiguousarray(labels)).long()[:, None]


def _options(cfg: TrainConfig, size: tuple[int, int]) -> SpadeOptions:
    w, h = size
    if w % 32 or h % 32:
        raise InputError(f"dataset size {w}x{h}: SPADE needs multiples of 32; remake it with --size")
    g_opts = CONFIGS[cfg.config][0]
    return SpadeOptions(label_nc=150, contain_dontcare_label=True, no_instance=True, crop_size=w, aspect_ratio=w / h,
                        use_vae=cfg.vae, z_dim=256, **g_opts)


def _hinge(preds: list[list[torch.Tensor]], real: bool, for_d: bool) -> torch.Tensor:
    loss = 0.0
    for p in preds:
        x = p[-1]
        if for_d:
            loss = loss + (F.relu(1 - x).mean() if real else F.relu(1 + x).mean())
        else:
            loss = loss - x.mean()
    return loss / len(preds)


def _save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _sample_grid(g, semantic, data: PairData, path: Path, palette: np.ndarray) -> None:
    n = min(4, len(data))
    real, label = data.batch(n, indices=np.linspace(0, len(data) - 1, n).astype(int))
    device, was_training = next(g.parameters()).device, g.training
    g.eval()
    with torch.no_grad():
        z = torch.zeros(n, g.opt.z_dim, device=device) if g.opt.use_vae else None  # the mean style
        fake = g(semantic(label.to(device)), z).cpu()
    g.train(was_training)
    to_u8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
    rows = [np.concatenate([palette[label[i, 0].numpy()], to_u8(real)[i], to_u8(fake)[i]], 1) for i in range(n)]
    Image.fromarray(np.concatenate(rows, 0)).save(path)


class MovingAverage:
    """An exponential moving average of a module's parameters (buffers copied as they are)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.module, self.decay = copy.deepcopy(module).eval(), decay
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for mine, theirs in zip(self.module.parameters(), module.parameters()):
            mine.lerp_(theirs.detach(), 1 - self.decay)
        for mine, theirs in zip(self.module.buffers(), module.buffers()):
            mine.copy_(theirs)


def train(cfg: TrainConfig, *, quiet: bool = False) -> dict:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA GPU is visible to torch here")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    data = PairData(cfg.data, 150, cfg.seed)
    opt = _options(cfg, data.size)
    ndf, n_layers, num_d = CONFIGS[cfg.config][1]
    batch = cfg.batch or CONFIGS[cfg.config][2]
    out = Path(cfg.out)
    if cfg.resume and not (out / "train_state.pth").is_file():
        raise InputError(f"--resume: {out} has no train_state.pth to resume from")

    g = SPADEGenerator(opt).to(device).train()
    e = ConvEncoder(opt).to(device).train() if cfg.vae else None
    d = MultiscaleDiscriminator(opt.semantic_nc + 3, ndf, n_layers, num_d).to(device).train()
    semantic = SemanticInput(opt).to(device)
    g_params = list(g.parameters()) + (list(e.parameters()) if e is not None else [])
    opt_g = torch.optim.Adam(g_params, lr=cfg.lr / 2, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr * 2, betas=(0.0, 0.9))
    step, history = 0, []
    if cfg.resume:
        state_path = out / "train_state.pth"
        state = torch.load(state_path, map_location=device, weights_only=False)
        if not cfg.ema and "g_trained" in state:
            raise InputError(f"--resume: {out} was trained with --ema; resume it with --ema")
        if "g_trained" in state:
            load_strict(g, state["g_trained"], f"{state_path} (the trained generator)")
        else:
            load_strict(g, read_state_dict(out / "latest_net_G.pth"), str(out / "latest_net_G.pth"))
        if e is not None:
            load_strict(e, read_state_dict(out / "latest_net_E.pth"), str(out / "latest_net_E.pth"))
        load_strict(d, read_state_dict(out / "latest_net_D.pth"), str(out / "latest_net_D.pth"))
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        step, history = state["step"], state["history"]
        data.rng = np.random.default_rng(cfg.seed + step)
        log.info("resumed %s at step %d", out, step)
    elif cfg.init_from is not None:  # the generator (and encoder) start from a checkpoint, D afresh
        _init_from(g, e, Path(cfg.init_from), f"--config {cfg.config}")
    ema = MovingAverage(g, cfg.ema) if cfg.ema else None
    if ema is not None and cfg.resume:
        if "g_trained" in state:
            load_strict(ema.module, read_state_dict(out / "latest_net_G.pth"), str(out / "latest_net_G.pth"))
        else:  # a run trained without --ema: the average starts here, from the current weights
            log.info("--ema: the moving average starts at step %d", step)
    out.mkdir(parents=True, exist_ok=True)  # only once the networks and checkpoints are known to fit
    (out / "samples").mkdir(exist_ok=True)
    palette = L.get("ade20k").palette
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _NoAutocast()
    perceptual = None
    if cfg.lambda_perceptual:
        perceptual = PerceptualLoss().to(device)

    def save() -> None:
        _save((ema.module if ema is not None else g).state_dict(), out / "latest_net_G.pth")
        if e is not None:
            _save(e.state_dict(), out / "latest_net_E.pth")
        _save(d.state_dict(), out / "latest_net_D.pth")
        state = {"opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "step": step, "history": history}
        if ema is not None:
            state["g_trained"] = g.state_dict()
        _save(state, out / "train_state.pth")
        extra = {"name": out.name, "model": "pix2pix", "netD": "multiscale", "ndf": ndf, "n_layers_D": n_layers,
                 "num_D": num_d, "norm_D": "spectralinstance", "gan_mode": "hinge", "lambda_feat": cfg.lambda_feat,
                 "lambda_l1": cfg.lambda_l1, "no_vgg_loss": True, "lambda_perceptual": cfg.lambda_perceptual,
                 "perceptual_net": "deeplabv3_mnv2_voc backbone", "lr": cfg.lr, "beta1": 0.0, "beta2": 0.9,
                 "batchSize": batch, "dataset_mode": "segsynth", "dataroot": str(cfg.data), "isTrain": True,
                 "total_steps": step, "segsynth_config": cfg.config, "lambda_kld": cfg.lambda_kld,
                 "init_from": str(cfg.init_from or ""), "ema": cfg.ema}
        write_opt_txt(opt, out / "opt.txt", extra)

    start, window = time.monotonic(), []
    with Progress(f"train {cfg.config}", cfg.steps, unit="steps", enabled=not quiet, initial=step) as progress:
        while step < cfg.steps:
            real, label = data.batch(batch)
            real, label = real.to(device), label.to(device)
            seg = semantic(label)  # one-hot, for the discriminator
            with autocast:
                z, loss_kld = None, torch.zeros((), device=device)
                if e is not None:  # the official VAE path: z = mu + eps * sigma from the real image
                    mu, logvar = e(real)
                    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
                    loss_kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) * cfg.lambda_kld
                fake = g(semantic.label_map(label), z)  # same maths as g(seg, z), 1.6x faster on CPU
                pred = d(torch.cat([torch.cat([seg, fake.detach()], 1), torch.cat([seg, real], 1)], 0))
                d_fake = [[t[:batch] for t in p] for p in pred]
                d_real = [[t[batch:] for t in p] for p in pred]
                loss_d = _hinge(d_fake, False, True) + _hinge(d_real, True, True)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            with autocast:
                pred = d(torch.cat([torch.cat([seg, fake], 1), torch.cat([seg, real], 1)], 0))
                g_fake = [[t[:batch] for t in p] for p in pred]
                g_real = [[t[batch:].detach() for t in p] for p in pred]
                loss_gan = _hinge(g_fake, True, False)
                loss_fm = sum(F.l1_loss(f, r) for pf, pr in zip(g_fake, g_real) for f, r in zip(pf[:-1], pr[:-1]))
                loss_fm = loss_fm * cfg.lambda_feat / num_d
                loss_l1 = F.l1_loss(fake, real) * cfg.lambda_l1
                loss_perc = (perceptual(fake, real) * cfg.lambda_perceptual if perceptual is not None
                             else torch.zeros((), device=device))
                loss_g = loss_gan + loss_fm + loss_l1 + loss_perc + loss_kld
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            if ema is not None:
                ema.update(g)
            step += 1
            losses = {"step": step, **{k: float(v.detach()) for k, v in (
                ("D", loss_d), ("G_GAN", loss_gan), ("G_feat", loss_fm), ("G_L1", loss_l1), ("G_perc", loss_perc),
                ("KLD", loss_kld))}}
            if not all(math.isfinite(v) for v in losses.values()):
                raise ModelError(f"training diverged at step {step}: {losses}")
            history.append(losses)
            window.append(losses)
            progress.update()
            if step % max(1, min(cfg.sample_every, 50)) == 0 or step == cfg.steps:
                mean = {k: np.mean([w[k] for w in window]) for k in ("D", "G_GAN", "G_feat", "G_L1", "G_perc", "KLD")}
                log.info("step %d: %s (%.2f s/step)", step, ", ".join(f"{k} {v:.3f}" for k, v in mean.items()),
                         (time.monotonic() - start) / max(1, len(window)))
                window, start = [], time.monotonic()
            if step % cfg.sample_every == 0 or step == cfg.steps:
                _sample_grid(ema.module if ema is not None else g, semantic, data,
                             out / "samples" / f"step_{step:06d}.png", palette)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save()
    (out / "history.json").write_text(json.dumps({"config": {k: str(v) for k, v in asdict(cfg).items()},
                                                  "history": history}) + "\n")
    return {"steps": step, "history": history, "opt": opt}


def _init_from(g: SPADEGenerator, e: ConvEncoder | None, init: Path, config: str) -> None:
    """Start G (and E) from ``init``'s weights, also across a change of size or of ``--vae``.

    The SPADE blocks are convolutions, so they fit any size. Only the first layer depends on
    it: with a VAE it is a Linear from z to the 16 ngf x sh x sw first feature map, which is
    resized (nearest neighbour over sh x sw) when the size changed, and it is trained afresh
    when the checkpoint had none (a label-conditioned generator's first layer is a conv on
    the labels). The encoder starts from ``latest_net_E.pth`` where there is one."""

    source = init / "latest_net_G.pth"
    state = read_state_dict(source)
    hint = f" (--init-from needs a generator of the same width and label set: {config})"
    fc = {k: v for k, v in state.items() if k.startswith("fc.")}
    rest = {k: v for k, v in state.items() if not k.startswith("fc.")}
    load_strict(_Without(g, "fc"), rest, str(source), hint)
    if not g.opt.use_vae or fc.get("fc.weight", torch.empty(0)).dim() != 2:
        if g.opt.use_vae:
            log.info("--init-from %s: no z -> features layer there (not a VAE generator); it starts afresh", init)
        else:
            load_strict(g.fc, {k[3:]: v for k, v in fc.items()}, str(source), hint)
    else:
        c, (sh, sw) = 16 * g.opt.ngf, (g.sh, g.sw)
        w, b = fc["fc.weight"], fc["fc.bias"]
        old = w.shape[0] // c
        oh = round(math.sqrt(old * g.sh / g.sw))
        if oh * (old // oh) != old or w.shape[1] != g.opt.z_dim:
            raise InputError(f"{source}: its z -> features layer {tuple(w.shape)} does not fit this generator{hint}")
        resize = lambda t: F.interpolate(t, size=(sh, sw), mode="nearest")  # noqa: E731
        w = resize(w.float().t().reshape(-1, c, oh, old // oh)).reshape(w.shape[1], -1).t()
        b = resize(b.float().reshape(1, c, oh, old // oh)).reshape(-1)
        with torch.no_grad():
            g.fc.weight.copy_(w)
            g.fc.bias.copy_(b)
        if (oh, old // oh) != (sh, sw):
            log.info("--init-from %s: z -> features layer resized from %dx%d to %dx%d", init, oh, old // oh, sh, sw)
    if e is not None and (init / "latest_net_E.pth").is_file():
        load_strict(e, read_state_dict(init / "latest_net_E.pth"), str(init / "latest_net_E.pth"), hint)
    elif e is not None:
        log.info("--init-from %s: no latest_net_E.pth there; the style encoder starts afresh", init)
    log.info("generator initialised from %s", init)


class _Without(nn.Module):
    """A view of ``module``'s state dict without one child (for loading everything else strictly)."""

    def __init__(self, module: nn.Module, child: str) -> None:
        super().__init__()
        for name, sub in module.named_children():
            if name != child:
                self.add_module(name, sub)


class _NoAutocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
