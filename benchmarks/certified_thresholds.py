"""Certified thresholds (Learn-then-Test, `timm_scan.deploy.certify`): is the promise kept, and what
does it cost?

Validity on synthetic outputs whose distribution is known: a population of outputs of four exits
(deeper exits more accurate, confidence correlated with correctness) is the distribution; every draw
samples with replacement from it, so the true risk of any thresholds is their risk on the whole
population, computed exactly. For each ε, δ and calibration size n, candidates are proposed once, on
an independent search draw of n samples, as `certify_thresholds` proposes them; then each of
``--draws`` calibration draws of n samples runs the fixed-sequence test, and the draw *violates* the
promise if the thresholds it certifies have a true accuracy drop above ε (the guarantee holds for any
candidates fixed before the calibration draw). Reported per setting: the violation frequency (to be at
most δ), the share of draws that certify anything, and the mean true speed-up in MACs of what they
certify, against the uncertified search at the same ε on a draw of 2n samples (the price of the
guarantee), and how the guaranteed speed-up grows with n.

    python benchmarks/certified_thresholds.py --out benchmarks/results/certified_thresholds.json \\
        --plot benchmarks/results/certified_thresholds.png
    python benchmarks/certified_thresholds.py --draws 50 --sizes 500 --epsilons 0.01 --deltas 0.1   # a quick look

``--budgets`` adds mean-cost guarantees (`certify_budget`) the same way: a draw violates its promise if
the certified thresholds' mean cost on the population is above the budget.

Real outputs: ``--runs RUN ...`` pools each finished, searched run's cached validation and test outputs
(``timm-scan evaluate`` writes both). With ``--as-population`` each pool is the population, drawn from
with replacement exactly as the synthetic one (so the true risk is still exact, and the study above
runs on each model's real outputs); without, the pool is re-split at random ``--splits`` times into a
search, a calibration and a held-out part, and violations are counted on the held-out part (itself an
estimate, with its own sampling error).

    python benchmarks/certified_thresholds.py --runs runs/a runs/b --as-population --sizes 1000 4000 \
        --out benchmarks/results/certified_thresholds_pools.json --plot benchmarks/results/certified_thresholds_pools.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from timm_scan import ExitCosts, search_thresholds
from timm_scan.deploy.certify import (cheapest_accepted, drop_losses, fixed_sequence, propose_budget_candidates,
                                     propose_candidates)
from timm_scan.deploy.latency import processor_name
from timm_scan.deploy.thresholds import ExitTable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import synthetic_outputs  # noqa: E402

COSTS = ExitCosts.macs([10, 20, 30, 42], 40)  # resnet18-like shares of the backbone's MACs, cumulative


def population(n: int = 200_000, seed: int = 0):
    """The known distribution: outputs of four exits on ``n`` samples (the tests' ``synthetic_outputs``)."""
    probs, labels = synthetic_outputs(n, seed=seed)
    return [torch.from_numpy(p.astype(np.float32)) for p in probs], torch.from_numpy(labels)


def true_drop_and_speedup(table: ExitTable, thresholds: np.ndarray) -> tuple[float, float]:
    """Exact accuracy drop against the deepest exit, and speed-up, on the whole population."""
    accuracy, speedup = table.evaluate(thresholds[None])
    return table.deepest_accuracy - float(accuracy[0]), float(speedup[0])


def run_outputs(run: Path) -> tuple[list[torch.Tensor], torch.Tensor, ExitCosts]:
    """A finished, evaluated run's cached validation and test outputs, pooled, and its exit MACs."""
    tensors = [load_file(str(run / "outputs" / f"{split}.safetensors")) for split in ("val", "test")]
    k = sum(name.startswith("probs_exit") for name in tensors[0])
    probs = [torch.cat([t[f"probs_exit{i + 1}"] for t in tensors]) for i in range(k)]
    macs = json.loads((run / "results.json").read_text())
    return probs, torch.cat([t["labels"] for t in tensors]), ExitCosts.macs(macs["exit_macs"], macs["backbone_macs"])


def draw(rng: np.random.Generator, size: int, n: int) -> torch.Tensor:
    """``n`` sample indices drawn with replacement from a population of ``size``: i.i.d. samples."""
    return torch.from_numpy(rng.integers(0, size, n))


def validity(args: argparse.Namespace, probs: list[torch.Tensor], labels: torch.Tensor, costs: ExitCosts,
             name: str) -> list[dict]:
    """Accuracy-drop guarantees on a population (``name``): per ε, δ and n, candidates from one search
    draw, then ``--draws`` calibration draws, each judged by its certified thresholds' exact drop on the
    population; the uncertified search on one draw of 2n beside it."""
    world = ExitTable.from_outputs(probs, labels, costs)
    rng = np.random.default_rng(args.seed)
    rows = []
    settings = [(e, d, n) for e in args.epsilons for d in args.deltas for n in args.sizes]
    for epsilon, delta, n in tqdm(settings, desc=f"{name}: settings"):
        started = time.perf_counter()
        search_index = draw(rng, len(labels), n)
        search = ExitTable.from_outputs([p[search_index] for p in probs], labels[search_index], costs)
        candidates = propose_candidates(search, search.deepest_accuracy, epsilon, generations=args.generations)
        uncertified_index = draw(rng, len(labels), 2 * n)
        uncertified = search_thresholds([p[uncertified_index] for p in probs], labels[uncertified_index], costs,
                                        max_accuracy_drop=epsilon, generations=args.generations)
        everyone = torch.arange(len(labels))
        right = {id(t): world.correct[world.exit_index(t)[0], everyone].to(torch.int8) for t in candidates}
        violations, certified, speedups = 0, 0, []
        for _ in range(args.draws):
            index = draw(rng, len(labels), n)
            right_deepest = world.deepest_correct[index].to(torch.int8)

            def losses(thresholds: np.ndarray) -> tuple[torch.Tensor, float]:
                return drop_losses(right_deepest, right[id(thresholds)][index], epsilon)

            accepted = cheapest_accepted(search, fixed_sequence(candidates, losses, delta, bounded=True))
            if accepted is None:
                speedups.append(true_drop_and_speedup(world, np.ones(world.num_exits - 1))[1])  # every exit runs
                continue
            certified += 1
            drop, speedup = true_drop_and_speedup(world, accepted)
            violations += drop > epsilon
            speedups.append(speedup)
        drop, speedup = true_drop_and_speedup(world, np.asarray(uncertified.thresholds))
        rows.append({"population": name, "risk": "accuracy_drop", "epsilon": epsilon, "delta": delta, "n": n,
                     "draws": args.draws,
                     "violation_frequency": violations / args.draws, "certified_share": certified / args.draws,
                     "mean_certified_speedup": float(np.mean(speedups)), "candidates": len(candidates),
                     "uncertified_true_drop": drop, "uncertified_speedup": speedup,
                     "uncertified_violates": drop > epsilon, "seconds": time.perf_counter() - started})
        row = rows[-1]
        tqdm.write(f"{name} ε {epsilon:g} δ {delta:g} n {n}: violations {row['violation_frequency']:.3f}, certified "
                   f"{row['certified_share']:.2f}, speed-up {row['mean_certified_speedup']:.3f}x (uncertified "
                   f"{speedup:.3f}x, true drop {drop:+.4f})")
    return rows


def budget_validity(args: argparse.Namespace, probs: list[torch.Tensor], labels: torch.Tensor, costs: ExitCosts,
                    name: str) -> list[dict]:
    """Mean-cost guarantees (`certify_budget`) on a population, as `validity`: per budget (a share of the
    backbone's cost), δ and n, a draw violates the promise if its certified thresholds' exact mean cost
    on the population is above the budget."""
    world = ExitTable.from_outputs(probs, labels, costs)
    rng = np.random.default_rng(args.seed)
    per_exit = torch.tensor(costs.per_exit, dtype=torch.float64)
    cheapest, span = costs.per_exit[0], costs.per_exit[-1] - costs.per_exit[0]
    rows = []
    settings = [(b * costs.backbone, d, n) for b in args.budgets for d in args.deltas for n in args.sizes]
    for budget, delta, n in tqdm(settings, desc=f"{name}: budgets"):
        search_index = draw(rng, len(labels), n)
        search = ExitTable.from_outputs([p[search_index] for p in probs], labels[search_index], costs)
        candidates = propose_budget_candidates(search, budget, generations=args.generations)
        uncertified_index = draw(rng, len(labels), 2 * n)
        uncertified = search_thresholds([p[uncertified_index] for p in probs], labels[uncertified_index], costs,
                                        budget=budget, generations=args.generations)
        uncertified_exit = world.exit_index(uncertified.policy.thresholds)[0]
        uncertified_cost = per_exit[uncertified_exit].mean().item()
        everyone = torch.arange(len(labels))
        index_of = {id(t): world.exit_index(t)[0] for t in candidates}
        violations, accuracies, mean_costs = 0, [], []
        for _ in range(args.draws):
            index = draw(rng, len(labels), n)

            def losses(thresholds: np.ndarray) -> tuple[torch.Tensor, float]:
                return (per_exit[index_of[id(thresholds)][index]] - cheapest) / span, (budget - cheapest) / span

            accepted = fixed_sequence(candidates[1:], losses, delta, bounded=True)
            chosen = accepted[-1] if accepted else candidates[0]
            true_cost = per_exit[index_of[id(chosen)]].mean().item()
            violations += true_cost > budget * (1 + 1e-12)
            accuracies.append(world.correct[index_of[id(chosen)], everyone].double().mean().item())
            mean_costs.append(true_cost)
        rows.append({"population": name, "risk": "mean_cost", "budget": budget, "budget_share": budget / costs.backbone,
                     "delta": delta, "n": n, "draws": args.draws, "violation_frequency": violations / args.draws,
                     "mean_true_cost": float(np.mean(mean_costs)), "mean_true_accuracy": float(np.mean(accuracies)),
                     "deepest_accuracy": world.deepest_accuracy, "candidates": len(candidates),
                     "uncertified_true_cost": uncertified_cost, "uncertified_violates": uncertified_cost > budget,
                     "uncertified_true_accuracy": world.correct[uncertified_exit, everyone].double().mean().item()})
        tqdm.write(json.dumps(rows[-1]))
    return rows


def real(args: argparse.Namespace) -> list[dict]:
    """Each run's pool re-split ``--splits`` times: ``--fit-samples`` (default two thirds) play the
    validation split a user searches on, once per ``--search-shares`` (the same split for every share,
    so shares compare paired), and the rest is held out to judge the result."""
    rows = []
    rng = np.random.default_rng(args.seed)
    for run in map(Path, args.runs):
        probs, labels, costs = run_outputs(run)
        n_fit = args.fit_samples or 2 * (len(labels) // 3)
        if not 0 < n_fit < len(labels):
            raise SystemExit(f"--fit-samples must be below the {len(labels)} pooled samples of {run}")
        for epsilon in args.epsilons:
            for delta in args.deltas:
                certified = {share: [] for share in args.search_shares}  # per split: (drop, speed-up, certified)
                empirical = []
                for _ in tqdm(range(args.splits), desc=f"{run.name} ε {epsilon:g} δ {delta:g}"):
                    order = torch.from_numpy(rng.permutation(len(labels)))
                    fit, held = order[:n_fit], order[n_fit:]
                    test_tables = {}

                    def on_held_out(policy) -> tuple[float, float]:  # drop and speed-up on the held-out part
                        if policy.fallback not in test_tables:
                            test_tables[policy.fallback] = ExitTable.from_outputs(
                                [p[held] for p in probs], labels[held], costs, policy.fallback)
                        return true_drop_and_speedup(test_tables[policy.fallback], np.asarray(policy.thresholds))

                    split_seed = int(rng.integers(1 << 30))
                    for share in args.search_shares:
                        found = search_thresholds([p[fit] for p in probs], labels[fit], costs,
                                                  max_accuracy_drop=epsilon, confidence=1 - delta, search_share=share,
                                                  generations=args.generations, split_seed=split_seed)
                        certified[share].append((*on_held_out(found.policy), found.policy.origin.guarantee.certified))
                    plain = search_thresholds([p[fit] for p in probs], labels[fit], costs, max_accuracy_drop=epsilon,
                                              generations=args.generations)
                    empirical.append(on_held_out(plain.policy))
                for share, results in certified.items():
                    rows.append({"run": str(run), "epsilon": epsilon, "delta": delta, "search_share": share,
                                 "splits": args.splits, "samples": len(labels), "fit_samples": n_fit,
                                 "violation_frequency": float(np.mean([d > epsilon for d, _, _ in results])),
                                 "certified_share": float(np.mean([c for _, _, c in results])),
                                 "mean_speedup": float(np.mean([s for _, s, _ in results])),
                                 "speedups": [s for _, s, _ in results],
                                 "uncertified_violation_frequency": float(np.mean([d > epsilon for d, _ in empirical])),
                                 "uncertified_mean_speedup": float(np.mean([s for _, s in empirical])),
                                 "uncertified_speedups": [s for _, s in empirical]})
                    tqdm.write(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("speedups")}))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Per population (a column): violation frequency and certified speed-up against n, per ε and δ; the
    uncertified search's true speed-up dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"population": "synthetic", **r} for r in rows if r.get("risk", "accuracy_drop") == "accuracy_drop"]
    populations = list(dict.fromkeys(r["population"] for r in rows))
    fig, axes = plt.subplots(2, len(populations), figsize=(4.2 * len(populations), 7), squeeze=False)
    for column, name in enumerate(populations):
        top, bottom = axes[0, column], axes[1, column]
        mine = [r for r in rows if r["population"] == name]
        for i, (epsilon, delta) in enumerate(sorted({(r["epsilon"], r["delta"]) for r in mine})):
            line = sorted((r for r in mine if (r["epsilon"], r["delta"]) == (epsilon, delta)), key=lambda r: r["n"])
            n = [r["n"] for r in line]
            label, color = f"ε = {100 * epsilon:g} pt, δ = {delta:g}", f"C{i}"
            top.plot(n, [r["violation_frequency"] for r in line], "o-", color=color, label=label)
            bottom.plot(n, [r["mean_certified_speedup"] for r in line], "o-", color=color, label=label)
            bottom.plot(n, [r["uncertified_speedup"] for r in line], "x:", color=color)
        for delta in sorted({r["delta"] for r in mine}):
            top.axhline(delta, color="grey", ls="--", lw=1)
        top.set_ylim(bottom=-0.005)
        top.set(xscale="log", title=Path(name).name, xlabel="calibration samples n",
                ylabel="violation frequency (≤ δ promised)")
        bottom.set(xscale="log", xlabel="calibration samples n",
                   ylabel="true MACs speed-up\n(─ certified, ⋯ uncertified)")
        sizes = sorted({r["n"] for r in mine})
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
            ax.minorticks_off()
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.005, 0.01, 0.02], help="accuracy drops (fractions)")
    p.add_argument("--deltas", type=float, nargs="+", default=[0.05, 0.1])
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 5000, 20000], help="calibration sizes")
    p.add_argument("--draws", type=int, default=1000, help="calibration draws per setting")
    p.add_argument("--population", type=int, default=200_000)
    p.add_argument("--generations", type=int, default=50)
    p.add_argument("--budgets", type=float, nargs="*", default=[],
                   help="also certify mean-cost budgets, as shares of the backbone's cost (e.g. 0.6 0.75)")
    p.add_argument("--runs", nargs="*", default=[], help="finished, evaluated runs: their outputs re-split")
    p.add_argument("--as-population", action="store_true",
                   help="with --runs: each run's pooled outputs are the population, drawn from as the synthetic "
                        "one is (exact true risk), instead of re-split into parts")
    p.add_argument("--splits", type=int, default=100)
    p.add_argument("--fit-samples", type=int, help="with --runs: pooled samples searched on per split (default: 2/3)")
    p.add_argument("--search-shares", type=float, nargs="+", default=[0.5],
                   help="with --runs: shares of the searched samples that propose candidates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--replot", type=Path, nargs="+", help="only draw --plot again, from these stored JSON files")
    args = p.parse_args()
    if args.replot:
        plot([row for path in args.replot for row in json.loads(path.read_text())["rows"]], args.plot)
        return
    started = datetime.datetime.now(datetime.timezone.utc)
    if args.runs and not args.as_population:
        rows = real(args)
    else:
        populations = [(str(run), *run_outputs(Path(run))) for run in args.runs] or [
            ("synthetic", *population(args.population), COSTS)]
        rows = [row for name, probs, labels, costs in populations
                for row in validity(args, probs, labels, costs, name)
                + budget_validity(args, probs, labels, costs, name)]
    result = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "date": started.strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{processor_name()}, {torch.get_num_threads()} torch threads, {platform.machine()}, "
                         f"torch {torch.__version__.split('+')[0]}",
              "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    if args.plot and (args.as_population or not args.runs):
        plot(rows, args.plot)
    worst = max(r["violation_frequency"] - r["delta"] for r in rows)
    print(f"{len(rows)} settings; the largest violation frequency minus δ: {worst:+.3f}"
          + ("" if worst <= 0 else " (above δ: within the Monte Carlo error of the draws?)"))


if __name__ == "__main__":
    main()
