"""Independent reference forward passes for the export-stage models.

Written directly from the official code's semantics with torch.nn.functional, reading the
state dicts by their published key names. They share no code with segsynth.export, so a
wrong key name, layer order, padding, norm or spectral-norm detail there shows up as a
mismatch here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# ---- SPADE (NVlabs/SPADE, test-time semantics) ---------------------------------------------


def sn_weight(sd, p):
    """Spectral norm at eval time: W / (u . W v) with the stored u and v, no power iteration."""
    w, u, v = sd[p + "weight_orig"], sd[p + "weight_u"], sd[p + "weight_v"]
    return w / torch.dot(u, w.reshape(w.shape[0], -1) @ v)


def _weight(sd, p):
    return sn_weight(sd, p) if p + "weight_orig" in sd else sd[p + "weight"]


def _conv(sd, p, x, padding=0, stride=1):
    return F.conv2d(x, _weight(sd, p), sd.get(p + "bias"), stride=stride, padding=padding)


def _param_free(sd, p, x):
    if p + "running_mean" not in sd:  # instance norm
        return F.instance_norm(x, eps=1e-5)
    mean, var = sd[p + "running_mean"], sd[p + "running_var"]
    return (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)


def _spade(sd, p, x, seg, ks):
    normalized = _param_free(sd, p + "param_free_norm.", x)
    seg = F.interpolate(seg, size=x.shape[2:], mode="nearest")
    actv = F.relu(_conv(sd, p + "mlp_shared.0.", seg, ks // 2))
    return normalized * (1 + _conv(sd, p + "mlp_gamma.", actv, ks // 2)) + _conv(sd, p + "mlp_beta.", actv, ks // 2)


def _block(sd, p, x, seg, ks):
    lrelu = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
    if p + "conv_s.weight_orig" in sd or p + "conv_s.weight" in sd:
        x_s = _conv(sd, p + "conv_s.", _spade(sd, p + "norm_s.", x, seg, ks))
    else:
        x_s = x
    dx = _conv(sd, p + "conv_0.", lrelu(_spade(sd, p + "norm_0.", x, seg, ks)), 1)
    dx = _conv(sd, p + "conv_1.", lrelu(_spade(sd, p + "norm_1.", dx, seg, ks)), 1)
    return x_s + dx


def spade_generator(sd, opt: dict, seg: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    n_up = {"normal": 5, "more": 6, "most": 7}[opt["num_upsampling_layers"]]
    sw = opt["crop_size"] // 2 ** n_up
    sh = round(sw / opt["aspect_ratio"])
    ks = int(opt["norm_G"][-1])
    up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
    if opt["use_vae"]:
        x = F.linear(z, sd["fc.weight"], sd["fc.bias"]).view(z.shape[0], -1, sh, sw)
    else:
        x = _conv(sd, "fc.", F.interpolate(seg, size=(sh, sw), mode="nearest"), 1)
    x = _block(sd, "head_0.", x, seg, ks)
    x = _block(sd, "G_middle_0.", up(x), seg, ks)
    if n_up > 5:
        x = up(x)
    x = _block(sd, "G_middle_1.", x, seg, ks)
    for name in ("up_0.", "up_1.", "up_2.", "up_3.") + (("up_4.",) if n_up == 7 else ()):
        x = _block(sd, name, up(x), seg, ks)
    return torch.tanh(_conv(sd, "conv_img.", F.leaky_relu(x, 0.2), 1))


def spade_encoder(sd, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ConvEncoder with norm_E = spectralinstance (spectral conv without bias, instance norm)."""
    if x.shape[2:] != (256, 256):
        x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
    for i in range(1, 7):
        if i > 1:
            x = F.leaky_relu(x, 0.2)
        x = F.instance_norm(_conv(sd, f"layer{i}.0.", x, padding=1, stride=2), eps=1e-5)
    x = F.leaky_relu(x, 0.2).reshape(x.shape[0], -1)
    return F.linear(x, sd["fc_mu.weight"], sd["fc_mu.bias"]), F.linear(x, sd["fc_var.weight"], sd["fc_var.bias"])


