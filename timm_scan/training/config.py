"""TrainConfig: everything a training run depends on, validated; each field's help lives in its
metadata, from which the command line is generated (``timm_scan.cli``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import timm
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .._io import JsonRecord
from ..model.backbone import check_model_kwargs
from ..model.config import ATTENTION_KINDS, CROP_PCT_RANGE, DEFAULT_HEAD_BUDGET, HEAD_KINDS, ScanConfig
from ..options import did_you_mean, option
from .losses import PRESETS, SelfDistillationLoss

__all__ = ["TrainConfig"]

TRAIN_CONFIG = "train_config.json"
TIMM_PRECISIONS = {"float16": "fp16", "bfloat16": "bf16"}  # timm's --amp-dtype names
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the optimizers take lr and weight_decay as float32


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclass
class TrainConfig(JsonRecord):
    """A training run: data, model, loss, optimisation and output. ``None`` means "the default of
    what it configures" (the model's data config, the loss preset's value, Accelerate's mixed precision,
    ...). Saved in a run folder as ``train_config.json`` (`JsonRecord`: tuples as lists, unknown fields
    refused), with the mixed precision the trainer used in place of ``None``."""

    absent: ClassVar[dict[str, Any]] = {"head_budget": None}  # runs from before the budget: the papers' heads

    # data
    dataset: str = option(help="Hub id (uoft-cs/cifar10), local parquet folder (train*.parquet, test*.parquet) or image folder")
    image_column: str | None = option(None, "image column (default: the first Image feature)")
    label_column: str | None = option(None, "label column (default: the first ClassLabel, else integer, feature)")
    num_classes: int | None = option(None, "number of classes; must match the dataset's (default: the dataset's)")
    val_size: float | int = option(0.1, "validation split carved out of train: a fraction (0.1) or a count (5000)")
    max_train_samples: int | None = option(None, "keep only the first N training images (before the validation carve)")
    max_test_samples: int | None = option(None, "keep only the first N test images")
    input_size: int | None = option(None, "square input side in pixels (default: --model-kwargs img_size where given, "
                                          "else the model's pretrained_cfg)", aliases=["--img-size"])
    crop_pct: float | None = option(None, "centre-crop fraction for evaluation (default: the model's)")
    train_scale: tuple[float, float] = option((0.08, 1.0), "area range of the random-resized crop", aliases=["--scale"])
    skip_bad_images: bool = option(False, "leave out (with a warning) images that do not decode, instead of stopping")
    # model
    model: str = option("resnet18", "timm model name")
    model_kwargs: dict[str, Any] = option({}, "more keyword arguments of timm.create_model, as timm's train.py takes "
                                              "them: KEY=VALUE ..., each VALUE a Python literal or else a string "
                                              "(img_size=32 builds a ViT or Swin for 32x32 inputs)")
    pretrained: bool = option(False, "start from timm's own weights (its classifier replaced where the classes differ)")
    init_from: str | None = option(None, "start from weights you have: a save_pretrained folder, an hf-hub: id or a "
                                     "timm checkpoint (.safetensors) of --model, with the same classes",
                                 aliases=["--initial-checkpoint"])
    freeze_backbone: bool = option(False, "train the exits only: the backbone, BatchNorm statistics included, stays "
                                      "exactly as given, so the deepest classifier is unchanged (the best epoch is "
                                      "then the one whose exits are the most accurate on average)")
    grad_checkpointing: bool = option(False, "gradient checkpointing of the backbone (less memory, more compute)")
    baseline: bool = option(False, "the plain backbone with cross-entropy under the same recipe (no exits)")
    exits: list[int | str] | None = option(None, "feature_info indices or module names of the shallow exits "
                                             "(default: the papers' three)")
    attention: str = option(ScanConfig.attention, f"attention module of the shallow heads: one of {ATTENTION_KINDS} "
                                                  "(the papers' heads: sd, and no head budget)")
    head_channels: int | None = option(None, "width of the exit heads' align nets (default: sized by the head budget; "
                                             "the deepest stage's without one); for pooled heads, the MLP's hidden "
                                             "width (default 128)")
    head_blocks: list[int] | None = option(None, "SepConv blocks per head: one count for every head, or one per "
                                                 "shallow exit, shallowest first (default: the papers' K - i)")
    head: str = option("sepconv", f"kind of shallow head: one of {HEAD_KINDS} (pooled: latency-oriented, "
                                  "pooling then a two-layer MLP, as in SDN and earlyon)")
    head_budget: float | None = option(
        DEFAULT_HEAD_BUDGET, "what the SepConv heads together may add, a fraction of the backbone's MACs at the "
        "input size: their align width is the widest within it (ScanConfig.head_budget)",
        switches={"--no-head-budget": None})
    # loss
    loss_preset: str = option("default", f"SelfDistillationLoss settings, one of {sorted(PRESETS)}: default (the "
                                     "library's, chosen by measurement), tpami (the paper's text), released (the "
                                     "authors' code); the loss fields below override it")
    alpha: float | None = option(None, "weight of the KD term of the shallow exits, in [0, 1]")
    lam: float | None = option(None, "weight of the feature hint (0 turns it off)")
    temperature: float | None = option(None, "KD temperature T")
    teacher: str | None = option(None, "the shallow exits' teacher: deepest, ensemble, transitive or dense")
    exit_reduction: str | None = option(None, "sum the exits' losses ('sum'), average them ('mean', 1/K) or "
                                                 "add the shallow exits' mean to the deepest's ('shallow-mean')")
    t_squared: bool | None = option(None, "scale KD by T²")
    hint_reduction: str | None = option(None, "feature hint: 'mean' squared error, 'sum' of squares over the feature, "
                                          "or 'dist' (unsquared L2 of the batch)")
    hint_nearest: bool | None = option(None, "the shallow exit nearest the deepest gets the hint too")
    anneal_epochs: int = option(0, "alpha and lam are 0 for this many last epochs (the TPAMI text: 5 of 300)")
    teacher_model: str | None = option(None, "timm name of an external frozen teacher (KD + Ours)")
    teacher_checkpoint: str | None = option(None, "that teacher's weights (.safetensors)")
    external_weight: float = option(0.5, "weight of the external teacher's KD in every exit's label term")
    # optimisation
    epochs: int = option(200, "training epochs")
    batch_size: int = option(128, "batch size per process", aliases=["-b"])
    grad_accum: int = option(1, "gradient accumulation steps", aliases=["--grad-accum-steps"])
    optimizer: str = option("sgd", "'sgd' (momentum) or 'adamw'")
    lr: float = option(0.1, "peak learning rate")
    momentum: float = option(0.9, "SGD momentum, in [0, 1)")
    weight_decay: float = option(5e-4, "weight decay")
    schedule: str = option("cosine", "'cosine' (to 0, per step) or 'step' (times gamma at each milestone)")
    milestones: list[int] = option([66, 133], "epochs after which a 'step' schedule multiplies the LR by gamma "
                                               "(strictly increasing, at most --epochs)",
                                   aliases=["--decay-milestones"])
    gamma: float = option(0.1, "LR factor at each milestone of a 'step' schedule, in (0, 1]", aliases=["--decay-rate"])
    warmup_epochs: int = option(0, "linear warm-up epochs")
    mixed_precision: str | None = option(None, "'no', 'bf16' or 'fp16' (timm's 'float16' and 'bfloat16' too); --amp "
                                               "is fp16, as in timm (default: what Accelerate is configured with: "
                                               "accelerate launch --mixed_precision, accelerate config or "
                                               "ACCELERATE_MIXED_PRECISION, else 'no'; train_config.json records the "
                                               "precision used)", aliases=["--amp-dtype"], switches={"--amp": "fp16"})
    seed: int = option(0, "seed of everything: weights, validation carve, data order, augmentation")
    num_workers: int = option(2, "data loader workers per process", aliases=["-j", "--workers"])
    # output
    output_dir: str = option("runs/scan", "checkpoints, best model, metrics.jsonl and results.json go here; running "
                                      "the same command again resumes")
    keep_checkpoints: int = option(3, "how many epoch checkpoints to keep", aliases=["--checkpoint-hist"])
    log_with: str | None = option(None, "an Accelerate tracker, e.g. tensorboard")
    push_to_hub: str | None = option(None, "a Hub repo id (owner/name): the best model is pushed there at the end")

    def __post_init__(self) -> None:
        if isinstance(self.train_scale, list):
            self.train_scale = tuple(self.train_scale)
        if isinstance(self.head_blocks, int) and not isinstance(self.head_blocks, bool):
            self.head_blocks = [self.head_blocks]  # one count for every head (a run saved before the lists)
        elif isinstance(self.head_blocks, tuple):
            self.head_blocks = list(self.head_blocks)
        self.mixed_precision = TIMM_PRECISIONS.get(self.mixed_precision, self.mixed_precision)
        check_model_kwargs(self.model_kwargs, "TrainConfig.model_kwargs")
        img_size = self.model_kwargs.get("img_size")
        if isinstance(img_size, (list, tuple)) and len(set(img_size)) == 1:
            img_size = img_size[0]
        if self.input_size is None and isinstance(img_size, int) and not isinstance(img_size, bool):
            self.input_size = img_size  # the size the model is built for, which a ViT or Swin takes only
        def positive(value: Any) -> bool:
            return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)

        def count(value: Any, least: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= least

        if not count(self.epochs, 1):  # first: the checks below compare with it
            raise ValueError(f"TrainConfig.epochs must be an int >= 1; got {self.epochs!r}")
        in_epochs = (f", each at most epochs={self.epochs} (a 'step' schedule multiplies the LR by gamma after that "
                     "many epochs)" if self.schedule == "step" else "")
        checks = [
            ("attention", self.attention in ATTENTION_KINDS, f"one of {ATTENTION_KINDS}"),
            ("head", self.head in HEAD_KINDS, f"one of {HEAD_KINDS}"),
            ("lr", _number(self.lr) and 0 < self.lr <= FLOAT32_MAX,
             f"a number in (0, {FLOAT32_MAX:.3g}] (the optimizer steps in float32)"),
            ("momentum", _number(self.momentum) and 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", _number(self.weight_decay) and 0 <= self.weight_decay <= FLOAT32_MAX,
             f"a number in [0, {FLOAT32_MAX:.3g}] (the optimizer steps in float32)"),
            ("gamma", _number(self.gamma) and 0 < self.gamma <= 1, "in (0, 1]: a step schedule lowers the LR"),
            ("warmup_epochs", isinstance(self.warmup_epochs, int) and 0 <= self.warmup_epochs <= self.epochs,
             f"an int in [0, epochs={self.epochs}]"),
            ("milestones", isinstance(self.milestones, (list, tuple)) and all(count(m, 1) for m in self.milestones)
             and all(a < b for a, b in zip(self.milestones, self.milestones[1:]))
             and (self.schedule != "step" or all(m <= self.epochs for m in self.milestones)),
             f"epoch numbers in strictly increasing order{in_epochs}"),
            ("input_size", self.input_size is None or (isinstance(self.input_size, int) and 8 <= self.input_size <= 4096),
             "an int in [8, 4096] pixels"),
            ("crop_pct", self.crop_pct is None or (_number(self.crop_pct) and CROP_PCT_RANGE[0] <= self.crop_pct <= 1),
             f"in [{CROP_PCT_RANGE[0]}, 1] (a saved model's data config allows no less)"),
            ("train_scale", len(self.train_scale) == 2 and all(_number(v) for v in self.train_scale)
             and 0 < self.train_scale[0] <= self.train_scale[1] <= 1, "two numbers 0 < low <= high <= 1"),
            ("max_train_samples", positive(self.max_train_samples), "a positive int"),
            ("max_test_samples", positive(self.max_test_samples), "a positive int"),
            ("num_classes", positive(self.num_classes), "a positive int"),
            ("num_workers", isinstance(self.num_workers, int) and self.num_workers >= 0, "an int >= 0"),
            ("external_weight", _number(self.external_weight) and 0 <= self.external_weight <= 1, "in [0, 1]"),
            ("optimizer", self.optimizer in ("sgd", "adamw"), "'sgd' or 'adamw'"),
            ("schedule", self.schedule in ("cosine", "step"), "'cosine' or 'step'"),
            ("mixed_precision", self.mixed_precision in (None, "no", "bf16", "fp16"), "'no', 'bf16' or 'fp16'"),
            ("batch_size", count(self.batch_size, 1), "an int >= 1"),
            ("grad_accum", count(self.grad_accum, 1), "an int >= 1"),
            ("anneal_epochs", count(self.anneal_epochs, 0) and self.anneal_epochs <= self.epochs,
             f"an int in [0, epochs={self.epochs}]"),
            ("keep_checkpoints", count(self.keep_checkpoints, 1), "an int >= 1"),
            ("seed", count(self.seed, 0), "an int >= 0"),
            ("val_size", (isinstance(self.val_size, float) and 0 < self.val_size < 1) or count(self.val_size, 1),
             "a fraction in (0, 1) or a count >= 1"),
            ("model", isinstance(self.model, str) and timm.is_model(self.model), "a timm model name"),
            ("teacher_model", self.teacher_model is None or timm.is_model(self.teacher_model), "a timm model name"),
            ("teacher_checkpoint", self.teacher_checkpoint is None or Path(self.teacher_checkpoint).is_file(),
             "an existing .safetensors file"),
        ]
        for name, ok, valid in checks:
            if not ok:
                value = getattr(self, name)
                hint = did_you_mean(value, timm.list_models()) if name.endswith("model") and isinstance(value, str) else ""
                raise ValueError(f"TrainConfig.{name} must be {valid}; got {value!r}{hint}")
        if self.optimizer == "adamw" and self.lr * self.weight_decay > FLOAT32_MAX:
            raise ValueError(f"TrainConfig.lr * weight_decay must be at most {FLOAT32_MAX:.3g} for AdamW (its "
                             "decoupled decay multiplies the weights by 1 - lr * weight_decay in float32); got "
                             f"{self.lr:g} * {self.weight_decay:g}")
        if self.freeze_backbone and (self.baseline or self.exits == []):
            raise ValueError("TrainConfig.freeze_backbone trains only the exits, and this run has none (baseline)")
        self.scan_config()  # bad exits or head settings fail here, before any data loads
        self.loss_settings()  # likewise an unknown preset or an invalid loss setting
        if (self.teacher_model is None) != (self.teacher_checkpoint is None):
            raise ValueError("TrainConfig.teacher_model and teacher_checkpoint go together: pass both or neither")
        if self.push_to_hub is not None:
            try:
                validate_repo_id(self.push_to_hub)
            except HFValidationError as exc:
                raise ValueError(f"TrainConfig.push_to_hub must be a Hub repo id such as 'owner/name'; got "
                                 f"{self.push_to_hub!r} ({exc})") from None

    def scan_config(self) -> ScanConfig:
        """What ``wrap`` adds: no exit for a baseline."""
        return ScanConfig(exits=[] if self.baseline else self.exits, attention=self.attention,
                          head_channels=self.head_channels, head_blocks=self.head_blocks, head=self.head,
                          head_budget=self.head_budget)

    def loss_settings(self) -> dict[str, Any]:
        """The ``SelfDistillationLoss`` arguments: the preset's, overridden by the fields that are set."""
        if self.loss_preset not in PRESETS:
            raise ValueError(f"TrainConfig.loss_preset must be one of {sorted(PRESETS)}; got {self.loss_preset!r}")
        settings = dict(PRESETS[self.loss_preset])
        settings.update({k: getattr(self, k) for k in settings if getattr(self, k) is not None})
        SelfDistillationLoss(**settings, external_weight=self.external_weight)  # validates
        return settings

    @classmethod
    def for_resume(cls, run: str | Path, **given: Any) -> TrainConfig:
        """The config ``run`` saved (an earlier ``output_dir``), the fields in ``given`` replacing its values:
        ``timm-scan train --resume RUN``. A rerun compares them with the saved ones (`RunFolder.resume`)."""
        folder = Path(run)
        if not (folder / TRAIN_CONFIG).is_file():
            raise ValueError(f"--resume {run}: {folder / TRAIN_CONFIG} does not exist; --resume takes the --output-dir "
                             "of an earlier timm-scan train run")
        if "output_dir" in given and Path(given["output_dir"]).resolve() != folder.resolve():
            raise ValueError(f"--resume {run} continues the run in {run}; drop --output-dir {given['output_dir']}")
        return cls.from_dict({**cls.load(folder).to_dict(), **given, "output_dir": str(folder)})

    def save(self, folder: str | Path) -> Path:
        """Write ``<folder>/train_config.json`` whole or not at all."""
        return super().save(Path(folder) / TRAIN_CONFIG)

    @classmethod
    def load(cls, folder: str | Path) -> TrainConfig:
        """The config a run saved (``<folder>/train_config.json``); a missing or damaged file, unknown fields
        or invalid values are a ``ValueError`` naming the file and what to do."""
        try:
            return super().load(Path(folder) / TRAIN_CONFIG)
        except ValueError as exc:
            raise ValueError(f"{exc}. It holds the settings that resuming, search and evaluate rebuild the run (its "
                             "splits, model and recipe) from, and training writes it whole: restore it from a copy, "
                             "or train again into another --output-dir") from None
