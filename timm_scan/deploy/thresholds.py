"""Threshold search for scalable inference: SCAN's genetic algorithm (Algorithm 2), an exhaustive
reference on the same grid, and the β sweep that traces the accuracy / speed-up trade-off.

Each threshold is a gene of ``bits`` binary digits decoded as ``σ = 1 − (1 − σ_min) / bits · popcount``,
so σ lies on the grid {1 − (1 − σ_min)·j/bits : j = 0..bits} ⊂ [σ_min, 1]. The paper's σ_min is 0.70
(``PAPER_MIN_THRESHOLD``); the default is the full range, σ_min = 0 (``DEFAULT_MIN_THRESHOLD``), which
gave a better trade-off on test than SCAN's range in every run of ``benchmarks/threshold_choices.py``
(``benchmarks/RESULTS.md`` §13, with what it costs: a zero-drop target misses on test more often).

Costs are an `ExitCosts` (counted MACs or measured milliseconds); the speed-up of thresholds is
``backbone cost / mean cost per sample``. Accuracies are fractions in [0, 1], drops too (0.005 is half a
point). Fitness of a threshold vector is SCAN's ``speedup + β · (accuracy − baseline)`` with the
accuracies in percentage points (as in the paper, so β keeps its meaning); or, given a target,
``max_drop``: the speed-up of vectors whose accuracy is at least ``baseline − max_drop``; ``budget``
(cost units): the accuracy of vectors whose mean cost is at most the budget. Vectors that miss a target
rank below every one that meets it, by how far they miss. Everything is evaluated on cached outputs
(``probs``: one ``(N, C)`` softmax array per exit at temperature 1, deepest last) with the decision rule
of `timm_scan.deploy.policy` (the policy's ``rule``: what each shallow exit decides with), vectorised over
the population. The result holds the `ExitPolicy` to deploy. Search on validation outputs; report on test.
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..exit_costs import ExitCosts
from ..exit_policy import ExitPolicy, PolicyOrigin
from .._io import JsonRecord
from .policy import apply_temperatures, check_outputs, decision_probs, exit_index, fallback_probs
from .threads import one_torch_thread

__all__ = ["DEFAULT_BETAS", "DEFAULT_MIN_THRESHOLD", "PAPER_MIN_THRESHOLD", "ExitTable", "Objective", "SearchResult",
           "exhaustive_search", "genetic_search", "result_for"]

PAPER_MIN_THRESHOLD = 0.7  # SCAN's decoding: σ ∈ [0.70, 1.00]
DEFAULT_MIN_THRESHOLD = 0.0  # the full range, σ ∈ [0, 1]: measured better (benchmarks/RESULTS.md)
DEFAULT_BETAS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass
class ExitTable:
    """What threshold evaluation needs, precomputed once from cached outputs.

    ``confidence`` (K-1, N): each shallow exit's max of the probabilities its rule decides with (its own
    softmax, or the running mean; at the policy's temperatures). ``correct`` (K, N): whether exit i's
    answer under the rule (rows 0..K-2) or the fallback (row K-1) is right. ``costs``: what leaving at
    each exit costs. ``deepest_correct`` (N,): whether the deepest exit itself is right; its mean is
    ``deepest_accuracy`` (a fraction; the default baseline). ``policy``: the fallback, temperatures and
    rule the table was built with; the search's thresholds are added to it.
    """

    confidence: Tensor
    correct: Tensor
    costs: ExitCosts
    deepest_correct: Tensor
    policy: ExitPolicy

    @property
    def deepest_accuracy(self) -> float:
        return self.deepest_correct.double().mean().item()

    @classmethod
    def from_outputs(
        cls,
        probs: Sequence[Tensor | np.ndarray],
        labels: Tensor | np.ndarray,
        costs: ExitCosts,
        fallback: str = "ensemble",
        temperatures: Sequence[float] | None = None,
        rule: str = "own",
    ) -> ExitTable:
        """From the softmax of every exit at temperature 1 (K ``(N, C)`` tensors or arrays, deepest last),
        labels, the costs, and the fallback, temperatures and rule the thresholds will be deployed with."""
        probs, labels = check_outputs(probs, labels)
        if not isinstance(costs, ExitCosts):
            raise ValueError(f"costs must be an ExitCosts (model.exit_costs(input_size), or ExitCosts.from_latency("
                             f"measure_exit_latency(...))); got {type(costs).__name__}")
        if len(probs) != costs.num_exits:
            raise ValueError(f"probs has {len(probs)} exits but the costs have {costs.num_exits}")
        policy = ExitPolicy(None, fallback, temperatures, rule=rule).check(len(probs))
        probs = apply_temperatures(probs, policy.temperatures)
        final = fallback_probs(probs, fallback)
        decided = decision_probs(probs, rule)[:-1]
        correct = torch.stack([p.argmax(-1) == labels for p in decided] + [final.argmax(-1) == labels])
        confidence = torch.stack([p.amax(-1) for p in decided]) if decided else torch.zeros(0, len(labels))
        return cls(confidence, correct, costs, probs[-1].argmax(-1) == labels, policy)

    @property
    def num_exits(self) -> int:
        return self.costs.num_exits

    @property
    def samples(self) -> int:
        return self.correct.shape[1]

    def exit_index(self, thresholds: np.ndarray | Sequence[float]) -> Tensor:
        """``(P, N)``: the exit each sample leaves at, for thresholds ``(P, K-1)`` (or one vector)."""
        thresholds = torch.as_tensor(np.atleast_2d(thresholds), dtype=self.confidence.dtype)  # as the predictor compares
        if thresholds.ndim != 2 or thresholds.shape[1] != self.num_exits - 1:
            raise ValueError(f"thresholds: need one per shallow exit, {self.num_exits - 1} for these {self.num_exits} "
                             f"exits; got shape {tuple(thresholds.shape)}")
        return exit_index(self.confidence, thresholds)

    def evaluate(self, thresholds: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """For thresholds ``(P, K-1)``: accuracy ``(P,)`` (a fraction) and speed-up ``(P,)`` (backbone cost
        over mean cost per sample) under Algorithm 1."""
        index = self.exit_index(thresholds)
        accuracy = self.correct[index, torch.arange(index.shape[1])].double().mean(1)
        per_exit = torch.tensor(self.costs.per_exit, dtype=torch.float64)
        speedup = self.costs.backbone / per_exit[index].mean(1)
        return accuracy.numpy(), speedup.numpy()

    def exit_shares(self, thresholds: np.ndarray | Sequence[float]) -> np.ndarray:
        """``(P, K)``: share of samples leaving at each exit."""
        index = self.exit_index(thresholds)
        return torch.stack([(index == i).double().mean(1) for i in range(self.num_exits)], dim=1).numpy()


@dataclass
class SearchResult(JsonRecord):
    """What a search found: the ``policy`` to deploy (its thresholds, the fallback, temperatures and rule it
    was searched with, and its ``origin``: method, objective, split size), and on the searched outputs its
    ``accuracy`` (a fraction), ``speedup`` (backbone cost over ``mean_cost``, the mean cost per sample
    in the costs' unit), ``fitness`` and share of samples per exit; ``history``: best fitness per
    generation."""

    policy: ExitPolicy
    accuracy: float
    speedup: float
    mean_cost: float
    fitness: float
    exit_shares: list[float]
    history: list[float] = field(default_factory=list)

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self.policy.thresholds

    @property
    def acceleration(self) -> float:
        """Deprecated: `speedup`."""
        warnings.warn("SearchResult.acceleration is deprecated: use .speedup", DeprecationWarning, stacklevel=2)
        return self.speedup

    @property
    def beta(self) -> float | None:
        """The β the thresholds were searched at (``None`` for a target)."""
        origin = self.policy.origin
        return origin.value if origin is not None and origin.objective == "beta" else None

    def against_backbone(self, deepest_accuracy: float) -> str | None:
        """Where these thresholds are no faster than the plain backbone, which runs every section to the deepest
        exit without the heads (a speed-up of at most 1: the heads on the way cost at least what the sections
        that samples skip save), what they cost and gain against it, in words; ``None`` where they are faster.
        ``deepest_accuracy``: the deepest exit's on the same samples (a fraction)."""
        less = self.accuracy < deepest_accuracy
        if self.speedup > 1 or (self.speedup == 1 and not less):
            return None
        cost = f"{1 / self.speedup:.2f}x the plain backbone's cost"
        if not less:
            return (f"these thresholds are {cost}, for {100 * (self.accuracy - deepest_accuracy):+.2f} points against "
                    "it on these samples: they buy accuracy, not speed")
        return (f"these thresholds are {cost} and {100 * (deepest_accuracy - self.accuracy):.2f} points less accurate "
                "than it on these samples: the plain backbone serves better; train longer, use cheaper heads "
                "(timm-scan inspect) or allow a larger drop")


@dataclass(frozen=True)
class Objective:
    """What the search maximises (accuracies as fractions): SCAN's ``speedup + β·(accuracy − baseline)``
    with the accuracies in points; with ``max_drop`` the speed-up subject to ``accuracy >= baseline −
    max_drop``; with ``budget`` the accuracy subject to ``mean cost <= budget``, ties going to the
    cheaper."""

    baseline: float
    beta: float | None = 1.0
    max_drop: float | None = None
    budget: float | None = None

    def __post_init__(self) -> None:
        if not (_finite(self.baseline) and 0 <= self.baseline <= 1):
            raise ValueError(f"the baseline accuracy must be a fraction in [0, 1]; got {self.baseline!r}")
        if self.max_drop is not None and self.budget is not None:
            raise ValueError("give one target: max_accuracy_drop (the cheapest within it) or budget (the most "
                             "accurate within it), not both")
        if self.target is None and not (_finite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a number >= 0; got {self.beta!r}")
        if self.max_drop is not None and not (_finite(self.max_drop) and 0 <= self.max_drop <= 1):
            raise ValueError(f"max_accuracy_drop must be a fraction in [0, 1] (0.005 is half a point); got "
                             f"{self.max_drop!r}")
        if self.budget is not None and not (_finite(self.budget) and self.budget > 0):
            raise ValueError(f"budget must be a number > 0 (mean cost per image, in the costs' unit); "
                             f"got {self.budget!r}")

    @property
    def target(self) -> str | None:
        return "max_accuracy_drop" if self.max_drop is not None else "budget" if self.budget is not None else None

    @property
    def value(self) -> float:
        """β, the drop or the budget: the number the objective is set by."""
        return self.max_drop if self.max_drop is not None else self.budget if self.budget is not None else self.beta

    def fitness(self, accuracy: np.ndarray, speedup: np.ndarray, mean_cost: np.ndarray) -> np.ndarray:
        if self.max_drop is not None:
            shortfall = self.baseline - self.max_drop - accuracy
            return np.where(shortfall <= 1e-9, speedup, -shortfall)  # every miss ranks below every hit
        if self.budget is not None:
            excess = mean_cost / self.budget - 1.0
            # accuracy moves in steps of 1/N: the tie-break stays below one step for N < 10^6, speed-up < 1000
            return np.where(excess <= 1e-9, accuracy + 1e-9 * speedup, -excess)
        return speedup + self.beta * 100.0 * (accuracy - self.baseline)

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
    accuracy, speedup = table.evaluate(thresholds)
    mean_cost = table.costs.backbone / speedup
    return objective.fitness(accuracy, speedup, mean_cost), accuracy, speedup, mean_cost


def _result(table: ExitTable, thresholds: np.ndarray, objective: Objective, origin: dict[str, Any],
            history: Sequence[float] = ()) -> SearchResult:
    """The result for ``thresholds``, which must meet ``objective``'s target; ``origin``: the method, seed
    and range, for the policy's `PolicyOrigin`."""
    fit, acc, _, cost = (float(v[0]) for v in _fitness(table, thresholds[None], objective))
    if not objective.met(acc, cost):
        raise ValueError(_missed(table, objective, acc, cost))
    return result_for(table, thresholds, objective.target or "beta", float(objective.value), objective.baseline,
                      origin, fit, history)


def result_for(table: ExitTable, thresholds: np.ndarray, objective: str, value: float, baseline: float,
               origin: dict[str, Any], fitness: float | None = None, history: Sequence[float] = ()) -> SearchResult:
    """``thresholds`` evaluated on ``table`` as a `SearchResult` whose policy records how they were chosen
    (``objective`` and its ``value``, the ``baseline`` accuracy, and the ``origin`` fields: method, seed,
    range, guarantee); ``fitness`` defaults to the speed-up."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    accuracy, speedup = (float(v[0]) for v in table.evaluate(thresholds[None]))
    shares = table.exit_shares(thresholds[None])[0]
    origin = PolicyOrigin(objective=objective, value=value, cost_unit=table.costs.unit, baseline_accuracy=baseline,
                          samples=table.samples, **origin)
    policy = table.policy.replace(thresholds=[float(t) for t in thresholds], origin=origin)
    return SearchResult(policy, accuracy, speedup, table.costs.backbone / speedup,
                        speedup if fitness is None else fitness, [float(s) for s in shares],
                        [float(h) for h in history])


def _missed(table: ExitTable, objective: Objective, accuracy: float, mean_cost: float) -> str:
    """Why no threshold vector meets the objective's target, and what to do."""
    if objective.max_drop is not None:
        deepest_path = float(table.evaluate(np.ones((1, table.num_exits - 1)))[0][0])
        return (f"no thresholds reach accuracy >= {100 * (objective.baseline - objective.max_drop):.2f}% (baseline "
                f"{100 * objective.baseline:.2f}% minus {100 * objective.max_drop:g} points) on these outputs; the best "
                f"found gives {100 * accuracy:.2f}%, and sending every sample to the end gives {100 * deepest_path:.2f}% "
                "(the fallback's). Allow a larger drop, or use fallback='deepest' where the ensemble is the weaker "
                "answer.")
    cheapest = table.costs.per_exit[0]
    return (f"no thresholds keep the mean cost per image within the budget {objective.budget:g}; the best found costs "
            f"{mean_cost:g}, and even every sample leaving at exit 1 costs {cheapest:g} (the first exit's cost; a "
            "higher min_threshold can also keep samples from leaving there). Raise the budget.")


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
    origin = {"method": "genetic search", "min_threshold": float(min_threshold), "seed": int(seed)}
    if n_genes == 0:
        return _result(table, np.zeros(0), objective, origin)
    with one_torch_thread():
        thresholds, history = _evolve(table, objective, n_genes, min_threshold, bits, population, generations,
                                      crossover, mutation, np.random.default_rng(seed))
    return _result(table, thresholds, objective, origin, history)


def _evolve(table: ExitTable, objective: Objective, n_genes: int, min_threshold: float, bits: int, population: int,
            generations: int, crossover: float, mutation: float | None, rng: np.random.Generator
            ) -> tuple[np.ndarray, list[float]]:
    """`genetic_search`'s loop, its arguments checked: the best thresholds and the best fitness per generation."""
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
    return decode(best.reshape(1, n_genes, bits), bits, min_threshold)[0], history


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
    return _result(table, best, objective, {"method": "exhaustive search", "min_threshold": float(min_threshold)})
