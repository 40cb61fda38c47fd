"""`segsynth dataset make` and `segsynth train` (tiny config, CPU, seconds)."""

from __future__ import annotations

import hashlib
import itertools
import json
import types

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
    proc = run_cli("train", "--data", dataset, "--out", ckpt, "--config", "tiny", "--steps", "60",  # L1 leads:
                   "--sample-every", "30", "--save-every", "30", "--lambda-l1", "10", "--lambda-perceptual", "0")
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
    # a run trained without --ema, resumed with it: the average starts from the resumed weights
    proc = run_cli("train", "--data", dataset, "--out", base, "--config", "tiny", "--ema", "0.25", "--steps", "3",
                   "--resume")
    assert proc.returncode == 0 and "the moving average starts at step 2" in proc.stderr, proc.stderr
    ema3, g3 = load(base)
    for k in params:
        assert torch.allclose(ema3[k], 0.25 * start[k] + 0.75 * g3[k], atol=1e-6), k
    assert any(not torch.equal(ema3[k], g3[k]) for k in params)
    proc = run_cli("train", "--data", dataset, "--out", run, "--ema", "1")
    assert proc.returncode != 0 and "--ema must be in [0, 1)" in proc.stderr


def test_progress_of_a_resumed_run_rates_only_its_own_steps(monkeypatch):
    from segsynth.jobs import progress as mod

    clock = itertools.chain([100.0], itertools.repeat(110.0))
    monkeypatch.setattr(mod, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    p = mod.Progress("train tiny", 1000, unit="steps", enabled=False, initial=600)
    p.update(20)  # 20 steps in 10 s, after 600 done by an earlier run
    assert p.done == 620 and p.rate == pytest.approx(2.0)
    assert p.line() == "train tiny: 620/1000 steps, 2.0/s, ETA 190 s"


def test_train_errors_are_one_line(tmp_path, dataset):
    proc = run_cli("train", "--data", tmp_path, "--out", tmp_path / "c")
    assert proc.returncode != 0 and "not a segsynth dataset" in proc.stderr.strip().splitlines()[-1]
    proc = run_cli("train", "--data", dataset, "--out", tmp_path / "c2", "--resume")
    assert proc.returncode != 0 and "no train_state.pth" in proc.stderr


def test_ssim_and_psnr_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from segsynth.jobs.eval_generator import psnr, ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    ref = structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=255)
    assert abs(ssim(a, b) - ref) < 1e-6
    assert abs(psnr(a, b) - peak_signal_noise_ratio(a, b, data_range=255)) < 1e-9
    assert ssim(a, a) == pytest.approx(1.0)


def test_confusion_scores_by_hand():
    from segsynth.jobs.eval_generator import Confusion

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
    from conftest import TINY_ADE_SPADE, make_spade_checkpoint

    make_spade_checkpoint(tmp_path / "g", **TINY_ADE_SPADE)
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


def test_dataset_from_photos_whole_and_multiscale_crops(tmp_path, real_photos):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "chelsea"):
        Image.fromarray(real_photos[name]).save(folder / f"{name}.png")
    crops, whole = tmp_path / "crops", tmp_path / "whole"
    proc = run_cli("dataset", "make", folder, "--out", crops, "--size", "64x48", "--crops-per-image", "3",
                   "--segmenter", "voc")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((crops / "manifest.json").read_text())
    assert [s["name"] for s in manifest["sources"]] == ["astronaut.png", "chelsea.png"]
    assert [i["source"] for i in manifest["items"]] == [0, 0, 0, 1, 1, 1]
    boxes = [i["crop"] for i in manifest["items"]]
    for box, item in zip(boxes, manifest["items"]):
        h, w = real_photos[manifest["sources"][item["source"]]["name"][:-4]].shape[:2]
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert abs((x1 - x0) / (y1 - y0) - 64 / 48) < 0.05  # the pair's shape, not stretched
    widths = [b[2] - b[0] for b in boxes]
    assert max(widths) > 1.2 * min(widths)  # several scales
    # the stored picture is that crop of the photo, resized
    x0, y0, x1, y1 = boxes[1]
    expected = np.asarray(Image.fromarray(real_photos["astronaut"][y0:y1, x0:x1]).resize((64, 48), Image.LANCZOS))
    stored = np.asarray(Image.open(crops / manifest["items"][1]["image"]))
    assert np.abs(stored.astype(int) - expected).mean() < 3
    again = tmp_path / "again"
    assert run_cli("dataset", "make", folder, "--out", again, "--size", "64x48", "--crops-per-image", "3",
                   "--segmenter", "voc").returncode == 0
    assert _digest(again) == _digest(crops)
    proc = run_cli("dataset", "make", folder / "chelsea.png", "--out", whole, "--size", "64x48", "--segmenter", "voc")
    assert proc.returncode == 0, proc.stderr
    items = json.loads((whole / "manifest.json").read_text())["items"]
    assert len(items) == 1 and items[0]["crop"] is None
    (folder / "notes.jpg").write_text("not a picture")
    proc = run_cli("dataset", "make", folder, "--out", tmp_path / "bad", "--size", "64x48", "--segmenter", "voc")
    assert proc.returncode != 0 and "notes.jpg: not a readable image" in proc.stderr
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.partial-*"))


