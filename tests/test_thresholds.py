import numpy as np
import pytest
import torch
from helpers import synthetic_outputs

from timm_scan import ExitCosts, ExitPolicy, search_thresholds, sweep_beta
from timm_scan.deploy import plot_tradeoff
from timm_scan.deploy.policy import exit_index, simulate_early_exit
from timm_scan.deploy.thresholds import (
    PAPER_MIN_THRESHOLD,
    ExitTable,
    Objective,
    SearchResult,
    decode,
    exhaustive_search,
    genetic_search,
)
from timm_scan.training import Trainer, TrainConfig

MACS = [10, 20, 30, 42]
COSTS = ExitCosts.macs(MACS, 40)


@pytest.fixture(scope="module")
def trained_outputs(tiny_parquet, tmp_path_factory):
    """Per-exit softmax of a small model really trained on the toy data (a 'real' case)."""
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(dataset=str(tiny_parquet), output_dir=str(out), model="test_resnet", input_size=32,
                      crop_pct=1.0, val_size=16, epochs=3, anneal_epochs=0, batch_size=16, lr=0.05, num_workers=0)
    trainer = Trainer(cfg)
    trainer.fit()
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    images, labels = zip(*[trainer.train_loader.dataset[i] for i in range(len(trainer.train_loader.dataset))])
    with torch.no_grad():
        logits = model(torch.stack(images)).logits
    return [torch.softmax(z, -1).numpy() for z in logits], np.array(labels), model.exit_costs((3, 32, 32))


def test_gene_decoding():
    genes = np.zeros((1, 2, 30), dtype=bool)
    genes[0, 1] = True
    assert decode(genes, 30).tolist() == [[1.0, pytest.approx(0.7)]]


@pytest.mark.parametrize("seed, beta", [(0, 0.1), (1, 1.0), (2, 5.0)])
def test_genetic_search_reaches_the_exhaustive_optimum_on_random_cases(seed, beta):
    table = ExitTable.from_outputs(*synthetic_outputs(seed=seed), COSTS)
    objective = Objective(table.deepest_accuracy, beta)
    ga = genetic_search(table, objective, seed=seed, min_threshold=PAPER_MIN_THRESHOLD)
    best = exhaustive_search(table, objective, min_threshold=PAPER_MIN_THRESHOLD)
    assert ga.fitness >= best.fitness - 0.01 * abs(best.fitness)
    assert all(0.7 - 1e-9 <= t <= 1.0 for t in ga.thresholds)


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_genetic_search_reaches_the_exhaustive_optimum_on_a_trained_model(trained_outputs, beta):
    probs, labels, costs = trained_outputs
    table = ExitTable.from_outputs(probs, labels, costs)
    objective = Objective(table.deepest_accuracy, beta)
    best = exhaustive_search(table, objective).fitness
    assert genetic_search(table, objective).fitness >= best - 0.01 * abs(best)  # fitness can be negative


def algorithm_1(probs, labels, thresholds, exit_macs, fallback, rule="own"):
    """SCAN Algorithm 1 written out sample by sample: (accuracy as a fraction, mean MACs, exit per sample);
    under ``rule="running-mean"`` exit i decides and answers with the mean of exits 0..i."""
    correct, macs, exits = 0, 0, []
    for n in range(len(labels)):
        answer, exit_at = None, len(probs) - 1
        for i, threshold in enumerate(thresholds):
            seen = [p[n] for p in probs[: i + 1]] if rule == "running-mean" else [probs[i][n]]
            decided = [sum(p[c] for p in seen) / len(seen) for c in range(len(probs[i][n]))]
            if max(decided) > threshold:
                answer, exit_at = decided, i
                break
        if answer is None:
            answer = [sum(p[n][c] for p in probs) / len(probs) for c in range(len(probs[0][n]))] if fallback == "ensemble" \
                else list(probs[-1][n])
        correct += answer.index(max(answer)) == labels[n]
        macs += exit_macs[exit_at]
        exits.append(exit_at)
    return correct / len(labels), macs / len(labels), exits


