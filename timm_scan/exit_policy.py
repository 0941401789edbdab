"""ExitPolicy: what deployment needs to decide where each sample leaves, in one frozen, validated,
serialisable object.

The threshold search returns one (`SearchResult.policy`), the model carries one (``model.policy``,
replaced, never patched in place), ``save_pretrained`` / ``from_pretrained``, the ONNX manifest and the
model card store and show it, and both predictors run it. Its values are validated here and nowhere
else. How the policy is applied (Algorithm 1, its decision rules, the ensemble) is `timm_scan.deploy.policy`.

Conventions: exits are numbered 0..K-1 from the shallowest; the last is the backbone's own head.
Thresholds are one per shallow exit (K-1), on the softmax confidence (max probability, at the exit's
temperature, of what the policy's rule decides with); temperatures are one per exit (K). Accuracies are
fractions in [0, 1].
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._io import JsonRecord

__all__ = ["FALLBACKS", "GUARANTEED_RISKS", "OBJECTIVES", "RULES", "TEMPERATURE_RANGE", "ExitPolicy", "Guarantee",
           "PolicyOrigin", "validate_fallback", "validate_rule", "validate_temperatures", "validate_thresholds"]

FALLBACKS = ("ensemble", "deepest")  # the answer for samples that pass no threshold
# what a shallow exit decides and answers with: its own softmax (SCAN Algorithm 1), or the mean softmax of every
# exit computed so far (`timm_scan.deploy.policy.decision_probs`)
RULES = ("own", "running-mean")
OBJECTIVES = ("beta", "max_accuracy_drop", "budget", "max_disagreement")  # what thresholds were chosen for
GUARANTEED_RISKS = ("accuracy_drop", "disagreement", "mean_cost")  # what a certified policy bounds
# A temperature divides an exit's logits: far below 1e-2 they overflow to inf (NaN probabilities), far above
# 1e2 every softmax is uniform. `timm_scan.calibrate` fits within [0.05, 20], inside this range.
TEMPERATURE_RANGE = (1e-2, 1e2)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number_list(values: Any) -> list[Any] | None:
    """A sequence (list, tuple, tensor, array) as a list; ``None`` for anything else."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()
    return list(values) if isinstance(values, (list, tuple)) else None


def validate_thresholds(thresholds: Sequence[float], num_exits: int | None = None) -> tuple[float, ...]:
    """One number in [0, 1] per shallow exit (``num_exits - 1`` of them, where given), or a ``ValueError``
    saying what is wrong."""
    values = _number_list(thresholds)
    if values is None:
        raise ValueError(f"thresholds must be a sequence of numbers, one per shallow exit; got {thresholds!r}")
    if num_exits is not None and len(values) != num_exits - 1:
        raise ValueError(
            f"thresholds: need one per shallow exit, {num_exits - 1} for this {num_exits}-exit model; got {len(values)}"
        )
    for i, t in enumerate(values):
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or math.isnan(t) or not 0.0 <= t <= 1.0:
            raise ValueError(f"thresholds[{i}] must be a number in [0, 1] (a softmax confidence); got {t!r}")
    return tuple(float(t) for t in values)


def validate_temperatures(temperatures: Sequence[float], num_exits: int | None = None) -> tuple[float, ...]:
    """One number in ``TEMPERATURE_RANGE`` per exit (``num_exits`` of them, where given), or a ``ValueError``."""
    values = _number_list(temperatures)
    low, high = TEMPERATURE_RANGE
    if values is None or (num_exits is not None and len(values) != num_exits) or not all(
            _real(t) and low <= t <= high for t in values):
        count = f"{num_exits} " if num_exits is not None else ""
        raise ValueError(f"temperatures must be {count}positive numbers in [{low:g}, {high:g}], one per exit "
                         f"(deepest last); got {temperatures!r}")
    return tuple(float(t) for t in values)


def validate_fallback(fallback: str) -> str:
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}; got {fallback!r}")
    return fallback


def validate_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}")
    return rule


