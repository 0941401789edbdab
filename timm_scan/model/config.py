"""ScanConfig: the validated, serialisable description of what `wrap` adds to a backbone."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["ATTENTION_KINDS", "ScanConfig"]

ATTENTION_KINDS = ("sd", "scan", "none")


@dataclass
class ScanConfig:
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
        head_channels: output width of every align net; ``None`` uses the deepest stage's width.
        head_blocks: SepConv blocks per align net; ``None`` uses the papers' ``K - i`` for exit ``i``
            (1-based) of ``K`` classifiers.
    """

    exits: list[int | str] | None = None
    attention: str = "sd"
    head_channels: int | None = None
    head_blocks: int | None = None

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
        for name in ("head_channels", "head_blocks"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ScanConfig.{name} must be a positive int or None; got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScanConfig:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        if not isinstance(data, dict):
            raise ValueError(f"ScanConfig.from_dict expects a dict; got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ScanConfig field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ScanConfig:
        return cls.from_dict(json.loads(text))