@pytest.mark.parametrize("fallback, rule", [("ensemble", "own"), ("deepest", "own"), ("ensemble", "running-mean"),
                                            ("deepest", "running-mean")])
def test_vectorised_policy_and_search_results_agree_with_algorithm_1_written_out(fallback, rule):
    probs, labels = synthetic_outputs(n=400)
    result = search_thresholds(probs, labels, COSTS, beta=1.0, baseline_accuracy=0.8, fallback=fallback,
                               rule=rule, generations=20)
    accuracy, mean_macs, exits = algorithm_1(probs, labels, result.thresholds, MACS, fallback, rule)
    assert result.accuracy == pytest.approx(accuracy) and result.speedup == pytest.approx(40 / mean_macs)
    assert result.fitness == pytest.approx(40 / mean_macs + 1.0 * 100 * (accuracy - 0.8))  # β per point
    assert result.policy.fallback == fallback and result.policy.origin.objective == "beta"
    assert result.policy.rule == rule and sweep_beta(probs, labels, COSTS, betas=[1.0], rule=rule,
                                                     generations=2)[0].policy.rule == rule
    assert result.exit_shares == pytest.approx([exits.count(i) / len(exits) for i in range(4)])
    thresholds = [[0.75, 0.8, 0.9], result.thresholds, [1.0, 1.0, 1.0], [0.0, 0.5, 0.5]]
    confidence = ExitTable.from_outputs(probs, labels, COSTS, fallback, rule=rule).confidence
    vectorised = exit_index(confidence, torch.tensor(thresholds, dtype=torch.float64))
    for row, t in zip(vectorised, thresholds):
        expected = algorithm_1(probs, labels, t, MACS, fallback, rule)[2]
        assert row.tolist() == expected
        policy = ExitPolicy(t, fallback, rule=rule)
        simulated, _, simulated_probs = simulate_early_exit([torch.from_numpy(p) for p in probs], policy)
        assert simulated.tolist() == expected
        assert (simulated_probs.argmax(-1).numpy() == labels).mean() == pytest.approx(
            algorithm_1(probs, labels, t, MACS, fallback, rule)[0])


@pytest.mark.parametrize("fallback", ["ensemble", "deepest"])
def test_the_running_mean_rule_decides_with_every_exit_computed_on_a_case_checked_by_hand(fallback):
    # three samples, two classes, thresholds 0.8 and 0.7:
    # A: exit 0 at 0.6; exit 1's own 0.8 leaves ("own"), the mean of exits 0-1, (0.4, 0.6), stays ("running-mean")
    # B: exit 0 at 0.75; exit 1's own 0.68 stays, the mean (0.715, 0.285) leaves
    # C: exit 0 at 0.9 leaves under either rule, with exit 0's own answer
    probs = [torch.tensor([[0.6, 0.4], [0.75, 0.25], [0.1, 0.9]]), torch.tensor([[0.2, 0.8], [0.68, 0.32], [0.5, 0.5]]),
             torch.tensor([[0.3, 0.7], [0.4, 0.6], [0.5, 0.5]])]
    fallen = {"ensemble": [1.1 / 3, 1.9 / 3], "deepest": [0.3, 0.7]}[fallback]  # A's answer under running-mean
    index, confidence, answered = simulate_early_exit(probs, ExitPolicy([0.8, 0.7], fallback, rule="running-mean"))
    assert index.tolist() == [2, 1, 0]
    torch.testing.assert_close(answered, torch.tensor([fallen, [0.715, 0.285], [0.1, 0.9]]))
    torch.testing.assert_close(confidence, torch.tensor([max(fallen), 0.715, 0.9]))
    own_index, _, own = simulate_early_exit(probs, ExitPolicy([0.8, 0.7], fallback))
    assert own_index.tolist() == [1, 2, 0] and own[0].tolist() == probs[1][0].tolist()


