"""Where the exits go: stage ends, the positions ``propose_exits`` spaces evenly in measured time, and
candidate exits trained once, then narrowed (``MultiExitModel.keep_exits``) to the subset that measures best.

``--train RUN``: exits-only training (``--freeze-backbone``, as ``head_budget.py``) on the frozen backbone of a
trained run; ``--scratch SETTING``: each design trained from scratch, backbone and exits together, under a
recipe of ``self_distillation.py`` (its ``default`` loss), so that the backbone learns beside the exits as
users train it. Every design has the same SepConv heads (the default heads' width at the stage ends, no
attention, one block per halving of the map left), so that the positions alone differ:

- ``stage-ends``: the default exits (the papers' placement);
- ``proposed``: what ``propose_exits`` proposes at the run's input size, batch 1, on this machine;
- ``candidates``: every position ``propose_exits`` considers (stages past the stem, blocks inside them),
  trained together once.

The candidates run is then narrowed without retraining to every subset of its exits; per subset, the cheapest
thresholds at no loss against the deepest exit on validation (``fallback="deepest"``), and the subset with the
largest such speed-up (``--max-subset``: among those of at most that many exits) is reported with the stage
ends and the proposed positions. For each trained design and narrowed subset: test accuracy per exit,
thresholds at no loss and within one point on validation under Algorithm 1's rule and under the running mean
(``rule="running-mean"``), their MACs speed-up on test, and (``--wall-clock``, Algorithm 1's no-loss
thresholds) the predictor against the plain backbone on test images at batch 256 and 1, timed in turns; and
``bound``, the largest no-loss speed-up that any rule answering with one exit's own prediction could reach (an
oracle that knows the labels, `head_budget.no_loss_bound`). ``--designs`` trains some designs only (no
narrowing without the candidates).

    python benchmarks/exit_positions.py --train runs/cert-resnet18-45k --epochs 2 --wall-clock \\
        --out benchmarks/results/exit_positions_resnet18.json
    python benchmarks/exit_positions.py --scratch cifar10-10k --seed 0 --wall-clock \\
        --out benchmarks/results/exit_positions_scratch_cifar10-10k.json
    python benchmarks/exit_positions.py --scratch cifar10 --seed 0 --designs stage-ends --wall-clock \\
        --out benchmarks/results/exit_positions_scratch_cifar10.json

``--propose``: what ``propose_exits`` proposes at timm's default input size (random weights: costs only) for
each model and batch size, against where the stage ends fall in the measured time.

    python benchmarks/exit_positions.py --propose resnet50 convnext_tiny vit_small_patch16_224 \\
        --out benchmarks/results/exit_positions_224.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import platform
import sys
import warnings
from pathlib import Path

import timm
import torch
from head_budget import TARGETS, RunOutputs, bounds, operating_points, summarise, train  # noqa: E402  (benchmarks/: the script's folder)
from self_distillation import SETTINGS, train_config, train_or_reuse  # noqa: E402

from timm_scan import EarlyExitPredictor, ExitCosts, ExitPolicy, ScanConfig, propose_exits, wrap
from timm_scan.commands.evaluate import measure_wall_clock
from timm_scan.deploy.propose import halvings
from timm_scan.deploy.search import search_thresholds
from timm_scan.model.heads import head_macs
from timm_scan.training.runs import load_run, run_results, run_splits


DESIGNS = ("stage-ends", "proposed", "candidates")


def designs(backbone: torch.nn.Module, size: tuple[int, int, int], saved: Path) -> tuple[dict[str, dict], dict]:
    """The three designs (their ``TrainConfig`` exit fields) for ``backbone`` at ``size``, and what the proposal
    measured (measured once: kept in ``saved`` and read from there later, so that a rerun reports the runs it
    trained)."""
    if saved.is_file():
        return json.loads(saved.read_text())
    proposal = propose_exits(backbone, size, batch_size=1)
    wrapped = wrap(backbone, ScanConfig(), check_input_size=size)
    width, deepest = wrapped.config.head_channels, wrapped.exit_stages[-1].reduction
    blocks = {p.entry: halvings(p.reduction, deepest) for p in proposal.positions}
    stage_ends = wrapped.config.exits

    def design(entries: list) -> dict:
        return {"exits": entries, "head_blocks": [blocks[e] for e in entries], "head_channels": width,
                "attention": "none"}

    chosen = [proposal.positions[i].entry for i in proposal.chosen]
    result = ({"stage-ends": design(stage_ends), "proposed": design(chosen),
               "candidates": design([p.entry for p in proposal.positions])},
              {"positions": [vars(p) for p in proposal.positions], "proposed": chosen, "stage_ends": stage_ends,
               "head_channels": width, "device": proposal.device, "backbone_ms": proposal.backbone_ms,
               "notes": proposal.notes})
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result, indent=2))
    return result


def flags(design: dict) -> list[str]:
    """A design's ``timm-scan train`` flags."""
    return ["--exits", *map(str, design["exits"]), "--head-blocks", *map(str, design["head_blocks"]),
            "--head-channels", str(design["head_channels"]), "--attention", design["attention"]]


