"""DeepLab checkpoints in their published formats: loaded unchanged, checked against an
independent functional reference, exported to ONNX."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import reference
from conftest import make_deeplab_checkpoint, run_cli

REFERENCES = {"kazuto": reference.kazuto_msc, "tv-resnet50": reference.tv_deeplabv3_resnet,
              "tv-resnet101": reference.tv_deeplabv3_resnet, "tv-mobilenet_v3_large": reference.tv_deeplabv3_mobilenet}


def _rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / (np.abs(want).max() + 1e-12))


@pytest.mark.parametrize("family, n_classes", [("kazuto", 182), ("tv-resnet101", 21), ("tv-resnet50", 21),
                                               ("tv-mobilenet_v3_large", 21)])
def test_loader_builds_the_published_architecture(family, n_classes, tmp_path):
    from segsynth.export.checkpoint import read_state_dict
    from segsynth.export.deeplab import build_deeplab

    path = make_deeplab_checkpoint(tmp_path / "m.pth", family, n_classes)
    loaded = build_deeplab(read_state_dict(path), str(path))
    assert loaded.n_classes == n_classes
    assert loaded.family == {"kazuto": "deeplabv2-msc"}.get(family, family)
    x = torch.randn(2, 3, 65, 81) * 60
    sd = torch.load(path, weights_only=True)
    with torch.no_grad():
        got, want = loaded.model(x).numpy(), REFERENCES[family](sd, x).numpy()
    assert got.shape == (2, n_classes, 65, 81)
    spread = want.std(axis=(0, 2, 3))  # per-class spread: the logits vary over the image
    assert (spread > 1e-3 * np.abs(want).max()).mean() > 0.9
    err = _rel_err(got, want)
    print(f"{family}: max |module - reference| / max |reference| = {err:.1e}")
    assert err < 1e-5


@pytest.mark.parametrize("family", ["kazuto", "tv-resnet50", "tv-mobilenet_v3_large"])
def test_deeplab_onnx_matches_the_reference(family, tmp_path):
    # ResNet-50-deep variant of kazuto's DeepLabV2 keeps the export quick; the format is the same
    path = make_deeplab_checkpoint(tmp_path / "m.pth", family, 21, n_blocks=(3, 4, 6, 3))
    sd = torch.load(path, weights_only=True)
    for h, w in ((65, 65), (97, 129)):
        out = tmp_path / f"d{h}x{w}.onnx"
        proc = run_cli("export", "deeplab", "--checkpoint", path, "--out", out, "--size", f"{w}x{h}",
                       "--batch", "dynamic")
        assert proc.returncode == 0, proc.stderr
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        assert meta["segsynth.role"] == "segmenter" and meta["segsynth.label_set"] == "voc"
        assert meta["segsynth.input_order"] == ("bgr" if family == "kazuto" else "rgb")
        for batch in (1, 3):
            x = (np.random.default_rng(batch).standard_normal((batch, 3, h, w)) * 60).astype(np.float32)
            got = session.run(None, {"image": x})[0]
            with torch.no_grad():
                want = REFERENCES[family](sd, torch.from_numpy(x)).numpy()
            err = _rel_err(got, want)
            print(f"{family} {h}x{w} batch {batch}: relative max error {err:.1e}")
            assert got.shape == (batch, 21, h, w) and err < 1e-4


def test_argmax_export_feeds_the_segment_command(tmp_path):
    """A DeepLab exported with --argmax is a segmenter the rest of segsynth can use."""
    from conftest import REPO

    path = make_deeplab_checkpoint(tmp_path / "m.pth", "tv-mobilenet_v3_large", 21)
    out = tmp_path / "seg.onnx"
    assert run_cli("export", "deeplab", "--checkpoint", path, "--out", out, "--size", "129x129", "--argmax").returncode == 0
    proc = run_cli("segment", REPO / "examples" / "astronaut.png", tmp_path / "ids.png", "--segmenter", out,
                   "--view", "ids")
    assert proc.returncode == 0, proc.stderr
