"""Self-distillation training on Accelerate: one code path for CPU, one GPU, many GPUs or machines.

Layout of ``output_dir``::

    train_config.json         the TrainConfig of the run (what evaluation rebuilds the splits from)
    checkpoints/epoch_0003/   Accelerate ``save_state``: weights (safetensors), optimizer, RNG, progress
    best/                     the best epoch on validation (deepest-exit accuracy), as ``save_pretrained``
                              writes it: timm's config.json and model.safetensors, the exits, a card
    metrics.jsonl             one line per epoch: train loss parts and validation accuracy per exit
    results.json              test accuracy per exit and ensemble, MACs per exit

Running the same command again resumes from the last checkpoint (epoch, optimizer, schedule, RNG).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import ScanConfig, jsonable
from .data import ImageSplits, TorchImageDataset, build_transforms, data_config, load_splits
from .hub import load_initial_weights, load_weights, model_card, push_to_hub
from .losses import PRESETS, LossOutput, SelfDistillationLoss
from .model import MultiExitModel, wrap


@dataclass
class TrainConfig:
    """Everything a run depends on; ``examples/train.py`` exposes each field as a flag."""

    dataset: str
    output_dir: str = "runs/scan"
    model: str = "resnet18"
    pretrained: bool = False  # timm's own weights (its classifier replaced where the classes differ)
    init_from: str | None = None  # a save_pretrained folder, an hf-hub: id or a timm .safetensors checkpoint
    freeze_backbone: bool = False  # train the exits only; the backbone (BN statistics too) stays as given
    grad_checkpointing: bool = False
    num_classes: int | None = None  # None: the dataset's; set, it must match the dataset
    image_column: str | None = None
    label_column: str | None = None
    val_size: float | int = 0.1
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    input_size: int | None = None  # None: the model's pretrained_cfg
    crop_pct: float | None = None
    train_scale: tuple[float, float] = (0.08, 1.0)
    # multi-exit model
    baseline: bool = False  # the plain backbone with cross-entropy, same recipe
    exits: list[int | str] | None = None
    attention: str = "sd"
    # loss: a preset of SelfDistillationLoss ("default", "tpami", "released"); set fields override it
    loss_preset: str = "default"
    alpha: float | None = None
    lam: float | None = None
    temperature: float | None = None
    teacher: str | None = None
    exit_reduction: str | None = None  # "sum" over exits or "mean" (1/K)
    t_squared: bool | None = None  # KD scaled by T²
    hint_reduction: str | None = None  # "mean", "sum" over the feature, or "dist"
    hint_nearest: bool | None = None  # the shallow exit nearest the deepest gets the hint too
    anneal_epochs: int = 0  # alpha and lam are 0 for the last this many epochs
    teacher_model: str | None = None  # external frozen teacher (timm name), "KD + Ours"
    teacher_checkpoint: str | None = None  # its weights, safetensors
    external_weight: float = 0.5
    # optimisation
    epochs: int = 200
    batch_size: int = 128  # per process
    grad_accum: int = 1
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=lambda: [66, 133])  # epochs, for "step"
    gamma: float = 0.1
    warmup_epochs: int = 0
    mixed_precision: str = "no"
    seed: int = 0
    num_workers: int = 2
    keep_checkpoints: int = 3
    log_with: str | None = None  # an Accelerate tracker, e.g. "tensorboard"
    push_to_hub: str | None = None  # a Hub repo id: the best model is pushed there at the end

    def __post_init__(self) -> None:
        checks = [
            ("optimizer", self.optimizer in ("sgd", "adamw"), "'sgd' or 'adamw'"),
            ("schedule", self.schedule in ("cosine", "step"), "'cosine' or 'step'"),
            ("mixed_precision", self.mixed_precision in ("no", "bf16", "fp16"), "'no', 'bf16' or 'fp16'"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("anneal_epochs", self.anneal_epochs >= 0, ">= 0"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {valid}; got {getattr(self, name)!r}")
        if self.freeze_backbone and (self.baseline or self.exits == []):
            raise ValueError("TrainConfig.freeze_backbone trains only the exits, and this run has none (baseline)")
        self.loss_settings()  # an unknown preset or an invalid loss setting fails here, before any data loads
        if (self.teacher_model is None) != (self.teacher_checkpoint is None):
            raise ValueError("TrainConfig.teacher_model and teacher_checkpoint go together: pass both or neither")


    def loss_settings(self) -> dict[str, Any]:
        """The ``SelfDistillationLoss`` arguments: the preset's, overridden by the fields that are set."""
        if self.loss_preset not in PRESETS:
            raise ValueError(f"TrainConfig.loss_preset must be one of {sorted(PRESETS)}; got {self.loss_preset!r}")
        settings = dict(PRESETS[self.loss_preset])
        settings.update({k: getattr(self, k) for k in settings if getattr(self, k) is not None})
        SelfDistillationLoss(**settings, external_weight=self.external_weight)  # validates
        return settings


