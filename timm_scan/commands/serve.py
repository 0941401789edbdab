"""``timm-scan serve SOURCE``: the early-exit model behind an HTTP service on Ray Serve (``timm_scan.serve``):
``GET /health``, ``POST /predict`` (one encoded image as the body), ``GET /policy``, ``GET /metrics``.
Stop it with Ctrl-C."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import option

__all__ = ["ServeConfig", "serve"]


@dataclass
class ServeConfig:
    """What ``timm-scan serve`` does."""

    source: str = option(help="a training run (searched with timm-scan search), a saved model folder, or "
                              "hf-hub:owner/name", positional=True)
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = option(8000, "port to listen on")
    replicas: int = option(1, "replicas of the model (Ray places them on this machine or across the cluster)")
    max_batch_size: int = option(32, "requests batched together at most")
    batch_wait_ms: float = option(5.0, "how long a request waits for others to fill its batch, in milliseconds")
    max_queued_requests: int = option(256, "requests waiting beyond this are refused with 503 (backpressure)")
    top_k: int = option(5, "classes with their probabilities in each answer")

    def __post_init__(self) -> None:
        for name in ("port", "replicas", "max_batch_size", "max_queued_requests", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be a positive int; got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"ServeConfig.batch_wait_ms must be at least 0; got {self.batch_wait_ms}")


def serve(cfg: ServeConfig) -> None:
    from ..serve import run

    run(cfg.source, host=cfg.host, port=cfg.port, replicas=cfg.replicas, max_batch_size=cfg.max_batch_size,
        batch_wait_ms=cfg.batch_wait_ms, max_queued_requests=cfg.max_queued_requests, top_k=cfg.top_k)
