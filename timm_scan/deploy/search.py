"""The threshold search's entry points: `search_thresholds` (one policy for one objective, empirical or
certified) and `sweep_beta` (SCAN's trade-off curve).

An objective met on the searched outputs (``beta``, or a target: ``max_accuracy_drop``,
``max_disagreement``, ``budget``) runs the genetic search of `timm_scan.deploy.thresholds` on all of
them: the thresholds meet the target there, with no guarantee on new data. With ``confidence`` the
targets are certified instead (`timm_scan.deploy.certify`): part of the outputs proposes
candidates, the rest tests them, and the target holds on new data with that probability. The result's
``policy`` records which (``policy.origin``, its ``guarantee`` and ``promise``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from ..exit_costs import ExitCosts
from ..report import ExitLatency
from .certify import certify_budget, certify_thresholds
from .policy import check_outputs
from .thresholds import DEFAULT_BETAS, ExitTable, Objective, SearchResult, genetic_search, result_for

__all__ = ["search_thresholds", "sweep_beta"]


def _legacy_arguments(costs: Any, args: tuple[Any, ...], who: str) -> tuple[ExitCosts, tuple[Any, ...]]:
    """The earlier cost arguments, ``exit_costs, backbone_cost`` (MACs) or an `ExitLatency` (with ``None`` as
    a second argument), as an `ExitCosts` and the positional arguments after them; with a
    ``DeprecationWarning``. Their accuracies were in percent: the caller converts them."""
    if isinstance(costs, ExitLatency):
        if args and args[0] is not None:
            raise ValueError("backbone_cost: an ExitLatency carries the backbone's own (in ms); pass "
                             "ExitCosts.from_latency(latency) and nothing else")
        converted, args = ExitCosts.from_latency(costs), args[1:]
        new = "ExitCosts.from_latency(latency)"
    elif isinstance(costs, (str, bytes)) or not hasattr(costs, "__len__"):
        raise ValueError(f"costs must be an ExitCosts (model.exit_costs(input_size), or "
                         f"ExitCosts.from_latency(measure_exit_latency(...))); got {type(costs).__name__}")
    else:
        if not args or args[0] is None:
            raise ValueError("costs must be an ExitCosts: ExitCosts.macs(model.exit_macs(size), "
                             "model.backbone_macs(size)), or model.exit_costs(size)")
        try:
            converted = ExitCosts.macs(costs, args[0])
        except ValueError as exc:
            raise ValueError(f"exit costs and the backbone's cost must be positive numbers, cumulative: {exc}") \
                from None
        args, new = args[1:], "ExitCosts.macs(exit_macs, backbone_macs) or model.exit_costs(size)"
    warnings.warn(f"{who}(probs, labels, exit_costs, backbone_cost, ...) is deprecated: pass costs={new}, targets "
                  "by keyword, and accuracies as fractions (0.005 for half a point); this call's accuracies are read "
                  "in percent, as before, and its result is in fractions", DeprecationWarning, stacklevel=3)
    return converted, args


def _positional(costs: Any, legacy: tuple[Any, ...], who: str, after: str) -> tuple[ExitCosts, Any, bool]:
    """``(costs, the one positional argument the earlier form took after its costs (β or the betas) or
    None, whether the call is of the earlier form)``; anything else positional is a ``TypeError``."""
    if isinstance(costs, ExitCosts):
        if legacy:
            raise TypeError(f"{who}(probs, labels, costs, *, {after}=...): pass {after} and targets by keyword; got "
                            f"the positional arguments {legacy}")
        return costs, None, False
    costs, legacy = _legacy_arguments(costs, legacy, who)
    if len(legacy) > 1:
        raise TypeError(f"{who}: unexpected positional arguments {legacy[1:]}")
    return costs, legacy[0] if legacy else None, True


def _from_percent(value: Any, name: str) -> float | None:
    """An argument of the earlier form, in percent, as a fraction (``None`` stays ``None``); a non-number is
    a ``ValueError``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number; got {value!r}")
    return value / 100


