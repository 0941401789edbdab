import json
import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from timm_scan.training import PRESETS, Trainer, TrainConfig, epoch_metrics
from timm_scan.training.config import FLOAT32_MAX
from timm_scan.training.trainer import TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]


def config(data, out, **kwargs):
    base = dict(
        dataset=str(data), output_dir=str(out), model="test_resnet", input_size=32, crop_pct=1.0, val_size=16,
        epochs=2, anneal_epochs=1, batch_size=16, lr=0.05, num_workers=0,
    )
    return TrainConfig(**{**base, **kwargs})


class Interrupt(Exception):
    pass


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_parquet, tmp_path):
    full = Trainer(config(tiny_parquet, tmp_path / "full", num_workers=1)).fit()

    def kill_after_first_epoch(trainer, metrics):
        raise Interrupt

    cfg = config(tiny_parquet, tmp_path / "resumed", num_workers=1)
    with pytest.raises(Interrupt):
        Trainer(cfg, callbacks=[kill_after_first_epoch]).fit()
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["epoch_0001"]
    resumed = Trainer(cfg).fit()  # same command again

    a = load_file(tmp_path / "full" / "checkpoints" / "epoch_0002" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "epoch_0002" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.test == resumed.test
    lines = epoch_metrics(tmp_path / "resumed")
    assert [x.epoch for x in lines] == [1, 2]
    alpha, lam = PRESETS["default"]["alpha"], PRESETS["default"]["lam"]
    assert PRESETS["default"]["exit_reduction"] == "shallow-mean"  # the deepest's loss + the shallow ones' mean
    first, second = lines
    distilled = first.ce[-1] + statistics.mean((1 - alpha) * c + alpha * k + lam * h
                                               for c, k, h in zip(first.ce[:-1], first.kd[:-1], first.hint[:-1]))
    assert first.loss == pytest.approx(distilled) and all(k > 0 for k in first.kd[:-1])
    assert second.loss == pytest.approx(second.ce[-1] + statistics.mean(second.ce[:-1]))  # annealed: α = λ = 0
    assert full.test.samples == 32 and len(full.exit_macs) == 4


def test_checkpoints_are_pruned_and_best_is_safetensors(tiny_parquet, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = Trainer(config(tiny_parquet, tmp_path, epochs=3, keep_checkpoints=2)).fit()
    assert not [w for w in caught if "interrupted" in str(w.message)]  # a fresh run has nothing to clean up
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0002", "epoch_0003"]
    scan = json.loads((tmp_path / "best" / "scan_config.json").read_text())
    assert scan["scan_config"]["exits"] == [1, 2, 3] and "class_names" not in scan  # stored once: in timm's config
    timm_config = json.loads((tmp_path / "best" / "config.json").read_text())
    assert timm_config["architecture"] == "test_resnet" and timm_config["label_names"] == ["red", "green", "blue", "grey"]
    assert "| 1 | layer1 |" in (tmp_path / "best" / "README.md").read_text()  # card with the test table
    assert results.best_epoch in (1, 2, 3)


def test_baseline_is_the_plain_backbone(tiny_parquet, tmp_path):
    trainer = Trainer(config(tiny_parquet, tmp_path, epochs=1, baseline=True))
    assert trainer.accelerator.unwrap_model(trainer.model).num_exits == 1
    results = trainer.fit()
    assert results.exit_macs == [results.backbone_macs] and results.test.ensemble is None
    line = epoch_metrics(tmp_path)[0]
    assert line.loss == pytest.approx(line.ce[0])


def test_kd_from_an_external_teacher(tiny_parquet, tmp_path):
    teacher = timm.create_model("test_resnet", num_classes=4)
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    cfg = config(tiny_parquet, tmp_path / "run", epochs=1, teacher_model="test_resnet",
                 teacher_checkpoint=str(tmp_path / "teacher.safetensors"))
    trainer = Trainer(cfg)
    assert not any(p.requires_grad for p in trainer.external_teacher.parameters())
    assert trainer.fit().test.samples == 32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_column": "picture"}, "not in the dataset"),
        ({"image_column": "note"}, "not images"),
        ({"num_classes": 10}, "num_classes=10 but dataset .* has 4 classes"),
        ({"optimizer": "lion"}, "TrainConfig.optimizer"),
        ({"teacher_model": "test_resnet"}, "teacher_checkpoint"),
        ({"batch_size": 512}, "fewer than one batch of 512"),
        ({"momentum": 2}, "TrainConfig.momentum must be in"),
        ({"warmup_epochs": -3}, "TrainConfig.warmup_epochs"),
        ({"crop_pct": -1}, "TrainConfig.crop_pct"),
        ({"input_size": 0}, "TrainConfig.input_size"),
        ({"max_test_samples": 0}, "TrainConfig.max_test_samples"),
        ({"lr": float("inf")}, "TrainConfig.lr must be a number in"),
        ({"lr": 1000.0, "push_to_hub": "not a repo id/x"}, "TrainConfig.push_to_hub must be a Hub repo id"),
        ({"mixed_precision": "fp16"}, "needs a CUDA GPU"),
        ({"loss_preset": "paper"}, "TrainConfig.loss_preset"),
        ({"schedule": "step", "milestones": [2, 2], "gamma": 1e38}, r"TrainConfig.gamma must be in \(0, 1\]"),
        ({"schedule": "step", "milestones": [2, 2]}, "TrainConfig.milestones must be .* strictly increasing order"),
        ({"schedule": "step", "milestones": [1, 3]}, "TrainConfig.milestones must be .* each at most epochs=2"),
        ({"lr": 1e39}, r"TrainConfig.lr must be a number in \(0, 3.4e\+38\]"),
        ({"weight_decay": 1e39}, "TrainConfig.weight_decay must be a number in"),
        ({"optimizer": "adamw", "lr": 1e20, "weight_decay": 1e20}, r"TrainConfig.lr \* weight_decay must be at most"),
    ],
)
def test_bad_inputs_fail_before_training(tiny_parquet, tmp_path, kwargs, message):
    if kwargs.get("mixed_precision") == "fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is refused only where there is no GPU")
    with pytest.raises(ValueError, match=message):
        Trainer(config(tiny_parquet, tmp_path, **kwargs))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("kwargs", [
    {"schedule": "step", "milestones": [1, 2], "gamma": 1e-300},  # the LR underflows to 0 after epoch 1
    {"lr": FLOAT32_MAX, "weight_decay": FLOAT32_MAX},
    {"optimizer": "adamw", "lr": 1e19, "weight_decay": 1e19},
], ids=["tiny-gamma", "sgd-largest", "adamw-largest"])
def test_settings_at_the_limits_train_or_stop_as_diverged(tiny_parquet, tmp_path, kwargs):
    try:  # anything else (a RuntimeError of the optimizer's float32 arithmetic) fails the test
        assert Trainer(config(tiny_parquet, tmp_path, **kwargs)).fit().test.samples == 32
    except TrainingDiverged as exc:
        assert "another --output-dir" in str(exc)


def test_two_cpu_processes_are_one_data_parallel_job(tiny_parquet, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "tests" / "ddp_worker.py"), str(tiny_parquet), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["val_samples"] == report["val_size"] == 16  # gathered over both ranks, no duplicates
    assert report["train_batches_per_rank"] == 80 // 2 // 16  # each rank sees half of train
    assert report["weights_equal_across_ranks"]
    assert report["weights_changed"]


def test_gradient_accumulation_and_bf16(tiny_parquet, tmp_path):
    trainer = Trainer(config(tiny_parquet, tmp_path, epochs=1, grad_accum=2, mixed_precision="bf16"))
    results = trainer.fit()
    batches = len(trainer.train_loader)  # 80 train images / 16 = 5 batches
    assert trainer.scheduler.last_epoch == -(-batches // 2)  # one optimizer (and LR) step per 2 batches
    assert results.test.samples == 32
