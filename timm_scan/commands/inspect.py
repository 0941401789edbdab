"""``timm-scan inspect --model NAME``: wrap a timm model and print its exits: stage, map size, head
parameters and cumulative MACs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..model.backbone import create_backbone
from ..model.config import ATTENTION_KINDS, DEFAULT_HEAD_BUDGET, HEAD_KINDS, ScanConfig
from ..model.multi_exit import MultiExitModel, wrap
from ..options import option
from ..report import exit_table

__all__ = ["InspectConfig", "inspect"]


@dataclass
class InspectConfig:
    """What ``timm-scan inspect`` does."""

    model: str = option("resnet18", "any timm model name")
    model_kwargs: dict[str, Any] = option({}, "more keyword arguments of timm.create_model: KEY=VALUE ..., each VALUE "
                                              "a Python literal or else a string (img_size=32 builds a ViT or Swin "
                                              "for 32x32 inputs)")
    input_size: int = option(32, "square input side in pixels", aliases=["--img-size"])
    num_classes: int = option(10, "classes of the classifier")
    exits: list[int | str] | None = option(None, "feature_info indices or module names of the shallow exits, "
                                                  "blocks inside stages included (default: the papers' placement)")
    head_blocks: list[int] | None = option(None, "SepConv blocks per head: one count for every head, or one per "
                                                 "shallow exit (default: the papers' K - i)")
    attention: str = option(ScanConfig.attention, f"attention of the shallow heads: one of {ATTENTION_KINDS}")
    head: str = option(ScanConfig.head, f"kind of shallow head: one of {HEAD_KINDS}")
    head_budget: float | None = option(DEFAULT_HEAD_BUDGET, "what the SepConv heads together may add, a fraction of "
                                       "the backbone's MACs at the input size", switches={"--no-head-budget": None})


def inspect(cfg: InspectConfig) -> MultiExitModel:
    """Print the table and return the wrapped model (random weights)."""
    backbone = create_backbone(cfg.model, cfg.num_classes, model_kwargs=cfg.model_kwargs)
    size = (3, cfg.input_size, cfg.input_size)
    model = wrap(backbone, ScanConfig(exits=cfg.exits, head_blocks=cfg.head_blocks, attention=cfg.attention, head=cfg.head,
                                      head_budget=cfg.head_budget), check_input_size=size)
    macs, base = model.exit_macs(size), model.backbone_macs(size)
    classifier = backbone.get_classifier()  # distilled models: their two classifiers
    heads = [*model.exits, nn.ModuleList(classifier) if isinstance(classifier, tuple) else classifier]
    maps = [f"{-(-cfg.input_size // s.reduction)}x{-(-cfg.input_size // s.reduction)}" for s in model.exit_stages]
    print(f"{cfg.model} at {cfg.input_size}x{cfg.input_size}: {model.num_exits} exits, backbone {base / 1e6:.1f} MMACs, "
          f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.2f} M params")
    print(exit_table(macs, base, stages=[s.module for s in model.exit_stages],
                     extra={"channels": [str(s.num_chs) for s in model.exit_stages] + ["-"],
                            "map": maps + ["-"],
                            "head params": [f"{sum(p.numel() for p in h.parameters()):,}" for h in heads] + ["-"]}))
    print("MMACs: cumulative cost of a sample that leaves at that exit (sections and heads on the way); the deepest "
          "exit's head is the backbone's own classifier.")
    print(heads_line(model, macs[-1] - base, base, sum(p.numel() for p in backbone.parameters())))
    for line in cost_warnings(macs, base):
        print(f"warning: {line}")
    return model


def heads_line(model: MultiExitModel, head_macs: int, backbone_macs: int, backbone_params: int) -> str:
    """What the shallow heads add, in MACs and parameters, and how they were sized."""
    params = sum(p.numel() for h in model.exits for name, p in h.named_parameters() if not name.startswith("proj."))
    c = model.config
    how = (f"SepConv, align width {c.head_channels} sized by head_budget={c.head_budget:g}" if c.head == "sepconv"
           and c.head_budget is not None else "SepConv at the papers' widths (no head_budget)" if c.head == "sepconv"
           else "pooled")
    return (f"shallow heads: {head_macs / backbone_macs:.1%} of the backbone's MACs, {params / backbone_params:.1%} of "
            f"its parameters (inference; {how}; attention {c.attention!r})")


def cost_warnings(exit_macs: list[int], backbone_macs: int) -> list[str]:
    """Where exits cost more than they save (``exit_macs`` cumulative, shallowest first; the last runs
    every section and head): shallow exits at or above the plain backbone's cost, and the share of samples
    that must leave at the first exit, the rest running every exit, to break even."""
    warnings = [f"exit {i + 1} costs {m / backbone_macs:.0%} of the plain backbone: a sample leaving there saves "
                "nothing (the heads on the way cost more than the sections it skips)"
                for i, m in enumerate(exit_macs[:-1]) if m >= backbone_macs]
    first, every = exit_macs[0], exit_macs[-1]
    if every > backbone_macs and first < backbone_macs:
        share = (every - backbone_macs) / (every - first)
        warnings.append(f"a sample that runs every exit pays {every / backbone_macs:.0%} of the plain backbone: early "
                        f"exit saves MACs only once more than {share:.0%} of samples leave at exit 1")
    return warnings
