"""save_pretrained / from_pretrained on local folders (the Hub round trip is in test_hub_push.py)."""

import dataclasses
import json

import pytest
import timm
import torch
import yaml
from helpers import create

import timm_scan
from timm_scan import EarlyExitPredictor, ExitPolicy, PolicyOrigin, ScanConfig
from timm_scan.model.card import model_card
from timm_scan.report import EarlyExitReport, ExitAccuracy, RunResults, WallClock
from timm_scan.model.hub import save_deployment
from timm_scan.report import ExitLatency


def trained_like(name="test_resnet", size=32, **config):
    """A wrapped model with non-default weights everywhere (so a lost tensor would show)."""
    model = timm_scan.wrap(create(name, num_classes=4), ScanConfig(**config), check_input_size=(3, size, size))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    model.class_names = ["a", "b", "c", "d"]
    model.data_config = timm.data.resolve_model_data_config(model.backbone, args={"input_size": (3, size, size)})
    return model.eval()


def outputs(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name, size, config", [
    ("test_resnet", 32, {"attention": "scan", "head_budget": None}),  # the papers' heads: their attention is 27% here
    ("test_vit", 160, {}),
    ("mobilenetv3_large_100", 32, {"exits": [2, 3], "head_channels": 64}),  # pre-logits width != exits': a projection
])
def test_round_trip_is_exact(tmp_path, name, size, config):
    model = trained_like(name, size, **config)
    model.policy = ExitPolicy([0.9] * (model.num_exits - 1), "deepest")
    model.save_pretrained(str(tmp_path))
    loaded = timm_scan.from_pretrained(tmp_path).eval()
    x = torch.randn(3, 3, size, size)
    a, b = outputs(model, x), outputs(loaded, x)
    for u, v in zip(a.logits + a.features, b.logits + b.features):
        assert torch.equal(u, v)
    assert loaded.config == model.config and loaded.class_names == model.class_names
    assert tuple(loaded.data_config["input_size"]) == (3, size, size) and loaded.policy == model.policy
    assert json.dumps(loaded.data_config) == json.dumps(model.data_config)  # stored once, in timm's config.json
    assert EarlyExitPredictor(loaded).policy.fallback == "deepest"  # the saved thresholds and fallback


def test_plain_timm_loads_the_backbone(tmp_path):
    model = trained_like()
    model.save_pretrained(str(tmp_path))
    backbone = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(backbone(x), outputs(model, x).logits[-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "scan_config.json", "scan_exits.safetensors"]


def test_thresholds_can_be_recorded_later(tmp_path):
    model = trained_like()
    model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="no thresholds"):
        EarlyExitPredictor(timm_scan.from_pretrained(tmp_path))
    card = (tmp_path / "README.md").read_text()
    save_deployment(tmp_path, ExitPolicy([0.8, 0.85, 0.9]))
    assert EarlyExitPredictor(timm_scan.from_pretrained(tmp_path)).policy.thresholds == (0.8, 0.85, 0.9)
    assert (tmp_path / "README.md").read_text() == card  # not a run's best/: the card is left as it is
    with pytest.warns(DeprecationWarning, match="save_deployment"):  # 0.1.0's form
        save_deployment(tmp_path, [0.7, 0.75, 0.8], "deepest")
    assert timm_scan.from_pretrained(tmp_path).policy == ExitPolicy([0.7, 0.75, 0.8], "deepest")


def test_temperatures_and_latency_travel_with_the_model(tmp_path):
    """Saved, loaded, shown on the card; a later measurement at the same setting replaces the earlier one."""
    model = trained_like()
    model.policy = ExitPolicy(temperatures=[1.5, 1.2, 1.1, 0.9])
    b1 = ExitLatency([1.0, 2.0, 3.0, 4.5], 4.0, 1, [3, 32, 32], "float32", "contiguous", "cpu: test")
    model.exit_latency = [b1]
    model.save_pretrained(str(tmp_path))
    loaded = timm_scan.from_pretrained(tmp_path)
    assert loaded.policy.temperatures == (1.5, 1.2, 1.1, 0.9) and loaded.exit_latency == [b1]
    card = (tmp_path / "README.md").read_text()
    assert "1.000, 2.000, 3.000, 4.500" in card and "cpu: test, batch 1" in card and "1.500, 1.200" in card
    b1_again = ExitLatency([2.0, 2.5, 3.0, 5.0], 4.0, 1, [3, 32, 32], "float32", "contiguous", "cpu: test")
    b8 = ExitLatency([0.5, 1.0, 1.5, 2.0], 2.0, 8, [3, 32, 32], "float32", "contiguous", "cpu: test")
    save_deployment(tmp_path, ExitPolicy([0.8, 0.85, 0.9]), exit_latency=[b1_again, b8])
    loaded = timm_scan.from_pretrained(tmp_path)
    assert loaded.policy.temperatures is None and loaded.exit_latency == [b1_again, b8]
    with pytest.raises(ValueError, match="exit_latency: 3 values for a 4-exit model"):
        save_deployment(tmp_path, ExitPolicy([0.8, 0.85, 0.9]), exit_latency=[
            ExitLatency([1.0, 2.0, 3.0], 4.0, 1, [3, 32, 32], "float32", "contiguous", "cpu: test")])
    with pytest.raises(ValueError, match="temperatures must be 4 positive numbers"):
        save_deployment(tmp_path, ExitPolicy([0.8, 0.85, 0.9], temperatures=[1.0, 2.0, 1.0]))
    assert timm_scan.from_pretrained(tmp_path).exit_latency == [b1_again, b8]  # a refused update writes nothing
    policy = ExitPolicy(__import__("numpy").array([0.5, 0.6, 0.7]), temperatures=__import__("numpy").ones(4))
    save_deployment(tmp_path, policy)
    assert timm_scan.from_pretrained(tmp_path).policy == policy and policy.thresholds == (0.5, 0.6, 0.7)


