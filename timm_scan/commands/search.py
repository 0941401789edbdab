"""``timm-scan search RUN``: early-exit thresholds for a trained run, searched on its validation split.

Caches every exit's validation outputs once (``<run>/outputs/val.safetensors``); with ``calibrate``
fits one temperature per exit on them (``timm_scan.calibrate``); with ``cost latency`` or
``budget_ms`` measures each exit's latency on this machine (``timm_scan.measure_exit_latency``). Then
runs the genetic search for each β of the sweep, prints the trade-off, plots it
(``<run>/tradeoff_val.png``) and writes ``<run>/thresholds.json`` (a `ThresholdRecord`): the
thresholds kept (those of ``beta``, or those of one target: ``max_drop``, the cheapest within that many
points of the baseline; ``budget_macs`` or ``budget_ms``, the most accurate within that mean cost per
image) and the whole sweep. The kept exit policy (thresholds, rule, fallback, temperatures, how they were
chosen) and the latency are also recorded in ``<run>/best``, so ``from_pretrained``, ``export`` and
``push`` carry them. The test split is never read. Accuracies are fractions in the record; the flags'
drops are in points (``--max-drop 0.5``), as printed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..deploy.calibration import calibrate
from ..deploy.latency import measure_exit_latency
from ..deploy.plots import plot_tradeoff
from ..deploy.policy import apply_temperatures, exit_accuracy
from ..deploy.search import search_thresholds, sweep_beta
from ..deploy.thresholds import DEFAULT_MIN_THRESHOLD, Objective, SearchResult
from ..exit_costs import ExitCosts
from ..exit_policy import FALLBACKS, RULES, ExitPolicy, PolicyOrigin, validate_fallback, validate_rule
from ..model.hub import save_deployment
from ..options import option
from .._io import JsonRecord
from ..report import Calibration, ExitLatency
from ..training.runs import cached_outputs, eval_dataset, load_run, run_results, run_splits

__all__ = ["SearchConfig", "ThresholdRecord", "search"]

THRESHOLDS = "thresholds.json"


@dataclass
class SearchConfig:
    """What ``timm-scan search`` does."""

    run: str = option(help="output directory of a training run", positional=True)
    betas: list[float] = option([0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0], "the β values of the sweep")
    beta: float = option(1.0, "the β whose thresholds are kept (added to the sweep), unless --max-drop is given")
    max_drop: float | None = option(None, "keep instead the cheapest thresholds whose accuracy is at most this many "
                                          "points below the fitness baseline (on validation; on new data with "
                                          "--confidence)")
    max_disagreement: float | None = option(None, "keep instead the cheapest thresholds whose answers differ from "
                                                  "the deepest exit's on at most this percent of samples (on "
                                                  "validation; on new data with --confidence)")
    confidence: float | None = option(None, "certify the target (--max-drop, --max-disagreement or a budget) on "
                                            "new data with this probability (e.g. 0.95; Learn-then-Test on a "
                                            "held-out part of the validation split) instead of meeting it on "
                                            "validation")
    search_share: float = option(0.5, "with --confidence: the share of the validation split that proposes "
                                      "thresholds; the rest certifies them")
    split_seed: int = option(0, "with --confidence: seed of the split into a search and a calibration part")
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
    rule: str = option("own", f"what each shallow exit decides and answers with: one of {RULES}; 'own' is its own "
                              "softmax (SCAN's Algorithm 1), 'running-mean' the mean softmax of every exit computed so "
                              "far (benchmarks/RESULTS.md §19 measured no rule leading across settings)")
    generations: int = option(100, "generations of the genetic algorithm")
    seed: int = option(0, "seed of the genetic algorithm")

    def __post_init__(self) -> None:
        validate_fallback(self.fallback)
        validate_rule(self.rule)
        if not 0.0 <= self.min_threshold < 1.0:
            raise ValueError(f"SearchConfig.min_threshold must be in [0, 1); got {self.min_threshold}")
        for name in ("max_drop", "max_disagreement"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"SearchConfig.{name} must be in [0, 100] (points, or percent of samples); got "
                                 f"{getattr(self, name)}")
        targets = [name for name in ("max_drop", "max_disagreement", "budget_macs", "budget_ms")
                   if getattr(self, name) is not None]
        if len(targets) > 1:
            raise ValueError(f"SearchConfig: give one target, not {' and '.join(targets)}")
        if self.confidence is not None and (not 0 < self.confidence < 1 or not targets):
            raise ValueError("SearchConfig.confidence must be in (0, 1), with a target (--max-drop, "
                             f"--max-disagreement, --budget-macs or --budget-ms); got {self.confidence} with "
                             f"{targets or 'no target'}")
        if not 0 < self.search_share < 1:
            raise ValueError(f"SearchConfig.search_share must be in (0, 1); got {self.search_share}")
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
    """``<run>/thresholds.json``: the kept search result (``chosen``: its policy is what ``<run>/best``
    records) and the β sweep (in ``cost``), all on validation. ``baseline_accuracy`` (a fraction) is what
    the fitness scores against: the deepest exit's, or ``baseline_run``'s. ``calibration``: the
    temperatures the search ran at; ``latency``: the measurement that ``cost latency`` and ``budget_ms``
    used. Files written before the exit policy (no ``format_version``, accuracies in percent) are read
    into this form."""

    chosen: SearchResult
    baseline: str
    baseline_accuracy: float
    min_threshold: float
    sweep: list[SearchResult] = field(default_factory=list)
    cost: str = "macs"
    baseline_run: str | None = None
    calibration: Calibration | None = None
    latency: ExitLatency | None = None
    format_version: int = 2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThresholdRecord:
        if isinstance(data, dict) and "format_version" not in data:
            data = _from_version_1(data)
        return super().from_dict(data)

    @property
    def policy(self) -> ExitPolicy:
        return self.chosen.policy

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self.chosen.policy.thresholds

    def objective(self, baseline_accuracy: float) -> Objective | None:
        """The search's objective, with the baseline (a fraction) of the split it is judged on (``None``
        where the policy does not say how it was chosen). A disagreement target is an accuracy target
        against the deepest exit's own answers: pass 1.0 and judge the agreement."""
        origin = self.policy.origin
        if origin is None:
            return None
        value = {origin.objective: origin.value}
        drop = value.get("max_accuracy_drop", value.get("max_disagreement"))
        return Objective(baseline_accuracy, value.get("beta"), drop, value.get("budget"))

    @property
    def target(self) -> str | None:
        """The target the kept thresholds meet on validation, in words (``None``: kept at β, or not known)."""
        origin = self.policy.origin
        if origin is None or origin.objective == "beta":
            return None
        guarantee = origin.guarantee
        how = "" if guarantee is None else (f", certified at {1 - guarantee.delta:.0%} confidence" if
                                            guarantee.certified else ", asked with a guarantee but nothing certified")
        if origin.objective == "max_accuracy_drop":
            return f"accuracy at most {100 * origin.value:g} points below {self.baseline}{how}"
        if origin.objective == "max_disagreement":
            return f"answers differing from the deepest exit's on at most {100 * origin.value:g}% of samples{how}"
        if origin.cost_unit == "macs":
            return f"at most {origin.value / 1e6:g} MMACs per image{how}"
        batch = f" at batch {self.latency.batch_size}" if self.latency is not None else ""
        return f"at most {origin.value:g} ms per image{batch}{how}"