@dataclass(frozen=True)
class Guarantee(JsonRecord):
    """What certified thresholds promise (`timm_scan.deploy.certify`): with probability at least
    ``1 − delta`` over the draw of the ``calibration_samples``, the ``risk`` (``"accuracy_drop"`` against
    ``reference``, or ``"disagreement"`` with the deepest exit's answers) on new samples is at most
    ``epsilon`` (a fraction), or, for ``"mean_cost"``, the mean cost per image by the exit cost table is at
    most ``epsilon`` (in ``cost_unit``), provided deployment samples are exchangeable with the calibration
    samples (drawn from the same distribution). ``search_samples`` proposed the candidates; ``split_seed`` drew
    the split. ``certified`` is false where no candidate passed (the policy then runs every exit and the
    deepest exit answers), and
    ``needed_samples`` says how many calibration samples could certify anything at ε and δ."""

    risk: str
    epsilon: float
    delta: float
    certified: bool
    calibration_samples: int
    search_samples: int
    split_seed: int
    p_value: float
    needed_samples: int | None = None
    reference: str = "the deepest exit"
    cost_unit: str | None = None

    def __post_init__(self) -> None:
        cost = self.risk == "mean_cost"
        checks = [("risk", self.risk in GUARANTEED_RISKS, f"one of {GUARANTEED_RISKS}"),
                  ("epsilon", _real(self.epsilon) and 0 <= self.epsilon <= (math.inf if cost else 1),
                   "a cost >= 0" if cost else "a fraction"),
                  ("cost_unit", self.cost_unit in (("macs", "ms") if cost else (None,)),
                   "'macs' or 'ms' for a mean cost, else None"),
                  ("delta", _real(self.delta) and 0 < self.delta < 1, "in (0, 1)"),
                  ("certified", isinstance(self.certified, bool), "true or false"),
                  ("calibration_samples", _integer(self.calibration_samples) and self.calibration_samples > 0,
                   "a count"),
                  ("search_samples", _integer(self.search_samples) and self.search_samples >= 0, "a count"),
                  ("p_value", _real(self.p_value) and 0 <= self.p_value <= 1, "in [0, 1]")]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"Guarantee.{name} must be {valid}; got {getattr(self, name)!r}")

    @property
    def promise(self) -> str:
        if self.risk == "mean_cost":
            what = f"a mean cost of at most {self.epsilon:g} {self.cost_unit} per image (by the exit cost table)"
        else:
            what = ("accuracy at most {e:g} points below {r}" if self.risk == "accuracy_drop"
                    else "answers differing from the deepest exit's on at most {e:g}% of samples").format(
                e=100 * self.epsilon, r=self.reference)
        if not self.certified:
            why = (f"at least {self.needed_samples} needed" if self.needed_samples is not None
                   and self.calibration_samples < self.needed_samples else
                   f"{self.needed_samples} would do only if no answer were lost; the candidates' answers differ too "
                   "often for this ε: hold out more samples, or allow a larger ε or a lower confidence")
            return (f"nothing certified for {what} at {1 - self.delta:.0%} confidence on {self.calibration_samples} "
                    f"calibration samples ({why}); every exit runs and the deepest answers")
        return (f"{what} on new data, with probability at least {1 - self.delta:.0%} over the "
                f"{self.calibration_samples} calibration samples, for data exchangeable with them")


@dataclass(frozen=True)
class PolicyOrigin(JsonRecord):
    """How a policy's thresholds were chosen, and so what they promise.

    ``method``: ``"genetic search"``, ``"exhaustive search"`` (SCAN Algorithm 2 or its grid reference) or
    ``"learn-then-test over the genetic search"`` (certified). ``objective``: ``"beta"`` (SCAN's
    trade-off, ``value`` = β), ``"max_accuracy_drop"`` (the cheapest within ``value`` of the baseline, a
    fraction: 0.005 is half a point), ``"max_disagreement"`` (the cheapest whose answers differ from the
    deepest exit's on at most ``value`` of samples) or ``"budget"`` (the most accurate within a mean
    cost of ``value`` per image, in ``cost_unit``). ``baseline_accuracy``: what the accuracy target is
    measured against (a fraction). ``samples``: the outputs searched on (or, certified, checked on), of
    the ``split`` (``None`` where a record from before the exit policy did not say). Without a
    ``guarantee`` the thresholds meet the target on those outputs only: nothing is certified for new
    data; with one (`Guarantee`), the target holds on new data with the stated confidence.
    """

    method: str
    objective: str
    value: float
    cost_unit: str
    baseline_accuracy: float
    samples: int | None
    split: str = "validation"
    min_threshold: float | None = None
    seed: int | None = None
    guarantee: Guarantee | None = None

    def __post_init__(self) -> None:
        checks = [
            ("method", isinstance(self.method, str) and bool(self.method), "a name"),
            ("objective", self.objective in OBJECTIVES, f"one of {OBJECTIVES}"),
            ("value", _real(self.value) and 0 <= self.value < math.inf, "a number >= 0"),
            ("cost_unit", self.cost_unit in ("macs", "ms"), "'macs' or 'ms'"),
            ("baseline_accuracy", _real(self.baseline_accuracy) and 0 <= self.baseline_accuracy <= 1,
             "a fraction in [0, 1]"),
            ("samples", self.samples is None or (_integer(self.samples) and self.samples > 0), "a count or None"),
            ("split", isinstance(self.split, str), "a name"),
            ("min_threshold", self.min_threshold is None or (_real(self.min_threshold)
                                                             and 0 <= self.min_threshold <= 1), "in [0, 1] or None"),
            ("seed", self.seed is None or _integer(self.seed), "an int or None"),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"PolicyOrigin.{name} must be {valid}; got {getattr(self, name)!r}")

    @property
    def promise(self) -> str:
        """What the policy promises, in words."""
        if self.guarantee is not None:
            return self.guarantee.promise
        samples = f"{self.samples} {self.split} samples" if self.samples is not None else f"{self.split} samples"
        if self.objective == "beta":
            return f"none: SCAN's trade-off at β = {self.value:g}, chosen on {samples}"
        target = (f"accuracy at most {100 * self.value:g} points below {100 * self.baseline_accuracy:.2f}%"
                  if self.objective == "max_accuracy_drop" else
                  f"a mean cost of at most {self.value:g} {self.cost_unit} per image")
        return f"{target}, met on the {samples} it was searched on; no guarantee on new data"


