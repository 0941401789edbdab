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
  accuracy per epoch); a later run loads them instead of training again, unless ``--retrain``.
- **MACs** (``timm_scan.model.count_macs`` for both; MACs = FLOPs / 2): ours from
  ``model.exit_macs``; earlyon's backbone up to each exit stage from timm's
  ``forward_intermediates(stop_early=True)`` plus the heads that ran (an enabled exit's head runs for
  every sample that reaches it; a disabled one never runs). Its own FLOPs fractions (fvcore) are
  only the knob of its budget calibration, never reported.
- **Accuracy against MACs on test, thresholds from val only**. Ours: ``sweep_beta`` (SCAN's genetic
  search, ensemble fallback) on val outputs, each β's thresholds replayed on test outputs. earlyon:
  ``calibrate_thresholds_for_budget`` at each of ``--earlyon-budgets`` and ``calibrate_thresholds``
  at each of ``--earlyon-drops`` on val (its greedy grid search, confidence policy, no temperature
  fit), each policy replayed on cached test logits with its ``simulate_policy``. "Accuracy at equal
  MACs": for each budget (a fraction of the plain backbone's MACs), each method's best test accuracy
  among its early-exit points whose mean test MACs are within the budget and its deepest exit run
  alone (the backbone's own classifier, at the backbone's MACs); a pick among points on test, the
  same for both; "-" where none fits.
- **Latency** (ms/image, ``timm_scan.deploy.wall_clocks``: the three timed in turns, pass by pass) on the first
  test images at batch 1 and batch 256, at one operating point per method chosen on val: the
  lowest-MACs point whose val accuracy is within ``--tolerance`` points of that method's own deepest
  exit (else its most accurate point). earlyon: ``model(x, mode="inference")`` per image (batch 1;
  later stages really skipped) and ``forward_inference_batched`` (batch 256: the whole batch leaves at
  the first exit where every sample is confident). Ours: ``EarlyExitPredictor`` (per sample at any
  batch). And the plain timm backbone with our trained weights, for reference. Accuracy and mean MACs
  of each timed setting come from its own outputs on the timed images.

Everything runs on CPU. The real run, then the smoke-test budget (overrides are for that only)::

    python benchmarks/peer_earlyon.py --ours runs/bench/resnet18-sd --out benchmarks/results/peer_earlyon.json
    python benchmarks/peer_earlyon.py --ours RUN --out X.json --epochs 1 --max-train-samples 96 \\
        --val-size 24 --max-test-samples 32 --num-workers 0 --latency-images 32 --latency-images-b1 4
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

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
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import timm_scan
from timm_scan import MultiExitModel
from timm_scan.deploy import ExitTable, ensemble_probs, wall_clocks
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
    if cfg.grad_accum != 1 or cfg.mixed_precision != "no":
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


