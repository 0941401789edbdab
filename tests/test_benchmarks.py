"""Each benchmark script runs on a tiny budget, so none can rot (the real runs are in benchmarks/)."""

import json
import math
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import timm

import timm_scan
from timm_scan.training import PRESETS, Trainer, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def run(script, monkeypatch, *args) -> dict:
    """Runs ``script`` as ``__main__`` with ``args``; its globals."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    return runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")


def test_early_exit_speed(tmp_path, monkeypatch):
    out = tmp_path / "speed.json"
    run("early_exit_speed.py", monkeypatch, "--sizes", "32", "--batch-sizes", "1", "4", "--images", "8",
        "--repeats", "1", "--scenarios", "half", "all", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch_size"], r["scenario"]) for r in rows] == [(1, "half"), (1, "all"), (4, "half"), (4, "all")]
    assert all(r["input"] == 32 and r["images"] == 8 for r in rows)
    assert all(r["macs_speedup"] > 1 for r in rows)  # MACs are counted, not timed
    assert [r["share_at_exit1"] for r in rows if r["scenario"] == "all"] == [1.0, 1.0]
    # the timings are written, and the ratios are theirs (how large they are is benchmarks/' business)
    timed = ["backbone_ms_per_image", "early_exit_ms_per_image", "sections_only_ms_per_image", "measured_speedup",
             "bound_speedup", "ratio", "bound_ratio", "of_bound"]
    for r in rows:
        assert all(math.isfinite(r[key]) and r[key] > 0 for key in timed)
        assert r["measured_speedup"] == pytest.approx(r["backbone_ms_per_image"] / r["early_exit_ms_per_image"])
        assert r["bound_speedup"] == pytest.approx(r["backbone_ms_per_image"] / r["sections_only_ms_per_image"])
        assert r["of_bound"] == pytest.approx(r["measured_speedup"] / r["bound_speedup"])


def test_timm_coverage(tmp_path, monkeypatch):
    out = tmp_path / "coverage.json"
    run("timm_coverage.py", monkeypatch, "--models", "test_resnet", "crossvit_tiny_240", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["ok"] for r in rows] == [True, False] and "torch.fx" in rows[1]["refusal"]
    assert rows[0]["runner"] == "sequential" and rows[0]["exit_macs"] == sorted(rows[0]["exit_macs"])


def test_timm_coverage_picks_a_small_model_per_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from timm_coverage import pick_model
    finally:
        sys.path.pop(0)
    assert pick_model("resnet") == "resnet10t"


def test_staged_overhead(tmp_path, monkeypatch):
    out = tmp_path / "overhead.json"
    run("staged_overhead.py", monkeypatch, "--models", "test_resnet", "--batch-sizes", "1", "--images", "1",
        "--repeats", "1", "--out", str(out))
    row = json.loads(out.read_text())["rows"][0]
    assert row["runner"] == "sequential" and row["staged_ratio"] > 0 and row["noise_ratio"] > 0


def test_threshold_search_speed(monkeypatch, capsys):
    run("threshold_search_speed.py", monkeypatch)
    assert "median" in capsys.readouterr().out


@pytest.fixture(scope="module")
def bench_runs(tiny_parquet, tmp_path_factory):
    """The accuracy benchmark on a tiny budget: a baseline and a self-distilled run per loss preset."""
    runs = tmp_path_factory.mktemp("bench_runs")
    out = runs / "accuracy.json"
    with pytest.MonkeyPatch.context() as monkeypatch:
        run("accuracy.py", monkeypatch, "--dataset", str(tiny_parquet), "--runs-dir", str(runs), "--epochs", "1",
            "--anneal-epochs", "0", "--val-size", "16", "--batch-size", "16", "--num-workers", "0", "--out", str(out))
    return runs, json.loads(out.read_text())


def test_accuracy_then_reuse(bench_runs, monkeypatch, capsys):
    runs, report = bench_runs
    assert [r["exit"] for r in report["baseline"]["rows"]] == ["1 (deepest)"]
    sd = report["sd"]["rows"]
    assert [r["exit"] for r in sd] == ["1", "2", "3", "4 (deepest)", "ensemble"]
    assert all(a["macs"] < b["macs"] and a["params"] < b["params"] for a, b in zip(sd[:3], sd[1:4]))
    assert sd[3]["params"] == report["baseline"]["rows"][0]["params"]  # truncate(deepest) is the plain backbone
    assert report["variants"] == ["sd", "sd-tpami", "sd-released"]
    assert report["sd-released"]["settings"] == {"loss_preset": "released"} and report["baseline"]["loss"] is None
    for name, preset in (("sd", "default"), ("sd-tpami", "tpami"), ("sd-released", "released")):
        assert TrainConfig.load(runs / f"resnet18-{name}").loss_preset == preset
        assert report[name]["loss"] == PRESETS[preset]  # what the run trained with
    assert (runs / "accuracy.png").is_file()
    run("accuracy.py", monkeypatch, "--dataset", report["recipe"]["dataset"], "--runs-dir", str(runs), "--epochs", "1",
        "--anneal-epochs", "0", "--val-size", "16", "--batch-size", "16", "--out", str(runs / "again.json"))
    assert capsys.readouterr().out.count("reusing the finished run") == 4  # no second training


def test_accuracy_refuses_a_run_of_another_recipe(bench_runs, monkeypatch):
    runs, _ = bench_runs
    with pytest.raises(SystemExit, match="another recipe"):
        run("accuracy.py", monkeypatch, "--dataset", str(runs), "--runs-dir", str(runs), "--epochs", "2",
            "--anneal-epochs", "0", "--val-size", "16", "--out", str(runs / "again.json"))


def test_scalable_inference(bench_runs, monkeypatch, capsys):
    runs, _ = bench_runs
    out = runs / "scalable.json"
    run("scalable_inference.py", monkeypatch, "--sd", str(runs / "resnet18-sd"), "--baseline",
        str(runs / "resnet18-baseline"), "--betas", "0.1", "10", "--generations", "5", "--images-b1", "4",
        "--images-b256", "32", "--repeats", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert [r["beta"] for r in report["rows"]] == [0.1, 10]
    for r in report["rows"]:
        assert r["test_macs_speedup"] > 0 and 0 <= r["test_accuracy"] <= 100
        assert abs(sum(r["test_exit_shares"]) - 1) < 1e-6 and set(r["measured_speedup"]) == {"1", "256"}
    assert report["images_timed"] == {"1": 4, "256": 32} and out.with_suffix(".png").is_file()
    assert "plain backbone: test accuracy" in capsys.readouterr().out


def test_threshold_choices(bench_runs, monkeypatch):
    runs, _ = bench_runs
    out = runs / "choices.json"
    run("threshold_choices.py", monkeypatch, "--runs", str(runs / "resnet18-sd"), "--min-thresholds", "0.7", "0",
        "--max-drops", "100", "--betas", "1", "--seeds", "0", "--generations", "3", "--bootstrap", "5", "--out", str(out))
    report = json.loads(out.read_text())
    [result] = report["runs"]
    assert set(result["settings"]) == {"0.7/raw", "0/raw", "0.7/cal", "0/cal"}
    assert len(result["temperatures"]) == 4 and all(t > 0 for t in result["temperatures"])


def test_head_kinds(bench_runs, monkeypatch):
    runs, _ = bench_runs
    out = runs / "heads.json"
    run("head_kinds.py", monkeypatch, "--runs", str(runs / "resnet18-sd"), "--batch-sizes", "1", "4", "--images", "2",
        "8", "--betas", "0.1", "10", "--generations", "3", "--repeats", "1", "--out", str(out))
    [result] = json.loads(out.read_text())["runs"]
    assert result["head"] == "sepconv" and set(result["batches"]) == {"1", "4"}
    for batch in result["batches"].values():
        assert len(batch["latency"]["ms_per_image"]) == 4 and len(batch["rows"]) == 2
        assert all(r["measured_speedup"] > 0 and 0 <= r["test_accuracy"] <= 100 for r in batch["rows"])
    assert out.with_suffix(".png").is_file()


def test_training_overhead(tmp_path, monkeypatch):
    out = tmp_path / "overhead.json"
    run("training_overhead.py", monkeypatch, "--model", "test_resnet", "--batch-size", "4", "--steps", "2",
        "--warmup", "1", "--rounds", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report["median_step_seconds"]) == {"baseline", "self-distillation"} and report["steps_timed"] == 2
    assert report["forward_macs_per_image"]["self-distillation"] > report["forward_macs_per_image"]["baseline"]
    assert out.with_suffix(".png").is_file()


def test_cost_growth(tmp_path, monkeypatch):
    out = tmp_path / "growth.json"
    run("cost_growth.py", monkeypatch, "--batch-sizes", "1", "2", "--sizes", "32", "48", "--size-batch", "2",
        "--images", "4", "--repeats", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert [r["batch_size"] for r in report["batch"]] == [1, 2] and [r["input"] for r in report["input"]] == [32, 48]
    assert out.with_suffix(".png").is_file()


def test_exit_cost_breakdown(tmp_path, monkeypatch):
    out = tmp_path / "breakdown.json"
    run("exit_cost_breakdown.py", monkeypatch, "--calls", "2", "--repeats", "1", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["channels_last"] for r in rows] == [False, True]
    for r in rows:
        assert all(r[f"head {i} for inference"] > 0 and r[f"section {i}"] > 0 for i in range(3))
        assert len(r["exit 1 separable convs"]) == 7  # SD attention + three SepConv blocks of two


def test_self_distillation_grid(tiny_parquet, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sd.json"
    args = ["--setting", "cifar10-10k", "--variants", "baseline", "default", "no-t2", "--seeds", "0", "1",
            "--dataset", str(tiny_parquet), "--epochs", "1", "--max-train-samples", "80", "--val-size", "16",
            "--batch-size", "16", "--num-workers", "0", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]
    run("self_distillation.py", monkeypatch, *args)
    report = json.loads(out.read_text())
    default, no_t2 = report["results"]["0.1"]["default"], report["results"]["0.1"]["no-t2"]
    assert default["seeds"] == [0, 1] and len(default["summary"]["deepest"]["values"]) == 2
    assert default["loss"]["t_squared"] is True and no_t2["loss"]["t_squared"] is False
    assert set(default["summary"]) == {"exit1", "exit2", "exit3", "deepest", "ensemble"}
    assert "| no-t2 | 0.1 | 2 |" in capsys.readouterr().out
    sd = run("self_distillation.py", monkeypatch, *args)  # finished runs are reused, not trained again
    assert "epoch 1" not in capsys.readouterr().out
    gains = sd["gains"](report)["0.1"]
    base = report["results"]["0.1"]["baseline"]["runs"][1]["test"]["exits"][-1]
    assert gains["exit1"][1] == pytest.approx(100 * (default["runs"][1]["test"]["exits"][0] - base))
    run("self_distillation.py", monkeypatch, "--plot", str(tmp_path / "sd.png"), "--reports", str(out))
    assert (tmp_path / "sd.png").stat().st_size > 0


def test_from_weights(tiny_parquet, tmp_path, monkeypatch, capsys):
    baseline = tmp_path / "baseline"
    Trainer(TrainConfig(dataset=str(tiny_parquet), output_dir=str(baseline), model="test_resnet", input_size=32,
                        crop_pct=1.0, val_size=16, epochs=1, batch_size=16, num_workers=0, baseline=True)).fit()
    out = tmp_path / "from_weights.json"
    run("from_weights.py", monkeypatch, "--baseline", str(baseline), "--epochs", "1", "--out", str(out))
    report = json.loads(out.read_text())
    frozen, finetuned = report["modes"]["frozen"], report["modes"]["finetuned"]
    assert frozen["test"]["exits"][-1] == report["baseline"]["test"]["exits"][0]  # frozen: the deepest unchanged
    assert finetuned["config"]["lr"] == pytest.approx(0.1 * frozen["config"]["lr"])
    assert "no_loss" in frozen and len(frozen["exit_macs"]) == 4
    continued = report["modes"]["continued"]  # the control: plain training, finetuned's epochs and lr
    assert len(continued["test"]["exits"]) == 1 and "no_loss" not in continued
    assert continued["config"]["lr"] == finetuned["config"]["lr"]


def test_onnx_export(tmp_path, monkeypatch):
    out = tmp_path / "onnx.json"
    run("onnx_export.py", monkeypatch, "--batch-sizes", "4", "--repeats", "1", "--images", "64", "--head", "pooled",
        "--out", str(out))
    row = json.loads(out.read_text())["speed"][0]
    assert row["head"] == "pooled"
    assert set(row["ms_per_image"]) == {"onnx backbone", "onnx early exit", "onnx sections in turn", "onnx graphs in turn",
                                      "torch backbone", "torch early exit"}
    assert all(math.isfinite(ms) and ms > 0 for ms in row["ms_per_image"].values())
    assert row["macs_speedup"] > 1 and 0.3 < row["share_at_exit1"] < 0.7


def test_onnx_export_coverage(tmp_path, monkeypatch):
    out = tmp_path / "onnx_coverage.json"
    run("onnx_export.py", monkeypatch, "--families", "test_resnet", "--sizes", "--out", str(out))
    record = json.loads(out.read_text())
    [row] = record["coverage"]
    assert record["speed"] == []
    assert row["exported"] and row["same_exits"] and row["same_labels"] and row["input"] == 32


def test_certified_thresholds(tmp_path, monkeypatch):
    """Validity on the known distribution, then the real-output mode on the run this test makes (its
    cached validation and test outputs re-split)."""
    out = tmp_path / "cert.json"
    run("certified_thresholds.py", monkeypatch, "--draws", "5", "--sizes", "300", "--epsilons", "0.05", "--deltas",
        "0.2", "--population", "5000", "--generations", "3", "--out", str(out), "--plot", str(tmp_path / "cert.png"))
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["epsilon"], row["delta"], row["n"], row["draws"]) == (0.05, 0.2, 300, 5)
    assert 0 <= row["violation_frequency"] <= 1 and 0 <= row["certified_share"] <= 1 and row["candidates"] >= 1
    assert row["mean_certified_speedup"] > 0 and "certified_thresholds.py" in result["command"]
    assert (tmp_path / "cert.png").stat().st_size > 0
    import torch
    from safetensors.torch import save_file

    run_dir = tmp_path / "fake-run"  # a run's cached outputs and MACs, as training and evaluate leave them
    (run_dir / "outputs").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("val", 60), ("test", 90)):
        labels = torch.randint(0, 5, (n,), generator=g)
        save_file({**{f"probs_exit{i + 1}": torch.softmax(torch.randn(n, 5, generator=g) + 2.0 * (i + 1)
                                                          * torch.nn.functional.one_hot(labels, 5), -1)
                      for i in range(3)}, "labels": labels}, str(run_dir / "outputs" / f"{split}.safetensors"))
    (run_dir / "results.json").write_text(json.dumps({"exit_macs": [10, 20, 31], "backbone_macs": 30}))
    run("certified_thresholds.py", monkeypatch, "--runs", str(run_dir), "--splits", "2", "--epsilons", "0.1",
        "--deltas", "0.2", "--generations", "3", "--search-shares", "0.3", "0.5", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["search_share"] for r in rows] == [0.3, 0.5] and all(r["fit_samples"] == 100 for r in rows)
    for row in rows:
        assert (row["splits"], row["samples"]) == (2, 150) and 0 <= row["violation_frequency"] <= 1
        assert row["mean_speedup"] > 0 and row["uncertified_mean_speedup"] > 0 and len(row["speedups"]) == 2
    # the run's pool as the population, with a mean-cost budget beside the accuracy drop
    run("certified_thresholds.py", monkeypatch, "--runs", str(run_dir), "--as-population", "--draws", "4", "--sizes",
        "60", "--epsilons", "0.1", "--deltas", "0.2", "--budgets", "0.8", "--generations", "3", "--out", str(out),
        "--plot", str(tmp_path / "pool.png"))
    drop, cost = json.loads(out.read_text())["rows"]
    assert (drop["risk"], cost["risk"]) == ("accuracy_drop", "mean_cost") and drop["population"] == str(run_dir)
    assert cost["budget"] == pytest.approx(24.0) and 10 <= cost["mean_true_cost"] <= 31
    assert cost["violation_frequency"] <= 1 and (tmp_path / "pool.png").stat().st_size > 0


def test_fuzz_folders(tmp_path, monkeypatch):
    """Both targets on 6 cases each: every case counted once, per kind and by outcome, and each finding listed
    (and its folder kept; with ``--slow 0`` every refusal is one)."""
    out, kept = tmp_path / "fuzz.json", tmp_path / "findings"
    run("fuzz_folders.py", monkeypatch, "--cases", "6", "--slow", "0", "--keep-cases", "--keep-findings", str(kept),
        "--out", str(out))
    result = json.loads(out.read_text())
    assert "fuzz_folders.py" in result["command"] and result["date"] and result["machine"]
    cases = result.pop("all_cases")
    works = {"from_pretrained": "loaded", "onnx": "answered"}
    assert result["cases"] == {"from_pretrained": 6, "onnx": 6} and len(cases) == 12
    for target, done in works.items():
        mine = [c for c in cases if c["target"] == target]
        outcomes = {c["outcome"] for c in mine}
        assert result["outcomes"][target] == {o: sum(c["outcome"] == o for c in mine) for o in outcomes}
        rows = [r for r in result["per_kind"] if r["target"] == target]
        assert sum(r["cases"] for r in rows) == 6 and {r["kind"] for r in rows} == {c["kind"] for c in mine}
        assert all(r["refused"] + r[done] + r["other"] == r["cases"] for r in rows)
        assert sum(r["refused"] for r in rows) == result["outcomes"][target].get("ValueError", 0)
    assert result["findings"] == [c for c in cases if c["finding"]]
    assert all(c["finding"] for c in cases if c["outcome"] == "ValueError") and result["findings"]
    assert all(c["finding"] for c in cases if c["outcome"] not in ("ValueError", works[c["target"]]))
    assert result["not_named"] == [c for c in cases if c["outcome"] == "ValueError" and not c["named"]]
    assert result["slowest"][0]["seconds"] == max(c["seconds"] for c in cases)
    assert 0 < result["memory"]["peak_rss_mb_before_cases"] <= result["memory"]["peak_rss_mb"]
    assert all(c["rss_increase_mb"] >= 0 for c in cases)
    assert sorted(p.name for p in kept.iterdir()) == sorted(f"{c['target']}-{c['case']}" for c in result["findings"])


def test_decision_rules(bench_runs, monkeypatch):
    runs, _ = bench_runs
    out = runs / "rules.json"
    bench = run("decision_rules.py", monkeypatch, "--runs", str(runs / "resnet18-sd"), "--seeds", "0", "--out", str(out))
    report = json.loads(out.read_text())
    assert [r["rule"] for r in report["rows"]] == list(bench["RULES"])
    assert all(set(r) >= {"no-loss", "0.005", "0.01", "0.02"} for r in report["rows"])
    probs = [bench["torch"].softmax(bench["torch"].randn(5, 3), -1) for _ in range(3)]
    own, mean = bench["decide"](probs, "own"), bench["decide"](probs, "running mean")
    assert all(a is b for a, b in zip(own, probs))  # Algorithm 1's rule
    assert bench["torch"].allclose(mean[1], (probs[0] + probs[1]) / 2) and mean[-1] is probs[-1]  # deepest its own


def test_head_budget(bench_runs, monkeypatch, tmp_path):
    runs, _ = bench_runs
    out = tmp_path / "heads.json"
    bench = run("head_budget.py", monkeypatch, "--train", str(runs / "resnet18-sd"), "--designs", "w32-none",
                "--epochs", "1", "--batch-size", "16",
        "--root", str(tmp_path / "runs"), "--latency", "test_resnet", "--batch-sizes", "1", "--repeats", "1",
        "--out", str(out))
    report = json.loads(out.read_text())
    row = report["designs"]["w32-none"]
    assert row["scan_config"]["head_channels"] == 32 and row["scan_config"]["attention"] == "none"
    assert TrainConfig.load(tmp_path / "runs" / "resnet18-sd" / "w32-none").freeze_backbone
    assert set(row) >= {"no_loss", "one_point"} and len(row["test"]["exits"]) == 4
    # no thresholds beat the oracle bound on the split they were searched on
    assert row["bound"]["val_speedup"] >= row["no_loss"]["val_speedup"] - 1e-9
    torch, costs = bench["torch"], timm_scan.ExitCosts.macs([1, 2, 4], 4)
    labels = torch.arange(4)
    answers = lambda *preds: [torch.nn.functional.one_hot(torch.tensor(p), 4).float() for p in preds]  # noqa: E731
    # each sample at its first right exit (1, 1, 2, 4 MACs); the deepest exit gets two right, the oracle four, so
    # the two costliest right samples may leave wrong at exit 1: every sample at 1 MAC
    assert bench["no_loss_bound"](answers([0, 1, 0, 0], [0, 1, 2, 0], [1, 0, 2, 3]), labels, costs) == 4.0
    # only the deepest exit is ever right: everything runs to the end
    assert bench["no_loss_bound"](answers([1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 2, 3]), labels, costs) == 1.0
    # exit 2 alone gets sample 0 right beside the deepest's four: 3 runs to the end, 1 leaves at 2 MACs
    assert bench["no_loss_bound"](answers([1, 0, 1, 1], [0, 0, 1, 1], [0, 1, 2, 3]), labels, costs) == 4 / (
        (2 + 4 + 4 + 4) / 4)
    # one right answer to spare (four right against the deepest's three): only the costliest right sample
    # (4 MACs, saving 3) leaves wrong at exit 1; the sample no exit gets right leaves at exit 1 too
    five = torch.tensor([0, 1, 2, 3, 0])
    answers5 = [torch.nn.functional.one_hot(torch.tensor(p), 4).float()
                for p in ([0, 0, 0, 0, 1], [0, 1, 0, 0, 1], [0, 0, 2, 3, 1])]
    assert bench["no_loss_bound"](answers5, five, costs) == pytest.approx(4 / ((1 + 2 + 4 + 4 + 1 - 3) / 5))
    [timed] = report["latency"]
    default, papers = timed["designs"]["default"], timed["designs"]["papers"]
    assert papers["scan_config"]["attention"] == "sd" and papers["scan_config"]["head_budget"] is None
    assert default["exit_macs"][-1] < papers["exit_macs"][-1]  # cheaper heads
    assert len(default["latency"]["1"]["ms_per_image"]) == 4


def test_exit_positions(bench_runs, monkeypatch, tmp_path):
    runs, _ = bench_runs
    out = tmp_path / "positions.json"
    root = tmp_path / "runs"
    args = ["--train", str(runs / "resnet18-sd"), "--epochs", "1", "--batch-size", "16", "--max-subset", "2",
            "--root", str(root), "--out", str(out)]
    bench = run("exit_positions.py", monkeypatch, *args, "--wall-clock", "32")
    report = json.loads(out.read_text())
    proposal = report["proposal"]
    assert set(report["designs"]) == {"stage-ends", "proposed", "candidates"}
    candidates = report["designs"]["candidates"]["scan_config"]
    assert candidates["exits"] == [p["entry"] for p in proposal["positions"]] and "layer2.0" in candidates["exits"]
    assert report["designs"]["proposed"]["scan_config"]["exits"] == proposal["proposed"]
    assert all(row["scan_config"]["head_channels"] == proposal["head_channels"] for row in report["designs"].values())
    narrowed = report["narrowed"]
    assert all(1 <= len(k.split(",")) <= 2 for k in narrowed["subsets"])
    assert set(narrowed["rows"]) == {"stage ends", "proposed", "best on validation"}
    assert narrowed["rows"]["stage ends"]["exits"] == proposal["stage_ends"]
    assert narrowed["subsets"][",".join(map(str, narrowed["best"]))] == max(narrowed["subsets"].values())
    assert [w["batch_size"] for w in narrowed["rows"]["proposed"]["no_loss"]["wall_clock"]] == [256, 1]
    assert all(set(row["running_mean"]) == {"no_loss", "one_point"} for row in narrowed["rows"].values())
    assert set(report["designs"]["stage-ends"]["running_mean"]) == {"no_loss", "one_point"}
    for row in [*report["designs"].values(), *narrowed["rows"].values()]:  # the oracle bound is never beaten
        assert row["bound"]["val_speedup"] >= row["no_loss"]["val_speedup"] - 1e-9
    # the ablation reads these runs and head_budget.py's (stand-ins here: copies of the stage ends run)
    for design in ("papers", "w128-none", "w128-sd", "w32-none"):
        shutil.copytree(root / "resnet18-sd" / "stage-ends", tmp_path / "heads" / "resnet18-sd" / design)
    ablation = tmp_path / "ablation.json"
    run("ablation.py", monkeypatch, "--base", str(runs / "resnet18-sd"), "--positions", str(out), "--heads-root",
        str(tmp_path / "heads"), "--positions-root", str(root), "--out", str(ablation))
    rows = json.loads(ablation.read_text())["rows"]
    assert [Path(r["run"]).name for r in rows] == ["papers", "stage-ends", "w128-none", "w128-sd", "w32-none",
                                                    "proposed", "candidates"]
    assert all(set(r["rules"]) == {"own", "running-mean"} for r in rows)

    def points(row):  # the operating points of an exit_positions.py row, without its timings
        return {t: {k: v for k, v in row[t].items() if k != "wall_clock"} for t in ("no_loss", "one_point")}

    assert rows[1]["rules"]["own"] == points(report["designs"]["stage-ends"])
    best = narrowed["rows"]["best on validation"]
    assert rows[-1]["keep"] == narrowed["best"] and rows[-1]["exits"] == best["exits"]
    assert rows[-1]["rules"]["running-mean"] == best["running_mean"] and rows[-1]["test_exits"] == best["test_exits"]
    assert rows[-1]["rules"]["own"] == points(best)
    # a rerun reuses the proposal measured first (the runs trained with it are reused as head_budget.py's are)
    designs, again = bench["designs"](None, None, root / "resnet18-sd" / "proposal.json")
    assert again == proposal and designs["proposed"]["exits"] == proposal["proposed"]
    assert bench["flags"](designs["proposed"])[1:1 + len(proposal["proposed"])] == list(map(str, proposal["proposed"]))


def test_exit_positions_from_scratch(tiny_parquet, monkeypatch, tmp_path):
    """``--scratch``: each design trained from scratch, backbone and exits together, under a recipe of
    self_distillation.py; the candidates narrowed as on a frozen backbone."""
    out = tmp_path / "scratch.json"
    run("exit_positions.py", monkeypatch, "--scratch", "cifar10-10k", "--seed", "1", "--dataset", str(tiny_parquet),
        "--epochs", "1", "--max-train-samples", "64", "--val-size", "16", "--batch-size", "16", "--num-workers", "0",
        "--max-subset", "1", "--root", str(tmp_path / "runs"), "--out", str(out))
    report = json.loads(out.read_text())
    assert report["recipe"]["name"] == "cifar10-10k" and report["recipe"]["epochs"] == 1 and report["seed"] == 1
    for name, row in report["designs"].items():
        config = json.loads((tmp_path / "runs" / "cifar10-10k-seed1" / name / "train_config.json").read_text())
        assert not config["freeze_backbone"] and config["init_from"] is None and config["seed"] == 1
        assert config["loss_preset"] == "default" and config["attention"] == "none"
        assert row["scan_config"]["exits"] == config["exits"]
    width = timm_scan.wrap(timm.create_model("resnet18", num_classes=4), check_input_size=(3, 32, 32)).config.head_channels
    assert report["recipe"]["num_classes"] == 4 and report["proposal"]["head_channels"] == width  # tiny_parquet: 4
    positions = report["proposal"]["positions"]
    assert report["designs"]["candidates"]["scan_config"]["exits"] == [p["entry"] for p in positions]
    assert all(len(k.split(",")) == 1 for k in report["narrowed"]["subsets"])
    # one design alone (its run reused): no candidates, so nothing is narrowed
    run("exit_positions.py", monkeypatch, "--scratch", "cifar10-10k", "--seed", "1", "--dataset", str(tiny_parquet),
        "--epochs", "1", "--max-train-samples", "64", "--val-size", "16", "--batch-size", "16", "--num-workers", "0",
        "--designs", "stage-ends", "--root", str(tmp_path / "runs"), "--out", str(out))
    alone = json.loads(out.read_text())
    assert list(alone["designs"]) == ["stage-ends"] and "narrowed" not in alone
    assert alone["designs"]["stage-ends"]["test"] == report["designs"]["stage-ends"]["test"]


def test_serve_load_client_and_its_summary():
    """The load client of ``serve_load.py`` against a stand-in service (aiohttp on 127.0.0.1, no Ray and no
    model): Poisson arrivals, one image or a batch a request, statuses, and the figures made of them."""
    import asyncio
    import base64

    from aiohttp import web

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import serve_load
    finally:
        sys.path.pop(0)
    bodies, labels = [b"img0", b"img1", b"img2"], [0, 1, 2]

    async def predict(request):
        body = await request.read()
        if body.startswith(b"\xff\xd8"):
            return web.json_response({"error": "not an image"}, status=400)
        return web.json_response({"label": int(body[-1:]), "exit": 1})

    async def predict_batch(request):
        images = [base64.b64decode(i) for i in (await request.json())["images"]]
        return web.json_response({"answers": [{"label": 0, "exit": int(i[-1:])} for i in images]})

    async def measure(per_request, fault):
        app = web.Application()
        app.add_routes([web.post("/predict", predict), web.post("/predict_batch", predict_batch)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            return await serve_load.open_loop(f"http://127.0.0.1:{port}", bodies, 200, 0.2, 30, 10, seed=0, fault=fault,
                                              per_request=per_request)
        finally:
            await runner.cleanup()

    records = asyncio.run(measure(1, True))
    assert 10 <= len(records) <= 30 and [r["i"] for r in records] == list(range(len(records)))
    assert all((r["status"] == 400) == r["malformed"] for r in records) and sum(r["malformed"] for r in records) >= 1
    row = serve_load.summary(records, labels, 200, 0.2, 3)
    assert row["accuracy"] == 1.0 and row["answered_share"] == 1.0 and row["exit_shares"] == [0, 1, 0]
    assert row["statuses"]["200"] + row["statuses"]["400"] == len(records) and row["p50_ms"] <= row["p99_ms"]
    batched = serve_load.summary(asyncio.run(measure(4, False)), labels, 200, 0.2, 3)
    assert batched["accuracy"] == pytest.approx(1 / 3, abs=0.1) and batched["exit_shares"][1] == pytest.approx(1 / 3, abs=0.1)
    rows = [{"offered_per_s": r, "p99_ms": p, "answered_share": a} for r, p, a in [(1, 10, 1), (2, 600, 1), (3, 20, 0.5)]]
    assert serve_load.sustained(rows, 500) == 1 and serve_load.sustained(rows, 1000) == 2
