"""ExitCosts: what leaving at each exit costs, and what the plain backbone costs, in one unit.

The threshold search's cost argument (``search_thresholds(probs, labels, costs, ...)``). Counted MACs
come from ``model.exit_costs(input_size)``; milliseconds measured on a device from an `ExitLatency`
(``ExitCosts.from_latency(timm_scan.measure_exit_latency(...))``). Exits are listed shallowest first;
entry i is cumulative: sections 0..i and the heads of exits 0..i. The speed-up of a policy is
``backbone / mean cost per sample`` (`speedup`): the one speed ratio of the package.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._io import JsonRecord

if TYPE_CHECKING:
    from .report import ExitLatency

__all__ = ["COST_UNITS", "ExitCosts"]

COST_UNITS = ("macs", "ms")  # counted multiply-accumulates per image, or measured milliseconds per image


def _positive(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < math.inf


@dataclass(frozen=True)
class ExitCosts(JsonRecord):
    """Per-exit cumulative costs and the plain backbone's, per image.

    ``per_exit``: K positive numbers, non-decreasing from the shallowest exit. ``backbone``: the plain
    backbone's cost in the same unit (the baseline of every speed-up). ``unit``: ``"macs"`` or
    ``"ms"``. ``device``: for milliseconds, where they were measured (processor, threads, runtime,
    batch size, input size; `ExitLatency.describe`).
    """

    per_exit: tuple[float, ...]
    backbone: float
    unit: str = "macs"
    device: str | None = None

    def __post_init__(self) -> None:
        values = None if isinstance(self.per_exit, (str, bytes)) or not hasattr(self.per_exit, "__len__") else list(
            self.per_exit.tolist() if hasattr(self.per_exit, "tolist") else self.per_exit)
        if not values or not all(_positive(v) for v in [*values, self.backbone]):
            raise ValueError(f"ExitCosts: per_exit and backbone must be positive numbers; got {self.per_exit!r}, "
                             f"{self.backbone!r}")
        if any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"ExitCosts: per_exit must be cumulative (non-decreasing from the shallowest exit); got "
                             f"{values}")
        if self.unit not in COST_UNITS:
            raise ValueError(f"ExitCosts.unit must be one of {COST_UNITS}; got {self.unit!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"ExitCosts.device must be a description (str) or None; got {self.device!r}")
        object.__setattr__(self, "per_exit", tuple(float(v) for v in values))
        object.__setattr__(self, "backbone", float(self.backbone))

    @classmethod
    def macs(cls, exit_macs: Sequence[int], backbone_macs: int) -> ExitCosts:
        """Counted MACs per image: ``model.exit_macs(size)`` and ``model.backbone_macs(size)``."""
        return cls(tuple(exit_macs), backbone_macs, "macs")

    @classmethod
    def from_latency(cls, latency: ExitLatency) -> ExitCosts:
        """Milliseconds per image measured by ``measure_exit_latency`` (valid for its device, batch size,
        input size, dtype and memory format, which ``device`` records)."""
        return cls(tuple(latency.ms_per_image), latency.backbone_ms_per_image, "ms", latency.describe())

    @property
    def num_exits(self) -> int:
        return len(self.per_exit)

    def speedup(self, mean_cost: float) -> float:
        """The plain backbone's cost over ``mean_cost`` (the mean cost per sample of a policy)."""
        return self.backbone / mean_cost

    def describe(self, value: float) -> str:
        """``value`` in this unit, in words (``"1.23 MMACs"``, ``"0.456 ms"``)."""
        return f"{value / 1e6:.2f} MMACs" if self.unit == "macs" else f"{value:.3f} ms"
