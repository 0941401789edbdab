"""Untrusted folders fuzzed at length: does every damaged folder give a ``ValueError`` that names the file?

Two targets, each a folder a user may be handed: a saved model (``from_pretrained``: timm ``test_resnet``,
4 classes, as ``tests/test_untrusted.py`` saves it) and an ONNX export (``OnnxEarlyExitPredictor``:
``test_resnet``, 5 classes, as ``tests/test_onnx.py`` exports it). Each case copies the intact folder and
spoils it once with the target's mutation (`mutate_saved`, `mutate_onnx`: the fuzz tests' own, which
run 80 and 60 such cases): one JSON field changed or deleted, a size field grown, a field nested deep,
a tensor changed and saved with its checksum, a few bytes overwritten, or two graphs swapped in an
export without checksums (format 3). Then it loads the folder and, where that works, asks it for an
answer. Per case: the kind of mutation, the file(s) a refusal must name, the outcome (``loaded`` /
``answered`` with finite answers, or the exception's type), whether a refusal named the file, the wall
time of loading and answering, and the largest resident memory above the case's start (psutil sampled
every 5 ms). Findings, listed with their messages: any exception but a ``ValueError``, a refusal that does
not name the file, a refusal after more than ``--slow`` seconds, an answer that is not finite or has the
wrong shape, and (ONNX) a damaged graph that loads.

    python benchmarks/fuzz_folders.py                      # 5000 cases per target, about 8 minutes on 2 cores
    python benchmarks/fuzz_folders.py --cases 50 --targets onnx --out /tmp/fuzz.json   # a quick look

Case ``i`` of either target spoils its copy with ``random.Random(seed * 1_000_000 + i)``: a finding is
replayed with ``mutate_saved(folder, random.Random(rng_seed))`` (or ``mutate_onnx``) on a fresh copy, and
``--keep-findings DIR`` keeps each finding's folder.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

HERE = Path(__file__).parent

# ------------------------------------------------------------------ mutations (the fuzz tests' too)


def mutations(value: Any, rng: random.Random) -> list[Any]:
    """Malformed variants of a JSON value."""
    return [None, "x", -1, 0, 10**12, 1e300, float("nan"), [], {}, [value], {"v": value}, True, rng.random()]


def fuzz_json(data: Any, rng: random.Random) -> Any:
    """``data`` with one field somewhere replaced by a malformed value, or deleted."""
    data = json.loads(json.dumps(data))
    node = data
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return data
        key = rng.choice(keys)
        if isinstance(node[key], (dict, list)) and node[key] and rng.random() < 0.5:
            node = node[key]
            continue
        if isinstance(node, dict) and rng.random() < 0.2:
            del node[key]
        else:
            node[key] = rng.choice(mutations(node[key], rng))
        return data


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def save_weights(folder: Path, file: str, state: dict[str, torch.Tensor]) -> None:
    """Write ``state`` as ``folder/file`` and record its SHA-256, as saving would: the checks behind the
    checksum, for weights a folder's author wrote."""
    save_file(state, str(folder / file))
    edit_json(folder / "scan_config.json",
              lambda d: d["sha256"].update({file: hashlib.sha256((folder / file).read_bytes()).hexdigest()}))


def overwrite_bytes(path: Path, rng: random.Random, count: int, header: int = 0) -> None:
    """``count`` bytes of ``path`` overwritten at random places, each (with ``header``) half of the time
    within the first ``header`` bytes."""
    data = bytearray(path.read_bytes())
    for _ in range(count):
        at = rng.randrange(min(len(data), header)) if header and rng.random() < 0.5 else rng.randrange(len(data))
        data[at] = rng.randrange(256)
    path.write_bytes(bytes(data))


