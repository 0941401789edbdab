"""Thresholds with a guarantee: Learn-then-Test (Angelopoulos et al., 2021) over the genetic search.

The validation outputs are split at random (seeded) into a *search* part and a *calibration* part.
On the search part the genetic search proposes candidate threshold vectors (the cheapest within 0 to
twice the allowed risk, and steps toward each from running every exit); running every exit comes
first, the others from the most to the least accurate on the search part, so the order does not look
at the calibration part. Fixed-sequence testing then walks that order on the calibration part: a
candidate is accepted while the p-value of the null hypothesis "its risk on new data exceeds ε" is at
most δ, and the cheapest of those accepted is returned. With probability at least 1 − δ over the draw
of the calibration samples, every accepted policy's risk on new samples from the same distribution
(exchangeable with the calibration samples) is at most ε.

Risks (exits shallowest first; the reference is the deepest exit, or a given accuracy):

* ``"accuracy_drop"``: reference accuracy − the policy's accuracy. Against the deepest exit, each
  sample's loss is 1 (the deepest is right, the policy wrong), −1 (the reverse) or 0, and the drop is
  their mean, tested by betting (Waudby-Smith and Ramdas, JRSS-B 2023: a capital process that is a
  supermartingale while the drop exceeds ε, so that it reaches 1/δ with probability at most δ); it adapts
  to how often the two disagree (a bound on each of the two shares apart would ignore that).
  Against a given accuracy ``a``, the policy's error rate is tested against ``1 − a + ε`` (exact
  binomial).
* ``"disagreement"``: the share of samples whose answer differs from the deepest exit's (exact binomial).

A mean-cost budget is certified the same way (`certify_budget`), in the other direction: candidates run
from the cheapest (every sample at the first exit, whose cost is known without any data) to the most
accurate within the budget on the search part, each sample's cost (by the exit cost table) scaled to
[0, 1] and tested by betting; the last one accepted is returned.

Where nothing can be certified (too few calibration samples for ε and δ), the result says so, with the
number of samples that would be needed at best, and its policy runs every exit and answers with the
deepest exit: the full model's answer, at no risk against the deepest exit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..exit_costs import ExitCosts
from ..exit_policy import GUARANTEED_RISKS, Guarantee
from .policy import check_outputs
from .thresholds import ExitTable, Objective, SearchResult, genetic_search, result_for

__all__ = ["ACCURACY_RISKS", "binomial_cdf", "certify_budget", "certify_thresholds", "cheapest_accepted", "drop_losses",
           "fixed_sequence", "needed_samples", "propose_budget_candidates", "propose_candidates", "rejects", "risk_p_value"]

ACCURACY_RISKS = GUARANTEED_RISKS[:2]  # certify_thresholds' risks; the mean cost is certify_budget's
CANDIDATES = 12  # targets proposed on the search part: 0 to 2ε
STEPS = (0.25, 0.5, 0.75)  # from running every exit (0) toward each of the search's proposals (1)


@functools.lru_cache(maxsize=8)
def _log_factorials(n: int) -> np.ndarray:
    """``log i!`` for i = 0..n."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) <= k)``, exactly (summed in log space)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_fact = _log_factorials(n)
    i = np.arange(k + 1)
    log_pmf = log_fact[n] - log_fact[i] - log_fact[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    top = log_pmf.max()
    return float(min(1.0, math.exp(top) * np.exp(log_pmf - top).sum()))


BET_CAP = 0.5  # the largest bet, as a share of what keeps the capital non-negative


def _log_capital(values: np.ndarray, level: float, delta: float) -> float:
    """The largest log capital of a betting test of "the mean of ``values`` (in [0, 1], in their order)
    exceeds ``level``": Waudby-Smith and Ramdas (2023), with the predictable plug-in bets for a fixed
    sample size tuned to ``delta``. Under the null hypothesis the capital is a non-negative
    supermartingale, so it reaches 1/δ with probability at most δ (Ville's inequality)."""
    y, n = np.asarray(values, dtype=np.float64), len(values)
    t = np.arange(1, n + 1)
    mean = (0.5 + np.cumsum(y)) / (t + 1)
    spread = (0.25 + np.cumsum((y - np.concatenate([[0.5], mean[:-1]])) ** 2)) / (t + 1)
    spread_before = np.concatenate([[0.25], spread[:-1]])
    bets = np.minimum(BET_CAP / (1 - level), np.sqrt(2 * math.log(1 / delta) / (n * spread_before)))
    return float(np.cumsum(np.log1p(bets * (level - y))).max())


def rejects(losses: Tensor, level: float, delta: float, bounded: bool = False) -> bool:
    """Whether "the mean loss on new data exceeds ``level``" is rejected at ``delta``: losses in {0, 1} by
    the exact binomial tail; ``bounded`` losses in [0, 1] by the betting test. Which test runs is fixed
    by the risk, never by the data."""
    if level >= 1:
        return True
    if bounded:
        return _log_capital(losses.double().numpy(), level, delta) >= math.log(1 / delta)
    return binomial_cdf(int(losses.sum()), len(losses), level) <= delta


def risk_p_value(losses: Tensor, level: float, delta: float, bounded: bool = False) -> float:
    """A valid p-value for "the mean loss on new data exceeds ``level``": the exact binomial tail for
    losses in {0, 1}; for ``bounded`` losses in [0, 1], one over the largest capital of the betting test
    whose bets are tuned to ``delta`` (so ``risk_p_value <= delta`` exactly when `rejects`)."""
    if level >= 1:
        return 0.0
    if bounded:
        return min(1.0, math.exp(-_log_capital(losses.double().numpy(), level, delta)))
    return binomial_cdf(int(losses.sum()), len(losses), level)


def drop_losses(reference_right: Tensor, right: Tensor, epsilon: float) -> tuple[Tensor, float]:
    """An accuracy drop against a reference, sample by sample, as losses in [0, 1] and their level: each
    sample's drop (1: the reference right and the policy wrong, −1: the reverse, else 0) maps to
    ``(drop + 1) / 2``, and ε to ``(ε + 1) / 2``. Betting on the pairs adapts to how often the two
    disagree (a bound on each of the two shares apart would ignore that)."""
    drop = reference_right.to(torch.float64) - right.to(torch.float64)
    return (drop + 1) / 2, (epsilon + 1) / 2


def needed_samples(risk: str, epsilon: float, delta: float) -> int:
    """The fewest calibration samples that could certify anything at ε and δ: every loss zero."""
    if not 0 < epsilon < 1:
        return 1
    if risk == "disagreement":
        return math.ceil(math.log(delta) / math.log1p(-epsilon))
    def certifies(n: int) -> bool:
        return rejects(*drop_losses(torch.zeros(n), torch.zeros(n), epsilon), delta, bounded=True)

    low, high = 0, 1
    while not certifies(high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if certifies(mid) else (mid, high)
    return high


def propose_candidates(table: ExitTable, baseline: float, max_risk: float, **ga_options: Any) -> list[np.ndarray]:
    """Threshold vectors proposed on the search part (``table``): running every exit, the genetic search's
    cheapest within 0 to 2·``max_risk`` of ``baseline``, and steps from running every exit toward each of
    those (``1 − a·(1 − t)`` for a in `STEPS`: the search jumps, and its cheapest within 0 often risks too
    much to be certified). Running every exit comes first (what any certification keeps at least), then
    the rest by accuracy on the search part, the most accurate (the least risk) first, then the most
    expensive first: the order fixed-sequence testing walks, so that it stops where the risk grows, not
    where the search happened to jump."""
    found = []
    for step in range(CANDIDATES + 1):
        objective = Objective(baseline, None, min(1.0, 2 * max_risk * step / CANDIDATES))
        try:
            found.append(np.asarray(genetic_search(table, objective, **ga_options).thresholds))
        except ValueError:  # a target the search part cannot meet
            continue
    steps = [1 - a * (1 - t) for t in found for a in STEPS]
    every = np.ones(table.num_exits - 1)
    unique = np.unique(np.round(np.stack([every, *steps, *found]), 12), axis=0)
    others = [t for t in unique if not (t == every).all()]
    if not others:
        return [every]
    accuracy, speedup = table.evaluate(np.stack(others))  # every candidate in one pass
    order = sorted(range(len(others)), key=lambda i: (-float(accuracy[i]), float(speedup[i])))
    return [every, *(others[i] for i in order)]


def cheapest_accepted(table: ExitTable, accepted: Sequence[np.ndarray]) -> np.ndarray | None:
    """The accepted candidate with the largest speed-up on ``table`` (the search part), or ``None``."""
    if not accepted:
        return None
    speedup = table.evaluate(np.stack(accepted))[1]
    return accepted[int(speedup.argmax())]


def fixed_sequence(candidates: Sequence[np.ndarray], losses: Callable[[np.ndarray], tuple[Tensor, float]],
                   delta: float, bounded: bool = False) -> list[np.ndarray]:
    """Fixed-sequence testing: walk ``candidates`` in order while "risk above the level" is rejected at
    ``delta`` on the calibration losses (``losses(thresholds)`` gives them and the level; ``bounded`` as
    in `rejects`); the candidates rejected so far, a prefix of ``candidates``. With probability at least
    1 − ``delta``, every one of them has risk at most its level, without any correction, so any of them may
    be chosen."""
    accepted = []
    for thresholds in candidates:
        if not rejects(*losses(thresholds), delta, bounded):
            break
        accepted.append(thresholds)
    return accepted


def _check_certified(confidence: float, search_share: float) -> None:
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}")
    if not 0 < search_share < 1:
        raise ValueError(f"search_share must be in (0, 1); got {search_share!r}")


def _split(n: int, search_share: float, split_seed: int) -> tuple[Tensor, Tensor]:
    """Sample indices of the search part and of the calibration part, drawn at random with ``split_seed``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_search = int(round(search_share * n))
    if not 0 < n_search < n:
        raise ValueError(f"{n} samples cannot be split into a search and a calibration part")
    return order[:n_search], order[n_search:]


def _origin(guarantee: Guarantee, ga_options: dict[str, Any]) -> dict[str, Any]:
    return {"method": "learn-then-test over the genetic search", "guarantee": guarantee, "split": "calibration",
            **{k: ga_options[k] for k in ("min_threshold", "seed") if k in ga_options}}


def certify_thresholds(
    probs: Sequence[Tensor | np.ndarray],
    labels: Tensor | np.ndarray,
    costs: ExitCosts,
    *,
    max_risk: float,
    confidence: float = 0.95,
    risk: str = "accuracy_drop",
    baseline_accuracy: float | None = None,
    fallback: str = "ensemble",
    temperatures: Sequence[float] | None = None,
    rule: str = "own",
    search_share: float = 0.5,
    split_seed: int = 0,
    **ga_options: Any,
) -> SearchResult:
    """The cheapest thresholds whose ``risk`` (``"accuracy_drop"`` or ``"disagreement"``) on new data is at
    most ``max_risk`` (a fraction) with probability at least ``confidence`` over the calibration samples
    (see the module docstring). ``search_share`` of the samples (at random, ``split_seed``) propose
    candidates, the rest certify. The result's ``policy.origin.guarantee`` records the risk, ε, δ, both
    parts' sizes, the seed, the p-value, and whether anything was certified; its accuracy (against
    ``labels``), speed-up and shares are measured on the calibration part."""
    if risk not in ACCURACY_RISKS:
        raise ValueError(f"risk must be one of {ACCURACY_RISKS} (a budget: certify_budget); got {risk!r}")
    if not (isinstance(max_risk, (int, float)) and 0 <= max_risk < 1):
        raise ValueError(f"max_risk must be a fraction in [0, 1) (0.005 is half a point); got {max_risk!r}")
    _check_certified(confidence, search_share)
    if risk == "disagreement" and baseline_accuracy is not None:
        raise ValueError("baseline_accuracy goes with risk='accuracy_drop'; disagreement is with the deepest exit")
    probs, labels = check_outputs(probs, labels)
    search, calibration = _split(len(labels), search_share, split_seed)
    # disagreement is an accuracy drop against the deepest exit's own answers
    target = probs[-1].argmax(-1) if risk == "disagreement" else labels
    table = ExitTable.from_outputs([p[search] for p in probs], target[search], costs, fallback, temperatures, rule)
    check = ExitTable.from_outputs([p[calibration] for p in probs], target[calibration], costs, fallback, temperatures,
                                   rule)
    baseline = table.deepest_accuracy if baseline_accuracy is None else baseline_accuracy

    candidates = propose_candidates(table, baseline, max_risk, **ga_options)
    index = torch.arange(len(calibration))
    bounded = risk == "accuracy_drop" and baseline_accuracy is None  # else: disagreements, or errors, in {0, 1}

    def losses(thresholds: np.ndarray) -> tuple[Tensor, float]:
        """Each calibration sample's loss under ``thresholds``, and the level it is tested against."""
        right = check.correct[check.exit_index(thresholds)[0], index]
        if baseline_accuracy is None:
            return drop_losses(check.deepest_correct, right, max_risk) if bounded else ((~right).to(torch.int8),
                                                                                        max_risk)
        return (~right).to(torch.int8), min(1.0, 1 - baseline_accuracy + max_risk)  # the error rate against 1 − a + ε

    accepted = cheapest_accepted(table, fixed_sequence(candidates, losses, 1 - confidence, bounded))
    certified = accepted is not None
    p_value = risk_p_value(*losses(accepted), 1 - confidence, bounded) if certified else 1.0
    guarantee = Guarantee(risk, float(max_risk), 1 - float(confidence), certified, len(calibration), len(search),
                          split_seed, float(p_value),
                          None if certified else needed_samples(risk, max_risk, 1 - confidence),
                          "the deepest exit" if baseline_accuracy is None else f"accuracy {baseline_accuracy:.4f}")
    chosen = accepted if certified else np.ones(table.num_exits - 1)
    # nothing certified: every exit runs and the deepest answers, which is the reference itself
    report = check if risk == "accuracy_drop" and certified else ExitTable.from_outputs(
        [p[calibration] for p in probs], labels[calibration], costs, fallback if certified else "deepest", temperatures,
        rule)
    reference = report.deepest_accuracy if baseline_accuracy is None else baseline_accuracy
    return result_for(report, chosen, "max_" + risk, float(max_risk), reference, _origin(guarantee, ga_options))


