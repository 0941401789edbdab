"""Two defaults of the early-exit threshold search, decided from measurements: the threshold range
(SCAN's σ ∈ [0.70, 1.00] against [0.5, 1] and the full [0, 1]) and per-exit temperature scaling
(fitted on validation) before the search.

For each finished self-distilled run: its cached validation and test outputs; the fitness baseline
is the deepest exit's validation accuracy; samples that pass no threshold get the ensemble, or the
deepest exit's answer in a run whose ensemble is below the deepest exit on validation (where the
ensemble fallback cannot reach the baseline at all; ``--fallback`` fixes it instead). For each
``min_threshold`` × {uncalibrated, calibrated (one temperature per exit fitted on validation,
applied to validation and test)} and each GA seed, the genetic search on validation for every
``max_drop`` target (the cheapest thresholds whose validation accuracy is at least the baseline
minus that many points) and every β of a sweep; each threshold vector is evaluated on test
(accuracy, MACs speed-up; for targets, whether the test accuracy held: ≥ the deepest exit's test
accuracy − max_drop). Per run and setting, the summary is the largest test MACs speed-up among all
searched points whose test accuracy is at least the deepest exit's test accuracy − 0.5 (and − 1)
points, per seed and its mean over seeds (a seed with no such point counts as 1, the plain
backbone); a paired bootstrap over test samples (thresholds fixed) gives the test-sampling noise of
each difference between settings. ECE per exit on test before and after calibration, and the
temperatures.

    python benchmarks/threshold_choices.py            # the runs of RUNS, from the repository root
    python benchmarks/threshold_choices.py --min-thresholds 0.5 0 --bits 64 --out benchmarks/results/threshold_choices_bits64.json
    python benchmarks/threshold_choices.py --report benchmarks/results/threshold_choices.json  # no search

Writes ``results/threshold_choices.json``. The summary across runs also says, for each ``max_drop``
target (thresholds chosen on validation only), how often it held on test and the geometric mean of
its test speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import timm_scan
from timm_scan.deploy.calibration import expected_calibration_error, fit_temperatures
from timm_scan.deploy.policy import apply_temperatures
from timm_scan.deploy.thresholds import ExitTable, Objective, genetic_search
from timm_scan.training import cached_outputs, eval_dataset, load_run, run_splits

HERE = Path(__file__).parent
RUNS = [
    "runs/sd/cifar10-10k/default-lr0.1-seed0",
    "runs/sd/cifar10-10k/baseline-lr0.1-seed0-finetuned",
    "runs/sd/grey5/default-lr0.1-seed0",
    "runs/sd/grey5/default-lr0.1-seed1",
    "runs/sd/grey5/default-lr0.05-seed0",
    "runs/sd/mobilenetv3/default-lr0.1-seed0",
    "runs/sd/convnext/default-lr0.002-seed0",
]
MIN_THRESHOLDS = [0.7, 0.5, 0.0]
MAX_DROPS = [0.0, 0.5, 1.0, 2.0]
BETAS = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
TOLERANCES = [0.5, 1.0]


def setting_name(min_threshold: float, calibrated: bool) -> str:
    return f"{min_threshold:g}/{'cal' if calibrated else 'raw'}"


def accuracy_of(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (probs.argmax(-1) == labels).double().mean().item()


def per_sample(table: ExitTable, thresholds: list[float], exit_macs: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Whether each test sample is answered right, and its MACs, under these thresholds."""
    index = table.exit_index(np.array([thresholds]))[0]
    return (table.correct[index, torch.arange(len(index))].numpy().astype(np.float64),
            np.asarray(exit_macs, dtype=np.float64)[index.numpy()])


