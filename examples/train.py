"""Train a timm model with self-distillation (or the plain baseline) on Accelerate.

    accelerate launch examples/train.py --model resnet18 --dataset ../shared/data/cifar10 \\
        --input-size 32 --epochs 200 --output-dir runs/resnet18-sd
    accelerate launch examples/train.py ... --baseline          # same recipe, plain cross-entropy

Runs unchanged on CPU, one GPU or several (``accelerate launch --multi_gpu``). Running the same
command again resumes from the last checkpoint in ``--output-dir``. Every TrainConfig field is a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from timm_scan.training import Trainer, TrainConfig

HELP = {
    "dataset": "Hub id (uoft-cs/cifar10), local parquet folder or image folder",
    "output_dir": "checkpoints, best model, metrics.jsonl and results.json go here",
    "val_size": "validation split carved out of train: a fraction (0.1) or a count (5000)",
    "train_scale": "area range of the random-resized crop",
    "exits": "feature_info indices or module names of the shallow exits (default: the papers')",
    "loss_preset": "SelfDistillationLoss settings: default, tpami (the paper's text) or released (the authors' code)",
    "anneal_epochs": "alpha and lam are 0 for this many last epochs",
    "teacher_model": "timm name of an external frozen teacher (KD + Ours)",
    "teacher_checkpoint": "safetensors weights of that teacher",
    "milestones": "epochs where a 'step' schedule multiplies the LR by gamma",
    "log_with": "an Accelerate tracker such as tensorboard",
}


def _number(text: str) -> float | int:
    return float(text) if "." in text else int(text)


def _exit(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = str(hints[f.name])
        kwargs: dict = {"help": HELP.get(f.name, "")}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        if hint == "<class 'bool'>":
            p.add_argument(flag, action="store_true", **kwargs)
            continue
        if "bool" in hint:  # unset (None) means "the preset's"
            kwargs["help"] += " (default: the loss preset's)"
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, **kwargs)
            continue
        if f.name == "exits":
            kwargs.update(nargs="*", type=_exit)
        elif f.name == "val_size":
            kwargs.update(type=_number)
        elif "tuple" in hint:
            kwargs.update(nargs=2, type=float)
        elif "list" in hint:
            kwargs.update(nargs="+", type=int)
        elif "float" in hint:
            kwargs.update(type=float)
        elif "int" in hint:
            kwargs.update(type=int)
        if not kwargs.get("required"):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs["help"] += f" (default: {default})"
        p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, **kwargs)
    return p


def main() -> None:
    args = vars(parser().parse_args())
    if "train_scale" in args:
        args["train_scale"] = tuple(args["train_scale"])
    Trainer(TrainConfig(**args)).fit()


if __name__ == "__main__":
    main()
