"""How an `ExitPolicy` decides (SCAN Algorithm 1 and its decision rules), the ensemble, and temperature
scaling: their one definition, with the checks of cached outputs every consumer of them shares.

Exits are indexed 0..K-1 from the shallowest; K-1 is the deepest (the backbone's own head). A sample
leaves at the first shallow exit whose confidence (the max of the probabilities that exit decides with)
is above that exit's threshold (`leaves`) and is answered with those probabilities; a sample that
passes no threshold runs every section and gets the fallback: the ensemble (the mean of all K exits'
softmax, `ensemble_probs`) or the deepest exit's own answer. What a shallow exit decides with is the
policy's rule (`decision_probs`, one step at a time `decision_step`): its own softmax (``"own"``) or
the mean softmax of every exit computed so far (``"running-mean"``). Confidences are taken at the
policy's temperatures (`apply_temperatures` on cached softmax outputs; the predictors divide the
logits).
`EarlyExitPredictor` runs this policy section by section; `exit_index` evaluates it on cached outputs
for many threshold vectors at once (the threshold search), and `simulate_early_exit` is the
reference the predictor is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..exit_policy import ExitPolicy, validate_fallback, validate_rule, validate_temperatures
from ..report import ExitAccuracy

__all__ = ["apply_temperatures", "check_outputs", "decision_probs", "decision_step", "ensemble_probs", "exit_accuracy",
           "exit_index", "fallback_probs", "leaves", "log_probs", "simulate_early_exit"]


def as_tensor(values: Tensor | np.ndarray) -> Tensor:
    """An array or tensor as a tensor (no copy where it already is one)."""
    return values if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values))


def log_probs(probs: Tensor) -> Tensor:
    """``log p`` with underflowed zeros held at the smallest normal float (a finite, very negative logit)."""
    return as_tensor(probs).double().clamp_min(torch.finfo(torch.float32).tiny).log()


def apply_temperatures(probs: Sequence[Tensor | np.ndarray], temperatures: Sequence[float] | None) -> list[Tensor]:
    """Each exit's softmax re-taken at its temperature, ``softmax(log p / T)`` (float32); ``None``
    returns the probabilities unchanged."""
    if temperatures is None:
        return [as_tensor(p) for p in probs]
    validate_temperatures(temperatures, len(probs))
    return [torch.softmax(log_probs(p) / t, dim=-1).float() for p, t in zip(probs, temperatures)]


def check_outputs(probs: Sequence[Tensor | np.ndarray], labels: Tensor | np.ndarray) -> tuple[list[Tensor], Tensor]:
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


def leaves(confidence: Tensor | float, threshold: Tensor | float) -> Tensor | bool:
    """Algorithm 1's test: a sample with this confidence leaves at an exit with this threshold."""
    return confidence > threshold


def ensemble_probs(exit_probs: Sequence[Tensor]) -> Tensor:
    """The ensemble of ``exit_probs`` (softmax probabilities ``(N, C)`` of each exit): their mean."""
    return torch.stack([p.float() for p in exit_probs]).mean(0)


def exit_accuracy(exit_probs: Sequence[Tensor], labels: Tensor) -> ExitAccuracy:
    """Accuracy of every exit and of the ensemble (``None`` for a single exit) on these outputs."""
    def accuracy(probs: Tensor) -> float:
        return (probs.argmax(-1) == labels).double().mean().item()

    ensemble = accuracy(ensemble_probs(exit_probs)) if len(exit_probs) > 1 else None
    return ExitAccuracy([accuracy(p) for p in exit_probs], ensemble, len(labels))


def fallback_probs(exit_probs: Sequence[Tensor], fallback: str) -> Tensor:
    """What a sample that passes no threshold is answered with: the ensemble or the deepest exit."""
    validate_fallback(fallback)
    return ensemble_probs(exit_probs) if fallback == "ensemble" else exit_probs[-1].float()


def decision_step(rule: str, probs: Tensor, total: Tensor | None, i: int) -> tuple[Tensor, Tensor | None]:
    """Shallow exit i under ``rule``, as the predictors take it exit by exit: from exit i's own softmax
    ``probs`` ``(N, C)`` and ``total``, the running sum of exits 0..i-1's softmax for the same rows
    (``None`` at exit 0, and always under ``"own"``), the probabilities exit i decides and answers with
    and the running sum to carry to exit i+1 (drop its rows as samples leave). ``"running-mean"``
    averages in float32, summing in exit order."""
    if rule == "own":
        return probs, None
    total = probs.float() if total is None else total + probs.float()
    return total / (i + 1), total


def decision_probs(exit_probs: Sequence[Tensor], rule: str) -> list[Tensor]:
    """The probabilities each exit decides and answers with under ``rule`` (``exit_probs``: K softmax
    ``(N, C)``, deepest last): at shallow exit i its own softmax (``"own"``, the tensors themselves) or the
    mean of exits 0..i's (``"running-mean"``, `decision_step`); the deepest exit's own softmax last under
    either rule."""
    validate_rule(rule)
    decided, total = [], None
    for i, probs in enumerate(exit_probs[:-1]):
        probs, total = decision_step(rule, probs, total, i)
        decided.append(probs)
    return [*decided, exit_probs[-1]]


def exit_index(confidence: Tensor, thresholds: Tensor) -> Tensor:
    """Algorithm 1 for many threshold vectors at once: ``confidence`` ``(K-1, N)`` (each shallow exit's max
    of the probabilities it decides with, `decision_probs`), ``thresholds`` ``(P, K-1)`` → ``(P, N)``: the
    exit each sample leaves at."""
    shallow, n = confidence.shape
    passed = leaves(confidence[None], thresholds[:, :, None])  # (P, K-1, N)
    index = torch.full((len(thresholds), n), shallow, dtype=torch.int64, device=confidence.device)
    for i in reversed(range(shallow)):  # the first passing exit wins
        index = torch.where(passed[:, i], i, index)
    return index


def simulate_early_exit(
    exit_probs: Sequence[Tensor], policy: ExitPolicy, *earlier: Any, **earlier_keywords: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1 on precomputed probabilities of every exit (``(N, C)`` each at temperature 1, deepest
    last) under ``policy`` (its temperatures applied first, then its rule, `decision_probs`):
    ``(exit_index (N,), confidence (N,), probs (N, C))`` of the answer each sample gets."""
    if not isinstance(policy, ExitPolicy) or earlier or earlier_keywords:
        raise TypeError("simulate_early_exit(exit_probs, policy) takes an ExitPolicy: pass "
                        "ExitPolicy(thresholds, fallback) instead of the thresholds and fallback")
    policy.check(len(exit_probs), needs_thresholds="give the policy some")
    exit_probs = apply_temperatures(exit_probs, policy.temperatures)
    stacked = torch.stack([p.float() for p in decision_probs(exit_probs, policy.rule)])  # (K, N, C)
    index = exit_index(stacked[:-1].amax(-1), torch.tensor([policy.thresholds]))[0]
    probs = fallback_probs(exit_probs, policy.fallback).clone()
    for i in range(len(stacked) - 1):
        left_here = index == i
        probs[left_here] = stacked[i][left_here]
    return index, probs.amax(-1), probs
