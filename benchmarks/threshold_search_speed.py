"""Time SCAN's genetic threshold search: 10,000 samples, K = 4 exits, 100 generations, population 64.

    python benchmarks/threshold_search_speed.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from timm_scan import ExitCosts, search_thresholds


def synthetic(n: int = 10_000, k: int = 4, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    probs = []
    for i in range(k):
        logits = rng.normal(size=(n, classes))
        logits[np.arange(n), labels] += rng.normal(1.0 + 0.7 * i, 1.5, n)
        p = np.exp(logits - logits.max(1, keepdims=True))
        probs.append(p / p.sum(1, keepdims=True))
    return probs, labels


def main() -> None:
    probs, labels = synthetic()
    times = []
    for seed in range(5):
        started = time.perf_counter()
        search_thresholds(probs, labels, ExitCosts.macs([10, 20, 30, 42], 40), beta=1.0, generations=100, seed=seed)
        times.append(time.perf_counter() - started)
    print(f"genetic search, 10,000 samples, K = 4, 100 generations: median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}, 5 runs)")


if __name__ == "__main__":
    main()
