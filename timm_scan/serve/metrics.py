"""What a serving replica counts, over a sliding window, and writes in Prometheus' text format.

Kept apart from Ray so that it is plain Python: `ServiceMetrics` records each answered request (its
latency, the exit it left at, its confidence), each refused one (by reason) and each batch a section ran
(its size); ``prometheus()`` gives totals since the start and, over the last ``window`` requests and
batches, latency quantiles, the mean batch size of each section, the share of samples leaving at each exit
and their mean confidence. A drift of that exit mix away from what the thresholds were searched on is the
sign that they no longer fit the traffic. Sections and exits are numbered from 0, the shallowest.
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
    latency_sum: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.batches = [0] * self.num_exits  # per section, since the start
        self.batched_samples = [0] * self.num_exits
        self._latency: collections.deque[float] = collections.deque(maxlen=self.window)
        self._exits: collections.deque[tuple[int, float]] = collections.deque(maxlen=self.window)
        self._batch_sizes = [collections.deque(maxlen=self.window) for _ in range(self.num_exits)]
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

    def batch(self, section: int, size: int) -> None:
        with self._lock:
            self.batches[section] += 1
            self.batched_samples[section] += size
            self._batch_sizes[section].append(size)

    def prometheus(self, waiting: list[int] | None = None) -> str:
        """The text exposition format (``# HELP`` and ``# TYPE`` lines, one sample a line); ``waiting``: the
        samples in each section's queue now."""
        with self._lock:
            latency = sorted(self._latency)
            exits = list(self._exits)
            sizes = [list(s) for s in self._batch_sizes]
            lines = [*header("requests_total", "counter", "requests answered, and refused by reason"),
                     f'timm_scan_requests_total{{outcome="answered"}} {self.answered}']
            lines += [f'timm_scan_requests_total{{outcome="refused",reason="{r}"}} {n}'
                      for r, n in sorted(self.refused.items())]
            lines += header("batches_total", "counter", "batches each section ran")
            lines += [f'timm_scan_batches_total{{section="{k}"}} {n}' for k, n in enumerate(self.batches)]
            lines += header("batched_samples_total", "counter", "samples each section ran")
            lines += [f'timm_scan_batched_samples_total{{section="{k}"}} {n}' for k, n in enumerate(self.batched_samples)]
            lines += header("request_latency_seconds", "summary",
                            "time from a request's arrival to its answer; quantiles over the window")
            for q in QUANTILES:  # over the window: the smallest latency at least q of the answers do not exceed
                value = latency[max(0, math.ceil(q * len(latency)) - 1)] if latency else float("nan")
                lines.append(f'timm_scan_request_latency_seconds{{quantile="{q}"}} {value:.6f}')
            lines += [f"timm_scan_request_latency_seconds_sum {self.latency_sum:.6f}",
                      f"timm_scan_request_latency_seconds_count {self.answered}"]
        lines += header("batch_size_mean", "gauge", "mean size of each section's last batches (the window)")
        lines += [f'timm_scan_batch_size_mean{{section="{k}"}} {statistics.fmean(s) if s else float("nan"):.3f}'
                  for k, s in enumerate(sizes)]
        if waiting is not None:
            lines += header("section_queue_samples", "gauge", "samples waiting in each section's queue")
            lines += [f'timm_scan_section_queue_samples{{section="{k}"}} {n}' for k, n in enumerate(waiting)]
        here = [[c for e, c in exits if e == k] for k in range(self.num_exits)]
        lines += header("exit_share", "gauge", "share of the window's answers that left at each exit")
        lines += [f'timm_scan_exit_share{{exit="{k}"}} {len(h) / len(exits) if exits else float("nan"):.4f}'
                  for k, h in enumerate(here)]
        lines += header("exit_confidence_mean", "gauge", "mean confidence of the window's answers at each exit")
        lines += [f'timm_scan_exit_confidence_mean{{exit="{k}"}} {statistics.fmean(h) if h else float("nan"):.4f}'
                  for k, h in enumerate(here)]
        lines.append(f"# window: the last {len(exits)} answers (of at most {self.window})")
        return "\n".join(lines) + "\n"


def header(name: str, kind: str, help: str) -> list[str]:
    """The ``# HELP`` and ``# TYPE`` lines of metric ``timm_scan_<name>``."""
    return [f"# HELP timm_scan_{name} {help}", f"# TYPE timm_scan_{name} {kind}"]
