"""Exit heads sized by cost (``ScanConfig.head_budget``) against the papers' full-width heads.

Two parts, run one at a time (both use every core):

``--train``: exits-only training (``--freeze-backbone``) of several head designs on the frozen backbone
of a trained run, so that the heads alone differ; the same data carve as the run that trained the
backbone (its dataset, ``--val-size``, ``--max-train-samples`` and seed), so validation stays unseen.
Then, per design: validation and test accuracy of every exit, MACs at the training size, and the
cheapest thresholds at no loss and within one point of the deepest exit on validation
(``max_accuracy_drop`` 0 and 0.01, the deepest exit answering samples that pass no threshold), on test. ``--latency``: at 224x224, random weights, each exit's cumulative MACs and measured latency
(`measure_exit_latency`, channels_last, batch 1 and 16 unless ``--batch-sizes``) of the default heads against the papers'.

    python benchmarks/head_budget.py --train runs/cert-resnet18-45k --epochs 2 --out benchmarks/results/head_budget_resnet18.json
    python benchmarks/head_budget.py --latency resnet50 vit_small_patch16_224 --out benchmarks/results/head_budget_224.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import timm
import torch

import timm_scan
from timm_scan.deploy import measure_exit_latency
from timm_scan.deploy.search import search_thresholds
from timm_scan.deploy.thresholds import ExitTable
from timm_scan.training.runs import cached_outputs, eval_dataset, load_run, run_results, run_splits

# the designs trained on a frozen backbone: CLI flags of timm-scan train
DESIGNS = {
    "papers": ["--no-head-budget", "--attention", "sd"],  # SepConv to the deepest width, SD attention
    "w128-none": ["--head-channels", "128", "--attention", "none"],  # narrowed first, no attention
    "w128-sd": ["--head-channels", "128", "--attention", "sd"],
    "w32-none": ["--head-channels", "32", "--attention", "none"],
}


TARGETS = {"no_loss": 0.0, "one_point": 0.01}  # accuracy drops against the deepest exit on validation


def train(base: Path, designs: dict[str, list[str]], epochs: int, batch_size: int, root: Path) -> list[Path]:
    """One exits-only run per design (its name and ``timm-scan train`` flags), skipped where its results exist."""
    cfg = load_run(base)[1]
    data = ["--dataset", cfg.dataset, "--model", cfg.model, "--input-size", str(cfg.input_size), "--val-size",
            str(cfg.val_size), "--seed", str(cfg.seed)] + (
        ["--max-train-samples", str(cfg.max_train_samples)] if cfg.max_train_samples else [])
    runs = []
    for design in designs:
        out = root / base.name / design
        if not (out / "results.json").is_file():
            subprocess.run([sys.executable, "-m", "timm_scan", "train", *data, "--init-from",
                            str(base / "best" / "model.safetensors"), "--freeze-backbone", "--epochs", str(epochs),
                            "--batch-size", str(batch_size),
                            *designs[design], "--output-dir", str(out)], check=True)
        runs.append(out)
    return runs


@dataclasses.dataclass
class RunOutputs:
    """A trained run's folder, best model, config, test set and cached outputs (per exit, first exit first) on
    validation and test."""

    run: Path
    model: timm_scan.MultiExitModel
    cfg: timm_scan.training.TrainConfig
    test_set: torch.utils.data.Dataset
    val: list[torch.Tensor]
    val_labels: torch.Tensor
    test: list[torch.Tensor]
    test_labels: torch.Tensor

    @classmethod
    def load(cls, run: Path) -> RunOutputs:
        model, cfg = load_run(run)
        splits = run_splits(cfg, trained=True)
        test_set = eval_dataset(splits, "test", model.data_config)
        val, val_labels = cached_outputs(run, "val", model, eval_dataset(splits, "val", model.data_config))
        return cls(run, model, cfg, test_set, val, val_labels, *cached_outputs(run, "test", model, test_set))

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, self.cfg.input_size, self.cfg.input_size)

    @functools.cached_property
    def costs(self) -> timm_scan.ExitCosts:
        """Each exit's MACs at the training size, as trained (every exit)."""
        return self.model.exit_costs(self.input_size)

    def operating_points(self, rule: str = "own") -> dict:
        """`operating_points` of the run as trained (every exit) under ``rule``."""
        return operating_points(self.val, self.val_labels, self.test, self.test_labels, self.costs, rule=rule)

    def bounds(self) -> dict:
        """`bounds` of the run as trained (every exit)."""
        return bounds(self.val, self.val_labels, self.test, self.test_labels, self.costs)


def summarise(outputs: RunOutputs) -> dict:
    results = run_results(outputs.run)
    costs = outputs.costs
    row = {"run": str(outputs.run), "scan_config": outputs.model.config.to_dict(), "val": results.val.to_dict(),
           "test": results.test.to_dict(), "exit_macs": costs.per_exit, "backbone_macs": costs.backbone}
    return {**row, **outputs.operating_points(), "bound": outputs.bounds()}


