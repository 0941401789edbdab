"""``timm-scan export RUN``: a trained run's best model as ONNX graphs (one per section and per exit
head) with a manifest, for `OnnxEarlyExitPredictor` (``pip install 'timm-scan[onnx]'``).

The exit policy ``timm-scan search`` kept goes into the manifest, and with ``--latency-batch-sizes``
each exit's latency timed with ONNX Runtime on this machine. Writes ``<run>/onnx/`` unless told
otherwise; ``timm-scan push RUN owner/name --onnx`` uploads it beside the model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..deploy.latency import check_timing_arguments
from ..deploy.onnx import MANIFEST, OnnxEarlyExitPredictor, OnnxManifest, export_onnx
from ..options import option
from ..training.runs import load_run

__all__ = ["ExportConfig", "export"]


@dataclass
class ExportConfig:
    """What ``timm-scan export`` does."""

    run: str = option(help="output directory of a training run", positional=True)
    output: str | None = option(None, "folder for the graphs and manifest (default: <run>/onnx)", aliases=["--output-dir"])
    input_size: int | None = option(None, "square input side the graphs take (default: the run's)")
    opset: int = option(18, "ONNX opset")
    latency_batch_sizes: list[int] = option([], "also time each exit with ONNX Runtime at these batch sizes and "
                                                "write the measurements into the manifest")


def export(cfg: ExportConfig) -> OnnxManifest:
    """Export and return the manifest."""
    model, _ = load_run(cfg.run)
    size = (3, cfg.input_size, cfg.input_size) if cfg.input_size is not None else None
    folder = Path(cfg.output or Path(cfg.run) / "onnx")
    for batch_size in cfg.latency_batch_sizes:  # before anything is written
        check_timing_arguments(batch_size, 64, 5)
    print(f"exporting {cfg.run} to ONNX in {folder} (one graph per section and per exit, each checked against "
          "PyTorch; this takes a while)", flush=True)
    manifest = export_onnx(model, folder, size, opset=cfg.opset)
    if manifest.policy.thresholds is None:
        print(f"warning: {cfg.run} has no thresholds (run `timm-scan search` first); the export's predictor then "
              "needs a policy=ExitPolicy(thresholds=[...])", file=sys.stderr)
    if cfg.latency_batch_sizes:  # the timing forces its own thresholds; the fallback and temperatures are the model's
        print(f"timing each exit with ONNX Runtime at batch sizes {cfg.latency_batch_sizes}", flush=True)
        predictor = OnnxEarlyExitPredictor(folder, manifest.policy.replace(thresholds=[1.0] * (len(manifest.exits) - 1)))
        manifest.exit_latency = [predictor.measure_exit_latency(bs) for bs in cfg.latency_batch_sizes]
        manifest.save(folder / MANIFEST)
        for latency in manifest.exit_latency:
            print(f"batch {latency.batch_size}: {', '.join(f'{v:.3f}' for v in latency.ms_per_image)} ms per image "
                  f"by exit (backbone {latency.backbone_ms_per_image:.3f})")
    print(f"exported {manifest.architecture} ({len(manifest.exits)} exits, input {tuple(manifest.input_size)}) to "
          f"{folder}: {', '.join(manifest.sections + manifest.exits)}, manifest.json")
    return manifest
