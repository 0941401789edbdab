"""The model card (README.md with the Hub's YAML header) of a saved multi-exit model, and of a training
run's best model (`run_card`: what ``<run>/best/README.md`` holds and ``timm-scan push`` uploads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData
from torch import nn

from .._io import read_json
from ..exit_policy import ExitPolicy
from ..report import EarlyExitReport, ExitLatency, RunResults, exit_table
from .runner import model_name

__all__ = ["CardModel", "is_run_best", "model_card", "run_card"]

# What a training run (timm_scan.training.RunFolder) and `timm-scan evaluate` write beside <run>/best.
RUN_BEST, RUN_CONFIG, RUN_RESULTS, RUN_EVALUATION = "best", "train_config.json", "results.json", "evaluation.json"

_RECIPE_KEYS = ("dataset", "model", "baseline", "init_from", "freeze_backbone", "input_size", "epochs", "batch_size",
                "optimizer", "lr", "weight_decay", "schedule", "anneal_epochs", "mixed_precision", "seed")


@dataclass(frozen=True)
class CardModel:
    """What a card says of a multi-exit model: its timm ``architecture``, the ``stages`` its classifiers
    read (module names, shallowest first, the deepest classifier's last), its exit ``policy`` and measured
    ``exit_latency``. `hub` reads one from a saved folder without building the model."""

    architecture: str
    stages: list[str]
    policy: ExitPolicy
    exit_latency: list[ExitLatency]

    @classmethod
    def of(cls, model: nn.Module) -> CardModel:
        """A `MultiExitModel`'s."""
        return cls(model_name(model.backbone), [s.module for s in model.exit_stages], model.policy,
                   list(model.exit_latency))


def model_card(
    model: nn.Module | CardModel,
    *,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    dataset: str | None = None,
    train_config: dict[str, Any] | None = None,
    results: RunResults | None = None,
    evaluation: EarlyExitReport | None = None,
    plot: str | None = None,
) -> str:
    """README.md for the Hub of ``model`` (a `MultiExitModel`, or a `CardModel` of one): YAML header
    (library, tags, license, datasets, metrics), per-exit accuracy and MACs, its exit policy (thresholds, the
    rule they decide by, fallback, temperatures, how they were chosen and what that promises) and measured
    speed-up, how to load, how it was trained.

    ``results``: the training run's; ``evaluation``: early exit evaluated on test (``timm_scan
    evaluate``); ``plot``: a file name in the saved folder to show (the trade-off plot).
    """
    subject = model if isinstance(model, CardModel) else CardModel.of(model)
    data = ModelCardData(
        library_name="timm",
        license=license,
        tags=["image-classification", "timm", "timm-scan", "early-exit", "self-distillation"],
        datasets=[dataset] if dataset and "/" in dataset and not Path(dataset).exists() else None,
        metrics=["accuracy"],
        pipeline_tag="image-classification",
    )
    name = repo_id or "<owner>/<name>"
    stages = subject.stages
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {name.split('/')[-1]}", "",
        f"A multi-exit **{subject.architecture}** made with timm-scan (SCAN, NeurIPS 2019; "
        f"Self-Distillation, TPAMI 2021): {len(stages)} classifiers, shallow exits after "
        f"{', '.join(stages[:-1]) or 'none'} and the backbone's own head as the deepest. Easy images can leave "
        "at a shallow exit.", "",
    ]
    source = results or evaluation
    if source is not None:
        accuracy = results.test if results is not None and results.test is not None else (
            evaluation.per_exit if evaluation is not None else None)
        lines += ["## Exits", "", "Test accuracy and MACs per image; MACs are cumulative: a sample leaving at exit i "
                  "pays for sections 1..i and heads 1..i.", "",
                  exit_table(source.exit_macs, source.backbone_macs, accuracy, stages=stages, markdown=True), ""]
    policy = subject.policy
    if policy.thresholds:
        confidence = "max softmax" if policy.rule == "own" else \
            f"rule {policy.rule}: the max of the mean softmax of the exit and every exit before it"
        thresholds = ", ".join(f"{t:.3f}" for t in policy.thresholds)
        lines += ["## Early exit", "",
                  f"Thresholds ({confidence}, one per shallow exit): {thresholds}; samples that pass none get the "
                  f"{policy.fallback}."]
        if policy.origin is not None:
            lines.append(f"Chosen by {policy.origin.method} on {policy.origin.split} outputs; promise: "
                         f"{policy.origin.promise}.")
        if evaluation is not None:
            lines.append(f"On the {evaluation.split} split: accuracy {100 * evaluation.accuracy:.2f}%, MACs speed-up "
                         f"{evaluation.speedup:.2f}x, share of samples per exit "
                         + ", ".join(f"{s:.0%}" for s in evaluation.exit_shares) + ".")
            for t in evaluation.wall_clock:
                lines.append(f"Measured wall-clock speed-up at batch {t.batch_size}: {t.speedup:.2f}x.")
        lines.append("")
    if policy.temperatures:
        lines += [f"Confidences are temperature-scaled (one temperature per exit, fitted on validation): "
                  f"{', '.join(f'{t:.3f}' for t in policy.temperatures)}.", ""]
    if subject.exit_latency:
        lines += ["## Measured latency", "", "Milliseconds per image of leaving at each exit (cumulative), and of the "
                  "plain backbone, as measured with `timm_scan.measure_exit_latency`:", ""]
        lines += [f"- {m.describe()}: exits {', '.join(f'{v:.3f}' for v in m.ms_per_image)}; backbone "
                  f"{m.backbone_ms_per_image:.3f}" for m in subject.exit_latency]
        lines.append("")
    if plot:
        lines += [f"![accuracy against MACs]({plot})", ""]
    lines += [
        "## How to load", "",
        "```python", "import timm_scan", "",
        f'model = timm_scan.from_pretrained("hf-hub:{name}")',
        "out = model(images)                # logits of every exit, shallowest first",
        "predictor = timm_scan.EarlyExitPredictor(model)   # runs the saved exit policy" if policy.thresholds else
        "predictor = timm_scan.EarlyExitPredictor(model, timm_scan.ExitPolicy(thresholds=[...]))",
        "```", "",
        "The backbone alone, with plain timm:", "",
        "```python", "import timm", "",
        f'backbone = timm.create_model("hf-hub:{name}", pretrained=True)', "```", "",
    ]
    if train_config:
        recipe = ", ".join(f"{k}={v}" for k, v in train_config.items() if k in _RECIPE_KEYS and v not in (None, False))
        loss = (results.loss if results is not None else None) or {}
        lines += ["## Training", "", f"`timm-scan train` with {recipe}."
                  + (" Loss: " + ", ".join(f"{k}={v}" for k, v in loss.items()) + "." if loss else ""), ""]
    return "\n".join(lines)