def test_beta_sweep_trades_speed_for_accuracy(tmp_path):
    probs, labels = synthetic_outputs()
    points = sweep_beta(probs, labels, COSTS, betas=[0.01, 1.0, 100.0])
    assert points[0].speedup >= points[-1].speedup
    assert points[0].accuracy <= points[-1].accuracy
    assert [p.beta for p in points] == [0.01, 1.0, 100.0]
    png = plot_tradeoff([(p.speedup, 100 * p.accuracy) for p in points], tmp_path / "tradeoff.png",
                        baseline=(1.0, 85.0), labels=[f"β={p.beta}" for p in points])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inconsistent_inputs_are_refused():
    probs, labels = synthetic_outputs()
    with pytest.raises(ValueError, match="probs has 4 exits but the costs have 3"):
        search_thresholds(probs, labels, ExitCosts.macs(MACS[:3], 40))
    with pytest.raises(ValueError, match="shape"):
        search_thresholds(probs, labels[:10], COSTS)
    with pytest.raises(ValueError, match="max_accuracy_drop must be a fraction"):
        search_thresholds(probs, labels, COSTS, max_accuracy_drop=2.0)
    with pytest.raises(ValueError, match="give one objective"):
        search_thresholds(probs, labels, COSTS, beta=1.0, budget=20.0)


def test_default_fitness_baseline_is_the_deepest_exits_accuracy():
    probs, labels = synthetic_outputs()
    costs = ExitCosts.macs(MACS, 42)
    table = ExitTable.from_outputs(probs, labels, costs, fallback="ensemble")
    deepest = float((probs[-1].argmax(-1) == labels).mean())
    fallback = float(table.evaluate(np.ones((1, 3)))[0][0])  # the ensemble's accuracy: a different number
    assert abs(deepest - fallback) > 0.005
    result = search_thresholds(probs, labels, costs, beta=2.0, generations=5)
    assert result.fitness == pytest.approx(result.speedup + 2.0 * 100 * (result.accuracy - deepest))
    assert result.policy.origin.baseline_accuracy == pytest.approx(deepest)
    given = search_thresholds(probs, labels, costs, beta=2.0, generations=5, baseline_accuracy=0.5)
    assert given.fitness == pytest.approx(given.speedup + 2.0 * 100 * (given.accuracy - 0.5))


def test_gene_decoding_over_a_wider_range():
    genes = np.zeros((1, 2, 10), dtype=bool)
    genes[0, 0] = True  # every bit set: the floor
    genes[0, 1, :5] = True  # half: halfway down
    assert decode(genes, 10, min_threshold=0.3).tolist() == [[pytest.approx(0.3), pytest.approx(0.65)]]


@pytest.mark.parametrize("max_drop", [0.0, 0.01, 0.03])
def test_max_accuracy_drop_gives_the_cheapest_thresholds_that_keep_the_accuracy(max_drop):
    probs, labels = synthetic_outputs(n=1500, seed=3)
    table = ExitTable.from_outputs(probs, labels, COSTS)
    objective = Objective(table.deepest_accuracy, None, max_drop)
    for low in (0.7, 0.3):
        result = search_thresholds(probs, labels, COSTS, max_accuracy_drop=max_drop, min_threshold=low, seed=1)
        accuracy, mean_macs, _ = algorithm_1(probs, labels, result.thresholds, MACS, "ensemble")
        origin = result.policy.origin
        assert accuracy >= table.deepest_accuracy - max_drop - 1e-9
        assert (origin.objective, origin.value, origin.samples) == ("max_accuracy_drop", max_drop, 1500)
        assert "no guarantee" in origin.promise
        assert result.beta is None and result.speedup == pytest.approx(40 / mean_macs)
        best = exhaustive_search(table, objective, min_threshold=low, bits=20)
        assert result.speedup >= 0.98 * best.speedup
    wider = search_thresholds(probs, labels, COSTS, max_accuracy_drop=max_drop, min_threshold=0.3, seed=1)
    paper = search_thresholds(probs, labels, COSTS, max_accuracy_drop=max_drop, seed=1,
                              min_threshold=PAPER_MIN_THRESHOLD)
    assert wider.speedup >= paper.speedup - 0.02  # a wider range can only help


