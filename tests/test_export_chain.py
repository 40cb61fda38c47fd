"""The fused chain graph: uint8 frames + remap table -> uint8 frames, equal to running its
parts one after the other, with the remap table changing only what it should."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from conftest import make_deeplab_checkpoint, make_spade_checkpoint, run_cli

FRAME, SEG = (64, 96), (65, 65)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    seg_ckpt = make_deeplab_checkpoint(d / "deeplab.pth", "kazuto", 21, n_blocks=(3, 4, 6, 3))
    make_spade_checkpoint(d / "spade", label_nc=182, contain_dontcare_label=True, no_instance=False, ngf=8,
                          crop_size=64)
    outs = {"chain": d / "chain.onnx", "deeplab": d / "deeplab.onnx", "spade": d / "spade.onnx"}
    for args in (["chain", "--deeplab", seg_ckpt, "--checkpoint", d / "spade", "--size", "96x64",
                  "--seg-size", "65x65", "--batch", "dynamic", "--out", outs["chain"]],
                 ["deeplab", "--checkpoint", seg_ckpt, "--size", "65x65", "--argmax", "--batch", "dynamic",
                  "--out", outs["deeplab"]],
                 ["spade", "--checkpoint", d / "spade", "--batch", "dynamic", "--out", outs["spade"]]):
        proc = run_cli("export", *args)
        assert proc.returncode == 0, proc.stderr
    return {k: ort.InferenceSession(str(v), providers=["CPUExecutionProvider"]) for k, v in outs.items()}


def _frames(batch: int) -> np.ndarray:
    rng = np.random.default_rng(batch)
    blocks = rng.integers(0, 256, (batch, 8, 12, 3)).repeat(8, 1).repeat(8, 2)  # 64 x 96, blocky like a scene
    return np.clip(blocks + rng.integers(-20, 20, blocks.shape), 0, 255).astype(np.uint8)


def _parts(sessions, frames: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().flip(1)  # kazuto models take BGR
    x = F.interpolate(x, size=SEG, mode="bilinear", align_corners=False)
    x = x - torch.tensor([104.008, 116.669, 122.675]).view(1, 3, 1, 1)
    labels = sessions["deeplab"].run(None, {"image": x.numpy()})[0]
    ids = lut[labels]
    label = F.interpolate(torch.from_numpy(ids[:, None]).float(), size=(64, 64), mode="nearest").long().numpy()
    image = sessions["spade"].run(None, {"label": label, "instance": label})[0]
    image = F.interpolate(torch.from_numpy(image), size=FRAME, mode="bilinear", align_corners=False)
    pixels = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return pixels, ids


@pytest.mark.parametrize("batch", [1, 3])
def test_chain_equals_its_parts_run_one_after_another(chain, batch):
    frames = _frames(batch)
    lut = np.arange(256, dtype=np.uint8)
    image, labels = chain["chain"].run(None, {"frames": frames, "remap": lut})
    want_image, want_labels = _parts(chain, frames, lut)
    assert image.dtype == np.uint8 and image.shape == (batch, *FRAME, 3)
    assert (labels == want_labels).mean() > 0.999
    diff = np.abs(image.astype(int) - want_image.astype(int))
    print(f"batch {batch}: label agreement {(labels == want_labels).mean():.4%}, max pixel diff {diff.max()}")
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_remap_table_changes_output_only_where_the_class_was(chain):
    frames = _frames(2)
    identity = np.arange(256, dtype=np.uint8)
    image, labels = chain["chain"].run(None, {"frames": frames, "remap": identity})
    present, counts = np.unique(labels, return_counts=True)
    assert len(present) > 1, "the test needs a frame with several classes"
    cls = int(present[np.argsort(counts)[-2]])  # a class that covers part, not all, of the frames
    lut = identity.copy()
    lut[cls] = 150
    image2, labels2 = chain["chain"].run(None, {"frames": frames, "remap": lut})
    where = labels == cls
    assert (labels2[where] == 150).all() and (labels2[~where] == labels[~where]).all()
    assert not np.array_equal(image, image2)
    # remapping a class that is not in the frame changes nothing at all
    absent = int(next(c for c in range(21) if c not in present))
    lut3 = identity.copy()
    lut3[absent] = 150
    image3, labels3 = chain["chain"].run(None, {"frames": frames, "remap": lut3})
    assert np.array_equal(image3, image) and np.array_equal(labels3, labels)


def test_chain_bridges_label_sets_by_name(chain):
    """A VOC segmenter drives a COCO-Stuff generator through the by-name bridge table."""
    from segsynth.core import labels as L

    meta = chain["chain"].get_modelmeta().custom_metadata_map
    assert meta["segsynth.segmenter_label_set"] == "voc" and meta["segsynth.generator_label_set"] == "coco-stuff"
    table = L.RemapTable("person=bear", L.get("voc"), L.get("coco-stuff"))
    frames = _frames(1)
    _, seg = chain["chain"].run(None, {"frames": frames, "remap": np.arange(256, dtype=np.uint8)})
    _, ids = chain["chain"].run(None, {"frames": frames, "remap": table.lut})
    assert np.array_equal(ids, table.lut[seg])
