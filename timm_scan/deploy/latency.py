"""Measured latency of each exit: what leaving at exit i costs on this device, as the predictor runs it.

MACs are the paper's cost; wall-clock is what users pay, and the two part ways where a head's small
ops cost more time than their MACs say. `measure_exit_latency` times, in turns with the plain
backbone, one `EarlyExitPredictor` per exit whose thresholds send every sample to that exit; the
result (`ExitLatency`) can be the cost the threshold search optimises (``search_thresholds(probs,
labels, ExitCosts.from_latency(latency))``), and travels with the model (``model.exit_latency``, saved by ``save_pretrained``
and shown on its card). `OnnxEarlyExitPredictor.measure_exit_latency` times an exported model the
same way (`time_exits`).
"""

from __future__ import annotations

import copy
import math
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..exit_policy import ExitPolicy
from ..model.config import check_input_size
from ..model.multi_exit import MultiExitModel
from ..report import ExitLatency
from .predictor import EarlyExitPredictor
from .timing import wall_clocks

__all__ = ["check_timing_arguments", "describe_device", "measure_exit_latency", "processor_name", "time_exits"]

_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def processor_name() -> str:
    """This machine's processor, e.g. ``"AMD EPYC 7B13"`` (the machine type where it is not known)."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return names[0] if names else platform.processor() or platform.machine()


def describe_device(device: torch.device) -> str:
    """The processor, thread count and torch version, e.g. ``"cpu: AMD EPYC 7B13, 2 threads, torch 2.14.1"``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{processor_name()}, {torch.get_num_threads()} threads"
    return f"{device.type}: {name}, torch {torch.__version__.split('+')[0]}"


def time_exits(
    predictor: Any,
    backbone: Callable[[torch.Tensor], Any],
    num_exits: int,
    batches: list[torch.Tensor],
    repeats: int,
) -> tuple[list[float], float]:
    """Milliseconds per image of leaving at each exit (cumulative) and of the plain ``backbone``.

    ``predictor``: an `EarlyExitPredictor` or `OnnxEarlyExitPredictor`; exit i is timed with a shallow
    copy of it (the same heads or sessions) whose policy's thresholds send every sample there
    (confidence > 0 always holds, > 1 never), in turns with the backbone (`wall_clocks`). Noise can time
    a deeper exit below a shallower one; such an entry is raised to the one before it."""
    def forced(thresholds: list[float]) -> Any:
        copied = copy.copy(predictor)
        copied.policy = predictor.policy.replace(thresholds=thresholds)
        return copied

    k = num_exits
    predictors = {f"exit {i + 1}": forced([1.0] * i + [0.0] + [1.0] * (k - 2 - i)) for i in range(k - 1)}
    predictors[f"exit {k}"] = forced([1.0] * (k - 1))
    seconds = wall_clocks({"backbone": backbone, **predictors}, batches, repeats)
    n = sum(len(b) for b in batches)
    measured = [1000 * seconds[name] / n for name in predictors]
    return [float(v) for v in np.maximum.accumulate(measured)], 1000 * seconds["backbone"] / n


def check_timing_arguments(batch_size: Any, images: Any, repeats: Any) -> None:
    """A ``ValueError`` unless all three are positive ints."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (images, repeats)):
        raise ValueError(f"images and repeats must be positive ints; got {images!r}, {repeats!r}")


def measure_exit_latency(
    model: MultiExitModel,
    input_size: tuple[int, int, int] | None = None,
    batch_size: int = 1,
    *,
    memory_format: str = "contiguous",
    images: int = 64,
    repeats: int = 5,
    policy: ExitPolicy | None = None,
    fallback: str | None = None,
) -> ExitLatency:
    """Milliseconds per image of leaving at each exit, at ``batch_size``, on the model's device and dtype.

    ``input_size``: ``(C, H, W)``, by default the model's data config. ``memory_format``:
    ``"contiguous"`` or ``"channels_last"`` (the images'; convert the model too, as you deploy it).
    Each timed pass runs ``images`` random images (rounded up to whole batches); the median of
    ``repeats`` passes counts, with the exits and the backbone taking turns (`wall_clocks`).
    ``policy``: the rule, fallback and temperatures to time with (default the model's own, ``model.policy``);
    the fallback is part of the deepest exit's cost. Its thresholds are not used. (``fallback=``, the
    earlier keyword, still works with a deprecation warning.) Noise can time a deeper exit below a shallower one; such an entry is raised
    to the one before it, so ``ms_per_image`` is cumulative. Everything runs in eval mode; the model
    is left in the mode it came in.
    """
    if memory_format not in _MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {sorted(_MEMORY_FORMATS)}; got {memory_format!r}")
    check_timing_arguments(batch_size, images, repeats)
    if input_size is None:
        if not model.data_config:
            raise ValueError("input_size: the model has no data config; pass (channels, height, width)")
        input_size = tuple(model.data_config["input_size"])
    input_size = check_input_size(input_size)
    weight = next(model.parameters())
    was_training = model.training
    policy = policy or model.policy
    if fallback is not None:
        warnings.warn("measure_exit_latency(..., fallback=...) is deprecated: pass policy=model.policy.replace("
                      "fallback=...)", DeprecationWarning, stacklevel=2)
        policy = policy.replace(fallback=fallback)
    batches = [torch.randn(batch_size, *input_size, device=weight.device, dtype=weight.dtype)
               .contiguous(memory_format=_MEMORY_FORMATS[memory_format]) for _ in range(math.ceil(images / batch_size))]
    try:  # the predictors put the model in eval mode; the backbone is timed in it too
        predictor = EarlyExitPredictor(model, policy.replace(thresholds=[1.0] * (model.num_exits - 1)))
        exits_ms, backbone_ms = time_exits(predictor, model.backbone, model.num_exits, batches, repeats)
    finally:
        model.train(was_training)
    return ExitLatency(
        ms_per_image=exits_ms,
        backbone_ms_per_image=backbone_ms,
        batch_size=batch_size,
        input_size=list(input_size),
        dtype=str(weight.dtype).removeprefix("torch."),
        memory_format=memory_format,
        device=describe_device(weight.device),
    )
