"""The deployment nouns: ExitPolicy and ExitCosts, the 0.1.0 arguments they replace, and the package's
import graph (layers without circles)."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import create

import timm_scan
from timm_scan import EarlyExitPredictor, ExitCosts, ExitLatency, ExitPolicy, PolicyOrigin

PACKAGE = Path(timm_scan.__file__).parent


def test_a_policy_is_frozen_validated_and_round_trips_through_json():
    origin = PolicyOrigin("genetic search", "max_accuracy_drop", 0.005, "macs", 0.8, 2000, seed=3, min_threshold=0.0)
    policy = ExitPolicy([0.9, 0.5, 0.25], "deepest", [1.5, 1.0, 0.8, 1.2], origin)
    assert ExitPolicy.from_json(policy.to_json()) == policy and hash(policy) == hash(ExitPolicy.from_dict(
        json.loads(policy.to_json())))
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.fallback = "ensemble"
    assert policy.replace(thresholds=[0.9, 0.5, 0.25]).origin == origin  # unchanged: the promise still holds
    for change in ({"thresholds": [0.1, 0.1, 0.1]}, {"fallback": "ensemble"}, {"temperatures": None}):
        assert policy.replace(**change).origin is None  # what the search promised was for another policy
    with pytest.raises(ValueError, match="PolicyOrigin.value"):
        PolicyOrigin("genetic search", "beta", "x", "macs", 0.8, 2000)
    with pytest.raises(ValueError, match="PolicyOrigin.objective"):
        ExitPolicy.from_dict({"thresholds": [0.5], "origin": {**origin.to_dict(), "objective": "vote"}})
    for bad, message in (({"thresholds": [0.5, 1.5]}, r"thresholds\[1\]"), ({"fallback": "vote"}, "fallback"),
                         ({"temperatures": [1.0, -1.0]}, "temperatures"), ({"thresholds": "0.5"}, "sequence")):
        with pytest.raises(ValueError, match=message):
            ExitPolicy(**bad)
    with pytest.raises(ValueError, match="unknown ExitPolicy field"):
        ExitPolicy.from_dict({"thresholds": [0.5], "weights": [1.0]})
    with pytest.raises(ValueError, match="need one per shallow exit, 2"):
        ExitPolicy([0.5]).check(3)
    with pytest.raises(ValueError, match="no thresholds.*ExitPolicy"):
        ExitPolicy().check(3, needs_thresholds="search first")


def test_the_decision_rule_is_validated_saved_and_read_as_own_where_a_file_has_none(tmp_path):
    origin = PolicyOrigin("genetic search", "beta", 1.0, "macs", 0.8, 2000)
    policy = ExitPolicy([0.9, 0.5, 0.25], "deepest", origin=origin, rule="running-mean")
    assert ExitPolicy.from_json(policy.to_json()) == policy and policy.to_dict()["rule"] == "running-mean"
    assert ExitPolicy.load(policy.save(tmp_path / "policy.json")).rule == "running-mean"
    before_rules = {key: value for key, value in policy.replace(rule="own").to_dict().items() if key != "rule"}
    assert ExitPolicy.from_dict(before_rules) == ExitPolicy([0.9, 0.5, 0.25], "deepest")  # read as Algorithm 1's own
    assert ExitPolicy().rule == "own" and "rule" not in ExitPolicy([0.5]).describe()
    assert "rule running-mean" in policy.describe()
    assert policy.replace(rule="running-mean").origin == origin and policy.replace(rule="own").origin is None
    for bad in ("vote", "running mean", None):
        with pytest.raises(ValueError, match=r"rule must be one of \('own', 'running-mean'\)"):
            ExitPolicy([0.5], rule=bad)
    with pytest.raises(ValueError, match="rule must be one of"):
        ExitPolicy.from_dict({"thresholds": [0.5], "rule": "vote"})
    assert timm_scan.exit_policy.RULES == ("own", "running-mean")
    model = timm_scan.wrap(create("test_resnet", num_classes=5), check_input_size=(3, 32, 32))
    model.policy = policy
    model.save_pretrained(tmp_path / "model")
    assert timm_scan.from_pretrained(tmp_path / "model").policy == policy  # the rule travels with the model
    meta = json.loads((tmp_path / "model" / "scan_config.json").read_text())
    del meta["policy"]["rule"]  # as saved before rules
    (tmp_path / "model" / "scan_config.json").write_text(json.dumps(meta))
    assert timm_scan.from_pretrained(tmp_path / "model").policy == policy.replace(rule="own", origin=origin)


def test_costs_carry_their_unit_and_the_one_speed_ratio():
    macs = ExitCosts.macs([10, 20, 40], 36)
    assert (macs.per_exit, macs.backbone, macs.unit, macs.device) == ((10.0, 20.0, 40.0), 36.0, "macs", None)
    assert macs.speedup(18.0) == 2.0 and ExitCosts.from_json(macs.to_json()) == macs
    latency = ExitLatency([1.0, 2.0, 3.0], 2.5, 8, [3, 32, 32], "float32", "channels_last", "cpu: test")
    ms = ExitCosts.from_latency(latency)
    assert (ms.unit, ms.backbone, ms.device) == ("ms", 2.5, "cpu: test, batch 8, 32x32, float32, channels_last")
    for per_exit, backbone in (([10, 5], 20), ([0, 10], 20), ([10, 20], float("nan")), ([], 20)):
        with pytest.raises(ValueError, match="ExitCosts"):
            ExitCosts.macs(per_exit, backbone)


def test_the_model_carries_one_policy_and_the_predictor_reads_it():
    model = timm_scan.wrap(create("test_resnet", num_classes=5), check_input_size=(3, 32, 32)).eval()
    assert model.policy == ExitPolicy() and model.exit_costs((3, 32, 32)) == ExitCosts.macs(
        model.exit_macs((3, 32, 32)), model.backbone_macs((3, 32, 32)))
    x = torch.randn(16, 3, 32, 32)
    policy = ExitPolicy([0.3, 0.3, 0.3], "deepest", [2.0, 1.0, 1.0, 1.0])
    given = EarlyExitPredictor(model, policy)(x)
    with pytest.raises(ValueError, match="ExitPolicy"):
        model.policy = {"thresholds": [0.3, 0.3, 0.3]}
    model.policy = policy
    carried = EarlyExitPredictor(model)(x)
    assert torch.equal(given.exit_index, carried.exit_index) and torch.equal(given.probs, carried.probs)
    with pytest.warns(DeprecationWarning, match="ExitPolicy"):  # 0.1.0: thresholds, fallback; temperatures the model's
        legacy = EarlyExitPredictor(model, [0.3, 0.3, 0.3], "deepest")
    assert legacy.policy == policy and torch.equal(legacy(x).probs, carried.probs)
    with pytest.warns(DeprecationWarning):
        assert EarlyExitPredictor(model, thresholds=[0.5] * 3).policy == policy.replace(
            thresholds=[0.5] * 3, fallback="ensemble")
    with pytest.raises(TypeError, match="ExitPolicy"):
        EarlyExitPredictor(model, policy, "deepest")


def _imports(path: Path) -> set[str]:
    """The timm_scan modules ``path`` imports, at any depth of its code (function bodies and
    ``TYPE_CHECKING`` blocks included), relative imports resolved."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
            found.update(name if (PACKAGE.parent / (name.replace(".", "/") + ".py")).is_file() else base
                         for name in names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("timm_scan.") and name != module}


def test_no_import_circle_in_the_package():
    """Every import, also inside functions and TYPE_CHECKING blocks, counts: a circle is a design knot, not
    only a runtime error. Packages' ``__init__`` re-exports are left out (a subpackage's modules import
    each other, not their ``__init__``)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        graph[name] = {m for m in _imports(path) if not (PACKAGE.parent / (m.replace(".", "/") + "/__init__.py")).is_file()}
    assert "timm_scan.model.multi_exit" in graph and graph["timm_scan.deploy.predictor"]  # the walk sees the package

    def circle_from(start: str, node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return path + [nxt]
            if nxt not in path and nxt > start:  # each circle is found once, from its smallest module
                found = circle_from(start, nxt, path + [nxt])
                if found:
                    return found
        return None

    circles = [c for c in (circle_from(m, m, [m]) for m in sorted(graph)) if c]
    assert circles == []