def test_the_policy_is_saved_as_one_object_and_the_old_attributes_warn(tmp_path):
    model = trained_like()
    with pytest.warns(DeprecationWarning, match="model.policy"):
        model.thresholds = [0.9, 0.8, 0.7]  # 0.1.0's way: replaces the policy, never patches it
    assert model.policy == ExitPolicy([0.9, 0.8, 0.7])
    with pytest.warns(DeprecationWarning, match="model.policy.fallback"):
        assert model.fallback == "ensemble"
    model.save_pretrained(str(tmp_path))
    meta = json.loads((tmp_path / "scan_config.json").read_text())
    assert set(meta) == {"format", "format_version", "scan_config", "policy", "sha256"} and meta["format_version"] == 3
    assert ExitPolicy.from_dict(meta["policy"]) == model.policy
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.policy.thresholds = (0.1, 0.1, 0.1)


def test_a_plain_timm_folder_is_not_a_timm_scan_model(tmp_path):
    timm.models.save_for_hf(create("test_resnet"), str(tmp_path), safe_serialization=True)
    with pytest.raises(ValueError, match="not a timm-scan model.*timm.create_model"):
        timm_scan.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage, message", [
    ("truncate_exits", "scan_exits.safetensors cannot be read"),
    ("truncate_backbone", "model.safetensors cannot be read"),
    ("drop_exits", "scan_exits.safetensors is missing"),
    ("bad_json", "not valid JSON"),
    ("other_format", "format"),
    ("wrong_shapes", "scan_exits.safetensors tensor .* has shape"),
])
def test_damaged_folders_get_a_clear_error(tmp_path, damage, message):
    model = trained_like()
    model.save_pretrained(str(tmp_path))
    if damage.startswith("truncate"):
        path = tmp_path / ("scan_exits.safetensors" if damage == "truncate_exits" else "model.safetensors")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "drop_exits":
        (tmp_path / "scan_exits.safetensors").unlink()
    elif damage == "bad_json":
        (tmp_path / "scan_config.json").write_text("{")
    elif damage == "other_format":
        meta = json.loads((tmp_path / "scan_config.json").read_text())
        (tmp_path / "scan_config.json").write_text(json.dumps({**meta, "format_version": 99}))
    else:  # exits saved for another width
        meta = json.loads((tmp_path / "scan_config.json").read_text())
        meta["scan_config"]["head_channels"] = 16
        (tmp_path / "scan_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        timm_scan.from_pretrained(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="neither a folder nor a Hub model"):
        timm_scan.from_pretrained(tmp_path / "nothing")


def test_a_repo_or_revision_the_hub_lacks_is_a_value_error(hub):
    with pytest.raises(ValueError, match="hf-hub:tester/missing: the Hub .* has no repo 'tester/missing'.*token="):
        timm_scan.from_pretrained("hf-hub:tester/missing")
    trained_like().push_to_hub("tester/scan-misses")
    with pytest.raises(ValueError, match="hf-hub:tester/scan-misses: the repo has no revision 'nope'; check the branch"):
        timm_scan.from_pretrained("hf-hub:tester/scan-misses", revision="nope")


def test_model_card_has_the_hub_header_and_the_tables():
    model = trained_like()
    origin = PolicyOrigin("genetic search", "max_accuracy_drop", 0.005, "macs", 0.8, 5000)
    model.policy = ExitPolicy([0.9, 0.8, 0.7], origin=origin)
    test = ExitAccuracy([0.5, 0.6, 0.7, 0.8], 0.75, 100)
    results = RunResults("test_resnet", False, 3, test, test, [1_000_000, 2_000_000, 3_000_000, 4_000_000], 3_800_000,
                         1000, loss={"alpha": 0.3})
    evaluation = EarlyExitReport("test", test, results.exit_macs, results.backbone_macs, model.policy,
                                 0.79, 1.5, [0.4, 0.2, 0.1, 0.3], [WallClock(256, 512, 1.3, 1.0)])
    card = model_card(model, repo_id="me/m", dataset="uoft-cs/cifar10", train_config={"epochs": 200, "lr": 0.1},
                      results=results, evaluation=evaluation, plot="tradeoff.png")
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "timm" and "timm-scan" in header["tags"]
    assert header["license"] == "apache-2.0" and header["datasets"] == ["uoft-cs/cifar10"]
    assert header["metrics"] == ["accuracy"] and header["pipeline_tag"] == "image-classification"
    for text in ["| 1 | layer1 | 50.00% | 1.00 |", "| ensemble | all | 75.00%", "0.900, 0.800, 0.700", "accuracy 79.00%",
                 "MACs speed-up 1.50x", "batch 256: 1.30x", "![accuracy against MACs](tradeoff.png)",
                 'timm_scan.from_pretrained("hf-hub:me/m")', 'timm.create_model("hf-hub:me/m", pretrained=True)',
                 "epochs=200, lr=0.1", "Loss: alpha=0.3", "Chosen by genetic search on validation outputs",
                 "accuracy at most 0.5 points below 80.00%, met on the 5000 validation samples it was searched on; "
                 "no guarantee on new data"]:
        assert text in card, text