_CHOSEN_OBJECTIVES = (("max_drop", "max_accuracy_drop", 0.01), ("budget_macs", "budget", 1.0),
                      ("budget_ms", "budget", 1.0))


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A ``thresholds.json`` written before the exit policy, in the current form: accuracies from percent
    to fractions, ``acceleration`` → ``speedup``, each result's thresholds with the record's fallback and
    temperatures as its policy."""
    data = dict(data)
    data.setdefault("min_threshold", 0.7)  # 0.1.0 searched in SCAN's range and did not record it
    beta, fallback = data.pop("beta", None), data.pop("fallback", "ensemble")
    targets = {key: data.pop(key, None) for key in ("max_drop", "budget_macs", "budget_ms")}
    baseline = data["baseline_accuracy"] = data["baseline_accuracy"] / 100
    temperatures = (data.get("calibration") or {}).get("temperatures")
    unit = "ms" if targets["budget_ms"] is not None or data.get("cost") == "latency" else "macs"

    def result(old: dict[str, Any], objective: str, value: float, cost_unit: str) -> dict[str, Any]:
        origin = PolicyOrigin("genetic search", objective, value, cost_unit, baseline, None,
                              min_threshold=data.get("min_threshold"))
        policy = ExitPolicy(old["thresholds"], fallback, temperatures, origin)

        def fitness(v: float) -> float:  # the parts in percent become fractions (Objective.fitness)
            in_percent = (objective == "budget" and v >= 0) or (objective == "max_accuracy_drop" and v < 0)
            return v / 100 if in_percent else v

        return {"policy": policy.to_dict(), "accuracy": old["accuracy"] / 100, "speedup": old["acceleration"],
                "mean_cost": old.get("mean_cost"), "fitness": fitness(old["fitness"]),
                "exit_shares": old["exit_shares"], "history": [fitness(v) for v in old.get("history", [])]}

    data["sweep"] = [result(pt, "beta", pt["beta"], "ms" if data.get("cost") == "latency" else "macs")
                     for pt in data.get("sweep", [])]
    objective, value = "beta", beta
    for key, name, scale in _CHOSEN_OBJECTIVES:
        if targets[key] is not None:
            objective, value = name, targets[key] * scale
            unit = "ms" if key == "budget_ms" else "macs" if key == "budget_macs" else unit
    data["chosen"] = result(data["chosen"], objective, value, unit)
    data["format_version"] = 2
    return data


def search(cfg: SearchConfig) -> ThresholdRecord:
    """Search, print, plot and record (see the module docstring)."""
    run = Path(cfg.run)
    model, train_cfg = load_run(run)
    val = eval_dataset(run_splits(train_cfg, trained=True), "val", model.data_config)
    probs, labels = cached_outputs(run, "val", model, val)
    size = tuple(model.data_config["input_size"])
    macs = model.exit_costs(size)
    calibration = calibrate(probs, labels) if cfg.calibrate else None
    temperatures = calibration.temperatures if calibration is not None else None
    policy = ExitPolicy(fallback=cfg.fallback, temperatures=temperatures, rule=cfg.rule)
    latency = None
    if cfg.cost == "latency" or cfg.budget_ms is not None:
        latency = measure_exit_latency(model, size, cfg.latency_batch_size, policy=policy)
    costs = ExitCosts.from_latency(latency) if cfg.cost == "latency" else macs
    given_baseline = None  # the deepest exit's, sample by sample
    if cfg.baseline_run is not None:
        results = run_results(cfg.baseline_run)
        if not results.baseline:
            raise ValueError(f"{cfg.baseline_run} is not a --baseline run")
        baseline, baseline_accuracy = "the --baseline run", results.val.deepest
        given_baseline = baseline_accuracy
    else:
        baseline = "the deepest exit"
        baseline_accuracy = exit_accuracy(apply_temperatures(probs, temperatures), labels).deepest
    targeted = any(t is not None for t in (cfg.max_drop, cfg.max_disagreement, cfg.budget_macs, cfg.budget_ms))
    betas = sorted(set(cfg.betas) | (set() if targeted else {cfg.beta}))
    common = {"baseline_accuracy": given_baseline, "fallback": cfg.fallback, "temperatures": temperatures,
              "rule": cfg.rule, "seed": cfg.seed, "generations": cfg.generations, "min_threshold": cfg.min_threshold}
    certified = {"confidence": cfg.confidence, "search_share": cfg.search_share, "split_seed": cfg.split_seed}
    points = sweep_beta(probs, labels, costs, betas=betas, **common)
    if cfg.confidence is not None and (cfg.budget_macs is not None or cfg.budget_ms is not None):
        common.pop("baseline_accuracy")  # a certified budget bounds the cost; the accuracy is reported
    if cfg.max_drop is not None:
        chosen = search_thresholds(probs, labels, costs, max_accuracy_drop=cfg.max_drop / 100, **common, **certified)
    elif cfg.max_disagreement is not None:
        common.pop("baseline_accuracy")
        chosen = search_thresholds(probs, labels, costs, max_disagreement=cfg.max_disagreement / 100, **common,
                                   **certified)
    elif cfg.budget_macs is not None:
        chosen = search_thresholds(probs, labels, macs, budget=cfg.budget_macs, **common, **certified)
    elif cfg.budget_ms is not None:
        chosen = search_thresholds(probs, labels, ExitCosts.from_latency(latency), budget=cfg.budget_ms, **common,
                                   **certified)
    else:
        chosen = points[betas.index(cfg.beta)]
    record = ThresholdRecord(chosen, baseline, baseline_accuracy, cfg.min_threshold, points, cfg.cost,
                             cfg.baseline_run, calibration, latency)

    print(f"validation: {len(labels)} samples; fitness baseline: {baseline}, {100 * baseline_accuracy:.2f}%")
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
        print(f"{pt.beta:>6g}  {thresholds:<24}{100 * pt.accuracy:>8.2f}%{pt.speedup:>9.2f}x  {shares}")
    plot_tradeoff([(pt.speedup, 100 * pt.accuracy) for pt in points], run / "tradeoff_val.png",
                  baseline=(1.0, 100 * baseline_accuracy), labels=[f"β={b:g}" for b in betas],
                  title=f"{train_cfg.model}: validation, β sweep",
                  cost="MACs" if cfg.cost == "macs" else f"latency (batch {cfg.latency_batch_size})")
    record.save(run / THRESHOLDS)
    save_deployment(run / "best", record.policy, exit_latency=[latency] if latency is not None else [])
    kept = record.target or f"β = {cfg.beta:g}"
    unit = "fewer MACs" if cfg.budget_macs is not None or (cfg.cost == "macs" and cfg.budget_ms is None) else \
        "lower latency (predicted)"
    rule = f" (rule {record.policy.rule})" if record.policy.rule != "own" else ""
    print(f"kept {kept}: thresholds {', '.join(f'{t:.3f}' for t in record.thresholds)}{rule}, validation accuracy "
          f"{100 * chosen.accuracy:.2f}% at {chosen.speedup:.2f}x {unit} → {run / THRESHOLDS}; plot "
          f"{run / 'tradeoff_val.png'}")
    print(f"  promise: {record.policy.origin.promise}")
    deepest = (chosen.policy.origin.baseline_accuracy if cfg.baseline_run is None  # on the samples it was measured on
               else exit_accuracy(probs, labels).deepest)
    worse = chosen.against_backbone(deepest)
    if worse is not None:
        print(f"  note: {worse}")
    return record
