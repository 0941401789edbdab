"""How much faster is early exit at no loss of accuracy? (SCAN Fig. 5, TPAMI Tables 5-6.)

On the self-distilled run of ``benchmarks/accuracy.py``: the genetic threshold search for each β
of a sweep on the validation split (fitness baseline: the plain backbone's validation accuracy),
each point reported on the test split: accuracy, speed-up in MACs, share of samples per exit,
and the measured wall-clock speed-up of the real early-exit predictor over the plain backbone at
batch 1 and batch 256 on test images. Then the largest speed-up whose test accuracy is at
least the plain backbone's.

    python benchmarks/scalable_inference.py                    # runs/bench/resnet18-{sd,baseline}
    python benchmarks/scalable_inference.py --sd RUN --baseline RUN --channels-last

Writes ``results/scalable_inference.json`` and ``results/scalable_inference.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from timm_scan import EarlyExitPredictor, ExitCosts
from timm_scan.deploy import ExitTable, sweep_beta, wall_clocks
from timm_scan.deploy.plots import plot_tradeoff
from timm_scan.training import cached_outputs, eval_dataset, load_run, run_results, run_splits

HERE = Path(__file__).parent
BETAS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]


def test_images(dataset, n: int) -> torch.Tensor:
    """The first ``n`` test images through the eval transform, ``(n, 3, H, W)``."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(min(n, len(dataset)))), batch_size=256)
    return torch.cat([x for x, _ in loader])


def timings(fns: dict[str, Callable[[torch.Tensor], Any]], images: torch.Tensor, batch_sizes: dict[int, int],
            repeats: int) -> dict[str, dict[int, float]]:
    """ms per image of each function at each batch size, over (at most) that size's number of images;
    the functions take turns (``wall_clocks``), so they are compared under the same conditions."""
    seconds = {bs: wall_clocks(fns, list(images[:n].split(bs)), repeats) for bs, n in batch_sizes.items()}
    return {name: {bs: 1000 * seconds[bs][name] / len(images[:n]) for bs, n in batch_sizes.items()} for name in fns}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd", default="runs/bench/resnet18-sd", help="the self-distilled run")
    p.add_argument("--baseline", default="runs/bench/resnet18-baseline", help="the plain backbone's --baseline run")
    p.add_argument("--betas", type=float, nargs="+", default=BETAS)
    p.add_argument("--generations", type=int, default=100)
    p.add_argument("--images-b1", type=int, default=256, help="test images timed at batch 1")
    p.add_argument("--images-b256", type=int, default=2048, help="test images timed at batch 256")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--channels-last", action="store_true", help="time backbone and predictor in channels_last")
    p.add_argument("--out", default=str(HERE / "results" / "scalable_inference.json"))
    args = p.parse_args()

    model, cfg = load_run(args.sd)
    baseline_model, _ = load_run(args.baseline)
    baseline_results = run_results(args.baseline)
    if not baseline_results.baseline:
        raise SystemExit(f"{args.baseline} is not a --baseline run")
    baseline_val, baseline_test = 100 * baseline_results.val.deepest, 100 * baseline_results.test.deepest
    splits = run_splits(cfg)
    size = tuple(model.data_config["input_size"])
    exit_macs, backbone_macs = model.exit_macs(size), model.backbone_macs(size)
    val_probs, val_labels = cached_outputs(args.sd, "val", model, eval_dataset(splits, "val", model.data_config))
    test_set = eval_dataset(splits, "test", model.data_config)
    test_probs, test_labels = cached_outputs(args.sd, "test", model, test_set)
    costs = ExitCosts.macs(exit_macs, backbone_macs)
    points = sweep_beta(val_probs, val_labels, costs, betas=args.betas, baseline_accuracy=baseline_results.val.deepest,
                        generations=args.generations)
    table = ExitTable.from_outputs(test_probs, test_labels, costs)

    batch_sizes = {1: args.images_b1, 256: args.images_b256}
    images = test_images(test_set, max(batch_sizes.values()))
    backbone = baseline_model.backbone
    if args.channels_last:
        model, backbone = model.to(memory_format=torch.channels_last), backbone.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    keys = [" ".join(f"{t:.6f}" for t in point.thresholds) for point in points]  # β values often share thresholds
    predictors = {key: EarlyExitPredictor(model, point.policy) for key, point in zip(keys, points)}
    measured = timings({"backbone": backbone, **predictors}, images, batch_sizes, args.repeats)
    backbone_ms = measured["backbone"]
    rows = []
    for point, key in zip(points, keys):
        thresholds = np.array([point.thresholds])
        accuracy, speedup = (float(v[0]) for v in table.evaluate(thresholds))
        rows.append({  # accuracies in percent and the keys of the stored results
            "beta": point.beta, "thresholds": list(point.thresholds), "val_accuracy": 100 * point.accuracy,
            "val_acceleration": point.speedup, "test_accuracy": 100 * accuracy, "test_macs_speedup": speedup,
            "test_exit_shares": [float(s) for s in table.exit_shares(thresholds)[0]],
            "early_exit_ms_per_image": {str(b): t for b, t in measured[key].items()},
            "measured_speedup": {str(b): backbone_ms[b] / t for b, t in measured[key].items()},
        })
    at_least_baseline = [r for r in rows if r["test_accuracy"] >= baseline_test]
    best = max(at_least_baseline, key=lambda r: r["test_macs_speedup"], default=None)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, cuda={torch.cuda.is_available()}",
        "torch": torch.__version__, "command": " ".join(["python", *sys.argv]), "sd_run": args.sd, "baseline_run": args.baseline,
        "baseline_val_accuracy": baseline_val, "baseline_test_accuracy": baseline_test,
        "sd_deepest_test_accuracy": 100 * (test_probs[-1].argmax(-1) == test_labels).double().mean().item(),
        "exit_macs": exit_macs, "backbone_macs": backbone_macs, "channels_last": args.channels_last,
        "images_timed": {str(b): n for b, n in batch_sizes.items()},
        "backbone_ms_per_image": {str(b): t for b, t in backbone_ms.items()}, "rows": rows,
        "largest_speedup_at_baseline_accuracy": best,
    }
    print(f"plain backbone: test accuracy {baseline_test:.2f}% (validation {baseline_val:.2f}%), "
          + ", ".join(f"{t:.3f} ms/img at batch {b}" for b, t in backbone_ms.items()))
    print("| β | thresholds | test acc | MACs speed-up | measured b1 | measured b256 | exit shares |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['beta']:g} | {' '.join(f'{t:.3f}' for t in r['thresholds'])} | {r['test_accuracy']:.2f}% | "
              f"{r['test_macs_speedup']:.2f}x | {r['measured_speedup']['1']:.2f}x | {r['measured_speedup']['256']:.2f}x | "
              f"{' '.join(f'{s:.0%}' for s in r['test_exit_shares'])} |")
    if best is None:
        print(f"no point of the sweep reaches the plain backbone's test accuracy ({baseline_test:.2f}%)")
    else:
        print(f"largest speed-up at accuracy ≥ the plain backbone's: β = {best['beta']:g}, {best['test_accuracy']:.2f}%, "
              f"{best['test_macs_speedup']:.2f}x in MACs, {best['measured_speedup']['1']:.2f}x measured at batch 1, "
              f"{best['measured_speedup']['256']:.2f}x at batch 256")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot_tradeoff([(r["test_macs_speedup"], r["test_accuracy"]) for r in rows], out.with_suffix(".png"),
                  baseline=(1.0, baseline_test), labels=[f"β={r['beta']:g}" for r in rows],
                  title=f"{cfg.model} on CIFAR-10: test, thresholds from validation")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
