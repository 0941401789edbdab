"""Threshold search for scalable inference: SCAN's genetic algorithm (Algorithm 2), an exhaustive
reference on the same grid, and the β sweep that traces the accuracy / acceleration trade-off.

Each threshold is a gene of ``bits`` binary digits decoded as ``σ = 1 − (1 − σ_min) / bits · popcount``,
so σ lies on the grid {1 − (1 − σ_min)·j/bits : j = 0..bits} ⊂ [σ_min, 1]. The paper's σ_min is 0.70
(``PAPER_MIN_THRESHOLD``); the default is the full range, σ_min = 0 (``DEFAULT_MIN_THRESHOLD``), which
gave a better trade-off on test than SCAN's range in every run of ``benchmarks/threshold_choices.py``
(``benchmarks/RESULTS.md`` §13, with what it costs: a zero-drop target misses on test more often). The cost of leaving at each exit is MACs (the paper's) or measured
milliseconds (an `ExitLatency`); acceleration is ``backbone cost / mean cost per sample``. Fitness of a
threshold vector is SCAN's ``acceleration + β · (accuracy − baseline)``, with accuracy in percent; or,
given a target, ``max_drop`` (points): the acceleration of vectors whose accuracy is at least
``baseline − max_drop``; ``budget`` (cost units): the accuracy of vectors whose mean cost is at most
the budget. Vectors that miss a target rank below every one that meets it, by how far they miss.
Everything is evaluated on cached outputs (``probs``: one
``(N, C)`` array per exit, deepest last) with the policy of `timm_scan.deploy.policy`, vectorised over
the population. Search on validation outputs; report on test.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..report import ExitLatency, JsonRecord
from .policy import exit_index, fallback_probs
from .threads import one_torch_thread

__all__ = ["DEFAULT_MIN_THRESHOLD", "PAPER_MIN_THRESHOLD", "ExitTable", "Objective", "SearchResult", "exhaustive_search", "genetic_search",
           "search_thresholds", "sweep_beta"]

PAPER_MIN_THRESHOLD = 0.7  # SCAN's decoding: σ ∈ [0.70, 1.00]
DEFAULT_MIN_THRESHOLD = 0.0  # the full range, σ ∈ [0, 1]: measured better (benchmarks/RESULTS.md)


@dataclass
class ExitTable:
    """What threshold evaluation needs, precomputed once from cached outputs.

    ``confidence`` (K-1, N): max softmax of each shallow exit. ``correct`` (K, N): whether exit i
    (rows 0..K-2) or the fallback (row K-1) is right. ``exit_costs`` (K,): cumulative cost of leaving at
    each exit (MACs or ms per image), and ``backbone_cost`` the plain backbone's in the same unit.
    ``deepest_accuracy``: the deepest exit's own accuracy in percent (the default fitness baseline).
    """

    confidence: Tensor
    correct: Tensor
    exit_costs: Tensor
    backbone_cost: float
    deepest_accuracy: float

    @classmethod
    def from_outputs(
        cls,
        probs: Sequence[Tensor | np.ndarray],
        labels: Tensor | np.ndarray,
        exit_costs: Sequence[float] | ExitLatency,
        backbone_cost: float | None = None,
        fallback: str = "ensemble",
    ) -> ExitTable:
        """From the softmax of every exit (K ``(N, C)`` tensors or arrays, deepest last), labels, and
        the cost of each exit (see `costs`)."""
        probs, labels = _checked_outputs(probs, labels)
        exit_costs, backbone_cost = costs(exit_costs, backbone_cost)
        if len(probs) != len(exit_costs):
            raise ValueError(f"probs has {len(probs)} exits but the exit costs have {len(exit_costs)}")
        final = fallback_probs(probs, fallback)
        correct = torch.stack([p.argmax(-1) == labels for p in probs[:-1]] + [final.argmax(-1) == labels])
        confidence = torch.stack([p.amax(-1) for p in probs[:-1]]) if len(probs) > 1 else torch.zeros(0, len(labels))
        deepest = 100.0 * (probs[-1].argmax(-1) == labels).float().mean().item()
        return cls(confidence, correct, torch.tensor(exit_costs, dtype=torch.float64), backbone_cost, deepest)

    @property
    def num_exits(self) -> int:
        return len(self.exit_costs)

    def exit_index(self, thresholds: np.ndarray | Sequence[float]) -> Tensor:
        """``(P, N)``: the exit each sample leaves at, for thresholds ``(P, K-1)`` (or one vector)."""
        thresholds = torch.as_tensor(np.atleast_2d(thresholds), dtype=self.confidence.dtype)  # as the predictor compares
        if thresholds.ndim != 2 or thresholds.shape[1] != self.num_exits - 1:
            raise ValueError(f"thresholds: need one per shallow exit, {self.num_exits - 1} for these {self.num_exits} "
                             f"exits; got shape {tuple(thresholds.shape)}")
        return exit_index(self.confidence, thresholds)

    def evaluate(self, thresholds: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """For thresholds ``(P, K-1)``: accuracy in percent ``(P,)`` and acceleration ``(P,)`` (backbone
        cost over mean cost per sample) under Algorithm 1."""
        index = self.exit_index(thresholds)
        accuracy = 100.0 * self.correct[index, torch.arange(index.shape[1])].double().mean(1)
        acceleration = self.backbone_cost / self.exit_costs[index].mean(1)
        return accuracy.numpy(), acceleration.numpy()

    def exit_shares(self, thresholds: np.ndarray | Sequence[float]) -> np.ndarray:
        """``(P, K)``: share of samples leaving at each exit."""
        index = self.exit_index(thresholds)
        return torch.stack([(index == i).double().mean(1) for i in range(self.num_exits)], dim=1).numpy()


def costs(exit_costs: Sequence[float] | ExitLatency, backbone_cost: float | None = None) -> tuple[list[float], float]:
    """``(exit_costs, backbone_cost)`` validated: K cumulative costs of leaving at each exit (MACs from
    ``model.exit_macs``, or an `ExitLatency` whose ``ms_per_image`` and, by default,
    ``backbone_ms_per_image`` are used) and the plain backbone's cost in the same unit."""
    if isinstance(exit_costs, ExitLatency):
        if backbone_cost is not None:
            raise ValueError("backbone_cost: an ExitLatency carries the backbone's own (in ms); give no second one "
                             "(and pass beta by keyword: beta=...)")
        exit_costs, backbone_cost = exit_costs.ms_per_image, exit_costs.backbone_ms_per_image
    if backbone_cost is None:
        raise ValueError("backbone_cost: the plain backbone's cost is needed with exit costs in MACs "
                         "(model.backbone_macs(input_size)); an ExitLatency carries its own")
    values = None if isinstance(exit_costs, (str, bytes)) or not hasattr(exit_costs, "__len__") else [
        *exit_costs, backbone_cost]
    if not values or not all(isinstance(m, numbers.Real) and not isinstance(m, bool) and 0 < m < math.inf for m in values):
        raise ValueError(f"exit costs and the backbone's cost must be positive numbers; got {exit_costs!r}, {backbone_cost!r}")
    if any(b < a for a, b in zip(values, values[1:-1])):
        raise ValueError(f"exit costs must be cumulative (non-decreasing from the shallowest exit); got {list(exit_costs)}")
    return [float(c) for c in exit_costs], float(backbone_cost)


