"""ScanConfig: the validated, serialisable description of what `wrap` adds to a backbone."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .._io import JsonRecord

__all__ = ["ATTENTION_KINDS", "DEFAULT_HEAD_BUDGET", "HEAD_KINDS", "ScanConfig", "check_data_config",
           "check_input_size"]

ATTENTION_KINDS = ("sd", "scan", "none")
HEAD_KINDS = ("sepconv", "pooled")  # ExitHead's kinds (timm_scan.model.heads)
MAX_HEAD_CHANNELS = 16384  # beyond any timm stage's width: a larger value is a damaged config, not a model
MAX_HEAD_BLOCKS = 32
DEFAULT_HEAD_BUDGET = 0.05  # the shallow heads together: at most 5% of the backbone's MACs (benchmarks/RESULTS.md §18)
MAX_INPUT_SIDE = 4096  # the largest height or width a saved model or export may name
# What a data config (timm's: how images are resized, cropped and normalised) may hold: ranges that every
# timm pretrained config lies well inside (crop_pct 0.875-1.15, mean 0-0.5, std 0.14-1)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's eval transforms'
CROP_MODES = ("center", "squash", "border")
CROP_PCT_RANGE = (0.05, 2.0)  # below, the resize before the crop would be over 20 times the input size
MEAN_RANGE = (0.0, 1.0)  # of pixel values in [0, 1]
STD_RANGE = (0.01, 10.0)  # normalised pixels stay within 100 of 0


@dataclass
class ScanConfig(JsonRecord):
    """How to turn a timm backbone into a multi-exit network.

    Attributes:
        exits: where the shallow exits go: entries of the backbone's ``feature_info`` (an index, negative
            counting from the end, or a module name such as ``"layer2"``), or blocks inside its stages by
            module name (``"layer3.0"``: a module ``forward_features`` calls once that returns a feature
            map; ``timm_scan.propose_exits`` lists them). ``None`` picks the papers' default (three
            shallow exits, never on the stem; see ``positions.default_exit_indices``). ``[]`` gives no
            shallow exit: the plain backbone behind the multi-exit interface. The last ``feature_info``
            stage cannot be an exit: the backbone's own head is the deepest classifier. After ``wrap``
            the model's config holds the resolved exits in forward order: stage indices, blocks' names.
        attention: attention module in front of each shallow head: ``"sd"`` (Self-Distillation,
            TPAMI 2021), ``"scan"`` (SCAN, NeurIPS 2019) or ``"none"`` (the default: on wide models at 224x224
            the SD attention alone takes most of the head budget, for no gain beyond the noise measured at
            equal width; benchmarks/RESULTS.md §18). The papers' heads are
            ``ScanConfig.papers()``.
        head: the kind of shallow head: ``"sepconv"`` (the papers': a SepConv align net, its width sized by
            ``head_budget``, then pooling and a linear classifier) or ``"pooled"`` (latency-oriented, as in
            SDN and earlyon: pooling straight after the stage, then a two-layer MLP).
        head_channels: output width of every align net (``"sepconv"``) or the MLP's hidden width
            (``"pooled"``; ``None`` uses 128). For ``"sepconv"``, ``None`` sizes it by ``head_budget``, or,
            without a budget, uses the deepest stage's width (the papers' align nets). After ``wrap`` the
            model's config holds the width used, so that the saved config re-creates the same heads.
        head_blocks: SepConv blocks per align net: one count for every head (also given as a list of one), a
            list of one per shallow exit (shallowest first), or ``None``, the papers' ``K - i`` for exit ``i`` (1-based) of ``K``
            classifiers. Only for ``"sepconv"`` heads.
        head_budget: what all shallow heads together may add, as a fraction of the plain backbone's MACs
            at the input size ``wrap`` checks the model at (its ``check_input_size``, by default the
            model's ``pretrained_cfg`` input size): ``wrap`` gives ``"sepconv"`` heads without a
            ``head_channels`` the widest align width (a multiple of 8, at most the deepest stage's) within
            it, and refuses, saying what costs what, where even width 8 is over it. A stage's map is counted
            as ``ceil(H / r) x ceil(W / r)``; where layers are unpadded (Inception) the maps are smaller and
            the heads cost less than counted. With a budget, an align net narrower than its input narrows in
            its first conv, whether the width was sized or given (an explicit ``head_channels`` is not checked
            against the budget). ``None``: no budget, the papers' align nets (with ``head_channels=None``, to
            the deepest stage's width). Pooled heads are not sized.
    """

    exits: list[int | str] | None = None
    attention: str = "none"
    head_channels: int | None = None
    head_blocks: int | list[int] | None = None
    head: str = "sepconv"
    head_budget: float | None = DEFAULT_HEAD_BUDGET

    # saved before the budget existed: their heads were the papers' (full width where head_channels is None)
    absent: ClassVar[dict[str, Any]] = {"head_budget": None}

    @classmethod
    def papers(cls, **fields: Any) -> ScanConfig:
        """The papers' exit heads (TPAMI's SD attention, SepConv align nets to the deepest stage's width, no
        budget), with any other ``fields``."""
        return cls(**{"attention": "sd", "head_budget": None, **fields})

    def __post_init__(self) -> None:
        if self.exits is not None:
            if isinstance(self.exits, (str, int)) or not isinstance(self.exits, (list, tuple)):
                raise ValueError(
                    f"ScanConfig.exits must be a list of feature_info indices or module names, or None "
                    f"for the default; got {self.exits!r}"
                )
            self.exits = list(self.exits)
            for i, e in enumerate(self.exits):
                if isinstance(e, bool) or not isinstance(e, (int, str)):
                    raise ValueError(
                        f"ScanConfig.exits[{i}] must be an int (feature_info index) or a str (module "
                        f"name); got {e!r} of type {type(e).__name__}"
                    )
            if len(set(self.exits)) != len(self.exits):
                raise ValueError(f"ScanConfig.exits has duplicates: {self.exits!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"ScanConfig.attention must be one of {', '.join(map(repr, ATTENTION_KINDS))}; "
                f"got {self.attention!r}"
            )
        if self.head not in HEAD_KINDS:
            raise ValueError(f"ScanConfig.head must be one of {', '.join(map(repr, HEAD_KINDS))}; got {self.head!r}")
        if self.head == "pooled" and self.head_blocks is not None:
            raise ValueError("ScanConfig.head_blocks applies to 'sepconv' heads; a 'pooled' head has no align net")
        budget = self.head_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Real)
                                   or not math.isfinite(budget) or not 0 < budget <= 1):
            raise ValueError(f"ScanConfig.head_budget must be a fraction of the backbone's MACs in (0, 1] (0.05 is "
                             f"5%), or None for no budget; got {budget!r}")
        def count(value: Any, most: int) -> bool:
            return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= most

        if self.head_channels is not None and not count(self.head_channels, MAX_HEAD_CHANNELS):
            raise ValueError(f"ScanConfig.head_channels must be an int in [1, {MAX_HEAD_CHANNELS}] or None; "
                             f"got {self.head_channels!r}")
        blocks = self.head_blocks
        if isinstance(blocks, (list, tuple)):  # one count in a list is one count for every head
            self.head_blocks = blocks = blocks[0] if len(blocks) == 1 else list(blocks)
        if blocks is not None and not (count(blocks, MAX_HEAD_BLOCKS) or isinstance(blocks, list) and blocks and all(
                count(b, MAX_HEAD_BLOCKS) for b in blocks)):
            raise ValueError(f"ScanConfig.head_blocks must be an int in [1, {MAX_HEAD_BLOCKS}], a list of one such int "
                             f"per shallow exit, or None; got {blocks!r}")


def check_input_size(input_size: Any) -> tuple[int, int, int]:
    """``input_size`` as a tuple of ints (NumPy's included), or a ``ValueError`` unless it is
    (channels, height, width) of positive ints."""
    values = tuple(input_size) if isinstance(input_size, (tuple, list)) else ()
    if len(values) != 3 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
                                   for v in values):
        raise ValueError(f"input_size must be (channels, height, width) of positive ints; got {input_size!r}")
    return tuple(int(v) for v in values)


def check_data_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """timm's data config (``resolve_model_data_config``'s keys: ``input_size``, ``interpolation``, ``mean``,
    ``std``, ``crop_pct``, ``crop_mode``; those present, no others) as a dict with ``input_size`` a tuple, or
    a ``ValueError`` naming the field: (C, H, W) up to ``MAX_INPUT_SIDE`` a side, one of timm's
    interpolations and crop modes, C means in ``MEAN_RANGE`` and C standard deviations in ``STD_RANGE``
    (pixels in [0, 1]), ``crop_pct`` in ``CROP_PCT_RANGE``."""
    if not isinstance(config, Mapping):
        raise ValueError(f"the data config must be a JSON object; got {config!r}")
    known = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    unknown = sorted(set(config) - set(known), key=str)
    if unknown:
        raise ValueError(f"the data config has unknown fields {unknown}; it knows {list(known)}")
    data = dict(config)
    if "input_size" in data:
        try:
            data["input_size"] = check_input_size(data["input_size"])
        except ValueError as exc:
            raise ValueError(f"data config field 'input_size': {exc}") from None
        if max(data["input_size"][1:]) > MAX_INPUT_SIDE:
            raise ValueError(f"data config field 'input_size' is {data['input_size']}; models load with (C, H, W) "
                             f"up to {MAX_INPUT_SIDE} pixels a side")
    channels = data["input_size"][0] if "input_size" in data else None

    def number_in(value: Any, low: float, high: float) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and low <= value <= high

    def per_channel(values: Any, low: float, high: float) -> bool:
        return isinstance(values, (list, tuple)) and len(values) == (channels or len(values)) > 0 and all(
            number_in(v, low, high) for v in values)

    count = f"{channels} " if channels else ""
    checks = [
        ("interpolation", lambda v: v in INTERPOLATIONS, f"one of {INTERPOLATIONS}"),
        ("crop_mode", lambda v: v in CROP_MODES, f"one of {CROP_MODES}"),
        ("mean", lambda v: per_channel(v, *MEAN_RANGE), f"{count}numbers in {list(MEAN_RANGE)}, one per channel"),
        ("std", lambda v: per_channel(v, *STD_RANGE), f"{count}numbers in {list(STD_RANGE)}, one per channel"),
        ("crop_pct", lambda v: number_in(v, *CROP_PCT_RANGE), f"a number in {list(CROP_PCT_RANGE)}"),
    ]
    for name, ok, valid in checks:
        if name in data and not ok(data[name]):
            raise ValueError(f"data config field {name!r} must be {valid}; got {data[name]!r}")
    return data
