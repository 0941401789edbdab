"""ScanConfig: the validated, serialisable description of what `wrap` adds to a backbone."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from .._io import JsonRecord

__all__ = ["ATTENTION_KINDS", "HEAD_KINDS", "ScanConfig", "check_input_size"]

ATTENTION_KINDS = ("sd", "scan", "none")
HEAD_KINDS = ("sepconv", "pooled")  # ExitHead's kinds (timm_scan.model.heads)
MAX_HEAD_CHANNELS = 16384  # beyond any timm stage's width: a larger value is a damaged config, not a model
MAX_HEAD_BLOCKS = 32


@dataclass
class ScanConfig(JsonRecord):
    """How to turn a timm backbone into a multi-exit network.

    Attributes:
        exits: where the shallow exits go, as entries of the backbone's ``feature_info``: an index
            (negative counts from the end) or a module name such as ``"layer2"``. ``None`` picks the
            papers' default (three shallow exits, never on the stem; see ``default_exit_indices``).
            ``[]`` gives no shallow exit: the plain backbone behind the multi-exit interface. The
            last ``feature_info`` stage cannot be an exit: the backbone's own head is the deepest
            classifier. After ``wrap`` the model's config holds the resolved indices, ascending.
        attention: attention module in front of each shallow head: ``"sd"`` (Self-Distillation,
            TPAMI 2021), ``"scan"`` (SCAN, NeurIPS 2019) or ``"none"``.
        head: the kind of shallow head: ``"sepconv"`` (the papers': a SepConv align net to the deepest
            stage's width, then pooling and a linear classifier) or ``"pooled"`` (latency-oriented,
            as in SDN and earlyon: pooling straight after the stage, then a two-layer MLP).
        head_channels: output width of every align net (``"sepconv"``; ``None`` uses the deepest
            stage's width) or the MLP's hidden width (``"pooled"``; ``None`` uses 128).
        head_blocks: SepConv blocks per align net; ``None`` uses the papers' ``K - i`` for exit ``i``
            (1-based) of ``K`` classifiers. Only for ``"sepconv"`` heads.
    """

    exits: list[int | str] | None = None
    attention: str = "sd"
    head_channels: int | None = None
    head_blocks: int | None = None
    head: str = "sepconv"

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
        for name, most in (("head_channels", MAX_HEAD_CHANNELS), ("head_blocks", MAX_HEAD_BLOCKS)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
                raise ValueError(f"ScanConfig.{name} must be an int in [1, {most}] or None; got {value!r}")


def check_input_size(input_size: Any) -> tuple[int, int, int]:
    """``input_size`` as a tuple of ints (NumPy's included), or a ``ValueError`` unless it is
    (channels, height, width) of positive ints."""
    values = tuple(input_size) if isinstance(input_size, (tuple, list)) else ()
    if len(values) != 3 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
                                   for v in values):
        raise ValueError(f"input_size must be (channels, height, width) of positive ints; got {input_size!r}")
    return tuple(int(v) for v in values)
