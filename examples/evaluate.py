"""Report a trained run's early exit on its test split (the same as ``timm-scan evaluate``).

    python examples/search_thresholds.py runs/demo     # first: thresholds from validation
    python examples/evaluate.py runs/demo
"""

from timm_scan.cli import parse_config
from timm_scan.commands.evaluate import EvaluateConfig, evaluate

if __name__ == "__main__":
    evaluate(parse_config(EvaluateConfig, description=__doc__))
