"""``timm-scan search RUN``: early-exit thresholds for a trained run, searched on its validation split.

Caches every exit's validation outputs once (``<run>/outputs/val.safetensors``); with ``calibrate``
fits one temperature per exit on them (``timm_scan.calibrate``); with ``cost latency`` or
``budget_ms`` measures each exit's latency on this machine (``timm_scan.measure_exit_latency``). Then
runs the genetic search for each β of the sweep, prints the trade-off, plots it
(``<run>/tradeoff_val.png``) and writes ``<run>/thresholds.json`` (a `ThresholdRecord`): the
thresholds kept (those of ``beta``, or those of one target: ``max_drop``, the cheapest within that many
points of the baseline; ``budget_macs`` or ``budget_ms``, the most accurate within that mean cost per
image) and the whole sweep. The kept thresholds, temperatures and latency are also recorded in
``<run>/best``, so ``from_pretrained`` and ``push`` carry them. The test split is never read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..deploy.calibration import apply_temperatures, calibrate
from ..deploy.latency import measure_exit_latency
from ..deploy.plots import plot_tradeoff
from ..deploy.policy import exit_accuracy
from ..deploy.thresholds import DEFAULT_MIN_THRESHOLD, Objective, SearchResult, search_thresholds, sweep_beta
from ..model.config import FALLBACKS
from ..model.hub import save_deployment
from ..options import option
from ..report import Calibration, ExitLatency, JsonRecord
from ..training.runs import cached_outputs, eval_dataset, load_run, run_results, run_splits

__all__ = ["SearchConfig", "ThresholdRecord", "search"]

THRESHOLDS = "thresholds.json"


@dataclass
class SearchConfig:
    """What ``timm-scan search`` does."""

    run: str = option(help="output directory of a training run", positional=True)
    betas: list[float] = option([0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0], "the β values of the sweep")
    beta: float = option(1.0, "the β whose thresholds are kept (added to the sweep), unless --max-drop is given")
    max_drop: float | None = option(None, "keep instead the cheapest thresholds whose validation accuracy is at "
                                          "most this many points below the fitness baseline")
    budget_macs: float | None = option(None, "keep instead the most accurate thresholds whose mean MACs per image "
                                             "on validation is at most this")
    budget_ms: float | None = option(None, "keep instead the most accurate thresholds whose mean latency per image "
                                           "(measured on this machine at the latency batch size) is at most this many ms")
    cost: str = option("macs", "the cost the β sweep trades accuracy against: 'macs' (SCAN's) or 'latency' "
                               "(ms per image measured on this machine)")
    latency_batch_size: int = option(1, "batch size latency is measured at (with a latency cost or budget)")
    calibrate: bool = option(False, "fit one temperature per exit on validation first (timm_scan.calibrate); "
                                    "the predictor then uses them")
    min_threshold: float = option(DEFAULT_MIN_THRESHOLD, "lowest threshold the search may choose (SCAN's range: 0.7)")
    baseline_run: str | None = option(None, "a --baseline run: its validation accuracy is the fitness baseline "
                                            "(default: the deepest exit's)")
    fallback: str = option("ensemble", f"answer for samples that pass no threshold: one of {FALLBACKS}")
    generations: int = option(100, "generations of the genetic algorithm")
    seed: int = option(0, "seed of the genetic algorithm")

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise ValueError(f"SearchConfig.fallback must be one of {FALLBACKS}; got {self.fallback!r}")
        if not 0.0 <= self.min_threshold < 1.0:
            raise ValueError(f"SearchConfig.min_threshold must be in [0, 1); got {self.min_threshold}")
        if self.max_drop is not None and self.max_drop < 0:
            raise ValueError(f"SearchConfig.max_drop must be >= 0 (points of accuracy); got {self.max_drop}")
        targets = [name for name in ("max_drop", "budget_macs", "budget_ms") if getattr(self, name) is not None]
        if len(targets) > 1:
            raise ValueError(f"SearchConfig: give one target, not {' and '.join(targets)}")
        for name in ("budget_macs", "budget_ms"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"SearchConfig.{name} must be a number > 0; got {getattr(self, name)}")
        if self.cost not in ("macs", "latency"):
            raise ValueError(f"SearchConfig.cost must be 'macs' or 'latency'; got {self.cost!r}")
        if self.latency_batch_size < 1:
            raise ValueError(f"SearchConfig.latency_batch_size must be >= 1; got {self.latency_batch_size}")
        if self.generations < 1:
            raise ValueError(f"SearchConfig.generations must be >= 1; got {self.generations}")


@dataclass
class ThresholdRecord(JsonRecord):
    """``<run>/thresholds.json``: the kept thresholds (``chosen``: at ``beta``, or for the one target,
    ``max_drop``, ``budget_macs`` or ``budget_ms``) and the β sweep (in ``cost``), all on validation;
    ``baseline_accuracy`` (percent) is what the fitness scores against (the deepest exit's, or
    ``baseline_run``'s). ``calibration``: the temperatures the search ran at; ``latency``: the
    measurement that ``cost latency`` and ``budget_ms`` used."""

    beta: float | None
    max_drop: float | None
    min_threshold: float
    fallback: str
    baseline: str
    baseline_accuracy: float
    chosen: SearchResult
    sweep: list[SearchResult] = field(default_factory=list)
    budget_macs: float | None = None
    budget_ms: float | None = None
    cost: str = "macs"
    baseline_run: str | None = None
    calibration: Calibration | None = None
    latency: ExitLatency | None = None

    @property
    def temperatures(self) -> list[float] | None:
        return self.calibration.temperatures if self.calibration is not None else None

    def objective(self, baseline_accuracy: float) -> Objective:
        """The search's objective, with the baseline (percent) of the split it is judged on."""
        budget = self.budget_macs if self.budget_macs is not None else self.budget_ms
        return Objective(baseline_accuracy, self.beta, self.max_drop, budget)

    @property
    def target(self) -> str | None:
        """The target the kept thresholds meet on validation, in words (``None``: kept at β)."""
        if self.max_drop is not None:
            return f"accuracy at most {self.max_drop:g} points below {self.baseline}"
        if self.budget_macs is not None:
            return f"at most {self.budget_macs / 1e6:g} MMACs per image"
        if self.budget_ms is not None:
            return f"at most {self.budget_ms:g} ms per image at batch {self.latency.batch_size}"
        return None

    @property
    def thresholds(self) -> list[float]:
        return self.chosen.thresholds


def search(cfg: SearchConfig) -> ThresholdRecord:
    """Search, print, plot and record (see the module docstring)."""
    run = Path(cfg.run)
    model, train_cfg = load_run(run)
    probs, labels = cached_outputs(run, "val", model, eval_dataset(run_splits(train_cfg), "val", model.data_config))
    size = tuple(model.data_config["input_size"])
    macs = (model.exit_macs(size), model.backbone_macs(size))
    calibration = calibrate(model, probs, labels) if cfg.calibrate else None
    if calibration is not None:
        probs = apply_temperatures(probs, calibration.temperatures)
    latency = None
    if cfg.cost == "latency" or cfg.budget_ms is not None:
        latency = measure_exit_latency(model, size, cfg.latency_batch_size, fallback=cfg.fallback)
    costs = (latency, None) if cfg.cost == "latency" else macs
    if cfg.baseline_run is not None:
        results = run_results(cfg.baseline_run)
        if not results.baseline:
            raise ValueError(f"{cfg.baseline_run} is not a --baseline run")
        baseline, baseline_accuracy = "the --baseline run", 100.0 * results.val.deepest
    else:
        baseline, baseline_accuracy = "the deepest exit", 100.0 * exit_accuracy(probs, labels).deepest
    targeted = any(t is not None for t in (cfg.max_drop, cfg.budget_macs, cfg.budget_ms))
    betas = sorted(set(cfg.betas) | (set() if targeted else {cfg.beta}))
    ga = {"seed": cfg.seed, "generations": cfg.generations, "min_threshold": cfg.min_threshold}
    points = sweep_beta(probs, labels, *costs, betas, baseline_accuracy=baseline_accuracy, fallback=cfg.fallback, **ga)
    common = {"baseline_accuracy": baseline_accuracy, "fallback": cfg.fallback, **ga}
    if cfg.max_drop is not None:
        chosen = search_thresholds(probs, labels, *costs, max_accuracy_drop=cfg.max_drop, **common)
    elif cfg.budget_macs is not None:
        chosen = search_thresholds(probs, labels, *macs, budget=cfg.budget_macs, **common)
    elif cfg.budget_ms is not None:
        chosen = search_thresholds(probs, labels, latency, budget=cfg.budget_ms, **common)
    else:
        chosen = points[betas.index(cfg.beta)]
    record = ThresholdRecord(None if targeted else cfg.beta, cfg.max_drop, cfg.min_threshold, cfg.fallback, baseline,
                             baseline_accuracy, chosen, points, cfg.budget_macs, cfg.budget_ms, cfg.cost,
                             cfg.baseline_run, calibration, latency)

    print(f"validation: {len(labels)} samples; fitness baseline: {baseline}, {baseline_accuracy:.2f}%")
    if calibration is not None:
        print("calibrated: temperatures " + ", ".join(f"{t:.3f}" for t in calibration.temperatures) + "; expected "
              "calibration error per exit " + ", ".join(f"{a:.3f} → {b:.3f}" for a, b in zip(calibration.before,
                                                                                        calibration.after)))
    if latency is not None:
        print(f"latency ({latency.describe()}): ms per image " + ", ".join(f"{v:.3f}" for v in latency.ms_per_image)
              + f"; backbone {latency.backbone_ms_per_image:.3f}")
    unit = "fewer MACs" if cfg.cost == "macs" else "lower latency"
    print(f"{'beta':>6}  {'thresholds':<24}{'accuracy':>9}{'speed-up':>10}  share per exit  (speed-up: {unit})")
    for pt in points:
        thresholds = ", ".join(f"{t:.3f}" for t in pt.thresholds)
        shares = " ".join(f"{s:.0%}" for s in pt.exit_shares)
        print(f"{pt.beta:>6g}  {thresholds:<24}{pt.accuracy:>8.2f}%{pt.acceleration:>9.2f}x  {shares}")
    plot_tradeoff([(pt.acceleration, pt.accuracy) for pt in points], run / "tradeoff_val.png",
                  baseline=(1.0, baseline_accuracy), labels=[f"β={b:g}" for b in betas],
                  title=f"{train_cfg.model}: validation, β sweep",
                  cost="MACs" if cfg.cost == "macs" else f"latency (batch {cfg.latency_batch_size})")
    record.save(run / THRESHOLDS)
    save_deployment(run / "best", record.thresholds, cfg.fallback, temperatures=record.temperatures,
                    exit_latency=[latency] if latency is not None else [])  # from_pretrained(run/best) carries them
    kept = record.target or f"β = {cfg.beta:g}"
    unit = "fewer MACs" if cfg.budget_macs is not None or (cfg.cost == "macs" and cfg.budget_ms is None) else \
        "lower latency (predicted)"
    print(f"kept {kept}: thresholds {', '.join(f'{t:.3f}' for t in record.thresholds)}, validation accuracy "
          f"{chosen.accuracy:.2f}% at {chosen.acceleration:.2f}x {unit} → {run / THRESHOLDS}; plot "
          f"{run / 'tradeoff_val.png'}")
    return record
