"""``timm-scan train``: self-distillation training (or ``--baseline``) under Accelerate; every
`TrainConfig` field is a flag. ``accelerate launch -m timm_scan train ...`` runs it on several
processes; running the same command again resumes."""

from __future__ import annotations

from ..report import RunResults
from ..training.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(cfg: TrainConfig) -> RunResults:
    """Train, evaluate the best epoch on test, and return the results."""
    from ..training.trainer import Trainer  # Accelerate is imported only to train

    return Trainer(cfg).fit()