def semantics(label: np.ndarray, label_nc: int, dontcare: bool, instance: np.ndarray | None) -> torch.Tensor:
    """Official preprocess_input: 255 -> label_nc, scatter one-hot, then get_edges of the instance map."""
    label = label.astype(np.int64).copy()
    label[label == 255] = label_nc
    nc = label_nc + int(dontcare)
    n, _, h, w = label.shape
    one_hot = np.zeros((n, nc, h, w), np.float32)
    for c in range(nc):
        one_hot[:, c] = label[:, 0] == c
    if instance is None:
        return torch.from_numpy(one_hot)
    t = instance
    edge = np.zeros(t.shape, bool)
    edge[:, :, :, 1:] |= t[:, :, :, 1:] != t[:, :, :, :-1]
    edge[:, :, :, :-1] |= t[:, :, :, 1:] != t[:, :, :, :-1]
    edge[:, :, 1:, :] |= t[:, :, 1:, :] != t[:, :, :-1, :]
    edge[:, :, :-1, :] |= t[:, :, 1:, :] != t[:, :, :-1, :]
    return torch.from_numpy(np.concatenate([one_hot, edge.astype(np.float32)], 1))


# ---- DeepLab ---------------------------------------------------------------------------------


def _bn(sd, p, x, eps):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        False, 0.0, eps)


def _blocks(sd, prefix):
    names = {k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)}
    return sorted(names, key=lambda n: int("".join(c for c in n if c.isdigit())))


def kazuto_deeplabv2(sd, x, p="base."):
    """kazuto1011 DeepLabV2: Caffe ResNet (stride in the 1x1 reduce conv), dilations 2/4, ASPP sum."""
    def cbr(q, h, stride, pad, dil, relu=True):
        h = _bn(sd, q + "bn.", F.conv2d(h, sd[q + "conv.weight"], None, stride, pad, dil), 1e-5)
        return F.relu(h) if relu else h

    h = F.max_pool2d(cbr(p + "layer1.conv1.", x, 2, 3, 1), 3, 2, 1, ceil_mode=True)
    for layer, stride, dil in ((2, 1, 1), (3, 2, 1), (4, 1, 2), (5, 1, 4)):
        for i, block in enumerate(_blocks(sd, f"{p}layer{layer}.")):
            q, s = f"{p}layer{layer}.{block}.", stride if i == 0 else 1
            r = cbr(q + "reduce.", h, s, 0, 1)
            r = cbr(q + "conv3x3.", r, 1, dil, dil)
            r = cbr(q + "increase.", r, 1, 0, 1, relu=False)
            h = F.relu(r + (cbr(q + "shortcut.", h, s, 0, 1, relu=False) if i == 0 else h))
    rates = [6, 12, 18, 24]
    return sum(F.conv2d(h, sd[f"{p}aspp.c{i}.weight"], sd[f"{p}aspp.c{i}.bias"], padding=r, dilation=r)
               for i, r in enumerate(rates) if f"{p}aspp.c{i}.weight" in sd)


def kazuto_msc(sd, x):
    """MSC: max over scales 1, 0.5, 0.75 (logits resized to the full-scale logits), then the
    demo's bilinear upsampling to the input size."""
    logits = kazuto_deeplabv2(sd, x)
    outs = [logits]
    for scale in (0.5, 0.75):
        small = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        outs.append(F.interpolate(kazuto_deeplabv2(sd, small), size=logits.shape[2:], mode="bilinear",
                                  align_corners=False))
    return F.interpolate(torch.stack(outs).max(0)[0], size=x.shape[2:], mode="bilinear", align_corners=False)


def _tv_aspp_head(sd, h):
    p = "classifier.0."
    size = h.shape[2:]
    outs = [F.relu(_bn(sd, p + "convs.0.1.", F.conv2d(h, sd[p + "convs.0.0.weight"]), 1e-5))]
    for i, rate in zip((1, 2, 3), (12, 24, 36)):
        y = F.conv2d(h, sd[f"{p}convs.{i}.0.weight"], padding=rate, dilation=rate)
        outs.append(F.relu(_bn(sd, f"{p}convs.{i}.1.", y, 1e-5)))
    pooled = F.relu(_bn(sd, p + "convs.4.2.", F.conv2d(F.adaptive_avg_pool2d(h, 1), sd[p + "convs.4.1.weight"]), 1e-5))
    outs.append(F.interpolate(pooled, size=size, mode="bilinear", align_corners=False))
    y = F.relu(_bn(sd, p + "project.1.", F.conv2d(torch.cat(outs, 1), sd[p + "project.0.weight"]), 1e-5))
    y = F.relu(_bn(sd, "classifier.2.", F.conv2d(y, sd["classifier.1.weight"], padding=1), 1e-5))
    return F.conv2d(y, sd["classifier.4.weight"], sd["classifier.4.bias"])


