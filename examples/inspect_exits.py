"""Wrap a timm model and print its exits: stage, map size, head parameters and cumulative MACs.

    python examples/inspect_exits.py --model resnet18 --input-size 32
"""

from __future__ import annotations

import argparse

import timm

import timm_scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="any timm model name")
    parser.add_argument("--input-size", type=int, default=32, help="square input side in pixels")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--attention", default="sd", choices=["sd", "scan", "none"])
    args = parser.parse_args()

    backbone = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    size = (3, args.input_size, args.input_size)
    model = timm_scan.wrap(backbone, timm_scan.ScanConfig(attention=args.attention), check_input_size=size)
    macs = model.exit_macs(size)
    base = model.backbone_macs(size)

    print(f"{args.model} at {args.input_size}x{args.input_size}: {model.num_exits} exits, "
          f"backbone {base / 1e6:.1f} MMACs, {sum(p.numel() for p in backbone.parameters()) / 1e6:.2f} M params")
    print(f"{'exit':>4}  {'stage':<24}{'chs':>5}{'map':>7}{'head params':>13}{'MMACs':>10}{'of backbone':>13}")
    for i, (stage, cost) in enumerate(zip(model.exit_stages, macs)):
        side = max(1, -(-args.input_size // stage.reduction))
        head = model.exits[i] if i < len(model.exits) else backbone.get_classifier()
        params = sum(p.numel() for p in head.parameters())
        label = stage.module + (" (backbone head)" if i == model.num_exits - 1 else "")
        print(f"{i + 1:>4}  {label:<24}{stage.num_chs:>5}{f'{side}x{side}':>7}{params:>13,}"
              f"{cost / 1e6:>10.2f}{cost / base:>12.1%}")
    print("MMACs: cumulative cost of a sample that leaves at that exit (sections and heads on the way).")


if __name__ == "__main__":
    main()
