"""Does early exit save wall-clock time in proportion to the MACs it saves?

resnet18 (random weights: speed does not depend on them), wrapped with the default exits (``--head``:
the kind of exit head). Two scenarios (``--scenarios``): ``half``, the first exit's threshold is the
median of its confidence on the images, so half of them leave there and the other half (thresholds
1.0) runs every section and gets the ensemble; ``all``, every image leaves at exit 1. For each input
size, batch size and scenario: the plain backbone's time, the predictor's time, the measured
speed-up, the MACs speed-up, and their ratio (1.0 = the MACs saving is fully realised).

A third callable, timed in turns with the two, estimates what exits that cost nothing would save here:
the backbone's own sections with the samples that leave at exit 1 known in advance, no exit heads and
no confidences (``sections_only``). Its speed-up over the backbone (``bound_speedup``) is what the
sections' own times allow; ``bound_ratio`` = bound speed-up / MACs speed-up, so a setting whose
``bound_ratio`` is below 0.8 would not reach a ratio of 0.8 with any head, however cheap (up to timing
noise); ``of_bound`` = measured / bound speed-up, the share of that saving the predictor keeps after its
heads and routing.

    python benchmarks/early_exit_speed.py                      # 32x32 and 224x224, batch 1 and 256, half
    python benchmarks/early_exit_speed.py --sizes 32 48 80 128 160 224 --scenarios half all --channels-last \
        --out benchmarks/results/early_exit_speed_sizes.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import Tensor

import timm_scan
from timm_scan.deploy import wall_clocks


def sections_only(model: timm_scan.MultiExitModel, leaves: dict[int, Tensor], image_size: tuple[int, int]
                  ) -> Callable[[Tensor], Tensor | None]:
    """A zero-cost early exit: ``model``'s sections, where the samples of ``batch`` that leave after
    section 0 are given in advance (``leaves[id(batch)]``, a bool mask) and get no answer; the rest run
    every section and the deepest classifier. No exit head runs and nothing is compared."""
    def run(batch: Tensor) -> Tensor | None:
        h = model.forward_section(0, batch)
        stay = ~leaves[id(batch)]
        if not bool(stay.any()):
            return None
        if not bool(stay.all()):
            h = h[stay]
        for i in range(1, model.num_exits):
            h = model.forward_section(i, h)
        return model.exit_logits(model.num_exits - 1, h, image_size)
    return run


def measure(size: int, batch_size: int, images: int, repeats: int, channels_last: bool, scenario: str = "half",
            head: str = "sepconv") -> dict:
    torch.manual_seed(0)
    model = timm_scan.wrap(timm.create_model("resnet18", num_classes=10), timm_scan.ScanConfig.papers(head=head),
                           check_input_size=(3, size, size)).eval()  # the heads RESULTS §8 timed (default until 2026-12-06)
    x = torch.randn(images, 3, size, size)
    if channels_last:  # both the plain backbone and the wrapped model
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        h = model.forward_section(0, x)
        first = torch.softmax(model.exit_logits(0, h, (size, size)), -1).max(-1).values
    thresholds = [first.median().item() if scenario == "half" else 0.0] + [1.0] * (model.num_exits - 2)
    predictor = timm_scan.EarlyExitPredictor(model, timm_scan.ExitPolicy(thresholds))
    batches = list(x.split(batch_size))
    result = predictor(x)
    macs_speedup = model.backbone_macs((3, size, size)) / result.macs.double().mean().item()
    leaves = {id(b): exits == 0 for b, exits in zip(batches, result.exit_index.split(batch_size))}
    seconds = wall_clocks({"backbone": model.backbone, "early exit": predictor,
                           "sections only": sections_only(model, leaves, (size, size))}, batches, repeats)
    backbone_s, early_exit_s = seconds["backbone"], seconds["early exit"]
    measured, bound = backbone_s / early_exit_s, backbone_s / seconds["sections only"]
    return {
        "input": size, "batch_size": batch_size, "images": images, "channels_last": channels_last,
        "scenario": scenario, "head": head,
        "share_at_exit1": (result.exit_index == 0).float().mean().item(),
        "backbone_ms_per_image": 1000 * backbone_s / images, "early_exit_ms_per_image": 1000 * early_exit_s / images,
        "measured_speedup": measured, "macs_speedup": macs_speedup, "ratio": measured / macs_speedup,
        "sections_only_ms_per_image": 1000 * seconds["sections only"] / images, "bound_speedup": bound,
        "bound_ratio": bound / macs_speedup, "of_bound": measured / bound,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--images", type=int, default=None, help="images per setting (default: 1024 at batch>1, 256 at batch 1; 256 at 224x224)")
    p.add_argument("--repeats", type=int, default=7, help="timed passes, backbone and predictor in turns; the median counts")
    p.add_argument("--channels-last", action="store_true", help="run backbone and early exit in channels_last")
    p.add_argument("--scenarios", nargs="+", choices=["half", "all"], default=["half"],
                   help="half: half the images leave at exit 1, the rest run to the end; all: every image leaves at exit 1")
    p.add_argument("--head", choices=["sepconv", "pooled"], default="sepconv", help="kind of exit head")
    p.add_argument("--out", default=None, help="default: results/early_exit_speed.json, or "
                   "results/early_exit_speed_channels_last.json with --channels-last")
    args = p.parse_args()
    name = "early_exit_speed_channels_last.json" if args.channels_last else "early_exit_speed.json"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / name
    rows = []
    for size in args.sizes:
        for bs, scenario in [(bs, scenario) for bs in args.batch_sizes for scenario in args.scenarios]:
            images = args.images or (256 if bs == 1 or size >= 224 else 1024)
            rows.append(measure(size, bs, max(images, bs), args.repeats, args.channels_last, scenario, args.head))
            r = rows[-1]
            print(f"{size:>4}px batch {bs:>4} {scenario:>4}: backbone {r['backbone_ms_per_image']:.3f} ms/img, early exit "
                  f"{r['early_exit_ms_per_image']:.3f} ms/img, measured {r['measured_speedup']:.2f}x, "
                  f"MACs {r['macs_speedup']:.2f}x, ratio {r['ratio']:.2f} ({r['share_at_exit1']:.0%} at exit 1); "
                  f"bound {r['bound_speedup']:.2f}x (ratio {r['bound_ratio']:.2f}), {r['of_bound']:.0%} of it kept",
                  flush=True)
    record = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "command": " ".join(["python", *sys.argv]), "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