def test_an_unreachable_target_is_reported_not_returned():
    probs, labels = synthetic_outputs(n=500)
    with pytest.raises(ValueError, match="no thresholds reach accuracy >= 100.00%"):
        search_thresholds(probs, labels, COSTS, max_accuracy_drop=0.0, baseline_accuracy=1.0, generations=5,
                          min_threshold=0.99, bits=2)


@pytest.mark.parametrize("budget", [14.0, 24.0])
def test_budget_gives_the_most_accurate_thresholds_within_the_mean_cost(budget):
    probs, labels = synthetic_outputs(n=1000, seed=4)
    table = ExitTable.from_outputs(probs, labels, COSTS)
    result = search_thresholds(probs, labels, COSTS, budget=budget, min_threshold=0.0, seed=1)
    accuracy, mean_macs, _ = algorithm_1(probs, labels, result.thresholds, MACS, "ensemble")
    assert mean_macs <= budget + 1e-9 and result.mean_cost == pytest.approx(mean_macs)
    assert (result.policy.origin.objective, result.policy.origin.value) == ("budget", budget)
    assert result.beta is None and result.accuracy == pytest.approx(accuracy)
    best = exhaustive_search(table, Objective(table.deepest_accuracy, None, budget=budget), min_threshold=0.0, bits=12)
    assert result.accuracy >= best.accuracy - 0.005  # the GA on 30 bits against every vector on a 12-step grid
    larger = search_thresholds(probs, labels, COSTS, budget=budget + 8, min_threshold=0.0, seed=1, generations=50)
    assert larger.accuracy >= result.accuracy - 0.002  # more budget never buys less accuracy (up to the GA's reach)


def test_a_budget_below_the_first_exit_is_reported_not_returned():
    probs, labels = synthetic_outputs(n=500)
    with pytest.raises(ValueError, match="even every sample leaving at exit 1 costs 10"):
        search_thresholds(probs, labels, COSTS, budget=9.0, generations=5)
    with pytest.raises(ValueError, match="give one objective"):
        search_thresholds(probs, labels, COSTS, budget=20.0, max_accuracy_drop=0.01)


def test_measured_milliseconds_are_a_cost_like_macs():
    """ExitCosts in ms (from an ExitLatency) behave as MACs do: speed-up and budgets in its milliseconds."""
    from timm_scan.report import ExitLatency

    probs, labels = synthetic_outputs(n=400, seed=5)
    latency = ExitLatency([1.0, 2.0, 3.0, 4.2], 4.0, 1, [3, 32, 32], "float32", "contiguous", "cpu: test")
    in_ms = ExitCosts.from_latency(latency)
    assert (in_ms.unit, in_ms.device) == ("ms", latency.describe())
    found = search_thresholds(probs, labels, in_ms, beta=1.0, seed=2, generations=20)
    scaled = search_thresholds(probs, labels, ExitCosts.macs([m / 10 for m in MACS], 4.0), beta=1.0, seed=2,
                               generations=20)
    assert found.thresholds == scaled.thresholds and found.speedup == pytest.approx(scaled.speedup)
    assert found.policy.origin.cost_unit == "ms"
    within = search_thresholds(probs, labels, in_ms, budget=2.5, seed=2, generations=20)
    assert within.mean_cost <= 2.5 and within.speedup == pytest.approx(4.0 / within.mean_cost)
    with pytest.raises(ValueError, match="cumulative"):
        ExitCosts.macs([10, 30, 20, 42], 40)
    with pytest.raises(ValueError, match="unit"):
        ExitCosts((1.0, 2.0), 2.0, "flops")
    with pytest.raises(ValueError, match="must be an ExitCosts"):
        search_thresholds(probs, labels, MACS)