@dataclass
class Progress:
    """Trainer state saved with every checkpoint (Accelerate ``register_for_checkpointing``)."""

    epoch: int = 0
    best_accuracy: float = -1.0
    best_epoch: int = -1

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def run_splits(cfg: TrainConfig) -> ImageSplits:
    """The run's train/val/test splits: its source, seed and sizes."""
    return load_splits(
        cfg.dataset,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        val_size=cfg.val_size,
        seed=cfg.seed,
        max_train_samples=cfg.max_train_samples,
        max_test_samples=cfg.max_test_samples,
    )


def build_model(cfg: TrainConfig, num_classes: int) -> MultiExitModel:
    """The timm backbone of ``cfg.model`` wrapped with its exits (none for ``--baseline``), started
    from ``cfg.init_from`` where given, its backbone frozen for ``cfg.freeze_backbone``."""
    backbone = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes)
    scan = ScanConfig(exits=[] if cfg.baseline else cfg.exits, attention=cfg.attention)
    size = (3, cfg.input_size, cfg.input_size) if cfg.input_size else None
    model = wrap(backbone, scan, check_input_size=size)
    if cfg.init_from:
        loaded = load_initial_weights(model, cfg.init_from)
        print(f"initialised the {loaded} from {cfg.init_from}")
    if cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


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


