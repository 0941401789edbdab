"""Load and fault benchmark of ``timm-scan serve``: the early-exit service against the plain backbone served
the same way (Ray Serve, the same per-section batching settings, the same preprocessing), under open-loop
Poisson traffic from a bounded asyncio client on 127.0.0.1.

Each request sends one CIFAR-10 test image, JPEG as stored (``--per-request N``: N of them, base64 in one
``/predict_batch`` request), and the answers are scored against their labels.
At each offered rate the client sends for ``--duration`` seconds (at most ``--max-requests``) and then
waits for the answers (each at most ``--timeout`` seconds); a rate is sustained when its p99 latency is
within ``--p99-ms`` and at least 99% of its requests were answered. The offline batch-256 wall-clock
speed-up of the same model and policy (`measure_wall_clock`, in this process) is measured beside it, on
the same number of torch threads as a replica.

``--fault`` instead serves the early-exit model on two replicas at one rate, sends one malformed body in
ten, kills one replica mid-run and counts what came back: answers, the 4xx the malformed bodies must get,
other errors, and requests lost (no answer within the timeout; the goal is 0), with the time until the
service runs two healthy replicas again.

    python benchmarks/serve_load.py --model runs/exit_positions/cert-resnet18-45k/stage-ends \\
        --thresholds 0.8667 0.8 0.4 --rates 50 100 200 300 400 --out benchmarks/results/serve_load_resnet18.json
    python benchmarks/serve_load.py --random resnet18 --size 224 --rates 5 10 20 30 \\
        --out benchmarks/results/serve_load_224.json
    python benchmarks/serve_load.py --model ... --thresholds ... --fault --rates 100 \\
        --out benchmarks/results/serve_fault.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import math
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import datasets
import timm
import torch

import timm_scan
from timm_scan import EarlyExitPredictor, ExitPolicy
from timm_scan.commands.evaluate import measure_wall_clock
from timm_scan.serve.app import decode, load
from timm_scan.training.data import eval_transform

CIFAR_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "test.parquet"


def test_images(n: int) -> tuple[list[bytes], list[int]]:
    """The first ``n`` CIFAR-10 test images as stored (encoded JPEG) and their labels."""
    data = datasets.load_dataset("parquet", data_files={"test": str(CIFAR_TEST)}, split="test")
    data = data.cast_column("img", datasets.Image(decode=False)).select(range(n))
    return [row["img"]["bytes"] for row in data], list(data["label"])


def served_folder(args: argparse.Namespace, bodies: list[bytes], root: Path) -> Path:
    """A folder to serve: ``--model`` with ``--thresholds`` (fallback ``--fallback``) as its policy, or a
    ``--random`` model at ``--size`` whose thresholds send ``--shares`` of these images out at its shallow exits
    (costs only: its answers mean nothing)."""
    if args.model:
        model = timm_scan.from_pretrained(args.model / "best" if (args.model / "best").is_dir() else args.model)
        model.policy = ExitPolicy(args.thresholds, args.fallback)
    else:
        torch.manual_seed(0)
        model = timm_scan.wrap(timm.create_model(args.random, pretrained=False, num_classes=10),
                               check_input_size=(3, args.size, args.size)).eval()
        model.data_config = {**timm.data.resolve_model_data_config(model.backbone), "input_size": (3, args.size, args.size),
                             "crop_pct": 1.0}
        x = torch.stack([eval_transform(model.data_config)(decode(b, 3)) for b in bodies[:64]])
        with torch.no_grad():
            confidence = [torch.softmax(z, -1).amax(-1) for z in model(x).logits]
        thresholds, left = [], torch.ones(len(x), dtype=torch.bool)
        for c, share in zip(confidence[:-1], args.shares):  # each exit takes `share` of the images still running
            t = torch.quantile(c[left], 1 - share).item() if left.any() else 1.0
            thresholds.append(t)
            left &= ~(c > t)
        model.policy = ExitPolicy(thresholds, "deepest")
    model.eval().save_pretrained(root / "served")
    return root / "served"


async def open_loop(url: str, bodies: list[bytes], rate: float, duration: float, max_requests: int, timeout: float,
                    seed: int, fault: bool = False, per_request: int = 1) -> list[dict]:
    """Poisson arrivals at ``rate`` requests a second for ``duration`` seconds (at most ``max_requests``); each
    request sends the next body (``per_request`` > 1: that many, base64 in one ``/predict_batch`` request;
    ``fault``: every tenth request is malformed) and records when it left, its status, its latency and the
    answered images (``(index into bodies, label, exit)``). Returns once every request is answered or timed out."""
    rng = random.Random(seed)
    records: list[dict] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def send(i: int, sent_at: float) -> None:
            malformed = fault and i % 10 == 9
            indices = [(i * per_request + j) % len(bodies) for j in range(per_request)]
            if per_request == 1:
                path, kind, body = "/predict", "image/jpeg", bodies[indices[0]]
            else:
                images = [base64.b64encode(bodies[j]).decode() for j in indices]
                path, kind, body = "/predict_batch", "application/json", json.dumps({"images": images}).encode()
            if malformed:
                body = b"\xff\xd8 a truncated JPEG"
            record = {"i": i, "sent": sent_at, "malformed": malformed, "images": per_request, "answered": []}
            started = time.perf_counter()
            try:
                async with session.post(f"{url}{path}", data=body, headers={"Content-Type": kind}) as r:
                    record["status"], text = r.status, await r.text()
                if r.status == 200:
                    answers = json.loads(text)
                    answers = answers["answers"] if per_request > 1 else [answers]
                    record["answered"] = [(j, a["label"], a["exit"]) for j, a in zip(indices, answers) if "label" in a]
            except asyncio.TimeoutError:
                record["status"] = "timeout"
            except aiohttp.ClientError as exc:
                record["status"] = f"connection: {type(exc).__name__}"
            record["latency"] = time.perf_counter() - started
            records.append(record)

        tasks, start, at = [], time.perf_counter(), 0.0
        for i in range(max_requests):
            at += rng.expovariate(rate)
            if at > duration:
                break
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(send(i, time.perf_counter() - start)))
        await asyncio.gather(*tasks)
    return sorted(records, key=lambda r: r["i"])


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)] if values else float("nan")


def summary(records: list[dict], labels: list[int], rate: float, duration: float, num_exits: int) -> dict:
    """Throughput (images answered a second), latency quantiles (answered requests), accuracy and exit shares
    (answered images) at one offered rate."""
    good = [r for r in records if not r["malformed"]]
    answered = [r for r in good if r["status"] == 200]
    images = [item for r in answered for item in r["answered"]]
    latency = [r["latency"] for r in answered]
    span = max((r["sent"] + r["latency"] for r in answered), default=duration)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"offered_per_s": rate, "sent": len(records), "statuses": statuses,
            "answered_share": len(images) / max(1, sum(r["images"] for r in good)),
            "throughput_per_s": len(images) / span, "p50_ms": 1000 * quantile(latency, 0.5),
            "p99_ms": 1000 * quantile(latency, 0.99), "mean_ms": 1000 * statistics.fmean(latency) if latency else None,
            "accuracy": statistics.fmean(label == labels[j] for j, label, _ in images) if images else None,
            "exit_shares": [sum(e == k for _, _, e in images) / max(1, len(images)) for k in range(num_exits)]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_service(folder: Path, plain: bool, args: argparse.Namespace, bodies: list[bytes], labels: list[int],
                    port: int) -> list[dict]:
    """Serve ``folder`` (``plain``: its backbone alone) and run the open loop at every rate, in turn."""
    from ray import serve

    prefix = "/plain" if plain else "/early-exit"
    timm_scan.serve.run(folder, host="127.0.0.1", port=port, plain=plain, replica_cpus=args.replica_cpus,
                        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, route_prefix=prefix,
                        blocking=False)
    url = f"http://127.0.0.1:{port}{prefix}"
    asyncio.run(open_loop(url, bodies, 20, 2.0, 40, args.timeout, seed=1))  # warm-up: connections, allocator
    num_exits = load(folder, plain).num_exits
    rows = []
    for rate in args.rates:
        records = asyncio.run(open_loop(url, bodies, rate, args.duration, args.max_requests, args.timeout, seed=0,
                                        per_request=args.per_request))
        rows.append(summary(records, labels, rate, args.duration, num_exits))
        print(("plain      " if plain else "early exit ") + json.dumps({k: rows[-1][k] for k in (
            "offered_per_s", "throughput_per_s", "p50_ms", "p99_ms", "answered_share", "accuracy")}), flush=True)
    serve.delete("timm-scan" + prefix.replace("/", "-"))
    return rows


def sustained(rows: list[dict], p99_ms: float) -> float | None:
    """The highest offered rate whose p99 is within the target with at least 99% of requests answered."""
    ok = [r["offered_per_s"] for r in rows if r["p99_ms"] <= p99_ms and r["answered_share"] >= 0.99]
    return max(ok) if ok else None


def offline(folder: Path, bodies: list[bytes], threads: int, n: int) -> dict:
    """The predictor and the plain backbone on the same ``n`` images, batch 256, on ``threads`` torch threads."""
    torch.set_num_threads(threads)
    model = timm_scan.from_pretrained(folder).eval()
    transform = eval_transform(model.data_config)
    images = torch.stack([transform(decode(b, 3)) for b in bodies[:n]])
    timing = measure_wall_clock(model, EarlyExitPredictor(model), images, 256)
    return {**timing.to_dict(), "speedup": timing.speedup}


def fault_run(folder: Path, args: argparse.Namespace, bodies: list[bytes], labels: list[int], port: int) -> dict:
    """Two replicas at ``args.rates[0]``, a malformed body in ten, one replica killed a third of the way in."""
    import ray
    from ray import serve

    timm_scan.serve.run(folder, host="127.0.0.1", port=port, replicas=2, replica_cpus=args.replica_cpus,
                        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, blocking=False)
    url = f"http://127.0.0.1:{port}"
    asyncio.run(open_loop(url, bodies, 20, 2.0, 40, args.timeout, seed=1))
    killed: dict = {}

    async def kill_later() -> None:
        await asyncio.sleep(args.duration / 3)
        name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::"))
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        killed.update(name=name, at=time.perf_counter())
        while True:  # until the controller runs two replicas again, one of them new
            await asyncio.sleep(0.2)
            alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("SERVE_REPLICA::")}
            status = serve.status().applications["timm-scan"].deployments["EarlyExitService"]
            if len(alive) == 2 and name not in alive and status.replica_states.get("RUNNING", 0) == 2:
                killed["recovered_s"] = time.perf_counter() - killed["at"]
                return

    async def both() -> list[dict]:
        recover = asyncio.create_task(kill_later())
        records = await open_loop(url, bodies, args.rates[0], args.duration, args.max_requests, args.timeout, seed=0,
                                  fault=True)
        await asyncio.wait_for(recover, 120)
        return records

    records = asyncio.run(both())
    serve.delete("timm-scan")
    malformed = [r for r in records if r["malformed"]]
    good = [r for r in records if not r["malformed"]]
    return {"rate": args.rates[0], "duration_s": args.duration, "killed": killed["name"],
            "recovered_s": killed.get("recovered_s"), "sent": len(records),
            "lost": sum(r["status"] == "timeout" or str(r["status"]).startswith("connection") for r in records),
            "malformed_sent": len(malformed),
            "malformed_statuses": sorted({str(r["status"]) for r in malformed}),
            "good_answered": sum(r["status"] == 200 for r in good),
            "good_errors": {s: sum(str(r["status"]) == s for r in good) for s in {str(r["status"]) for r in good} - {"200"}},
            "load": summary(records, labels, args.rates[0], args.duration, load(folder).num_exits)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="a trained run or model folder")
    which.add_argument("--random", help="a timm model with random weights (costs only)")
    p.add_argument("--thresholds", type=float, nargs="+", help="with --model: the policy's thresholds")
    p.add_argument("--fallback", default="deepest", choices=["deepest", "ensemble"])
    p.add_argument("--size", type=int, default=224, help="with --random: the input side")
    p.add_argument("--shares", type=float, nargs="+", default=[0.45, 0.3, 0.35],
                   help="with --random: the share of the images still running that each shallow exit takes")
    p.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200])
    p.add_argument("--duration", type=float, default=20.0, help="seconds of sending at each rate")
    p.add_argument("--max-requests", type=int, default=20000)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request waits for its answer at most")
    p.add_argument("--p99-ms", type=float, default=500.0, help="the p99 latency target")
    p.add_argument("--images", type=int, default=2000, help="test images sent in turn")
    p.add_argument("--offline-images", type=int, default=1024, help="images the offline speed-up is timed on")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--per-request", type=int, default=1,
                   help="images in each request (above 1: base64 in one /predict_batch request); rates count requests")
    p.add_argument("--fault", action="store_true", help="the fault run instead of the load comparison")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.model and not args.thresholds:
        p.error("--model needs --thresholds")
    import ray

    bodies, labels = test_images(args.images)
    record = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} "
              "torch threads in this process", "timm": timm.__version__, "torch": torch.__version__,
              "ray": ray.__version__, "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = served_folder(args, bodies, Path(tmp))
        record["policy"] = timm_scan.from_pretrained(folder).policy.to_dict()
        ray.init(num_cpus=8, include_dashboard=False, configure_logging=False, log_to_driver=False)
        port = free_port()
        try:
            if args.fault:
                record["fault"] = fault_run(folder, args, bodies, labels, port)
            else:
                threads = max(1, math.floor(args.replica_cpus))
                record["offline_batch_256"] = offline(folder, bodies, threads, args.offline_images)
                record["early_exit"] = measure_service(folder, False, args, bodies, labels, port)
                record["plain"] = measure_service(folder, True, args, bodies, labels, port)
                ee, plain = sustained(record["early_exit"], args.p99_ms), sustained(record["plain"], args.p99_ms)
                record["sustained_per_s"] = {"early_exit": ee, "plain": plain}
                offline_speedup = record["offline_batch_256"]["speedup"]
                if ee and plain:
                    record["sustained_speedup"] = ee / plain
                    record["share_of_offline_speedup"] = ee / plain / offline_speedup
                peak = [max(r["throughput_per_s"] for r in record[k]) for k in ("early_exit", "plain")]
                record["peak_throughput_per_s"] = {"early_exit": peak[0], "plain": peak[1]}
                record["peak_speedup"] = peak[0] / peak[1]
                record["peak_share_of_offline_speedup"] = peak[0] / peak[1] / offline_speedup
        finally:
            from ray import serve
            serve.shutdown()
            ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record.get(k) for k in ("sustained_per_s", "sustained_speedup", "share_of_offline_speedup",
                                                 "peak_throughput_per_s", "peak_speedup",
                                                 "peak_share_of_offline_speedup", "offline_batch_256", "fault")},
                     indent=1))


if __name__ == "__main__":
    main()
