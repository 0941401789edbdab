"""Wall-clock timing of inference: functions compared in turns, so drift falls on all alike."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["wall_clock", "wall_clocks"]


def wall_clocks(fns: dict[str, Callable[[torch.Tensor], Any]], batches: list[torch.Tensor], repeats: int = 3) -> dict[str, float]:
    """Seconds each function takes to run over all ``batches``: the median of ``repeats`` passes,
    after one warm-up batch each, under ``torch.no_grad``; CUDA is synchronised around each pass.

    The functions take turns pass by pass (A, B, A, B, ...), so drift in the machine's speed falls
    on all of them alike: time the things you compare in one call.
    """
    def synchronise() -> None:
        if batches[0].is_cuda:
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(batches[0])
        for _ in range(repeats):
            for name, fn in fns.items():
                synchronise()
                started = time.perf_counter()
                for batch in batches:
                    fn(batch)
                synchronise()
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def wall_clock(fn: Callable[[torch.Tensor], Any], batches: list[torch.Tensor], repeats: int = 3) -> float:
    """``wall_clocks`` for one function."""
    return wall_clocks({"fn": fn}, batches, repeats)["fn"]
