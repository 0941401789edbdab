"""Cost of inference: multiply-accumulates (MACs) counted with torch's flop counter, and wall-clock.

Convention: MACs = FLOPs / 2 as ``torch.utils.flop_counter.FlopCounterMode`` counts them:
convolutions (transposed too), matrix products and attention. Element-wise ops, normalisation and
pooling are not counted, as in fvcore and most papers' tables.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels but not the one scaled_dot_product_attention uses on CPU.
_EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop}


def count_macs(fn: Callable[..., Any], *args: Any) -> int:
    """MACs of one call ``fn(*args)``, run under ``torch.no_grad``."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


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
