"""Serving: the early-exit model behind an HTTP service on Ray Serve (``pip install 'timm-scan[serve]'``).

``timm_scan.serve.run(source, host=..., port=...)`` (``timm-scan serve``) starts it; `SectionBatcher` is
how each replica batches (per section, across requests), `ServiceMetrics` what it counts. The core package does not import this subpackage or Ray.
"""

from pathlib import Path
from typing import Any

from .batcher import SectionBatcher
from .metrics import ServiceMetrics

__all__ = ["SectionBatcher", "ServiceMetrics", "run"]


def run(source: str | Path, **options: Any) -> None:
    """Serve ``source`` (``timm_scan.serve.app.run``, whose keywords ``options`` are: ``host``, ``port``,
    ``plain``, ``replicas``, ``replica_cpus``, ``max_batch_size``, ``batch_wait_ms``, ``max_ongoing_requests``,
    ``max_queued_requests``, ``top_k``, ``address``, ``route_prefix``, ``blocking``);
    Ray is imported on call, so that a missing Ray is one clear error."""
    try:
        from .app import run as run_app
    except ImportError as exc:
        raise ValueError(f"serving needs Ray Serve ({exc}); install it with pip install 'timm-scan[serve]'") from None
    run_app(source, **options)