def operating_points(val: list, val_labels, test: list, test_labels, costs, rule: str = "own") -> dict:
    """Per target of ``TARGETS``: thresholds searched on validation under ``rule`` (the deepest exit answering
    samples that pass none), their speed-up there, and their accuracy and speed-up on test."""
    points = {}
    for name, drop in TARGETS.items():
        chosen = search_thresholds(val, val_labels, costs, max_accuracy_drop=drop, fallback="deepest", rule=rule)
        table = ExitTable.from_outputs(test, test_labels, costs, fallback="deepest", rule=rule)
        accuracy, speedup = table.evaluate([chosen.policy.thresholds])
        points[name] = {"thresholds": list(chosen.policy.thresholds), "val_speedup": chosen.speedup,
                        "test_accuracy": float(accuracy[0]), "test_speedup": float(speedup[0])}
    return points


def no_loss_bound(outputs: list[torch.Tensor], labels: torch.Tensor, costs: timm_scan.ExitCosts) -> float:
    """The largest speed-up (in ``costs``' unit) at no loss against the deepest exit, on these samples, that any
    decision rule answering with one exit's own prediction (Algorithm 1's answers; not an ensemble's, which can
    be right where every exit is wrong) could reach: an oracle that knows the labels. Each sample leaves at the
    first exit that answers it right, or at exit 1 where none does; then, while more samples are right than the
    deepest exit gets right, the costliest right ones leave wrong at exit 1 instead. ``outputs``: logits per
    exit, first exit first."""
    right = torch.stack([o.argmax(-1) == labels for o in outputs])  # (exits, samples)
    per_exit = torch.tensor(costs.per_exit, dtype=torch.float64)
    any_right = right.any(0)
    cost = torch.where(any_right, per_exit[right.int().argmax(0)], per_exit[0])
    spare = int(any_right.sum() - right[-1].sum())  # right answers beyond the deepest exit's
    saving = torch.sort(torch.where(any_right, cost - per_exit[0], torch.zeros_like(cost)), descending=True).values
    return costs.backbone / float((cost.sum() - saving[:spare].sum()) / len(labels))


def bounds(val: list, val_labels, test: list, test_labels, costs) -> dict:
    """`no_loss_bound` on validation and on test."""
    return {"val_speedup": no_loss_bound(val, val_labels, costs),
            "test_speedup": no_loss_bound(test, test_labels, costs)}


def latency(name: str, batch_sizes: list[int], repeats: int) -> dict:
    backbone = timm.create_model(name, num_classes=1000).eval()
    size = tuple(backbone.pretrained_cfg["input_size"])
    row = {"model": name, "input_size": list(size), "designs": {}}
    for design, config in (("default", timm_scan.ScanConfig()),
                           ("papers", timm_scan.ScanConfig(attention="sd", head_budget=None))):
        model = timm_scan.wrap(backbone, config, check_input_size=size).eval().to(memory_format=torch.channels_last)
        row["backbone_macs"] = model.backbone_macs(size)
        row["designs"][design] = {
            "scan_config": model.config.to_dict(), "exit_macs": model.exit_macs(size),
            "latency": {str(b): measure_exit_latency(model, size, b, memory_format="channels_last",
                                                     images=max(16, b), repeats=repeats).to_dict() for b in batch_sizes}}
        print(name, design, [f"{m / row['backbone_macs']:.1%}" for m in row["designs"][design]["exit_macs"]],
              {b: v["ms_per_image"] for b, v in row["designs"][design]["latency"].items()}, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", help="a trained run whose frozen backbone the designs are trained on")
    p.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--root", default="runs/head_budget", help="where the exits-only runs go")
    p.add_argument("--latency", nargs="+", help="timm models to time at their default size")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    record = {"date": datetime.date.today().isoformat(), "timm": timm.__version__, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "command": " ".join(["python", "benchmarks/head_budget.py", *sys.argv[1:]])}
    if args.train:
        record["base"] = args.train
        record["base_results"] = run_results(args.train).to_dict()
        record["designs"] = {d: summarise(RunOutputs.load(r)) for d, r in zip(args.designs, train(
            Path(args.train), {d: DESIGNS[d] for d in args.designs}, args.epochs, args.batch_size, Path(args.root)))}
        for design, row in record["designs"].items():
            print(f"{design:10s} test exits {[round(100 * a, 2) for a in row['test']['exits']]}", *(
                f"{name} {row[name]['test_speedup']:.2f}x at {100 * row[name]['test_accuracy']:.2f}%" for name in TARGETS))
    if args.latency:
        record["latency"] = [latency(name, args.batch_sizes, args.repeats) for name in args.latency]
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
