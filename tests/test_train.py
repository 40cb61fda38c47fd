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
    assert (np.asarray(label) == 12).mean() > 0.1  # the person is labelled person (as seen at 64x64)
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
    proc = run_cli("train", "--data", dataset, "--out", ckpt, "--config", "tiny", "--steps", "60",
                   "--sample-every", "30", "--save-every", "30")
    assert proc.returncode == 0, proc.stderr
    history = json.loads((ckpt / "history.json").read_text())["history"]
    l1 = [h["G_L1"] for h in history]
    assert len(l1) == 60 and np.mean(l1[-5:]) < 0.8 * np.mean(l1[:5]), l1
    assert {"latest_net_G.pth", "latest_net_D.pth", "opt.txt", "train_state.pth"} <= {p.name for p in ckpt.iterdir()}
    assert sorted(p.name for p in (ckpt / "samples").iterdir()) == ["step_000030.png", "step_000060.png"]
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


def test_init_from_fine_tunes_a_checkpoint(dataset, tmp_path):
    base, tuned, fresh = tmp_path / "base", tmp_path / "tuned", tmp_path / "fresh"
    assert run_cli("train", "--data", dataset, "--out", base, "--config", "tiny", "--steps", "20").returncode == 0
    proc = run_cli("train", "--data", dataset, "--out", tuned, "--config", "tiny", "--steps", "1", "--seed", "1",
                   "--init-from", base)
    assert proc.returncode == 0, proc.stderr
    assert "generator initialised from" in proc.stderr
    assert run_cli("train", "--data", dataset, "--out", fresh, "--config", "tiny", "--steps", "1",
                   "--seed", "1").returncode == 0
    start = torch.load(base / "latest_net_G.pth", weights_only=True)

    def distance(ckpt):
        state = torch.load(ckpt / "latest_net_G.pth", weights_only=True)
        weights = [k for k in start if k.endswith(("weight", "weight_orig"))]  # not the power-iterated u/v
        return max(float((state[k].float() - start[k].float()).abs().max()) for k in weights)

    # one Adam step moves each weight by about lr (1e-4); a fresh start is elsewhere entirely
    assert distance(tuned) < 1e-3 < 0.05 < distance(fresh)
    # a checkpoint of another architecture: one line naming the tensor and both shapes
    proc = run_cli("train", "--data", dataset, "--out", tmp_path / "bad", "--config", "small", "--steps", "1",
                   "--init-from", base)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 4 and len(lines) == 1 and "has shape" in lines[0] and "--config small" in lines[0]
    assert not (tmp_path / "bad").exists()
    proc = run_cli("train", "--data", dataset, "--out", tmp_path / "c3", "--resume", "--init-from", base)
    assert proc.returncode != 0 and "exclude each other" in proc.stderr


def test_ema_saves_the_moving_average_and_resumes_it(dataset, tmp_path):
    base, run = tmp_path / "base", tmp_path / "ema"
    assert run_cli("train", "--data", dataset, "--out", base, "--config", "tiny", "--steps", "2").returncode == 0
    args = ["train", "--data", dataset, "--out", run, "--config", "tiny", "--ema", "0.25", "--save-every", "1"]
    proc = run_cli(*args, "--steps", "1", "--init-from", base)
    assert proc.returncode == 0, proc.stderr

    def load(ckpt):
        saved = torch.load(ckpt / "latest_net_G.pth", weights_only=True)
        trained = torch.load(ckpt / "train_state.pth", weights_only=False)["g_trained"]
        return saved, trained

    start = torch.load(base / "latest_net_G.pth", weights_only=True)
    ema1, g1 = load(run)
    buffers = [k for k in g1 if k.endswith(("weight_u", "weight_v"))]
    params = [k for k in g1 if k not in buffers]
    assert buffers and params
    for k in params:  # one step: 0.25 x the start + 0.75 x the trained weights
        assert torch.allclose(ema1[k], 0.25 * start[k] + 0.75 * g1[k], atol=1e-6), k
    assert any(not torch.equal(ema1[k], g1[k]) for k in params)
    assert all(torch.equal(ema1[k], g1[k]) for k in buffers)
    assert run_cli(*args, "--steps", "2", "--resume").returncode == 0  # resumes the trained and the average
    ema2, g2 = load(run)
    for k in params:
        assert torch.allclose(ema2[k], 0.25 * ema1[k] + 0.75 * g2[k], atol=1e-6), k
    proc = run_cli("train", "--data", dataset, "--out", run, "--config", "tiny", "--steps", "3", "--resume")
    assert proc.returncode != 0 and "resume it with --ema" in proc.stderr
    proc = run_cli("train", "--data", dataset, "--out", run, "--ema", "1")
    assert proc.returncode != 0 and "--ema must be in [0, 1)" in proc.stderr


