"""Thresholds with a guarantee: Learn-then-Test (Angelopoulos et al., 2021) over the genetic search.

The validation outputs are split at random (seeded) into a *search* part and a *calibration* part.
On the search part the genetic search proposes candidate threshold vectors, from running every exit
to the cheapest within twice the allowed risk; they are ordered from the most to the least expensive
on the search part, so the order does not look at the calibration part. Fixed-sequence testing then
walks that order on the calibration part: a candidate is accepted while the p-value of the null
hypothesis "its risk on new data exceeds ε" is at most δ, and the last accepted one is returned. With
probability at least 1 − δ over the draw of the calibration samples, the returned policy's risk on
new samples from the same distribution (exchangeable with the calibration samples) is at most ε.

Risks (exits shallowest first; the reference is the deepest exit, or a given accuracy):

* ``"accuracy_drop"``: reference accuracy − the policy's accuracy. Against the deepest exit, each
  sample's loss is 1 (the deepest is right, the policy wrong), −1 (the reverse) or 0, and the drop is
  their mean, tested by betting (Waudby-Smith and Ramdas, JRSS-B 2023: a capital process that is a
  supermartingale while the drop exceeds ε, so that it reaches 1/δ with probability at most δ); it adapts
  to how often the two disagree (a bound on each of the two shares apart would ignore that).
  Against a given accuracy ``a``, the policy's error rate is tested against ``1 − a + ε`` (exact
  binomial).
* ``"disagreement"``: the share of samples whose answer differs from the deepest exit's (exact binomial).

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
from ..exit_policy import Guarantee
from .policy import check_outputs
from .thresholds import ExitTable, Objective, SearchResult, genetic_search, result_for

__all__ = ["RISKS", "binomial_cdf", "certify_thresholds", "fixed_sequence", "needed_samples", "propose_candidates",
           "rejects", "risk_p_value"]

RISKS = ("accuracy_drop", "disagreement")
CANDIDATES = 12  # targets proposed on the search part: 0 to 2ε


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


def _log_capital(losses: Tensor, epsilon: float, delta: float) -> float:
    """The largest log capital of a betting test of "the mean loss exceeds ``epsilon``" over ``losses``
    (in [−1, 1], in their order): Waudby-Smith and Ramdas (2023), with the predictable plug-in bets for a
    fixed sample size tuned to ``delta``. Under the null hypothesis the capital is a non-negative
    supermartingale, so it reaches 1/δ with probability at most δ (Ville's inequality)."""
    y = (losses.double().numpy() + 1) / 2  # in [0, 1]
    m, n = (epsilon + 1) / 2, len(y)
    t = np.arange(1, n + 1)
    mean = (0.5 + np.cumsum(y)) / (t + 1)
    spread = (0.25 + np.cumsum((y - np.concatenate([[0.5], mean[:-1]])) ** 2)) / (t + 1)
    spread_before = np.concatenate([[0.25], spread[:-1]])
    bets = np.minimum(BET_CAP / (1 - m), np.sqrt(2 * math.log(1 / delta) / (n * spread_before)))
    return float(np.cumsum(np.log1p(bets * (m - y))).max())


def rejects(losses: Tensor, epsilon: float, delta: float, paired: bool = False) -> bool:
    """Whether "the mean loss on new data exceeds ``epsilon``" is rejected at level ``delta``: losses in
    {0, 1} by the exact binomial tail; ``paired`` losses in {−1, 0, 1} (an accuracy drop against the
    deepest exit, sample by sample) by the betting test. Which test runs is fixed by the risk, never by
    the data."""
    if paired:
        return _log_capital(losses, epsilon, delta) >= math.log(1 / delta)
    return epsilon >= 1 or binomial_cdf(int(losses.sum()), len(losses), epsilon) <= delta


def risk_p_value(losses: Tensor, epsilon: float, delta: float, paired: bool = False) -> float:
    """A valid p-value for "the mean loss on new data exceeds ``epsilon``": the exact binomial tail for
    losses in {0, 1}; for ``paired`` losses in {−1, 0, 1}, one over the largest capital of the betting
    test whose bets are tuned to ``delta`` (so ``risk_p_value <= delta`` exactly when `rejects`)."""
    if paired:
        return min(1.0, math.exp(-_log_capital(losses, epsilon, delta)))
    return 0.0 if epsilon >= 1 else binomial_cdf(int(losses.sum()), len(losses), epsilon)


def needed_samples(risk: str, epsilon: float, delta: float) -> int:
    """The fewest calibration samples that could certify anything at ε and δ: every loss zero."""
    if not 0 < epsilon < 1:
        return 1
    if risk == "disagreement":
        return math.ceil(math.log(delta) / math.log1p(-epsilon))
    def certifies(n: int) -> bool:
        return rejects(torch.zeros(n, dtype=torch.int8), epsilon, delta, paired=True)

    low, high = 0, 1
    while not certifies(high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if certifies(mid) else (mid, high)
    return high


def propose_candidates(table: ExitTable, baseline: float, max_risk: float, **ga_options: Any) -> list[np.ndarray]:
    """Threshold vectors proposed on the search part (``table``): running every exit, then the genetic
    search's cheapest within 0 to 2·``max_risk`` of ``baseline``; ordered from the most to the least
    expensive on the search part, the order fixed-sequence testing walks."""
    candidates = [np.ones(table.num_exits - 1)]
    for step in range(CANDIDATES + 1):
        objective = Objective(baseline, None, min(1.0, 2 * max_risk * step / CANDIDATES))
        try:
            candidates.append(np.asarray(genetic_search(table, objective, **ga_options).thresholds))
        except ValueError:  # a target the search part cannot meet
            continue
    return sorted(candidates, key=lambda t: float(table.evaluate(t)[1][0]))  # speed-up ascending: cost descending


def fixed_sequence(candidates: Sequence[np.ndarray], losses: Callable[[np.ndarray], tuple[Tensor, float]],
                   delta: float, paired: bool = False) -> np.ndarray | None:
    """Fixed-sequence testing: walk ``candidates`` in order while "risk above the level" is rejected at
    ``delta`` on the calibration losses (``losses(thresholds)`` gives them and the level; ``paired`` as in
    `rejects`); the last rejected one, or ``None``. The family-wise error is at most ``delta`` without
    any correction."""
    accepted = None
    for thresholds in candidates:
        if not rejects(*losses(thresholds), delta, paired):
            break
        accepted = thresholds
    return accepted


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
    search_share: float = 0.5,
    split_seed: int = 0,
    **ga_options: Any,
) -> SearchResult:
    """The cheapest thresholds whose ``risk`` on new data is at most ``max_risk`` (a fraction) with
    probability at least ``confidence`` over the calibration samples (see the module docstring).
    ``search_share`` of the samples (at random, ``split_seed``) propose candidates, the rest certify. The
    result's ``policy.origin.guarantee`` records the risk, ε, δ, both parts' sizes, the seed, the
    p-value, and whether anything was certified; its accuracy (against ``labels``), speed-up and shares
    are measured on the calibration part."""
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}; got {risk!r}")
    if not (isinstance(max_risk, (int, float)) and 0 <= max_risk < 1):
        raise ValueError(f"max_risk must be a fraction in [0, 1) (0.005 is half a point); got {max_risk!r}")
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}")
    if not 0 < search_share < 1:
        raise ValueError(f"search_share must be in (0, 1); got {search_share!r}")
    if risk == "disagreement" and baseline_accuracy is not None:
        raise ValueError("baseline_accuracy goes with risk='accuracy_drop'; disagreement is with the deepest exit")
    probs, labels = check_outputs(probs, labels)
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_search = int(round(search_share * n))
    if not 0 < n_search < n:
        raise ValueError(f"{n} samples cannot be split into a search and a calibration part")
    search, calibration = order[:n_search], order[n_search:]
    # disagreement is an accuracy drop against the deepest exit's own answers
    target = probs[-1].argmax(-1) if risk == "disagreement" else labels
    table = ExitTable.from_outputs([p[search] for p in probs], target[search], costs, fallback, temperatures)
    check = ExitTable.from_outputs([p[calibration] for p in probs], target[calibration], costs, fallback, temperatures)
    baseline = table.deepest_accuracy if baseline_accuracy is None else baseline_accuracy

    candidates = propose_candidates(table, baseline, max_risk, **ga_options)
    index = torch.arange(len(calibration))
    reference_right = check.deepest_correct
    paired = risk == "accuracy_drop" and baseline_accuracy is None  # else: disagreements, or errors, in {0, 1}

    def losses(thresholds: np.ndarray) -> tuple[Tensor, float]:
        """Each calibration sample's loss under ``thresholds``, and the risk level it is tested against."""
        right = check.correct[check.exit_index(thresholds)[0], index]
        if baseline_accuracy is None:
            return reference_right.to(torch.int8) - right.to(torch.int8), max_risk
        return (~right).to(torch.int8), min(1.0, 1 - baseline_accuracy + max_risk)  # the error rate against 1 − a + ε

    accepted = fixed_sequence(candidates, losses, 1 - confidence, paired)
    certified = accepted is not None
    p_value = risk_p_value(*losses(accepted), 1 - confidence, paired) if certified else 1.0
    guarantee = Guarantee(risk, float(max_risk), 1 - float(confidence), certified, len(calibration), n_search,
                          split_seed, float(p_value),
                          None if certified else needed_samples(risk, max_risk, 1 - confidence),
                          "the deepest exit" if baseline_accuracy is None else f"accuracy {baseline_accuracy:.4f}")
    chosen = accepted if certified else np.ones(table.num_exits - 1)
    origin = {"method": "learn-then-test over the genetic search", "guarantee": guarantee, "split": "calibration",
              **{k: ga_options[k] for k in ("min_threshold", "seed") if k in ga_options}}
    # nothing certified: every exit runs and the deepest answers, which is the reference itself
    report = check if risk == "accuracy_drop" and certified else ExitTable.from_outputs(
        [p[calibration] for p in probs], labels[calibration], costs, fallback if certified else "deepest", temperatures)
    reference = report.deepest_accuracy if baseline_accuracy is None else baseline_accuracy
    return result_for(report, chosen, "max_" + risk, float(max_risk), reference, origin)
