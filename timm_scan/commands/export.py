"""``timm-scan export RUN``: a trained run's best model as ONNX graphs (one per section and per exit
head) with a manifest, for `OnnxEarlyExitPredictor` (``pip install 'timm-scan[onnx]'``).

The thresholds ``timm-scan search`` kept go into the manifest. Writes ``<run>/onnx/`` unless told
otherwise; ``timm-scan push RUN owner/name --onnx`` uploads it beside the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..deploy.onnx import OnnxManifest, export_onnx
from ..options import option
from ..training.runs import load_run

__all__ = ["ExportConfig", "export"]


@dataclass
class ExportConfig:
    """What ``timm-scan export`` does."""

    run: str = option(help="output directory of a training run", positional=True)
    output: str | None = option(None, "folder for the graphs and manifest (default: <run>/onnx)")
    input_size: int | None = option(None, "square input side the graphs take (default: the run's)")
    opset: int = option(18, "ONNX opset")


def export(cfg: ExportConfig) -> OnnxManifest:
    """Export and return the manifest."""
    model, _ = load_run(cfg.run)
    size = (3, cfg.input_size, cfg.input_size) if cfg.input_size else None
    folder = Path(cfg.output or Path(cfg.run) / "onnx")
    manifest = export_onnx(model, folder, size, opset=cfg.opset)
    print(f"exported {manifest.architecture} ({len(manifest.exits)} exits, input {tuple(manifest.input_size)}) to "
          f"{folder}: {', '.join(manifest.sections + manifest.exits)}, manifest.json")
    return manifest