def _checked_outputs(probs: Sequence[Tensor | np.ndarray], labels: Tensor | np.ndarray) -> tuple[list[Tensor], Tensor]:
    """Softmax probabilities of each exit (K arrays ``(N, C)``) and integer labels in [0, C), or a
    ``ValueError`` saying what they are instead."""
    try:
        probs = [torch.as_tensor(np.asarray(p) if not isinstance(p, Tensor) else p) for p in probs]
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"probs must be K arrays (N, C) of numbers and labels N integers ({exc})") from None
    if not probs or any(p.ndim != 2 or p.shape != probs[0].shape or not (p.is_floating_point()) for p in probs):
        raise ValueError(f"probs must be K float arrays of one shape (N, C); got shapes {[tuple(p.shape) for p in probs]}")
    n, classes = probs[0].shape
    if labels.ndim != 1 or len(labels) != n or n == 0:
        raise ValueError(f"labels must be N = {n} > 0 class indices, one per row of probs; got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be integers (class indices); got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"labels must be class indices in [0, {classes}); got values from {labels.min().item()} to "
                         f"{labels.max().item()}")
    probs = [p.float() for p in probs]
    for i, p in enumerate(probs):
        if not torch.isfinite(p).all() or p.min() < 0 or (p.sum(-1) - 1).abs().max() > 1e-3:
            raise ValueError(f"probs[{i}] are not softmax probabilities (finite, non-negative, each row summing to 1); "
                             "pass torch.softmax(logits, -1), not logits")
    return probs, labels