SIZE_FIELDS = [("config.json", lambda d, rng: d["model_args"].update(layers=[rng.choice([2, 10**3, 10**5]), 1, 1, 1])),
               ("config.json", lambda d, rng: d["model_args"].update(num_classes=rng.choice([5, 10**6, 10**9]))),
               ("scan_config.json", lambda d, rng: d["scan_config"].update(head_channels=rng.choice([8, 4096, 16384]))),
               ("scan_config.json", lambda d, rng: d["scan_config"].update(head_blocks=rng.choice([2, 16, 32])))]
SAVED_KINDS = ["config.json", "scan_config.json", "tensor", "bytes", "size", "nested"]
ONNX_KINDS = ["manifest", "bytes", "swap"]


def mutate_saved(folder: Path, rng: random.Random) -> tuple[str, tuple[str, ...]]:
    """Spoil a saved model ``folder`` in place: one field, tensor or a few bytes of one file changed, a size
    field grown, or a field nested deep. Changed tensors are saved with their checksum (a folder's author
    wrote them); changed bytes are not (damage). The kind of change, and the file a refusal must name."""
    kind = rng.choice(SAVED_KINDS)
    if kind.endswith(".json"):
        file = folder / kind
        file.write_text(json.dumps(fuzz_json(json.loads(file.read_text()), rng)))
    elif kind == "size":
        name, change = rng.choice(SIZE_FIELDS)
        file = folder / name
        edit_json(file, lambda d: change(d, rng))
    elif kind == "nested":
        file = folder / rng.choice(["config.json", "scan_config.json"])
        depth = rng.choice([65, 1000, 100_000])
        file.write_text(json.dumps(fuzz_json(json.loads(file.read_text()), rng) | {"deep": "__deep__"})
                        .replace('"__deep__"', "[" * depth + "]" * depth))
    elif kind == "tensor":
        file = folder / rng.choice(["model.safetensors", "scan_exits.safetensors"])
        state = load_file(file)
        name = rng.choice(sorted(state))
        state[name] = rng.choice([lambda t: t.to(torch.int16), lambda t: t.flatten(), lambda t: t * float("inf"),
                                  lambda t: torch.zeros(3)])(state[name])
        save_weights(folder, file.name, state)
    else:
        file = folder / rng.choice(["model.safetensors", "scan_exits.safetensors", "config.json"])
        overwrite_bytes(file, rng, 8, header=200)
    return kind, (file.name,)


def mutate_onnx(folder: Path, rng: random.Random) -> tuple[str, tuple[str, ...]]:
    """Spoil an ONNX export ``folder`` in place: one field of the manifest changed, a few bytes of a graph (or
    its external data) changed, or two graphs (with their external data) swapped in an export without
    checksums (format 3). The kind of change, and the files a refusal may name (any one of them)."""
    graphs = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    manifest = json.loads((folder / "manifest.json").read_text())
    kind = rng.choice(ONNX_KINDS)
    if kind == "manifest":
        (folder / "manifest.json").write_text(json.dumps(fuzz_json(manifest, rng)))
        return kind, ("manifest.json",)
    if kind == "bytes":
        named = rng.choice(graphs)
        overwrite_bytes(folder / named, rng, 4)
        return kind, (named,)
    first, second = rng.sample([g for g in graphs if g.endswith(".onnx")], 2)
    before = {name: (folder / name).read_bytes() for name in (first, second, f"{first}.data", f"{second}.data")
              if (folder / name).is_file()}
    for a, b in ((first, second), (second, first)):
        (folder / a).write_bytes(before[b])
        if f"{b}.data" in before:
            (folder / f"{a}.data").write_bytes(before[f"{b}.data"])
    without_checksums = {k: v for k, v in manifest.items() if k != "sha256"} | {"format_version": 3}
    (folder / "manifest.json").write_text(json.dumps(without_checksums))
    return kind, (first, second, "manifest.json")


# ------------------------------------------------------------------ the intact folders and how each is used