def search_points(val: ExitTable, test: ExitTable, test_deepest: float, min_threshold: float, seed: int,
                  args: argparse.Namespace) -> list[dict]:
    """Every target and β searched on validation, each evaluated on test (accuracies and drops in points
    here, fractions in the search)."""
    baseline = val.deepest_accuracy
    objectives = ([("max_drop", d, Objective(baseline, None, d / 100)) for d in args.max_drops]
                  + [("beta", b, Objective(baseline, b)) for b in args.betas])
    points = []
    for kind, value, objective in objectives:
        point: dict = {"kind": kind, "value": value}
        try:
            found = genetic_search(val, objective, min_threshold=min_threshold, seed=seed,
                                   generations=args.generations, bits=args.bits)
        except ValueError as exc:  # a target no threshold vector reaches on validation
            point["error"] = str(exc).split(";")[0]
            points.append(point)
            continue
        accuracy, speedup = (float(v[0]) for v in test.evaluate(np.array([found.thresholds])))
        accuracy = 100 * accuracy
        point.update(thresholds=list(found.thresholds), val_accuracy=100 * found.accuracy, val_speedup=found.speedup,
                     test_accuracy=accuracy, test_speedup=speedup,
                     test_exit_shares=[float(s) for s in test.exit_shares(np.array([found.thresholds]))[0]])
        if kind == "max_drop":
            point["held"] = accuracy >= test_deepest - value - 1e-9
        points.append(point)
    return points


def best_within(points: list[dict], test_deepest: float, tolerance: float) -> float | None:
    """The largest test speed-up among points whose test accuracy ≥ deepest − tolerance."""
    floor = test_deepest - tolerance - 1e-9
    ok = [p["test_speedup"] for p in points if "test_accuracy" in p and p["test_accuracy"] >= floor]
    return max(ok) if ok else None


def evaluate_run(run: str, args: argparse.Namespace) -> dict:
    model, cfg = load_run(run)
    splits = run_splits(cfg)
    size = tuple(model.data_config["input_size"])
    exit_macs, backbone_macs = model.exit_macs(size), model.backbone_macs(size)
    costs = timm_scan.ExitCosts.macs(exit_macs, backbone_macs)
    val_probs, val_labels = cached_outputs(run, "val", model, eval_dataset(splits, "val", model.data_config))
    test_probs, test_labels = cached_outputs(run, "test", model, eval_dataset(splits, "test", model.data_config))
    temperatures = fit_temperatures(val_probs, val_labels)
    probs = {False: (val_probs, test_probs),
             True: (apply_temperatures(val_probs, temperatures), apply_temperatures(test_probs, temperatures))}
    val_deepest, test_deepest = accuracy_of(val_probs[-1], val_labels), accuracy_of(test_probs[-1], test_labels)
    val_ensemble = accuracy_of(torch.stack(val_probs).mean(0), val_labels)
    fallback = args.fallback if args.fallback != "auto" else ("ensemble" if val_ensemble >= val_deepest else "deepest")
    record: dict = {
        "run": run, "model": cfg.model, "dataset": cfg.dataset, "val_samples": len(val_labels),
        "test_samples": len(test_labels), "exit_macs": exit_macs, "backbone_macs": backbone_macs,
        "val_exit_accuracy": [accuracy_of(p, val_labels) for p in val_probs],
        "test_exit_accuracy": [accuracy_of(p, test_labels) for p in test_probs],
        "val_deepest_accuracy": val_deepest, "test_deepest_accuracy": test_deepest,
        "val_ensemble_accuracy": val_ensemble,
        "test_ensemble_accuracy": accuracy_of(torch.stack(test_probs).mean(0), test_labels),
        "fallback": fallback,
        "temperatures": temperatures,
        "ece": {split: {name: [expected_calibration_error(p, labels) for p in probs[cal][i]]
                        for cal, name in ((False, "before"), (True, "after"))}
                for i, (split, labels) in enumerate((("val", val_labels), ("test", test_labels)))},
        "settings": {},
    }
    # for the bootstrap: each searched point's per-sample correctness and MACs on test, and its setting
    correct_rows, macs_rows, owners = [], [], []
    for calibrated in (False, True):
        val_table = ExitTable.from_outputs(probs[calibrated][0], val_labels, costs, fallback)
        test_table = ExitTable.from_outputs(probs[calibrated][1], test_labels, costs, fallback)
        fallback_accuracy = {"val": 100.0 * val_table.correct[-1].double().mean().item(),
                             "test": 100.0 * test_table.correct[-1].double().mean().item()}
        for min_threshold in args.min_thresholds:
            name = setting_name(min_threshold, calibrated)
            setting: dict = {"min_threshold": min_threshold, "calibrated": calibrated,
                             "fallback_accuracy": fallback_accuracy, "seeds": {}}
            for seed in args.seeds:
                start = time.perf_counter()
                points = search_points(val_table, test_table, test_deepest, min_threshold, seed, args)
                seconds = time.perf_counter() - start
                summary = {f"best_speedup_within_{t:g}": best_within(points, test_deepest, t) for t in args.tolerances}
                setting["seeds"][str(seed)] = {"points": points, "search_seconds": seconds, **summary}
                for p in points:
                    if "thresholds" in p:
                        c, m = per_sample(test_table, p["thresholds"], exit_macs)
                        correct_rows.append(c)
                        macs_rows.append(m)
                        owners.append((name, seed))
                print(f"  {name} seed {seed}: {len(points)} searches in {seconds:.1f} s, "
                      + ", ".join(f"within {t:g}: {summary[f'best_speedup_within_{t:g}'] or float('nan'):.3f}x"
                                  for t in args.tolerances), flush=True)
            for t in args.tolerances:  # a seed with no point within counts as 1 (the plain backbone)
                values = [setting["seeds"][str(s)][f"best_speedup_within_{t:g}"] for s in args.seeds]
                setting[f"best_speedup_within_{t:g}"] = float(np.mean([1.0 if v is None else v for v in values]))
            setting["targets"] = {
                f"{d:g}": {"test_speedup": [_target(setting, s, d, "test_speedup") for s in args.seeds],
                           "test_accuracy": [_target(setting, s, d, "test_accuracy") for s in args.seeds],
                           "held": [_target(setting, s, d, "held") for s in args.seeds]}
                for d in args.max_drops}
            record["settings"][name] = setting
    deepest_correct = (test_probs[-1].argmax(-1) == test_labels).numpy().astype(np.float64)
    record["bootstrap"] = bootstrap(np.stack(correct_rows), np.stack(macs_rows), owners, deepest_correct,
                                    backbone_macs, args)
    return record