def subset_costs(exit_macs: list[int], head_macs: list[int], backbone: int, keep: tuple[int, ...]) -> ExitCosts:
    """MACs of the candidates model narrowed to shallow exits ``keep``: the backbone up to each kept exit plus
    the kept heads on the way (``exit_macs`` cumulative with every head, ``head_macs`` per shallow head)."""
    to_position = [m - sum(head_macs[: i + 1]) for i, m in enumerate(exit_macs[:-1])]
    per_exit = [to_position[i] + sum(head_macs[j] for j in keep if j <= i) for i in keep]
    return ExitCosts.macs([*per_exit, backbone + sum(head_macs[j] for j in keep)], backbone)


def narrowed(run: Path, keeps: dict[str, tuple[int, ...]], max_subset: int | None, wall: int | None) -> dict:
    """Every subset (of at most ``max_subset`` shallow exits) of the candidates run searched at no loss on
    validation; the named ``keeps`` and the best reported in full."""
    outputs = RunOutputs.load(run)
    model, size, test_set = outputs.model, outputs.input_size, outputs.test_set
    val, val_labels, test, test_labels = outputs.val, outputs.val_labels, outputs.test, outputs.test_labels
    exit_macs, backbone = model.exit_macs(size), model.backbone_macs(size)
    heads = head_macs(model.backbone, model.config, model.exit_stages[:-1], size)  # what each shallow head adds
    shallow = model.num_exits - 1
    searched = {}
    for r in range(1, min(shallow, max_subset or shallow) + 1):
        for keep in itertools.combinations(range(shallow), r):
            costs = subset_costs(exit_macs, heads, backbone, keep)
            outputs = [val[i] for i in keep] + [val[-1]]
            searched[keep] = search_thresholds(outputs, val_labels, costs, max_accuracy_drop=0.0,
                                               fallback="deepest").speedup
    best = max(searched, key=searched.get)
    report = {"subsets": {",".join(map(str, k)): v for k, v in searched.items()}, "best": list(best), "rows": {}}
    for name, keep in {**keeps, "best on validation": best}.items():
        kept = model.keep_exits(list(keep))
        costs = kept.exit_costs(size)
        assert costs.per_exit == subset_costs(exit_macs, heads, backbone, keep).per_exit  # keep_exits' own costs
        val_k, test_k = [val[i] for i in keep] + [val[-1]], [test[i] for i in keep] + [test[-1]]
        row = {"keep": list(keep), "exits": kept.config.exits, "exit_macs": costs.per_exit,
               "test_exits": [float((o.argmax(-1) == test_labels).float().mean()) for o in test_k]}
        row.update(operating_points(val_k, val_labels, test_k, test_labels, costs))
        row["running_mean"] = operating_points(val_k, val_labels, test_k, test_labels, costs, rule="running-mean")
        row["bound"] = bounds(val_k, val_labels, test_k, test_labels, costs)
        if wall:
            row["no_loss"]["wall_clock"] = wall_clock(kept, ExitPolicy(row["no_loss"]["thresholds"], "deepest"),
                                                      test_set, wall)
        report["rows"][name] = row
        print(f"{name:20s} exits {kept.config.exits}: no loss {row['no_loss']['test_speedup']:.2f}x at "
              f"{100 * row['no_loss']['test_accuracy']:.2f}% on test", flush=True)
    return report