def train_earlyon(model: EarlyExitWrapper, cfg: TrainConfig, train: DataLoader, val: DataLoader) -> dict[str, Any]:
    """Joint training with earlyon's loss under our recipe; the model ends with its best epoch's weights."""
    model.requires_grad_(True)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(train)))
    history, best_state, best_epoch = [], None, 0
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        bar = tqdm(train, desc=f"earlyon epoch {epoch + 1}/{cfg.epochs}")
        for images, labels in bar:
            loss = weighted_multi_exit_loss(model(images, mode="training"), labels, model.config.loss_weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
        history.append(head_accuracies(collect_head_logits(model, val, "cpu")))
        print(f"earlyon epoch {epoch + 1}: val accuracy per head {', '.join(f'{a:.3f}' for a in history[-1])}")
        if best_state is None or history[-1][-1] > history[best_epoch - 1][-1]:
            best_state, best_epoch = {k: v.detach().clone() for k, v in model.state_dict().items()}, epoch + 1
    model.load_state_dict(best_state)
    return {"seconds": round(time.perf_counter() - started, 1), "best_epoch": best_epoch,
            "val_accuracy_per_epoch": history}


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
        meta = {**trained_on, **train_earlyon(model, cfg, build_loader(cfg, splits, splits.train, train_tf, True),
                                              build_loader(cfg, splits, splits.val, eval_tf, False))}
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        meta_path.write_text(json.dumps(meta, indent=2))
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
def ours_side(run: Path, model: MultiExitModel, cfg: TrainConfig, splits: ImageSplits, size: tuple[int, int, int],
              betas: list[float]) -> Side:
    """Our exits on test and one point per β (thresholds by SCAN's genetic search on val)."""
    val_probs, val_labels = cached_outputs(run, "val", model, eval_dataset(splits, "val", model.data_config))
    test_probs, test_labels = cached_outputs(run, "test", model, eval_dataset(splits, "test", model.data_config))
    exit_macs, backbone_macs = model.exit_macs(size), model.backbone_macs(size)
    test_table = ExitTable.from_outputs(test_probs, test_labels, exit_macs, backbone_macs)
    points = []
    for result in timm_scan.sweep_beta(val_probs, val_labels, exit_macs, backbone_macs, betas, seed=cfg.seed):
        thresholds = np.array([result.thresholds])
        test_accuracy, test_acceleration = test_table.evaluate(thresholds)
        points.append(Point(
            OURS, f"β={result.beta:g}", result.thresholds, result.accuracy / 100, backbone_macs / result.acceleration,
            float(test_accuracy[0]) / 100, backbone_macs / float(test_acceleration[0]),
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


def earlyon_side(model: EarlyExitWrapper, val: DataLoader, test: DataLoader, costs: tuple[list[int], list[int]],
                 budgets: list[float], drops: list[float], meta: dict[str, Any]) -> Side:
    """earlyon's heads on test and one point per calibration (its own calibrators on val)."""
    val_cache, test_cache = collect_head_logits(model, val, "cpu"), collect_head_logits(model, test, "cpu")
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


def operating_point(side: Side, tolerance: float) -> Point:
    """The lowest-MACs point on val whose val accuracy is within ``tolerance`` points of the deepest exit's."""
    close = [p for p in side.points if p.val_accuracy >= side.val_deepest_accuracy - tolerance / 100]
    return min(close, key=lambda p: p.val_macs) if close else max(side.points, key=lambda p: p.val_accuracy)


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
Decode = Callable[[Any, Tensor], tuple[Tensor, Tensor]]


def answers_row(name: str, setting: str, fn: Callable[[Tensor], Any], decode: Decode, batch_size: int,
                batches: list[Tensor], labels: Tensor, seconds: float, backbone_s: float) -> dict[str, Any]:
    """One timed setting: ``seconds`` for all ``batches``, then ``fn`` run once more for its answers
    (``decode(output, batch)`` gives predicted labels and MACs per sample)."""
    with torch.no_grad():
        decoded = [decode(fn(b), b) for b in batches]
    preds, macs = torch.cat([d[0] for d in decoded]), torch.cat([d[1] for d in decoded]).double()
    return {"method": name, "setting": setting, "batch_size": batch_size, "images": len(labels),
            "ms_per_image": 1000 * seconds / len(labels), "speedup_vs_backbone": backbone_s / seconds,
            "accuracy": (preds == labels).double().mean().item(), "mean_macs": macs.mean().item()}


def latency_rows(plain: torch.nn.Module, ours: MultiExitModel, ours_point: Point, peer: EarlyExitWrapper,
                 peer_point: Point, costs: tuple[list[int], list[int]], images: Tensor, labels: Tensor,
                 batch_sizes: list[tuple[int, int]], repeats: int) -> list[dict[str, Any]]:
    """Backbone, ours and earlyon at their operating points, at each (batch size, number of images)."""
    peer.config.confidence_thresholds = list(peer_point.thresholds)
    peer.config.enabled_exits = list(peer_point.enabled_exits)
    peer.config.validate()
    peer_macs = torch.tensor(earlyon_exit_macs(costs, peer_point.enabled_exits))
    predictor = timm_scan.EarlyExitPredictor(ours, ours_point.thresholds)
    backbone_macs = float(count_macs(plain, images[:1]))

    def plain_answers(logits: Tensor, batch: Tensor) -> tuple[Tensor, Tensor]:
        return logits.argmax(-1), torch.full((len(batch),), backbone_macs)

    def ours_answers(result: timm_scan.EarlyExitResult, batch: Tensor) -> tuple[Tensor, Tensor]:
        return result.labels, result.macs

    def peer_answers(result: InferenceResult | BatchedInferenceResult, batch: Tensor) -> tuple[Tensor, Tensor]:
        """One exit per call: the image's at batch 1, the whole batch's in batched mode (-1: final)."""
        logits = result.predictions if isinstance(result, BatchedInferenceResult) else result.prediction
        return logits.argmax(-1), peer_macs[result.exit_taken].expand(len(batch))

    def peer_single(batch: Tensor) -> InferenceResult:
        return peer(batch, mode="inference")

    rows = []
    for batch_size, n in batch_sizes:
        batches, y = list(images[:n].split(batch_size)), labels[:n]
        settings = {  # name → (setting, function, decode)
            "plain timm backbone (our weights)": ("-", plain, plain_answers),
            OURS: (ours_point.setting, predictor, ours_answers),
            PEER: (peer_point.setting, peer.forward_inference_batched if batch_size > 1 else peer_single, peer_answers),
        }
        seconds = wall_clocks({name: fn for name, (_, fn, _) in settings.items()}, batches, repeats)
        base_s = seconds["plain timm backbone (our weights)"]
        rows += [answers_row(name, setting, fn, decode, batch_size, batches, y, seconds[name], base_s)
                 for name, (setting, fn, decode) in settings.items()]
    return rows


# ------------------------------------------------------------------------------------------ report
def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def report(sides: list[Side], budgets: list[dict[str, Any]], latency: list[dict[str, Any]], backbone_macs: int) -> str:
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
    lines += ["", "| method | thresholds from val | val accuracy | val MACs | test accuracy | test MACs "
                  "| test share per exit |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
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
    lines += ["", "| method | operating point | batch | ms/image | speed-up | accuracy (timed images) | mean MACs |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in latency:
        lines.append(f"| {r['method']} | {r['setting']} | {r['batch_size']} | {r['ms_per_image']:.3f} | "
                     f"{r['speedup_vs_backbone']:.2f}x | {pct(r['accuracy'])} | {r['mean_macs'] / backbone_macs:.1%} |")
    return "\n".join(lines)


def plot(sides: list[Side], chosen: list[Point], backbone_macs: int, path: Path) -> None:
    """Test accuracy against MACs: each method's points, its deepest exit run alone (the backbone's own
    classifier, at the backbone's MACs) and its latency operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for side, point, colour in zip(sides, chosen, ("tab:blue", "tab:orange")):
        pts = sorted(side.points, key=lambda p: p.test_macs)
        ax.plot([p.test_macs / backbone_macs for p in pts], [100 * p.test_accuracy for p in pts], "o-", color=colour,
                label=f"{side.name}: thresholds from val")
        ax.plot([1.0], [100 * side.test_exit_accuracy[-1]], "*", ms=13, color=colour,
                label=f"{side.name}: deepest exit alone (the backbone)")
        ax.plot([point.test_macs / backbone_macs], [100 * point.test_accuracy], "s", ms=9, mfc="none", color=colour,
                label=f"{side.name}: timed point ({point.setting})")
    ax.axvline(1.0, color="grey", ls="--", lw=1)
    ax.set_xlabel("mean MACs per test image, relative to the plain backbone")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Early exit: timm-scan (SD) against earlyon")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", required=True, help="our finished SD run (examples/train.py --output-dir)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "peer_earlyon.json"),
                   help="JSON report; the plot goes next to it (.png)")
    p.add_argument("--retrain", action="store_true", help="train earlyon's model even if <ours>/../earlyon has one")
    p.add_argument("--epochs", type=int, help="override the recipe (smoke tests)")
    p.add_argument("--max-train-samples", type=int, help="override the recipe (smoke tests)")
    p.add_argument("--max-test-samples", type=int, help="override the recipe (smoke tests)")
    p.add_argument("--val-size", type=lambda s: float(s) if "." in s else int(s),
                   help="override the recipe (smoke tests): a fraction or a count")
    p.add_argument("--num-workers", type=int, help="data loader workers (default: the recipe's)")
    p.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0],
                   help="ours: one genetic threshold search per β")
    p.add_argument("--earlyon-budgets", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                   help="earlyon: calibrate_thresholds_for_budget target_computation values")
    p.add_argument("--earlyon-drops", type=float, nargs="+", default=[0.0, 0.005, 0.01, 0.02, 0.05],
                   help="earlyon: calibrate_thresholds target_accuracy_drop values")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                   help="MACs budgets, as fractions of the plain backbone, for accuracy at equal MACs")
    p.add_argument("--tolerance", type=float, default=1.0,
                   help="operating point: val accuracy within this many points of the method's deepest exit")
    p.add_argument("--latency-images", type=int, default=1024, help="test images timed at batch 256")
    p.add_argument("--latency-images-b1", type=int, default=256, help="test images timed at batch 1")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    run = Path(args.ours)
    ours, cfg = load_run(run)
    cfg = with_overrides(cfg, args)
    splits = run_splits(cfg)
    if splits.test is None:
        raise ValueError(f"{cfg.dataset} has no test split")
    dc = data_config(ours.backbone, cfg.input_size, cfg.crop_pct)
    size = tuple(dc["input_size"])
    train_tf, eval_tf = build_transforms(dc, cfg.train_scale)
    exit_layers = [stage.module for stage in ours.exit_stages[:-1]]

    peer, meta = trained_earlyon(cfg, splits, exit_layers, run.parent / "earlyon", args.retrain,
                                 (train_tf, eval_tf), size[-1])
    costs = earlyon_costs(peer, size[-1])
    backbone_macs = ours.backbone_macs(size)
    sides = [
        ours_side(run, ours, cfg, splits, size, args.betas),
        earlyon_side(peer, build_loader(cfg, splits, splits.val, eval_tf, False),
                     build_loader(cfg, splits, splits.test, eval_tf, False), costs, args.earlyon_budgets,
                     args.earlyon_drops, meta),
    ]
    chosen = [operating_point(side, args.tolerance) for side in sides]

    test = TorchImageDataset(splits.test, splits.image_column, splits.label_column, eval_tf)
    n = min(len(test), max(args.latency_images, args.latency_images_b1))
    images = torch.stack([test[i][0] for i in range(n)])
    labels = torch.tensor([test[i][1] for i in range(n)])
    plain = timm.create_model(cfg.model, num_classes=splits.num_classes, pretrained=False).eval()
    plain.load_state_dict(ours.backbone.state_dict())
    latency = latency_rows(plain, ours, chosen[0], peer, chosen[1], costs, images, labels,
                           [(1, min(n, args.latency_images_b1)), (256, min(n, args.latency_images))], args.repeats)
    budgets = equal_macs(sides, args.budgets, backbone_macs)

    print(report(sides, budgets, latency, backbone_macs))
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "timm": timm.__version__, "earlyon": version("earlyon"),
        "command": "python " + " ".join(sys.argv),
        "recipe": cfg.to_dict(), "exit_layers": exit_layers,
        "test_samples": len(splits.test), "val_samples": len(splits.val), "backbone_macs": backbone_macs,
        "methods": {side.name: {"exit_macs": side.exit_macs, "test_exit_accuracy": side.test_exit_accuracy,
                                "val_deepest_accuracy": side.val_deepest_accuracy, **side.extra,
                                "operating_point": point.setting}
                    for side, point in zip(sides, chosen)},
        "rows": [dataclasses.asdict(p) for side in sides for p in side.points],
        "equal_macs": budgets,
        "latency": latency,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    plot(sides, chosen, backbone_macs, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