def propose_budget_candidates(table: ExitTable, budget: float, **ga_options: Any) -> list[np.ndarray]:
    """Threshold vectors proposed on the search part for a mean-cost ``budget``: every sample at the first
    exit, then the genetic search's most accurate within budgets from the first exit's cost up to
    ``budget``; ordered from the least to the most expensive on the search part."""
    cheapest = table.costs.per_exit[0]
    candidates = [np.zeros(table.num_exits - 1)]
    for step in range(1, CANDIDATES + 1):
        objective = Objective(table.deepest_accuracy, None, None, cheapest + (budget - cheapest) * step / CANDIDATES)
        try:
            candidates.append(np.asarray(genetic_search(table, objective, **ga_options).thresholds))
        except ValueError:  # a budget the search part cannot meet
            continue
    return sorted(candidates, key=lambda t: -float(table.evaluate(t)[1][0]))  # speed-up descending: cost ascending


def certify_budget(
    probs: Sequence[Tensor | np.ndarray],
    labels: Tensor | np.ndarray,
    costs: ExitCosts,
    *,
    budget: float,
    confidence: float = 0.95,
    fallback: str = "ensemble",
    temperatures: Sequence[float] | None = None,
    rule: str = "own",
    search_share: float = 0.5,
    split_seed: int = 0,
    **ga_options: Any,
) -> SearchResult:
    """The most accurate thresholds found whose mean cost per image on new data (by the exit cost table,
    in ``costs``' unit) is at most ``budget``, with probability at least ``confidence`` over the
    calibration samples. Every sample leaving at the first exit costs the first exit's cost whatever the
    data, so it is always certified where it fits; a budget below it is a ``ValueError``. Split, record
    and report as in `certify_thresholds`."""
    cheapest, dearest = costs.per_exit[0], costs.per_exit[-1]
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= cheapest):
        raise ValueError(f"budget must be a mean cost per image of at least the first exit's, {cheapest:g} "
                         f"{costs.unit} (every sample leaving there); got {budget!r}")
    _check_certified(confidence, search_share)
    probs, labels = check_outputs(probs, labels)
    search, calibration = _split(len(labels), search_share, split_seed)
    table = ExitTable.from_outputs([p[search] for p in probs], labels[search], costs, fallback, temperatures, rule)
    check = ExitTable.from_outputs([p[calibration] for p in probs], labels[calibration], costs, fallback, temperatures,
                                   rule)
    candidates = propose_budget_candidates(table, budget, **ga_options)
    per_exit = torch.tensor(costs.per_exit, dtype=torch.float64)
    span = max(dearest - cheapest, 1e-12)

    def losses(thresholds: np.ndarray) -> tuple[Tensor, float]:
        """Each calibration sample's cost under ``thresholds``, scaled to [0, 1], and the budget's level."""
        return (per_exit[check.exit_index(thresholds)[0]] - cheapest) / span, (budget - cheapest) / span

    # the first candidate (everything at the first exit) costs the first exit's cost on any data: no test
    accepted = fixed_sequence(candidates[1:], losses, 1 - confidence, bounded=True)
    chosen = accepted[-1] if accepted else candidates[0]
    p_value = risk_p_value(*losses(chosen), 1 - confidence, bounded=True) if accepted else 0.0
    guarantee = Guarantee("mean_cost", float(budget), 1 - float(confidence), True, len(calibration), len(search),
                          split_seed, float(p_value), reference=f"the exit costs in {costs.unit}",
                          cost_unit=costs.unit)
    return result_for(check, chosen, "budget", float(budget), check.deepest_accuracy, _origin(guarantee, ga_options))
