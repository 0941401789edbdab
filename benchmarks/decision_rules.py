"""Decision rules that use every exit already computed, against Algorithm 1's own-softmax rule, on trained
runs' cached outputs: which gives the larger certified MACs speed-up at the same accuracy target?

A rule turns the softmax of exits 0..i into the answer and the confidence at exit i:

- ``own``: exit i's own softmax (SCAN Algorithm 1; the library's rule);
- ``running mean``: the mean of the softmax of exits 0..i (a running ensemble);
- ``running geometric``: the normalised geometric mean of exits 0..i;
- ``learned``: ``softmax(Σ_j w_ij log p_j + b_i)`` over exits 0..i, weights and per-class bias fitted by
  cross-entropy on the search half (Zero Time Waste's weighted geometric ensemble, without its cascaded
  features).

The deepest exit's own answer stays the reference and the answer of samples that pass no threshold, so the
target means the same for every rule. Per run, rule, target and split seed: thresholds certified by
``search_thresholds(..., max_accuracy_drop=ε, confidence=0.9)`` on validation (the learned rule fits on the
same search half the certification proposes from, never on its calibration half), then accuracy and MACs
speed-up on test. ``no-loss`` is the uncertified search at ε = 0 on the search half.

    python benchmarks/decision_rules.py --runs runs/cert-resnet18-45k runs/demo --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import warnings
from pathlib import Path

import numpy as np
import torch

from timm_scan.deploy.certify import _split
from timm_scan.deploy.search import search_thresholds
from timm_scan.deploy.thresholds import ExitTable
from timm_scan.training.runs import cached_outputs, eval_dataset, load_run, run_splits

RULES = ("own", "running mean", "running geometric", "learned")
TARGETS = (0.005, 0.01, 0.02)
CONFIDENCE = 0.9


def load_outputs(run: Path, model, cfg, split: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The run's cached softmax outputs of ``split`` (computed and cached where missing)."""
    dataset = eval_dataset(run_splits(cfg, trained=True), split, model.data_config)
    probs, labels = cached_outputs(run, split, model, dataset)
    return [p.float() for p in probs], labels


def _log(p: torch.Tensor) -> torch.Tensor:
    return p.clamp_min(torch.finfo(torch.float32).tiny).log()


def fit_weights(probs: list[torch.Tensor], labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per shallow exit i: weights over exits 0..i and a per-class bias, by cross-entropy (L-BFGS)."""
    fitted = []
    for i in range(len(probs) - 1):
        logs = torch.stack([_log(p) for p in probs[: i + 1]])
        w = torch.zeros(i + 1)
        w[i] = 1.0
        w.requires_grad_(True)
        b = torch.zeros(probs[0].shape[1], requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy((w[:, None, None] * logs).sum(0) + b, labels)
            loss.backward()
            return loss

        opt.step(closure)
        fitted.append((w.detach(), b.detach()))
    return fitted


def decide(probs: list[torch.Tensor], rule: str, weights: list | None = None) -> list[torch.Tensor]:
    """The probabilities each shallow exit decides and answers with under ``rule``; the deepest's own last."""
    out = []
    for i in range(len(probs) - 1):
        if rule == "own":
            out.append(probs[i])
        elif rule == "running mean":
            out.append(torch.stack(probs[: i + 1]).mean(0))
        elif rule == "running geometric":
            out.append(torch.softmax(torch.stack([_log(p) for p in probs[: i + 1]]).mean(0), -1))
        else:
            w, b = weights[i]
            out.append(torch.softmax((w[:, None, None] * torch.stack([_log(p) for p in probs[: i + 1]])).sum(0) + b, -1))
    return out + [probs[-1]]


def on_test(probs: list[torch.Tensor], labels: torch.Tensor, costs, thresholds) -> tuple[float, float]:
    table = ExitTable.from_outputs(probs, labels, costs, fallback="deepest")
    accuracy, speedup = table.evaluate([thresholds])
    return float(accuracy[0]), float(speedup[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "decision_rules.json"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    rows = []
    for run in map(Path, args.runs):
        model, cfg = load_run(run)
        costs = model.exit_costs((3, cfg.input_size, cfg.input_size))
        val, val_labels = load_outputs(run, model, cfg, "val")
        test, test_labels = load_outputs(run, model, cfg, "test")
        deepest = (test[-1].argmax(-1) == test_labels).double().mean().item()
        for seed in args.seeds:
            search, _ = _split(len(val_labels), 0.5, seed)
            for rule in RULES:
                weights = fit_weights([v[search] for v in val], val_labels[search]) if rule == "learned" else None
                v, t = decide(val, rule, weights), decide(test, rule, weights)
                row = {"run": str(run), "seed": seed, "rule": rule, "test_deepest": deepest}
                no_loss = search_thresholds([x[search] for x in v], val_labels[search], costs, max_accuracy_drop=0.0,
                                            fallback="deepest").policy.thresholds
                row["no-loss"] = dict(zip(("test_accuracy", "test_speedup"), on_test(t, test_labels, costs, no_loss)))
                for eps in TARGETS:
                    result = search_thresholds(v, val_labels, costs, max_accuracy_drop=eps, confidence=CONFIDENCE,
                                               fallback="deepest", split_seed=seed)
                    accuracy, speedup = on_test(t, test_labels, costs, result.policy.thresholds)
                    row[str(eps)] = {"certified": result.policy.origin.guarantee.certified, "test_accuracy": accuracy,
                                     "test_speedup": speedup}
                rows.append(row)
                print(run.name, seed, f"{rule:18s}", f"no-loss {row['no-loss']['test_speedup']:.2f}x",
                      " ".join(f"ε={e}: {row[str(e)]['test_speedup']:.2f}x" for e in TARGETS), flush=True)
    summary = {}
    for run in args.runs:
        for rule in RULES:
            mine = [r for r in rows if r["run"] == run and r["rule"] == rule]
            summary.setdefault(run, {})[rule] = {
                key: {"mean_test_speedup": float(np.mean([r[key]["test_speedup"] for r in mine])),
                      "mean_test_drop_points": float(np.mean([100 * (r["test_deepest"] - r[key]["test_accuracy"])
                                                              for r in mine])),
                      **({"certified": sum(r[key]["certified"] for r in mine)} if key != "no-loss" else {})}
                for key in ("no-loss", *map(str, TARGETS))}
    record = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, CPU",
              "command": " ".join(["python", "benchmarks/decision_rules.py", "--runs", *args.runs, "--seeds",
                                   *map(str, args.seeds)]),
              "confidence": CONFIDENCE, "targets": list(TARGETS), "seeds": args.seeds, "summary": summary, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
