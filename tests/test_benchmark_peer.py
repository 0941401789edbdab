"""benchmarks/peer_earlyon.py on a tiny budget: a 1-epoch run of ours, earlyon trained for 1 epoch beside it."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from timm_scan.training import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["peer_earlyon.py", *args])
    runpy.run_path(str(ROOT / "benchmarks" / "peer_earlyon.py"), run_name="__main__")


@pytest.fixture
def one_thread():
    """Timings are not the point here; one thread keeps the test quick on a busy machine too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_peer_earlyon(tiny_parquet, tmp_path, monkeypatch, capsys, one_thread):
    ours = tmp_path / "runs" / "ours"
    Trainer(TrainConfig(dataset=str(tiny_parquet), output_dir=str(ours), model="test_resnet", input_size=32,
                        crop_pct=1.0, val_size=24, epochs=1, anneal_epochs=0, batch_size=16, num_workers=0)).fit()
    out = tmp_path / "peer.json"
    args = ["--ours", str(ours), "--out", str(out), "--num-workers", "0", "--betas", "0.1", "10",
            "--earlyon-budgets", "0.5", "1", "--earlyon-drops", "0.01", "--latency-images", "16",
            "--latency-images-b1", "4", "--repeats", "1"]
    run_benchmark(monkeypatch, *args)

    report = json.loads(out.read_text())
    methods = report["methods"]
    assert list(methods) == ["timm-scan (SD)", "earlyon"] and report["exit_layers"] == ["layer1", "layer2", "layer3"]
    assert report["test_samples"] == 32 and report["val_samples"] == 24
    for m in methods.values():
        assert len(m["exit_macs"]) == len(m["test_exit_accuracy"]) == 4
        assert 0 < m["exit_macs"][0] < m["exit_macs"][-1] and all(0 <= a <= 1 for a in m["test_exit_accuracy"])
    # the backbone is the same timm model on both sides: its MACs bound earlyon's exits from below
    assert methods["earlyon"]["exit_macs"][-1] >= report["backbone_macs"] > methods["earlyon"]["exit_macs"][-2]
    rows = report["rows"]
    assert [r["setting"] for r in rows] == ["β=0.1", "β=10", "budget=0.5", "budget=1", "drop=0.01"]
    for r in rows:
        assert 0 <= r["val_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1 and r["test_macs"] > 0
        assert sum(r["test_exit_shares"]) == pytest.approx(1)
    # earlyon at budget 1 disables every exit: the plain backbone, at exactly its MACs
    assert rows[3]["enabled_exits"] == [False] * 3 and rows[3]["test_macs"] == report["backbone_macs"]
    assert rows[3]["test_accuracy"] == methods["earlyon"]["test_exit_accuracy"][-1]
    assert [(r["method"], r["batch_size"]) for r in report["latency"]] == [
        (m, b) for b in (1, 256) for m in ("plain timm backbone (our weights)", "timm-scan (SD)", "earlyon")]
    assert all(r["ms_per_image"] > 0 and 0 <= r["accuracy"] <= 1 and r["mean_macs"] > 0 for r in report["latency"])
    assert [r["images"] for r in report["latency"]] == [4] * 3 + [16] * 3
    assert [r["budget_fraction"] for r in report["equal_macs"]] == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    for name, m in methods.items():  # at 100% the deepest exit alone (the backbone) fits
        assert report["equal_macs"][-1][name] >= m["test_exit_accuracy"][-1]
    assert out.with_suffix(".png").is_file()
    weights = tmp_path / "runs" / "earlyon" / "model.safetensors"
    assert weights.is_file() and json.loads(weights.with_name("training.json").read_text())["best_epoch"] == 1
    assert "| MACs budget" in capsys.readouterr().out

    # a second run reuses earlyon's weights and reports the same numbers
    trained_at = weights.stat().st_mtime
    run_benchmark(monkeypatch, *args)
    assert "earlyon: loaded" in capsys.readouterr().out and weights.stat().st_mtime == trained_at
    assert json.loads(out.read_text())["rows"] == rows
    # a different recipe does not silently reuse them
    with pytest.raises(ValueError, match="--retrain"):
        run_benchmark(monkeypatch, *args, "--epochs", "2")
