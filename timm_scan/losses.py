"""Self-distillation loss (TPAMI 2021, eq. 3-5) with its teacher paths, and KD from an external teacher."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import MultiExitOutput

TEACHERS = ("deepest", "ensemble", "transitive", "dense")


class LossOutput(NamedTuple):
    """``total`` is what to back-propagate; the rest are per-exit parts (shallowest first),
    detached, for logging. Exits with no teacher have ``kd`` and ``hint`` equal to 0."""

    total: Tensor
    ce: list[Tensor]
    kd: list[Tensor]
    hint: list[Tensor]


def soft_kl(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """``T² · KL(teacher ‖ student)`` at temperature T, mean over the batch; ``teacher_probs`` is
    already softened. Same gradient as the soft cross-entropy of the papers' code."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


def hint(feature: Tensor, reference: Tensor, reduction: str = "sum") -> Tensor:
    """``‖F_i − F_ref‖²₂`` per sample, mean over the batch. ``reduction="sum"`` sums over the
    feature (the papers' equation); ``"mean"`` averages over it, so that λ does not grow with
    the feature width."""
    squared = (feature - reference).pow(2)
    per_sample = squared.sum(dim=-1) if reduction == "sum" else squared.mean(dim=-1)
    return per_sample.mean()


class SelfDistillationLoss(nn.Module):
    """TPAMI eq. 3-5 over the K exits of a ``MultiExitOutput`` (shallowest first)::

        L = 1/K Σ_i [(1-α_i)·CE(c_i, y) + α_i·T²·KL(q_T(ref_i) ‖ q_T(c_i))] + λ·1/K Σ_i λ_i·‖F_i − F_ref_i‖²

    with α_i = α and λ_i = 1 for shallow exits and α_K = λ_K = 0 for the deepest, which learns from
    labels only. Conventions: KL(teacher ‖ student) (``F.kl_div``, same gradient as the soft
    cross-entropy of the authors' code), scaled by T² (Hinton et al.), batch mean; CE batch mean;
    hint summed over the feature (``hint_reduction="sum"``, the equation) or averaged over it
    (``"mean"``), batch mean. References are detached. ``teacher`` picks them
    (TPAMI Table 7): ``"deepest"`` (c_K teaches all), ``"ensemble"`` (the mean of all exits'
    softened probabilities, and the mean of their features), ``"transitive"`` (c_{i+1} teaches c_i),
    ``"dense"`` (the mean of the terms from every deeper exit).

    Knowledge distillation from an external frozen teacher ("KD + Ours", TPAMI Table 3): pass
    ``teacher_logits`` to ``forward`` and every exit's label term becomes
    ``(1-γ)·CE + γ·T²·KL(q_T(teacher) ‖ q_T(c_i))`` with γ = ``external_weight``.

    ``alpha`` and ``lam`` are plain attributes: the trainer sets them to 0 for the last epochs.
    """

    def __init__(
        self,
        alpha: float = 0.6,
        lam: float = 0.04,
        temperature: float = 3.0,
        teacher: str = "deepest",
        external_weight: float = 0.5,
        hint_reduction: str = "sum",
    ) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("external_weight", external_weight)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SelfDistillationLoss.{name} must be in [0, 1]; got {value}")
        if lam < 0:
            raise ValueError(f"SelfDistillationLoss.lam must be >= 0; got {lam}")
        if temperature <= 0:
            raise ValueError(f"SelfDistillationLoss.temperature must be > 0; got {temperature}")
        if teacher not in TEACHERS:
            raise ValueError(f"SelfDistillationLoss.teacher must be one of {TEACHERS}; got {teacher!r}")
        if hint_reduction not in ("sum", "mean"):
            raise ValueError(f"SelfDistillationLoss.hint_reduction must be 'sum' or 'mean'; got {hint_reduction!r}")
        self.alpha, self.lam, self.temperature = alpha, lam, temperature
        self.hint_reduction = hint_reduction
        self.teacher, self.external_weight = teacher, external_weight

    def forward(self, output: MultiExitOutput, labels: Tensor, teacher_logits: Tensor | None = None) -> LossOutput:
        logits, features = output.logits, output.features
        k_exits = len(logits)
        t = self.temperature
        soft = [F.softmax(z.detach() / t, dim=-1) for z in logits]
        feats = [f.detach() for f in features]
        external = None if teacher_logits is None else F.softmax(teacher_logits.detach() / t, dim=-1)

        total = logits[0].new_zeros(())
        ce_parts, kd_parts, hint_parts = [], [], []
        for i in range(k_exits):
            ce = F.cross_entropy(logits[i], labels)
            label_term = ce
            if external is not None:
                gamma = self.external_weight
                label_term = (1 - gamma) * ce + gamma * soft_kl(logits[i], external, t)
            kd = hn = logits[i].new_zeros(())
            refs = self._references(i, k_exits)
            if refs:
                if self.teacher == "ensemble":
                    kd = soft_kl(logits[i], torch.stack(soft).mean(0), t)
                    hn = hint(features[i], torch.stack(feats).mean(0), self.hint_reduction)
                else:
                    kd = torch.stack([soft_kl(logits[i], soft[j], t) for j in refs]).mean()
                    hn = torch.stack([hint(features[i], feats[j], self.hint_reduction) for j in refs]).mean()
                total = total + (1 - self.alpha) * label_term + self.alpha * kd + self.lam * hn
            else:
                total = total + label_term
            ce_parts.append(ce.detach())
            kd_parts.append(kd.detach())
            hint_parts.append(hn.detach())
        return LossOutput(total / k_exits, ce_parts, kd_parts, hint_parts)

    def _references(self, i: int, k_exits: int) -> list[int]:
        """Exits that teach exit i; none for the deepest."""
        if i == k_exits - 1:
            return []
        if self.teacher == "deepest":
            return [k_exits - 1]
        if self.teacher == "transitive":
            return [i + 1]
        if self.teacher == "dense":
            return list(range(i + 1, k_exits))
        return list(range(k_exits))  # ensemble: all exits, combined in forward
