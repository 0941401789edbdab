"""Wrap a timm model and print its exits (the same as ``timm-scan inspect``).

    python examples/inspect_exits.py --model resnet18 --input-size 32
"""

from timm_scan.cli import parse_config
from timm_scan.commands.inspect import InspectConfig, inspect

if __name__ == "__main__":
    inspect(parse_config(InspectConfig, description=__doc__))
