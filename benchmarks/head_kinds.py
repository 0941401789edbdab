"""Which exit head gives the better accuracy for the time users pay? SepConv heads (the papers') against
pooled heads (latency-oriented, as in SDN and earlyon), each trained with the same self-distillation.

For each finished run (``--runs``, e.g. the ``default`` and ``pooled`` variants of
``self_distillation.py``): test accuracy per exit; then, at each batch size, each exit's latency
measured here (``timm_scan.measure_exit_latency``, in turns with the plain backbone), the β sweep
of the threshold search on validation with that latency as the cost, and every point of it on test:
accuracy, the speed-up the latency table predicts, and the speed-up measured with the real predictor
against the run's own backbone on test images, all timed in turns (``wall_clocks``). Plot: test
accuracy against measured ms per image, one curve per run and batch size, the backbones marked.

    python benchmarks/head_kinds.py --runs runs/sd/grey5/default-lr0.1-seed0 runs/sd/grey5/pooled-lr0.1-seed0

Writes ``results/head_kinds.json`` and ``results/head_kinds.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from timm_scan import EarlyExitPredictor, ExitCosts, measure_exit_latency, sweep_beta
from timm_scan.deploy import ExitTable
from timm_scan.deploy.policy import exit_accuracy
from timm_scan.training import cached_outputs, eval_dataset, load_run, run_splits

sys.path.insert(0, str(Path(__file__).parent))
from scalable_inference import test_images, timings  # noqa: E402

HERE = Path(__file__).parent
BETAS = [0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


def measure_run(run: str, args: argparse.Namespace) -> dict:
    """Everything for one run: per-exit accuracy, latency per batch size, the sweep on test."""
    model, cfg = load_run(run)
    splits = run_splits(cfg)
    size = tuple(model.data_config["input_size"])
    val_probs, val_labels = cached_outputs(run, "val", model, eval_dataset(splits, "val", model.data_config))
    test_set = eval_dataset(splits, "test", model.data_config)
    test_probs, test_labels = cached_outputs(run, "test", model, test_set)
    images = test_images(test_set, max(args.images))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    result = {"run": run, "head": model.config.head, "attention": model.config.attention,
              "exit_macs": model.exit_macs(size), "backbone_macs": model.backbone_macs(size),
              "test_exit_accuracy": exit_accuracy(test_probs, test_labels).to_dict(), "batches": {}}
    for batch_size, n in zip(args.batch_sizes, args.images):
        latency = measure_exit_latency(model, size, batch_size, images=max(batch_size, 64),
                                       memory_format="channels_last" if args.channels_last else "contiguous")
        costs = ExitCosts.from_latency(latency)
        points = sweep_beta(val_probs, val_labels, costs, betas=args.betas, generations=args.generations)
        table = ExitTable.from_outputs(test_probs, test_labels, costs)
        keys = [" ".join(f"{t:.6f}" for t in p.thresholds) for p in points]  # β values often share thresholds
        predictors = {key: EarlyExitPredictor(model, p.policy) for key, p in zip(keys, points)}
        ms = timings({"backbone": model.backbone, **predictors}, images[:n], {batch_size: n}, args.repeats)
        backbone_ms = ms["backbone"][batch_size]
        rows = []
        for point, key in zip(points, keys):
            accuracy, predicted = (float(v[0]) for v in table.evaluate(np.array([point.thresholds])))
            # accuracies in percent, as in the stored results
            rows.append({"beta": point.beta, "thresholds": list(point.thresholds), "val_accuracy": 100 * point.accuracy,
                         "test_accuracy": 100 * accuracy, "predicted_speedup": predicted,
                         "ms_per_image": ms[key][batch_size], "measured_speedup": backbone_ms / ms[key][batch_size]})
        result["batches"][str(batch_size)] = {"latency": latency.to_dict(), "images_timed": n,
                                              "backbone_ms_per_image": backbone_ms, "rows": rows}
        print(f"{run} batch {batch_size}: exits {', '.join(f'{v:.3f}' for v in latency.ms_per_image)} ms, backbone "
              f"{backbone_ms:.3f} ms; " + "; ".join(f"β={r['beta']:g} {r['test_accuracy']:.2f}% at "
                                                     f"{r['measured_speedup']:.2f}x" for r in rows), flush=True)
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = list(results[0]["batches"])
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5.5 * len(batch_sizes), 4), squeeze=False)
    for ax, bs in zip(axes[0], batch_sizes):
        for r in results:
            rows = sorted(r["batches"][bs]["rows"], key=lambda row: row["ms_per_image"])
            name = f"{r['head']} ({Path(r['run']).name})"
            line, = ax.plot([row["ms_per_image"] for row in rows], [row["test_accuracy"] for row in rows], "o-",
                            label=name)
            deepest = 100 * r["test_exit_accuracy"]["exits"][-1]
            ax.plot([r["batches"][bs]["backbone_ms_per_image"]], [deepest], "s", color=line.get_color())
        ax.set_xlabel(f"measured ms per image, batch {bs} (squares: the run's plain backbone)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="finished training runs to compare")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--images", type=int, nargs="+", default=[256, 1024], help="test images timed per batch size")
    p.add_argument("--betas", type=float, nargs="+", default=BETAS)
    p.add_argument("--generations", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--channels-last", action="store_true", help="model and images in channels_last")
    p.add_argument("--out", default=str(HERE / "results" / "head_kinds.json"))
    args = p.parse_args()
    if len(args.images) != len(args.batch_sizes):
        raise SystemExit("--images: one count per batch size")
    results = [measure_run(run, args) for run in args.runs]
    out = Path(args.out)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, cuda={torch.cuda.is_available()}",
        "torch": torch.__version__, "command": " ".join(["python", *sys.argv]), "channels_last": args.channels_last,
        "runs": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
