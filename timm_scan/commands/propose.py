"""``timm-scan propose --model NAME``: where a model's shallow exits should go, from costs measured on this
device: every position (stage ends past the stem, blocks inside stages) with what the backbone costs up to
it, in MACs and measured milliseconds, and the positions spaced evenly in measured time, with the flags
that give them to ``timm-scan train`` (``timm_scan.propose_exits``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..deploy.propose import ExitProposal, propose_exits
from ..model.backbone import create_backbone
from ..model.config import ATTENTION_KINDS, DEFAULT_HEAD_BUDGET
from ..options import option

__all__ = ["ProposeConfig", "propose"]


@dataclass
class ProposeConfig:
    """What ``timm-scan propose`` does."""

    model: str = option("resnet18", "any timm model name")
    model_kwargs: dict[str, Any] = option({}, "more keyword arguments of timm.create_model: KEY=VALUE ...")
    input_size: int = option(224, "square input side in pixels", aliases=["--img-size"])
    num_classes: int = option(1000, "classes of the classifier")
    num_exits: int = option(3, "shallow exits to place")
    batch_size: int = option(1, "the batch size the model will serve at (costs are measured at it)")
    device: str = option("cpu", "where the costs are measured: cpu, cuda, cuda:1, ...")
    attention: str = option("none", f"attention of the shallow heads: one of {ATTENTION_KINDS}")
    head_budget: float | None = option(DEFAULT_HEAD_BUDGET, "what the SepConv heads together may add, a fraction of "
                                       "the backbone's MACs", switches={"--no-head-budget": None})
    images: int = option(32, "random images per timed pass")
    repeats: int = option(3, "timed passes (the median counts)")


def propose(cfg: ProposeConfig) -> ExitProposal:
    """Print the positions and the proposal; return it."""
    backbone = create_backbone(cfg.model, cfg.num_classes, model_kwargs=cfg.model_kwargs)
    size = (3, cfg.input_size, cfg.input_size)
    print(f"timing {cfg.model} at {cfg.input_size}x{cfg.input_size}, batch {cfg.batch_size}, on {cfg.device} ...",
          flush=True)
    p = propose_exits(backbone, size, num_exits=cfg.num_exits, batch_size=cfg.batch_size, device=cfg.device,
                      head_budget=cfg.head_budget, attention=cfg.attention, images=cfg.images, repeats=cfg.repeats)
    print(f"{p.model} at {size[1]}x{size[2]}, batch {p.batch_size} on {p.device}: backbone {p.backbone_macs / 1e6:.1f} "
          f"MMACs, {p.backbone_ms:.3f} ms per image")
    rows = [("", "position", "exits entry", "channels", "map", "MACs to here", "time to here")]
    for i, q in enumerate(p.positions):
        side = -(-cfg.input_size // q.reduction)
        rows.append(("*" if i in p.chosen else "", q.module, str(q.entry), str(q.channels), f"{side}x{side}",
                     f"{q.macs / p.backbone_macs:.1%}", f"{q.share:.1%}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    heads = p.exit_macs[-1] - p.backbone_macs
    print(f"* proposed: exits spaced evenly in measured time, heads {p.config.head_channels} channels wide adding "
          f"{heads / p.backbone_macs:.1%} of the backbone's MACs; a sample leaving at each exit costs "
          + ", ".join(f"{m / p.backbone_macs:.0%}" for m in p.exit_macs) + " of the backbone's MACs")
    for note in p.notes:
        print(f"note: {note}")
    print(f"train with: timm-scan train --model {cfg.model} --input-size {cfg.input_size} {p.flags()}")
    print("Only costs were measured: an earlier exit is cheaper and usually less accurate. Compare with the default "
          "stage ends on your data (benchmarks/exit_positions.py).")
    return p
