"""Does running a backbone section by section cost anything? For each model, the wrapped model's
sections and the backbone's own head (no exit heads) against ``backbone(x)``, timed in turns with the
backbone timed a second time as the noise yardstick: ``staged / backbone`` should lie as close to 1 as
``backbone again / backbone`` does.

    python benchmarks/staged_overhead.py                     # results/staged_overhead.json
    python benchmarks/staged_overhead.py --models resnet18 --batch-sizes 1

Random weights, each model at its default input size, eval mode, float32, CPU threads as torch sets them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import timm
import torch
from torch import Tensor

import timm_scan
from timm_scan.deploy import wall_clocks

# one per runner and kind of model: a CNN and a hierarchical transformer run in order, a token
# transformer by hand, and a token and a hierarchical transformer through the traced runner
MODELS = ["resnet18", "swin_tiny_patch4_window7_224", "vit_tiny_patch16_224", "cait_xxs24_224", "pit_ti_224"]


def measure(name: str, batch_size: int, images: int, repeats: int) -> dict:
    backbone = timm.create_model(name, num_classes=10).eval()
    size = tuple(backbone.pretrained_cfg["input_size"])
    model = timm_scan.wrap(backbone, timm_scan.ScanConfig.papers(), check_input_size=size).eval()  # as measured

    def staged(x: Tensor) -> Tensor:
        h = x
        for k in range(model.num_exits):
            h = model.forward_section(k, h)
        return backbone.forward_head(h)

    batches = [torch.randn(batch_size, *size) for _ in range(max(1, images // batch_size))]
    seconds = wall_clocks({"backbone": backbone, "staged": staged, "backbone again": backbone}, batches, repeats)
    per_image = {k: 1000 * v / (len(batches) * batch_size) for k, v in seconds.items()}
    return {"model": name, "runner": model.runner, "input_size": list(size), "batch_size": batch_size,
            "ms_per_image": per_image, "staged_ratio": per_image["staged"] / per_image["backbone"],
            "noise_ratio": per_image["backbone again"] / per_image["backbone"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    p.add_argument("--images", type=int, default=16, help="images per timed pass")
    p.add_argument("--repeats", type=int, default=7, help="timed passes of each, in turns; the median counts")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "staged_overhead.json"))
    args = p.parse_args()
    rows = []
    print("| model | runner | batch | backbone ms/img | staged ms/img | staged / backbone "
          "| backbone again / backbone |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        for batch_size in args.batch_sizes:
            r = measure(name, batch_size, args.images, args.repeats)
            rows.append(r)
            ms = r["ms_per_image"]
            print(f"| {name} | {r['runner']} | {batch_size} | {ms['backbone']:.2f} | {ms['staged']:.2f} | "
                  f"{r['staged_ratio']:.3f} | {r['noise_ratio']:.3f} |", flush=True)
    record = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "timm": timm.__version__,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "command": "python benchmarks/staged_overhead.py", "images_per_pass": args.images,
              "repeats": args.repeats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
