"""What a serving replica counts, over a sliding window, and writes in Prometheus' text format.

Kept apart from Ray so that it is plain Python: `ServiceMetrics` records each answered request (its
latency, the exit it left at, its confidence), each refused one (by reason) and each batch the model ran
(its size); ``prometheus()`` gives totals since the start and, over the last ``window`` requests, latency
quantiles, the share of samples leaving at each exit and their mean confidence. A drift of that exit mix
away from what the thresholds were searched on is the sign that they no longer fit the traffic.
"""

from __future__ import annotations

import collections
import math
import statistics
import threading
from dataclasses import dataclass, field

__all__ = ["ServiceMetrics"]

QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class ServiceMetrics:
    """Counters and a sliding window of the last ``window`` answers, for a model of ``num_exits`` exits."""

    num_exits: int
    window: int = 1000
    answered: int = field(default=0, init=False)
    refused: collections.Counter = field(default_factory=collections.Counter, init=False)
    batches: int = field(default=0, init=False)
    batched_samples: int = field(default=0, init=False)
    latency_sum: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._latency: collections.deque[float] = collections.deque(maxlen=self.window)
        self._exits: collections.deque[tuple[int, float]] = collections.deque(maxlen=self.window)
        self._batch_sizes: collections.deque[int] = collections.deque(maxlen=self.window)
        self._lock = threading.Lock()

    def answer(self, seconds: float, exit_index: int, confidence: float) -> None:
        with self._lock:
            self.answered += 1
            self.latency_sum += seconds
            self._latency.append(seconds)
            self._exits.append((exit_index, confidence))

    def refuse(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] += 1

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batched_samples += size
            self._batch_sizes.append(size)

    def prometheus(self) -> str:
        """The text exposition format (``# TYPE`` lines, one sample a line)."""
        with self._lock:
            latency = sorted(self._latency)
            exits = list(self._exits)
            sizes = list(self._batch_sizes)
            lines = ["# TYPE timm_scan_requests_total counter",
                     f'timm_scan_requests_total{{outcome="answered"}} {self.answered}']
            lines += [f'timm_scan_requests_total{{outcome="refused",reason="{r}"}} {n}'
                      for r, n in sorted(self.refused.items())]
            lines += ["# TYPE timm_scan_batches_total counter", f"timm_scan_batches_total {self.batches}",
                      "# TYPE timm_scan_batched_samples_total counter",
                      f"timm_scan_batched_samples_total {self.batched_samples}",
                      "# TYPE timm_scan_request_latency_seconds summary"]
            for q in QUANTILES:  # over the window: the smallest latency at least q of the answers do not exceed
                value = latency[max(0, math.ceil(q * len(latency)) - 1)] if latency else float("nan")
                lines.append(f'timm_scan_request_latency_seconds{{quantile="{q}"}} {value:.6f}')
            lines += [f"timm_scan_request_latency_seconds_sum {self.latency_sum:.6f}",
                      f"timm_scan_request_latency_seconds_count {self.answered}"]
        lines += ["# TYPE timm_scan_batch_size_mean gauge",
                  f"timm_scan_batch_size_mean {statistics.fmean(sizes) if sizes else float('nan'):.3f}"]
        here = [[c for e, c in exits if e == k] for k in range(self.num_exits)]
        lines.append("# TYPE timm_scan_exit_share gauge")
        lines += [f'timm_scan_exit_share{{exit="{k}"}} {len(h) / len(exits) if exits else float("nan"):.4f}'
                  for k, h in enumerate(here)]
        lines.append("# TYPE timm_scan_exit_confidence_mean gauge")
        lines += [f'timm_scan_exit_confidence_mean{{exit="{k}"}} {statistics.fmean(h) if h else float("nan"):.4f}'
                  for k, h in enumerate(here)]
        lines.append(f"# window: the last {len(exits)} answers (of at most {self.window})")
        return "\n".join(lines) + "\n"