class Trainer:
    """Trains a wrapped timm model with ``SelfDistillationLoss`` under Accelerate.

    ``callbacks`` are called as ``callback(trainer, epoch_metrics)`` after each epoch's checkpoint.
    """

    def __init__(self, cfg: TrainConfig, callbacks: list[Callable[[Trainer, dict], None]] | None = None) -> None:
        self.cfg = cfg
        self.callbacks = callbacks or []
        self.out = Path(cfg.output_dir)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # else several CPU processes would each train alone
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
            log_with=cfg.log_with,
            project_dir=str(self.out),
        )
        set_seed(cfg.seed)
        with self.accelerator.main_process_first():
            self.data = run_splits(cfg)
        if cfg.num_classes is not None and cfg.num_classes != self.data.num_classes:
            raise ValueError(
                f"num_classes={cfg.num_classes} but dataset {cfg.dataset!r} has {self.data.num_classes} classes "
                f"in column {self.data.label_column!r}; drop --num-classes or pick the matching dataset"
            )
        self.model = build_model(cfg, self.data.num_classes)
        self.data_config = data_config(self.model.backbone, cfg.input_size, cfg.crop_pct)
        train_tf, self.eval_tf = build_transforms(self.data_config, cfg.train_scale)
        self.train_loader = self._loader(self.data.train, train_tf, shuffle=True)
        if len(self.train_loader) == 0:
            raise ValueError(
                f"the training split has {len(self.data.train)} samples, fewer than one batch of {cfg.batch_size} "
                "(incomplete batches are dropped); lower batch_size or use more training data"
            )
        self.val_loader = self._loader(self.data.val, self.eval_tf, shuffle=False)
        self._loss_settings = cfg.loss_settings()
        self.loss = SelfDistillationLoss(**self._loss_settings, external_weight=cfg.external_weight)
        self.external_teacher = self._external_teacher()
        self.optimizer = self._optimizer()
        self.model, self.optimizer, self.train_loader, self.val_loader = self.accelerator.prepare(
            self.model, self.optimizer, self.train_loader, self.val_loader
        )
        steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, steps_per_epoch))
        self.progress = Progress()
        self.accelerator.register_for_checkpointing(self.scheduler, self.progress)

    def _loader(self, ds, transform, shuffle: bool) -> torch.utils.data.DataLoader:
        dataset = TorchImageDataset(ds, self.data.image_column, self.data.label_column, transform)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            num_workers=self.cfg.num_workers,
            drop_last=shuffle,
        )  # not persistent: workers are seeded from the (checkpointed) RNG each epoch, so resume is exact

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _external_teacher(self) -> nn.Module | None:
        """Frozen teacher for "KD + Ours": moved to the device, never ``prepare``d."""
        if self.cfg.teacher_model is None:
            return None
        teacher = timm.create_model(self.cfg.teacher_model, num_classes=self.data.num_classes)
        teacher.load_state_dict(load_file(self.cfg.teacher_checkpoint), strict=True)
        return teacher.eval().requires_grad_(False).to(self.accelerator.device)

    # ---------------------------------------------------------------- the run
    def fit(self) -> dict[str, Any]:
        """Train (resuming if a checkpoint exists), then evaluate the best model on test."""
        acc = self.accelerator
        self._resume()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(jsonable(dataclasses.asdict(self.cfg)), indent=2))
        if self.cfg.log_with:  # on every process: Accelerate logs from the main one
            acc.init_trackers(self.out.name, config=jsonable(dataclasses.asdict(self.cfg)))
        for epoch in range(self.progress.epoch, self.cfg.epochs):
            distilling = epoch < self.cfg.epochs - self.cfg.anneal_epochs
            self.loss.alpha = self._loss_settings["alpha"] if distilling else 0.0
            self.loss.lam = self._loss_settings["lam"] if distilling else 0.0
            started = time.time()
            train_metrics = self._train_epoch(epoch)
            val_metrics = self.evaluate(self.val_loader, desc=f"val {epoch + 1}")
            metrics = {"epoch": epoch + 1, **train_metrics, **{f"val_{k}": v for k, v in val_metrics.items()}}
            metrics["seconds"] = round(time.time() - started, 2)
            score = val_metrics["acc_exit_last"]
            self.progress.epoch = epoch + 1
            if score > self.progress.best_accuracy:
                self.progress.best_accuracy, self.progress.best_epoch = score, epoch + 1
                self._save_best()
            self._save_checkpoint(epoch + 1)
            self._log(metrics)
            for callback in self.callbacks:
                callback(self, metrics)
        return self.finish()

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        acc, model = self.accelerator, self.model
        model.train()
        if self.cfg.freeze_backbone:  # as given: no BN statistics updated, no dropout
            acc.unwrap_model(model).backbone.eval()
        self.train_loader.set_epoch(epoch)
        sums: Tensor | None = None
        batches = 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", disable=not acc.is_local_main_process)
        for images, labels in bar:
            with acc.accumulate(model):
                output = model(images)
                teacher_logits = None
                if self.external_teacher is not None:
                    with torch.no_grad():
                        teacher_logits = self.external_teacher(images)
                loss = self.loss(output, labels, teacher_logits)
                acc.backward(loss.total)
                self.optimizer.step()
                if acc.sync_gradients:
                    self.scheduler.step()
                self.optimizer.zero_grad()
            parts = _loss_vector(loss)
            sums = parts if sums is None else sums + parts
            batches += 1
            bar.set_postfix(loss=f"{loss.total.item():.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.3g}")
        mean = acc.reduce(sums / max(batches, 1), reduction="mean").tolist()
        k = len(loss.ce)
        metrics = {"train_loss": mean[0], "lr": self.scheduler.get_last_lr()[0]}
        for name, offset in (("ce", 1), ("kd", 1 + k), ("hint", 1 + 2 * k)):
            for i in range(k):
                metrics[f"train_{name}_exit{i + 1}"] = mean[offset + i]
        return metrics

    @torch.no_grad()
    def evaluate(self, loader, desc: str = "eval") -> dict[str, float]:
        """Accuracy of every exit and of the ensemble over the whole split, gathered over processes.

        Keys: ``acc_exit1`` … (shallowest first), ``acc_exit_last`` (the deepest), ``acc_ensemble``
        (mean of all exits' softmax), ``samples``.
        """
        acc, model = self.accelerator, self.model
        model.eval()
        correct: Tensor | None = None
        count = 0
        for images, labels in tqdm(loader, desc=desc, disable=not acc.is_local_main_process, leave=False):
            logits = model(images).logits
            probs = torch.stack([F.softmax(z.float(), dim=-1) for z in logits])
            preds = torch.cat([probs.argmax(-1), probs.mean(0).argmax(-1)[None]])  # (K+1, B)
            preds, labels = acc.gather_for_metrics((preds.T.contiguous(), labels))
            hits = (preds == labels[:, None]).sum(0)
            correct = hits if correct is None else correct + hits
            count += labels.numel()
        k = correct.numel() - 1
        metrics = {f"acc_exit{i + 1}": correct[i].item() / count for i in range(k)}
        metrics["acc_exit_last"] = metrics[f"acc_exit{k}"]
        metrics["acc_ensemble"] = correct[k].item() / count
        metrics["samples"] = count
        return metrics

    # ---------------------------------------------------------- checkpoints
    def _checkpoints(self) -> list[Path]:
        return sorted((self.out / "checkpoints").glob("epoch_*"))

    def _resume(self) -> None:
        checkpoints = self._checkpoints()
        if checkpoints:
            self.accelerator.load_state(str(checkpoints[-1]))
            self.accelerator.print(f"resumed from {checkpoints[-1]} (epoch {self.progress.epoch} done)")

    def _save_checkpoint(self, epoch: int) -> None:
        acc = self.accelerator
        acc.save_state(str(self.out / "checkpoints" / f"epoch_{epoch:04d}"))
        if acc.is_main_process:
            for old in self._checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        acc.wait_for_everyone()

    def _save_best(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            model = self._unwrapped()
            model.save_pretrained(str(self.out / "best"), card=self._card(model))
        acc.wait_for_everyone()

    def _unwrapped(self) -> MultiExitModel:
        """The model without Accelerate's wrappers, carrying its class names and data config."""
        model: MultiExitModel = self.accelerator.unwrap_model(self.model)
        model.class_names, model.data_config = self.data.class_names, self.data_config
        return model

    def _card(self, model: MultiExitModel, results: dict | None = None) -> str:
        return model_card(model, repo_id=self.cfg.push_to_hub, dataset=self.cfg.dataset,
                          train_config=dataclasses.asdict(self.cfg), results=results)

    def _log(self, metrics: dict[str, float]) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            summary = ", ".join(f"{k[8:]} {v:.3f}" for k, v in metrics.items() if k.startswith("val_acc_exit") and k[-1].isdigit())
            acc.print(
                f"epoch {metrics['epoch']}: loss {metrics['train_loss']:.3f}, val accuracy per exit {summary}, "
                f"ensemble {metrics['val_acc_ensemble']:.3f} ({metrics['seconds']:.0f}s)"
            )
        if self.cfg.log_with:
            acc.log(metrics, step=metrics["epoch"])

    # ----------------------------------------------------------------- report
    def finish(self) -> dict[str, Any]:
        """Load the best weights, evaluate on test, print the table, write ``results.json``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        model = self._unwrapped()
        load_weights(model, self.out / "best")
        size = tuple(self.data_config["input_size"])
        macs = model.exit_macs(size)
        backbone_macs = model.backbone_macs(size)
        results: dict[str, Any] = {
            "model": self.cfg.model,
            "baseline": self.cfg.baseline,
            "best_epoch": self.progress.best_epoch,
            "val_accuracy": self.progress.best_accuracy,
            "exit_macs": macs,
            "backbone_macs": backbone_macs,
            "params": sum(p.numel() for p in model.parameters()),
        }
        if self.data.test is not None:
            test_loader = acc.prepare(self._loader(self.data.test, self.eval_tf, shuffle=False))
            results["test"] = self.evaluate(test_loader, desc="test")
        if acc.is_main_process:
            (self.out / "results.json").write_text(json.dumps(results, indent=2))
            (self.out / "best" / "README.md").write_text(self._card(model, results))
            acc.print(format_results(results))
            if self.cfg.push_to_hub:
                url = push_to_hub(model, self.cfg.push_to_hub, save_directory=self.out / "best",
                                  card=self._card(model, results))
                acc.print(f"pushed the best model to {self.cfg.push_to_hub}: {url}")
        acc.end_training()
        return results


def format_results(results: dict[str, Any]) -> str:
    """The end-of-run table: test accuracy and MACs per exit, and the ensemble."""
    macs, base = results["exit_macs"], results["backbone_macs"]
    test = results.get("test")
    lines = [
        f"{results['model']}{' (baseline)' if results['baseline'] else ''}: best epoch {results['best_epoch']}, "
        f"validation accuracy {results['val_accuracy']:.4f}" + (f", {test['samples']} test samples" if test else ""),
        f"{'exit':<10}{'test acc':>10}{'MMACs':>10}{'of backbone':>13}",
    ]
    for i, m in enumerate(macs):
        name = f"{i + 1}" + (" (deepest)" if i == len(macs) - 1 else "")
        accuracy = f"{test[f'acc_exit{i + 1}']:.4f}" if test else "-"
        lines.append(f"{name:<10}{accuracy:>10}{m / 1e6:>10.2f}{m / base:>12.1%}")
    if test and len(macs) > 1:
        lines.append(f"{'ensemble':<10}{test['acc_ensemble']:>10.4f}{macs[-1] / 1e6:>10.2f}{macs[-1] / base:>12.1%}")
    return "\n".join(lines)


def _loss_vector(loss: LossOutput) -> Tensor:
    return torch.stack([loss.total.detach(), *loss.ce, *loss.kd, *loss.hint]).float()
