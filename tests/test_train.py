"""`segsynth dataset make` and `segsynth train` (tiny config, CPU, seconds)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import run_cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, people_clip):
    out = tmp_path_factory.mktemp("ds") / "pairs"
    proc = run_cli("dataset", "make", people_clip, "--out", out, "--size", "64x64", "--segmenter", "ade20k+voc")
    assert proc.returncode == 0, proc.stderr
    return out


def _digest(directory):
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            h.update(path.relative_to(directory).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_dataset_pairs_manifest_and_determinism(dataset, people_clip, tmp_path):
    from PIL import Image

    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["label_set"] == "ade20k" and manifest["size"] == [64, 64] and len(manifest["items"]) == 8
    item = manifest["items"][3]
    image, label = Image.open(dataset / item["image"]), Image.open(dataset / item["label"])
    assert image.size == label.size == (64, 64) and label.mode == "L"
    assert (np.asarray(label) == 12).mean() > 0.3  # the person in the clip is labelled person
    assert item["frame"] == 3 and abs(item["time"] - 0.16) < 1e-6
    again = tmp_path / "again"
    assert run_cli("dataset", "make", people_clip, "--out", again, "--size", "64x64").returncode == 0
    assert _digest(again) == _digest(dataset)
    every = tmp_path / "every"
    assert run_cli("dataset", "make", people_clip, "--out", every, "--size", "64x64", "--every", "3").returncode == 0
    assert [i["frame"] for i in json.loads((every / "manifest.json").read_text())["items"]] == [0, 3, 6]


def test_dataset_refuses_an_existing_directory(dataset, people_clip):
    proc = run_cli("dataset", "make", people_clip, "--out", dataset)
    assert proc.returncode != 0 and "already exists" in proc.stderr


def test_tiny_training_lowers_the_loss_and_checkpoint_loads_and_exports(dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = run_cli("train", "--data", dataset, "--out", ckpt, "--config", "tiny", "--steps", "40",
                   "--sample-every", "20", "--save-every", "20")
    assert proc.returncode == 0, proc.stderr
    history = json.loads((ckpt / "history.json").read_text())["history"]
    l1 = [h["G_L1"] for h in history]
    assert len(l1) == 40 and np.mean(l1[-5:]) < 0.8 * np.mean(l1[:5]), l1
    assert {"latest_net_G.pth", "latest_net_D.pth", "opt.txt", "train_state.pth"} <= {p.name for p in ckpt.iterdir()}
    assert sorted(p.name for p in (ckpt / "samples").iterdir()) == ["step_000020.png", "step_000040.png"]
    d_keys = set(torch.load(ckpt / "latest_net_D.pth", weights_only=True))
    assert "discriminator_0.model0.0.weight" in d_keys and "discriminator_1.model1.0.weight_orig" in d_keys
    # the official-format loader takes it, and it exports like an official checkpoint
    out = tmp_path / "g.onnx"
    proc = run_cli("export", "spade", "--checkpoint", ckpt, "--out", out)
    assert proc.returncode == 0, proc.stderr
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    label = np.full((1, 1, 64, 64), 12, np.int64)
    image = session.run(None, {"label": label})[0]
    assert image.shape == (1, 3, 64, 64) and np.isfinite(image).all()


def test_resume_continues_where_it_stopped(dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert run_cli("train", "--data", dataset, "--out", ckpt, "--config", "tiny", "--steps", "6",
                   "--save-every", "3").returncode == 0
    proc = run_cli("train", "--data", dataset, "--out", ckpt, "--config", "tiny", "--steps", "10", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resumed" in proc.stderr and "at step 6" in proc.stderr
    history = json.loads((ckpt / "history.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 11))


def test_train_errors_are_one_line(tmp_path, dataset):
    proc = run_cli("train", "--data", tmp_path, "--out", tmp_path / "c")
    assert proc.returncode != 0 and "not a segsynth dataset" in proc.stderr.strip().splitlines()[-1]
    proc = run_cli("train", "--data", dataset, "--out", tmp_path / "c2", "--resume")
    assert proc.returncode != 0 and "no train_state.pth" in proc.stderr