@dataclass
class SearchResult(JsonRecord):
    """Best thresholds found (one per shallow exit), their accuracy (percent), acceleration (backbone
    cost over ``mean_cost``, the mean cost per sample in the costs' unit), fitness and share of samples
    per exit; the objective (``beta``, or the target ``max_drop`` or ``budget``); ``history``: best
    fitness per generation."""

    thresholds: list[float]
    accuracy: float
    acceleration: float
    fitness: float
    exit_shares: list[float]
    beta: float | None
    history: list[float] = field(default_factory=list)
    max_drop: float | None = None
    budget: float | None = None
    mean_cost: float | None = None


@dataclass(frozen=True)
class Objective:
    """What the search maximises (accuracies in percent): SCAN's ``acceleration + β·(accuracy −
    baseline)``; with ``max_drop`` the acceleration subject to ``accuracy >= baseline − max_drop``;
    with ``budget`` the accuracy subject to ``mean cost <= budget``, ties going to the cheaper."""

    baseline: float
    beta: float | None = 1.0
    max_drop: float | None = None
    budget: float | None = None

    def __post_init__(self) -> None:
        if not _finite(self.baseline):
            raise ValueError(f"the baseline accuracy must be a number (percent); got {self.baseline!r}")
        if self.max_drop is not None and self.budget is not None:
            raise ValueError("give one target: max_accuracy_drop (the cheapest within it) or budget (the most "
                             "accurate within it), not both")
        if self.target is None and not (_finite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a number >= 0; got {self.beta!r}")
        if self.max_drop is not None and not (_finite(self.max_drop) and self.max_drop >= 0):
            raise ValueError(f"max_accuracy_drop must be a number >= 0 (points); got {self.max_drop!r}")
        if self.budget is not None and not (_finite(self.budget) and self.budget > 0):
            raise ValueError(f"budget must be a number > 0 (mean cost per image, in the exit costs' unit); "
                             f"got {self.budget!r}")

    @property
    def target(self) -> str | None:
        return "max_drop" if self.max_drop is not None else "budget" if self.budget is not None else None

    def fitness(self, accuracy: np.ndarray, acceleration: np.ndarray, mean_cost: np.ndarray) -> np.ndarray:
        if self.max_drop is not None:
            shortfall = self.baseline - self.max_drop - accuracy
            return np.where(shortfall <= 1e-9, acceleration, -shortfall)  # every miss ranks below every hit
        if self.budget is not None:
            excess = mean_cost / self.budget - 1.0
            # accuracy moves in steps of 100/N: the tie-break stays below one step for N < 10^6, speed-up < 1000
            return np.where(excess <= 1e-9, accuracy + 1e-7 * acceleration, -excess)
        return acceleration + self.beta * (accuracy - self.baseline)

    def met(self, accuracy: float, mean_cost: float) -> bool:
        if self.max_drop is not None:
            return accuracy >= self.baseline - self.max_drop - 1e-9
        return self.budget is None or mean_cost <= self.budget * (1 + 1e-9)


def _finite(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: object, least: int, most: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and least <= value <= most


def decode(genes: np.ndarray, bits: int, min_threshold: float = PAPER_MIN_THRESHOLD) -> np.ndarray:
    """Bit genes ``(P, K-1, bits)`` → thresholds ``(P, K-1)``: σ = 1 − (1 − σ_min)/bits·popcount."""
    return 1.0 - ((1.0 - min_threshold) / bits) * genes.sum(-1)


def _fitness(table: ExitTable, thresholds: np.ndarray, objective: Objective) -> tuple[np.ndarray, ...]:
    accuracy, acceleration = table.evaluate(thresholds)
    mean_cost = table.backbone_cost / acceleration
    return objective.fitness(accuracy, acceleration, mean_cost), accuracy, acceleration, mean_cost


def _result(table: ExitTable, thresholds: np.ndarray, objective: Objective, history=()) -> SearchResult:
    fit, acc, accel, cost = (float(v[0]) for v in _fitness(table, thresholds[None], objective))
    if not objective.met(acc, cost):
        raise ValueError(_missed(table, objective, acc, cost))
    shares = table.exit_shares(thresholds[None])[0]
    return SearchResult(
        [float(t) for t in thresholds], acc, accel, fit, [float(s) for s in shares],
        objective.beta if objective.target is None else None, list(history), objective.max_drop, objective.budget, cost,
    )


def _missed(table: ExitTable, objective: Objective, accuracy: float, mean_cost: float) -> str:
    """Why no threshold vector meets the objective's target, and what to do."""
    if objective.max_drop is not None:
        deepest_path = float(table.evaluate(np.ones((1, table.num_exits - 1)))[0][0])
        return (f"no thresholds reach accuracy >= {objective.baseline - objective.max_drop:.2f}% (baseline "
                f"{objective.baseline:.2f}% minus {objective.max_drop:g} points) on these outputs; the best found gives "
                f"{accuracy:.2f}%, and sending every sample to the end gives {deepest_path:.2f}% (the fallback's). "
                "Allow a larger drop, or use fallback='deepest' where the ensemble is the weaker answer.")
    cheapest = float(table.exit_costs[0])
    return (f"no thresholds keep the mean cost per image within the budget {objective.budget:g}; the best found costs "
            f"{mean_cost:g}, and even every sample leaving at exit 1 costs {cheapest:g} (the first exit's cost; a "
            "higher min_threshold can also keep samples from leaving there). Raise the budget.")


def baseline_accuracy_of(table: ExitTable, baseline_accuracy: float | None) -> float:
    """The given baseline (percent: the plain backbone's), else the deepest exit's own accuracy."""
    return float(table.deepest_accuracy if baseline_accuracy is None else baseline_accuracy)


def search_thresholds(
    probs: Sequence[Tensor | np.ndarray],
    labels: Tensor | np.ndarray,
    exit_costs: Sequence[float] | ExitLatency,
    backbone_cost: float | None = None,
    beta: float = 1.0,
    *,
    max_accuracy_drop: float | None = None,
    budget: float | None = None,
    baseline_accuracy: float | None = None,
    fallback: str = "ensemble",
    **ga_options,
) -> SearchResult:
    """SCAN's genetic search for one threshold per shallow exit, on cached outputs.

    ``exit_costs``: the cumulative cost of leaving at each exit, MACs (``model.exit_macs(size)``, with
    ``backbone_cost = model.backbone_macs(size)``) or an `ExitLatency` from ``measure_exit_latency``
    (milliseconds per image, the backbone's included). By default the search maximises SCAN's
    trade-off with ``beta``. With a target it finds, on these outputs: ``max_accuracy_drop`` (points),
    the cheapest thresholds whose accuracy is at least the baseline's minus that drop; ``budget`` (mean
    cost per image, in the costs' unit), the most accurate thresholds that cost at most that. A target
    no threshold vector meets is a ``ValueError``. ``baseline_accuracy`` (percent): the plain backbone's
    accuracy; by default the deepest exit's. ``ga_options`` go to ``genetic_search``: ``min_threshold``,
    ``bits``, ``population``, ``generations``, ``crossover``, ``mutation``, ``seed``.
    """
    table = ExitTable.from_outputs(probs, labels, exit_costs, backbone_cost, fallback)
    objective = Objective(baseline_accuracy_of(table, baseline_accuracy), beta, max_accuracy_drop, budget)
    return genetic_search(table, objective, **ga_options)


def genetic_search(
    table: ExitTable,
    objective: Objective,
    *,
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
    bits: int = 30,
    population: int = 64,
    generations: int = 100,
    crossover: float = 0.8,
    mutation: float | None = None,
    seed: int = 0,
) -> SearchResult:
    """The genetic algorithm on a prepared ``ExitTable``, thresholds in ``[min_threshold, 1]``.

    Each generation keeps the best individual (elitism), picks parents with probability
    proportional to fitness (shifted to be positive), applies one-point crossover with probability
    ``crossover`` and flips each bit with probability ``mutation`` (default 1 / genome length).
    """
    checks = [("min_threshold", min_threshold, _finite(min_threshold) and 0.0 <= min_threshold < 1.0, "in [0, 1)"),
              ("bits", bits, _count(bits, 1, 64), "an int in [1, 64]"),
              ("population", population, _count(population, 2, 100_000), "an int in [2, 100000]"),
              ("generations", generations, _count(generations, 1, 100_000), "an int in [1, 100000]"),
              ("crossover", crossover, _finite(crossover) and 0 <= crossover <= 1, "in [0, 1]"),
              ("mutation", mutation, mutation is None or (_finite(mutation) and 0 <= mutation <= 1), "in [0, 1] or None")]
    for name, value, ok, valid in checks:
        if not ok:
            raise ValueError(f"{name} must be {valid}; got {value!r}")
    n_genes = table.num_exits - 1
    if n_genes == 0:
        return _result(table, np.zeros(0), objective)
    with one_torch_thread():
        return _evolve(table, objective, n_genes, min_threshold, bits, population, generations, crossover, mutation,
                       np.random.default_rng(seed))


def _evolve(table: ExitTable, objective: Objective, n_genes: int, min_threshold: float, bits: int, population: int,
            generations: int, crossover: float, mutation: float | None, rng: np.random.Generator) -> SearchResult:
    """`genetic_search`'s loop, its arguments checked."""
    length = n_genes * bits
    mutation = 1.0 / length if mutation is None else mutation
    pop = rng.random((population, length)) < rng.random((population, 1))  # varied bit densities
    history = []
    best, best_fit = pop[0], -np.inf
    for _ in range(generations):
        fit = _fitness(table, decode(pop.reshape(population, n_genes, bits), bits, min_threshold), objective)[0]
        top = int(fit.argmax())
        if fit[top] > best_fit:
            best, best_fit = pop[top].copy(), float(fit[top])
        history.append(best_fit)
        weights = fit - fit.min() + 1e-9
        parents = pop[rng.choice(population, size=(population, 2), p=weights / weights.sum())]
        cut = rng.integers(1, length, size=population)[:, None]
        do_cross = (rng.random(population) < crossover)[:, None]
        take_second = do_cross & (np.arange(length)[None] >= cut)
        children = np.where(take_second, parents[:, 1], parents[:, 0])
        children ^= rng.random(children.shape) < mutation
        children[0] = best  # elitism
        pop = children
    return _result(table, decode(best.reshape(1, n_genes, bits), bits, min_threshold)[0], objective, history)


def exhaustive_search(
    table: ExitTable, objective: Objective, *, min_threshold: float = DEFAULT_MIN_THRESHOLD, bits: int = 30,
    chunk: int = 4096,
) -> SearchResult:
    """Every threshold vector on the GA's grid (``(bits+1)^(K-1)`` of them): the reference for small K."""
    grid = 1.0 - (1.0 - min_threshold) * np.arange(bits + 1) / bits
    combos = np.array(list(itertools.product(grid, repeat=table.num_exits - 1)))
    best, best_fit = combos[0], -np.inf
    for start in range(0, len(combos), chunk):
        block = combos[start : start + chunk]
        fit = _fitness(table, block, objective)[0]
        if fit.max() > best_fit:
            best, best_fit = block[int(fit.argmax())], float(fit.max())
    return _result(table, best, objective)


def sweep_beta(
    probs: Sequence[Tensor | np.ndarray],
    labels: np.ndarray,
    exit_costs: Sequence[float] | ExitLatency,
    backbone_cost: float | None = None,
    betas: Sequence[float] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
    *,
    baseline_accuracy: float | None = None,
    fallback: str = "ensemble",
    seed: int = 0,
    **ga_kwargs,
) -> list[SearchResult]:
    """One genetic search per β: the accuracy / acceleration trade-off (SCAN Fig. 5); costs as in
    `search_thresholds`."""
    table = ExitTable.from_outputs(probs, labels, exit_costs, backbone_cost, fallback)
    baseline = baseline_accuracy_of(table, baseline_accuracy)
    return [genetic_search(table, Objective(baseline, b), seed=seed, **ga_kwargs) for b in betas]
