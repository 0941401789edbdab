"""Nothing lost, nothing silent: interrupted runs, diverging runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from timm_scan.training import TrainConfig, Trainer, epoch_metrics, run_results
from timm_scan.training.trainer import TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "fault_worker.py"


def worker(data, out, *fault):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(WORKER), str(data), str(out), *map(str, fault)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tiny_parquet, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = worker(tiny_parquet, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def same_files(a: Path, b: Path, names=("model.safetensors", "scan_exits.safetensors")) -> bool:
    for name in names:
        x, y = load_file(a / name), load_file(b / name)
        if x.keys() != y.keys() or any(not (x[k] == y[k]).all() for k in x):
            return False
    return True


@pytest.mark.parametrize("point, count", [
    ("step", 3),          # in the middle of epoch 1, before any checkpoint
    ("step", 12),         # in the middle of epoch 3
    ("torch.save", 2),    # in the middle of epoch 1's checkpoint
    ("os.replace", 1),    # best/ written, not yet renamed in
    ("os.replace", 2),    # epoch 1's checkpoint written, not yet renamed in
    ("os.replace", 4),    # epoch 2: best/ renamed away, the new one not yet in
    ("checkpoint", 2),    # epoch 2's metrics line written, its checkpoint not
])
def test_a_killed_run_reruns_to_the_same_best_model(tiny_parquet, tmp_path, uninterrupted, point, count):
    killed = worker(tiny_parquet, tmp_path, point, count)
    assert killed.returncode == 9, killed.stderr[-3000:]  # it did die at that point
    rerun = worker(tiny_parquet, tmp_path)  # the same command again
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert same_files(tmp_path / "best", uninterrupted / "best")
    assert [m.epoch for m in epoch_metrics(tmp_path)] == [1, 2, 3]  # nothing lost, nothing twice
    assert run_results(tmp_path).test == run_results(uninterrupted).test
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0002", "epoch_0003"]
    assert not list(tmp_path.glob("best.*"))


def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(tiny_parquet, tmp_path, uninterrupted):
    assert worker(tiny_parquet, tmp_path, "step", 12).returncode == 9  # in epoch 3: checkpoints 1 and 2 exist
    (tmp_path / "checkpoints" / "epoch_0002" / "optimizer.bin").write_bytes(b"damaged")
    rerun = worker(tiny_parquet, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "cannot be loaded" in rerun.stderr and "resuming from the one before" in rerun.stderr
    assert same_files(tmp_path / "best", uninterrupted / "best")
    assert [m.epoch for m in epoch_metrics(tmp_path)] == [1, 2, 3]


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing_non_finite(tiny_parquet, tmp_path):
    cfg = TrainConfig(dataset=str(tiny_parquet), output_dir=str(tmp_path), model="test_resnet", input_size=32,
                      crop_pct=1.0, val_size=16, epochs=2, batch_size=16, lr=1e6, num_workers=0)
    with pytest.raises(TrainingDiverged, match="not finite|the loss is nan|the loss is inf"):
        Trainer(cfg).fit()
    if (tmp_path / "best").exists():
        assert all(t.isfinite().all() for t in load_file(tmp_path / "best" / "model.safetensors").values())


def test_the_command_exits_non_zero_when_training_diverges(tiny_parquet, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "timm_scan", "train", "--dataset", str(tiny_parquet), "--output-dir",
                           str(tmp_path), "--model", "test_resnet", "--input-size", "32", "--val-size", "16",
                           "--epochs", "1", "--batch-size", "16", "--lr", "1e6", "--num-workers", "0"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "timm-scan train: error:" in proc.stderr and "lower --lr" in proc.stderr
