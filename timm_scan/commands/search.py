"""``timm-scan search RUN``: early-exit thresholds for a trained run, searched on its validation split.

Caches every exit's validation outputs once (``<run>/outputs/val.safetensors``), runs the genetic
search for each β of the sweep, prints the trade-off, plots it (``<run>/tradeoff_val.png``) and writes
``<run>/thresholds.json`` (a `ThresholdRecord`): the thresholds kept (those of ``beta``, or with
``max_drop`` the cheapest within that many points of the baseline) and the whole sweep. The
kept thresholds are also recorded in ``<run>/best``, so ``from_pretrained`` and ``push`` carry them.
The test split is never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..deploy.plots import plot_tradeoff
from ..deploy.policy import exit_accuracy
from ..model.config import FALLBACKS
from ..deploy.thresholds import PAPER_MIN_THRESHOLD, SearchResult, search_thresholds, sweep_beta
from ..model.hub import save_thresholds
from ..options import option
from ..report import JsonRecord
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
    min_threshold: float = option(PAPER_MIN_THRESHOLD, "lowest threshold the search may choose (SCAN: 0.7)")
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
        if self.generations < 1:
            raise ValueError(f"SearchConfig.generations must be >= 1; got {self.generations}")


@dataclass
class ThresholdRecord(JsonRecord):
    """``<run>/thresholds.json``: the kept thresholds (``chosen``: at ``beta``, or the cheapest within
    ``max_drop`` points of the baseline) and the β sweep, all on validation; ``baseline_accuracy``
    (percent) is what the fitness scores against."""

    beta: float | None
    max_drop: float | None
    min_threshold: float
    fallback: str
    baseline: str
    baseline_accuracy: float
    chosen: SearchResult
    sweep: list[SearchResult] = field(default_factory=list)

    @property
    def thresholds(self) -> list[float]:
        return self.chosen.thresholds


def search(cfg: SearchConfig) -> ThresholdRecord:
    """Search, print, plot and record (see the module docstring)."""
    run = Path(cfg.run)
    model, train_cfg = load_run(run)
    probs, labels = cached_outputs(run, "val", model, eval_dataset(run_splits(train_cfg), "val", model.data_config))
    size = tuple(model.data_config["input_size"])
    exit_macs, backbone_macs = model.exit_macs(size), model.backbone_macs(size)
    if cfg.baseline_run is not None:
        results = run_results(cfg.baseline_run)
        if not results.baseline:
            raise ValueError(f"{cfg.baseline_run} is not a --baseline run")
        baseline, baseline_accuracy = "the --baseline run", 100.0 * results.val.deepest
    else:
        baseline, baseline_accuracy = "the deepest exit", 100.0 * exit_accuracy(probs, labels).deepest
    betas = sorted(set(cfg.betas) | ({cfg.beta} if cfg.max_drop is None else set()))
    ga = {"seed": cfg.seed, "generations": cfg.generations, "min_threshold": cfg.min_threshold}
    points = sweep_beta(probs, labels, exit_macs, backbone_macs, betas, baseline_accuracy=baseline_accuracy,
                        fallback=cfg.fallback, **ga)
    if cfg.max_drop is None:
        chosen = points[betas.index(cfg.beta)]
    else:
        chosen = search_thresholds(probs, labels, exit_macs, backbone_macs, baseline_accuracy=baseline_accuracy,
                                   max_accuracy_drop=cfg.max_drop, fallback=cfg.fallback, **ga)
    beta = cfg.beta if cfg.max_drop is None else None
    record = ThresholdRecord(beta, cfg.max_drop, cfg.min_threshold, cfg.fallback, baseline, baseline_accuracy, chosen,
                             points)

    print(f"validation: {len(labels)} samples; fitness baseline: {baseline}, {baseline_accuracy:.2f}%")
    print(f"{'beta':>6}  {'thresholds':<24}{'accuracy':>9}{'speed-up':>10}  share per exit")
    for pt in points:
        thresholds = ", ".join(f"{t:.3f}" for t in pt.thresholds)
        shares = " ".join(f"{s:.0%}" for s in pt.exit_shares)
        print(f"{pt.beta:>6g}  {thresholds:<24}{pt.accuracy:>8.2f}%{pt.acceleration:>9.2f}x  {shares}")
    plot_tradeoff([(pt.acceleration, pt.accuracy) for pt in points], run / "tradeoff_val.png",
                  baseline=(1.0, baseline_accuracy), labels=[f"β={b:g}" for b in betas],
                  title=f"{train_cfg.model}: validation, β sweep")
    record.save(run / THRESHOLDS)
    save_thresholds(run / "best", record.thresholds, cfg.fallback)  # from_pretrained(run/best) carries them
    kept = f"β = {cfg.beta:g}" if cfg.max_drop is None else f"the cheapest within {cfg.max_drop:g} points"
    print(f"kept {kept}: thresholds {', '.join(f'{t:.3f}' for t in record.thresholds)}, validation accuracy "
          f"{chosen.accuracy:.2f}% at {chosen.acceleration:.2f}x fewer MACs → {run / THRESHOLDS}; plot "
          f"{run / 'tradeoff_val.png'}")
    return record