def _target(setting: dict, seed: int, drop: float, key: str):
    point = next(p for p in setting["seeds"][str(seed)]["points"] if p["kind"] == "max_drop" and p["value"] == drop)
    return point.get(key)


def bootstrap(correct: np.ndarray, macs: np.ndarray, owners: list[tuple[str, int]], deepest_correct: np.ndarray,
              backbone_macs: float, args: argparse.Namespace) -> dict:
    """Test-sampling noise of the summary: resample the test samples (thresholds held), recompute
    each setting's seed-mean best speed-up within each tolerance, and give each difference between
    settings (each narrower range against each wider one, uncalibrated; calibrated against
    uncalibrated per range) as observed, with the 95% interval of its resamples. Where no point of
    a setting is within, its speed-up counts as 1."""
    rng = np.random.default_rng(0)
    n = correct.shape[1]
    resampled = rng.multinomial(n, np.full(n, 1.0 / n), size=args.bootstrap).T.astype(np.float64) / n  # (N, B)
    weights = np.concatenate([np.full((n, 1), 1.0 / n), resampled], axis=1)  # column 0: the test set as is
    accuracy = 100.0 * correct @ weights  # (P, 1 + B)
    speedup = backbone_macs / (macs @ weights)
    deepest = 100.0 * deepest_correct @ weights  # (1 + B,)
    ranges = [f"{m:g}" for m in sorted(args.min_thresholds, reverse=True)]
    pairs = [(f"{b}/raw", f"{a}/raw") for a, b in itertools.combinations(ranges, 2)]
    pairs += [(f"{m}/cal", f"{m}/raw") for m in ranges]
    out: dict = {"replicates": args.bootstrap}
    for t in args.tolerances:
        masked = np.where(accuracy >= deepest[None] - t - 1e-9, speedup, 1.0)  # none within: 1 (run everything)
        summary = {}
        for name in {o[0] for o in owners}:
            per_seed = [masked[[i for i, o in enumerate(owners) if o == (name, s)]].max(0) for s in args.seeds]
            summary[name] = np.mean(per_seed, axis=0)
        differences = {}
        for a, b in pairs:
            d = summary[a] - summary[b]
            differences[f"{a} - {b}"] = {"observed": float(d[0]), "low95": float(np.quantile(d[1:], 0.025)),
                                         "high95": float(np.quantile(d[1:], 0.975)),
                                         "share_positive": float((d[1:] > 0).mean())}
        out[f"within_{t:g}"] = differences
    return out


