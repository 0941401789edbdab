"""Training from weights the user already has: --init-from, --freeze-backbone."""

import pytest
import timm
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

import timm_scan
from timm_scan.model.hub import load_initial_weights
from timm_scan.report import ExitAccuracy
from timm_scan.training import Trainer, TrainConfig, epoch_metrics, run_results


def config(data, out, **kwargs):
    base = dict(dataset=str(data), output_dir=str(out), model="test_resnet", input_size=32, crop_pct=1.0, val_size=16,
                epochs=1, batch_size=16, lr=0.05, num_workers=0)
    return TrainConfig(**{**base, **kwargs})


@pytest.fixture(scope="module")
def baseline_run(tiny_parquet, tmp_path_factory):
    """A finished --baseline run: its best/ is a plain backbone in save_pretrained layout."""
    out = tmp_path_factory.mktemp("baseline")
    Trainer(config(tiny_parquet, out, baseline=True, epochs=2)).fit()
    return out


def wrapped(**kwargs):
    return timm_scan.wrap(timm.create_model("test_resnet", num_classes=4), check_input_size=(3, 32, 32), **kwargs)


def test_freeze_backbone_keeps_the_deepest_classifier_bit_identical(baseline_run, tiny_parquet, tmp_path):
    start = load_file(baseline_run / "best" / "model.safetensors")
    results = Trainer(config(tiny_parquet, tmp_path, init_from=str(baseline_run / "best"), freeze_backbone=True,
                             epochs=3)).fit()
    after = load_file(tmp_path / "best" / "model.safetensors")
    assert after.keys() == start.keys() and all(torch.equal(after[k], start[k]) for k in start)  # BN buffers too
    assert results.test.deepest == run_results(baseline_run).test.deepest
    fresh = wrapped().exits.state_dict()
    trained = load_file(tmp_path / "best" / "scan_exits.safetensors")
    assert any(not torch.equal(trained[k], fresh[k]) for k in fresh if k.endswith("weight"))  # the exits learnt
    means = [sum(m.val.exits) / len(m.val.exits) for m in epoch_metrics(tmp_path)]
    assert results.best_epoch == 1 + means.index(max(means))


def test_a_frozen_backbone_keeps_the_epoch_whose_exits_are_best(baseline_run, tiny_parquet, tmp_path, monkeypatch):
    # the deepest exit ties at every epoch (its weights are frozen); the exits are best at epoch 2
    val = iter([ExitAccuracy([0.2, 0.3, 0.4, 0.5], 0.5, 16), ExitAccuracy([0.4, 0.4, 0.45, 0.5], 0.5, 16),
                ExitAccuracy([0.3, 0.3, 0.4, 0.5], 0.5, 16)])
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, loader, desc="eval": next(val) if desc.startswith("val")
                        else evaluate(self, loader, desc))
    results = Trainer(config(tiny_parquet, tmp_path, init_from=str(baseline_run / "best"), freeze_backbone=True,
                             epochs=3)).fit()
    assert results.best_epoch == 2


def test_fine_tuning_from_trained_weights_starts_there(baseline_run, tiny_parquet, tmp_path):
    trainer = Trainer(config(tiny_parquet, tmp_path, init_from=str(baseline_run / "best")))
    model = trainer.accelerator.unwrap_model(trainer.model)
    start = load_file(baseline_run / "best" / "model.safetensors")
    assert all(torch.equal(v, start[k]) for k, v in model.backbone.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_init_from_a_timm_checkpoint_a_hub_repo_and_a_timm_scan_model(hub, tmp_path):
    source = wrapped()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
    save_file(source.backbone.state_dict(), str(tmp_path / "weights.safetensors"))
    model = wrapped()
    assert load_initial_weights(model, tmp_path / "weights.safetensors") == "backbone"
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(),
                                                 source.backbone.state_dict().values()))
    source.save_pretrained(str(tmp_path / "scan"))
    model = wrapped()
    assert load_initial_weights(model, tmp_path / "scan") == "backbone and exits"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    HfApi().create_repo("user/plain-test-resnet", exist_ok=True)
    timm.models.push_to_hf_hub(source.backbone, "user/plain-test-resnet", safe_serialization=True)
    model = wrapped()
    assert load_initial_weights(model, "hf-hub:user/plain-test-resnet") == "backbone"
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(),
                                                 source.backbone.state_dict().values()))


def test_init_from_errors(tmp_path):
    model = wrapped()
    save_file(timm.create_model("test_resnet", num_classes=7).state_dict(), str(tmp_path / "seven.safetensors"))
    with pytest.raises(ValueError, match="classifies 7 classes .* the data has 4"):
        load_initial_weights(model, tmp_path / "seven.safetensors")
    other = timm_scan.wrap(timm.create_model("test_vit", num_classes=4))
    other.save_pretrained(str(tmp_path / "vit"))
    with pytest.raises(ValueError, match="holds a 'test_vit' model but this run builds 'test_resnet'; pass --model test_vit"):
        load_initial_weights(model, tmp_path / "vit")
    wrapped(config=timm_scan.ScanConfig(exits=[2, 3])).save_pretrained(str(tmp_path / "two-exits"))
    with pytest.raises(ValueError, match="has exits .* but this run wraps"):
        load_initial_weights(model, tmp_path / "two-exits")
    torch.save({}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="only safetensors checkpoints"):
        load_initial_weights(model, tmp_path / "weights.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        load_initial_weights(model, tmp_path / "empty")


def test_freeze_backbone_needs_exits(tiny_parquet, tmp_path):
    with pytest.raises(ValueError, match="freeze_backbone"):
        config(tiny_parquet, tmp_path, baseline=True, freeze_backbone=True)
