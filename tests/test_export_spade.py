"""SPADE generator and encoder: official checkpoint layout in, ONNX out, checked against an
independent functional reference of the official forward pass."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import reference
from conftest import make_spade_checkpoint, run_cli

CONFIGS = {
    # syncbatch SPADE norm, dontcare channel, instance edges, deterministic (no VAE)
    "syncbatch-edges": dict(label_nc=6, contain_dontcare_label=True, no_instance=False, ngf=8, crop_size=64,
                            norm_G="spectralspadesyncbatch3x3"),
    # instance SPADE norm, VAE with encoder, num_upsampling_layers=more, aspect ratio 2
    "instance-vae-more": dict(label_nc=5, contain_dontcare_label=False, no_instance=True, ngf=8, crop_size=256,
                              aspect_ratio=2.0, use_vae=True, z_dim=8, num_upsampling_layers="more",
                              norm_G="spectralspadeinstance3x3"),
    # plain BatchNorm SPADE with 5x5 kernels, no spectral norm, num_upsampling_layers=most
    "batch5x5-most": dict(label_nc=4, contain_dontcare_label=True, no_instance=True, ngf=8, crop_size=128,
                          num_upsampling_layers="most", norm_G="spadebatch5x5"),
}


def _inputs(opt: dict, batch: int, h: int, w: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    # blocky labels like a real segmentation, with dontcare pixels
    label = rng.integers(0, opt["label_nc"], (batch, 1, h // 8, w // 8)).repeat(8, 2).repeat(8, 3)
    label[:, :, : h // 8] = 255 if opt["contain_dontcare_label"] else 0
    feed = {"label": label.astype(np.int64)}
    if not opt["no_instance"]:
        instance = rng.integers(0, 3, (batch, 1, h // 4, w // 4)).repeat(4, 2).repeat(4, 3)
        feed["instance"] = instance.astype(np.int64)
    if opt["use_vae"]:
        feed["z"] = rng.standard_normal((batch, opt["z_dim"])).astype(np.float32)
    return feed


def _reference(directory, opt, feed, size):
    sd = torch.load(directory / "latest_net_G.pth", weights_only=True)
    o = dict(opt, crop_size=size[1], aspect_ratio=size[1] / size[0])
    seg = reference.semantics(feed["label"], opt["label_nc"], opt["contain_dontcare_label"], feed.get("instance"))
    z = torch.from_numpy(feed["z"]) if "z" in feed else None
    with torch.no_grad():
        return reference.spade_generator(sd, o, seg, z).numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generator_onnx_matches_the_reference(name, tmp_path):
    opt = make_spade_checkpoint(tmp_path / "ckpt", **CONFIGS[name])
    base = (opt["crop_size"] // 2 ** {"normal": 5, "more": 6, "most": 7}[opt["num_upsampling_layers"]]) * \
        2 ** {"normal": 5, "more": 6, "most": 7}[opt["num_upsampling_layers"]]
    h0 = round(base / opt["aspect_ratio"])
    # two sizes: the checkpoint's own and (where the weights allow: no VAE) a wider one
    sizes = [(h0, base)] + ([(h0, base * 2)] if not opt["use_vae"] else [])
    for h, w in sizes:
        out = tmp_path / f"g_{h}x{w}.onnx"
        proc = run_cli("export", "spade", "--checkpoint", tmp_path / "ckpt", "--out", out, "--size", f"{w}x{h}",
                       "--batch", "dynamic")
        assert proc.returncode == 0, proc.stderr
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        assert names == ["label"] + (["instance"] if not opt["no_instance"] else []) + (["z"] if opt["use_vae"] else [])
        for batch in (1, 3):
            feed = _inputs(opt, batch, h, w, seed=batch)
            got = session.run(None, feed)[0]
            want = _reference(tmp_path / "ckpt", opt, feed, (h, w))
            assert got.shape == (batch, 3, h, w)
            assert 0.01 < np.abs(want).mean() < 0.9 and want.std() > 0.01, "reference output is degenerate"
            err = np.abs(got - want).max()
            print(f"{name} {h}x{w} batch {batch}: max |onnx - reference| = {err:.2e}")
            assert err <= 1e-4


def test_pytorch_modules_match_the_reference_and_use_stored_u_v(tmp_path):
    from segsynth.export.spade import SemanticInput, frozen, load_spade

    opt = make_spade_checkpoint(tmp_path / "ckpt", **CONFIGS["syncbatch-edges"])
    spade = load_spade(tmp_path / "ckpt")
    feed = _inputs(opt, 2, 64, 64)
    seg = SemanticInput(spade.opt)(torch.from_numpy(feed["label"]), torch.from_numpy(feed["instance"]))
    ref_seg = reference.semantics(feed["label"], opt["label_nc"], True, feed["instance"])
    assert torch.equal(seg, ref_seg)
    want = _reference(tmp_path / "ckpt", opt, feed, (64, 64))
    with torch.no_grad():
        assert np.abs(spade.generator(seg).numpy() - want).max() < 1e-5
        assert np.abs(frozen(spade.generator)(seg).numpy() - want).max() < 1e-5
        # a power-iteration step would move u/v and change the output: eval must not do one
        u_before = spade.generator.head_0.conv_0.weight_u.clone()
        spade.generator(seg)
        assert torch.equal(u_before, spade.generator.head_0.conv_0.weight_u)


def test_official_key_names(tmp_path):
    make_spade_checkpoint(tmp_path / "ckpt", **CONFIGS["syncbatch-edges"])
    keys = set(torch.load(tmp_path / "ckpt" / "latest_net_G.pth", weights_only=True))
    for key in ("fc.weight", "fc.bias", "head_0.conv_0.weight_orig", "head_0.conv_0.weight_u",
                "head_0.conv_0.weight_v", "head_0.norm_0.param_free_norm.running_mean",
                "head_0.norm_0.mlp_shared.0.weight", "head_0.norm_0.mlp_gamma.bias", "up_0.conv_s.weight_orig",
                "up_0.norm_s.mlp_beta.weight", "conv_img.weight", "G_middle_1.norm_1.param_free_norm.running_var"):
        assert key in keys, key
    assert "up_0.conv_s.bias" not in keys and "head_0.conv_s.weight_orig" not in keys  # learned shortcut only if fin != fout


def test_encoder_onnx_matches_the_reference(tmp_path):
    make_spade_checkpoint(tmp_path / "ckpt", **CONFIGS["instance-vae-more"])
    sd = torch.load(tmp_path / "ckpt" / "latest_net_E.pth", weights_only=True)
    for h, w in ((256, 256), (128, 192)):  # the encoder resizes other sizes to 256x256 (bilinear)
        out = tmp_path / f"e_{h}x{w}.onnx"
        proc = run_cli("export", "encoder", "--checkpoint", tmp_path / "ckpt", "--out", out, "--size", f"{w}x{h}",
                       "--batch", "dynamic")
        assert proc.returncode == 0, proc.stderr
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        for batch in (1, 3):
            style = np.random.default_rng(batch).uniform(-1, 1, (batch, 3, h, w)).astype(np.float32)
            mu, logvar = session.run(None, {"style": style})
            with torch.no_grad():
                ref_mu, ref_logvar = reference.spade_encoder(sd, torch.from_numpy(style))
            assert mu.shape == (batch, 256)
            err = max(np.abs(mu - ref_mu.numpy()).max(), np.abs(logvar - ref_logvar.numpy()).max())
            print(f"encoder {h}x{w} batch {batch}: max |onnx - reference| = {err:.2e}")
            assert err <= 1e-4


def test_opt_txt_is_parsed_like_the_official_file(tmp_path):
    from segsynth.export.spade import SpadeOptions

    text = ("----------------- Options ---------------\n"
            "             aspect_ratio: 2.0                           \t[default: 1.0]\n"
            "                 label_nc: 35                            \t[default: 182]\n"
            "   contain_dontcare_label: False                         \n"
            "                   norm_G: spectralspadesyncbatch3x3     \t[default: spectralinstance]\n"
            "                  gpu_ids: 0,1                           \n"
            "                 use_vae: True                          \n"
            "----------------- End -------------------\n")
    (tmp_path / "opt.txt").write_text(text)
    opt = SpadeOptions.from_opt_txt(tmp_path / "opt.txt", {"ngf": "32"})
    assert (opt.aspect_ratio, opt.label_nc, opt.contain_dontcare_label, opt.use_vae, opt.ngf) == (2.0, 35, False, True, 32)
    assert opt.semantic_nc == 36 and opt.norm_G == "spectralspadesyncbatch3x3"


@pytest.mark.parametrize("no_instance", [True, False])
def test_label_id_fast_path_equals_the_one_hot_path(no_instance):
    from segsynth.export.spade import SemanticInput, SPADEGenerator, SpadeOptions

    torch.manual_seed(0)
    opt = SpadeOptions(label_nc=20, contain_dontcare_label=True, no_instance=no_instance, ngf=4, crop_size=64,
                       norm_G="spectralspadeinstance3x3")
    g, sem = SPADEGenerator(opt).double().eval(), SemanticInput(opt)
    label = torch.randint(0, 20, (2, 1, 8, 8)).repeat_interleave(8, 2).repeat_interleave(8, 3)
    label[:, :, :5] = 255
    label[:, :, -3:, -3:] = 200  # an id outside the set: an all-zero pixel on both paths
    with torch.no_grad():
        a = g(sem(label).double())
        lm = sem.label_map(label)
        if lm.dense is not None:
            lm.dense = lm.dense.double()
        b = g(lm)
    assert (a - b).abs().max() < 1e-10


def test_fp16_weight_storage_halves_the_file_and_keeps_fp32_arithmetic(tmp_path):
    import shutil

    from segsynth.export.onnx_export import store_weights_fp16

    make_spade_checkpoint(tmp_path / "ckpt", **CONFIGS["syncbatch-edges"])
    # the checkpoint with its weights rounded to fp16, as bundled
    state = torch.load(tmp_path / "ckpt" / "latest_net_G.pth", weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
               tmp_path / "ckpt" / "latest_net_G.pth")
    full = tmp_path / "full.onnx"
    assert run_cli("export", "spade", "--checkpoint", tmp_path / "ckpt", "--out", full).returncode == 0
    half = tmp_path / "half.onnx"
    shutil.copy(full, half)
    store_weights_fp16(half)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    feed = _inputs(make_spade_checkpoint(tmp_path / "unused", **CONFIGS["syncbatch-edges"]), 1, 64, 64)
    a = ort.InferenceSession(str(full), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    b = ort.InferenceSession(str(half), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    # the folded spectral-norm weights (W / sigma) are rounded to fp16 once more: ~1e-4 on outputs
    assert np.abs(a - b).max() < 3e-4 and np.abs(a - b).mean() < 5e-5


# a VAE checkpoint at the encoder's smallest crop (the official encoder breaks below 256), not square
TINY_VAE = dict(label_nc=3, contain_dontcare_label=False, no_instance=True, ngf=4, crop_size=256, aspect_ratio=2.0,
                use_vae=True, z_dim=8, norm_G="spectralspadeinstance3x3")


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """TINY_VAE's checkpoint (ckpt/) with its generator and encoder exported with no flags (spade.onnx, encoder.onnx)."""
    d = tmp_path_factory.mktemp("tiny-vae")
    make_spade_checkpoint(d / "ckpt", **TINY_VAE)
    for what in ("spade", "encoder"):
        proc = run_cli("export", what, "--checkpoint", d / "ckpt", "--out", d / f"{what}.onnx")
        assert proc.returncode == 0, proc.stderr
    return d