def aggregate(runs: list[dict], args: argparse.Namespace) -> dict:
    """Across runs, per setting: the geometric mean of the summary speed-ups, and for each max_drop
    target (thresholds chosen on validation only): how often it held on test (with the shortfalls of
    those that did not) and the geometric mean of its test speed-up."""
    out = {}
    for name in runs[0]["settings"]:
        entry: dict = {f"geomean_best_speedup_within_{t:g}": float(np.exp(np.mean(
            [np.log(r["settings"][name][f"best_speedup_within_{t:g}"]) for r in runs]))) for t in args.tolerances}
        for d in args.max_drops:
            held, missed, unreachable, speedups = 0, [], 0, []
            for r in runs:
                for seed in r["settings"][name]["seeds"].values():
                    point = next(p for p in seed["points"] if p["kind"] == "max_drop" and p["value"] == d)
                    if "error" in point:
                        unreachable += 1
                        continue
                    speedups.append(point["test_speedup"])
                    if point["held"]:
                        held += 1
                    else:
                        missed.append(r["test_deepest_accuracy"] - d - point["test_accuracy"])
            entry[f"max_drop_{d:g}"] = {"held": held, "missed": len(missed), "unreachable_on_val": unreachable,
                                        "shortfalls": missed, "geomean_test_speedup":
                                        float(np.exp(np.mean(np.log(speedups)))) if speedups else None}
        out[name] = entry
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=RUNS)
    p.add_argument("--min-thresholds", type=float, nargs="+", default=MIN_THRESHOLDS)
    p.add_argument("--max-drops", type=float, nargs="+", default=MAX_DROPS)
    p.add_argument("--betas", type=float, nargs="+", default=BETAS)
    p.add_argument("--tolerances", type=float, nargs="+", default=TOLERANCES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--fallback", choices=["auto", "ensemble", "deepest"], default="auto",
                   help="answer of samples that pass no threshold; auto: per run, the ensemble unless its "
                        "(uncalibrated) validation accuracy is below the deepest exit's")
    p.add_argument("--generations", type=int, default=100)
    p.add_argument("--bits", type=int, default=30, help="bits per threshold of the GA")
    p.add_argument("--bootstrap", type=int, default=1000, help="test resamples for the noise of each difference")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "threshold_choices.json"))
    p.add_argument("--report", metavar="JSON", help="only aggregate and print a saved result again (no search)")
    args = p.parse_args()
    if args.report:
        report = json.loads(Path(args.report).read_text())
        saved = argparse.Namespace(**{k: report[k] for k in ("max_drops", "tolerances")})
        report["aggregate"] = aggregate(report["runs"], saved) if report["runs"] else {}
        print_tables(report)
        return
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    runs, skipped = [], {}
    for run in args.runs:
        print(f"{run}:", flush=True)
        try:
            runs.append(evaluate_run(run, args))
        except Exception as exc:  # a run that does not load or whose outputs cannot be computed: reported
            skipped[run] = f"{type(exc).__name__}: {exc}"
            print(f"  skipped: {skipped[run]}", flush=True)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads, "
                   f"cuda={torch.cuda.is_available()}",
        "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
        "timm_scan": str(Path(timm_scan.__file__).parent),
        "ga": {"bits": args.bits, "population": 64, "generations": args.generations, "seeds": args.seeds},
        "min_thresholds": args.min_thresholds, "max_drops": args.max_drops, "betas": args.betas,
        "tolerances": args.tolerances, "seconds": time.perf_counter() - started, "skipped": skipped,
        "aggregate": aggregate(runs, args) if runs else {}, "runs": runs,
    }
    print_tables(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} ({report['seconds']:.0f} s)")


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "x") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def print_tables(report: dict) -> None:
    runs = report["runs"]
    if not runs:
        return
    names = list(runs[0]["settings"])
    short = {r["run"]: r["run"].removeprefix("runs/sd/") for r in runs}
    for t in report["tolerances"]:
        print(f"\nlargest test MACs speed-up at test accuracy ≥ deepest − {t:g} (mean of GA seeds; per seed)")
        print("| run | fallback | deepest test | " + " | ".join(names) + " |")
        print("| --- | --- | --- | " + " | ".join("---" for _ in names) + " |")
        for r in runs:
            cells = []
            for n in names:
                s = r["settings"][n]
                seeds = "/".join(_fmt(v["best_speedup_within_" + f"{t:g}"], ".2f", "") for v in s["seeds"].values())
                cells.append(f"{_fmt(s[f'best_speedup_within_{t:g}'])} ({seeds})")
            print(f"| {short[r['run']]} | {r['fallback']} | {r['test_deepest_accuracy']:.2f}% | "
                  + " | ".join(cells) + " |")
    for d in report["max_drops"]:
        print(f"\ntarget max_drop = {d:g} on validation → test speed-up per seed "
              f"(✗: test acc < deepest test − {d:g})")
        print("| run | " + " | ".join(names) + " |")
        print("| --- | " + " | ".join("---" for _ in names) + " |")
        for r in runs:
            cells = []
            for n in names:
                tgt = r["settings"][n]["targets"][f"{d:g}"]
                cells.append(" ".join("miss-val" if v is None else f"{v:.2f}{'' if h else '✗'}"
                                      for v, h in zip(tgt["test_speedup"], tgt["held"])))
            print(f"| {short[r['run']]} | " + " | ".join(cells) + " |")
    print("\nECE on test per exit (shallowest first), before → after; temperatures fitted on validation")
    print("| run | ECE before | ECE after | temperatures |")
    print("| --- | --- | --- | --- |")
    for r in runs:
        ece = r["ece"]["test"]
        print(f"| {short[r['run']]} | {' '.join(f'{e:.3f}' for e in ece['before'])} | "
              f"{' '.join(f'{e:.3f}' for e in ece['after'])} | {' '.join(f'{x:.2f}' for x in r['temperatures'])} |")
    for t in report["tolerances"]:
        print(f"\npaired test bootstrap of the seed-mean summary (within {t:g}): observed difference [95% interval]")
        keys = list(runs[0]["bootstrap"][f"within_{t:g}"])
        print("| run | " + " | ".join(keys) + " |")
        print("| --- | " + " | ".join("---" for _ in keys) + " |")
        for r in runs:
            b = r["bootstrap"][f"within_{t:g}"]
            print(f"| {short[r['run']]} | " + " | ".join(
                f"{b[k]['observed']:+.3f} [{b[k]['low95']:+.3f}, {b[k]['high95']:+.3f}]" for k in keys) + " |")
    print("\nacross runs: geometric mean of the summary; max_drop targets held on test / searched "
          "(largest shortfall, points) and the geometric mean of their test speed-up")
    print("| setting | " + " | ".join(f"geomean within {t:g}" for t in report["tolerances"]) + " | "
          + " | ".join(f"held at {d:g}" for d in report["max_drops"]) + " |")
    print("| --- | " + " | ".join("---" for _ in report["tolerances"]) + " | "
          + " | ".join("---" for _ in report["max_drops"]) + " |")
    for name, a in report["aggregate"].items():
        held = [a[f"max_drop_{d:g}"] for d in report["max_drops"]]
        geomeans = [a[f"geomean_best_speedup_within_{t:g}"] for t in report["tolerances"]]
        print(f"| {name} | " + " | ".join(f"{g:.3f}x" for g in geomeans)
              + " | " + " | ".join(f"{h['held']}/{h['held'] + h['missed']}"
                                   + (f" (−{max(h['shortfalls']):.2f} at most)" if h["shortfalls"] else "")
                                   + (f", {h['geomean_test_speedup']:.2f}x" if h.get("geomean_test_speedup") else "")
                                   for h in held) + " |")


if __name__ == "__main__":
    main()
