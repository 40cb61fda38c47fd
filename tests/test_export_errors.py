"""Bad checkpoints and options for `segsynth export`: one clear line, non-zero exit, no .onnx."""

from __future__ import annotations

import shutil

import pytest

from conftest import make_deeplab_checkpoint, make_spade_checkpoint, run_cli

TINY = dict(label_nc=6, contain_dontcare_label=True, no_instance=False, ngf=8, crop_size=64)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    make_spade_checkpoint(d / "spade", **TINY)
    make_deeplab_checkpoint(d / "tv.pth", "tv-mobilenet_v3_large", 21)
    return d


def _spade_dir(good, tmp_path, *, opt_text=None, g_bytes=None):
    d = tmp_path / "ckpt"
    shutil.copytree(good / "spade", d)
    if opt_text is not None:
        (d / "opt.txt").write_text(opt_text)
    if g_bytes is not None:
        (d / "latest_net_G.pth").write_bytes(g_bytes)
    return d


CASES = {
    "text file as .pth": (lambda g, t: ["spade", "--checkpoint", _spade_dir(g, t, g_bytes=b"not a checkpoint\n" * 20)],
                          "not a readable PyTorch checkpoint"),
    "truncated .pth": (lambda g, t: ["spade", "--checkpoint",
                                     _spade_dir(g, t, g_bytes=(g / "spade/latest_net_G.pth").read_bytes()[:5000])],
                       "not a readable PyTorch checkpoint"),
    "opt.txt disagrees with the weights": (
        lambda g, t: ["spade", "--checkpoint", _spade_dir(g, t, opt_text=(g / "spade/opt.txt").read_text()
                                                          .replace("label_nc: 6 ", "label_nc: 9 "))],
        "has shape (128, 8, 3, 3) in the checkpoint but (128, 11, 3, 3)"),
    "override disagrees with the weights": (lambda g, t: ["spade", "--checkpoint", g / "spade", "--opt", "ngf=16"],
                                            "in the checkpoint but"),
    "unknown norm": (lambda g, t: ["spade", "--checkpoint", g / "spade", "--opt", "norm_G=spectralfancy3x3"],
                     "is not a SPADE norm"),
    "unknown upsampling": (lambda g, t: ["spade", "--checkpoint", g / "spade", "--opt", "num_upsampling_layers=lots"],
                           "choose one of normal, more, most"),
    "unknown option": (lambda g, t: ["spade", "--checkpoint", g / "spade", "--opt", "n_gf=8"], "unknown SPADE option"),
    "malformed value": (lambda g, t: ["spade", "--checkpoint", g / "spade", "--opt", "ngf=eight"],
                        "is not a valid int"),
    "size not divisible": (lambda g, t: ["spade", "--checkpoint", g / "spade", "--size", "100x96"],
                           "multiples of 32"),
    "no opt.txt": (lambda g, t: ["spade", "--checkpoint", g], "no opt.txt"),
    "missing directory": (lambda g, t: ["spade", "--checkpoint", t / "nope"], "not a checkpoint directory"),
    "not a DeepLab": (lambda g, t: ["deeplab", "--checkpoint", g / "spade/latest_net_G.pth"],
                      "is not a DeepLab checkpoint of a known format"),
    "DeepLab too small": (lambda g, t: ["deeplab", "--checkpoint", g / "tv.pth", "--size", "16x16"],
                          "at least 32 pixels"),
    "no encoder": (lambda g, t: ["encoder", "--checkpoint", g / "spade"], "has no style encoder"),
    "chain needs a size": (lambda g, t: ["chain", "--checkpoint", g / "spade", "--deeplab", g / "tv.pth"],
                           "needs --size"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_export_input(case, good, tmp_path):
    make_args, message = CASES[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli("export", *make_args(good, tmp_path), "--out", out_dir / "x.onnx")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segsynth: error:") and message in lines[0], proc.stderr
    assert list(out_dir.iterdir()) == []


def test_export_writes_external_data_for_large_graphs(good, tmp_path):
    import numpy as np
    import onnxruntime as ort
    import torch

    from segsynth.export.onnx_export import GeneratorGraph, export
    from segsynth.export.spade import load_spade

    graph = GeneratorGraph(load_spade(good / "spade"))
    label = torch.randint(0, 6, (1, 1, 64, 64))
    out = tmp_path / "g.onnx"
    export(graph, {"label": label, "instance": label}, ["image"], out, dynamic_batch=False, metadata={},
           external_data_bytes=1000)  # pretend the 2 GB protobuf limit were 1 kB
    assert (tmp_path / "g.onnx.data").stat().st_size > out.stat().st_size
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = graph(label, label).numpy()
    got = session.run(None, {"label": label.numpy(), "instance": label.numpy()})[0]
    assert np.abs(got - want).max() < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]  # no staging leftovers