def _graph_inputs(path) -> dict[str, list]:
    """Each input's dims as ONNX stores them: an int, or the symbolic name of a dynamic dim."""
    import onnx

    graph = onnx.load(str(path)).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}


def _metadata(path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_encoder_exports_at_the_checkpoint_size_with_a_dynamic_batch_by_default(tiny_vae):
    from segsynth.export.spade import load_spade

    out = tiny_vae / "encoder.onnx"
    (n, c, h, w), = _graph_inputs(out).values()
    assert isinstance(n, str) and (c, h, w) == (3, 128, 256)  # crop_size/aspect_ratio x crop_size, not 256x256
    assert _metadata(out)["segsynth.size"] == "128x256"
    encoder = load_spade(tiny_vae / "ckpt").encoder
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        style = np.random.default_rng(batch).uniform(-1, 1, (batch, 3, 128, 256)).astype(np.float32)
        mu, logvar = session.run(["mu", "logvar"], {"style": style})
        with torch.no_grad():
            want_mu, want_logvar = (t.numpy() for t in encoder(torch.from_numpy(style)))
        assert mu.shape == (batch, 256) and want_mu.std() > 1e-3
        err = max(np.abs(mu - want_mu).max(), np.abs(logvar - want_logvar).max())
        print(f"encoder 128x256 batch {batch}: max |onnx - torch| = {err:.2e}")
        assert err <= 1e-4


def test_encoder_size_and_batch_flags_override_the_defaults(tiny_vae, tmp_path):
    out = tmp_path / "e.onnx"
    proc = run_cli("export", "encoder", "--checkpoint", tiny_vae / "ckpt", "--out", out, "--size", "160x96",
                   "--batch", "2")
    assert proc.returncode == 0, proc.stderr
    assert _graph_inputs(out) == {"style": [2, 3, 96, 160]}
    assert _metadata(out)["segsynth.size"] == "96x160"


def test_spade_export_has_a_dynamic_batch_by_default(tiny_vae):
    out = tiny_vae / "spade.onnx"
    dims = _graph_inputs(out)
    assert isinstance(dims["label"][0], str) and dims["label"][1:] == [1, 128, 256]
    assert isinstance(dims["z"][0], str) and dims["z"][0] == dims["label"][0]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        image, = session.run(None, _inputs(dict(TINY_VAE), batch, 128, 256))
        assert image.shape == (batch, 3, 128, 256)


def test_encode_style_feeds_the_encoder_graph_its_own_size(tiny_vae):
    """A fixed style size is used as it is; dynamic dims take the generator's size (not 256x256)."""
    from PIL import Image

    from segsynth.engine.runner import Runner, TensorMeta
    from segsynth.engine.select import make_runner
    from segsynth.export.spade import load_spade
    from segsynth.stream.infer.generator import Generator

    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    generator = Generator(make_runner(tiny_vae / "spade.onnx", "onnxruntime"),
                          make_runner(tiny_vae / "encoder.onnx", "onnxruntime"))
    z = generator.encode_style(rgb)
    generator.close()
    x = np.asarray(Image.fromarray(rgb).resize((256, 128), Image.BILINEAR), np.float32) / 127.5 - 1
    with torch.no_grad():
        want = load_spade(tiny_vae / "ckpt").encoder(torch.from_numpy(x.transpose(2, 0, 1)[None]))[0]
    assert z.shape == (1, 8) and np.abs(z - want[:, :8].numpy()).max() <= 1e-4

    class DynamicEncoder(Runner):  # an encoder graph with dynamic spatial dims, recording what it is fed
        fed = []

        def _activate_impl(self):
            self.inputs = {"style": TensorMeta("style", np.dtype(np.float32), ("N", 3, "H", "W"))}

        def _infer_impl(self, feed):
            self.fed.append(feed["style"].shape)
            return {"mu": np.zeros((len(feed["style"]), 256), np.float32)}

        def _deactivate_impl(self):
            pass

    generator = Generator(make_runner(tiny_vae / "spade.onnx", "onnxruntime"), DynamicEncoder())
    generator.encode_style(rgb)
    generator.close()
    assert DynamicEncoder.fed == [(1, 3, 128, 256)]  # the generator's H x W