def wall_clock(model, policy, dataset, n: int) -> list[dict]:
    """The predictor under ``policy`` against the plain backbone on test images: ``n`` at batch 256, then a
    quarter of them at batch 1."""
    model.policy = policy
    predictor = EarlyExitPredictor(model)
    images = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])
    return [measure_wall_clock(model, predictor, images[:m], b).to_dict() for b, m in ((256, n), (1, max(1, n // 4)))]


def proposal_row(name: str, batch_size: int) -> dict:
    """What ``propose_exits`` proposes for ``name`` at its default size and ``batch_size``, on this machine."""
    backbone = timm.create_model(name, num_classes=1000).eval()
    p = propose_exits(backbone, batch_size=batch_size)
    stage_ends = wrap(backbone, check_input_size=p.input_size).exit_stages[:-1]
    print(f"{name} batch {batch_size}: {p.flags()}; stage ends at "
          + ", ".join(f"{q.share:.0%}" for q in p.positions if q.module in {s.module for s in stage_ends})
          + " of the time, proposed at " + ", ".join(f"{p.positions[i].share:.0%}" for i in p.chosen), flush=True)
    return {"model": name, "input_size": list(p.input_size), "batch_size": batch_size, "device": p.device,
            "backbone_ms": p.backbone_ms, "backbone_macs": p.backbone_macs, "positions": [vars(q) for q in p.positions],
            "chosen": p.chosen, "stage_ends": [s.module for s in stage_ends], "scan_config": p.config.to_dict(),
            "exit_macs": p.exit_macs, "notes": p.notes}


def frozen(args: argparse.Namespace) -> tuple[dict, dict[str, Path]]:
    """The designs trained on ``args.train``'s frozen backbone."""
    base = Path(args.train)
    model, cfg = load_run(base)
    record = {"base": args.train, "base_results": run_results(base).to_dict()}
    chosen, record["proposal"] = designs(model.backbone, (3, cfg.input_size, cfg.input_size),
                                         Path(args.root) / base.name / "proposal.json")
    names = [name for name in chosen if name in args.designs]
    trained = train(base, {name: flags(chosen[name]) for name in names}, args.epochs or 2, args.batch_size or 128,
                    Path(args.root))
    return record, dict(zip(names, trained))


def scratch(args: argparse.Namespace) -> tuple[dict, dict[str, Path]]:
    """The designs each trained from scratch with self-distillation, under ``self_distillation.py``'s recipe
    ``args.scratch`` (its ``default`` variant), the heads and exits alone differing."""
    recipe = SETTINGS[args.scratch]
    root = Path(args.root) / f"{args.scratch}-seed{args.seed}"
    size = (3, recipe["input_size"], recipe["input_size"])
    overrides = {k: getattr(args, k) for k in ("dataset", "epochs", "max_train_samples", "val_size", "batch_size",
                                               "num_workers") if getattr(args, k) is not None}
    classes = run_splits(train_config(args.scratch, "default", recipe["lr"], args.seed, root, **overrides),
                         trained=True).num_classes  # the heads' width counts their classifiers
    chosen, proposal = designs(timm.create_model(recipe["model"], num_classes=classes), size, root / "proposal.json")
    applied = {k: v for k, v in {**recipe, **overrides}.items() if k not in ("attention", "head_budget")}
    record = {"recipe": {**applied, "name": args.scratch, "num_classes": classes}, "seed": args.seed,
              "proposal": proposal, "base_results": None}
    runs = {}
    for name, design in chosen.items():
        if name not in args.designs:
            continue
        cfg = train_config(args.scratch, "default", recipe["lr"], args.seed, root, head_budget=None, **design,
                           **overrides)
        cfg = dataclasses.replace(cfg, output_dir=str(root / name))
        train_or_reuse(cfg)
        runs[name] = Path(cfg.output_dir)
    return record, runs


def trained(args: argparse.Namespace) -> dict:
    """The designs trained (on a frozen backbone, or from scratch), and the candidates narrowed."""
    record, runs = scratch(args) if args.scratch else frozen(args)
    record["designs"] = {}
    for name, run in runs.items():
        outputs = RunOutputs.load(run)
        row = summarise(outputs)
        row["running_mean"] = outputs.operating_points(rule="running-mean")
        if args.wall_clock and name != "candidates":
            row["no_loss"]["wall_clock"] = wall_clock(outputs.model, outputs.model.policy.replace(
                thresholds=row["no_loss"]["thresholds"], fallback="deepest"), outputs.test_set, args.wall_clock)
        record["designs"][name] = row
        print(f"{name:12s} test exits {[round(100 * a, 2) for a in row['test']['exits']]}", *(
            f"{t} {row[t]['test_speedup']:.2f}x at {100 * row[t]['test_accuracy']:.2f}%" for t in TARGETS),
            f"bound {row['bound']['test_speedup']:.2f}x", flush=True)
    if "candidates" not in runs:
        return record
    entries = [q["entry"] for q in record["proposal"]["positions"]]
    keeps = {name: tuple(entries.index(e) for e in record["proposal"][key])
             for name, key in (("stage ends", "stage_ends"), ("proposed", "proposed"))}
    record["narrowed"] = narrowed(runs["candidates"], keeps, args.max_subset, args.wall_clock)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--train", help="a trained run whose frozen backbone the designs are trained on")
    source.add_argument("--scratch", choices=sorted(SETTINGS), help="instead, train each design from scratch under "
                                                                    "this recipe of self_distillation.py")
    p.add_argument("--seed", type=int, default=0, help="--scratch: the training seed")
    p.add_argument("--designs", nargs="+", choices=DESIGNS, default=list(DESIGNS),
                   help="the designs to train (the narrowing needs candidates)")
    p.add_argument("--propose", nargs="+", help="timm models to propose exits for at their default size (random "
                                                "weights, costs only), at each of --batch-sizes")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    p.add_argument("--epochs", type=int, help="epochs of each design's training (default: 2 with --train, the "
                                               "recipe's with --scratch)")
    p.add_argument("--batch-size", type=int, help="default: 128 with --train, the recipe's with --scratch")
    p.add_argument("--root", default="runs/exit_positions", help="where the designs' runs go")
    p.add_argument("--max-subset", type=int, help="narrow the candidates to subsets of at most this many exits")
    p.add_argument("--wall-clock", type=int, nargs="?", const=1024, metavar="IMAGES",
                   help="time the predictors on test images: IMAGES (default 1024) at batch 256, a quarter at batch 1")
    p.add_argument("--out", required=True)
    quick = p.add_argument_group("--scratch, a quick look (changes the recipe; pass --out elsewhere)")
    for flag, kind in (("--dataset", str), ("--max-train-samples", int), ("--val-size", int), ("--num-workers", int)):
        quick.add_argument(flag, type=kind)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    record = {"date": datetime.date.today().isoformat(), "timm": timm.__version__, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "command": " ".join(["python", "benchmarks/exit_positions.py", *sys.argv[1:]])}
    if args.propose:
        record["proposals"] = [proposal_row(name, b) for name in args.propose for b in args.batch_sizes]
    if args.train or args.scratch:
        record.update(trained(args))
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