def test_train_errors_are_one_line(tmp_path, dataset):
    proc = run_cli("train", "--data", tmp_path, "--out", tmp_path / "c")
    assert proc.returncode != 0 and "not a segsynth dataset" in proc.stderr.strip().splitlines()[-1]
    proc = run_cli("train", "--data", dataset, "--out", tmp_path / "c2", "--resume")
    assert proc.returncode != 0 and "no train_state.pth" in proc.stderr


def test_ssim_and_psnr_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from segsynth.stream.evaluate import psnr, ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    ref = structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=255)
    assert abs(ssim(a, b) - ref) < 1e-6
    assert abs(psnr(a, b) - peak_signal_noise_ratio(a, b, data_range=255)) < 1e-9
    assert ssim(a, a) == pytest.approx(1.0)


def test_confusion_scores_by_hand():
    from segsynth.stream.evaluate import Confusion

    truth = np.array([0, 0, 0, 0, 0, 0, 1, 1, 255, 2])
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 0, 2, 255])  # 255 for class 2: wrong, no false positive
    conf = Confusion(3)
    conf.add(truth, pred)
    # IoU: class 0 5/(6+6-5)=5/7, class 1 1/(2+2-1)=1/3, class 2 0/1; 9 pixels known, 6 right
    scores = conf.summary()
    assert scores["miou"] == pytest.approx((5 / 7 + 1 / 3 + 0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(6 / 9)
    assert scores["fw_iou"] == pytest.approx((6 * 5 / 7 + 2 * 1 / 3 + 0) / 9)


def test_eval_generator_scores_and_real_frames_score_one(dataset, tmp_path):
    from conftest import make_spade_checkpoint

    make_spade_checkpoint(tmp_path / "g", label_nc=150, contain_dontcare_label=True, no_instance=True, ngf=4,
                          crop_size=64, norm_G="spectralspadeinstance3x3")
    out = tmp_path / "scores.json"
    proc = run_cli("eval-generator", tmp_path / "g", "--data", dataset, "--json", out, "--cache-dir", tmp_path / "c",
                   "--grid", tmp_path / "grid.png", "--baselines")
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(out.read_text())
    assert {"miou", "pixel_accuracy", "fw_iou", "psnr", "ssim", "frames"} <= set(scores) and scores["frames"] == 8
    # the labels are the segmenter's own output on these very frames
    assert scores["real_frames"] == {"miou": 1.0, "pixel_accuracy": 1.0, "fw_iou": 1.0}
    assert 0 <= scores["miou"] < 1 and 0 <= scores["pixel_accuracy"] < 1 and scores["psnr"] > 0
    # slightly spoilt real frames: the protocol's ceiling, below the untouched frames
    assert set(scores["baselines"]) == {"real_blur_1px", "real_noise_10"}
    for base in scores["baselines"].values():
        assert 0 < base["pixel_accuracy"] < 1 and 0 <= base["fw_iou"] < 1
    assert "mIoU (classes present)" in proc.stderr and "real_blur_1px" in proc.stderr
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (3 * 64, 4 * 64)  # label | real | generated, 4 rows


def test_vae_training_writes_an_encoder_that_run_can_use(tmp_path, people_clip):
    data = tmp_path / "pairs256"
    assert run_cli("dataset", "make", people_clip, "--out", data, "--size", "256x256", "--segmenter", "voc",
                   "--every", "2").returncode == 0
    ckpt = tmp_path / "vae"
    proc = run_cli("train", "--data", data, "--out", ckpt, "--config", "tiny", "--steps", "2", "--vae",
                   "--save-every", "2", "--sample-every", "2")
    assert proc.returncode == 0, proc.stderr
    assert (ckpt / "latest_net_E.pth").is_file() and "use_vae: True" in (ckpt / "opt.txt").read_text()
    kld = [h["KLD"] for h in json.loads((ckpt / "history.json").read_text())["history"]]
    assert all(k >= 0 for k in kld) and any(k > 0 for k in kld)
    style = tmp_path / "style.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(style)
    proc = run_cli("run", people_clip, tmp_path / "o.mp4", "--generator", ckpt, "--style", style,
                   "--segmenter", "voc", "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("train", "--data", tmp_path / "pairs256", "--out", tmp_path / "x", "--vae", "--steps", "1",
                   "--config", "tiny")
    assert proc.returncode == 0