def tv_deeplabv3_resnet(sd, x):
    """torchvision deeplabv3_resnet50/101: ResNet v1.5 (stride in conv2), layer3/4 dilated 2/4."""
    p = "backbone."
    h = F.relu(_bn(sd, p + "bn1.", F.conv2d(x, sd[p + "conv1.weight"], stride=2, padding=3), 1e-5))
    h = F.max_pool2d(h, 3, 2, 1)
    dilation = 1
    for layer, stride, dilate in ((1, 1, False), (2, 2, False), (3, 2, True), (4, 2, True)):
        previous = dilation
        if dilate:
            dilation, stride = dilation * stride, 1
        for i, block in enumerate(_blocks(sd, f"{p}layer{layer}.")):
            q = f"{p}layer{layer}.{block}."
            d, s = (previous, stride) if i == 0 else (dilation, 1)
            r = F.relu(_bn(sd, q + "bn1.", F.conv2d(h, sd[q + "conv1.weight"]), 1e-5))
            r = F.relu(_bn(sd, q + "bn2.", F.conv2d(r, sd[q + "conv2.weight"], stride=s, padding=d, dilation=d), 1e-5))
            r = _bn(sd, q + "bn3.", F.conv2d(r, sd[q + "conv3.weight"]), 1e-5)
            if q + "downsample.0.weight" in sd:
                short = _bn(sd, q + "downsample.1.", F.conv2d(h, sd[q + "downsample.0.weight"], stride=s), 1e-5)
            else:
                short = h
            h = F.relu(r + short)
    return F.interpolate(_tv_aspp_head(sd, h), size=x.shape[2:], mode="bilinear", align_corners=False)


# torchvision mobilenet_v3_large(dilated=True): kernel, expanded, out, SE, activation, stride, dilation
_LARGE = [(3, 16, 16, 0, "RE", 1, 1), (3, 64, 24, 0, "RE", 2, 1), (3, 72, 24, 0, "RE", 1, 1),
          (5, 72, 40, 1, "RE", 2, 1), (5, 120, 40, 1, "RE", 1, 1), (5, 120, 40, 1, "RE", 1, 1),
          (3, 240, 80, 0, "HS", 2, 1), (3, 200, 80, 0, "HS", 1, 1), (3, 184, 80, 0, "HS", 1, 1),
          (3, 184, 80, 0, "HS", 1, 1), (3, 480, 112, 1, "HS", 1, 1), (3, 672, 112, 1, "HS", 1, 1),
          (5, 672, 160, 1, "HS", 2, 2), (5, 960, 160, 1, "HS", 1, 2), (5, 960, 160, 1, "HS", 1, 2)]


def tv_deeplabv3_mobilenet(sd, x):
    p = "backbone."
    act = {"RE": F.relu, "HS": F.hardswish}
    h = F.hardswish(_bn(sd, p + "0.1.", F.conv2d(x, sd[p + "0.0.weight"], stride=2, padding=1), 1e-3))
    cin = 16
    for n, (k, exp, cout, se, a, stride, dil) in enumerate(_LARGE, start=1):
        q, j, y = f"{p}{n}.block.", 0, h
        if exp != cin:
            y = act[a](_bn(sd, f"{q}0.1.", F.conv2d(y, sd[f"{q}0.0.weight"]), 1e-3))
            j = 1
        s = 1 if dil > 1 else stride
        y = F.conv2d(y, sd[f"{q}{j}.0.weight"], stride=s, padding=(k - 1) // 2 * dil, dilation=dil, groups=exp)
        y = act[a](_bn(sd, f"{q}{j}.1.", y, 1e-3))
        j += 1
        if se:
            w = F.relu(F.conv2d(F.adaptive_avg_pool2d(y, 1), sd[f"{q}{j}.fc1.weight"], sd[f"{q}{j}.fc1.bias"]))
            y = y * F.hardsigmoid(F.conv2d(w, sd[f"{q}{j}.fc2.weight"], sd[f"{q}{j}.fc2.bias"]))
            j += 1
        y = _bn(sd, f"{q}{j}.1.", F.conv2d(y, sd[f"{q}{j}.0.weight"]), 1e-3)
        h = y + h if stride == 1 and cin == cout else y
        cin = cout
    h = F.hardswish(_bn(sd, p + "16.1.", F.conv2d(h, sd[p + "16.0.weight"]), 1e-3))
    return F.interpolate(_tv_aspp_head(sd, h), size=x.shape[2:], mode="bilinear", align_corners=False)
