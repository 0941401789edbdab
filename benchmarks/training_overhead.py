"""What do the exits cost in training? Time per step, self-distillation against the baseline.

The same timm model, batch, precision and optimiser (SGD, as the trainer): the plain backbone with
cross-entropy (``--baseline``) and the multi-exit model with the self-distillation loss (three
shallow exits with attention, KL to the deepest exit, feature hints). Random images stand in for
data, so the loader does not enter the timing. The papers (TPAMI §5.6): the extra layers cost about
a quarter of the training computation; our target is at most 1.3x.

    python benchmarks/training_overhead.py                     # resnet18, 32x32, batch 128
    python benchmarks/training_overhead.py --input-size 224 --batch-size 32 --out results/training_overhead_224.json
    python benchmarks/training_overhead.py --attention none --out results/training_overhead_no_attention.json

Writes ``results/training_overhead.json`` and a bar chart beside it (``.png``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import timm_scan  # noqa: E402
from timm_scan import ScanConfig, SelfDistillationLoss  # noqa: E402
from timm_scan.model import count_macs  # noqa: E402

HERE = Path(__file__).parent


def step_seconds(model: torch.nn.Module, loss_fn: SelfDistillationLoss, images: torch.Tensor, labels: torch.Tensor,
                 steps: int, warmup: int) -> list[float]:
    """Seconds per training step (forward, loss, backward, SGD update), one entry per timed step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        loss = loss_fn(model(images), labels).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if images.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return times


def plot(median: dict[str, float], ratio: float, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar(list(median), [1000 * t for t in median.values()], color=["tab:grey", "tab:blue"])
    ax.set_ylabel("ms per training step (median)")
    ax.set_title(f"{title}: {ratio:.2f}x", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--attention", default="sd", choices=["sd", "scan", "none"], help="the exits' attention module")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="alternate the two models this many times; medians reported")
    p.add_argument("--out", default=str(HERE / "results" / "training_overhead.json"))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    size = (3, args.input_size, args.input_size)
    models = {
        "baseline": timm_scan.wrap(timm.create_model(args.model, num_classes=args.num_classes), ScanConfig(exits=[]),
                                   check_input_size=size).to(device),
        "self-distillation": timm_scan.wrap(timm.create_model(args.model, num_classes=args.num_classes),
                                            ScanConfig.papers(attention=args.attention),
                                            check_input_size=size).to(device),
    }
    loss_fn = SelfDistillationLoss()  # the default preset (hints computed, λ or not); on one exit plain cross-entropy
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):  # alternate, so drifts in machine speed hit both alike
        for name, model in models.items():
            times[name] += step_seconds(model, loss_fn, images, labels, args.steps, args.warmup)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["self-distillation"] / median["baseline"]
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, device={device}",
        "torch": torch.__version__, "command": " ".join(["python", *sys.argv]), "model": args.model,
        "input_size": args.input_size, "batch_size": args.batch_size, "attention": args.attention, "precision": "fp32",
        "steps_timed": args.steps * args.rounds, "median_step_seconds": median,
        "params": {name: sum(q.numel() for q in m.parameters()) for name, m in models.items()},
        "forward_macs_per_image": {name: count_macs(m.eval(), images[:1]) for name, m in models.items()},
        "ratio": ratio,
    }
    print(f"{args.model} at {args.input_size}x{args.input_size}, batch {args.batch_size}, attention {args.attention}, "
          f"fp32 on {device}: "
          f"baseline {1000 * median['baseline']:.1f} ms/step, self-distillation {1000 * median['self-distillation']:.1f} "
          f"ms/step, ratio {ratio:.2f}x (target ≤ 1.3x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(median, ratio, f"{args.model}, {args.input_size}x{args.input_size}, batch {args.batch_size}, fp32, {device}",
         out.with_suffix(".png"))


if __name__ == "__main__":
    main()
