"""Typed results that travel between the trainer, evaluation, the model card and the benchmarks, and
the one per-exit table they are all shown in.

Conventions: exits are listed shallowest first, the deepest (the backbone's own head) last;
accuracies are fractions in [0, 1], here as everywhere in the package's API and records (only what is
printed or plotted is in percent); MACs are per image and cumulative (leaving at exit i costs sections
1..i and heads 1..i); a speed-up is the plain backbone's cost over the mean cost per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._io import JsonRecord
from .exit_policy import ExitPolicy

__all__ = ["Calibration", "EarlyExitReport", "EpochMetrics", "ExitAccuracy", "ExitLatency", "RunResults", "SweepPoint", "WallClock",
           "exit_table"]


@dataclass
class ExitAccuracy(JsonRecord):
    """Accuracy of every exit (``exits``, shallowest first) and of the ensemble (``None`` for a
    single exit), over ``samples`` samples."""

    exits: list[float]
    ensemble: float | None
    samples: int

    @property
    def deepest(self) -> float:
        return self.exits[-1]


@dataclass
class ExitLatency(JsonRecord):
    """Measured cost of leaving at each exit on one device (``timm_scan.measure_exit_latency``, or
    ``OnnxEarlyExitPredictor.measure_exit_latency`` for an ONNX export).

    ``ms_per_image`` (K floats, shallowest first): wall-clock per image of a batch that all leaves at
    exit i, as the early-exit predictor runs it (sections and heads 1..i), cumulative and increasing;
    ``backbone_ms_per_image``: the plain backbone's, timed in turns with them. Valid for the
    ``batch_size``, ``input_size`` (C, H, W), ``dtype``, ``memory_format`` and ``device`` it was
    measured at (``device`` describes the processor and runtime: threads and torch version, or the
    ONNX Runtime providers and version).
    """

    ms_per_image: list[float]
    backbone_ms_per_image: float
    batch_size: int
    input_size: list[int]
    dtype: str
    memory_format: str
    device: str

    def __post_init__(self) -> None:
        values = [*self.ms_per_image, self.backbone_ms_per_image] if isinstance(self.ms_per_image, list) else None
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")
                                 for v in values):
            raise ValueError(f"ExitLatency: ms_per_image and backbone_ms_per_image must be positive numbers; got "
                             f"{self.ms_per_image!r}, {self.backbone_ms_per_image!r}")
        if any(b < a for a, b in zip(self.ms_per_image, self.ms_per_image[1:])):
            raise ValueError(f"ExitLatency: ms_per_image must be cumulative (non-decreasing); got {self.ms_per_image}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"ExitLatency: batch_size must be a positive int; got {self.batch_size!r}")

    def predict_ms(self, exit_index: Sequence[int]) -> float:
        """Predicted milliseconds for a batch whose samples leave at ``exit_index`` (0-based, one per sample)."""
        return float(sum(self.ms_per_image[int(i)] for i in exit_index))

    def describe(self) -> str:
        size = "x".join(str(s) for s in self.input_size[1:])
        return f"{self.device}, batch {self.batch_size}, {size}, {self.dtype}, {self.memory_format}"


@dataclass
class Calibration(JsonRecord):
    """Per-exit temperature scaling (``timm_scan.calibrate``): the ``temperatures`` (one per exit) and each
    exit's expected calibration error (a fraction) on the outputs it was measured on, ``before`` and
    ``after``."""

    temperatures: list[float]
    before: list[float]
    after: list[float]


@dataclass
class RunResults(JsonRecord):
    """A finished training run (``results.json``): the best epoch on validation and its test accuracy."""

    model: str
    baseline: bool
    best_epoch: int
    val: ExitAccuracy
    test: ExitAccuracy | None
    exit_macs: list[int]
    backbone_macs: int
    params: int
    loss: dict[str, Any] | None = None  # the SelfDistillationLoss settings (None for a baseline)


@dataclass
class EpochMetrics(JsonRecord):
    """One line of ``metrics.jsonl``: training loss parts per exit (batch means over the epoch) and
    validation accuracy."""

    epoch: int
    lr: float
    seconds: float  # the epoch, validation included
    step_seconds: float  # mean wall-clock of a training step
    loss: float
    ce: list[float]
    kd: list[float]
    hint: list[float]
    val: ExitAccuracy

    def scalars(self) -> dict[str, float]:
        """Flat names for experiment trackers (TensorBoard, W&B, ...)."""
        out = {"train/loss": self.loss, "train/lr": self.lr, "train/step_seconds": self.step_seconds}
        for name in ("ce", "kd", "hint"):
            out.update({f"train/{name}_exit{i + 1}": v for i, v in enumerate(getattr(self, name))})
        out.update({f"val/accuracy_exit{i + 1}": v for i, v in enumerate(self.val.exits)})
        if self.val.ensemble is not None:
            out["val/accuracy_ensemble"] = self.val.ensemble
        return out


@dataclass
class WallClock(JsonRecord):
    """Measured time per image of the plain backbone and of the early-exit predictor."""

    batch_size: int
    images: int
    backbone_ms_per_image: float
    early_exit_ms_per_image: float

    @property
    def speedup(self) -> float:
        return self.backbone_ms_per_image / self.early_exit_ms_per_image


@dataclass
class SweepPoint(JsonRecord):
    """One β of the threshold search's sweep, its thresholds evaluated on a split: accuracy and
    speed-up in MACs."""

    renamed: ClassVar[dict[str, str]] = {"macs_speedup": "speedup"}

    beta: float
    thresholds: list[float]
    accuracy: float
    speedup: float


@dataclass
class EarlyExitReport(JsonRecord):
    """Early exit evaluated on a split (``evaluation.json``): every exit's accuracy, and the accuracy,
    speed-up in MACs and share of samples per exit under the exit ``policy`` (with how it was chosen);
    measured wall-clock; the β sweep of the threshold search evaluated on this split; whether the
    search's target holds here; each exit's calibration error (``ece`` at temperature 1,
    ``ece_calibrated`` at the policy's temperatures). Files written before the exit policy (loose
    ``thresholds``, ``fallback``, ``temperatures``, ``beta``) are read into this form."""

    renamed: ClassVar[dict[str, str]] = {"macs_speedup": "speedup"}

    split: str
    per_exit: ExitAccuracy
    exit_macs: list[int]
    backbone_macs: int
    policy: ExitPolicy
    accuracy: float
    speedup: float
    exit_shares: list[float]
    wall_clock: list[WallClock] = field(default_factory=list)
    sweep: list[SweepPoint] = field(default_factory=list)
    target: str | None = None  # the target the thresholds were searched for on validation, in words
    target_held: bool | None = None  # whether it holds on this split (None: kept at β)
    agreement: float | None = None  # share of samples answered as the deepest exit answers them
    ece: list[float] | None = None  # expected calibration error per exit on this split, at temperature 1
    ece_calibrated: list[float] | None = None  # ... and at the policy's temperatures

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EarlyExitReport:
        if isinstance(data, dict) and "policy" not in data and "thresholds" in data:
            data = dict(data)
            loose = {key: data.pop(key, None) for key in ("thresholds", "fallback", "temperatures", "beta")}
            data["policy"] = ExitPolicy(loose["thresholds"], loose["fallback"] or "ensemble",
                                        loose["temperatures"]).to_dict()
        return super().from_dict(data)


def exit_table(
    exit_macs: Sequence[int],
    backbone_macs: int,
    accuracy: ExitAccuracy | None = None,
    *,
    stages: Sequence[str] | None = None,
    extra: dict[str, Sequence[str]] | None = None,
    markdown: bool = False,
) -> str:
    """The per-exit table: exit, stage (if given), accuracy (if given), MMACs and share of the plain
    backbone's MACs, one row per exit and one for the ensemble. ``extra``: more columns, one string
    per row (ensemble row included where there is one). Plain text, or Markdown for cards and RESULTS."""
    k = len(exit_macs)
    header = ["exit", *(["stage"] if stages else []), *(["accuracy"] if accuracy else []), "MMACs", "of backbone",
              *(extra or {})]
    rows = []
    for i, macs in enumerate(exit_macs):
        name = f"{i + 1}" + (" (deepest)" if i == k - 1 and k > 1 else "")
        rows.append([name, *([stages[i]] if stages else []), *([f"{100 * accuracy.exits[i]:.2f}%"] if accuracy else []),
                     f"{macs / 1e6:.2f}", f"{macs / backbone_macs:.1%}"])
    if k > 1 and (accuracy is None or accuracy.ensemble is not None):
        rows.append(["ensemble", *(["all"] if stages else []),
                     *([f"{100 * accuracy.ensemble:.2f}%"] if accuracy else []),
                     f"{exit_macs[-1] / 1e6:.2f}", f"{exit_macs[-1] / backbone_macs:.1%}"])
    for values in (extra or {}).values():
        for row, value in zip(rows, values):
            row.append(value)
    if markdown:
        return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                         + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(r[j])) for r in [header, *rows]) for j in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
                     for r in [header, *rows])