def is_run_best(folder: str | Path) -> bool:
    """Whether ``folder`` is a training run's best model, ``<run>/best`` beside ``<run>/train_config.json``."""
    folder = Path(folder)
    return folder.name == RUN_BEST and (folder.parent / RUN_CONFIG).is_file()


def run_card(best: str | Path, model: nn.Module | CardModel, *, repo_id: str | None = None,
             license: str = "apache-2.0", plot: str | None = None) -> str:
    """The card of ``model``, a training run's best model saved in ``best`` (``<run>/best``): `model_card`
    with what the run recorded beside it, each where present: ``train_config.json`` (the recipe, the
    dataset, and its ``push_to_hub``, the default ``repo_id``; else ``<owner>/<the run folder's name>``),
    ``results.json`` (test accuracy per exit) and ``evaluation.json`` (early exit on test; shown only where
    it evaluated the policy the model holds). ``plot``: as for `model_card`."""
    run = Path(best).parent
    train_config = read_json(run / RUN_CONFIG) if (run / RUN_CONFIG).is_file() else {}
    results = RunResults.load(run / RUN_RESULTS) if (run / RUN_RESULTS).is_file() else None
    evaluation = EarlyExitReport.load(run / RUN_EVALUATION) if (run / RUN_EVALUATION).is_file() else None
    if evaluation is not None and evaluation.policy != model.policy:
        evaluation = None  # another policy's numbers (evaluate --thresholds, or a search since)
    repo_id = repo_id or train_config.get("push_to_hub") or f"<owner>/{run.resolve().name}"
    return model_card(model, repo_id=repo_id, license=license, dataset=train_config.get("dataset"),
                      train_config=train_config, results=results, evaluation=evaluation, plot=plot)
