"""Search early-exit thresholds for a trained run, on its validation split.

    python examples/search_thresholds.py runs/demo                       # β sweep, keep β = 1
    python examples/search_thresholds.py runs/demo --beta 5 --baseline-run runs/baseline

Caches every exit's validation outputs once (<run>/outputs/val.safetensors), runs the genetic
search for each β of the sweep, prints the trade-off, plots it (<run>/tradeoff_val.png) and writes
<run>/thresholds.json: the thresholds of --beta plus the whole sweep; the kept thresholds are also
recorded in <run>/best, so from_pretrained and push_to_hub carry them. The test split is not read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from timm_scan.hub import save_thresholds
from timm_scan.runs import cached_outputs, eval_dataset, load_run
from timm_scan.training import run_splits
from timm_scan.thresholds import plot_tradeoff, sweep_beta

DEFAULT_BETAS = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]


def baseline_accuracy(baseline_run: str | None) -> float | None:
    """Validation accuracy (percent) of a `--baseline` run, if one is given."""
    if baseline_run is None:
        return None
    results = json.loads((Path(baseline_run) / "results.json").read_text())
    if not results.get("baseline"):
        raise ValueError(f"{baseline_run} is not a --baseline run")
    return 100.0 * results["val_accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="output directory of examples/train.py")
    p.add_argument("--betas", type=float, nargs="+", default=DEFAULT_BETAS)
    p.add_argument("--beta", type=float, default=1.0, help="the β whose thresholds are kept (added to the sweep)")
    p.add_argument("--baseline-run", help="a --baseline run: its validation accuracy is the fitness baseline")
    p.add_argument("--fallback", default="ensemble", choices=["ensemble", "deepest"])
    p.add_argument("--generations", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    run = Path(args.run)
    model, cfg = load_run(run)
    splits = run_splits(cfg)
    probs, labels = cached_outputs(run, "val", model, eval_dataset(splits, "val", model.data_config))
    size = tuple(model.data_config["input_size"])
    exit_macs, backbone_macs = model.exit_macs(size), model.backbone_macs(size)
    baseline = baseline_accuracy(args.baseline_run)
    betas = sorted(set(args.betas) | {args.beta})
    points = sweep_beta(probs, labels, exit_macs, backbone_macs, betas, baseline_accuracy=baseline,
                        fallback=args.fallback, seed=args.seed, generations=args.generations)
    chosen = points[betas.index(args.beta)]

    print(f"validation: {len(labels)} samples; baseline accuracy "
          f"{'of the --baseline run' if baseline is not None else 'of the deepest exit'}")
    print(f"{'beta':>6}  {'thresholds':<24}{'accuracy':>9}{'speed-up':>10}  share per exit")
    for pt in points:
        thresholds = ", ".join(f"{t:.3f}" for t in pt.thresholds)
        shares = " ".join(f"{s:.0%}" for s in pt.exit_shares)
        print(f"{pt.beta:>6g}  {thresholds:<24}{pt.accuracy:>8.2f}%{pt.acceleration:>9.2f}x  {shares}")
    deepest = 100.0 * float((probs[-1].argmax(-1) == labels).mean())
    plot_tradeoff([(pt.acceleration, pt.accuracy) for pt in points], run / "tradeoff_val.png",
                  baseline=(1.0, deepest if baseline is None else baseline), labels=[f"β={b:g}" for b in betas],
                  title=f"{model.backbone.pretrained_cfg['architecture']}: validation, β sweep")
    record = {
        "beta": args.beta, "fallback": args.fallback, "thresholds": chosen.thresholds,
        "baseline_accuracy": baseline, "validation": {"accuracy": chosen.accuracy, "acceleration": chosen.acceleration,
                                                      "exit_shares": chosen.exit_shares},
        "sweep": [{"beta": pt.beta, "thresholds": pt.thresholds, "accuracy": pt.accuracy,
                   "acceleration": pt.acceleration, "exit_shares": pt.exit_shares} for pt in points],
    }
    (run / "thresholds.json").write_text(json.dumps(record, indent=2))
    save_thresholds(run / "best", chosen.thresholds, args.fallback)  # from_pretrained(run/best) carries them
    print(f"kept β = {args.beta:g}: thresholds {chosen.thresholds} → {run / 'thresholds.json'}; plot {run / 'tradeoff_val.png'}")


if __name__ == "__main__":
    main()