def small_model(classes: str, policy: Any) -> Any:
    """timm ``test_resnet`` (seed 0) with exits, at 32x32, a class per letter of ``classes``, and ``policy``."""
    import timm_scan

    torch.manual_seed(0)
    model = timm_scan.wrap(timm.create_model("test_resnet", num_classes=len(classes)), check_input_size=(3, 32, 32))
    model.class_names, model.policy = list(classes), policy
    model.data_config = timm.data.resolve_model_data_config(model.backbone, args={"input_size": (3, 32, 32)})
    return model.eval()


def saved_folder(folder: Path) -> None:
    """The saved model of ``tests/test_untrusted.py`` (its ``saved`` fixture)."""
    from timm_scan import ExitPolicy

    small_model("abcd", ExitPolicy([0.9, 0.8, 0.7])).save_pretrained(str(folder))


def onnx_folder(folder: Path) -> None:
    """The export of ``tests/test_onnx.py``'s ``exported`` fixture."""
    from timm_scan import ExitPolicy, export_onnx

    export_onnx(small_model("abcde", ExitPolicy([0.5, 0.5, 0.5], "deepest")), folder, (3, 32, 32))


def load_saved(folder: Path) -> Callable[[], str | None]:
    """``from_pretrained``; then its answer: what is wrong with it, or None."""
    import timm_scan

    model = timm_scan.from_pretrained(folder)

    def answer() -> str | None:
        with torch.no_grad():
            logits = model.eval()(torch.randn(2, 3, 32, 32)).logits
        if len(logits) != 4 or model.num_exits != 4:
            return f"{len(logits)} exits' logits, {model.num_exits} exits"
        if not all(z.shape == (2, 4) and torch.isfinite(z).all() for z in logits):
            return (f"logits of shapes {[tuple(z.shape) for z in logits]}, "
                    f"finite: {[bool(torch.isfinite(z).all()) for z in logits]}")
        return None
    return answer


def load_onnx(folder: Path) -> Callable[[], str | None]:
    """``OnnxEarlyExitPredictor``; then its answer: what is wrong with it, or None."""
    import timm_scan

    predictor = timm_scan.OnnxEarlyExitPredictor(folder)

    def answer() -> str | None:
        result = predictor(torch.randn(3, 3, 32, 32))
        if not (torch.isfinite(result.probs).all() and result.labels.shape == (3,)):
            return (f"probs finite: {bool(torch.isfinite(result.probs).all())}, "
                    f"labels of shape {tuple(result.labels.shape)}")
        return None
    return answer


# name: (build the intact folder, mutate a copy, load and answer, the outcome of a folder that answers,
#        the kinds that may load)
TARGETS = {"from_pretrained": (saved_folder, mutate_saved, load_saved, "loaded", SAVED_KINDS),
           "onnx": (onnx_folder, mutate_onnx, load_onnx, "answered", ["manifest"])}


# ------------------------------------------------------------------ measuring


class MemorySampler(threading.Thread):
    """The process's resident memory sampled every ``interval`` seconds (psutil): the largest above the
    value at the last `start_case`."""

    def __init__(self, interval: float = 0.005):
        import psutil

        super().__init__(daemon=True)
        self.process, self.interval = psutil.Process(), interval
        self.base = self.peak = self.process.memory_info().rss
        self.stopped = threading.Event()

    def start_case(self) -> None:
        self.base = self.peak = self.process.memory_info().rss

    def increase(self) -> int:
        self.peak = max(self.peak, self.process.memory_info().rss)
        return self.peak - self.base

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)


class CaseTimeout(Exception):
    pass


