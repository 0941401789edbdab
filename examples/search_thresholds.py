"""Search early-exit thresholds for a trained run, on its validation split (the same as ``timm-scan search``).

    python examples/search_thresholds.py runs/demo                       # β sweep, keep β = 1
    python examples/search_thresholds.py runs/demo --beta 5 --baseline-run runs/baseline
    python examples/search_thresholds.py runs/demo --max-drop 0.5        # the cheapest within 0.5 points
    python examples/search_thresholds.py runs/demo --budget-ms 2         # the most accurate within 2 ms per image here
    python examples/search_thresholds.py runs/demo --budget-macs 2e8 --calibrate
"""

from timm_scan.cli import parse_config
from timm_scan.commands.search import SearchConfig, search

if __name__ == "__main__":
    record = search(parse_config(SearchConfig, description=__doc__))
    print(f"kept {record.target or f'β = {record.chosen.beta:g}'}: validation accuracy "
          f"{100 * record.chosen.accuracy:.2f}%, speed-up {record.chosen.speedup:.2f}x")
