"""``timm-scan evaluate RUN``: early exit of a trained run on its test split, with the thresholds that
``timm-scan search`` chose on validation.

Prints, and writes to ``<run>/evaluation.json`` (an `EarlyExitReport`): test accuracy and MACs of every
exit and the ensemble; accuracy, MACs speed-up and share of samples per exit (SCAN Fig. 6) under the
thresholds, and whether the search's target (``--max-drop``, ``--budget-macs``, ``--budget-ms``) holds on
test; each exit's expected calibration error (and after the search's temperatures, where it
calibrated); the wall-clock speed-up over the plain backbone at batch 256 and batch 1, measured with
the real predictor on test images. Plots: ``<run>/tradeoff_test.png`` (the validation β sweep evaluated on
test, the plain backbone marked) and ``<run>/exit_shares.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..deploy.calibration import expected_calibration_error
from ..deploy.plots import plot_exit_shares, plot_tradeoff
from ..deploy.policy import apply_temperatures, exit_accuracy
from ..deploy.predictor import EarlyExitPredictor
from ..deploy.thresholds import ExitTable
from ..deploy.timing import wall_clocks
from ..exit_costs import ExitCosts
from ..exit_policy import ExitPolicy
from ..model.hub import write_run_card
from ..model.multi_exit import MultiExitModel
from ..options import option
from ..report import EarlyExitReport, SweepPoint, WallClock, exit_table
from ..training.config import TRAIN_CONFIG
from ..training.runs import cached_outputs, eval_dataset, load_run, run_results, run_splits
from .search import THRESHOLDS, ThresholdRecord

__all__ = ["EvaluateConfig", "evaluate", "measure_wall_clock"]

EVALUATION = "evaluation.json"


@dataclass
class EvaluateConfig:
    """What ``timm-scan evaluate`` does."""

    run: str = option(help="output directory of a training run, searched with timm-scan search", positional=True)
    thresholds: str | None = option(None, "a thresholds.json to use (default: <run>/thresholds.json)")
    latency_images: int = option(1024, "test images timed at batch 256")
    latency_images_b1: int = option(256, "test images timed at batch 1")


def measure_wall_clock(model: MultiExitModel, predictor: EarlyExitPredictor, images: torch.Tensor,
                       batch_size: int) -> WallClock:
    """The plain backbone and the predictor timed in turns over ``images`` in batches of ``batch_size``."""
    seconds = wall_clocks({"backbone": model.backbone, "early exit": predictor}, list(images.split(batch_size)))
    return WallClock(batch_size, len(images), 1000 * seconds["backbone"] / len(images),
                     1000 * seconds["early exit"] / len(images))


def target_held(searched: ThresholdRecord, accuracy: float, shares: list[float], deepest: float,
                exit_macs: list[int], agreement: float | None = None) -> bool | None:
    """Whether the search's target holds on the evaluated split (``accuracy``, a fraction, and
    ``shares`` of samples per exit): accuracy at most the drop below the baseline's here (the deepest
    exit's, ``deepest``, or the baseline run's test accuracy), answers that agree with the deepest exit's
    on at least the share asked (``agreement``), or the mean cost per image within the budget (a latency
    budget judged by the measured latency table); ``None`` for thresholds kept at β."""
    origin = searched.policy.origin
    if origin is None or origin.objective == "beta" or (origin.cost_unit == "ms" and searched.latency is None):
        return None
    if origin.objective == "max_disagreement":
        return None if agreement is None else searched.objective(1.0).met(agreement, 0.0)
    baseline = deepest if searched.baseline_run is None else run_results(searched.baseline_run).test.deepest
    costs = searched.latency.ms_per_image if origin.cost_unit == "ms" else exit_macs
    return searched.objective(baseline).met(accuracy, sum(s * c for s, c in zip(shares, costs)))


def saving_notes(speedup: float, timings: Sequence[WallClock], policy: ExitPolicy) -> list[str]:
    """Why early exit measured slower than the plain backbone (``speedup``: in MACs), so that a slowdown
    is not read as the result; nothing when it measured faster at every batch size."""
    slower = [t for t in timings if t.speedup < 1]
    if not slower:
        return []
    guarantee = policy.origin.guarantee if policy.origin is not None else None
    if speedup <= 1:
        why = ("nothing was certified (see the promise), so every exit runs" if guarantee and not guarantee.certified
               else "these thresholds send no sample out early, so every exit runs")
        return [f"no saving to measure: {why} and the exit heads cost {1 / speedup - 1:.0%} more than the plain "
                "backbone; the timings above show that cost, not early exit"]
    batches = " and ".join(f"batch {t.batch_size}" for t in slower)
    return [f"{speedup:.2f}x fewer MACs, yet slower at {batches}: on this device the exits' overhead (heads, "
            "sections run apart, small batches) outweighs what they save"]


def evaluate(cfg: EvaluateConfig) -> EarlyExitReport:
    """Evaluate, print, plot and record (see the module docstring)."""
    run = Path(cfg.run)
    if cfg.thresholds is None and (run / TRAIN_CONFIG).is_file() and not (run / THRESHOLDS).is_file():
        raise ValueError(f"{run} has no {THRESHOLDS} yet: run `timm-scan search {run}` first (it chooses the exit "
                         "thresholds on the validation split), then evaluate")
    searched = ThresholdRecord.load(Path(cfg.thresholds) if cfg.thresholds else run / THRESHOLDS)
    model, train_cfg = load_run(run)
    model.policy = searched.policy  # the policy the search kept (the model's own, unless --thresholds names another)
    policy = model.policy
    dataset = eval_dataset(run_splits(train_cfg, trained=True), "test", model.data_config)
    raw, labels = cached_outputs(run, "test", model, dataset)
    probs = apply_temperatures(raw, policy.temperatures)
    size = tuple(model.data_config["input_size"])
    exit_macs, backbone_macs = model.exit_macs(size), model.backbone_macs(size)
    table = ExitTable.from_outputs(raw, labels, ExitCosts.macs(exit_macs, backbone_macs), policy.fallback,
                                   policy.temperatures, policy.rule)
    per_exit = exit_accuracy(probs, labels)
    accuracy, speedup = (float(v[0]) for v in table.evaluate([policy.thresholds]))
    agreement = float(ExitTable.from_outputs(raw, raw[-1].argmax(-1), table.costs, policy.fallback, policy.temperatures,
                                             policy.rule)  # the share of answers equal to the deepest exit's
                      .evaluate([policy.thresholds])[0][0])
    shares = [float(s) for s in table.exit_shares([policy.thresholds])[0]]

    predictor = EarlyExitPredictor(model)
    n = max(cfg.latency_images, cfg.latency_images_b1)
    images = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])
    print(f"timing the plain backbone and early exit on {len(images)} test images at batch 256 and batch 1",
          flush=True)
    real = predictor(images[: cfg.latency_images])
    agree = (real.exit_index == table.exit_index([policy.thresholds])[0][: len(real.exit_index)]).float().mean()
    timings = [measure_wall_clock(model, predictor, images[: cfg.latency_images], 256),
               measure_wall_clock(model, predictor, images[: cfg.latency_images_b1], 1)]
    sweep_acc, sweep_speedup = table.evaluate([pt.thresholds for pt in searched.sweep])
    report = EarlyExitReport(
        split="test", per_exit=per_exit, exit_macs=exit_macs, backbone_macs=backbone_macs, policy=policy,
        accuracy=accuracy, speedup=speedup, exit_shares=shares, wall_clock=timings,
        sweep=[SweepPoint(pt.beta, list(pt.thresholds), float(a), float(c))
               for pt, a, c in zip(searched.sweep, sweep_acc, sweep_speedup)],
        target=searched.target, agreement=agreement,
        target_held=target_held(searched, accuracy, shares, per_exit.deepest, exit_macs, agreement),
        ece=[expected_calibration_error(p, labels) for p in raw],
        ece_calibrated=[expected_calibration_error(p, labels) for p in probs] if policy.temperatures else None,
    )

    print(f"{train_cfg.model} on {len(labels)} test images ({size[1]}x{size[2]})")
    print(exit_table(exit_macs, backbone_macs, per_exit))
    kept = f"β = {searched.chosen.beta:g}" if searched.target is None else searched.target
    kept += f", rule {policy.rule}" if policy.rule != "own" else ""
    print(f"early exit ({kept}, thresholds {', '.join(f'{t:.3f}' for t in policy.thresholds)}): "
          f"accuracy {100 * accuracy:.2f}%, MACs speed-up {speedup:.2f}x, share per exit "
          + f"{' '.join(f'{s:.0%}' for s in shares)}; the same answer as the deepest exit on {agreement:.1%}")
    if policy.origin is not None:
        print(f"  promise: {policy.origin.promise}")
    if report.target is not None:
        print(f"  target: {report.target}; on test it {'holds' if report.target_held else 'does NOT hold'}"
              + (" (by the measured latency table)" if policy.origin.cost_unit == "ms" else ""))
    print("  expected calibration error per exit: " + ", ".join(f"{e:.3f}" for e in report.ece)
          + (" → calibrated " + ", ".join(f"{e:.3f}" for e in report.ece_calibrated) if report.ece_calibrated else ""))
    for t in timings:
        print(f"  wall-clock at batch {t.batch_size:>3} ({t.images} images): backbone {t.backbone_ms_per_image:.3f} "
              f"ms/img, early exit {t.early_exit_ms_per_image:.3f} ms/img, measured speed-up {t.speedup:.2f}x")
    for note in saving_notes(speedup, timings, policy):
        print(f"  {note}")
    print(f"  (the real predictor and Algorithm 1 on cached outputs agree on the exit of {agree:.1%} of the timed images)")
    plot_tradeoff([(pt.speedup, 100 * pt.accuracy) for pt in report.sweep], run / "tradeoff_test.png",
                  baseline=(1.0, 100 * per_exit.deepest), labels=[f"β={pt.beta:g}" for pt in report.sweep],
                  title=f"{train_cfg.model}: test, thresholds from validation")
    plot_exit_shares(shares, run / "exit_shares.png", f"Where test samples leave ({kept})")
    report.save(run / EVALUATION)
    write_run_card(run / "best")  # the card shows these test results where they are of the policy it holds
    print(f"plots: {run / 'tradeoff_test.png'}, {run / 'exit_shares.png'}; numbers: {run / EVALUATION}")
    return report