def on_alarm(signum, frame):
    raise CaseTimeout("the case ran past --case-timeout")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(target: str, intact: Path, work: Path, case: int, args: argparse.Namespace,
             sampler: MemorySampler | None) -> dict:
    _, mutate, load, works, may_load = TARGETS[target]
    folder = work / f"{target}-{case}"
    shutil.copytree(intact, folder)
    rng_seed = args.seed * 1_000_000 + case
    kind, files = mutate(folder, random.Random(rng_seed))
    row = {"target": target, "case": case, "rng_seed": rng_seed, "kind": kind, "files": list(files)}
    stage = "load"
    if sampler:
        sampler.start_case()
    signal.alarm(args.case_timeout)
    start = time.perf_counter()
    try:
        answer = load(folder)
        stage = "answer"
        wrong = answer()
        row.update(outcome=works if wrong is None else "wrong answer", stage=stage, message=wrong)
    except Exception as exc:  # every outcome is recorded; only a ValueError at load is a refusal
        row.update(outcome=type(exc).__name__, stage=stage, message=str(exc)[:1000],
                   named=any(f in str(exc) for f in files))
        if not isinstance(exc, (ValueError, CaseTimeout)):  # where it was raised
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            row["where"] = f"{frame.filename}:{frame.lineno}"
    finally:
        signal.alarm(0)
        row["seconds"] = time.perf_counter() - start
    if sampler:
        row["rss_increase_mb"] = sampler.increase() / 2**20
    row["finding"] = finding(row, works, may_load, args.slow)
    if row["finding"] and args.keep_findings:
        shutil.copytree(folder, args.keep_findings / folder.name, dirs_exist_ok=True)
    if not row["finding"] and row["outcome"] == works:
        row.pop("message")
    shutil.rmtree(folder)
    return row


def finding(row: dict, works: str, may_load: list[str], slow: float) -> str | None:
    """What is wrong with a case's outcome, or None: a refusal is a ValueError at load, naming the file,
    within ``slow`` seconds; a folder that loads answers, and only a kind in ``may_load`` loads."""
    if row["outcome"] == works:
        return None if row["kind"] in may_load else f"a {row['kind']} case loaded"
    if row["outcome"] == "wrong answer":
        return "loaded, but the answer is wrong"
    if row["outcome"] != "ValueError":
        return f"{row['outcome']} at {row['stage']}"
    if row["stage"] != "load":
        return "ValueError when answering, after loading"
    if not row["named"]:
        return "the refusal does not name the file"
    if row["seconds"] > slow:
        return f"refused after {row['seconds']:.1f} s"
    return None


def summary(rows: list[dict], works: dict[str, str]) -> dict:
    per_kind = []
    for target in dict.fromkeys(r["target"] for r in rows):
        for kind in sorted({r["kind"] for r in rows if r["target"] == target}):
            mine = [r for r in rows if r["target"] == target and r["kind"] == kind]
            seconds = [r["seconds"] for r in mine]
            per_kind.append({
                "target": target, "kind": kind, "cases": len(mine),
                "refused": sum(r["outcome"] == "ValueError" for r in mine),
                works[target]: sum(r["outcome"] == works[target] for r in mine),
                "other": sum(r["outcome"] not in ("ValueError", works[target]) for r in mine),
                "not_named": sum(r["outcome"] == "ValueError" and not r["named"] for r in mine),
                "findings": sum(bool(r["finding"]) for r in mine),
                "median_seconds": statistics.median(seconds), "max_seconds": max(seconds),
                "max_rss_increase_mb": max((r.get("rss_increase_mb", 0.0) for r in mine), default=0.0)})
    outcomes = {t: dict(Counter(r["outcome"] for r in rows if r["target"] == t).most_common()) for t in works}
    slowest = sorted(rows, key=lambda r: -r["seconds"])[:10]
    biggest = max(rows, key=lambda r: r.get("rss_increase_mb", 0.0))
    keep = ("target", "case", "rng_seed", "kind", "files", "outcome", "seconds", "rss_increase_mb")
    return {"cases": {t: sum(r["target"] == t for r in rows) for t in works},
            "outcomes": outcomes,
            "per_kind": per_kind,
            "findings": [r for r in rows if r["finding"]],
            "not_named": [r for r in rows if r["outcome"] == "ValueError" and not r["named"]],
            "slowest": [{k: r[k] for k in keep if k in r} for r in slowest],
            "largest_rss_increase": {k: biggest[k] for k in keep if k in biggest}}


