"""The exit policy of scalable inference (SCAN Algorithm 1) and the ensemble: their one definition.

Exits are indexed 0..K-1 from the shallowest; K-1 is the deepest (the backbone's own head). A sample
leaves at the first shallow exit whose confidence (max softmax) is above that exit's threshold
(`leaves`); a sample that passes no threshold runs every section and gets the fallback: the ensemble
(the mean of all K exits' softmax, `ensemble_probs`) or the deepest exit's own answer.
`EarlyExitPredictor` runs this policy section by section; `exit_index` evaluates it on cached outputs
for many threshold vectors at once (the threshold search), and `simulate_early_exit` is the
reference the predictor is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..model.config import validate_fallback, validate_thresholds
from ..report import ExitAccuracy

__all__ = ["ensemble_probs", "exit_accuracy", "exit_index", "fallback_probs", "leaves", "simulate_early_exit"]


def leaves(confidence: Tensor | float, threshold: Tensor | float) -> Tensor | bool:
    """Algorithm 1's test: a sample with this confidence leaves at an exit with this threshold."""
    return confidence > threshold


def ensemble_probs(exit_probs: Sequence[Tensor]) -> Tensor:
    """The ensemble of ``exit_probs`` (softmax probabilities ``(N, C)`` of each exit): their mean."""
    return torch.stack([p.float() for p in exit_probs]).mean(0)


def exit_accuracy(exit_probs: Sequence[Tensor], labels: Tensor) -> ExitAccuracy:
    """Accuracy of every exit and of the ensemble (``None`` for a single exit) on these outputs."""
    def accuracy(probs: Tensor) -> float:
        return (probs.argmax(-1) == labels).float().mean().item()

    ensemble = accuracy(ensemble_probs(exit_probs)) if len(exit_probs) > 1 else None
    return ExitAccuracy([accuracy(p) for p in exit_probs], ensemble, len(labels))


def fallback_probs(exit_probs: Sequence[Tensor], fallback: str) -> Tensor:
    """What a sample that passes no threshold is answered with: the ensemble or the deepest exit."""
    validate_fallback(fallback)
    return ensemble_probs(exit_probs) if fallback == "ensemble" else exit_probs[-1].float()


def exit_index(confidence: Tensor, thresholds: Tensor) -> Tensor:
    """Algorithm 1 for many threshold vectors at once: ``confidence`` ``(K-1, N)`` (max softmax of each
    shallow exit), ``thresholds`` ``(P, K-1)`` → ``(P, N)``: the exit each sample leaves at."""
    shallow, n = confidence.shape
    passed = leaves(confidence[None], thresholds[:, :, None])  # (P, K-1, N)
    index = torch.full((len(thresholds), n), shallow, dtype=torch.int64, device=confidence.device)
    for i in reversed(range(shallow)):  # the first passing exit wins
        index = torch.where(passed[:, i], i, index)
    return index


def simulate_early_exit(
    exit_probs: Sequence[Tensor], thresholds: Sequence[float], fallback: str = "ensemble"
) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1 on precomputed probabilities of every exit (``(N, C)`` each, deepest last):
    ``(exit_index (N,), confidence (N,), probs (N, C))`` of the answer each sample gets."""
    thresholds = validate_thresholds(thresholds, len(exit_probs))
    stacked = torch.stack([p.float() for p in exit_probs])  # (K, N, C)
    index = exit_index(stacked[:-1].amax(-1), torch.tensor([thresholds]))[0]
    probs = fallback_probs(exit_probs, fallback).clone()
    for i in range(len(stacked) - 1):
        left_here = index == i
        probs[left_here] = stacked[i][left_here]
    return index, probs.amax(-1), probs
