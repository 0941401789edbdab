"""Training: the run's configuration, data, the self-distillation loss, the Accelerate trainer, the run
folder's protocol (what a run writes, how it resumes), and reading finished runs.

``Trainer`` is imported on first use, so that everything else works without importing Accelerate.
"""

from typing import Any

from .config import TrainConfig
from .data import ImageSplits, TorchImageDataset, build_transforms, data_config, load_splits
from .losses import PRESETS, LossOutput, SelfDistillationLoss
from .recipe import build_loader, build_model, build_optimizer, lr_lambda
from .run_folder import RunFolder
from .runs import cached_outputs, compute_outputs, epoch_metrics, eval_dataset, load_run, run_results, run_splits

__all__ = [
    "PRESETS", "ImageSplits", "LossOutput", "RunFolder", "SelfDistillationLoss", "TorchImageDataset", "TrainConfig",
    "Trainer", "build_loader", "build_model", "build_optimizer", "build_transforms", "cached_outputs",
    "compute_outputs", "data_config", "epoch_metrics", "eval_dataset", "load_run", "load_splits", "lr_lambda",
    "run_results", "run_splits",
]


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
