"""Exit positions proposed from measured costs: `propose_exits`.

Every place a model offers an exit (its ``feature_info`` stages past the stem, and the blocks inside them,
``model.positions.block_positions``) is timed where it will run: the backbone up to that position, on the
device and at the batch size given, in turns with the whole backbone (``timing.wall_clocks``). The
proposal spaces the shallow exits evenly in that measured time (at 1/(n+1), ..., n/(n+1) of the
backbone's), gives each SepConv head one block per halving left to the deepest stage's reduction (at
least one) and sizes their width by ``head_budget``. It measures costs only, not accuracy: an earlier exit
is cheaper and usually less accurate, so compare a proposal with the stage ends on your data
(``benchmarks/exit_positions.py`` does, on CIFAR-10).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..model.config import DEFAULT_HEAD_BUDGET, ScanConfig, check_input_size
from ..model.macs import count_macs
from ..model.multi_exit import MultiExitModel, wrap
from ..model.positions import STEM_MAX_REDUCTION, block_positions, exit_entry
from ..model.runner import eval_mode, feature_stages, model_name
from .latency import check_timing_arguments, describe_device
from .timing import wall_clocks

__all__ = ["ExitProposal", "Position", "halvings", "propose_exits"]

NOISE = 0.1  # timings this far out of order (a share of the backbone's time) are reported as noisy


@dataclass(frozen=True)
class Position:
    """One place an exit can go: ``entry`` as ``ScanConfig.exits`` takes it (a ``feature_info`` index, or a
    block's module name), its map, and what running the backbone up to it costs per image: ``macs``, and
    ``ms`` measured (``share``: of the whole backbone's measured time)."""

    module: str
    entry: int | str
    channels: int
    reduction: int
    macs: int
    ms: float
    share: float


@dataclass
class ExitProposal:
    """`propose_exits`'s answer: every ``positions`` (forward order), the ``chosen`` ones (indices into
    ``positions``), and ``config``, the ``ScanConfig`` that places and sizes those exits (its heads' width
    resolved by ``wrap``), with the cumulative ``exit_macs`` of a sample leaving at each exit (heads on the
    way included; the deepest last)."""

    model: str
    input_size: tuple[int, int, int]
    batch_size: int
    device: str
    backbone_macs: int
    backbone_ms: float
    positions: list[Position]
    chosen: list[int]
    config: ScanConfig
    exit_macs: list[int]
    notes: list[str] = field(default_factory=list)

    def flags(self) -> str:
        """The ``timm-scan train`` flags that give these exits and heads (attention and budget where they are
        not the defaults)."""
        c = self.config
        blocks = c.head_blocks if isinstance(c.head_blocks, list) else [c.head_blocks]
        flags = ["--exits", *map(str, c.exits), "--head-blocks", *map(str, blocks)]
        if c.attention != ScanConfig.attention:
            flags += ["--attention", c.attention]
        if c.head_budget != ScanConfig.head_budget:
            flags += ["--no-head-budget"] if c.head_budget is None else ["--head-budget", f"{c.head_budget:g}"]
        return " ".join(flags)


def propose_exits(
    model: nn.Module,
    input_size: tuple[int, int, int] | None = None,
    *,
    num_exits: int = 3,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    head_budget: float | None = DEFAULT_HEAD_BUDGET,
    attention: str = "none",
    images: int = 32,
    repeats: int = 3,
) -> ExitProposal:
    """Propose where ``num_exits`` shallow exits go on the timm ``model`` (left untouched: a copy is timed)
    at ``input_size`` (``(C, H, W)``, default its ``pretrained_cfg``'s), from costs measured on ``device``
    at ``batch_size`` (each timed pass runs ``images`` random images, the median of ``repeats`` passes
    counts). The heads are SepConv with ``attention``, sized by ``head_budget`` as ``wrap`` sizes them."""
    if isinstance(num_exits, bool) or not isinstance(num_exits, int) or num_exits < 1:
        raise ValueError(f"num_exits must be a positive int (shallow exits to place); got {num_exits!r}")
    check_timing_arguments(batch_size, images, repeats)
    size = check_input_size(input_size or (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))
    device = torch.device(device)
    model = copy.deepcopy(model).to(device).eval()
    example = torch.randn(2, *size, device=device)
    stages = [s for s in feature_stages(model)[:-1] if s.reduction > STEM_MAX_REDUCTION] or feature_stages(model)[:-1]
    if not stages:
        raise ValueError(f"{model_name(model)!r} has a single feature_info stage: no place for a shallow exit")
    notes = []
    try:
        candidates = stages + block_positions(model, example)
        probe = wrap(model, ScanConfig(exits=[exit_entry(s) for s in candidates], head="pooled"),
                     check_input_size=size)
    except ValueError as exc:  # a block the runner cannot cut after, or stages that are not modules
        notes.append(f"blocks inside stages left out: {exc}")
        probe = wrap(model, ScanConfig(exits=[s.index for s in stages], head="pooled"), check_input_size=size)
    cuts = probe.exit_stages[:-1]
    macs, ms, backbone_ms = _costs(probe, size, batch_size, images, repeats)
    backbone_macs = probe.backbone_macs(size)
    raw = np.array(ms) / backbone_ms
    shares = np.minimum(np.maximum.accumulate(raw), 1.0)  # noise can time a deeper position below, or above all
    if raw.max() > 1 + NOISE or (np.maximum.accumulate(raw) - raw).max() > NOISE:
        notes.append(f"the timings are noisy (the backbone to some position took {raw.max():.0%} of the whole "
                     "backbone's time, or less than to a shallower one): run again on a quiet machine, or with more "
                     "images and repeats")
    positions = [Position(c.module, exit_entry(c), c.num_chs, c.reduction, m, t, float(s))
                 for c, m, t, s in zip(cuts, macs, ms, shares)]
    chosen = _evenly_spaced(shares, num_exits)
    deepest = feature_stages(model)[-1].reduction
    config = ScanConfig(exits=[positions[i].entry for i in chosen], attention=attention, head_budget=head_budget,
                        head_blocks=[halvings(cuts[i].reduction, deepest) for i in chosen])
    proposed = wrap(model, config, check_input_size=size)
    return ExitProposal(model_name(model), size, batch_size, describe_device(device), backbone_macs, backbone_ms,
                        positions, chosen, proposed.config, proposed.exit_macs(size), notes)


def _costs(model: MultiExitModel, size: tuple[int, int, int], batch_size: int, images: int,
           repeats: int) -> tuple[list[int], list[float], float]:
    """Per image, up to each shallow exit's position: MACs, and measured milliseconds; and the measured
    milliseconds of the whole backbone. Heads are not run."""
    runner = model._runner
    x = torch.randn(1, *size, device=next(model.parameters()).device)
    macs, total, h = [], 0, x
    with eval_mode(model), torch.no_grad():
        for k in range(model.num_exits - 1):
            total += count_macs(runner.run_section, k, h)
            h = runner.run_section(k, h)
            macs.append(total)

    def through(k: int):
        def run(images: Tensor) -> Tensor:
            h = images
            for j in range(k + 1):
                h = runner.run_section(j, h)
            return h
        return run

    batches = [torch.randn(batch_size, *size, device=x.device) for _ in range(math.ceil(images / batch_size))]
    with eval_mode(model):
        seconds = wall_clocks({"backbone": model.backbone, **{k: through(k) for k in range(model.num_exits - 1)}},
                              batches, repeats)
    n = len(batches) * batch_size
    return macs, [1000 * seconds[k] / n for k in range(model.num_exits - 1)], 1000 * seconds["backbone"] / n


def _evenly_spaced(shares: np.ndarray, n: int) -> list[int]:
    """Indices ``i_1 < ... < i_n`` of ``shares`` (ascending) nearest, in total, to ``j / (n + 1)``."""
    m = len(shares)
    if m <= n:
        return list(range(m))
    targets = [(j + 1) / (n + 1) for j in range(n)]
    best = np.full((n, m), np.inf)  # best[j, i]: exits 0..j placed, exit j at position i
    back = np.zeros((n, m), dtype=int)
    best[0] = np.abs(shares - targets[0])
    for j in range(1, n):
        for i in range(j, m):
            prev = int(np.argmin(best[j - 1, :i]))
            best[j, i] = best[j - 1, prev] + abs(shares[i] - targets[j])
            back[j, i] = prev
    chosen = [int(np.argmin(best[n - 1]))]
    for j in range(n - 1, 0, -1):
        chosen.append(int(back[j, chosen[-1]]))
    return chosen[::-1]


def halvings(reduction: int, deepest_reduction: int) -> int:
    """SepConv blocks for a head on a map at ``reduction``: one per halving left to the deepest reduction,
    at least one."""
    return max(1, round(math.log2(max(1, deepest_reduction / reduction))))
