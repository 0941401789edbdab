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

    source: str = option(help="a training run (searched with timm-scan search), a saved model folder, an "
                              "export_onnx folder (run with ONNX Runtime), or hf-hub:owner/name", positional=True)
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = option(8000, "port to listen on")
    plain: bool = option(False, "serve the backbone alone, without early exit (to compare against)")
    replicas: int = option(1, "replicas of the model (Ray places them on this machine or across the cluster)")
    replica_cpus: float = option(1.0, "CPUs each replica takes (torch runs that many threads)")
    max_batch_size: int = option(32, "samples each section runs together at most")
    batch_wait_ms: float = option(5.0, "how long a sample waits in a section's queue for a fuller batch, in "
                                       "milliseconds")
    max_ongoing_requests: int | None = option(None, "requests a replica takes at once (default 8 x max-batch-size)")
    max_queued_requests: int = option(256, "requests waiting beyond this are refused with 503 (backpressure)")
    top_k: int = option(5, "classes with their probabilities in each answer")
    address: str | None = option(None, "a Ray cluster to serve on (ray://... or auto); default: this machine, or "
                                       "RAY_ADDRESS")

    def __post_init__(self) -> None:
        for name in ("port", "replicas", "max_batch_size", "max_queued_requests", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be a positive int; got {getattr(self, name)}")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ValueError(f"ServeConfig.max_ongoing_requests must be a positive int; got {self.max_ongoing_requests}")
        if self.batch_wait_ms < 0 or self.replica_cpus <= 0:
            raise ValueError(f"ServeConfig.batch_wait_ms must be at least 0 and replica_cpus above 0; got "
                             f"{self.batch_wait_ms} and {self.replica_cpus}")


def serve(cfg: ServeConfig) -> None:
    from ..serve import run

    run(cfg.source, host=cfg.host, port=cfg.port, plain=cfg.plain, replicas=cfg.replicas, replica_cpus=cfg.replica_cpus,
        max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_ms,
        max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests, top_k=cfg.top_k,
        address=cfg.address)
