"""Which self-distillation loss beats plain training, across data sets, models and learning rates?

Trains the plain backbone (``baseline``: cross-entropy on the deepest classifier) and loss variants
of ``SelfDistillationLoss`` under one recipe per *setting*, for each learning rate and seed asked
for, and reports the test accuracy of every exit (mean and spread over seeds) and the difference of
each variant's deepest exit from the baseline's. Checkpoints are chosen on the validation split
carved out of train; the test split is only reported.

    python benchmarks/self_distillation.py --setting grey5 --variants baseline default --seeds 0 1 2 --lrs 0.1 0.05
    python benchmarks/self_distillation.py --setting cifar10-10k --variants baseline default sum-exits mean-exits tpami released

Settings (``SETTINGS``): ``cifar10`` (the 12-epoch CPU recipe of ``accuracy.py``), ``cifar10-10k``
(10,000 training images, 8 epochs: the ablation setting), ``grey5`` (a small data set made from
CIFAR-10: 5 classes, grey, 16x16 pixels, 2,000 training images), ``mobilenetv3`` and ``convnext``
(other families, signed pre-logits for ConvNeXt, on ``cifar10-10k``'s data). Variants
(``VARIANTS``) name a loss preset and overrides; each run records the loss settings it resolved,
so a change of the library's default never reuses a run trained under the old one. Finished runs in
``--runs-dir`` are reused; an interrupted one resumes. Results: ``results/self_distillation_<setting>.json``.

    python benchmarks/self_distillation.py --plot benchmarks/results/self_distillation.png

plots, from every ``results/self_distillation_*.json`` (or ``--reports``), the default's deepest exit
and exit 1 against the plain backbone's deepest, seed by seed, for each setting and learning rate.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from timm_scan.report import RunResults
from timm_scan.training import PRESETS, Trainer, TrainConfig, run_results
from timm_scan.training.run_folder import config_changes

HERE = Path(__file__).parent
CIFAR10 = "../shared/data/cifar10" if Path("../shared/data/cifar10").is_dir() else "uoft-cs/cifar10"
DATA_DIR = Path("runs/data")  # where derived data sets are written (never into ../shared)
GREY5_CLASSES = 5
GREY5_SIDE = 16
GREY5_TRAIN = 2000

# the papers' heads, which §1's runs trained (the default until 2026-12-06)
_CIFAR_32 = dict(input_size=32, crop_pct=1.0, train_scale=(0.35, 1.0), batch_size=128, warmup_epochs=1, attention="sd",
                 head_budget=None)
SETTINGS: dict[str, dict] = {
    "cifar10": dict(dataset=CIFAR10, model="resnet18", val_size=5000, epochs=12, lr=0.1, **_CIFAR_32),
    "cifar10-10k": dict(dataset=CIFAR10, model="resnet18", max_train_samples=12000, val_size=2000, epochs=8, lr=0.1,
                        **_CIFAR_32),
    "grey5": dict(dataset="grey5", model="resnet18", val_size=400, epochs=15, lr=0.1,
                  **{**_CIFAR_32, "batch_size": 64}),
    "mobilenetv3": dict(dataset=CIFAR10, model="mobilenetv3_large_100", max_train_samples=12000, val_size=2000,
                        epochs=8, lr=0.1, **_CIFAR_32),
    "convnext": dict(dataset=CIFAR10, model="convnext_atto", max_train_samples=12000, val_size=2000, epochs=8,
                     optimizer="adamw", lr=2e-3, weight_decay=0.05, **_CIFAR_32),
}

VARIANTS: dict[str, dict] = {
    "baseline": {"baseline": True},
    "default": {"loss_preset": "default"},
    "tpami": {"loss_preset": "tpami"},
    "released": {"loss_preset": "released"},
    # one change at a time from the default preset
    "mean-exits": {"exit_reduction": "mean"},
    "sum-exits": {"exit_reduction": "sum"},
    "no-t2": {"t_squared": False},
    "alpha0": {"alpha": 0.0},
    "alpha0.1": {"alpha": 0.1},
    "alpha0.5": {"alpha": 0.5},
    "alpha0.7": {"alpha": 0.7},
    "hint-mean-0.1": {"lam": 0.1, "hint_reduction": "mean"},
    "hint-mean-1": {"lam": 1.0, "hint_reduction": "mean"},
    "hint-sum-0.04": {"lam": 0.04, "hint_reduction": "sum"},
    "hint-dist-0.03": {"lam": 0.03, "hint_reduction": "dist"},
    "ensemble": {"teacher": "ensemble"},
    "transitive": {"teacher": "transitive"},
    "dense": {"teacher": "dense"},
    "anneal": {"anneal_epochs": 2},
    "t1": {"temperature": 1.0},
    # the latency-oriented head (pooling, then a two-layer MLP; no attention), default loss
    "pooled": {"head": "pooled", "attention": "none"},
}
LOSS_FIELDS = tuple(PRESETS["default"])


def grey5(root: Path) -> str:
    """The small data set, written once as parquet in the Hub's layout under ``root``: CIFAR-10's first
    5 classes, grey, downsampled to 16x16; the first 2,000 training images of those classes (about 400
    per class, the rows being shuffled) and all 5,000 test images of those classes."""
    folder = root / "grey5"
    if (folder / "test.parquet").is_file():
        return str(folder)
    import datasets
    from PIL import Image

    source = datasets.load_dataset("parquet", data_files={"train": f"{CIFAR10}/train.parquet",
                                                          "test": f"{CIFAR10}/test.parquet"})
    names = source["train"].features["label"].names[:GREY5_CLASSES]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def shrink(row: dict) -> dict:
        image = row["img"].convert("L").resize((GREY5_SIDE, GREY5_SIDE), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"img": {"bytes": buffer.getvalue(), "path": None}, "label": row["label"]}

    folder.mkdir(parents=True, exist_ok=True)
    for split, limit in (("train", GREY5_TRAIN), ("test", None)):
        kept = source[split].filter(lambda label: label < GREY5_CLASSES, input_columns="label")
        if limit is not None:
            kept = kept.select(range(limit))
        kept.map(shrink, features=features).to_parquet(str(folder / f"{split}.parquet"))
    return str(folder)


def train_config(setting: str, variant: str, lr: float, seed: int, runs: Path, **overrides) -> TrainConfig:
    """The run of ``variant`` in ``setting``, its loss settings resolved (never left to a preset);
    ``overrides`` change the setting's recipe (a quick look, not a recorded setting)."""
    recipe = {**SETTINGS[setting], **overrides}
    if recipe["dataset"] == "grey5":
        recipe["dataset"] = grey5(DATA_DIR)
    changes = dict(VARIANTS[variant])
    loss = {}
    if not changes.get("baseline"):
        preset = changes.pop("loss_preset", "default")
        loss = {"loss_preset": preset, **PRESETS[preset], **{k: changes.pop(k) for k in list(changes) if k in LOSS_FIELDS}}
    recipe.update(lr=lr, seed=seed, **changes, **loss)
    return TrainConfig(**recipe, output_dir=str(runs / setting / f"{variant}-lr{lr:g}-seed{seed}"))


