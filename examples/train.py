"""Train a timm model with self-distillation (or the plain baseline) on Accelerate.

    accelerate launch examples/train.py --model resnet18 --dataset ../shared/data/cifar10 \\
        --input-size 32 --epochs 200 --output-dir runs/resnet18-sd
    accelerate launch examples/train.py ... --baseline          # same recipe, plain cross-entropy

The same as ``timm-scan train``: every TrainConfig field is a flag, and timm's train.py names work too
(-b, --img-size, --amp, --model-kwargs, ...). Runs unchanged on CPU, one GPU or several (``accelerate
launch --multi_gpu``); running the same command again resumes, and so does ``--resume OUTPUT_DIR``.
"""

from timm_scan.cli import command_errors, parse_config
from timm_scan.training import TrainConfig
from timm_scan.training.trainer import Trainer

if __name__ == "__main__":
    config = parse_config(TrainConfig, description=__doc__)  # or TrainConfig(dataset=..., model=..., ...)
    with command_errors("train.py"):  # a bad input or a diverging run: one line and exit 1, as timm-scan train
        Trainer(config).fit()
