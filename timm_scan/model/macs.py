"""Multiply-accumulates (MACs) counted with torch's flop counter.

Convention: MACs = FLOPs / 2 as ``torch.utils.flop_counter.FlopCounterMode`` counts them:
convolutions (transposed too), matrix products and attention. Element-wise ops, normalisation and
pooling are not counted, as in fvcore and most papers' tables.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_macs"]

aten = torch.ops.aten


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels but not the one scaled_dot_product_attention uses on CPU.
_EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop}


class _GlobalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: only the total is read here, and the tracker's
    backward hooks fail on a parameter passed straight to a module under ``no_grad`` (CaiT's class
    token: "Expected gradient function to be set")."""

    parents = ("Global",)

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def count_macs(fn: Callable[..., Any], *args: Any) -> int:
    """MACs of one call ``fn(*args)``, run under ``torch.no_grad``."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    if hasattr(counter, "mod_tracker"):  # torch 2.4+: a private attribute, read at enter, exit and each count
        counter.mod_tracker = _GlobalOnly()
    with torch.no_grad(), counter:
        fn(*args)
    return counter.get_total_flops() // 2
