"""Early exits for a model you already have: train the exits alone on a frozen backbone, or fine-tune
everything with self-distillation, starting from a finished ``--baseline`` run.

For each mode (``frozen``, ``finetuned``, and ``continued``: the same epochs of plain training, the
control for ``finetuned``), one training run (``--init-from <baseline>/best``), then per-exit test accuracy, and the
largest early-exit speed-up at no loss against the starting model: thresholds searched on the
validation split for the cheapest ones whose validation accuracy is at least the baseline's
(``max_accuracy_drop=0`` against the baseline run's validation accuracy), with the ensemble or the
deepest exit as fallback, whichever saves more on validation, reported on test.

    python benchmarks/from_weights.py --baseline runs/sd/cifar10-10k/baseline-lr0.1-seed0

The runs go beside the baseline (``<baseline>-<mode>``) and are reused when
finished. Writes ``results/from_weights.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from timm_scan import ExitCosts
from timm_scan.deploy import ExitTable, search_thresholds
from timm_scan.report import exit_table
from timm_scan.training import Trainer, TrainConfig, cached_outputs, eval_dataset, load_run, run_results, run_splits

HERE = Path(__file__).parent
# What changes from the baseline's recipe in each mode: the exits alone can take the baseline's LR;
# fine-tuning trained weights takes a tenth of it, as fine-tuning usually does. "continued" is the
# control for "finetuned": the same epochs of plain training from the same weights.
MODES = {
    "frozen": {"baseline": False, "freeze_backbone": True, "lr_factor": 1.0},
    "finetuned": {"baseline": False, "freeze_backbone": False, "lr_factor": 0.1},
    "continued": {"baseline": True, "freeze_backbone": False, "lr_factor": 0.1},
}


def mode_config(baseline: TrainConfig, baseline_dir: Path, mode: str, epochs: int) -> TrainConfig:
    settings = MODES[mode]
    return dataclasses.replace(
        baseline, baseline=settings["baseline"], init_from=str(baseline_dir / "best"),
        freeze_backbone=settings["freeze_backbone"], lr=baseline.lr * settings["lr_factor"], epochs=epochs,
        warmup_epochs=0,
        output_dir=f"{baseline_dir}-{mode}",
    )


def evaluate_mode(run: Path, baseline_val: float) -> dict:
    """Test accuracy per exit; thresholds at no validation loss against the baseline, on test. Both
    fallbacks are searched on validation (the ensemble is the weaker answer when the exits are weak,
    as after a few frozen epochs) and the one with the larger validation speed-up is kept."""
    results = run_results(run)
    model, cfg = load_run(run)
    splits = run_splits(cfg)
    val = cached_outputs(run, "val", model, eval_dataset(splits, "val", model.data_config))
    test = cached_outputs(run, "test", model, eval_dataset(splits, "test", model.data_config))
    record: dict = {"run": str(run), "loss": results.loss, "test": results.test.to_dict(),
                    "val": results.val.to_dict(), "exit_macs": results.exit_macs,
                    "backbone_macs": results.backbone_macs}
    if results.baseline:  # one exit: nothing to search
        return record
    costs = ExitCosts.macs(results.exit_macs, results.backbone_macs)
    found, errors = {}, {}
    for fallback in ("ensemble", "deepest"):
        try:
            found[fallback] = search_thresholds(*val, costs, fallback=fallback, max_accuracy_drop=0.0,
                                                baseline_accuracy=baseline_val, min_threshold=0.0)
        except ValueError as exc:
            errors[fallback] = str(exc)
    if not found:
        record["no_loss"] = {"error": errors}
        return record
    fallback = max(found, key=lambda f: found[f].speedup)
    best = found[fallback]
    table = ExitTable.from_outputs(*test, costs, fallback)
    accuracy, speedup = (float(v[0]) for v in table.evaluate([best.thresholds]))
    # accuracies in percent, as in the stored results
    record["no_loss"] = {"fallback": fallback, "thresholds": list(best.thresholds), "val_accuracy": 100 * best.accuracy,
                         "val_macs_speedup": best.speedup, "test_accuracy": 100 * accuracy,
                         "test_macs_speedup": speedup,
                         "test_exit_shares": table.exit_shares([best.thresholds])[0].tolist()}
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="a finished --baseline run")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--epochs", type=int, default=4, help="epochs of each mode's run")
    p.add_argument("--out", default=str(HERE / "results" / "from_weights.json"))
    args = p.parse_args()
    baseline_dir = Path(args.baseline)
    start = run_results(baseline_dir)
    if not start.baseline:
        raise SystemExit(f"{baseline_dir} is not a --baseline run")
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, cuda={torch.cuda.is_available()}"
    report = {"date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]), "machine": machine,
              "baseline": {"run": str(baseline_dir), "val": start.val.to_dict(), "test": start.test.to_dict(),
                           "backbone_macs": start.backbone_macs}, "modes": {}}
    for mode in args.modes:
        cfg = mode_config(TrainConfig.load(baseline_dir), baseline_dir, mode, args.epochs)
        if not (Path(cfg.output_dir) / "results.json").is_file():
            Trainer(cfg).fit()
        settings = ("baseline", "init_from", "freeze_backbone", "lr", "epochs")
        report["modes"][mode] = {"config": {k: getattr(cfg, k) for k in settings},
                                 **evaluate_mode(Path(cfg.output_dir), start.val.deepest)}
        results = run_results(cfg.output_dir)
        print(f"{mode}: test accuracy per exit (baseline {100 * start.test.deepest:.2f}%)")
        print(exit_table(results.exit_macs, results.backbone_macs, results.test))
        if "no_loss" in report["modes"][mode]:
            print(f"  no loss against the baseline on validation: {report['modes'][mode]['no_loss']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