def train_or_reuse(cfg: TrainConfig) -> RunResults:
    """The results of ``cfg``'s run, training it unless its folder holds a finished run of the same recipe."""
    out = Path(cfg.output_dir)
    if (out / "train_config.json").is_file():
        changed = config_changes(TrainConfig.load(out), cfg)
        if changed:
            raise SystemExit(f"{out} holds a run of another recipe (differs in {changed}); pass another --runs-dir")
    if not (out / "results.json").is_file():
        Trainer(cfg).fit()
    return run_results(out)


def summarise(runs: list[dict]) -> dict:
    """Mean and spread (sample standard deviation; 0 for one seed) of test accuracy (percent) per exit,
    the deepest as ``deepest`` and the ensemble as ``ensemble``."""
    tests = [RunResults.from_dict(r).test for r in runs]
    columns = {f"exit{i + 1}": [100 * t.exits[i] for t in tests] for i in range(len(tests[0].exits) - 1)}
    columns["deepest"] = [100 * t.deepest for t in tests]
    if tests[0].ensemble is not None:
        columns["ensemble"] = [100 * t.ensemble for t in tests]
    return {key: {"mean": statistics.mean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
            for key, v in columns.items()}


def table(report: dict) -> str:
    lines = ["| variant | lr | seeds | exit 1 | exit 2 | exit 3 | deepest | ensemble | deepest − baseline |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for lr, by_variant in report["results"].items():
        base = by_variant.get("baseline", {}).get("summary", {}).get("deepest", {}).get("mean")
        for variant, entry in by_variant.items():
            s = entry["summary"]

            def cell(key: str) -> str:
                if key not in s:
                    return "-"
                return f"{s[key]['mean']:.2f}" + (f" ± {s[key]['sd']:.2f}" if len(s[key]["values"]) > 1 else "")

            shallow = [cell(f"exit{i}") for i in (1, 2, 3)]
            delta = "-" if base is None or variant == "baseline" else f"{s['deepest']['mean'] - base:+.2f}"
            lines.append(f"| {variant} | {lr} | {len(entry['seeds'])} | {' | '.join(shallow)} | "
                         f"{cell('deepest')} | {cell('ensemble')} | {delta} |")
    return "\n".join(lines)


def gains(report: dict, variant: str = "default") -> dict[str, dict[str, dict[int, float]]]:
    """Per learning rate, ``variant``'s test accuracy minus the plain backbone's deepest exit, in points,
    for each seed both ran: ``{"deepest": {seed: ...}, "exit1": {seed: ...}}``."""
    out = {}
    for lr, by_variant in report["results"].items():
        if "baseline" not in by_variant or variant not in by_variant:
            continue
        base = {s: 100 * r["test"]["exits"][-1] for s, r in zip(by_variant["baseline"]["seeds"],
                                                                by_variant["baseline"]["runs"])}
        runs = dict(zip(by_variant[variant]["seeds"], by_variant[variant]["runs"]))
        out[lr] = {key: {s: 100 * runs[s]["test"]["exits"][i] - base[s] for s in sorted(runs) if s in base}
                   for key, i in (("deepest", -1), ("exit1", 0))}
    return out


def plot(reports: list[dict], path: Path, variant: str = "default") -> None:
    """Dot plot of `gains`: one column per setting and learning rate, a dot per seed, a bar at the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [(f"{r['setting']}\nlr {lr}", g) for r in reports for lr, g in gains(r, variant).items()]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.3 * len(columns)) * 2, 4), sharey=True)
    for ax, key, title in zip(axes, ("deepest", "exit1"), ("deepest exit", "exit 1")):
        for x, (_, g) in enumerate(columns):
            values = list(g[key].values())
            ax.plot([x] * len(values), values, "o", color="tab:blue", alpha=0.7)
            if values:
                ax.plot([x - 0.25, x + 0.25], [statistics.mean(values)] * 2, "-", color="black")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(columns)), [name for name, _ in columns], fontsize=7)
        ax.set_title(f"{variant}'s {title} − the plain backbone's deepest (test, points; a dot per seed)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=list(SETTINGS))
    p.add_argument("--variants", nargs="+", default=["baseline", "default"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="default: the setting's")
    p.add_argument("--runs-dir", default="runs/sd")
    p.add_argument("--out", default=None, help="default: results/self_distillation_<setting>.json")
    p.add_argument("--plot", type=Path, help="plot the default against the plain backbone to this file; trains nothing")
    p.add_argument("--reports", nargs="+", type=Path,
                   help="--plot's results (default: results/self_distillation_*.json)")
    quick = p.add_argument_group("a quick look (changes the setting's recipe; pass --out elsewhere)")
    for flag, kind in (("--dataset", str), ("--epochs", int), ("--max-train-samples", int), ("--val-size", int),
                       ("--batch-size", int), ("--num-workers", int)):
        quick.add_argument(flag, type=kind)
    args = p.parse_args()
    if args.plot:
        files = args.reports or sorted(HERE.glob("results/self_distillation_*.json"))
        reports = [json.loads(f.read_text()) for f in files]
        plot(reports, args.plot)
        print(f"wrote {args.plot}")
        return
    if args.setting is None:
        p.error("--setting is required (or --plot)")
    overrides = {k: getattr(args, k) for k in ("dataset", "epochs", "max_train_samples", "val_size", "batch_size",
                                               "num_workers") if getattr(args, k) is not None}
    runs = Path(args.runs_dir)
    out = Path(args.out or HERE / "results" / f"self_distillation_{args.setting}.json")
    report = json.loads(out.read_text()) if out.is_file() else {"results": {}}
    report.update({
        "setting": args.setting, "recipe": json.loads(json.dumps({**SETTINGS[args.setting], **overrides})),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, cuda={torch.cuda.is_available()}",
        "torch": torch.__version__, "date": datetime.date.today().isoformat(),
    })
    report.setdefault("commands", [])
    command = " ".join(["python", *sys.argv])
    if command not in report["commands"]:
        report["commands"].append(command)
    for lr in args.lrs or [SETTINGS[args.setting]["lr"]]:
        for variant in args.variants:
            for seed in args.seeds:
                cfg = train_config(args.setting, variant, lr, seed, runs, **overrides)
                result = train_or_reuse(cfg)
                entry = report["results"].setdefault(f"{lr:g}", {}).setdefault(variant, {"seeds": []})
                known = dict(zip(entry["seeds"], entry.get("runs", [])))
                known[seed] = result.to_dict()
                entry["seeds"] = sorted(known)
                entry["runs"] = [known[s] for s in entry["seeds"]]
                entry["loss"] = result.loss and {**result.loss, "loss_preset": cfg.loss_preset,
                                                 "anneal_epochs": cfg.anneal_epochs}
                entry["summary"] = summarise(entry["runs"])
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
