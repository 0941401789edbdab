"""Side by side with the PyPI package earlyon (0.3.0, MIT): same backbone, data, recipe and seed.

Our self-distillation (SD) run (``--ours``, a finished ``examples/train.py`` output folder) fixes
everything: its TrainConfig gives the dataset and splits (``run_splits``: train, val and test carved
the same way), the transforms, the timm model, the seed, the optimiser, schedule, epochs and batch.

- **earlyon's model**: ``earlyon.models.custom_ee`` on a fresh ``timm.create_model(cfg.model)`` with
  exits after the same stages as ours (``layer1``, ``layer2``, ``layer3`` for ResNets), earlyon's
  head (global pooling, Linear to 128, ReLU, dropout 0.2, Linear) and its equal loss weights.
- **earlyon's training**: joint training of backbone and exits with its
  ``weighted_multi_exit_loss`` (cross-entropy per exit, no distillation): the steps of
  ``earlyon.training.joint_train_backbone_and_exits`` (every parameter in one optimiser, backbone and
  heads in train mode), written out here because that function steps its own per-epoch
  ``CosineAnnealingLR`` with no warm-up; here the schedule is ours (``timm_scan.training.lr_lambda``:
  per-step cosine after linear warm-up), with our optimiser (``build_optimizer``), loaders
  (``build_loader``: shuffled, ``drop_last``), epochs, batch and train transforms. After each epoch,
  one pass over val (earlyon's ``collect_head_logits``); the epoch kept is the one with the best
  final-head val accuracy, as our trainer keeps the best deepest exit.
  Weights go to ``<ours>/../earlyon/model.safetensors`` with ``training.json`` (recipe, seconds, val
  accuracy per epoch); a later run loads them instead of training again, unless ``--retrain``. The
  training saves its state there after each epoch (``training_state.*``: weights, optimizer, schedule,
  torch's, Python's and NumPy's RNG), and an interrupted run resumes from it, bit for bit as if never
  stopped; ``--retrain`` drops all of it first.
- **MACs** (``timm_scan.model.count_macs`` for both; MACs = FLOPs / 2): ours from
  ``model.exit_macs``; earlyon's backbone up to each exit stage from timm's
  ``forward_intermediates(stop_early=True)`` plus the heads that ran (an enabled exit's head runs for
  every sample that reaches it; a disabled one never runs). Its own FLOPs fractions (fvcore) are
  only the knob of its budget calibration, never reported.
- **Accuracy against MACs on test, thresholds from val only**. Ours: ``sweep_beta`` (SCAN's genetic
  search, ensemble fallback) on val outputs with MACs as the cost, each β's thresholds replayed on
  test outputs. earlyon: ``calibrate_thresholds_for_budget`` at each of ``--earlyon-budgets`` and
  ``calibrate_thresholds`` at each of ``--earlyon-drops`` on val (its greedy grid search, confidence
  policy, no temperature fit), each policy replayed on cached test logits with its
  ``simulate_policy``. "Accuracy at equal MACs": for each budget (a fraction of the plain
  backbone's MACs), each method's best test accuracy among its early-exit points whose mean test MACs
  are within the budget and its deepest exit run alone (the backbone's own classifier, at the
  backbone's MACs); a pick among points on test, the same for both; "-" where none fits.
- **Accuracy against measured latency: one curve per method at batch 1 and at batch 256.** The
  three models (our wrapped model, earlyon's, the plain timm backbone with our trained weights) and
  the timed images are put in ``--memory-format`` (default ``channels_last``, what the README
  recommends on CPU). At each batch size b:

  1. *Our points, thresholds searched against measured latency.* ``measure_exit_latency(ours,
     batch_size=b, policy=ExitPolicy(fallback="ensemble"))`` times what leaving at each exit costs (ms per image, the
     predictor as it runs, in turns with the plain backbone; random images, as many as are timed
     below, ``--repeats`` passes). Where fewer than b images are timed (smoke tests), it is measured
     at the batch actually timed. With that ``ExitLatency`` as the cost (``ExitCosts.from_latency``), on val
     outputs: ``sweep_beta`` at each of ``--betas``, ``search_thresholds(max_accuracy_drop=d / 100)`` at each of
     ``--drops`` (points below
     the deepest exit's val accuracy) and ``search_thresholds(budget=f × the backbone's ms per image
     in that ExitLatency)`` at each of ``--latency-budgets`` (settings ``ms-budget=f``): with the
     drops, the two kinds of target earlyon's calibrators get. A target no thresholds meet on val is
     skipped and recorded.
     Each threshold vector is one point; identical vectors are merged (their settings joined).
  2. *earlyon's points*: its calibrated policies from above (budgets and drops), identical policies
     (same enabled exits, same thresholds on them) merged.
  3. *Timing* (``timm_scan.deploy.wall_clocks``: every setting timed once per pass, in turns, the
     median of ``--repeats`` passes, after a warm-up batch each) on the first test images
     (``--latency-images-b1`` at batch 1, ``--latency-images`` at batch 256): the plain backbone,
     every one of our points (``EarlyExitPredictor`` with its thresholds: per sample at any batch)
     and every earlyon point (batch 1: ``model(x, mode="inference")`` per image, later stages
     really skipped; batch 256: ``forward_inference_batched``, where the whole batch leaves at the
     first exit at which every sample is confident). Speed-up: the backbone's time over the setting's.
     After the timing each setting runs once more over the same images for its answers.
  4. *Accuracy of each point.* Batch 1: both methods decide per sample, so the accuracy is the one
     on the whole test split from the cached outputs: our thresholds replayed (``ExitTable``), earlyon's
     ``simulate_policy``, the backbone's own accuracy (our deepest exit's); mean MACs likewise. The
     timed run's answers (exit and label of each timed image) are compared with the same replay on
     those images (ours: ``simulate_early_exit``; earlyon: ``simulate_policy`` one image at a time;
     the backbone: our cached deepest exit) and the share that agrees is recorded
     (``agreement_with_simulation``; a warning is printed below 1, which float rounding in another
     memory format can cause near a threshold). Batch 256: earlyon's batched mode is not its
     per-sample policy, so every method's accuracy and mean MACs there are those of the timed run
     itself, on exactly the timed images (the same images for all).
  5. *Verdict.* Our curve lies above earlyon's when, for every earlyon point, our best accuracy
     among our points whose measured ms/image is at most that point's is at least its accuracy (our
     points slower than the plain backbone count too; the backbone itself does not, but a second
     flag says what counting it as our point would give). The margin per earlyon point is that
     best accuracy minus its accuracy ("none" when no point of ours is as fast); the reverse check
     (earlyon above ours) is reported alike.
  6. *With* ``--onnx``: our model exported (``export_onnx``) and run by ``OnnxEarlyExitPredictor``, and
     the plain backbone exported as one graph, both with ``session_options()`` (per-session pools
     that stop spinning when a run returns, so that they take no core from the settings timed after
     them). Step 1 again with the predictor's own ``measure_exit_latency`` as the cost (its backbone
     time, which the ``ms-budget`` fractions scale, is the chain of section graphs and the deepest
     head, not the one-graph backbone); its points and the exported backbone are timed in turns with
     everything above (NCHW images: what ONNX Runtime takes; the copy from channels_last is part of
     each call); their speed-up is over the exported backbone, and their curve gets a verdict of
     its own (``verdict_onnx``). earlyon has no export, so this compares our deployment path with
     earlyon's torch one, not like for like; the torch curves above are the like-for-like comparison.

Everything runs on CPU. The real run, then the smoke-test budget (overrides are for that only)::

    python benchmarks/peer_earlyon.py --ours runs/bench/resnet18-sd --out benchmarks/results/peer_earlyon.json
    python benchmarks/peer_earlyon.py --ours runs/bench/resnet18-sd --onnx --out peer_earlyon_onnx.json  # + ONNX
    python benchmarks/peer_earlyon.py --ours RUN --out X.json --epochs 1 --max-train-samples 96 \\
        --val-size 24 --max-test-samples 32 --num-workers 0 --latency-images 32 --latency-images-b1 4

The JSON holds the recipe, per-exit MACs and accuracy (``methods``), the MACs trade-off points
(``rows``), ``equal_macs``, and ``latency_curves`` (per batch size: the ``ExitLatency`` our search
used, the timed points of each method, skipped searches and the verdict; with ``--onnx`` also
``exit_latency_onnx`` and ``verdict_onnx``); ``<out>.png`` plots
accuracy against MACs and ``<out>_latency.png`` accuracy against measured ms per image.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from accelerate.utils import set_seed
from earlyon.core.thresholds import (
    HeadLogits,
    calibrate_thresholds,
    calibrate_thresholds_for_budget,
    collect_head_logits,
    simulate_policy,
)
from earlyon.core.types import BatchedInferenceResult, InferenceResult, exit_label
from earlyon.core.wrappers import EarlyExitWrapper
from earlyon.models import custom_ee
from earlyon.training import weighted_multi_exit_loss
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import timm_scan
from timm_scan import ExitCosts, ExitLatency, ExitPolicy, MultiExitModel
from timm_scan.deploy import ExitTable, ensemble_probs, simulate_early_exit, wall_clocks
from timm_scan.deploy.threads import one_torch_thread
from timm_scan.model import count_macs
from timm_scan.training import (
    ImageSplits,
    TorchImageDataset,
    TrainConfig,
    build_loader,
    build_optimizer,
    build_transforms,
    cached_outputs,
    data_config,
    epoch_metrics,
    eval_dataset,
    load_run,
    lr_lambda,
    run_splits,
)

OURS, PEER = "timm-scan (SD)", "earlyon"
RECIPE_OVERRIDES = ("epochs", "max_train_samples", "max_test_samples", "val_size", "num_workers")
# What earlyon's training depends on; saved weights are reused only if these match.
TRAINING_FIELDS = ("dataset", "image_column", "label_column", "val_size", "max_train_samples", "seed", "model",
                   "pretrained", "input_size", "crop_pct", "train_scale", "epochs", "batch_size", "optimizer", "lr",
                   "momentum", "weight_decay", "schedule", "milestones", "gamma", "warmup_epochs")


@dataclass
class Point:
    """One early-exit operating point: thresholds chosen on val, replayed on test. Accuracies are
    fractions, MACs are mean MACs per sample, shares are per exit (deepest last)."""

    method: str
    setting: str
    thresholds: list[float]
    val_accuracy: float
    val_macs: float
    test_accuracy: float
    test_macs: float
    test_exit_shares: list[float]
    enabled_exits: list[bool] | None = None  # earlyon only


@dataclass
class Side:
    """What one method brings to the comparison."""

    name: str
    exit_macs: list[float]  # cumulative MACs to leave at each exit, every shallower head counted
    test_exit_accuracy: list[float]  # per exit, deepest last
    val_deepest_accuracy: float
    points: list[Point]
    extra: dict[str, Any] = field(default_factory=dict)  # ensemble accuracy, training facts


# ------------------------------------------------------------------ recipe, data, earlyon's model
def with_overrides(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """Our run's TrainConfig with the command line's overrides."""
    overrides = {k: getattr(args, k) for k in RECIPE_OVERRIDES if getattr(args, k) is not None}
    if cfg.grad_accum != 1 or cfg.mixed_precision not in (None, "no"):
        raise ValueError("the earlyon side replicates recipes with grad_accum 1 and mixed_precision 'no' only")
    return dataclasses.replace(cfg, **overrides)


def build_earlyon(cfg: TrainConfig, exit_layers: list[str], num_classes: int, size: int) -> EarlyExitWrapper:
    set_seed(cfg.seed)
    backbone = timm.create_model(cfg.model, num_classes=num_classes, pretrained=cfg.pretrained)
    return custom_ee(backbone, exit_layers, num_classes, input_shape=(1, 3, size, size))


def accuracy(scores: Tensor, labels: Tensor) -> float:
    """Share of samples whose highest-scoring class (logits or probabilities) is the label."""
    return (scores.argmax(-1) == labels).double().mean().item()


def head_accuracies(cache: HeadLogits) -> list[float]:
    """Accuracy of each earlyon head (exits, then the final classifier) on cached logits."""
    return [accuracy(z, cache.targets) for z in cache.logits]


def train_earlyon(model: EarlyExitWrapper, cfg: TrainConfig, train: DataLoader, val: DataLoader,
                  folder: Path, trained_on: dict[str, Any]) -> dict[str, Any]:
    """Joint training with earlyon's loss under our recipe; the model ends with its best epoch's weights.
    After each epoch the state (weights, best weights, optimizer, schedule, RNG: safetensors and JSON in
    ``folder``) is saved, and a run with the same recipe resumes from it."""
    model.requires_grad_(True)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(train)))
    progress = {"epochs_done": 0, "history": [], "best_epoch": 0, "seconds": 0.0}
    best_state = None
    if (folder / PARTIAL_JSON).is_file():
        progress, best_state = resume_earlyon(model, optimizer, scheduler, folder, trained_on)
        print(f"earlyon: resumed after epoch {progress['epochs_done']}")
    started = time.perf_counter() - progress["seconds"]
    for epoch in range(progress["epochs_done"], cfg.epochs):
        model.train()
        bar = tqdm(train, desc=f"earlyon epoch {epoch + 1}/{cfg.epochs}")
        for images, labels in bar:
            loss = weighted_multi_exit_loss(model(images, mode="training"), labels, model.config.loss_weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
        history = progress["history"]
        history.append(head_accuracies(collect_head_logits(model, val, "cpu")))
        print(f"earlyon epoch {epoch + 1}: val accuracy per head {', '.join(f'{a:.3f}' for a in history[-1])}")
        if best_state is None or history[-1][-1] > history[progress["best_epoch"] - 1][-1]:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            progress["best_epoch"] = epoch + 1
        progress.update(epochs_done=epoch + 1, seconds=time.perf_counter() - started)
        save_earlyon_progress(model, best_state, optimizer, scheduler, progress, folder, trained_on)
    model.load_state_dict(best_state)
    return {"seconds": round(time.perf_counter() - started, 1), "best_epoch": progress["best_epoch"],
            "val_accuracy_per_epoch": progress["history"]}


PARTIAL_TENSORS, PARTIAL_JSON = "training_state.safetensors", "training_state.json"


def save_earlyon_progress(model: nn.Module, best_state: dict[str, Tensor], optimizer: torch.optim.Optimizer,
                          scheduler: Any, progress: dict[str, Any], folder: Path, trained_on: dict[str, Any]) -> None:
    """The training state after an epoch: tensors as safetensors, the rest as JSON (JSON written last)."""
    optim = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"best.{k}": v for k, v in best_state.items()}
    tensors["rng"] = torch.get_rng_state()
    optim_values: dict[str, dict[str, Any]] = {}
    for index, state in optim["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{name}"] = value
            else:
                optim_values.setdefault(str(index), {})[name] = value
    numpy_state = np.random.get_state()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PARTIAL_JSON).unlink(missing_ok=True)  # a state without its JSON is never read
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(folder / PARTIAL_TENSORS))
    partial = folder / f"{PARTIAL_JSON}.partial"
    partial.write_text(json.dumps({
        **trained_on, "progress": progress, "optimizer_groups": optim["param_groups"],
        "optimizer_values": optim_values, "scheduler": scheduler.state_dict(),
        # the transforms draw from these where the loader has no workers (workers are seeded from torch's)
        "python_random": random.getstate(),
        "numpy_random": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}, indent=2))
    os.replace(partial, folder / PARTIAL_JSON)


def resume_earlyon(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, folder: Path,
                   trained_on: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Load what `save_earlyon_progress` wrote (strictly); the progress and the best weights so far."""
    meta = json.loads((folder / PARTIAL_JSON).read_text())
    if {k: meta.get(k) for k in trained_on} != trained_on:
        raise ValueError(f"{folder / PARTIAL_JSON} is a training of another recipe or other exits; delete it "
                         "or pass --retrain")
    tensors = load_file(str(folder / PARTIAL_TENSORS))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["optimizer_values"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng"])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = meta["numpy_random"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return meta["progress"], best


def trained_earlyon(cfg: TrainConfig, splits: ImageSplits, exit_layers: list[str], folder: Path, retrain: bool,
                    transforms: tuple[Callable, Callable], size: int) -> tuple[EarlyExitWrapper, dict[str, Any]]:
    """earlyon's model, trained (or loaded from ``folder`` if trained before with the same recipe), in eval mode."""
    model = build_earlyon(cfg, exit_layers, splits.num_classes, size)
    weights, meta_path = folder / "model.safetensors", folder / "training.json"
    recipe = cfg.to_dict()
    trained_on = {"recipe": {k: recipe[k] for k in TRAINING_FIELDS}, "exit_layers": exit_layers}
    if weights.is_file() and not retrain:
        meta = json.loads(meta_path.read_text())
        if {k: meta[k] for k in trained_on} != trained_on:
            raise ValueError(f"{weights} was trained with another recipe or other exits; pass --retrain")
        model.load_state_dict(load_file(str(weights)), strict=True)
        print(f"earlyon: loaded {weights} (trained in {meta['seconds']:.0f} s; pass --retrain to train again)")
    else:
        train_tf, eval_tf = transforms
        if retrain:  # everything of the earlier training goes, so that this one resumes if interrupted
            for name in (PARTIAL_JSON, PARTIAL_TENSORS, weights.name, meta_path.name):
                (folder / name).unlink(missing_ok=True)
        meta = {**trained_on, **train_earlyon(model, cfg, build_loader(cfg, splits, splits.train, train_tf, True),
                                              build_loader(cfg, splits, splits.val, eval_tf, False), folder,
                                              trained_on)}
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        meta_path.write_text(json.dumps(meta, indent=2))
        for partial in (PARTIAL_JSON, PARTIAL_TENSORS):
            (folder / partial).unlink()
    return model.eval(), meta


# ------------------------------------------------------------------------------------------- MACs
def earlyon_costs(model: EarlyExitWrapper, size: int) -> tuple[list[int], list[int]]:
    """MACs of the backbone up to each exit stage (then the whole backbone) and of each exit head."""
    backbone = model.backbone
    stages = [f["module"] for f in backbone.feature_info]
    x = torch.zeros(1, 3, size, size)
    stage_macs, head_macs = [], []
    with torch.no_grad():
        for ep in model.config.exit_points:
            index = stages.index(ep.layer_name)

            def upto(t: Tensor, index: int = index) -> list[Tensor]:
                return backbone.forward_intermediates(t, indices=[index], stop_early=True, intermediates_only=True)

            stage_macs.append(count_macs(upto, x))
            head_macs.append(count_macs(model.exit_heads[ep.name], upto(x)[0]))
    return stage_macs + [count_macs(backbone, x)], head_macs


def earlyon_exit_macs(costs: tuple[list[int], list[int]], enabled: list[bool]) -> list[float]:
    """MACs to leave at each exit (final last) under a policy: the stages run plus the enabled heads run."""
    stage_macs, head_macs = costs
    heads_run = np.cumsum([m if on else 0 for m, on in zip(head_macs, enabled)])
    return [float(s + h) for s, h in zip(stage_macs, [*heads_run, heads_run[-1]])]


# --------------------------------------------------------------------------------- trade-off points
@dataclass
class Outputs:
    """Our model's softmax of every exit (deepest last) and the labels, on val and on test."""

    val_probs: list[Tensor]
    val_labels: Tensor
    test_probs: list[Tensor]
    test_labels: Tensor


def ours_outputs(run: Path, model: MultiExitModel, splits: ImageSplits) -> Outputs:
    """Cached once per run (``cached_outputs``)."""
    val = cached_outputs(run, "val", model, eval_dataset(splits, "val", model.data_config))
    test = cached_outputs(run, "test", model, eval_dataset(splits, "test", model.data_config))
    return Outputs(*val, *test)


def ours_side(run: Path, model: MultiExitModel, cfg: TrainConfig, outputs: Outputs, size: tuple[int, int, int],
              betas: list[float]) -> Side:
    """Our exits on test and one point per β (thresholds by SCAN's genetic search on val, MACs as the cost)."""
    val_probs, val_labels, test_probs, test_labels = outputs.val_probs, outputs.val_labels, outputs.test_probs, \
        outputs.test_labels
    costs = model.exit_costs(size)
    exit_macs = model.exit_macs(size)
    test_table = ExitTable.from_outputs(test_probs, test_labels, costs)
    points = []
    for result in timm_scan.sweep_beta(val_probs, val_labels, costs, betas=betas, seed=cfg.seed):
        thresholds = np.array([result.thresholds])
        test_accuracy, test_speedup = test_table.evaluate(thresholds)
        points.append(Point(
            OURS, f"β={result.beta:g}", list(result.thresholds), result.accuracy, costs.backbone / result.speedup,
            float(test_accuracy[0]), costs.backbone / float(test_speedup[0]),
            test_table.exit_shares(thresholds)[0].tolist(),
        ))
    return Side(
        OURS, [float(m) for m in exit_macs], [accuracy(p, test_labels) for p in test_probs],
        accuracy(val_probs[-1], val_labels), points,
        {"test_ensemble_accuracy": accuracy(ensemble_probs(test_probs), test_labels),
         "training_seconds": sum(m.seconds for m in epoch_metrics(run))},
    )


def shares_of(distribution: dict[str, float], n_exits: int) -> list[float]:
    """earlyon's exit distribution (by label) as shares per exit, final last."""
    return [distribution.get(exit_label(i), 0.0) for i in range(n_exits)] + [distribution.get(exit_label(-1), 0.0)]


def earlyon_side(model: EarlyExitWrapper, val: DataLoader, caches: tuple[HeadLogits, HeadLogits],
                 costs: tuple[list[int], list[int]], budgets: list[float], drops: list[float],
                 meta: dict[str, Any]) -> Side:
    """earlyon's heads on test and one point per calibration (its own calibrators on ``val``; ``caches``:
    its head logits on val and on test)."""
    val_cache, test_cache = caches
    n = len(model.config.exit_points)
    calibrations = [(f"budget={b:g}", lambda b=b: calibrate_thresholds_for_budget(model, val, target_computation=b))
                    for b in budgets]
    calibrations += [(f"drop={d:g}", lambda d=d: calibrate_thresholds(model, val, target_accuracy_drop=d))
                     for d in drops]
    points = []
    for setting, calibrate in calibrations:
        with warnings.catch_warnings():  # an unattainable budget warns; the point is kept as calibrated
            warnings.simplefilter("ignore", UserWarning)
            calibrate()
        enabled = list(model.config.enabled_exits)
        macs = earlyon_exit_macs(costs, enabled)
        on_val, on_test = simulate_policy(val_cache, model), simulate_policy(test_cache, model)
        val_shares, test_shares = shares_of(on_val.exit_distribution, n), shares_of(on_test.exit_distribution, n)
        points.append(Point(
            PEER, setting, list(model.config.confidence_thresholds), on_val.accuracy, float(np.dot(val_shares, macs)),
            on_test.accuracy, float(np.dot(test_shares, macs)), test_shares, enabled,
        ))
    all_heads = earlyon_exit_macs(costs, [True] * n)
    return Side(PEER, all_heads, head_accuracies(test_cache), head_accuracies(val_cache)[-1], points,
                {"training_seconds": meta["seconds"], "best_epoch": meta["best_epoch"],
                 "val_accuracy_per_epoch": meta["val_accuracy_per_epoch"]})


def equal_macs(sides: list[Side], fractions: list[float], backbone_macs: int) -> list[dict[str, Any]]:
    """Per MACs budget: each method's best test accuracy among its points within the budget and its
    deepest exit run alone (the backbone, at the backbone's MACs); None if none fits."""
    rows = []
    for f in fractions:
        row: dict[str, Any] = {"budget_fraction": f, "budget_macs": f * backbone_macs}
        for side in sides:
            candidates = [(p.test_macs, p.test_accuracy) for p in side.points]
            candidates.append((backbone_macs, side.test_exit_accuracy[-1]))
            within = [accuracy for macs, accuracy in candidates if macs <= f * backbone_macs * (1 + 1e-9)]
            row[side.name] = max(within) if within else None
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- latency
BACKBONE = "plain timm backbone (our weights)"
OURS_ONNX, BACKBONE_ONNX = "timm-scan (SD), ONNX Runtime", "plain backbone, ONNX Runtime"
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
BATCH_SIZES = (1, 256)
Answers = tuple[Tensor, Tensor, Tensor]  # per image: predicted label, exit (0-based, the last: the end), MACs


@dataclass
class CurvePoint:
    """One setting timed at one batch size (fractions: accuracy, MACs over the plain backbone's).

    ``accuracy`` and ``mean_macs_fraction`` place the point on its curve: at batch 1 they are the
    per-sample policy's on the whole test split (``simulated_*``), at batch 256 the timed run's on the
    timed images (``timed_*``). ``agreement_with_simulation``: the share of timed images whose exit and
    label in the timed run are the replay's (None where the timed mode is not the per-sample policy)."""

    method: str
    setting: str  # the searches or calibrations that gave this policy, joined where they agree
    thresholds: list[float] | None = None
    enabled_exits: list[bool] | None = None  # earlyon only
    ms_per_image: float = math.nan
    speedup_vs_backbone: float = math.nan
    accuracy: float = math.nan
    mean_macs_fraction: float = math.nan
    simulated_accuracy: float | None = None
    simulated_macs_fraction: float | None = None
    timed_accuracy: float | None = None
    timed_macs_fraction: float | None = None
    agreement_with_simulation: float | None = None
    val_accuracy: float | None = None  # the policy's on val, where it was chosen
    predicted_ms_per_image: float | None = None  # ours: what the ExitLatency predicts on the test split


@dataclass
class OnnxSide:
    """``--onnx``: our model as `export_onnx` wrote it to ``folder``, its points (thresholds searched
    against the ONNX Runtime predictor's own measured latency) and the plain backbone as one graph."""

    folder: Path
    backbone: Any  # onnxruntime.InferenceSession
    points: list[CurvePoint]


def ours_latency_points(outputs: Outputs, latency: ExitLatency, betas: list[float], drops: list[float],
                        budgets: list[float], seed: int, exit_macs: list[int], backbone_macs: int,
                        method: str = OURS) -> tuple[list[CurvePoint], list[dict[str, str]]]:
    """Our thresholds searched on val with the measured ``latency`` as the cost (the β sweep, the
    cheapest thresholds within each accuracy drop, the most accurate within each budget: a fraction of
    ``latency.backbone_ms_per_image``), replayed on test; identical vectors merged. Also the targets no
    thresholds meet on val, with the search's reason. ``method``: which of our runtimes ``latency`` timed."""
    probs, labels = outputs.val_probs, outputs.val_labels
    ms = ExitCosts.from_latency(latency)
    searches = [(f"β={r.beta:g}", r) for r in timm_scan.sweep_beta(probs, labels, ms, betas=betas, seed=seed)]
    targets = [(f"max-drop={d:g}pt", {"max_accuracy_drop": d / 100}) for d in drops]  # points → a fraction
    targets += [(f"ms-budget={f:g}", {"budget": f * latency.backbone_ms_per_image}) for f in budgets]
    skipped = []
    for setting, target in targets:
        try:
            searches.append((setting, timm_scan.search_thresholds(probs, labels, ms, seed=seed, **target)))
        except ValueError as e:
            skipped.append({"method": method, "setting": setting, "reason": str(e)})
    on_macs = ExitTable.from_outputs(outputs.test_probs, outputs.test_labels, ExitCosts.macs(exit_macs, backbone_macs))
    on_ms = ExitTable.from_outputs(outputs.test_probs, outputs.test_labels, ms)
    merged: dict[tuple[float, ...], CurvePoint] = {}
    for setting, result in searches:
        key = tuple(result.thresholds)
        if key in merged:
            merged[key].setting += f", {setting}"
            continue
        test_accuracy, test_speedup = on_macs.evaluate([result.thresholds])
        _, ms_speedup = on_ms.evaluate([result.thresholds])
        merged[key] = CurvePoint(
            method, setting, list(result.thresholds), simulated_accuracy=float(test_accuracy[0]),
            simulated_macs_fraction=1 / float(test_speedup[0]), val_accuracy=result.accuracy,
            predicted_ms_per_image=latency.backbone_ms_per_image / float(ms_speedup[0]))
    return list(merged.values()), skipped


def earlyon_policies(points: list[Point], backbone_macs: int) -> list[CurvePoint]:
    """earlyon's calibrated policies, identical ones (same enabled exits, same thresholds on them) merged."""
    merged: dict[tuple[float | None, ...], CurvePoint] = {}
    for p in points:
        key = tuple(t if on else None for t, on in zip(p.thresholds, p.enabled_exits))
        if key in merged:
            merged[key].setting += f", {p.setting}"
            continue
        merged[key] = CurvePoint(PEER, p.setting, list(p.thresholds), list(p.enabled_exits),
                                 simulated_accuracy=p.test_accuracy,
                                 simulated_macs_fraction=p.test_macs / backbone_macs,
                                 val_accuracy=p.val_accuracy)
    return list(merged.values())


def earlyon_replay(cache: HeadLogits, model: EarlyExitWrapper, n: int) -> tuple[Tensor, Tensor]:
    """earlyon's ``simulate_policy`` under the model's current config on the first ``n`` cached samples,
    one at a time (it reports aggregates only): each one's predicted label and exit (the final: the
    number of exits)."""
    k = len(model.config.exit_points)
    index = {exit_label(i): i for i in range(k)} | {exit_label(-1): k}
    exits = []
    for i in range(n):
        one = dataclasses.replace(cache, logits=[z[i:i + 1] for z in cache.logits], targets=cache.targets[i:i + 1])
        (taken,) = simulate_policy(one, model).exit_distribution
        exits.append(index[taken])
    exit_index = torch.tensor(exits, dtype=torch.int64)
    return torch.stack([z[:n].argmax(-1) for z in cache.logits])[exit_index, torch.arange(n)], exit_index


def latency_curve(batch_size: int, images: Tensor, labels: Tensor, plain: torch.nn.Module, ours: MultiExitModel,
                  ours_points: list[CurvePoint], peer: EarlyExitWrapper, peer_points: list[CurvePoint],
                  costs: tuple[list[int], list[int]], outputs: Outputs, peer_test: HeadLogits, backbone_macs: int,
                  repeats: int, onnx: OnnxSide | None = None) -> dict[str, list[CurvePoint]]:
    """Times the backbone and every point of both methods in turns on ``images`` (the first test images)
    at ``batch_size``, then fills each point's time, speed-up, timed answers and curve position. With
    ``onnx``, our exported model's points and the exported backbone take their turns too (in NCHW, as
    ONNX Runtime takes images); their speed-up is over the exported backbone."""
    n, k, per_sample = len(labels), ours.num_exits, batch_size == 1
    if not (torch.equal(outputs.test_labels[:n], labels) and torch.equal(peer_test.targets[:n], labels)):
        raise RuntimeError("the timed images are not the first images of the cached test outputs")
    backbone = CurvePoint(BACKBONE, "-", simulated_accuracy=accuracy(outputs.test_probs[-1], outputs.test_labels),
                          simulated_macs_fraction=1.0)
    settings: dict[str, tuple[CurvePoint, Callable[[Tensor], Any], Callable[[Any, Tensor], Answers],
                              tuple[Tensor, Tensor] | None]] = {}

    def plain_answers(logits: Tensor, batch: Tensor) -> Answers:
        return logits.argmax(-1), torch.full((len(batch),), k - 1), torch.full((len(batch),), float(backbone_macs))

    settings[BACKBONE] = (backbone, plain, plain_answers,
                          (outputs.test_probs[-1][:n].argmax(-1), torch.full((n,), k - 1)))

    def ours_answers(result: timm_scan.EarlyExitResult, batch: Tensor) -> Answers:
        return result.labels, result.exit_index, result.macs.double()

    def ours_replay(p: CurvePoint) -> tuple[Tensor, Tensor]:
        index, _, probs = simulate_early_exit([q[:n] for q in outputs.test_probs], ExitPolicy(p.thresholds, "ensemble"))
        return probs.argmax(-1), index

    for p in ours_points:
        settings[f"{OURS}: {p.setting}"] = (p, timm_scan.EarlyExitPredictor(ours, ExitPolicy(p.thresholds, "ensemble")),
                                            ours_answers, ours_replay(p))
    if onnx is not None:
        onnx_backbone = CurvePoint(BACKBONE_ONNX, "-", simulated_accuracy=backbone.simulated_accuracy,
                                   simulated_macs_fraction=1.0)

        def onnx_plain(batch: Tensor) -> Tensor:  # torch on one thread around the graph, as the predictor runs
            with one_torch_thread():
                return torch.from_numpy(onnx.backbone.run(None, {"input": batch.contiguous().numpy()})[0])

        settings[BACKBONE_ONNX] = (onnx_backbone, onnx_plain, plain_answers, settings[BACKBONE][3])
        for p in onnx.points:
            predictor = timm_scan.OnnxEarlyExitPredictor(onnx.folder, ExitPolicy(p.thresholds, "ensemble"))
            settings[f"{OURS_ONNX}: {p.setting}"] = (p, lambda batch, run=predictor: run(batch.contiguous()),
                                                     ours_answers, ours_replay(p))

    configured, n_exits = peer.config, len(peer.config.exit_points)
    for p in peer_points:
        policy = copy.copy(configured)
        policy.confidence_thresholds, policy.enabled_exits = list(p.thresholds), list(p.enabled_exits)
        policy.validate()
        peer.config = policy
        replay = earlyon_replay(peer_test, peer, n) if per_sample else None
        macs = torch.tensor(earlyon_exit_macs(costs, p.enabled_exits), dtype=torch.float64)

        def run(batch: Tensor, policy=policy) -> InferenceResult | BatchedInferenceResult:
            peer.config = policy  # one attribute set per call: the policy this setting times
            return peer(batch, mode="inference") if per_sample else peer.forward_inference_batched(batch)

        def peer_answers(result: InferenceResult | BatchedInferenceResult, batch: Tensor, macs=macs) -> Answers:
            """One exit per call: the image's at batch 1, the whole batch's in batched mode (-1: final)."""
            logits = result.predictions if isinstance(result, BatchedInferenceResult) else result.prediction
            taken = n_exits if result.exit_taken == -1 else result.exit_taken
            return logits.argmax(-1), torch.full((len(batch),), taken), macs[taken].expand(len(batch))

        settings[f"{PEER}: {p.setting}"] = (p, run, peer_answers, replay)

    batches = list(images.split(batch_size))
    seconds = wall_clocks({name: fn for name, (_, fn, _, _) in settings.items()}, batches, repeats)
    for name, (point, fn, decode, replay) in settings.items():
        with torch.no_grad():
            answers = [decode(fn(b), b) for b in batches]
        preds, exits, macs = (torch.cat([a[i] for a in answers]) for i in range(3))
        point.ms_per_image = 1000 * seconds[name] / n
        reference = BACKBONE_ONNX if point.method in (OURS_ONNX, BACKBONE_ONNX) else BACKBONE
        point.speedup_vs_backbone = seconds[reference] / seconds[name]
        point.timed_accuracy = (preds == labels).double().mean().item()
        point.timed_macs_fraction = macs.double().mean().item() / backbone_macs
        if replay is not None:
            point.agreement_with_simulation = ((preds == replay[0]) & (exits == replay[1])).double().mean().item()
        point.accuracy, point.mean_macs_fraction = ((point.simulated_accuracy, point.simulated_macs_fraction)
                                                    if per_sample else
                                                    (point.timed_accuracy, point.timed_macs_fraction))
    peer.config = configured
    curve = {BACKBONE: [backbone], OURS: ours_points, PEER: peer_points}
    if onnx is not None:
        curve |= {BACKBONE_ONNX: [onnx_backbone], OURS_ONNX: onnx.points}
    return curve


def verdict(curve: dict[str, list[CurvePoint]], ours_key: str = OURS, plain_key: str = BACKBONE) -> dict[str, Any]:
    """Whether our curve (``ours_key``: our points in one runtime, ``plain_key``: the backbone in it) lies above
    earlyon's (for every earlyon point, our best accuracy among our points at most as slow is at least
    its accuracy), the reverse, and the margin per point."""

    def margins(mine: list[CurvePoint], theirs: list[CurvePoint]) -> list[dict[str, Any]]:
        rows = []
        for p in theirs:
            fast = [q for q in mine if q.ms_per_image <= p.ms_per_image]
            best = max(fast, key=lambda q: q.accuracy) if fast else None
            rows.append({"method": p.method, "setting": p.setting, "ms_per_image": p.ms_per_image,
                         "accuracy": p.accuracy,
                         "best_as_fast": None if best is None else f"{best.method}: {best.setting}",
                         "best_as_fast_accuracy": None if best is None else best.accuracy,
                         "margin": None if best is None else best.accuracy - p.accuracy})
        return rows

    def above(rows: list[dict[str, Any]]) -> bool:  # accuracies are counts over the same images: 1e-9 is rounding
        return all(r["margin"] is not None and r["margin"] >= -1e-9 for r in rows)

    ours, peer = curve[ours_key], curve[PEER]
    forward, reverse = margins(ours, peer), margins(peer, ours)
    return {"ours_above_earlyon": above(forward),
            "ours_above_earlyon_counting_backbone": above(margins(ours + curve[plain_key], peer)),
            "earlyon_above_ours": above(reverse), "margins": forward, "reverse_margins": reverse}


def latency_curves(b: int, args: argparse.Namespace, cfg: TrainConfig, images: Tensor, labels: Tensor,
                   plain: nn.Module, ours: MultiExitModel, peer: EarlyExitWrapper, peer_calibrated: list[Point],
                   costs: tuple[list[int], list[int]], outputs: Outputs, peer_test: HeadLogits, exit_macs: list[int],
                   backbone_macs: int, onnx: tuple[Path, Any, Any] | None) -> dict[str, Any]:
    """Steps 1-5 at batch ``b`` on ``images``; ``onnx``: (export folder, the exported backbone's session,
    an `OnnxEarlyExitPredictor` on the folder) for the ONNX Runtime curve. The JSON entry of that batch."""
    n = len(labels)
    latency = timm_scan.measure_exit_latency(ours, tuple(images.shape[1:]), min(b, n), images=n,  # as timed below
                                             memory_format=args.memory_format, repeats=args.repeats,
                                             policy=ExitPolicy(fallback="ensemble"))  # as searched and timed
    search = (args.betas, args.drops, args.latency_budgets, cfg.seed, exit_macs, backbone_macs)
    ours_points, skipped = ours_latency_points(outputs, latency, *search)
    onnx_side = onnx_latency = None
    if onnx is not None:
        folder, session, predictor = onnx
        onnx_latency = predictor.measure_exit_latency(min(b, n), images=n, repeats=args.repeats)
        onnx_points, onnx_skipped = ours_latency_points(outputs, onnx_latency, *search, method=OURS_ONNX)
        onnx_side, skipped = OnnxSide(folder, session, onnx_points), skipped + onnx_skipped
    curve = latency_curve(b, images, labels, plain, ours, ours_points, peer,
                          earlyon_policies(peer_calibrated, backbone_macs), costs, outputs, peer_test, backbone_macs,
                          args.repeats, onnx_side)
    for points in curve.values():
        for p in points:
            if p.agreement_with_simulation is not None and p.agreement_with_simulation < 1:
                print(f"warning: batch {b}, {p.method} {p.setting}: the timed run answered "
                      f"{1 - p.agreement_with_simulation:.2%} of the timed images unlike the replay")
    entry = {
        "batch_size": b, "images_timed": n, "memory_format": args.memory_format,
        "accuracy_on": (f"the whole test split ({len(outputs.test_labels)} images), per-sample policies replayed "
                        "on cached outputs" if b == 1 else f"the {n} timed images, the timed run's answers"),
        "exit_latency": latency.to_dict(), "skipped": skipped,
        "methods": {name: [dataclasses.asdict(p) for p in points] for name, points in curve.items()},
        "verdict": verdict(curve),
    }
    if onnx_latency is not None:
        entry |= {"exit_latency_onnx": onnx_latency.to_dict(), "verdict_onnx": verdict(curve, OURS_ONNX, BACKBONE_ONNX)}
    return entry


# ------------------------------------------------------------------------------------------ report
def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def report(sides: list[Side], budgets: list[dict[str, Any]], curves: dict[str, dict[str, Any]],
           backbone_macs: int) -> str:
    """The markdown tables."""
    lines = ["training: " + ", ".join(f"{side.name} {side.extra['training_seconds'] / 60:.1f} min" for side in sides)
             + " (with a val pass per epoch)", ""]
    lines += ["| method | exit | MMACs | of backbone | test accuracy |", "| --- | --- | ---: | ---: | ---: |"]
    for side in sides:
        for i, (macs, acc) in enumerate(zip(side.exit_macs, side.test_exit_accuracy)):
            name = f"{i + 1}" + (" (deepest)" if i == len(side.exit_macs) - 1 else "")
            lines.append(f"| {side.name} | {name} | {macs / 1e6:.2f} | {macs / backbone_macs:.1%} | {pct(acc)} |")
        if "test_ensemble_accuracy" in side.extra:
            macs = side.exit_macs[-1]
            lines.append(f"| {side.name} | ensemble | {macs / 1e6:.2f} | {macs / backbone_macs:.1%} | "
                         f"{pct(side.extra['test_ensemble_accuracy'])} |")
    lines += ["", ("| method | thresholds from val (MACs cost) | val accuracy | val MACs | test accuracy | test MACs "
                   "| test share per exit |"), "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for side in sides:
        for p in side.points:
            shares = " ".join(f"{s:.0%}" for s in p.test_exit_shares)
            lines.append(f"| {p.method} | {p.setting} | {pct(p.val_accuracy)} | {p.val_macs / backbone_macs:.1%} | "
                         f"{pct(p.test_accuracy)} | {p.test_macs / backbone_macs:.1%} | {shares} |")
    names = [side.name for side in sides]
    lines += ["", "| MACs budget (of backbone) | " + " | ".join(f"{n}: best test accuracy" for n in names) + " |",
              "| ---: |" + " ---: |" * len(names)]
    for row in budgets:
        lines.append(f"| {row['budget_fraction']:.0%} | " + " | ".join(pct(row[n]) for n in names) + " |")
    for curve in curves.values():
        costs = [(OURS, curve["exit_latency"])] + ([(OURS_ONNX, curve["exit_latency_onnx"])]
                                                  if "exit_latency_onnx" in curve else [])
        measured = "; ".join(f"{name}: {', '.join(f'{v:.3f}' for v in latency['ms_per_image'])}, backbone "
                             f"{latency['backbone_ms_per_image']:.3f}" for name, latency in costs)
        lines += ["", (f"batch {curve['batch_size']}, {curve['images_timed']} test images timed, "
                       f"{curve['memory_format']}; accuracy: {curve['accuracy_on']}. Our measured ms/image per exit "
                       f"(the search's cost): {measured}"),
                  "", ("| method | setting | ms/image | speed-up | accuracy | mean MACs | timed images: accuracy "
                       "| agrees with replay |"), "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, points in curve["methods"].items():
            for p in sorted(points, key=lambda p: p["ms_per_image"]):
                agree = "-" if p["agreement_with_simulation"] is None else f"{p['agreement_with_simulation']:.1%}"
                lines.append(f"| {name} | {p['setting']} | {p['ms_per_image']:.3f} | {p['speedup_vs_backbone']:.2f}x | "
                             f"{pct(p['accuracy'])} | {p['mean_macs_fraction']:.1%} | {pct(p['timed_accuracy'])} "
                             f"| {agree} |")
        for s in curve["skipped"]:
            lines.append(f"\n{s['method']} {s['setting']}: skipped ({s['reason']})")
        yes = {True: "yes", False: "no"}
        verdicts = [(OURS, curve["verdict"])] + ([(OURS_ONNX, curve["verdict_onnx"])] if "verdict_onnx" in curve
                                                 else [])
        for mine, v in verdicts:
            lines += ["", (f"batch {curve['batch_size']}: {mine} curve above {PEER}'s: "
                           f"**{yes[v['ours_above_earlyon']]}** (counting the plain backbone as ours: "
                           f"{yes[v['ours_above_earlyon_counting_backbone']]}); {PEER}'s above ours: "
                           f"{yes[v['earlyon_above_ours']]}")]
            for m in v["margins"]:
                margin = ("none as fast" if m["margin"] is None
                          else f"{100 * m['margin']:+.2f} points ({m['best_as_fast']})")
                lines.append(f"- {PEER} {m['setting']} ({m['ms_per_image']:.3f} ms, {pct(m['accuracy'])}): {margin}")
    return "\n".join(lines)


def plot(sides: list[Side], backbone_macs: int, path: Path) -> None:
    """Test accuracy against MACs: each method's points and its deepest exit run alone (the backbone's
    own classifier, at the backbone's MACs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for side, colour in zip(sides, ("tab:blue", "tab:orange")):
        pts = sorted(side.points, key=lambda p: p.test_macs)
        ax.plot([p.test_macs / backbone_macs for p in pts], [100 * p.test_accuracy for p in pts], "o-", color=colour,
                label=f"{side.name}: thresholds from val")
        ax.plot([1.0], [100 * side.test_exit_accuracy[-1]], "*", ms=13, color=colour,
                label=f"{side.name}: deepest exit alone (the backbone)")
    ax.axvline(1.0, color="grey", ls="--", lw=1)
    ax.set_xlabel("mean MACs per test image, relative to the plain backbone")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Early exit: timm-scan (SD) against earlyon")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency(curves: dict[str, dict[str, Any]], path: Path) -> None:
    """Accuracy against measured ms per image, one panel per batch size: each method's points, the best
    accuracy at most as slow (a step line), and the plain backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.4), squeeze=False)
    for ax, curve in zip(axes[0], curves.values()):
        slowest = max(p["ms_per_image"] for points in curve["methods"].values() for p in points)
        methods = [(OURS, "tab:blue", "o"), (PEER, "tab:orange", "s"), (OURS_ONNX, "tab:green", "^")]
        for name, colour, marker in methods:
            if name not in curve["methods"]:
                continue
            pts = sorted(curve["methods"][name], key=lambda p: p["ms_per_image"])
            xs, ys = [p["ms_per_image"] for p in pts], [100 * p["accuracy"] for p in pts]
            ax.plot(xs, ys, marker, color=colour, alpha=0.7, label=f"{name}: timed points")
            best = np.maximum.accumulate(ys)
            ax.step([*xs, slowest], [*best, best[-1]], where="post", color=colour, lw=1.2,
                    label=f"{name}: best accuracy at most as slow")
        for name, colour in ((BACKBONE, "black"), (BACKBONE_ONNX, "tab:green")):
            if name in curve["methods"]:
                (b,) = curve["methods"][name]
                ax.plot([b["ms_per_image"]], [100 * b["accuracy"]], "*", ms=13, color=colour, label=name)
                ax.axvline(b["ms_per_image"], color=colour, ls="--", lw=1, alpha=0.6)
        ax.set_xlabel("measured ms per image")
        ax.set_ylabel("test accuracy (%)" if curve["batch_size"] == 1 else "accuracy on the timed images (%)")
        ax.set_title(f"batch {curve['batch_size']} ({curve['images_timed']} images timed, {curve['memory_format']})",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.6)
    fig.suptitle("Accuracy against measured latency: timm-scan (SD) against earlyon")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", required=True, help="our finished SD run (examples/train.py --output-dir)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "peer_earlyon.json"),
                   help="JSON report; the plots go next to it (.png: MACs, _latency.png: measured latency)")
    p.add_argument("--retrain", action="store_true", help="train earlyon's model even if <ours>/../earlyon has one")
    p.add_argument("--epochs", type=int, help="override the recipe (smoke tests)")
    p.add_argument("--max-train-samples", type=int, help="override the recipe (smoke tests)")
    p.add_argument("--max-test-samples", type=int, help="override the recipe (smoke tests)")
    p.add_argument("--val-size", type=lambda s: float(s) if "." in s else int(s),
                   help="override the recipe (smoke tests): a fraction or a count")
    p.add_argument("--num-workers", type=int, help="data loader workers (default: the recipe's)")
    p.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0],
                   help="ours: one genetic threshold search per β (with MACs, and with measured latency per "
                        "batch size)")
    p.add_argument("--drops", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0],
                   help="ours, latency curves: the fastest thresholds (measured latency) within this many points "
                        "of the deepest exit's val accuracy")
    p.add_argument("--latency-budgets", type=float, nargs="*",
                   default=[0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95],
                   help="ours, latency curves: the most accurate thresholds within this fraction of the plain "
                        "backbone's ms per image as measure_exit_latency timed it (earlyon's budgets are "
                        "fractions of its FLOPs); none: no budget targets, as before 2026-11-30")
    p.add_argument("--earlyon-budgets", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                   help="earlyon: calibrate_thresholds_for_budget target_computation values")
    p.add_argument("--earlyon-drops", type=float, nargs="+", default=[0.0, 0.005, 0.01, 0.02, 0.05],
                   help="earlyon: calibrate_thresholds target_accuracy_drop values")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                   help="MACs budgets, as fractions of the plain backbone, for accuracy at equal MACs")
    p.add_argument("--latency-images", type=int, default=2048, help="test images timed at batch 256")
    p.add_argument("--latency-images-b1", type=int, default=256, help="test images timed at batch 1")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per setting (the median counts)")
    p.add_argument("--memory-format", choices=sorted(MEMORY_FORMATS), default="channels_last",
                   help="of the models and images timed (the README's advice on CPU: channels_last)")
    p.add_argument("--onnx", action="store_true",
                   help="also our model exported with export_onnx and run by OnnxEarlyExitPredictor (thresholds "
                        "searched against its own measured latency), and the plain backbone exported as one "
                        "graph: a third curve, and a verdict of its own (earlyon has no export)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    run = Path(args.ours)
    ours, cfg = load_run(run)
    cfg = with_overrides(cfg, args)
    splits = run_splits(cfg)
    dc = data_config(ours.backbone, cfg.input_size, cfg.crop_pct)
    size = tuple(dc["input_size"])
    train_tf, eval_tf = build_transforms(dc, cfg.train_scale)
    exit_layers = [stage.module for stage in ours.exit_stages[:-1]]

    peer, meta = trained_earlyon(cfg, splits, exit_layers, run.parent / "earlyon", args.retrain,
                                 (train_tf, eval_tf), size[-1])
    costs = earlyon_costs(peer, size[-1])
    exit_macs, backbone_macs = ours.exit_macs(size), ours.backbone_macs(size)
    outputs = ours_outputs(run, ours, splits)
    val_loader = build_loader(cfg, splits, splits.val, eval_tf, False)
    peer_caches = (collect_head_logits(peer, val_loader, "cpu"),
                   collect_head_logits(peer, build_loader(cfg, splits, splits.test, eval_tf, False), "cpu"))
    sides = [
        ours_side(run, ours, cfg, outputs, size, args.betas),
        earlyon_side(peer, val_loader, peer_caches, costs, args.earlyon_budgets, args.earlyon_drops, meta),
    ]
    budgets = equal_macs(sides, args.budgets, backbone_macs)

    test = TorchImageDataset(splits.test, splits.image_column, splits.label_column, eval_tf)
    counts = {1: min(len(test), args.latency_images_b1), 256: min(len(test), args.latency_images)}
    n = max(counts.values())
    fmt = MEMORY_FORMATS[args.memory_format]
    images = torch.stack([test[i][0] for i in range(n)]).contiguous(memory_format=fmt)
    labels = torch.tensor([test[i][1] for i in range(n)])
    plain = timm.create_model(cfg.model, num_classes=splits.num_classes, pretrained=False).eval()
    plain.load_state_dict(ours.backbone.state_dict())
    exported = tempfile.TemporaryDirectory() if args.onnx else contextlib.nullcontext()
    with exported as onnx_dir:
        if onnx_dir is not None:
            print("exporting our model and the plain backbone to ONNX")
            sys.path.insert(0, str(Path(__file__).parent))
            from onnx_export import plain_backbone_session  # onnxruntime: only with --onnx

            from timm_scan.deploy.onnx import session_options

            onnx_dir = Path(onnx_dir)
            timm_scan.export_onnx(ours, onnx_dir / "ours", size)
            onnx_backbone = plain_backbone_session(plain, size[-1], onnx_dir, session_options())
            onnx_base = timm_scan.OnnxEarlyExitPredictor(onnx_dir / "ours", ExitPolicy([1.0] * (ours.num_exits - 1)))
        for model in (ours, plain, peer):
            model.to(memory_format=fmt)
        curves = {str(b): latency_curves(b, args, cfg, images[:counts[b]], labels[:counts[b]], plain, ours, peer,
                                         sides[1].points, costs, outputs, peer_caches[1], exit_macs, backbone_macs,
                                         None if onnx_dir is None else (onnx_dir / "ours", onnx_backbone, onnx_base))
                  for b in BATCH_SIZES}


    print(report(sides, budgets, curves, backbone_macs))
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "timm": timm.__version__, "earlyon": version("earlyon"),
        "command": "python " + " ".join(sys.argv),
        "recipe": cfg.to_dict(), "exit_layers": exit_layers,
        "test_samples": len(splits.test), "val_samples": len(splits.val), "backbone_macs": backbone_macs,
        "methods": {side.name: {"exit_macs": side.exit_macs, "test_exit_accuracy": side.test_exit_accuracy,
                                "val_deepest_accuracy": side.val_deepest_accuracy, **side.extra}
                    for side in sides},
        "rows": [dataclasses.asdict(p) for side in sides for p in side.points],
        "equal_macs": budgets,
        "latency_curves": curves,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    latency_png = out.with_name(f"{out.stem}_latency.png")
    plot(sides, backbone_macs, out.with_suffix(".png"))
    plot_latency(curves, latency_png)
    print(f"wrote {out}, {out.with_suffix('.png')} and {latency_png}")


if __name__ == "__main__":
    main()
