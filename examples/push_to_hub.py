"""Push a trained run's best model to the Hugging Face Hub with its card (the same as ``timm-scan push``).

    python examples/push_to_hub.py runs/demo your-name/resnet18-cifar10-scan [--private] [--revision BRANCH]
"""

from timm_scan.cli import parse_config
from timm_scan.commands.push import PushConfig, push

if __name__ == "__main__":
    push(parse_config(PushConfig, description=__doc__))
