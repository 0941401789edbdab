"""Exit heads: attention modules, SepConv align nets and the shallow classifiers they feed.

Two kinds of head (``ScanConfig.head``): the papers' ``"sepconv"`` (attention → SepConv align net →
pool → linear) and a latency-oriented ``"pooled"`` head in the style of SDN and earlyon (attention →
pool → a two-layer MLP), whose cost is one pooling and two small matrix products.

All modules take and return NCHW maps and work at any input resolution (global pooling only). Their
inference form (BatchNorm folded, matrix products on CPU) is ``timm_scan.deploy.fast_heads``.

``exit_heads`` builds the heads a config puts after the exits' stages (``positions.resolve_exits``; on the
meta device, it counts them without allocating). How wide: ``sized_head_channels``
fits the SepConv heads' align width to ``ScanConfig.head_budget``, their MACs counted on the meta device.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct, SelectAdaptivePool2d, SeparableConvNormAct, make_divisible
from torch import Tensor, nn

from .config import HEAD_KINDS, ScanConfig
from .macs import count_macs
from .runner import Stage, feature_stages, model_name

__all__ = ["POOLED_HIDDEN", "ExitHead", "ScanAttention", "SdAttention", "SepConv", "align_plan", "exit_heads",
           "head_macs", "make_attention", "sized_head_channels"]

POOLED_HIDDEN = 128  # the pooled head's hidden width by default (earlyon's)
WIDTH_STEP = 8  # align widths that the budget chooses are multiples of this


class SdAttention(nn.Module):
    """Self-Distillation attention (TPAMI 2021): depthwise-pointwise conv stride 2, BN, ReLU,
    bilinear upsampling back to the input size, sigmoid; the mask multiplies the input map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = SeparableConvNormAct(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        mask = F.interpolate(self.conv(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(mask)


class ScanAttention(nn.Module):
    """SCAN attention (NeurIPS 2019): conv 3x3 stride 2, BN, ReLU, transposed conv x2 (to the
    input's exact size, odd sizes included), BN, sigmoid; the mask multiplies the input map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.down = ConvNormAct(channels, channels, kernel_size=3, stride=2)
        self.up = nn.ConvTranspose2d(channels, channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        mask = self.bn(self.up(self.down(x), output_size=x.shape[-2:]))
        return x * torch.sigmoid(mask)


def make_attention(kind: str, channels: int) -> nn.Module:
    """``"sd"``, ``"scan"`` or ``"none"`` (identity)."""
    if kind == "sd":
        return SdAttention(channels)
    if kind == "scan":
        return ScanAttention(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"attention must be 'sd', 'scan' or 'none'; got {kind!r}")


class SepConv(nn.Sequential):
    """Align-net block of the papers' code: two depthwise-pointwise convs with BN and ReLU; the
    first carries the stride, the second changes the width. ``narrow_first``: a block narrower than its
    input narrows in its first conv instead, so that both pointwise convs run at the smaller width
    (the heads sized by a budget; a widening block is the papers' either way)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, narrow_first: bool = False) -> None:
        mid = min(in_chs, out_chs) if narrow_first else in_chs
        super().__init__(
            SeparableConvNormAct(in_chs, mid, kernel_size=3, stride=stride),
            SeparableConvNormAct(mid, out_chs, kernel_size=3, stride=1),
        )


def align_plan(
    in_chs: int, in_reduction: int, out_chs: int, out_reduction: int, num_blocks: int
) -> list[tuple[int, int, int]]:
    """``(in_chs, out_chs, stride)`` per SepConv block.

    Widths grow geometrically from ``in_chs`` to exactly ``out_chs`` (intermediates divisible by
    8); a block halves the map (stride 2) while the reduction is below ``out_reduction``.
    """
    plan = []
    chs, reduction = in_chs, in_reduction
    for j in range(1, num_blocks + 1):
        nxt = out_chs if j == num_blocks else make_divisible(in_chs * (out_chs / in_chs) ** (j / num_blocks), 8)
        stride = 2 if reduction * 2 <= out_reduction else 1
        plan.append((chs, nxt, stride))
        chs, reduction = nxt, reduction * stride
    return plan


class ExitHead(nn.Module):
    """Shallow classifier ``c_i``: attention mask → align net → global average pool → ``fc``.

    ``kind="sepconv"`` (the papers'): the align net is SepConv blocks from ``in_chs`` to ``out_chs``
    (``num_blocks`` of them, see `align_plan`; ``narrow_first`` as `SepConv`'s) and ``fc`` one linear layer. ``kind="pooled"``: no
    align net; ``fc`` is Linear(in_chs, ``out_chs``) → ReLU → Linear(out_chs, num_classes), so
    ``out_chs`` is the hidden width and ``num_blocks`` is unused.

    ``forward`` maps ``(B, in_chs, H, W)`` to ``(logits (B, num_classes), pooled (B, C))``, ``C`` the
    align net's output width (``in_chs`` for pooled heads); ``proj`` is a learned linear map of the
    pooled feature to the deepest classifier's pre-logits width, for the hint loss (always learned,
    even where the widths agree, so that the hint can reach zero on backbones whose pre-logits are
    signed; training only, not part of the inference cost).
    """

    def __init__(
        self,
        in_chs: int,
        in_reduction: int,
        out_chs: int,
        out_reduction: int,
        num_blocks: int,
        num_classes: int,
        feature_dim: int,
        attention: str,
        kind: str = "sepconv",
        narrow_first: bool = False,
    ) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}; got {kind!r}")
        self.attention = make_attention(attention, in_chs)
        self.pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        if kind == "sepconv":
            plan = align_plan(in_chs, in_reduction, out_chs, out_reduction, num_blocks)
            self.align = nn.Sequential(*(SepConv(a, b, s, narrow_first) for a, b, s in plan))
            self.fc = nn.Linear(out_chs, num_classes)
            pooled_chs = out_chs
        else:
            self.align = nn.Sequential()
            self.fc = nn.Sequential(nn.Linear(in_chs, out_chs), nn.ReLU(inplace=True), nn.Linear(out_chs, num_classes))
            pooled_chs = in_chs
        self.proj = nn.Linear(pooled_chs, feature_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.pool(self.align(self.attention(x)))
        return self.fc(pooled), pooled


def exit_heads(backbone: nn.Module, config: ScanConfig, cuts: list[Stage]) -> list[ExitHead]:
    """The shallow heads ``config`` puts after ``cuts`` (the exits' stages, ``positions.resolve_exits``),
    shallowest first (SepConv heads of a config with a ``head_budget`` narrow first, the papers'
    without one), on the current default device (``torch.device("meta")`` counts their
    parameters without allocating them)."""
    stages = feature_stages(backbone)
    feature_dim = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    out_chs = config.head_channels or (stages[-1].num_chs if config.head == "sepconv" else POOLED_HIDDEN)
    num_exits = len(cuts) + 1
    blocks = config.head_blocks
    if isinstance(blocks, list) and len(blocks) != len(cuts):
        raise ValueError(f"ScanConfig.head_blocks lists {len(blocks)} counts ({blocks}) for {len(cuts)} shallow exits "
                         f"({[c.module for c in cuts]}): give one per exit, or one int for all")
    blocks = blocks if isinstance(blocks, list) else [blocks or (num_exits - (i + 1)) for i in range(len(cuts))]
    return [
        ExitHead(
            in_chs=c.num_chs,
            in_reduction=c.reduction,
            out_chs=out_chs,
            out_reduction=stages[-1].reduction,
            num_blocks=blocks[i],
            num_classes=backbone.num_classes,
            feature_dim=feature_dim,
            attention=config.attention,
            kind=config.head,
            narrow_first=config.head_budget is not None,
        )
        for i, c in enumerate(cuts)
    ]


def head_macs(backbone: nn.Module, config: ScanConfig, cuts: list[Stage],
              input_size: tuple[int, int, int]) -> list[int]:
    """MACs of each shallow head ``config`` puts after ``cuts`` (shallowest first), for one image of
    ``input_size`` (C, H, W), counted on the meta device: a stage of reduction r gives the head a map of
    ``ceil(H / r) x ceil(W / r)``."""
    with torch.device("meta"):
        heads = exit_heads(backbone, config, cuts)
        maps = [torch.empty(1, c.num_chs, math.ceil(input_size[1] / c.reduction),
                            math.ceil(input_size[2] / c.reduction)) for c in cuts]
    return [count_macs(head.eval(), x) for head, x in zip(heads, maps)]  # eval: BatchNorm takes one 1x1 map


def sized_head_channels(
    backbone: nn.Module, config: ScanConfig, cuts: list[Stage], input_size: tuple[int, int, int], backbone_macs: int
) -> int:
    """The widest SepConv align width (a multiple of ``WIDTH_STEP``, at most the deepest stage's width) whose
    shallow heads together cost at most ``config.head_budget · backbone_macs`` at ``input_size``, or a
    ``ValueError`` saying what the narrowest heads cost, their attention's share, and what to change."""
    stages = feature_stages(backbone)
    budget = config.head_budget * backbone_macs

    def cost(width: int) -> int:
        return sum(head_macs(backbone, dataclasses.replace(config, head_channels=width), cuts, input_size))

    widths = range(WIDTH_STEP, max(stages[-1].num_chs, WIDTH_STEP) + 1, WIDTH_STEP)
    low, high = 0, len(widths)  # widths[:low] fit; widths[high:] do not
    while low < high:  # the cost grows with the width
        mid = (low + high) // 2
        low, high = (mid + 1, high) if cost(widths[mid]) <= budget else (low, mid)
    if low == 0:
        narrowest = cost(WIDTH_STEP)
        attention = narrowest - sum(head_macs(backbone, dataclasses.replace(
            config, attention="none", head_channels=WIDTH_STEP), cuts, input_size))
        raise ValueError(
            f"the exit heads of {model_name(backbone)!r} cost {100 * narrowest / backbone_macs:.1f}% of its MACs at "
            f"{input_size[1]}x{input_size[2]} even {WIDTH_STEP} channels wide ({100 * attention / backbone_macs:.1f}% "
            f"is their attention {config.attention!r}), above head_budget={config.head_budget:g}; pass "
            f"attention='none', head='pooled', fewer exits, a larger head_budget, or head_budget=None")
    return widths[low - 1]
