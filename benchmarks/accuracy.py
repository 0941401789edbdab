"""Does self-distillation beat plain training? (TPAMI Table 1, SCAN Table 1, at CPU scale.)

Trains the plain backbone (``--baseline``: cross-entropy on the deepest classifier only) and the
self-distilled multi-exit model under three loss presets (``sd``: the library's default; ``sd-tpami``:
the TPAMI text; ``sd-released``: the authors' released code, i.e. summed over exits, no T², their
hint) under one recipe, seed and data split, then reports per-exit and ensemble test accuracy with
the parameters and MACs each exit needs (``model.truncate(i)``: the compact model the papers
deploy). The checkpoint is chosen on the validation split carved out of train; the test split is
only reported.

    python benchmarks/accuracy.py                 # CPU recipe: resnet18 at 32x32, 12 epochs (~20+3x25 min)
    python benchmarks/accuracy.py --epochs 1 --max-train-samples 2000 --runs-dir /tmp/runs   # quick look

Finished runs in ``--runs-dir`` (``resnet18-baseline/``, ``resnet18-sd/``, ``resnet18-sd-tpami/``,
``resnet18-sd-released/``) are reused when their recipe matches, so the training happens once; an
interrupted run resumes from its last checkpoint. Writes ``results/accuracy.json`` and
``results/accuracy.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from timm_scan.report import RunResults, exit_table  # noqa: E402
from timm_scan.training import Trainer, TrainConfig, epoch_metrics, load_run, run_results  # noqa: E402
from timm_scan.training.run_folder import config_changes  # noqa: E402

HERE = Path(__file__).parent
DATASET = "../shared/data/cifar10" if Path("../shared/data/cifar10").is_dir() else "uoft-cs/cifar10"
# The CPU recipe: resnet18 (timm's ImageNet stem) on 32x32 CIFAR-10, 45k train / 5k validation.
RECIPE = dict(
    dataset=DATASET, model="resnet18", input_size=32, crop_pct=1.0, train_scale=(0.35, 1.0), val_size=5000,
    epochs=12, anneal_epochs=2, batch_size=128, lr=0.1, warmup_epochs=1, seed=0,
    attention="sd", head_budget=None,  # the papers' heads, which the stored runs trained (the default until 2026-12-06)
)
# Self-distillation settings to compare with the baseline: the SelfDistillationLoss presets
# (timm_scan.training.PRESETS): the library's default, the TPAMI text and the authors' released code.
VARIANTS = {"sd": {}, "sd-tpami": {"loss_preset": "tpami"}, "sd-released": {"loss_preset": "released"}}


def train_or_reuse(cfg: TrainConfig) -> Path:
    """Train ``cfg`` unless its output folder holds a finished run of the same recipe."""
    out = Path(cfg.output_dir)
    if (out / "train_config.json").is_file():
        changed = config_changes(TrainConfig.load(out), cfg)
        if changed:
            raise SystemExit(f"{out} holds a run of another recipe (differs in {changed}); pass another --runs-dir")
        if (out / "results.json").is_file():
            print(f"reusing the finished run in {out}")
            return out
    Trainer(cfg).fit()
    return out


def exit_rows(run: Path, results: RunResults) -> list[dict]:
    """One row per exit of a finished run: test accuracy, params and MACs of ``truncate(i)``."""
    model, _ = load_run(run)
    rows = []
    for i, macs in enumerate(results.exit_macs):
        deepest = i == model.num_exits - 1
        rows.append({
            "exit": f"{i + 1}" + (" (deepest)" if deepest else ""),
            "test_accuracy": results.test.exits[i],
            "params": sum(p.numel() for p in model.truncate(i).parameters()),
            "macs": macs,
        })
    if model.num_exits > 1:
        rows.append({"exit": "ensemble", "test_accuracy": results.test.ensemble,
                     "params": sum(p.numel() for p in model.parameters()) - _hint_params(model),
                     "macs": results.exit_macs[-1]})
    return rows


def _hint_params(model) -> int:
    """Parameters of the hint projections, which only serve training."""
    return sum(p.numel() for head in model.exits for p in head.proj.parameters())


def plot(report: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in report["variants"]:
        exits = [r for r in report[name]["rows"] if r["exit"] != "ensemble"]
        line, = ax.plot([r["macs"] / 1e6 for r in exits], [100 * r["test_accuracy"] for r in exits], "o-",
                        label=f"{name}: exits 1-{len(exits)}")
        ens = next((r for r in report[name]["rows"] if r["exit"] == "ensemble"), None)
        if ens:
            ax.plot(ens["macs"] / 1e6, 100 * ens["test_accuracy"], "s", color=line.get_color(), label=f"{name}: ensemble")
    base = report["baseline"]["rows"][0]
    ax.plot(base["macs"] / 1e6, 100 * base["test_accuracy"], "*", color="black", markersize=12,
            label="plain backbone (baseline)")
    ax.set_xlabel("MMACs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{report['recipe']['model']} on CIFAR-10 at {report['recipe']['input_size']}px, "
                 f"{report['recipe']['epochs']} epochs")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(name: str, entry: dict, results: RunResults) -> str:
    """One run's per-exit test accuracy (with the params of ``truncate(i)``) and its training facts."""
    params = {"params (M)": [f"{r['params'] / 1e6:.2f}" for r in entry["rows"]]}
    return (f"{name}: {entry['settings']}, best epoch {entry['best_epoch']}, training "
            f"{entry['training_seconds'] / 60:.1f} min (median epoch {entry['median_epoch_seconds']:.0f} s, "
            f"validation included); test:\n"
            + exit_table(results.exit_macs, results.backbone_macs, results.test, extra=params, markdown=True) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", default="runs/bench", help="where the training runs live")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="self-distillation settings trained beside the baseline")
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--anneal-epochs", type=int, default=RECIPE["anneal_epochs"])
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-test-samples", type=int, default=None)
    p.add_argument("--val-size", type=int, default=RECIPE["val_size"])
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    p.add_argument("--dataset", default=RECIPE["dataset"])
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "accuracy.json"))
    args = p.parse_args()
    recipe = {**RECIPE, "epochs": args.epochs, "anneal_epochs": args.anneal_epochs, "val_size": args.val_size, "batch_size": args.batch_size,
              "dataset": args.dataset, "max_train_samples": args.max_train_samples,
              "max_test_samples": args.max_test_samples, "num_workers": args.num_workers}
    runs = Path(args.runs_dir)
    report: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, cuda={torch.cuda.is_available()}",
        "torch": torch.__version__, "command": " ".join(["python", *sys.argv]), "recipe": recipe,
    }
    report["variants"] = args.variants
    tables = []
    for name in ["baseline", *args.variants]:
        settings = {"baseline": True} if name == "baseline" else VARIANTS[name]
        run = train_or_reuse(TrainConfig(**recipe, **settings, output_dir=str(runs / f"{recipe['model']}-{name}")))
        results = run_results(run)
        seconds = [m.seconds for m in epoch_metrics(run)]
        report[name] = {"run": str(run), "settings": settings or "the library's defaults", "loss": results.loss,
                        "best_epoch": results.best_epoch, "val_accuracy": results.val.deepest,
                        "training_seconds": sum(seconds), "median_epoch_seconds": statistics.median(seconds),
                        "rows": exit_rows(run, results)}
        tables.append(table(name, report[name], results))
    print("\n".join(tables))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
