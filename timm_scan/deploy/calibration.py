"""Per-exit temperature scaling (Guo et al., ICML 2017): each exit's softmax at its own temperature,
fitted on validation outputs, so that a confidence of 0.9 is right about 90% of the time.

Exits are listed shallowest first, the deepest last. A temperature ``T`` turns an exit's logits ``z``
into ``softmax(z / T)``; ``T > 1`` softens an over-confident exit. It never changes an exit's own
answer (the argmax), only its confidence, and so which samples pass a threshold, and the ensemble.
Everything here works on cached softmax outputs: ``log p`` differs from the logits by a constant per
sample, so ``softmax(log p / T) = softmax(z / T)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..model.multi_exit import MultiExitModel
from ..report import Calibration
from .policy import apply_temperatures, check_outputs, log_probs

__all__ = ["calibrate", "expected_calibration_error", "fit_temperature", "fit_temperatures"]

ECE_BINS = 15
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(probs: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> float:
    """The temperature in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` that minimises the negative
    log-likelihood of ``labels`` (N,) under ``softmax(log probs / T)``, for one exit's softmax ``probs``
    (N, C). The NLL is convex in ``1/T``: L-BFGS on ``log(1/T)`` from ``T = 1``, then clipped to the
    range (where an exit is right on every sample the optimum is T → 0, on none T → ∞; the bounds keep
    its confidences usable as a threshold's input)."""
    [probs], labels = check_outputs([probs], labels)
    log_p = log_probs(probs)
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_scale], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def nll() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(log_p * log_scale.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(nll)
    return float(torch.exp(-log_scale.detach()).clamp(MIN_TEMPERATURE, MAX_TEMPERATURE))


def fit_temperatures(probs: Sequence[Tensor | np.ndarray], labels: Tensor | np.ndarray) -> list[float]:
    """One temperature per exit (``probs``: K arrays ``(N, C)``, shallowest first)."""
    return [fit_temperature(p, labels) for p in probs]


def expected_calibration_error(probs: Tensor | np.ndarray, labels: Tensor | np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of one exit, as a fraction: ``Σ_b (n_b / N) · |accuracy_b − mean confidence_b|`` over
    ``bins`` equal-width bins of the max softmax."""
    [probs], labels = check_outputs([probs], labels)
    confidence, predicted = probs.double().max(-1)
    correct = (predicted == labels).double()
    which = (confidence * bins).ceil().clamp(1, bins).long() - 1  # bin b holds (b/bins, (b+1)/bins]
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct - confidence)
    return float(gap.abs().sum() / len(labels))


def calibrate(
    probs: Sequence[Tensor | np.ndarray], labels: Tensor | np.ndarray, *legacy: Any
) -> Calibration:
    """Fit one temperature per exit on validation outputs: ``probs``, the model's softmax at every exit
    on validation images (K ``(N, C)``, shallowest first, at temperature 1:
    ``timm_scan.training.compute_outputs``), ``labels`` (N,). Returns the temperatures and each exit's
    expected calibration error on these outputs before and after; nothing else changes. To deploy them,
    put them in the policy: ``model.policy = model.policy.replace(temperatures=calibration.temperatures)``,
    or pass ``temperatures=`` to ``search_thresholds`` (which then returns a policy that carries them).

    The earlier form ``calibrate(model, probs, labels)`` still works, with a deprecation warning: it
    also replaces ``model.policy`` with one that has these temperatures."""
    model = None
    if isinstance(probs, MultiExitModel):
        warnings.warn("calibrate(model, probs, labels) is deprecated: calibrate(probs, labels) returns the "
                      "temperatures; set model.policy = model.policy.replace(temperatures=...) yourself",
                      DeprecationWarning, stacklevel=2)
        model, probs, labels = probs, labels, legacy[0] if legacy else None
    elif legacy:
        raise TypeError(f"calibrate(probs, labels) takes two arguments; got {2 + len(legacy)}")
    if model is not None and len(probs) != model.num_exits:
        raise ValueError(f"probs: need the outputs of all {model.num_exits} exits; got {len(probs)}")
    temperatures = fit_temperatures(probs, labels)
    if model is not None:
        model.policy = model.policy.replace(temperatures=temperatures)
    return Calibration(temperatures, [expected_calibration_error(p, labels) for p in probs],
                       [expected_calibration_error(p, labels) for p in apply_temperatures(probs, temperatures)])
