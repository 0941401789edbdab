"""Search early-exit thresholds for a trained run, on its validation split (the same as ``timm-scan search``).

    python examples/search_thresholds.py runs/demo                       # β sweep, keep β = 1
    python examples/search_thresholds.py runs/demo --beta 5 --baseline-run runs/baseline
"""

from timm_scan.cli import parse_config
from timm_scan.commands.search import SearchConfig, search

if __name__ == "__main__":
    record = search(parse_config(SearchConfig, description=__doc__))
    print(f"validation accuracy {record.chosen.accuracy:.2f}% at {record.chosen.acceleration:.2f}x fewer MACs")