@dataclass(frozen=True)
class ExitPolicy(JsonRecord):
    """Where each sample leaves (SCAN Algorithm 1) and how it is answered.

    ``thresholds``: one per shallow exit (K-1 numbers in [0, 1]); a sample leaves at the first exit whose
    confidence is above its threshold. ``None``: no thresholds chosen yet (a predictor then needs a
    policy that has some). ``fallback``: the answer of samples that pass no threshold, ``"ensemble"``
    (the mean of all exits' softmax) or ``"deepest"``. ``temperatures``: one per exit (K, each in
    ``TEMPERATURE_RANGE``), dividing each exit's logits before the softmax (``timm_scan.calibrate``);
    ``None``: temperature 1.
    ``origin``: how the thresholds were chosen (`PolicyOrigin`; ``None`` for thresholds set by hand).
    ``rule`` (one of `RULES`): what shallow exit i decides with, and answers with where a sample leaves
    there: ``"own"``, its own softmax (Algorithm 1); ``"running-mean"``, the mean softmax of exits 0..i
    (a running ensemble of every exit computed). The fallback is the same under either rule. A saved
    policy without a rule (from before rules) reads as ``"own"``.

    Frozen: derive a changed policy with ``policy.replace(temperatures=...)``.
    """

    thresholds: tuple[float, ...] | None = None
    fallback: str = "ensemble"
    temperatures: tuple[float, ...] | None = None
    origin: PolicyOrigin | None = None
    rule: str = "own"

    def __post_init__(self) -> None:
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", validate_thresholds(self.thresholds))
        validate_fallback(self.fallback)
        validate_rule(self.rule)
        if self.temperatures is not None:
            object.__setattr__(self, "temperatures", validate_temperatures(self.temperatures))
        if self.origin is not None and not isinstance(self.origin, PolicyOrigin):
            raise ValueError(f"ExitPolicy.origin must be a PolicyOrigin or None; got {type(self.origin).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values; ``rule`` left out where it is ``"own"``, so that a model saved with
        Algorithm 1's rule reads as before in versions that predate rules."""
        data = super().to_dict()
        if self.rule == "own":
            del data["rule"]
        return data

    def replace(self, **changes: Any) -> ExitPolicy:
        """A copy with ``changes`` (validated). Changed thresholds, fallback, temperatures or rule drop the
        ``origin`` unless one is given: what the search promised held for the policy it searched."""
        changed = dataclasses.replace(self, **changes)
        decisive = ("thresholds", "fallback", "temperatures", "rule")
        if "origin" not in changes and any(getattr(changed, k) != getattr(self, k) for k in decisive):
            changed = dataclasses.replace(changed, origin=None)
        return changed

    def check(self, num_exits: int, *, needs_thresholds: str | None = None) -> ExitPolicy:
        """This policy, checked against a ``num_exits``-exit model (K-1 thresholds, K temperatures); with
        ``needs_thresholds`` (where to get some, in words), no thresholds at all is a ``ValueError``."""
        if self.thresholds is None:
            if needs_thresholds is not None:
                raise ValueError(f"no thresholds: pass a policy with some, ExitPolicy(thresholds=[...]) (one per "
                                 f"shallow exit), or {needs_thresholds}")
        else:
            validate_thresholds(self.thresholds, num_exits)
        if self.temperatures is not None:
            validate_temperatures(self.temperatures, num_exits)
        return self

    def describe(self) -> str:
        """One line: thresholds, the rule (where not ``"own"``), fallback, temperatures."""
        thresholds = ", ".join(f"{t:.3f}" for t in self.thresholds) if self.thresholds is not None else "none"
        text = f"thresholds {thresholds}; " + (f"rule {self.rule}; " if self.rule != "own" else "") + \
            f"fallback {self.fallback}"
        if self.temperatures is not None:
            text += "; temperatures " + ", ".join(f"{t:.3f}" for t in self.temperatures)
        return text