def search_thresholds(
    probs: Sequence[Tensor | np.ndarray],
    labels: Tensor | np.ndarray,
    costs: ExitCosts,
    *legacy: Any,
    beta: float | None = None,
    max_accuracy_drop: float | None = None,
    max_disagreement: float | None = None,
    budget: float | None = None,
    confidence: float | None = None,
    baseline_accuracy: float | None = None,
    fallback: str = "ensemble",
    temperatures: Sequence[float] | None = None,
    rule: str = "own",
    search_share: float = 0.5,
    split_seed: int = 0,
    **ga_options: Any,
) -> SearchResult:
    """One threshold per shallow exit, searched on cached outputs; the result's ``policy`` is what to
    deploy (``model.policy = result.policy``).

    ``probs``: every exit's softmax at temperature 1 (K ``(N, C)``, deepest last) and ``labels`` (N,),
    from a validation split. ``costs``: an `ExitCosts`, counted MACs (``model.exit_costs(size)``) or
    measured milliseconds (``ExitCosts.from_latency(measure_exit_latency(...))``).

    One objective: ``beta`` (SCAN's trade-off, default 1), or a target: ``max_accuracy_drop`` (a fraction:
    the cheapest thresholds whose accuracy is at least the baseline's minus it; 0.005 is half a point),
    ``max_disagreement`` (the cheapest whose answers differ from the deepest exit's on at most that share
    of samples) or ``budget`` (mean cost per image, in the costs' unit: the most accurate within it).
    Without ``confidence`` a target is met on these outputs (a target no thresholds meet is a
    ``ValueError``), which is no guarantee on new data. With ``confidence`` (1 − δ, e.g. 0.95) a target is
    certified (`timm_scan.deploy.certify`: ``search_share`` of the outputs, drawn with ``split_seed``,
    propose; the rest certify): a risk target where too few samples certify nothing says so and its
    policy runs every exit; a budget keeps at worst every sample at the first exit. ``baseline_accuracy`` (a fraction): the plain
    backbone's accuracy; by default the deepest exit's. ``fallback``, ``temperatures`` (one per exit,
    e.g. from ``calibrate``) and ``rule`` (what each shallow exit decides with, one of
    `timm_scan.exit_policy.RULES`) are those the policy is deployed with; the search applies the
    temperatures and the rule to ``probs`` itself. ``ga_options`` go to ``genetic_search``:
    ``min_threshold``, ``bits``, ``population``, ``generations``, ``crossover``, ``mutation``, ``seed``.
    """
    costs, extra, earlier = _positional(costs, legacy, "search_thresholds", "beta")
    if earlier:
        beta = extra if extra is not None else beta
        if max_accuracy_drop is not None or budget is not None:
            beta = None  # the earlier form always had a β, which a target overrode
        max_accuracy_drop = _from_percent(max_accuracy_drop, "max_accuracy_drop")
        baseline_accuracy = _from_percent(baseline_accuracy, "baseline_accuracy")
    given = [name for name, value in (("beta", beta), ("max_accuracy_drop", max_accuracy_drop),
                                      ("max_disagreement", max_disagreement), ("budget", budget)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"give one objective: beta, or a target (max_accuracy_drop, max_disagreement or budget), "
                         f"not {' and '.join(given)}")
    if confidence is not None:
        if not given or given == ["beta"]:
            raise ValueError("confidence certifies a target: give max_accuracy_drop=, max_disagreement= or budget= "
                             "with it")
        if budget is not None:
            if baseline_accuracy is not None:
                raise ValueError("baseline_accuracy goes with accuracy targets; a budget certifies the mean cost")
            return certify_budget(probs, labels, costs, budget=budget, confidence=confidence, fallback=fallback,
                                  temperatures=temperatures, rule=rule, search_share=search_share,
                                  split_seed=split_seed, **ga_options)
        risk = "accuracy_drop" if max_accuracy_drop is not None else "disagreement"
        return certify_thresholds(probs, labels, costs, max_risk=max_accuracy_drop if max_disagreement is None
                                  else max_disagreement, confidence=confidence, risk=risk,
                                  baseline_accuracy=baseline_accuracy, fallback=fallback, temperatures=temperatures,
                                  rule=rule, search_share=search_share, split_seed=split_seed, **ga_options)
    if max_disagreement is not None:
        if baseline_accuracy is not None:
            raise ValueError("baseline_accuracy goes with accuracy targets; disagreement is with the deepest exit")
        return _search_disagreement(probs, labels, costs, max_disagreement, fallback, temperatures, rule, ga_options)
    table = ExitTable.from_outputs(probs, labels, costs, fallback, temperatures, rule)
    baseline = table.deepest_accuracy if baseline_accuracy is None else baseline_accuracy
    objective = Objective(baseline, 1.0 if beta is None else beta, max_accuracy_drop, budget)
    return genetic_search(table, objective, **ga_options)


def _search_disagreement(probs: Sequence[Tensor | np.ndarray], labels: Tensor | np.ndarray, costs: ExitCosts,
                         epsilon: float, fallback: str, temperatures: Sequence[float] | None, rule: str,
                         ga_options: dict[str, Any]) -> SearchResult:
    """The cheapest thresholds whose answers differ from the deepest exit's on at most ``epsilon`` of these
    outputs: an accuracy target against the deepest exit's own answers; reported against ``labels``."""
    probs, labels = check_outputs(probs, labels)
    agreement = ExitTable.from_outputs(probs, probs[-1].argmax(-1), costs, fallback, temperatures, rule)
    found = genetic_search(agreement, Objective(1.0, None, epsilon), **ga_options)
    table = ExitTable.from_outputs(probs, labels, costs, fallback, temperatures, rule)
    origin = found.policy.origin
    return result_for(table, np.asarray(found.thresholds), "max_disagreement", epsilon, table.deepest_accuracy,
                      {"method": origin.method, "min_threshold": origin.min_threshold, "seed": origin.seed},
                      found.fitness, found.history)


def sweep_beta(
    probs: Sequence[Tensor | np.ndarray],
    labels: Tensor | np.ndarray,
    costs: ExitCosts,
    *legacy: Any,
    betas: Sequence[float] = DEFAULT_BETAS,
    baseline_accuracy: float | None = None,
    fallback: str = "ensemble",
    temperatures: Sequence[float] | None = None,
    rule: str = "own",
    seed: int = 0,
    **ga_options: Any,
) -> list[SearchResult]:
    """One genetic search per β: the accuracy / speed-up trade-off (SCAN Fig. 5); arguments as in
    `search_thresholds`."""
    costs, extra, earlier = _positional(costs, legacy, "sweep_beta", "betas")
    if earlier:
        betas = extra if extra is not None else betas
        baseline_accuracy = _from_percent(baseline_accuracy, "baseline_accuracy")
    table = ExitTable.from_outputs(probs, labels, costs, fallback, temperatures, rule)
    baseline = table.deepest_accuracy if baseline_accuracy is None else baseline_accuracy
    return [genetic_search(table, Objective(baseline, b), seed=seed, **ga_options) for b in betas]
