"""Image classification data from ``datasets`` with timm's transforms.

Sources: a Hub id (``uoft-cs/cifar10``), a local folder of parquet files in the Hub's layout
(``train*.parquet``, ``test*.parquet``), or an image folder (one sub-folder per class, optionally
under ``train/`` and ``test/``). The validation split is carved deterministically out of train; the
test split (``test``, else ``validation``) is only for the final report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import timm.data
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value
from torch import nn

__all__ = ["ImageSplits", "TorchImageDataset", "build_transforms", "data_config", "detect_columns", "eval_transform",
           "load_image_dataset", "load_splits"]


@dataclass
class ImageSplits:
    """``train``/``val``/``test`` Hub datasets and what their columns mean."""

    train: Dataset
    val: Dataset
    test: Dataset | None
    image_column: str
    label_column: str
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_image_dataset(source: str) -> DatasetDict:
    """``source`` as a ``DatasetDict``: a local parquet folder, a local image folder or a Hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if files:
            data_files: dict[str, list[str]] = {}
            for split in ("train", "validation", "test"):
                matched = [str(f) for f in files if f.name.startswith(split) or f.parent.name == split]
                if matched:
                    data_files[split] = matched
            if "train" not in data_files:
                raise ValueError(
                    f"{source}: found parquet files but none named train*.parquet; name the splits as the "
                    "Hub does (train*.parquet, test*.parquet)"
                )
            return datasets.load_dataset("parquet", data_files=data_files)
        return datasets.load_dataset("imagefolder", data_dir=str(path))
    if path.suffix or source.startswith((".", "/", "~")):
        raise ValueError(f"dataset {source!r} is neither an existing folder nor a Hub id (owner/name)")
    return datasets.load_dataset(source)


def detect_columns(ds: Dataset, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """Image and label column names: the given ones, checked, or the first ``Image`` and
    ``ClassLabel`` (else integer) columns."""
    features = ds.features
    columns = list(features)
    if image_column is None:
        image_column = next((c for c in columns if isinstance(features[c], Image)), None)
        if image_column is None:
            raise ValueError(f"no image column found among {columns}; pass image_column=")
    elif image_column not in features:
        raise ValueError(f"image column {image_column!r} not in the dataset; its columns are {columns}")
    elif not isinstance(features[image_column], Image):
        raise ValueError(
            f"column {image_column!r} holds {features[image_column]!r}, not images; image columns are "
            f"{[c for c in columns if isinstance(features[c], Image)]}"
        )
    if label_column is None:
        label_column = next((c for c in columns if isinstance(features[c], ClassLabel)), None)
        if label_column is None:
            label_column = next((c for c in columns if _is_int(features[c])), None)
        if label_column is None:
            raise ValueError(f"no label column (ClassLabel or integer) found among {columns}; pass label_column=")
    elif label_column not in features:
        raise ValueError(f"label column {label_column!r} not in the dataset; its columns are {columns}")
    elif not (isinstance(features[label_column], ClassLabel) or _is_int(features[label_column])):
        raise ValueError(f"label column {label_column!r} holds {features[label_column]!r}, not class indices")
    return image_column, label_column


def _is_int(feature: Any) -> bool:
    return isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))


def load_splits(
    source: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    val_size: float | int = 0.1,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
) -> ImageSplits:
    """Load ``source`` and carve a validation split out of train.

    ``val_size``: a fraction of train (0 < f < 1) or a number of samples. The carve is stratified by
    class where labels are a ``ClassLabel`` and depends only on ``seed``. ``max_train_samples``
    keeps a prefix of train before carving (the rows of the shared CIFAR-10 are shuffled, so a
    prefix is roughly class-balanced); ``max_test_samples`` a prefix of test.
    """
    dd = load_image_dataset(source)
    if "train" not in dd:
        raise ValueError(f"dataset {source!r} has no train split; its splits are {list(dd)}")
    train = dd["train"]
    image_column, label_column = detect_columns(train, image_column, label_column)
    label_feature = train.features[label_column]
    if isinstance(label_feature, ClassLabel):
        class_names = list(label_feature.names)
    else:
        class_names = [str(i) for i in range(max(train[label_column]) + 1)]
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    if isinstance(val_size, float) and not 0 < val_size < 1 or isinstance(val_size, int) and not 0 < val_size < len(train):
        raise ValueError(f"val_size must be a fraction in (0, 1) or a count in [1, {len(train) - 1}]; got {val_size}")
    stratify = label_column if isinstance(label_feature, ClassLabel) else None
    try:
        carved = train.train_test_split(test_size=val_size, seed=seed, stratify_by_column=stratify)
    except ValueError:  # too few samples per class to stratify (tiny debug subsets)
        carved = train.train_test_split(test_size=val_size, seed=seed)
    test_name = "test" if "test" in dd else "validation" if "validation" in dd else None
    test = dd[test_name] if test_name else None
    if test is not None and max_test_samples is not None:
        test = test.select(range(min(max_test_samples, len(test))))
    return ImageSplits(carved["train"], carved["test"], test, image_column, label_column, class_names)


class TorchImageDataset(torch.utils.data.Dataset):
    """A Hub dataset as ``(image tensor (3, H, W), label)`` pairs through a transform."""

    def __init__(self, ds: Dataset, image_column: str, label_column: str, transform: Callable) -> None:
        self.ds, self.image_column, self.label_column, self.transform = ds, image_column, label_column, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.ds[i]
        return self.transform(row[self.image_column].convert("RGB")), int(row[self.label_column])


def data_config(model: nn.Module, input_size: int | None = None, crop_pct: float | None = None) -> dict[str, Any]:
    """timm's data config for ``model`` (mean, std, interpolation, crop), with overrides."""
    args: dict[str, Any] = {}
    if input_size is not None:
        args["input_size"] = (3, input_size, input_size)
    if crop_pct is not None:
        args["crop_pct"] = crop_pct
    return timm.data.resolve_model_data_config(model, args=args)


def build_transforms(config: dict[str, Any], train_scale: tuple[float, float] = (0.08, 1.0)) -> tuple[Callable, Callable]:
    """(train, eval) transforms from a timm data config: random-resized crop and flip for train
    (``train_scale`` is the crop's area range), and ``eval_transform``."""
    return timm.data.create_transform(**config, is_training=True, scale=train_scale), eval_transform(config)


def eval_transform(config: dict[str, Any]) -> Callable:
    """Resize and centre crop from a timm data config (``input_size``, ``crop_pct``, mean, std)."""
    return timm.data.create_transform(**{**config, "input_size": tuple(config["input_size"])}, is_training=False)
