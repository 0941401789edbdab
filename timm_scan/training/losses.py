"""Self-distillation loss (TPAMI 2021, eq. 3-6) with its teacher paths, and KD from an external teacher.

One loss, several conventions. ``SelfDistillationLoss()`` is the library's default; the papers'
text and the authors' released code are named presets (``SelfDistillationLoss.from_preset``):

=============  ============  =====  ====  =====================  ====  ==========================
preset         exits         alpha  T²    hint                   lam   hint on exits
=============  ============  =====  ====  =====================  ====  ==========================
``default``    shallow-mean  0.3    yes   mean squared error     0     all shallow
``tpami``      mean (1/K)    0.6    yes   squared L2, summed     0.04  all shallow
``released``   sum           0.3    no    unsquared L2 of batch  0.03  all but the nearest to K
=============  ============  =====  ====  =====================  ====  ==========================

("shallow-mean": the deepest exit's loss plus the mean of the shallow exits' losses.)

(T = 3 and the deepest teacher in all three.) ``benchmarks/RESULTS.md`` §1 has the measurements
that chose the default.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..deploy.policy import ensemble_probs
from ..model.multi_exit import MultiExitOutput

__all__ = ["PRESETS", "LossOutput", "SelfDistillationLoss", "hint", "soft_kl"]

TEACHERS = ("deepest", "ensemble", "transitive", "dense")
EXIT_REDUCTIONS = ("sum", "mean", "shallow-mean")
HINT_REDUCTIONS = ("mean", "sum", "dist")


class LossOutput(NamedTuple):
    """``total`` is what to back-propagate; the rest are per-exit parts (shallowest first),
    detached, unweighted, for logging. Exits with no teacher have ``kd`` and ``hint`` equal to 0."""

    total: Tensor
    ce: list[Tensor]
    kd: list[Tensor]
    hint: list[Tensor]


def soft_kl(student_logits: Tensor, teacher_probs: Tensor, temperature: float, t_squared: bool = True) -> Tensor:
    """``KL(teacher ‖ student)`` at temperature T, mean over the batch, times T² if ``t_squared``
    (Hinton et al.); ``teacher_probs`` is already softened. It has the gradient of the soft
    cross-entropy ``-Σ q_T(teacher)·log q_T(student)`` of the authors' code; the value differs by the
    teacher's entropy, a constant, so it reaches 0 when the student matches."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = F.kl_div(log_student, teacher_probs, reduction="batchmean")
    return kl * temperature**2 if t_squared else kl


def hint(feature: Tensor, reference: Tensor, reduction: str = "mean") -> Tensor:
    """Feature hint between ``(B, D)`` features.

    ``"mean"``: squared error averaged over the D features, mean over the batch (λ does not grow with
    the width); ``"sum"``: ``‖F_i − F_ref‖²₂`` summed over the features, mean over the batch (TPAMI
    eq. 3); ``"dist"``: the unsquared L2 norm of the whole ``(B, D)`` difference, ``torch.dist`` (the
    authors' released code; it grows with √B).
    """
    diff = feature - reference
    if reduction == "dist":
        return torch.linalg.vector_norm(diff)
    squared = diff.pow(2)
    return (squared.sum(dim=-1) if reduction == "sum" else squared.mean(dim=-1)).mean()


_COMMON = {"temperature": 3.0, "teacher": "deepest"}
PRESETS: dict[str, dict] = {
    "default": {**_COMMON, "alpha": 0.3, "lam": 0.0, "exit_reduction": "shallow-mean", "t_squared": True,
                "hint_reduction": "mean", "hint_nearest": True},
    "tpami": {**_COMMON, "alpha": 0.6, "lam": 0.04, "exit_reduction": "mean", "t_squared": True,
              "hint_reduction": "sum", "hint_nearest": True},
    "released": {**_COMMON, "alpha": 0.3, "lam": 0.03, "exit_reduction": "sum", "t_squared": False,
                 "hint_reduction": "dist", "hint_nearest": False},
}
"""Named loss settings: ``default`` (the library's, chosen by measurement), ``tpami`` (the TPAMI
text) and ``released`` (the authors' released code); see the module docstring."""


