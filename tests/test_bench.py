"""The quick benchmark variant: every scenario runs from the installed package and reports
stable JSON with the machine and the same-run ratios."""

import json
import types

import pytest

from segsynth.core.grammar import FAST_SEG_SIZE

from conftest import REPO, run_cli


def test_quick_bench_reports_every_scenario(tmp_path, tiny_generator):
    """Plumbing: a tiny 64 x 64 generator (the default one at 1.6 fps made this test 5 minutes long)."""
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = run_cli("bench", "--frames", "50", "--size", "320x240", "--repeats", "1", "--segmenter", "voc",
                   "--generator", tiny_generator, "--streams", "2", "--batch", "1,2", "--live-seconds", "6",
                   "--json", out, "--plot", png, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["version"] == 1
    assert {"cpu", "cores", "versions", "gpus"} <= set(report["machine"])
    assert set(report["scenarios"]) == {"engine", "stages", "pipeline", "fused", "passthrough", "streams", "soak"}
    fused = report["scenarios"]["fused"]  # the one graph vs the models one by one, on the CPU: the same results
    assert fused["backend"] == "onnxruntime" and fused["label_agreement"] == 1.0 and fused["pixels_max_abs_diff"] == 0
    for key in ("pipeline_over_infer", "pipeline_over_sequential", "passthrough_over_ffmpeg", "fused_over_separate"):
        assert report["ratios"][key] > 0, key
    assert [r["batch"] for r in report["scenarios"]["engine"]["rows"] if r["model"] == "segmenter"] == [1, 2]
    assert [r["streams"] for r in report["scenarios"]["streams"]["rows"]] == [1, 2]
    live = report["scenarios"]["streams"]["live"]
    assert set(live) == {"latest", "lossless"} and all(d["frames_out"] > 0 for d in live.values())
    # the voc segmenter is slower than the 30 fps source: lossless latency grows, latest less so
    ratios = report["ratios"]
    assert ratios["live_lossless_p99_last_over_first"] > ratios["live_latest_p99_last_over_first"] > 0
    assert report["scenarios"]["pipeline"]["frames"] == 50 and report["scenarios"]["soak"]["frames"] == 50
    assert png.stat().st_size > 10_000
    assert "ratios (same run)" in proc.stderr and "machine:" in proc.stderr


def test_bench_rejects_unknown_scenarios():
    proc = run_cli("bench", "warp-speed")
    assert proc.returncode != 0 and "unknown scenario 'warp-speed'" in proc.stderr


@pytest.mark.slow  # the chain export alone takes about 45 s on two cores; about 70 s in all
def test_chain_on_the_cpu_times_enough_batches_by_wall_clock(tmp_path):
    """The chain scenario on onnxruntime CPU: no device clock, so wall time; FP32 (not TF32)."""
    pytest.importorskip("torch", reason="the chain scenario exports with torch (segsynth[export])")
    from segsynth.benchmarks.scenarios import BenchConfig, Job, chain

    cfg = BenchConfig(scenarios=("chain",), batch=(1,), repeats=1, workdir=tmp_path, chain_size=(64, 32))
    result = chain(Job(cfg, tmp_path, types.SimpleNamespace(backend="onnxruntime"), None, "labels"))
    rows = result["rows"]
    assert [r["double_buffered"] for r in rows] == [False, True]
    for r in rows:
        assert r["precision"] == "fp32" and r["clock"] == "wall", r
        assert r["batches"] >= 20 and r["batches"] * r["ms_per_batch"] >= 1000, r  # enough batches and time
    assert "ratios" not in result  # one precision on the CPU: nothing to compare


def test_transcode_scenario_compares_one_and_two_workers(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "transcode", "--frames", "60", "--size", "160x120", "--segmenter", "voc",
                   "--generator", "none", "--json", out, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())["scenarios"]["transcode"]
    assert [r["jobs"] for r in result["rows"]] == [1, 2]
    assert [r["workers_loading"] for r in result["rows"]] == [1, 2]  # the models load once per worker
    for r in result["rows"]:
        assert r["files"] == 6 and r["frames"] == 60 and r["fps"] > 0 and r["first_frame_s"] > 0, r
    assert result["ratios"]["transcode_jobs2_over_jobs1"] > 0


def test_bench_tiers_compares_quality_and_fast_on_the_same_input(tmp_path):
    out = tmp_path / "tiers.json"
    proc = run_cli("bench", "tiers", "--input", REPO / "examples" / "demo.mp4", "--frames", "12", "--repeats", "1",
                   "--json", out, timeout=600)
    assert proc.returncode == 0, proc.stderr
    tiers = json.loads(out.read_text())["scenarios"]["tiers"]
    assert tiers["fast_seg_size"] == FAST_SEG_SIZE and tiers["frames"] >= 12
    assert tiers["quality_fps"] > 0 and tiers["fast_fps"] > 0 and tiers["ratios"]["fast_over_quality"] > 0
    assert 0.8 < tiers["label_agreement"] < 1.0 and 15 < tiers["synth_psnr_db"] < 60  # close, not the same models
    # each tier's synth view against its labels view with no generator loaded (same input), and the
    # generators' cost: the bundled student, 2.7 GFLOP a frame in both graphs (quantising keeps them)
    assert set(tiers["synth_over_labels"]) == {"quality", "fast"} and all(
        0 < r < 1.5 for r in tiers["synth_over_labels"].values())
    assert {g["graph"] for g in tiers["generator"].values()} == {"student_ade20k.onnx", "student_ade20k.int8.onnx"}
    assert all(2 < g["gflop"] < 3.5 and g["ms_per_frame"] > 0 for g in tiers["generator"].values())


def test_bench_cpu_efficiency_and_seg_sizes(tmp_path):
    out = tmp_path / "cpu.json"
    proc = run_cli("bench", "cpu-efficiency", "seg-sizes", "--input", REPO / "examples" / "demo.mp4", "--repeats", "1",
                   "--json", out, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())["scenarios"]
    eff = report["cpu-efficiency"]
    assert eff["peak"]["fp32_gflops"] > 1 and eff["peak"]["int8_gops"] > 1
    rows = {r["model"]: r for r in eff["rows"]}
    assert {"ade20k fp32", "ade20k int8", "ade20k fast int8", "voc fp32", "generator int8"} <= set(rows)
    # the FLOPs come from the graph: quantising keeps them, the fast tier's input scales them by about
    # (FAST_SEG_SIZE / 513)^2
    assert rows["ade20k int8"]["gflops_per_frame"] == rows["ade20k fp32"]["gflops_per_frame"] > 5
    scaled = rows["ade20k fast int8"]["gflops_per_frame"] / rows["ade20k fp32"]["gflops_per_frame"]
    assert abs(scaled - (FAST_SEG_SIZE / 513) ** 2) < 0.08, scaled
    assert all(0 < r["percent_of_peak"] for r in eff["rows"])
    sizes = report["seg-sizes"]["rows"]
    assert len(sizes) == 2 * 2 * 2 * 4
    first = [r for r in sizes if r["model"] == "ade20k"][0]
    assert (first["size"], first["int8"], first["argmax_first"], first["label_agreement"]) == (513, False, False, 1.0)
    assert all(0.8 < r["label_agreement"] <= 1.0 for r in sizes)
