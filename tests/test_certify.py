"""Certified thresholds (Learn-then-Test): exact binomial tails, valid p-values, and the search that
returns only what it can certify."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import synthetic_outputs

import timm_scan
from timm_scan import ExitCosts, ExitPolicy, search_thresholds
from timm_scan.deploy.certify import binomial_cdf, drop_losses, needed_samples, rejects, risk_p_value

COSTS = ExitCosts.macs([10, 20, 30, 42], 40)


def p_value(losses: torch.Tensor, epsilon: float, delta: float, kind: str) -> float:
    """The p-value certification uses for this risk: per-sample drops in {−1, 0, 1} by betting, else binary."""
    if kind == "accuracy_drop":
        return risk_p_value(*drop_losses(losses.clamp(min=0), (-losses).clamp(min=0), epsilon), delta, bounded=True)
    return risk_p_value(losses, epsilon, delta)


def test_binomial_tails_are_exact():
    for n, k, p in ((10, 3, 0.5), (50, 0, 0.02), (300, 11, 0.03)):
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert binomial_cdf(k, n, p) == pytest.approx(exact, rel=1e-9)
    assert binomial_cdf(-1, 10, 0.5) == 0.0 and binomial_cdf(10, 10, 0.5) == 1.0


@pytest.mark.parametrize("kind", ["disagreement", "accuracy_drop"])
def test_p_values_are_valid_where_the_risk_is_just_above_the_target(kind):
    """Where the true risk exceeds ε, a p-value at most δ is rare: at most δ of draws (here δ = 0.2, so
    that 150 draws can show a broken test: a uniform p-value would pass 20%)."""
    rng = np.random.default_rng(1)
    epsilon, delta, passed = 0.02, 0.2, 0
    for _ in range(150):
        u = rng.random(600)
        if kind == "disagreement":
            losses = torch.tensor(u < 0.021, dtype=torch.int8)  # risk 0.021 > ε
        else:  # drop p₊ − p₋ = 0.045 − 0.024 = 0.021 > ε
            losses = torch.tensor(np.where(u < 0.045, 1, np.where(u < 0.069, -1, 0)), dtype=torch.int8)
        passed += p_value(losses, epsilon, delta, kind) <= delta
    assert passed / 150 <= delta
    zero = torch.zeros(600, dtype=torch.int8)
    assert p_value(zero, epsilon, delta, kind) < 0.01  # and power where it is zero


def test_a_certified_search_records_its_guarantee_and_holds_on_fresh_samples():
    probs, labels = synthetic_outputs(4000)
    result = search_thresholds(probs, labels, COSTS, max_accuracy_drop=0.03, confidence=0.9, generations=20)
    guarantee = result.policy.origin.guarantee
    assert guarantee.certified and (guarantee.risk, guarantee.epsilon, guarantee.delta) == ("accuracy_drop", 0.03,
                                                                                               pytest.approx(0.1))
    assert guarantee.calibration_samples + guarantee.search_samples == 4000 and guarantee.p_value <= 0.1
    assert result.speedup > 1 and "with probability at least 90%" in result.policy.origin.promise
    fresh, fresh_labels = synthetic_outputs(20000, seed=9)  # the same distribution, never seen
    index, _, answered = timm_scan.deploy.simulate_early_exit([torch.from_numpy(p) for p in fresh], result.policy)
    drop = (fresh[-1].argmax(-1) == fresh_labels).mean() - (answered.argmax(-1).numpy() == fresh_labels).mean()
    assert drop <= 0.03 and (index < 3).any()
    again = search_thresholds(probs, labels, COSTS, max_accuracy_drop=0.03, confidence=0.9, generations=20)
    assert again.policy == result.policy  # seeded: the split and the search


def test_too_few_samples_certify_nothing_and_say_how_many_are_needed():
    probs, labels = synthetic_outputs(60)
    result = search_thresholds(probs, labels, COSTS, max_accuracy_drop=0.005, confidence=0.95, generations=5)
    guarantee = result.policy.origin.guarantee
    needed = needed_samples("accuracy_drop", 0.005, 0.05)  # even with no loss on any calibration sample
    assert not guarantee.certified and guarantee.needed_samples == needed > 30
    none_lost = [drop_losses(torch.zeros(n), torch.zeros(n), 0.005) for n in (needed, needed - 1)]
    assert rejects(*none_lost[0], 0.05, bounded=True) and not rejects(*none_lost[1], 0.05, bounded=True)
    assert needed_samples("disagreement", 0.01, 0.1) == math.ceil(math.log(0.1) / math.log(0.99))
    assert result.policy.thresholds == (1.0, 1.0, 1.0)  # every exit runs: nothing uncertified is labelled certified
    assert result.policy.fallback == "deepest"  # and the full model answers
    assert "nothing certified" in result.policy.origin.promise and f"at least {needed} needed" in result.policy.origin.promise
    enough = dataclasses.replace(result.policy.origin.guarantee, calibration_samples=needed + 1)
    assert "would do only if no answer were lost" in enough.promise  # enough samples, too uncertain a risk


def test_disagreement_is_certified_against_the_deepest_exits_answers():
    probs, labels = synthetic_outputs(3000, seed=2)
    result = search_thresholds(probs, labels, COSTS, max_disagreement=0.1, confidence=0.9, fallback="deepest",
                               generations=20)
    guarantee = result.policy.origin.guarantee
    assert guarantee.risk == "disagreement" and guarantee.certified
    assert result.policy.origin.objective == "max_disagreement"
    fresh, fresh_labels = synthetic_outputs(20000, seed=8)
    _, _, answered = timm_scan.deploy.simulate_early_exit([torch.from_numpy(p) for p in fresh], result.policy)
    assert (answered.argmax(-1).numpy() != fresh[-1].argmax(-1)).mean() <= 0.1
    assert 0 < result.accuracy < 1  # reported against the labels, not against the deepest exit's answers


def test_a_certified_search_proposes_and_tests_under_the_policys_rule():
    probs, labels = synthetic_outputs(4000, seed=11)
    result = search_thresholds(probs, labels, COSTS, max_accuracy_drop=0.03, confidence=0.9, fallback="deepest",
                               rule="running-mean", generations=20)
    assert result.policy.rule == "running-mean" and result.policy.origin.guarantee.certified
    fresh, fresh_labels = synthetic_outputs(20000, seed=12)
    index, _, answered = timm_scan.deploy.simulate_early_exit([torch.from_numpy(p) for p in fresh], result.policy)
    drop = (fresh[-1].argmax(-1) == fresh_labels).mean() - (answered.argmax(-1).numpy() == fresh_labels).mean()
    assert drop <= 0.03 and (index < 3).any()
    few = search_thresholds([p[:60] for p in probs], labels[:60], COSTS, max_accuracy_drop=0.005, confidence=0.95,
                            rule="running-mean", generations=5).policy
    assert not few.origin.guarantee.certified and (few.thresholds, few.rule) == ((1.0, 1.0, 1.0), "running-mean")
    assert search_thresholds(probs, labels, COSTS, budget=22.0, confidence=0.9, rule="running-mean",
                             generations=5).policy.rule == "running-mean"


def test_the_guarantee_travels_with_the_model_and_bad_requests_are_refused(tmp_path):
    from helpers import create

    probs, labels = synthetic_outputs(2000, seed=3)
    result = search_thresholds(probs, labels, COSTS, max_accuracy_drop=0.05, confidence=0.9, generations=10)
    model = timm_scan.wrap(create("test_resnet", num_classes=10), check_input_size=(3, 32, 32))
    model.policy = result.policy
    model.save_pretrained(tmp_path)
    loaded = timm_scan.from_pretrained(tmp_path)
    assert loaded.policy == result.policy and loaded.policy.origin.guarantee == result.policy.origin.guarantee
    assert result.policy.origin.promise in (tmp_path / "README.md").read_text()
    with pytest.raises(ValueError, match="confidence certifies a target"):
        search_thresholds(probs, labels, COSTS, beta=1.0, confidence=0.9)
    with pytest.raises(ValueError, match="confidence must be in"):
        search_thresholds(probs, labels, COSTS, max_accuracy_drop=0.01, confidence=1.5)
    with pytest.raises(ValueError, match="give one objective"):
        search_thresholds(probs, labels, COSTS, max_accuracy_drop=0.01, max_disagreement=0.01)
    assert ExitPolicy.from_json(result.policy.to_json()) == result.policy


def test_the_command_line_certifies_records_and_evaluates(tiny_parquet, tmp_path, capsys):
    """``timm-scan search RUN --max-drop 5 --confidence 0.9`` on a toy run: 12 calibration samples cannot
    certify 5 points, so the record says so and the model runs every exit; ``evaluate`` reports it."""
    from timm_scan.cli import main
    from timm_scan.commands.search import ThresholdRecord
    from timm_scan.report import EarlyExitReport

    run = tmp_path / "run"
    main(["train", "--dataset", str(tiny_parquet), "--output-dir", str(run), "--model", "test_resnet", "--input-size",
          "32", "--crop-pct", "1.0", "--val-size", "24", "--epochs", "1", "--batch-size", "16", "--num-workers", "0"])
    main(["search", str(run), "--betas", "1", "--max-drop", "5", "--confidence", "0.9", "--generations", "3"])
    record = ThresholdRecord.load(run / "thresholds.json")
    guarantee = record.policy.origin.guarantee
    assert (guarantee.epsilon, guarantee.calibration_samples, guarantee.search_samples) == (0.05, 12, 12)
    assert not guarantee.certified and record.thresholds == (1.0, 1.0, 1.0)
    assert timm_scan.from_pretrained(run / "best").policy == record.policy
    assert "nothing certified" in capsys.readouterr().out
    main(["evaluate", str(run), "--latency-images", "4", "--latency-images-b1", "2"])
    report = EarlyExitReport.load(run / "evaluation.json")
    assert report.policy == record.policy and report.agreement == 1.0 and report.exit_shares[-1] == 1.0
    assert report.accuracy == report.per_exit.deepest  # the full model's answers
    out = capsys.readouterr().out
    assert "promise: nothing certified" in out and "asked with a guarantee but nothing certified" in out
    with pytest.raises(SystemExit):
        main(["search", str(run), "--confidence", "0.9"])  # nothing to certify
    first_exit = timm_scan.from_pretrained(run / "best").exit_macs((3, 32, 32))[0]
    main(["search", str(run), "--betas", "1", "--budget-macs", str(first_exit), "--confidence", "0.9",
          "--generations", "3"])
    record = ThresholdRecord.load(run / "thresholds.json")
    assert record.policy.origin.guarantee.risk == "mean_cost" and record.thresholds == (0.0, 0.0, 0.0)
    assert "certified at 90% confidence" in record.target
    main(["evaluate", str(run), "--latency-images", "4", "--latency-images-b1", "2"])
    report = EarlyExitReport.load(run / "evaluation.json")
    assert report.exit_shares[0] == 1.0 and report.target_held  # every image at the first exit: at the budget


def test_the_direct_test_agrees_with_the_p_value():
    rng = np.random.default_rng(4)
    for _ in range(20):
        u = rng.random(400)
        losses = torch.tensor(np.where(u < rng.uniform(0, 0.06), 1, np.where(u > 1 - rng.uniform(0, 0.03), -1, 0)),
                              dtype=torch.int8)
        for delta in (0.05, 0.2):
            for bounded in (True, False):
                tested = (losses.double() + 1) / 2 if bounded else losses.clamp(min=0)
                assert rejects(tested, 0.03, delta, bounded) == (risk_p_value(tested, 0.03, delta, bounded) <= delta)


def test_candidates_are_walked_from_the_least_risk_and_the_cheapest_accepted_is_kept():
    """Fixed-sequence testing stops at the first candidate it cannot accept: running every exit first, then
    from the most to the least accurate on the search part, the steps toward the search's proposals among
    them; of those accepted the one with the largest speed-up is kept."""
    from timm_scan.deploy.certify import cheapest_accepted, fixed_sequence, propose_candidates
    from timm_scan.deploy.thresholds import ExitTable

    probs, labels = synthetic_outputs(1500, seed=5)
    table = ExitTable.from_outputs(probs, labels, COSTS)
    candidates = propose_candidates(table, table.deepest_accuracy, 0.03, generations=10)
    accuracies = [float(table.evaluate(t)[0][0]) for t in candidates]
    speedups = [float(table.evaluate(t)[1][0]) for t in candidates]
    assert list(candidates[0]) == [1.0, 1.0, 1.0]  # running every exit is tested first
    assert accuracies[1:] == sorted(accuracies[1:], reverse=True)
    assert len(candidates) > 13 and max(speedups) > min(speedups)
    zero = torch.zeros(100, dtype=torch.int8)
    accepted = fixed_sequence(candidates, lambda t: (zero, 0.1), 0.1)  # every risk rejected: all accepted
    assert len(accepted) == len(candidates) and cheapest_accepted(table, accepted) is candidates[speedups.index(max(speedups))]
    second = candidates[1]
    stops = fixed_sequence(candidates, lambda t: (torch.ones(100, dtype=torch.int8) if t is second else zero, 0.1), 0.1)
    assert len(stops) == 1  # a prefix: nothing after the first candidate it cannot accept
    assert fixed_sequence(candidates, lambda t: (torch.ones(100, dtype=torch.int8), 0.1), 0.1) == []
    assert cheapest_accepted(table, []) is None


def test_a_certified_budget_holds_on_fresh_samples_and_at_worst_sends_everything_to_the_first_exit():
    """The mean cost (10, 20, 30, 42 per exit) is certified within a budget; the cheapest candidate, every
    sample at the first exit, needs no data; a budget below it is refused."""
    probs, labels = synthetic_outputs(4000, seed=6)
    result = search_thresholds(probs, labels, COSTS, budget=22.0, confidence=0.9, generations=20)
    guarantee = result.policy.origin.guarantee
    assert (guarantee.risk, guarantee.epsilon, guarantee.cost_unit, guarantee.certified) == ("mean_cost", 22.0,
                                                                                            "macs", True)
    assert result.policy.origin.objective == "budget" and "a mean cost of at most 22 macs" in result.policy.origin.promise
    fresh, _ = synthetic_outputs(20000, seed=10)
    index, _, _ = timm_scan.deploy.simulate_early_exit([torch.from_numpy(p) for p in fresh], result.policy)
    fresh_cost = torch.tensor(COSTS.per_exit, dtype=torch.float64)[index].mean().item()
    assert 10 < fresh_cost <= 22.0 and (index > 0).any()
    few, few_labels = synthetic_outputs(30, seed=6)
    cheapest = search_thresholds(few, few_labels, COSTS, budget=10.5, confidence=0.95, generations=5)
    assert cheapest.policy.thresholds == (0.0, 0.0, 0.0) and cheapest.exit_shares[0] == 1.0
    assert cheapest.policy.origin.guarantee.certified and cheapest.policy.origin.guarantee.p_value == 0.0
    with pytest.raises(ValueError, match="at least the first exit's, 10 macs"):
        search_thresholds(probs, labels, COSTS, budget=9.0, confidence=0.9)
    with pytest.raises(ValueError, match="baseline_accuracy goes with accuracy targets"):
        search_thresholds(probs, labels, COSTS, budget=22.0, confidence=0.9, baseline_accuracy=0.5)
