"""The timm-scan command: flags generated from the config dataclasses, trackers, and module execution."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from timm_scan.cli import main
from timm_scan.commands.evaluate import EvaluateConfig
from timm_scan.commands.inspect import InspectConfig
from timm_scan.commands.push import PushConfig
from timm_scan.commands.search import SearchConfig
from timm_scan.training import TrainConfig, Trainer, epoch_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"train": TrainConfig, "search": SearchConfig, "evaluate": EvaluateConfig, "push": PushConfig,
           "inspect": InspectConfig}


@pytest.mark.parametrize("command", list(CONFIGS))
def test_every_field_is_a_flag_with_its_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in dataclasses.fields(CONFIGS[command]):
        assert f.metadata["help"], f"{command}: {f.name} has no help"
        flag = f.name if f.metadata.get("positional") else "--" + f.name.replace("_", "-")
        assert flag in text and " ".join(f.metadata["help"].split()) in text, f.name


def test_flags_are_typed_from_the_annotations(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("timm_scan.training.trainer.Trainer.__init__", lambda self, cfg: seen.update(cfg=cfg))
    monkeypatch.setattr("timm_scan.training.trainer.Trainer.fit", lambda self: None)
    main(["train", "--dataset", "d", "--val-size", "500", "--train-scale", "0.5", "1", "--exits", "layer1", "-2",
          "--no-t-squared", "--alpha", "0.4", "--milestones", "3", "6", "--freeze-backbone"])
    cfg = seen["cfg"]
    assert cfg.val_size == 500 and isinstance(cfg.val_size, int) and cfg.train_scale == (0.5, 1.0)
    assert cfg.exits == ["layer1", -2] and cfg.t_squared is False and cfg.hint_nearest is None
    assert cfg.alpha == 0.4 and cfg.milestones == [3, 6] and cfg.freeze_backbone and cfg.lam is None


def test_a_bad_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--dataset", "d", "--loss-preset", "paper"])
    assert exit_.value.code == 2
    assert "loss_preset must be one of ['default', 'released', 'tpami']; got 'paper'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["search", "run", "--rule", "vote"])
    assert exit_.value.code == 2
    assert "rule must be one of ('own', 'running-mean'); got 'vote'" in capsys.readouterr().err


def test_trainer_runs_as_a_module_under_accelerate(tiny_parquet, tmp_path):
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "timm_scan", "train",
           "--dataset", str(tiny_parquet), "--output-dir", str(tmp_path), "--model", "test_resnet", "--input-size", "32",
           "--crop-pct", "1.0", "--val-size", "16", "--epochs", "1", "--batch-size", "16", "--num-workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "results.json").is_file() and "ensemble" in proc.stdout


def test_tensorboard_logs_every_part_per_exit(tiny_parquet, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(dataset=str(tiny_parquet), output_dir=str(tmp_path / "run"), model="test_resnet", input_size=32,
                      crop_pct=1.0, val_size=16, epochs=2, batch_size=16, num_workers=0, lam=0.1,
                      log_with="tensorboard")
    Trainer(cfg).fit()
    events = [p.parent for p in (tmp_path / "run").rglob("events.out.tfevents.*")]
    assert events
    scalars, images = {}, []
    for folder in set(events):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        scalars.update({tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})
        images += acc.Tags()["images"]
    logged = epoch_metrics(tmp_path / "run")
    for i in range(4):
        assert scalars[f"train/ce_exit{i + 1}"] == pytest.approx([m.ce[i] for m in logged])
        assert scalars[f"val/accuracy_exit{i + 1}"] == pytest.approx([m.val.exits[i] for m in logged])
    for i in range(3):
        assert scalars[f"train/kd_exit{i + 1}"] == pytest.approx([m.kd[i] for m in logged])
        assert scalars[f"train/hint_exit{i + 1}"] == pytest.approx([m.hint[i] for m in logged])
    assert len(scalars["val/accuracy_ensemble"]) == 2 and len(scalars["train/lr"]) == 2
    assert all(t > 0 for t in scalars["train/step_seconds"])
    assert "val/tradeoff" in images and (tmp_path / "run" / "training_tradeoff.png").is_file()


def test_a_missing_tracker_fails_before_training(tiny_parquet, tmp_path, monkeypatch):
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: [])
    cfg = TrainConfig(dataset=str(tiny_parquet), output_dir=str(tmp_path), log_with="tensorboard")
    with pytest.raises(ValueError, match=r"tensorboard is not installed; install it with: pip install 'timm-scan\[tensorboard\]'"):
        Trainer(cfg)
    with pytest.raises(ValueError, match="unknown tracker 'tensorbored'"):
        Trainer(TrainConfig(dataset=str(tiny_parquet), output_dir=str(tmp_path), log_with="tensorbored"))
    assert not any(tmp_path.iterdir())


def test_evaluate_says_why_early_exit_measured_slower():
    from timm_scan import ExitPolicy
    from timm_scan.commands.evaluate import saving_notes
    from timm_scan.exit_policy import Guarantee, PolicyOrigin
    from timm_scan.report import WallClock

    def clocks(*speedups):
        return [WallClock(batch_size=b, images=8, backbone_ms_per_image=1.0, early_exit_ms_per_image=1 / s)
                for b, s in zip((256, 1), speedups)]

    uncertified = Guarantee("accuracy_drop", 0.02, 0.1, False, 1000, 1000, 0, 1.0, 231)
    origin = PolicyOrigin("learn-then-test over the genetic search", "max_accuracy_drop", 0.02, "macs", 0.5, 1000,
                          guarantee=uncertified)
    assert saving_notes(1.4, clocks(1.2, 1.1), ExitPolicy([0.5, 0.5])) == []  # faster at both: nothing to explain
    [note] = saving_notes(0.96, clocks(0.92, 0.75), ExitPolicy([1.0, 1.0], origin=origin))
    assert note.startswith("no saving to measure: nothing was certified") and "4% more" in note
    [note] = saving_notes(1.46, clocks(1.2, 0.9), ExitPolicy([0.5, 0.5]))
    assert note.startswith("1.46x fewer MACs, yet slower at batch 1:")


def test_inspect_warns_where_exits_cost_more_than_they_save():
    from timm_scan.commands.inspect import cost_warnings

    assert cost_warnings([30, 60, 90, 100], 100) == []  # every exit saves, the deepest costs the backbone's
    [every] = cost_warnings([12, 21, 30, 39], 37)  # resnet18 at 32x32: the heads add 4%
    assert every.startswith("a sample that runs every exit pays 105% of the plain backbone") and "more than 7%" in every
    exit3, every = cost_warnings([40, 80, 107, 127], 100)  # resnet50 at 224 with the papers' heads
    assert exit3.startswith("exit 3 costs 107% of the plain backbone: a sample leaving there saves nothing")
    assert "pays 127%" in every and "more than 31% of samples leave at exit 1" in every


def test_inspect_says_what_the_heads_add_and_how_they_were_sized(capsys):
    from timm_scan.commands.inspect import inspect

    model = inspect(InspectConfig(model="resnet50", input_size=64))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("shallow heads: "))
    assert f"align width {model.config.head_channels} sized by head_budget=0.05; attention 'none'" in line
    assert float(line.split()[2].rstrip("%")) <= 5.0
    inspect(InspectConfig(model="resnet50", input_size=64, head_budget=None, attention="sd"))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("shallow heads: "))
    assert "SepConv at the papers' widths (no head_budget); attention 'sd'" in line and float(line.split()[2][:-1]) > 20


def test_the_banner_gives_the_threads_and_says_when_cores_sit_idle(monkeypatch):
    from types import SimpleNamespace

    import torch

    from timm_scan.training import trainer

    monkeypatch.setattr(trainer.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    one = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert trainer._cpu_threads(one) == (", 1 thread of 4 cores (accelerate launch sets OMP_NUM_THREADS=1 unless given "
                                         "--num_cpu_threads_per_process 4)")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert trainer._cpu_threads(SimpleNamespace(device=torch.device("cpu"), num_processes=2)) == ", 2 threads"
    assert trainer._cpu_threads(SimpleNamespace(device=torch.device("cuda", 0), num_processes=1)) == ""
