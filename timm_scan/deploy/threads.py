"""torch's intra-op threads, set aside where small ops or another runtime's threads need the cores."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["one_torch_thread"]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread inside the block (the process-wide setting, restored after). For work of small
    ops, where extra threads only wait on each other, and around ONNX Runtime: a torch op run on several
    threads leaves its OpenMP workers spinning for a while after it returns, on cores that ONNX
    Runtime's next graph needs (``benchmarks/RESULTS.md`` §12)."""
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)
