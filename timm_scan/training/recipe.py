"""The parts of a training run that do not need Accelerate: the model, loaders, optimizer and schedule
built from a `TrainConfig` (the trainer and the benchmarks that train peers share them)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from datasets import Dataset
from torch import nn

from ..model.backbone import create_backbone
from ..model.hub import load_initial_weights
from ..model.multi_exit import MultiExitModel, wrap
from .config import TrainConfig
from .data import ImageSplits, TorchImageDataset

__all__ = ["build_loader", "build_model", "build_optimizer", "lr_lambda"]


def build_model(cfg: TrainConfig, num_classes: int) -> MultiExitModel:
    """The timm backbone of ``cfg.model`` (with ``cfg.model_kwargs``) wrapped with its exits (none for
    ``--baseline``), started from ``cfg.init_from`` where given, its backbone frozen for ``cfg.freeze_backbone``."""
    backbone = create_backbone(cfg.model, num_classes, pretrained=cfg.pretrained, model_kwargs=cfg.model_kwargs)
    size = (3, cfg.input_size, cfg.input_size) if cfg.input_size else None
    model = wrap(backbone, cfg.scan_config(), check_input_size=size)
    if cfg.init_from:
        loaded = load_initial_weights(model, cfg.init_from)
        print(f"initialised the {loaded} from {cfg.init_from}")
    if cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_loader(cfg: TrainConfig, splits: ImageSplits, ds: Dataset, transform: Callable, train: bool) -> torch.utils.data.DataLoader:
    """A loader of ``ds`` (one of ``splits``): shuffled with incomplete batches dropped for training.

    Not persistent: workers are seeded from the (checkpointed) RNG each epoch, so resume is exact."""
    dataset = TorchImageDataset(ds, splits.image_column, splits.label_column, transform)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=train, num_workers=cfg.num_workers,
                                       drop_last=train)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the parameters that train (a frozen backbone's do not)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up, then cosine to 0 or steps at milestones."""
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        epoch = step // steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)

    return factor