class SelfDistillationLoss(nn.Module):
    """Self-distillation over the K exits of a ``MultiExitOutput`` (shallowest first)::

        L = Σ_i w_i · [ (1-α_i)·CE(c_i, y) + α_i·s·KL(q_T(ref_i) ‖ q_T(c_i)) + λ_i·H(F_i, F_ref_i) ]

    - ``w_i`` = 1 (``exit_reduction="sum"``, the authors' code: the deepest classifier's own layers
      get exactly the gradient of plain training, the layers shared by all exits about K times it),
      1/K (``"mean"``, TPAMI eq. 3: the deepest's own layers get 1/K of it), or w_K = 1 and
      w_i = 1/(K-1) for the shallow exits (``"shallow-mean"``: the deepest's own layers get plain
      training's gradient, the shared ones about twice it);
    - α_i = α and λ_i = λ for shallow exits, α_K = λ_K = 0: the deepest learns from labels only;
    - ``s`` = T² (``t_squared=True``, Hinton et al.) or 1 (the authors' soft cross-entropy);
    - ``H`` the feature hint (`hint`, ``hint_reduction``) between exit i's pooled feature, passed
      through its head's learned projection ``proj`` (so it can match any pre-logits, signed ones
      included), and the reference's; ``hint_nearest=False`` leaves out exit K-1 (the shallow exit
      nearest the deepest), as the authors' released code does (``index != 1``);
    - CE and KL are batch means; references (teachers' probabilities and features) are detached.

    ``teacher`` picks the references (TPAMI §3.1, Table 7): ``"deepest"`` (c_K teaches all),
    ``"ensemble"`` (the mean of all exits' softened probabilities, and of their features),
    ``"transitive"`` (c_{i+1} teaches c_i), ``"dense"`` (every deeper exit teaches c_i, the terms
    summed over them as in TPAMI eq. 6; the hint likewise).

    Knowledge distillation from an external frozen teacher ("KD + Ours", TPAMI Table 3): pass
    ``teacher_logits`` to ``forward`` and every exit's label term becomes
    ``(1-γ)·CE + γ·s·KL(q_T(teacher) ‖ q_T(c_i))`` with γ = ``external_weight``.

    ``alpha`` and ``lam`` are plain attributes: the trainer sets them to 0 for annealing.
    """

    def __init__(
        self,
        alpha: float = PRESETS["default"]["alpha"],
        lam: float = PRESETS["default"]["lam"],
        temperature: float = PRESETS["default"]["temperature"],
        teacher: str = PRESETS["default"]["teacher"],
        external_weight: float = 0.5,
        hint_reduction: str = PRESETS["default"]["hint_reduction"],
        exit_reduction: str = PRESETS["default"]["exit_reduction"],
        t_squared: bool = PRESETS["default"]["t_squared"],
        hint_nearest: bool = PRESETS["default"]["hint_nearest"],
    ) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("external_weight", external_weight)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SelfDistillationLoss.{name} must be in [0, 1]; got {value}")
        if not lam >= 0:
            raise ValueError(f"SelfDistillationLoss.lam must be >= 0; got {lam}")
        if not temperature > 0:
            raise ValueError(f"SelfDistillationLoss.temperature must be > 0; got {temperature}")
        for name, value, valid in (
            ("teacher", teacher, TEACHERS),
            ("hint_reduction", hint_reduction, HINT_REDUCTIONS),
            ("exit_reduction", exit_reduction, EXIT_REDUCTIONS),
        ):
            if value not in valid:
                raise ValueError(f"SelfDistillationLoss.{name} must be one of {valid}; got {value!r}")
        self.alpha, self.lam, self.temperature = alpha, lam, temperature
        self.teacher, self.external_weight = teacher, external_weight
        self.hint_reduction, self.exit_reduction = hint_reduction, exit_reduction
        self.t_squared, self.hint_nearest = bool(t_squared), bool(hint_nearest)

    @classmethod
    def from_preset(cls, name: str = "default", **overrides) -> SelfDistillationLoss:
        """The named settings of ``PRESETS`` (``"default"``, ``"tpami"``, ``"released"``), with
        ``overrides`` (any ``__init__`` argument) on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown loss preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, lam={self.lam}, temperature={self.temperature}, teacher={self.teacher!r}, "
                f"exit_reduction={self.exit_reduction!r}, t_squared={self.t_squared}, "
                f"hint_reduction={self.hint_reduction!r}, hint_nearest={self.hint_nearest}")

    def forward(self, output: MultiExitOutput, labels: Tensor, teacher_logits: Tensor | None = None) -> LossOutput:
        logits, features = output.logits, output.features
        k_exits = len(logits)
        t = self.temperature
        soft = [F.softmax(z.detach().float() / t, dim=-1) for z in logits]
        feats = [f.detach() for f in features]
        external = None if teacher_logits is None else F.softmax(teacher_logits.detach().float() / t, dim=-1)

        terms = []  # each exit's weighted-sum term, before the reduction over exits
        ce_parts, kd_parts, hint_parts = [], [], []
        for i in range(k_exits):
            ce = F.cross_entropy(logits[i], labels)
            label_term = ce
            if external is not None:
                gamma = self.external_weight
                label_term = (1 - gamma) * ce + gamma * soft_kl(logits[i], external, t, self.t_squared)
            kd = hn = ce.new_zeros(())
            refs = self._references(i, k_exits)
            if refs:
                if self.teacher == "ensemble":
                    kd = soft_kl(logits[i], ensemble_probs(soft), t, self.t_squared)
                    hn = hint(features[i], torch.stack(feats).mean(0), self.hint_reduction)
                else:
                    combine = torch.sum if self.teacher == "dense" else torch.mean  # eq. 6 sums over deeper exits
                    kd = combine(torch.stack([soft_kl(logits[i], soft[j], t, self.t_squared) for j in refs]))
                    hn = combine(torch.stack([hint(features[i], feats[j], self.hint_reduction) for j in refs]))
                lam = self.lam if self.hint_nearest or i != k_exits - 2 else 0.0
                terms.append(((1 - self.alpha) * label_term + self.alpha * kd + lam * hn).float())
            else:
                terms.append(label_term.float())
            ce_parts.append(ce.detach())
            kd_parts.append(kd.detach())
            hint_parts.append(hn.detach())
        stacked = torch.stack(terms)
        if self.exit_reduction == "mean":
            total = stacked.mean()
        elif self.exit_reduction == "shallow-mean" and k_exits > 1:
            total = stacked[-1] + stacked[:-1].mean()
        else:
            total = stacked.sum()
        return LossOutput(total, ce_parts, kd_parts, hint_parts)

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