def test_init_from_across_a_size_change_and_into_a_vae(dataset, people_clip, tmp_path):
    """A label-only 64 x 64 generator seeds a VAE one (its z layer made afresh), which seeds a
    128 x 128 VAE generator: the z -> features layer is upsampled, every other weight carried."""
    data128 = tmp_path / "pairs128"
    assert run_cli("dataset", "make", people_clip, "--out", data128, "--size", "128x128", "--every", "4",
                   "--segmenter", "voc").returncode == 0
    base, vae64, vae128 = tmp_path / "base", tmp_path / "vae64", tmp_path / "vae128"
    tiny = ["--config", "tiny", "--lambda-perceptual", "0"]
    assert run_cli("train", "--data", dataset, "--out", base, *tiny, "--steps", "2").returncode == 0
    proc = run_cli("train", "--data", dataset, "--out", vae64, *tiny, "--steps", "2", "--vae", "--init-from", base)
    assert proc.returncode == 0, proc.stderr
    assert "not a VAE generator" in proc.stderr and "no latest_net_E.pth" in proc.stderr
    proc = run_cli("train", "--data", data128, "--out", vae128, *tiny, "--steps", "1", "--vae", "--init-from", vae64)
    assert proc.returncode == 0, proc.stderr
    assert "resized from 2x2 to 4x4" in proc.stderr
    g64, g128 = (torch.load(d / "latest_net_G.pth", weights_only=True) for d in (vae64, vae128))
    assert g128["fc.weight"].shape == (4 * 4 * 64, 256) and g64["fc.weight"].shape == (2 * 2 * 64, 256)
    # nearest upsampling by hand: feature (c, y, x) of the 4x4 map is (c, y // 2, x // 2) of the 2x2 one
    w64 = g64["fc.weight"].numpy().reshape(64, 2, 2, 256)
    expected = w64.repeat(2, axis=1).repeat(2, axis=2).reshape(-1, 256)
    assert np.abs(g128["fc.weight"].numpy() - expected).max() < 1e-3  # one Adam step away
    for k in g64:
        if not k.startswith("fc.") and k.endswith(("weight", "weight_orig", "bias")):
            assert float((g128[k] - g64[k]).abs().max()) < 1e-3, k
    e64, e128 = (torch.load(d / "latest_net_E.pth", weights_only=True) for d in (vae64, vae128))
    trained = [k for k in e64 if k.endswith(("weight", "weight_orig", "bias"))]  # not the power-iterated u/v
    assert trained and max(float((e128[k] - e64[k]).abs().max()) for k in trained) < 1e-3


def test_perceptual_features_are_the_voc_models_own_activations():
    """The loss's MobileNetV2 activations equal onnxruntime's on the shipped VOC graph."""
    from importlib import resources

    import onnx
    import onnxruntime

    from segsynth.export.perceptual import TAPS, VOC_MODEL, PerceptualLoss

    path = str(resources.files("segsynth.models").joinpath(VOC_MODEL))
    model = onnx.load(path)
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in TAPS)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 513, 513)).astype(np.float32)
    reference = session.run(list(TAPS), {"image": x})
    loss = PerceptualLoss()
    ours = loss.net(image=torch.from_numpy(x))
    for tap, ref in zip(TAPS, reference):
        assert np.abs(ours[tap].numpy() - ref).max() < 1e-3 * max(1.0, np.abs(ref).max()), tap
    real = torch.from_numpy(x[:, :, :128, :128])
    fake = (real + 0.2 * torch.randn_like(real)).requires_grad_()
    value = loss(fake, real)
    value.backward()
    assert float(loss(real, real)) == 0.0 and float(value) > 0 and float(fake.grad.abs().sum()) > 0
