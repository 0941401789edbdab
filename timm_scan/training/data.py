"""Image classification data from ``datasets`` with timm's transforms.

Sources: a Hub id (``uoft-cs/cifar10``), or a local folder of parquet files (``train*.parquet``,
``test*.parquet``) or of images (``train/<class>/<image>``, ``test/<class>/<image>``), split as
``datasets.load_dataset`` splits a folder (`LAYOUTS`).

Splits: the data's ``train``, and its ``test`` split, only for the final report. The validation split
(best epoch, thresholds) is always carved deterministically out of train. Data with no test split but a
``validation`` one (timm's ``train/`` + ``val/`` layout, Hub datasets such as food101) is tested on that
split, with a warning; a ``validation`` split beside a ``test`` one is left unused, with a warning; data
with neither is refused before anything trains. Which split is which depends only on the data's split
names, so a run's TrainConfig (dataset, val_size, seed, sizes) rebuilds the same splits.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import PIL.Image
import timm.data
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub import constants
from torch import nn
from tqdm.auto import tqdm

__all__ = ["LAYOUTS", "ImageSplits", "TorchImageDataset", "build_transforms", "data_config", "detect_columns",
           "eval_transform", "load_image_dataset", "load_splits", "to_rgb"]

LAYOUTS = ("a local folder is split as datasets.load_dataset splits it, by lower-case folder or file names: train "
           "(or training), test (testing, eval, evaluation) and optionally validation (val, valid, dev), e.g. "
           "<folder>/train/<class>/<image> and <folder>/test/<class>/<image>, or train*.parquet and test*.parquet; "
           "a Hub dataset needs a train split and a test (or validation) split")


@dataclass
class ImageSplits:
    """``train``/``val``/``test`` Hub datasets and what their columns mean."""

    train: Dataset
    val: Dataset
    test: Dataset
    image_column: str
    label_column: str
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_image_dataset(source: str) -> DatasetDict:
    """``source`` as a ``DatasetDict``: a local folder (parquet if it holds any ``.parquet`` file, else an image
    folder), split by its folder and file names (`LAYOUTS`), or a Hub id. A Hub dataset that cannot be
    fetched (offline, unreachable, no such id) is a ``ValueError`` saying so."""
    path = Path(source).expanduser()
    if path.is_dir() and next(path.rglob("*.parquet"), None) is not None:
        resolved = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path),
                                               allowed_extensions=[".parquet"])  # datasets' split names, parquet only
        return datasets.load_dataset("parquet", data_files={split: files for split, files in resolved.items() if files})
    if path.is_dir():
        return datasets.load_dataset("imagefolder", data_dir=str(path))
    if path.suffix or source.startswith((".", "/", "~")):
        raise ValueError(f"dataset {source!r} is neither an existing folder nor a Hub id (owner/name)")
    try:
        return datasets.load_dataset(source)
    except ConnectionError as exc:  # offline mode, or no answer from HF_ENDPOINT, and not in the local cache
        raise ValueError(
            f"dataset {source!r} is not in the local cache and the Hugging Face Hub ({constants.ENDPOINT}) cannot "
            f"be reached ({exc}). Download it once where the Hub can be reached (it is then cached, and found "
            f"offline with HF_HUB_OFFLINE=1), or pass a local folder: {LAYOUTS}"
        ) from None
    except DatasetNotFoundError as exc:
        raise ValueError(f"dataset {source!r}: {exc} Check the id (owner/name); a gated or private dataset needs "
                         "`hf auth login`") from None


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
    check_images: bool = True,
) -> ImageSplits:
    """Load ``source``, check it, and carve a validation split out of train (which split is which: the
    module docstring; data with no test split is a ``ValueError`` naming ``source`` and `LAYOUTS`).

    ``val_size``: a fraction of train (0 < f < 1) or a number of samples. The carve is stratified by
    class where labels are a ``ClassLabel`` and depends only on ``seed`` (a class with a single image
    cannot be stratified: then the carve is not, with a warning). ``max_train_samples`` keeps a
    prefix of train before carving (the rows of the shared CIFAR-10 are shuffled, so a prefix is
    roughly class-balanced); ``max_test_samples`` a prefix of test.

    Checked before anything trains (``ValueError`` naming the split and row): labels are class
    indices 0..C-1 (integer labels must use every index below their maximum), the test split holds no
    class that train does not, and every image decodes fully (checked in parallel; ``skip_bad_images``: images
    that do not are left out, with a warning naming them, instead). ``check_images=False`` skips decoding
    (splits rebuilt for a run that trained on them, so were checked then); ``skip_bad_images`` decodes
    anyway, so that the same rows are left out.
    """
    dd = load_image_dataset(source)
    if "train" not in dd:
        raise ValueError(f"dataset {source!r} has no train split (its splits: {list(dd)}); {LAYOUTS}")
    if "test" not in dd and "validation" not in dd:
        raise ValueError(f"dataset {source!r} has no test split (its splits: {list(dd)}), and timm-scan reports on "
                         f"a test split that neither training nor the threshold search sees; {LAYOUTS}")
    test_name = "test" if "test" in dd else "validation"
    if test_name == "validation":
        warnings.warn(f"dataset {source!r} has no test split: its validation split ({len(dd['validation'])} images) "
                      "is the test split, seen only by the final report; the validation split that picks the best "
                      "epoch and the thresholds is carved out of train (val_size)")
    elif "validation" in dd:
        warnings.warn(f"dataset {source!r}: its validation split is not used; the validation split is carved out "
                      "of train (val_size), and its test split is the test split")
    train = dd["train"]
    image_column, label_column = detect_columns(train, image_column, label_column)
    label_feature = train.features[label_column]
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    test = dd[test_name]
    if max_test_samples is not None:
        test = test.select(range(min(max_test_samples, len(test))))
    if check_images or skip_bad_images:
        train = _checked_images(train, "train", image_column, skip_bad_images)
        test = _checked_images(test, test_name, image_column, skip_bad_images)
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


def _class_names(train: Dataset, test: Dataset, label_column: str, test_name: str) -> list[str]:
    """The classes, from a ``ClassLabel`` or from integer labels, with every label checked to be one, and
    every class of the test split seen in train."""
    feature = train.features[label_column]
    labels = {"train": train[label_column], test_name: test[label_column]}
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
    unseen = sorted(set(labels[test_name]) - set(labels["train"]))
    if unseen:
        raise ValueError(f"classes {[names[c] for c in unseen]} are in the {test_name} split but in none of the "
                         f"{len(train)} training images: the model would be tested on classes it never learns. Add "
                         f"training images of them, or remove them from the {test_name} split")
    return names


def _checked_images(ds: Dataset, split: str, image_column: str, skip_bad: bool) -> Dataset:
    """``ds`` once every image has been decoded fully (`_image_problem`, in a thread pool: PIL decodes with the
    GIL released); a ``ValueError`` naming the first bad row, or (``skip_bad``) those rows left out with a warning
    naming each."""
    raw = ds.select_columns([image_column]).cast_column(image_column, Image(decode=False))
    bad = []
    with ThreadPoolExecutor() as pool, tqdm(total=len(raw), desc=f"checking {split} images", leave=False) as progress:
        row = 0
        for batch in raw.iter(batch_size=1024):
            items = batch[image_column]
            for item, reason in zip(items, pool.map(_image_problem, items)):
                progress.update()
                if reason is not None:
                    where = f"row {row} of the {split} split" + (f" ({item['path']})" if item and item.get("path") else "")
                    if not skip_bad:
                        raise ValueError(f"{where}: the image cannot be read ({reason}); fix or remove it, or pass "
                                         "--skip-bad-images to leave such images out")
                    bad.append(row)
                    warnings.warn(f"{where}: the image cannot be read ({reason}); left out")
                row += 1
    if not bad:
        return ds
    left_out = set(bad)
    return ds.select([i for i in range(len(ds)) if i not in left_out])


def _image_problem(item: dict | None) -> str | None:
    """Why a raw image (``{"bytes", "path"}``) cannot be read, or ``None``: its checksums where the format has
    them (PNG's CRCs), then a full decode (a truncated file or damaged compressed data fails only there)."""
    if not item or (item.get("bytes") is None and not item.get("path")):
        return "no image data"
    try:
        data = item["bytes"] if item.get("bytes") is not None else Path(item["path"]).read_bytes()
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.verify()  # leaves the image unusable: it is opened again to decode
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()
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
