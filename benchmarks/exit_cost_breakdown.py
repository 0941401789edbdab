"""Where early exit's time goes: each section, each exit head and the predictor, timed apart.

resnet18 (random weights: speed does not depend on them) with the default exits, in NCHW and in
channels_last. Per call, in ms: the plain backbone, each section on the previous one's output,
each shallow head as trained (with BatchNorm) and as the predictor runs it (``inference_copy``),
the deepest head, each separable conv block of exit 1's head (as trained, its depthwise conv alone,
and its inference form), and the predictor when every image leaves at exit 1 and when every image
runs to the end; and the stem's max-pool, which torch computes far faster in channels_last.
"Interleaving cost": sections and inference heads run in sequence (no predictor
logic) minus the backbone and the heads timed alone, each of which then finds its weights in cache.

    python benchmarks/exit_cost_breakdown.py                  # 32x32, batch 1
    python benchmarks/exit_cost_breakdown.py --size 224 --batch-size 256 --calls 5

Writes ``results/exit_cost_breakdown.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from timm.layers import SeparableConvNormAct
from torch import Tensor, nn

import timm_scan
from timm_scan.deploy.fast_heads import InferenceSeparableConv, inference_copy
from timm_scan.deploy.timing import wall_clock

HERE = Path(__file__).parent


def per_call_ms(fn: Callable[[Tensor], Any], x: Tensor, calls: int, repeats: int) -> float:
    return 1000 * wall_clock(fn, [x] * calls, repeats) / calls


def separable_inputs(head: nn.Module, h: Tensor) -> list[Tensor]:
    """The input each separable conv block of ``head`` receives from ``h``, in module order."""
    seen: list[Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
             for m in head.modules() if isinstance(m, SeparableConvNormAct)]
    with torch.no_grad():
        head(h)
    for hook in hooks:
        hook.remove()
    return seen


def breakdown(size: int, batch_size: int, channels_last: bool, calls: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = timm_scan.wrap(timm.create_model("resnet18", num_classes=10), timm_scan.ScanConfig.papers(),
                           check_input_size=(3, size, size)).eval()  # the heads RESULTS §8 timed (default until 2026-12-06)
    x = torch.randn(batch_size, 3, size, size)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    k, image_size = model.num_exits, (size, size)
    row: dict[str, Any] = {"input": size, "batch_size": batch_size, "channels_last": channels_last,
                           "backbone": per_call_ms(model.backbone, x, calls, repeats)}
    outputs, h = [], x
    with torch.no_grad():
        stem = model.backbone.act1(model.backbone.bn1(model.backbone.conv1(x)))
        row["stem max-pool"] = per_call_ms(model.backbone.maxpool, stem, calls, repeats)  # no MACs, in section 0
        for i in range(k):
            row[f"section {i}"] = per_call_ms(lambda z, i=i: model.forward_section(i, z), h, calls, repeats)
            h = model.forward_section(i, h)
            outputs.append(h)
    fast = [inference_copy(head) for head in model.exits]
    for i, (head, copy) in enumerate(zip(model.exits, fast)):
        row[f"head {i}"] = per_call_ms(head, outputs[i], calls, repeats)
        row[f"head {i} for inference"] = per_call_ms(copy, outputs[i], calls, repeats)
    row["deepest head"] = per_call_ms(lambda z: model.exit_logits(k - 1, z, image_size), outputs[-1], calls, repeats)
    trained_blocks = [m for m in model.exits[0].modules() if isinstance(m, SeparableConvNormAct)]
    fast_blocks = [m for m in fast[0].modules() if isinstance(m, InferenceSeparableConv)]
    row["exit 1 separable convs"] = [
        {"input": list(inp.shape), "as trained ms": per_call_ms(a, inp, calls, repeats),
         "depthwise conv ms": per_call_ms(b.conv_dw, inp, calls, repeats), "for inference ms": per_call_ms(b, inp, calls, repeats)}
        for a, b, inp in zip(trained_blocks, fast_blocks, separable_inputs(model.exits[0], outputs[0]))
    ]

    def in_sequence(z: Tensor) -> None:  # what the predictor runs for an image that goes to the end, nothing else
        for i in range(k):
            z = model.forward_section(i, z)
            model.exit_logits(i, z, image_size, fast[i] if i < k - 1 else None)

    row["sections and inference heads in sequence"] = per_call_ms(in_sequence, x, calls, repeats)
    for name, threshold in (("all leave at exit 1", 0.0), ("all run to the end", 1.0)):
        predictor = timm_scan.EarlyExitPredictor(model, timm_scan.ExitPolicy([threshold] * (k - 1)))
        row[f"predictor, {name}"] = per_call_ms(predictor, x, calls, repeats)
    alone = row["backbone"] + sum(row[f"head {i} for inference"] for i in range(k - 1)) + row["deepest head"]
    row["interleaving cost"] = row["sections and inference heads in sequence"] - alone
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--calls", type=int, default=200, help="calls per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "exit_cost_breakdown.json"))
    args = p.parse_args()
    rows = [breakdown(args.size, args.batch_size, cl, args.calls, args.repeats) for cl in (False, True)]
    print(f"resnet18 at {args.size}x{args.size}, batch {args.batch_size}: ms per call")
    print("| part | NCHW | channels_last |\n| --- | --- | --- |")
    for key, value in rows[0].items():
        if isinstance(value, float):
            print(f"| {key} | {value:.3f} | {rows[1][key]:.3f} |")
    for name, row in zip(("NCHW", "channels_last"), rows):
        print(f"exit 1's separable conv blocks, {name}: input, ms as trained / depthwise conv alone / inference form")
        for c in row["exit 1 separable convs"]:
            print(f"  {c['input'][1]}x{c['input'][2]}x{c['input'][3]}: {c['as trained ms']:.3f} / "
                  f"{c['depthwise conv ms']:.3f} / {c['for inference ms']:.3f}")
    record = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "torch": torch.__version__, "command": " ".join(["python", *sys.argv]), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
