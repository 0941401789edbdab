"""Export a trained run's best model to ONNX, keeping the early exit (the same as ``timm-scan export``).

    python examples/export_onnx.py runs/demo                 # → runs/demo/onnx/
    python -c "import timm_scan; print(timm_scan.OnnxEarlyExitPredictor('runs/demo/onnx')(images).exit_index)"
"""

from timm_scan.cli import parse_config
from timm_scan.commands.export import ExportConfig, export

if __name__ == "__main__":
    export(parse_config(ExportConfig, description=__doc__))
