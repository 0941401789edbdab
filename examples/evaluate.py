"""Report a trained run's early-exit inference on its test split.

    python examples/search_thresholds.py runs/demo     # first: thresholds from validation
    python examples/evaluate.py runs/demo

Prints, and writes to <run>/evaluation.json: test accuracy and MACs of every exit and the ensemble;
accuracy, MACs speed-up and share of samples per exit (SCAN Fig. 6) under the searched thresholds;
the wall-clock speed-up over the plain backbone at batch 1 and batch 256, measured with the real
early-exit predictor on test images. Plots: <run>/tradeoff_test.png (the validation β sweep,
evaluated on test, with the plain backbone marked) and <run>/exit_shares.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from timm_scan import EarlyExitPredictor
from timm_scan.flops import wall_clocks
from timm_scan.runs import cached_outputs, eval_dataset, load_run
from timm_scan.training import run_splits
from timm_scan.thresholds import ExitTable, plot_tradeoff


def plot_shares(shares: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    names = [f"exit {i + 1}" for i in range(len(shares) - 1)] + ["all sections"]
    ax.bar(names, [100 * s for s in shares], color="tab:blue")
    ax.set_ylabel("share of test samples (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def timing(model, predictor, images: torch.Tensor, batch_size: int) -> dict:
    batches = list(images.split(batch_size))
    seconds = wall_clocks({"backbone": model.backbone, "early exit": predictor}, batches)
    backbone_s, early_s = seconds["backbone"], seconds["early exit"]
    return {"batch_size": batch_size, "images": len(images), "backbone_ms_per_image": 1000 * backbone_s / len(images),
            "early_exit_ms_per_image": 1000 * early_s / len(images), "measured_speedup": backbone_s / early_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="output directory of examples/train.py (with thresholds.json)")
    p.add_argument("--thresholds", help="thresholds.json to use (default: <run>/thresholds.json)")
    p.add_argument("--latency-images", type=int, default=1024, help="test images timed at batch 256")
    p.add_argument("--latency-images-b1", type=int, default=256, help="test images timed at batch 1")
    args = p.parse_args()

    run = Path(args.run)
    searched = json.loads(Path(args.thresholds or run / "thresholds.json").read_text())
    model, cfg = load_run(run)
    dataset = eval_dataset(run_splits(cfg), "test", model.data_config)
    probs, labels = cached_outputs(run, "test", model, dataset)
    size = tuple(model.data_config["input_size"])
    exit_macs, backbone_macs = model.exit_macs(size), model.backbone_macs(size)
    table = ExitTable.from_outputs(probs, labels, exit_macs, backbone_macs, searched["fallback"])

    per_exit = [100.0 * float((p.argmax(-1) == labels).mean()) for p in probs]
    ensemble = 100.0 * float((np.mean(probs, 0).argmax(-1) == labels).mean())
    thresholds = np.array([searched["thresholds"]])
    accuracy, acceleration = (float(v[0]) for v in table.evaluate(thresholds))
    shares = [float(s) for s in table.exit_shares(thresholds)[0]]

    predictor = EarlyExitPredictor(model, searched["thresholds"], searched["fallback"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=256)
    images, n = [], max(args.latency_images, args.latency_images_b1)
    for x, _ in loader:
        images.append(x)
        if sum(len(b) for b in images) >= n:
            break
    images = torch.cat(images)
    real = predictor(images[: args.latency_images])
    simulated = table.exit_index(thresholds)[0][: len(real.exit_index)]
    timings = [timing(model, predictor, images[: args.latency_images], 256),
               timing(model, predictor, images[: args.latency_images_b1], 1)]

    print(f"{model.backbone.pretrained_cfg['architecture']} on {len(labels)} test images ({size[1]}x{size[2]})")
    print(f"{'exit':<14}{'accuracy':>9}{'MMACs':>9}{'of backbone':>13}")
    for i, (a, m) in enumerate(zip(per_exit, exit_macs)):
        print(f"{i + 1:<14}{a:>8.2f}%{m / 1e6:>9.2f}{m / backbone_macs:>12.1%}")
    print(f"{'ensemble':<14}{ensemble:>8.2f}%{exit_macs[-1] / 1e6:>9.2f}{exit_macs[-1] / backbone_macs:>12.1%}")
    print(f"early exit (β = {searched['beta']:g}, thresholds {', '.join(f'{t:.3f}' for t in searched['thresholds'])}): "
          f"accuracy {accuracy:.2f}%, MACs speed-up {acceleration:.2f}x, share per exit "
          + " ".join(f"{s:.0%}" for s in shares))
    for t in timings:
        print(f"  wall-clock at batch {t['batch_size']:>3} ({t['images']} images): backbone {t['backbone_ms_per_image']:.3f} "
              f"ms/img, early exit {t['early_exit_ms_per_image']:.3f} ms/img, measured speed-up {t['measured_speedup']:.2f}x")
    print(f"  (real predictor and simulation agree on the exit of {np.mean(real.exit_index.numpy() == simulated):.1%} "
          "of the timed images)")

    sweep = [(float(a), float(c)) for a, c in zip(*table.evaluate(np.array([pt["thresholds"] for pt in searched["sweep"]])))]
    plot_tradeoff([(c, a) for a, c in sweep], run / "tradeoff_test.png", baseline=(1.0, per_exit[-1]),
                  labels=[f"β={pt['beta']:g}" for pt in searched["sweep"]], title=f"{model.backbone.pretrained_cfg['architecture']}: test, thresholds from validation")
    plot_shares(shares, run / "exit_shares.png", f"Where test samples leave (β = {searched['beta']:g})")
    record = {"per_exit_accuracy": per_exit, "ensemble_accuracy": ensemble, "exit_macs": exit_macs,
              "backbone_macs": backbone_macs, "thresholds": searched["thresholds"], "beta": searched["beta"],
              "early_exit": {"accuracy": accuracy, "macs_speedup": acceleration, "exit_shares": shares, "wall_clock": timings},
              "sweep_on_test": [{"beta": pt["beta"], "accuracy": a, "acceleration": c} for pt, (a, c) in zip(searched["sweep"], sweep)]}
    (run / "evaluation.json").write_text(json.dumps(record, indent=2))
    print(f"plots: {run / 'tradeoff_test.png'}, {run / 'exit_shares.png'}; numbers: {run / 'evaluation.json'}")


if __name__ == "__main__":
    main()
