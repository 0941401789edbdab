"""Head size, decision rule and exit positions, each alone and together (issue 34's ablation).

Reads the exits-only runs that ``head_budget.py --train`` and ``exit_positions.py --train`` trained on the same
frozen backbone (their ``--root`` folders), so that every row differs from the papers' design in what it names
and in nothing else: the backbone, the data, the epochs and the seed are the same. No training here: each row is
a run's cached validation and test outputs, narrowed (``keep_exits``) where it names a subset of the candidates.
Per row and decision rule (Algorithm 1's own softmax; the running mean of the exits so far): the cheapest
thresholds at no loss and within one point of the deepest exit on validation (``head_budget.operating_points``),
and their MACs speed-up and accuracy on test.

    python benchmarks/ablation.py --base runs/cert-resnet18-45k \\
        --positions benchmarks/results/exit_positions_resnet18.json --out benchmarks/results/ablation_resnet18.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import timm
import torch
from head_budget import TARGETS, RunOutputs, operating_points  # noqa: E402  (benchmarks/: the script's folder)


RULES = {"own": "own softmax", "running-mean": "running mean"}


def rows(heads: Path, positions: Path, best: list[int]) -> list[dict]:
    """The designs compared: heads, positions, the run that trained them and the candidates kept (None: all);
    ``heads`` and ``positions`` are the folders of head_budget.py's and exit_positions.py's runs on one base."""
    return [
        {"heads": "papers' (deepest width, SD attention)", "positions": "stage ends", "run": heads / "papers"},
        {"heads": "deepest width, no attention", "positions": "stage ends", "run": positions / "stage-ends"},
        {"heads": "128 channels, no attention", "positions": "stage ends", "run": heads / "w128-none"},
        {"heads": "128 channels, SD attention", "positions": "stage ends", "run": heads / "w128-sd"},
        {"heads": "32 channels, no attention", "positions": "stage ends", "run": heads / "w32-none"},
        {"heads": "deepest width, no attention", "positions": "proposed, trained alone", "run": positions / "proposed"},
        {"heads": "deepest width, no attention", "positions": "best subset of the candidates, narrowed",
         "run": positions / "candidates", "keep": best},
    ]


def evaluate(row: dict) -> dict:
    """``row``'s operating points under each rule."""
    outputs = RunOutputs.load(row["run"])
    model, val, val_labels, test, test_labels = (outputs.model, outputs.val, outputs.val_labels, outputs.test,
                                                 outputs.test_labels)
    if row.get("keep") is not None:
        model = model.keep_exits(row["keep"])
        val, test = ([split[i] for i in row["keep"]] + [split[-1]] for split in (val, test))
        row["exits"] = model.config.exits
    costs = model.exit_costs(outputs.input_size)
    row["test_exits"] = [float((p.argmax(-1) == test_labels).float().mean()) for p in test]
    row["exit_macs"], row["backbone_macs"] = costs.per_exit, costs.backbone
    row["rules"] = {rule: operating_points(val, val_labels, test, test_labels, costs, rule=rule) for rule in RULES}
    row["run"] = str(row["run"])
    return row


def table(report: dict) -> str:
    """The markdown table: one line per design and rule."""
    lines = ["| heads | positions | rule | " + " | ".join(f"{t.replace('_', ' ')}: validation | test" for t in TARGETS)
             + " |", "| --- | --- | --- | " + " | ".join("--- | ---" for _ in TARGETS) + " |"]
    for row in report["rows"]:
        for rule, name in RULES.items():
            points = row["rules"][rule]
            cells = [f"{points[t]['val_speedup']:.2f}x | {points[t]['test_speedup']:.2f}x at "
                     f"{100 * points[t]['test_accuracy']:.2f}%" for t in TARGETS]
            lines.append(f"| {row['heads']} | {row['positions']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the trained run whose frozen backbone the designs were trained on")
    p.add_argument("--positions", required=True, help="exit_positions.py's report for --base (its best subset)")
    p.add_argument("--heads-root", default="runs/head_budget", help="head_budget.py's --root")
    p.add_argument("--positions-root", default="runs/exit_positions", help="exit_positions.py's --root")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    base = Path(args.base).name
    best = json.loads(Path(args.positions).read_text())["narrowed"]["best"]
    designs = rows(Path(args.heads_root) / base, Path(args.positions_root) / base, best)
    report = {"date": datetime.date.today().isoformat(), "timm": timm.__version__, "torch": torch.__version__,
              "machine": f"{platform.machine()}; nothing timed (the runs' cached outputs)",
              "command": " ".join(["python", "benchmarks/ablation.py", *sys.argv[1:]]), "base": args.base,
              "rows": [evaluate(row) for row in designs]}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
