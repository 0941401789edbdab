"""Image classification data from ``datasets`` with timm's transforms.

Sources: a Hub id (``uoft-cs/cifar10``), a local folder of parquet files in the Hub's layout
(``train*.parquet``, ``test*.parquet``), or an image folder (one sub-folder per class, optionally
under ``train/`` and ``test/``). The validation split is carved deterministically out of train; the
test split (``test``, else ``validation``) is only for the final report.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import PIL.Image
import timm.data
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value
from torch import nn
from tqdm.auto import tqdm

__all__ = ["ImageSplits", "TorchImageDataset", "build_transforms", "data_config", "detect_columns", "eval_transform",
           "load_image_dataset", "load_splits", "to_rgb"]


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
    skip_bad_images: bool = False,
) -> ImageSplits:
    """Load ``source``, check it, and carve a validation split out of train.

    ``val_size``: a fraction of train (0 < f < 1) or a number of samples. The carve is stratified by
    class where labels are a ``ClassLabel`` and depends only on ``seed`` (a class with a single image
    cannot be stratified: then the carve is not, with a warning). ``max_train_samples`` keeps a
    prefix of train before carving (the rows of the shared CIFAR-10 are shuffled, so a prefix is
    roughly class-balanced); ``max_test_samples`` a prefix of test.

    Checked before anything trains (``ValueError`` naming the split and row): labels are class
    indices 0..C-1 (integer labels must use every index below their maximum; the test split may not
    hold a class train does not), and every image opens as an image (``skip_bad_images``: images that
    do not decode fully are left out, with a warning naming them, instead).
    """
    dd = load_image_dataset(source)
    if "train" not in dd:
        raise ValueError(f"dataset {source!r} has no train split; its splits are {list(dd)}")
    train = dd["train"]
    image_column, label_column = detect_columns(train, image_column, label_column)
    label_feature = train.features[label_column]
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    test_name = "test" if "test" in dd else "validation" if "validation" in dd else None
    test = dd[test_name] if test_name else None
    if test is not None and max_test_samples is not None:
        test = test.select(range(min(max_test_samples, len(test))))
    train = _checked_images(train, "train", image_column, skip_bad_images)
    test = _checked_images(test, test_name, image_column, skip_bad_images) if test is not None else None
    class_names = _class_names(train, test, label_column, test_name)
    if isinstance(val_size, float) and not 0 < val_size < 1 or isinstance(val_size, int) and not 0 < val_size < len(train):
        raise ValueError(f"val_size must be a fraction in (0, 1) or a count in [1, {len(train) - 1}]; got {val_size}")
    stratify = label_column if isinstance(label_feature, ClassLabel) else None
    if stratify is not None:
        counts = Counter(train[label_column])
        alone = sorted(class_names[c] for c, n in counts.items() if n < 2)
        if alone:
            warnings.warn(f"classes {alone} have a single training image: the validation split is carved without "
                          "stratification")
            stratify = None
    carved = train.train_test_split(test_size=val_size, seed=seed, stratify_by_column=stratify)
    return ImageSplits(carved["train"], carved["test"], test, image_column, label_column, class_names)


def _class_names(train: Dataset, test: Dataset | None, label_column: str, test_name: str | None) -> list[str]:
    """The classes, from a ``ClassLabel`` or from integer labels, with every label checked to be one."""
    feature = train.features[label_column]
    labels = {"train": train[label_column], **({test_name: test[label_column]} if test is not None else {})}
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        used = sorted(set(labels["train"]))
        if used and (used[0] < 0 or used[-1] != len(used) - 1):
            shown = used if len(used) <= 10 else [*used[:5], "...", *used[-3:]]
            raise ValueError(f"integer labels must be the class indices 0..C-1, each used in train; train uses {shown}. "
                             "Remap them, or cast the column to a datasets.ClassLabel")
        names = [str(i) for i in used]
    for split, values in labels.items():
        bad = next(((row, v) for row, v in enumerate(values) if not 0 <= v < len(names)), None)
        if bad is not None:
            raise ValueError(f"row {bad[0]} of the {split} split has label {bad[1]}, not a class of train (0..{len(names) - 1})")
    return names


def _checked_images(ds: Dataset, split: str, image_column: str, skip_bad: bool) -> Dataset:
    """``ds`` once every image has been opened (header and integrity, or a full decode where bad images are
    to be skipped); a ``ValueError`` naming the first bad row, or those rows left out with a warning."""
    raw = ds.select_columns([image_column]).cast_column(image_column, Image(decode=False))
    items = (item for batch in raw.iter(batch_size=1024) for item in batch[image_column])
    bad = []
    for row, item in enumerate(tqdm(items, total=len(raw), desc=f"checking {split} images", leave=False)):
        reason = _image_problem(item, full=skip_bad)
        if reason is None:
            continue
        where = f"row {row} of the {split} split" + (f" ({item['path']})" if item and item.get("path") else "")
        if not skip_bad:
            raise ValueError(f"{where}: the image cannot be read ({reason}); fix or remove it, or pass "
                             "--skip-bad-images to leave such images out")
        bad.append(row)
        warnings.warn(f"{where}: the image cannot be read ({reason}); left out")
    if not bad:
        return ds
    left_out = set(bad)
    return ds.select([i for i in range(len(ds)) if i not in left_out])


def _image_problem(item: dict | None, full: bool) -> str | None:
    """Why a raw image (``{"bytes", "path"}``) cannot be read, or ``None``."""
    if not item or (item.get("bytes") is None and not item.get("path")):
        return "no image data"
    try:
        source = io.BytesIO(item["bytes"]) if item.get("bytes") is not None else item["path"]
        with PIL.Image.open(source) as image:
            if full:
                image.load()
            else:
                image.verify()
    except Exception as exc:  # PIL raises many types for damaged files
        return f"{type(exc).__name__}: {exc}"
    return None


class TorchImageDataset(torch.utils.data.Dataset):
    """A Hub dataset as ``(image tensor (3, H, W), label)`` pairs through a transform."""

    def __init__(self, ds: Dataset, image_column: str, label_column: str, transform: Callable) -> None:
        self.ds, self.image_column, self.label_column, self.transform = ds, image_column, label_column, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            row = self.ds[i]
            image = to_rgb(row[self.image_column])
        except Exception as exc:  # a damaged image or row found while training: name it
            raw = self.ds.cast_column(self.image_column, Image(decode=False))[i][self.image_column]
            path = f" ({raw['path']})" if raw and raw.get("path") else ""
            raise ValueError(f"row {i}{path} cannot be read ({type(exc).__name__}: {exc}); fix or remove it, or "
                             "pass --skip-bad-images") from exc
        return self.transform(image), int(row[self.label_column])


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """An 8-bit RGB image; 16- and 32-bit grey images are scaled to 8 bits (PIL's own conversion clips
    them to white)."""
    if image.mode.startswith("I"):  # "I;16*" (16-bit) or "I" (32-bit integers, scaled by the range they use)
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0)
        top = 65535.0 if image.mode.startswith("I;16") or 255 < peak <= 65535 else max(peak, 255.0)
        image = PIL.Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


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
