"""Self-distillation training on Accelerate: one code path for CPU, one GPU, many GPUs or machines.

What a run writes to ``output_dir``, and how running the same command again resumes it from the last
checkpoint (epoch, optimizer, schedule, RNG), is `timm_scan.training.run_folder`. The mixed precision is
the config's, else Accelerate's own setting (``accelerate launch --mixed_precision``, ``accelerate config``,
``ACCELERATE_MIXED_PRECISION``); ``trainer.cfg`` and the run's ``train_config.json`` hold the one used.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..deploy.plots import plot_tradeoff
from ..deploy.policy import ensemble_probs
from ..deploy.search import sweep_beta
from ..exit_costs import ExitCosts
from ..model.card import model_card
from ..model.hub import load_strict, load_weights, push_to_hub, read_tensors
from ..model.multi_exit import MultiExitModel
from ..report import EpochMetrics, ExitAccuracy, RunResults, exit_table
from .config import TrainConfig
from .data import build_transforms, data_config
from .losses import LossOutput, SelfDistillationLoss
from .recipe import build_loader, build_model, build_optimizer, lr_lambda
from .run_folder import RunFolder
from .runs import run_splits

__all__ = ["Trainer", "TrainingDiverged", "check_trackers"]

TRACKER_EXTRAS = ("tensorboard", "wandb")  # trackers timm-scan has an extra for


@dataclass
class Progress:
    """Trainer state saved with every checkpoint (Accelerate ``register_for_checkpointing``); ``best_accuracy`` is
    the best epoch's validation score (`Trainer._selection_score`)."""

    epoch: int = 0
    best_accuracy: float = -1.0
    best_epoch: int = -1

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class Trainer:
    """Trains a wrapped timm model with ``SelfDistillationLoss`` under Accelerate.

    ``callbacks`` are called as ``callback(trainer, metrics)`` after each epoch's checkpoint. What it
    writes, and how it resumes, is ``self.folder`` (a `RunFolder`), which the trainer holds from its
    construction to the end of ``fit``: another run on it meanwhile, in this process or another, is a
    ``ValueError``. ``self.cfg`` is ``cfg`` with the mixed precision Accelerate resolved in place of ``None``.
    """

    def __init__(self, cfg: TrainConfig, callbacks: list[Callable[[Trainer, EpochMetrics], None]] | None = None) -> None:
        self.callbacks = callbacks or []
        self.folder = RunFolder(cfg.output_dir)
        trackers = check_trackers(cfg.log_with)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # else several CPU processes would each train alone
            mixed_precision=cfg.mixed_precision,  # None: Accelerate's own setting
            gradient_accumulation_steps=cfg.grad_accum,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
            log_with=trackers or None,
            project_dir=str(self.folder.root),
        )
        self.cfg = cfg = dataclasses.replace(cfg, mixed_precision=self.accelerator.mixed_precision)
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("mixed_precision='fp16' (--amp, as in timm) needs a CUDA GPU: on CPU its autocast would "
                             "silently train in fp32; use 'bf16' (which CPUs run: --mixed-precision bf16, or --amp "
                             "--amp-dtype bfloat16) or 'no'")
        self.folder.hold(self.accelerator)  # first: a second run on the folder is refused before any work
        try:
            self._build()
        except BaseException:
            self.folder.unlock()
            raise

    def _build(self) -> None:
        """The data, model, loss, optimizer, loaders and schedule of ``self.cfg``, prepared by Accelerate."""
        cfg = self.cfg
        set_seed(cfg.seed)
        with self.accelerator.main_process_first():
            self.data = run_splits(cfg)
        if cfg.num_classes is not None and cfg.num_classes != self.data.num_classes:
            raise ValueError(
                f"num_classes={cfg.num_classes} but dataset {cfg.dataset!r} has {self.data.num_classes} classes "
                f"in column {self.data.label_column!r}; drop --num-classes or pick the matching dataset"
            )
        model = build_model(cfg, self.data.num_classes)
        self.data_config = data_config(model.backbone, cfg.input_size, cfg.crop_pct)
        train_tf, self.eval_tf = build_transforms(self.data_config, cfg.train_scale)
        train_loader = build_loader(cfg, self.data, self.data.train, train_tf, train=True)
        if len(train_loader) == 0:
            raise ValueError(
                f"the training split has {len(self.data.train)} samples, fewer than one batch of {cfg.batch_size} "
                "(incomplete batches are dropped); lower batch_size or use more training data"
            )
        val_loader = build_loader(cfg, self.data, self.data.val, self.eval_tf, train=False)
        self.loss_settings = cfg.loss_settings()
        self.loss = SelfDistillationLoss(**self.loss_settings, external_weight=cfg.external_weight)
        self.external_teacher = self._external_teacher()
        self.model, self.optimizer, self.train_loader, self.val_loader = self.accelerator.prepare(
            model, build_optimizer(cfg, model), train_loader, val_loader
        )
        if len(self.train_loader) == 0:  # each process's share, after Accelerate split the batches
            raise ValueError(f"the training split has {len(self.data.train)} samples: fewer than one batch of "
                             f"{cfg.batch_size} for each of {self.accelerator.num_processes} processes; lower batch_size "
                             "or use more training data")
        steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, steps_per_epoch))
        self.progress = Progress()
        self.accelerator.register_for_checkpointing(self.scheduler, self.progress)

    def _external_teacher(self) -> nn.Module | None:
        """Frozen teacher for "KD + Ours": moved to the device, never ``prepare``d."""
        if self.cfg.teacher_model is None:
            return None
        teacher = timm.create_model(self.cfg.teacher_model, num_classes=self.data.num_classes)
        path = Path(self.cfg.teacher_checkpoint)
        load_strict(teacher, read_tensors(path, teacher.state_dict(), str(path)), path.name, str(path))
        return teacher.eval().requires_grad_(False).to(self.accelerator.device)

    # ---------------------------------------------------------------- the run
    def fit(self) -> RunResults:
        """Train (resuming if a checkpoint exists), then evaluate the best model on test; the run folder is
        released at the end, however the run ends."""
        self.folder.hold(self.accelerator)  # held since __init__, unless an earlier fit released it
        try:
            return self._fit()
        finally:
            self.folder.unlock()

    def _fit(self) -> RunResults:
        acc = self.accelerator
        self._print_banner()
        self._resume()
        if acc.is_main_process:
            self.folder.save_config(self.cfg)
        if self.cfg.log_with:  # on every process: Accelerate logs from the main one
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.cfg.to_dict().items()}
            acc.init_trackers(self.folder.root.name, config=hparams)  # scalars only: TensorBoard's hparams take no lists
        for epoch in range(self.progress.epoch, self.cfg.epochs):
            distilling = epoch < self.cfg.epochs - self.cfg.anneal_epochs
            self.loss.alpha = self.loss_settings["alpha"] if distilling else 0.0
            self.loss.lam = self.loss_settings["lam"] if distilling else 0.0
            started = time.time()
            train = self._train_epoch(epoch)
            val = self.evaluate(self.val_loader, desc=f"val {epoch + 1}")
            metrics = EpochMetrics(epoch=epoch + 1, seconds=round(time.time() - started, 2), val=val, **train)
            self.progress.epoch = epoch + 1
            score = self._selection_score(val)
            if score > self.progress.best_accuracy:
                self.progress.best_accuracy, self.progress.best_epoch = score, epoch + 1
                self._save_best()
            self._log(metrics)
            self.folder.save_checkpoint(acc, epoch + 1, self.cfg.keep_checkpoints)
            for callback in self.callbacks:
                callback(self, metrics)
        return self.finish()

    def _print_banner(self) -> None:
        """What this run trains, on what, where and into which folder (main process)."""
        cfg, data, acc, model = self.cfg, self.data, self.accelerator, self.accelerator.unwrap_model(self.model)
        params = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        exits = "the plain backbone (--baseline)" if cfg.baseline else f"{model.num_exits} exits"
        splits = " / ".join(f"{len(split):,} {name}" for name, split in
                            (("train", data.train), ("val", data.val), ("test", data.test)) if split is not None)
        processes = f" x {acc.num_processes} processes" if acc.num_processes > 1 else ""
        precision = "fp32" if cfg.mixed_precision == "no" else f"{cfg.mixed_precision} mixed precision"
        acc.print(f"timm-scan train: {cfg.model}, {exits}, {params / 1e6:.2f} M parameters ({trained / 1e6:.2f} M "
                  f"trained), input {'x'.join(map(str, self.data_config['input_size']))}\n"
                  f"  data: {cfg.dataset}, {data.num_classes} classes, {splits} images\n"
                  f"  device: {acc.device}{processes}{_cpu_threads(acc)}, {precision}; output: {self.folder.root}")

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch; the batch means of the loss parts (over processes too) and the mean step time."""
        acc, model = self.accelerator, self.model
        model.train()
        if self.cfg.freeze_backbone:  # as given: no BN statistics updated, no dropout
            acc.unwrap_model(model).backbone.eval()
        self.train_loader.set_epoch(epoch)
        sums: Tensor | None = None
        batches, step_seconds = 0, 0.0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", disable=not acc.is_local_main_process)
        for images, labels in bar:
            started = time.perf_counter()
            with acc.accumulate(model):
                output = model(images)
                teacher_logits = None
                if self.external_teacher is not None:
                    with torch.no_grad():
                        teacher_logits = self.external_teacher(images)
                loss = self.loss(output, labels, teacher_logits)
                value = loss.total.item()
                finite = torch.tensor(float(math.isfinite(value)), device=loss.total.device)
                if acc.num_processes > 1:  # every process stops together, none waits in an all-reduce
                    finite = acc.reduce(finite, reduction="sum") / acc.num_processes
                if finite.item() < 1:
                    raise TrainingDiverged(f"the loss is not finite ({value} here) at epoch {epoch + 1}, step "
                                           f"{batches + 1} (lr {self.scheduler.get_last_lr()[0]:.3g}); "
                                           f"{self._diverged_advice()}")
                acc.backward(loss.total)
                self.optimizer.step()
                if acc.sync_gradients:
                    self.scheduler.step()
                self.optimizer.zero_grad()
            parts = _loss_vector(loss)
            step_seconds += time.perf_counter() - started
            sums = parts if sums is None else sums + parts
            batches += 1
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.3g}")
        mean = acc.reduce(sums / max(batches, 1), reduction="mean").tolist()
        k = len(loss.ce)
        return {"lr": self.scheduler.get_last_lr()[0], "step_seconds": step_seconds / max(batches, 1), "loss": mean[0],
                "ce": mean[1:1 + k], "kd": mean[1 + k:1 + 2 * k], "hint": mean[1 + 2 * k:]}

    @torch.no_grad()
    def evaluate(self, loader, desc: str = "eval") -> ExitAccuracy:
        """Accuracy of every exit and of the ensemble over the whole split, gathered over processes."""
        return self._evaluate(loader, desc)[0]

    def _evaluate(self, loader, desc: str, keep_outputs: bool = False) -> tuple[ExitAccuracy, list[Tensor], Tensor | None]:
        """``evaluate``, and where asked every exit's softmax over the split (gathered) and its labels."""
        acc, model = self.accelerator, self.model
        model.eval()
        correct: Tensor | None = None
        count = 0
        kept: list[list[Tensor]] = []
        kept_labels = []
        for images, labels in tqdm(loader, desc=desc, disable=not acc.is_local_main_process, leave=False):
            probs = [F.softmax(z.float(), dim=-1) for z in model(images).logits]
            preds = torch.stack([p.argmax(-1) for p in probs] + [ensemble_probs(probs).argmax(-1)])  # (K+1, B)
            gathered = acc.gather_for_metrics((preds.T.contiguous(), labels, *([torch.stack(probs, 1)] if keep_outputs else [])))
            preds, labels = gathered[:2]
            if keep_outputs:
                kept.append(gathered[2].cpu())
                kept_labels.append(labels.cpu())
            hits = (preds == labels[:, None]).sum(0)
            correct = hits if correct is None else correct + hits
            count += labels.numel()
        k = correct.numel() - 1
        accuracy = ExitAccuracy([correct[i].item() / count for i in range(k)],
                                correct[k].item() / count if k > 1 else None, count)
        if not keep_outputs:
            return accuracy, [], None
        stacked = torch.cat(kept)  # (N, K, C)
        return accuracy, list(stacked.unbind(1)), torch.cat(kept_labels)

    # ---------------------------------------------------------- run folder
    def _resume(self) -> None:
        """Continue from the last checkpoint that loads (`RunFolder.resume`), after removing what an
        interrupted write left; drop the metrics of the epochs redone."""
        acc = self.accelerator
        if acc.is_main_process:
            self.folder.clean_up()
        acc.wait_for_everyone()
        checkpoint = self.folder.resume(acc, self.cfg)
        if checkpoint is not None:
            acc.print(f"resumed from {checkpoint} (epoch {self.progress.epoch} done)")
        if acc.is_main_process:
            self.folder.keep_metrics(self.progress.epoch)

    def _selection_score(self, val: ExitAccuracy) -> float:
        """What picks the best epoch on validation: the deepest exit's accuracy, or, where the backbone is frozen
        (the deepest exit never changes), the mean accuracy of every exit."""
        return sum(val.exits) / len(val.exits) if self.cfg.freeze_backbone else val.deepest

    def _save_best(self) -> None:
        """The model as ``best/`` (never non-finite weights), swapped in whole."""
        acc = self.accelerator
        acc.wait_for_everyone()
        model = self._unwrapped()
        bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise TrainingDiverged(f"the weights are not finite after epoch {self.progress.epoch} ({bad[0]} and "
                                   f"{len(bad) - 1} more); nothing was saved as {self.folder.best}; "
                                   f"{self._diverged_advice()}")
        if acc.is_main_process:
            self.folder.save_best(model, self._card(model))
        acc.wait_for_everyone()

    def _diverged_advice(self) -> str:
        """How to go on after divergence: not by rerunning, which resumes with the same settings and seed and so
        diverges again, but by a new run with safer settings, from the best weights so far where there are some."""
        cfg = self.cfg
        fp32 = ", or in fp32 (--mixed-precision no)" if cfg.mixed_precision != "no" else ""
        best = self.folder.best
        start = f", adding --init-from {best} to start from this run's best model" if best.is_dir() else ""
        return (f"rerunning this command would diverge again (it resumes with the same settings and seed). Train anew "
                f"into another --output-dir with a lower --lr (such as {cfg.lr / 10:g}) or --warmup-epochs N"
                f"{fp32}{start}")

    def _unwrapped(self) -> MultiExitModel:
        """The model without Accelerate's wrappers, carrying its class names and data config."""
        model: MultiExitModel = self.accelerator.unwrap_model(self.model)
        model.class_names, model.data_config = self.data.class_names, self.data_config
        return model

    def _card(self, model: MultiExitModel, results: RunResults | None = None) -> str:
        return model_card(model, repo_id=self.cfg.push_to_hub, dataset=self.cfg.dataset,
                          train_config=self.cfg.to_dict(), results=results)

    def _log_tradeoff(self, probs: list[Tensor], labels: Tensor, results: RunResults) -> None:
        """The β sweep of the threshold search on the best model's validation outputs, as a plot in the
        run folder (``training_tradeoff.png``) and an image in the trackers."""
        points = sweep_beta(probs, labels, ExitCosts.macs(results.exit_macs, results.backbone_macs))
        path = plot_tradeoff([(p.speedup, 100 * p.accuracy) for p in points], self.folder.tradeoff_plot,
                             baseline=(1.0, 100 * results.val.deepest), labels=[f"β={p.beta:g}" for p in points],
                             title=f"{self.cfg.model}: validation, β sweep")
        image = np.asarray(Image.open(path).convert("RGB"))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("val/tradeoff", image, self.progress.epoch, dataformats="HWC")
                tracker.writer.flush()
            elif hasattr(tracker, "log_images"):  # not every tracker takes images; the PNG is in the run folder
                tracker.log_images({"val/tradeoff": [image]}, step=self.progress.epoch)

    def _log(self, metrics: EpochMetrics) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            self.folder.append_metrics(metrics)
            summary = ", ".join(f"{v:.3f}" for v in metrics.val.exits)
            ensemble = f", ensemble {metrics.val.ensemble:.3f}" if metrics.val.ensemble is not None else ""
            acc.print(f"epoch {metrics.epoch}: loss {metrics.loss:.3f}, val accuracy per exit {summary}{ensemble} "
                      f"({metrics.seconds:.0f}s)")
        if self.cfg.log_with:
            acc.log(metrics.scalars(), step=metrics.epoch)

    # ----------------------------------------------------------------- report
    def finish(self) -> RunResults:
        """Load the best weights, evaluate on test, print the table, write ``results.json``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        model = self._unwrapped()
        load_weights(model, self.folder.best)
        size = tuple(self.data_config["input_size"])
        val, val_probs, val_labels = self._evaluate(self.val_loader, "val", keep_outputs=bool(self.cfg.log_with))
        test_loader = acc.prepare(build_loader(self.cfg, self.data, self.data.test, self.eval_tf, train=False))
        test = self.evaluate(test_loader, desc="test")
        results = RunResults(
            model=self.cfg.model, baseline=self.cfg.baseline, best_epoch=self.progress.best_epoch, val=val, test=test,
            exit_macs=model.exit_macs(size), backbone_macs=model.backbone_macs(size),
            params=sum(p.numel() for p in model.parameters()), loss=None if self.cfg.baseline else self.loss_settings,
        )
        if acc.is_main_process:
            self.folder.write_results(results, self._card(model, results))
            acc.print(f"{results.model}{' (baseline)' if results.baseline else ''}: best epoch {results.best_epoch}, "
                      f"validation accuracy {results.val.deepest:.4f}; on {test.samples} test images:")
            acc.print(exit_table(results.exit_macs, results.backbone_macs, test))
            if self.cfg.log_with and model.num_exits > 1:
                self._log_tradeoff(val_probs, val_labels, results)
            if self.cfg.push_to_hub:
                url = push_to_hub(model, self.cfg.push_to_hub, save_directory=self.folder.best,
                                  card=self._card(model, results))
                acc.print(f"pushed the best model to {self.cfg.push_to_hub}: {url}")
            acc.print(self._next_steps())
        acc.end_training()
        return results

    def _next_steps(self) -> str:
        """Where the run is, and the command to run next."""
        root = shlex.quote(str(self.folder.root))
        wrote = f"wrote {self.folder.root}: best/ (the best epoch's model), results.json, metrics.jsonl. Next: "
        if self.cfg.baseline:
            return wrote + ("this run is the fitness baseline of a self-distillation run's search: timm-scan search "
                            f"RUN --baseline-run {root}")
        return wrote + (f"choose the exit thresholds on the validation split with timm-scan search {root} --max-drop 1 "
                        f"(at most 1 point below the deepest exit), then timm-scan evaluate {root}")


class TrainingDiverged(FloatingPointError):
    """The loss or the weights stopped being finite; training stops without saving them."""


def check_trackers(log_with: str | None) -> list[str]:
    """The Accelerate trackers of ``log_with`` (comma-separated), each known and installed, or a
    ``ValueError`` naming the install command, so a run never trains without the logs it was asked for."""
    if not log_with:
        return []
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    valid = [t.value for t in LoggerType if t.value != "all"]
    names = [name.strip() for name in log_with.split(",") if name.strip()]
    for name in names:
        if name not in valid:
            raise ValueError(f"log_with: unknown tracker {name!r}; Accelerate supports {valid}")
        if LoggerType(name) not in get_available_trackers():
            install = f"pip install 'timm-scan[{name}]'" if name in TRACKER_EXTRAS else f"pip install {name}"
            raise ValueError(f"log_with={name!r} but {name} is not installed; install it with: {install}")
    return names


def _loss_vector(loss: LossOutput) -> Tensor:
    return torch.stack([loss.total.detach(), *loss.ce, *loss.kd, *loss.hint]).float()


def _cpu_threads(acc: Accelerator) -> str:
    """On CPU, the threads each process computes with, and a hint when cores sit idle.

    ``accelerate launch`` sets ``OMP_NUM_THREADS=1`` unless told otherwise, which trains on one core of many.
    """
    if acc.device.type != "cpu":
        return ""
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = cores // acc.num_processes
    hint = (f" of {share} cores (accelerate launch sets OMP_NUM_THREADS=1 unless given --num_cpu_threads_per_process "
            f"{share})") if share > threads else ""
    return f", {threads} thread{'s' * (threads > 1)}{hint}"
