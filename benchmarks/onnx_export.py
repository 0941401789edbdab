"""Does the early-exit speed-up survive export to ONNX? And which families export?

Speed: resnet18 (random weights: speed does not depend on them) with the default exits (``--head``:
either kind of exit head), exported with ``export_onnx``; the plain backbone exported as one ONNX
graph. The first exit's threshold is the median of its confidence on the images, so half of them
leave there and the other half runs every section (the setting of ``early_exit_speed.py``). For each
input and batch size, timed in turns (``wall_clocks``): the exported plain backbone, the ONNX Runtime
predictor, the torch backbone and the torch predictor, and two breakdowns of the ONNX predictor's
cost: its section graphs run one after another without the policy ("onnx sections in turn": the cost
of cutting the backbone into graphs), and its section and exit graphs so ("onnx graphs in turn": the
graph calls of a sample that reaches the end, without the torch work between them). The exported
backbone runs with onnxruntime's default options (its pool spins between runs), the predictor's
graphs with ``session_options()`` (pools that spin within a run and stop when it returns), or all of
them in one global pool (``--global-thread-pool``). Ratio: the ONNX predictor's measured speed-up
over the exported backbone / the MACs speed-up (1.0: the saving fully realised).

Coverage (``--families``): every model family of the test suite exported, its answers compared with the
torch predictor's on a mixed batch.

    python benchmarks/onnx_export.py                      # speed at 32x32, batch 1 and 256
    python benchmarks/onnx_export.py --families           # and every family of the test suite
    python benchmarks/onnx_export.py --families --sizes --out benchmarks/results/onnx_coverage.json  # only those
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import timm
import torch

import timm_scan
from timm_scan.deploy import wall_clocks
from timm_scan.deploy.onnx import session_options, use_global_thread_pool
from timm_scan.model.config import HEAD_KINDS

GLOBAL_POOL = "--global-thread-pool" in sys.argv  # before any session: the pool is set once per process
if GLOBAL_POOL:
    use_global_thread_pool()

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))
from families import FAMILIES as CNN_FAMILIES  # noqa: E402  (the test suite's lists)
from families import FAMILIES_NOT_IN_ORDER  # noqa: E402
from helpers import mixing_thresholds  # noqa: E402

# (model, timm.create_model kwargs, input side): every family of the test suite
FAMILIES = [(name, {}, size) for name, size in CNN_FAMILIES] + [
    (name, kwargs, size) for name, kwargs, size, _ in FAMILIES_NOT_IN_ORDER]


def half_at_exit_1(model: timm_scan.MultiExitModel, x: torch.Tensor) -> list[float]:
    with torch.no_grad():
        first = torch.softmax(model.exit_logits(0, model.forward_section(0, x), tuple(x.shape[-2:])), -1).amax(-1)
    return [first.median().item()] + [1.0] * (model.num_exits - 2)


def plain_backbone_session(model: torch.nn.Module, size: int, folder: Path,
                           options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """``model`` exported as one graph (dynamic batch) into ``folder``, in a session with ``options``
    (default: onnxruntime's own, or with ``--global-thread-pool`` the predictor's `session_options`)."""
    path = folder / "backbone.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, size, size),), str(path), input_names=["input"],
                          output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True)
    if options is None:
        options = ort.SessionOptions() if not GLOBAL_POOL else session_options()
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def graphs_in_turn(predictor: timm_scan.OnnxEarlyExitPredictor, heads: bool) -> Callable[[torch.Tensor], None]:
    """Every section graph of ``predictor`` (and with ``heads`` every exit head's) run one after another
    on the whole batch, without the early-exit policy: the graph calls of a sample that reaches the
    end, apart from the torch work between them."""
    def run(batch: torch.Tensor) -> None:
        h = batch.numpy()
        for section, head_graph in zip(predictor.sections, predictor.exits):
            h = section.run(None, {"input": h})[0]
            if heads:
                head_graph.run(None, {"input": h})
    return run


def speed(size: int, batch_sizes: list[int], repeats: int, n_images: int | None, head: str) -> list[dict]:
    torch.manual_seed(0)
    model = timm_scan.wrap(timm.create_model("resnet18", num_classes=10), timm_scan.ScanConfig.papers(head=head),
                           check_input_size=(3, size, size)).eval()  # the heads RESULTS §12 timed (default until 2026-12-06)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        export_onnx_seconds = time.perf_counter()
        timm_scan.export_onnx(model, folder / "exits", (3, size, size))
        export_onnx_seconds = time.perf_counter() - export_onnx_seconds
        backbone = plain_backbone_session(model.backbone, size, folder)
        for bs in batch_sizes:
            images = n_images or (256 if bs == 1 else 1024)
            x = torch.randn(images, 3, size, size)
            policy = timm_scan.ExitPolicy(half_at_exit_1(model, x))
            onnx_predictor = timm_scan.OnnxEarlyExitPredictor(folder / "exits", policy)
            torch_predictor = timm_scan.EarlyExitPredictor(model, policy)
            result = onnx_predictor(x)
            macs_speedup = model.backbone_macs((3, size, size)) / result.macs.double().mean().item()
            seconds = wall_clocks({
                "onnx backbone": lambda b: backbone.run(None, {"input": b.numpy()}),
                "onnx early exit": onnx_predictor,
                "onnx sections in turn": graphs_in_turn(onnx_predictor, heads=False),
                "onnx graphs in turn": graphs_in_turn(onnx_predictor, heads=True),
                "torch backbone": model.backbone,
                "torch early exit": torch_predictor,
            }, list(x.split(bs)), repeats)
            ms = {name: 1000 * s / images for name, s in seconds.items()}
            measured = seconds["onnx backbone"] / seconds["onnx early exit"]
            rows.append({"input": size, "head": head, "batch_size": bs, "images": images, "ms_per_image": ms,
                         "share_at_exit1": (result.exit_index == 0).float().mean().item(),
                         "macs_speedup": macs_speedup, "onnx_measured_speedup": measured,
                         "onnx_ratio": measured / macs_speedup,
                         "torch_measured_speedup": seconds["torch backbone"] / seconds["torch early exit"],
                         "export_seconds": export_onnx_seconds})
            r = rows[-1]
            print(f"{size}px {head} heads, batch {bs}: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items())
                  + f" ms/img; ONNX early exit {measured:.2f}x over the ONNX backbone, MACs {macs_speedup:.2f}x, "
                  f"ratio {r['onnx_ratio']:.2f}", flush=True)
    return rows


def coverage(names: list[str]) -> list[dict]:
    """Export each model of ``names`` (default every family of ``FAMILIES``; a model not listed there
    is built with timm's defaults at 32x32) and compare the two predictors' answers."""
    listed = {name: (kwargs, size) for name, kwargs, size in FAMILIES}
    rows = []
    for name in names or listed:
        kwargs, size = listed.get(name, ({}, 32))
        model = timm_scan.wrap(timm.create_model(name, num_classes=10, **kwargs), timm_scan.ScanConfig.papers(),
                               check_input_size=(3, size, size)).eval()
        x = torch.randn(8, 3, size, size)
        row = {"model": name, "input": size, "runner": model.runner}
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            try:
                timm_scan.export_onnx(model, tmp, (3, size, size))
            except ValueError as exc:
                rows.append({**row, "exported": False, "reason": str(exc)})
                print(f"{name}: refused: {exc}", flush=True)
                continue
            seconds = time.perf_counter() - started
            with torch.no_grad():
                probs = [torch.softmax(z, -1) for z in model(x).logits]
            quantiles = torch.linspace(0.6, 0.4, len(probs) - 1).tolist()  # a mixed batch: some leave at each exit
            policy = timm_scan.ExitPolicy(mixing_thresholds(probs, quantiles))
            ours = timm_scan.EarlyExitPredictor(model, policy)(x)
            theirs = timm_scan.OnnxEarlyExitPredictor(tmp, policy)(x)
            rows.append({**row, "exported": True, "export_seconds": seconds,
                         "same_exits": bool(torch.equal(ours.exit_index, theirs.exit_index)),
                         "same_labels": bool(torch.equal(ours.labels, theirs.labels)),
                         "max_prob_difference": (ours.probs - theirs.probs).abs().max().item()})
            print(f"{name}: exported in {seconds:.0f} s; same exits {rows[-1]['same_exits']}, same labels "
                  f"{rows[-1]['same_labels']}, max probability difference {rows[-1]['max_prob_difference']:.2g}",
                  flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --global-thread-pool is read from sys.argv before parsing
    p.add_argument("--sizes", type=int, nargs="*", default=[32], help="input sides to time (none: no timing)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--images", type=int, help="images per timed pass (default: 256 at batch 1, else 1024)")
    p.add_argument("--head", default="sepconv", choices=HEAD_KINDS, help="kind of exit head (ScanConfig.head)")
    p.add_argument("--families", nargs="*", metavar="MODEL",
                   help="also export every family of the test suite (or these models) and check the answers")
    p.add_argument("--global-thread-pool", action="store_true",
                   help="every session (the exported backbone's too) shares onnxruntime's global thread pool")
    p.add_argument("--out", default=None, help="default: results/onnx_export.json (_global_pool with that option)")
    args = p.parse_args()
    suffix = "_global_pool" if args.global_thread_pool else ""
    args.out = args.out or str(HERE / "results" / f"onnx_export{suffix}.json")
    record = {"date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "torch": torch.__version__, "onnxruntime": ort.__version__, "global_thread_pool": args.global_thread_pool,
              "speed": [row for size in args.sizes
                        for row in speed(size, args.batch_sizes, args.repeats, args.images, args.head)]}
    if args.families is not None:
        record["coverage"] = coverage(args.families)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