def test_the_0_1_0_call_still_works_with_a_warning_and_reads_percent():
    probs, labels = synthetic_outputs(n=600, seed=6)
    new = search_thresholds(probs, labels, COSTS, max_accuracy_drop=0.01, generations=20, seed=3)
    with pytest.warns(DeprecationWarning, match="ExitCosts.macs"):
        old = search_thresholds(probs, labels, MACS, 40, max_accuracy_drop=1.0, generations=20, seed=3)
    assert old.policy == new.policy and old.accuracy == new.accuracy  # 1.0 read as points, as 0.1.0 did
    with pytest.warns(DeprecationWarning):
        points = sweep_beta(probs, labels, MACS, 40, [0.5, 2.0], generations=5)
    assert [p.beta for p in points] == [0.5, 2.0]


def test_temperatures_given_to_the_search_are_applied_and_carried_by_the_policy():
    from timm_scan import apply_temperatures

    probs, labels = synthetic_outputs(n=600, seed=7)
    temperatures = [2.0, 1.5, 1.0, 1.0]
    inside = search_thresholds(probs, labels, COSTS, temperatures=temperatures, generations=20, seed=1)
    outside = search_thresholds(apply_temperatures(probs, temperatures), labels, COSTS, generations=20, seed=1)
    assert inside.thresholds == outside.thresholds and inside.accuracy == outside.accuracy
    assert inside.policy.temperatures == tuple(temperatures) and outside.policy.temperatures is None


def test_evaluate_judges_a_target_on_test_as_the_search_set_it():
    from timm_scan import PolicyOrigin
    from timm_scan.commands.evaluate import target_held
    from timm_scan.commands.search import ThresholdRecord
    from timm_scan.deploy.thresholds import SearchResult

    def record(objective, value):
        origin = PolicyOrigin("genetic search", objective, value, "macs", 0.6, 100)
        found = SearchResult(ExitPolicy([0.5], origin=origin), 0.5, 1.5, 15.0, 1.5, [0.5, 0.5])
        return ThresholdRecord(found, "the deepest exit", 0.6, 0.0)

    budget = record("budget", 15.0)
    assert target_held(budget, 0.55, [0.5, 0.5], 0.6, [10, 20]) is True  # mean 15 MACs
    assert target_held(budget, 0.55, [0.4, 0.6], 0.6, [10, 20]) is False  # mean 16
    drop = record("max_accuracy_drop", 0.01)
    assert target_held(drop, 0.59, [0.5, 0.5], 0.60, [10, 20]) is True  # 1 point below the deepest exit's 60%
    assert target_held(drop, 0.589, [0.5, 0.5], 0.60, [10, 20]) is False
    assert target_held(record("beta", 1.0), 0.1, [0.5, 0.5], 0.6, [10, 20]) is None  # kept at β: no target


def test_the_tradeoff_plot_names_its_cost_on_the_x_axis(tmp_path, monkeypatch):
    """The axis says what the cost is (it once showed the list of relative costs instead)."""
    import matplotlib.axes

    labels = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", lambda self, text, *a, **k: labels.append(text))
    plot_tradeoff([(2.0, 80.0), (1.5, 82.0)], tmp_path / "t.png", cost="latency (batch 1)")
    assert labels == ["latency (batch 1) relative to the plain backbone"]


def test_thresholds_no_faster_than_the_backbone_say_so():
    def result(accuracy, speedup):
        return SearchResult(ExitPolicy((0.5,)), accuracy, speedup, 1.0, 0.0, [0.5, 0.5])

    assert result(0.70, 1.4).against_backbone(0.71) is None  # faster: worth deploying
    slower = result(0.70, 0.8).against_backbone(0.71)
    assert "1.25x the plain backbone's cost" in slower and "1.00 points less accurate" in slower
    assert "plain backbone serves better" in slower
    assert "buy accuracy, not speed" in result(0.72, 0.9).against_backbone(0.71)
    assert "less accurate" in result(0.70, 1.0).against_backbone(0.71)
    assert result(0.71, 1.0).against_backbone(0.71) is None
