import json
import runpy
import sys
from pathlib import Path

import pytest

import timm_scan
from timm_scan.commands.search import ThresholdRecord
from timm_scan.report import EarlyExitReport

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")


def test_train_cli_maps_flags_to_the_config(tiny_parquet, tmp_path, monkeypatch, capsys):
    run_example(
        "train.py", monkeypatch,
        "--dataset", str(tiny_parquet), "--output-dir", str(tmp_path), "--model", "test_resnet",
        "--input-size", "32", "--crop-pct", "1.0", "--train-scale", "0.5", "1", "--val-size", "0.25",
        "--exits", "layer1", "-3", "--attention", "scan", "--no-head-budget", "--epochs", "1", "--anneal-epochs", "0",
        "--batch-size", "16", "--num-workers", "0", "--schedule", "step", "--milestones", "1",
    )
    best = json.loads((tmp_path / "best" / "scan_config.json").read_text())
    assert best["scan_config"]["exits"] == [1, 2] and best["scan_config"]["attention"] == "scan"
    assert best["scan_config"]["head_budget"] is None and best["scan_config"]["head_channels"] is None
    assert "ensemble" in capsys.readouterr().out


def test_train_cli_rejects_a_bad_value(tiny_parquet, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run_example("train.py", monkeypatch, "--dataset", str(tiny_parquet), "--mixed-precision", "fp8")
    assert "TrainConfig.mixed_precision must be 'no', 'bf16' or 'fp16'; got 'fp8'" in capsys.readouterr().err


def test_inspect_exits(monkeypatch, capsys):
    run_example("inspect_exits.py", monkeypatch, "--model", "test_convnext", "--input-size", "64")
    out = capsys.readouterr().out
    assert "4 (deepest)" in out and out.count("stages.") == 4


def test_search_thresholds_then_evaluate(tiny_parquet, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run_example("train.py", monkeypatch, "--dataset", str(tiny_parquet), "--output-dir", str(run),
                "--model", "test_resnet", "--input-size", "32", "--crop-pct", "1.0", "--val-size", "24",
                "--epochs", "2", "--anneal-epochs", "0", "--batch-size", "16", "--num-workers", "0")
    run_example("search_thresholds.py", monkeypatch, str(run), "--betas", "0.1", "10", "--beta", "1",
                "--generations", "10")
    searched = ThresholdRecord.load(run / "thresholds.json")
    assert [p.beta for p in searched.sweep] == [0.1, 1.0, 10.0] and len(searched.thresholds) == 3
    assert (run / "outputs" / "val.safetensors").is_file() and (run / "tradeoff_val.png").is_file()
    assert not (run / "outputs" / "test.safetensors").exists()  # the search never reads test
    assert timm_scan.from_pretrained(run / "best").policy == searched.policy
    run_example("evaluate.py", monkeypatch, str(run), "--latency-images", "32", "--latency-images-b1", "4")
    report = EarlyExitReport.load(run / "evaluation.json")
    assert len(report.per_exit.exits) == 4 and len(report.exit_shares) == 4
    assert [t.batch_size for t in report.wall_clock] == [256, 1]
    assert (run / "tradeoff_test.png").is_file() and (run / "exit_shares.png").is_file()
    assert "agree on the exit of 100.0%" in capsys.readouterr().out


def test_search_for_a_target_drop(tiny_parquet, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run_example("train.py", monkeypatch, "--dataset", str(tiny_parquet), "--output-dir", str(run),
                "--model", "test_resnet", "--input-size", "32", "--crop-pct", "1.0", "--val-size", "24",
                "--epochs", "1", "--batch-size", "16", "--num-workers", "0")
    run_example("search_thresholds.py", monkeypatch, str(run), "--betas", "1", "--max-drop", "100",
                "--min-threshold", "0.3", "--generations", "5")
    record = ThresholdRecord.load(run / "thresholds.json")
    origin = record.policy.origin
    assert record.chosen.beta is None and (origin.objective, origin.value) == ("max_accuracy_drop", 1.0)  # points in
    assert record.min_threshold == 0.3 and origin.min_threshold == 0.3 and origin.samples == 24
    assert all(0.3 - 1e-9 <= t <= 1 for t in record.thresholds)
    assert record.chosen.accuracy >= record.baseline_accuracy - 1.0
    assert "kept accuracy at most 100 points below the deepest exit" in capsys.readouterr().out

    # a latency budget on calibrated confidences: temperatures and the measurement travel with the model
    run_example("search_thresholds.py", monkeypatch, str(run), "--betas", "1", "--budget-ms", "1000", "--calibrate",
                "--latency-batch-size", "4", "--generations", "5")
    record = ThresholdRecord.load(run / "thresholds.json")
    origin = record.policy.origin
    assert (origin.objective, origin.value, origin.cost_unit) == ("budget", 1000, "ms")
    assert record.latency.batch_size == 4 and len(record.policy.temperatures) == 4
    assert record.chosen.mean_cost <= 1000
    best = timm_scan.from_pretrained(run / "best")
    assert best.policy == record.policy and best.exit_latency == [record.latency]
    out = capsys.readouterr().out
    assert "calibrated: temperatures" in out and "kept at most 1000 ms per image at batch 4" in out
    run_example("evaluate.py", monkeypatch, str(run), "--latency-images", "8", "--latency-images-b1", "2")
    report = EarlyExitReport.load(run / "evaluation.json")
    assert report.target_held is True and report.policy == record.policy
    assert len(report.ece) == len(report.ece_calibrated) == 4
    assert "on test it holds" in capsys.readouterr().out