def fuzz(args: argparse.Namespace, sampler: MemorySampler | None) -> tuple[list[dict], float]:
    """Every case of every target; and the peak RSS (MB) before the first case."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fuzz-folders-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        work = Path(tmp)
        intact = {}
        for target in args.targets:
            build, _, load, _, _ = TARGETS[target]
            intact[target] = work / f"{target}-intact"
            build(intact[target])
            assert load(intact[target])() is None, f"the intact {target} folder does not answer"  # and warm
        rss_before = peak_rss_mb()
        bar = tqdm(total=args.cases * len(args.targets), desc="fuzz cases")
        for target in args.targets:
            for case in range(args.cases):
                rows.append(run_case(target, intact[target], work, case, args, sampler))
                bar.update()
                if rows[-1]["finding"]:
                    bar.set_postfix(findings=sum(bool(r["finding"]) for r in rows))
                    tqdm.write(f"finding: {target} case {case} ({rows[-1]['kind']}, {rows[-1]['files']}): "
                               f"{rows[-1]['finding']}: {rows[-1].get('message')}")
        bar.close()
    return rows, rss_before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=5000, help="mutated folders per target")
    p.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=list(TARGETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow", type=float, default=10.0, help="a refusal later than this (seconds) is a finding")
    p.add_argument("--case-timeout", type=int, default=120,
                   help="seconds before a case is stopped (a finding); 0: never")
    p.add_argument("--keep-findings", type=Path, help="copy each finding's folder here")
    p.add_argument("--keep-cases", action="store_true", help="store every case in the JSON, not only findings")
    p.add_argument("--out", type=Path, default=HERE / "results" / "fuzz_folders.json")
    args = p.parse_args()
    if args.keep_findings:
        args.keep_findings.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    from timm_scan.deploy.latency import processor_name

    if "onnx" in args.targets:  # refusals are counted here; ONNX Runtime's own log of each would bury the bar
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)
    try:
        sampler = MemorySampler()
        sampler.start()
    except ImportError:
        sampler = None
    # the alarm stops a case; whoever set one before (pytest-timeout) gets it back afterwards
    previous, pending, since = signal.signal(signal.SIGALRM, on_alarm), signal.alarm(0), time.monotonic()
    try:
        rows, rss_before = fuzz(args, sampler)
    finally:
        signal.signal(signal.SIGALRM, previous)
        if pending:
            signal.alarm(max(1, pending - int(time.monotonic() - since)))
        if sampler:
            sampler.stopped.set()
    works = {t: TARGETS[t][3] for t in args.targets}
    result = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "date": started.strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{processor_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                         f"{platform.machine()}, torch {torch.__version__.split('+')[0]}, timm {timm.__version__}, "
                         f"onnxruntime {version('onnxruntime')}, python {platform.python_version()}",
              "seed": args.seed, "cases_per_target": args.cases, "slow_seconds": args.slow,
              "seconds": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
              "memory": {"peak_rss_mb_before_cases": rss_before, "peak_rss_mb": peak_rss_mb(),
                         "case_rss_sampler": "psutil, every 5 ms" if sampler else None},
              **summary(rows, works)}
    if args.keep_cases:
        result["all_cases"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for row in result["per_kind"]:
        print(f"{row['target']:>15} {row['kind']:>16}: {row['cases']:5d} cases, {row['refused']:5d} refused, "
              f"{row[works[row['target']]]:4d} {works[row['target']]}, {row['other']} other, {row['not_named']} not "
              f"naming the file; median {row['median_seconds']:.3f} s, max {row['max_seconds']:.2f} s, "
              f"+{row['max_rss_increase_mb']:.0f} MB")
    slowest = result["slowest"][0]
    print(f"outcomes: {result['outcomes']}; {len(result['findings'])} findings; slowest: {slowest['target']} "
          f"{slowest['kind']} {slowest['files']} {slowest['seconds']:.2f} s; peak RSS {peak_rss_mb():.0f} MB "
          f"({rss_before:.0f} MB before the cases); wrote {args.out}")


if __name__ == "__main__":
    main()
