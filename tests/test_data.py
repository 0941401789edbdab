from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import create

from timm_scan.training import TorchImageDataset, build_transforms, data_config, load_splits

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def test_parquet_folder_columns_and_deterministic_validation(tiny_parquet):
    a = load_splits(str(tiny_parquet), val_size=0.25, seed=0)
    b = load_splits(str(tiny_parquet), val_size=0.25, seed=0)
    c = load_splits(str(tiny_parquet), val_size=0.25, seed=1)
    assert (a.image_column, a.label_column, a.class_names) == ("img", "label", ["red", "green", "blue", "grey"])
    assert (len(a.train), len(a.val), len(a.test)) == (72, 24, 32)
    assert a.val["label"].count(0) == 6  # stratified by class
    assert a.val["img"][0].tobytes() == b.val["img"][0].tobytes()
    assert [x.tobytes() for x in a.val["img"]] != [x.tobytes() for x in c.val["img"]]


def test_image_folder(tiny_imagefolder):
    splits = load_splits(str(tiny_imagefolder), val_size=6, max_test_samples=5)
    assert splits.num_classes == 3 and len(splits.val) == 6 and len(splits.test) == 5


@pytest.mark.skipif(not CIFAR10.is_dir(), reason="../shared/data/cifar10 not beside the checkout")
def test_shared_cifar10():
    splits = load_splits(str(CIFAR10), val_size=100, max_train_samples=1000, max_test_samples=50)
    assert splits.class_names[:2] == ["airplane", "automobile"] and splits.num_classes == 10
    assert (len(splits.train), len(splits.val), len(splits.test)) == (900, 100, 50)
    assert splits.train[0]["img"].size == (32, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_column": "picture"}, "image column 'picture' not in the dataset"),
        ({"image_column": "label"}, "not images"),
        ({"image_column": "note"}, "not images"),
        ({"label_column": "note"}, "not class indices"),
        ({"val_size": 0}, "val_size"),
        ({"val_size": 1.0}, "val_size"),
    ],
)
def test_bad_columns_and_sizes(tiny_parquet, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_splits(str(tiny_parquet), **kwargs)


def test_missing_folder_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(ValueError, match="neither an existing folder nor a Hub id"):
        load_splits(str(tmp_path / "nowhere"))


def test_transforms_follow_the_model_data_config(tiny_parquet):
    model = create("resnet18")
    cfg = data_config(model, input_size=40, crop_pct=1.0)
    assert cfg["input_size"] == (3, 40, 40) and cfg["mean"] == model.pretrained_cfg["mean"]
    train_tf, eval_tf = build_transforms(cfg, (0.5, 1.0))
    splits = load_splits(str(tiny_parquet))
    image, label = TorchImageDataset(splits.train, "img", "label", train_tf)[0]
    assert image.shape == (3, 40, 40) and isinstance(label, int)
    a = TorchImageDataset(splits.val, "img", "label", eval_tf)[0][0]
    b = TorchImageDataset(splits.val, "img", "label", eval_tf)[0][0]
    assert torch.equal(a, b)  # eval is deterministic


def parquet_with(tmp_path, train_rows, test_rows=None, label_feature=None):
    """A parquet folder from rows of (image bytes or None, label)."""
    import datasets

    label_feature = label_feature or datasets.ClassLabel(names=["a", "b", "c"])
    features = datasets.Features({"img": datasets.Image(), "label": label_feature})
    for split, rows in (("train", train_rows), ("test", test_rows or train_rows[:6])):
        ds = datasets.Dataset.from_dict({"img": [{"bytes": b if b is not None else png(), "path": None} for b, _ in rows],
                                         "label": [y for _, y in rows]}, features=features)
        path = str(tmp_path / f"{split}.parquet")
        ds.to_parquet(path)
        if any(b is None for b, _ in rows):  # a row whose image is gone: written below datasets, which refuses it
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            images = table.column("img").combine_chunks()
            raw = [None if b is None else images[i].as_py()["bytes"] for i, (b, _) in enumerate(rows)]
            column = pa.StructArray.from_arrays([pa.array(raw, pa.binary()), pa.array([None] * len(rows), pa.string())],
                                                names=["bytes", "path"])
            pq.write_table(table.set_column(0, "img", column), path)
    return tmp_path


def png(value=128, mode="RGB", size=8):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (size, size), value).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "missing"])
def test_a_damaged_image_is_found_before_training_and_named(tmp_path, damage):
    good = [(png(10 * i), i % 3) for i in range(30)]
    bad = {"truncated": png()[:40], "empty": b"", "garbage": b"not an image at all", "missing": None}[damage]
    folder = parquet_with(tmp_path, good[:17] + [(bad, 1)] + good[17:])
    with pytest.raises(ValueError, match=r"row 17 of the train split: the image cannot be read .*--skip-bad-images"):
        load_splits(str(folder), val_size=6)
    with pytest.warns(UserWarning, match="row 17 of the train split"):
        splits = load_splits(str(folder), val_size=6, skip_bad_images=True)
    assert len(splits.train) + len(splits.val) == 30
    unchecked = load_splits(str(folder), val_size=6, check_images=False)  # as search and evaluate rebuild a run's
    assert len(unchecked.train) + len(unchecked.val) == 31  # not decoded again, so the damage is not seen here


def test_16_bit_grey_images_keep_their_levels():
    from PIL import Image

    from timm_scan.training.data import to_rgb

    grey16 = Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16))
    assert grey16.mode.startswith("I;16")
    assert np.asarray(to_rgb(grey16))[0, 0].tolist() == [117, 117, 117]  # 30000 / 65535 of white, not white
    assert np.asarray(to_rgb(Image.new("L", (2, 2), 77)))[0, 0].tolist() == [77, 77, 77]


def test_a_class_with_one_image_is_said(tmp_path):
    rows = [(png(i), 0 if i < 15 else 1) for i in range(29)] + [(png(200), 2)]
    with pytest.warns(UserWarning, match=r"classes \['c'\] have a single training image"):
        splits = load_splits(str(parquet_with(tmp_path, rows)), val_size=6)
    assert len(splits.val) == 6


@pytest.mark.parametrize("train_labels, test_labels, message", [
    ([-1, 0, 1] * 10, None, "integer labels must be the class indices 0..C-1"),
    ([0, 5, 999] * 10, None, r"train uses \[0, 5, 999\]"),
    ([0, 1, 2] * 10, [0, 1, 2, 3, 0, 1], "row 3 of the test split has label 3, not a class of train"),
])
def test_labels_that_are_not_class_indices(tmp_path, train_labels, test_labels, message):
    import datasets

    rows = [(png(i), y) for i, y in enumerate(train_labels)]
    test = [(png(i), y) for i, y in enumerate(test_labels)] if test_labels else None
    folder = parquet_with(tmp_path, rows, test, label_feature=datasets.Value("int64"))
    with pytest.raises(ValueError, match=message):
        load_splits(str(folder), val_size=6)


def image_folder(root, layout):
    """``root/<split>/<class>/<i>.png`` for each ``split: classes`` of ``layout`` (split "" puts the class
    folders at the root), four images a class."""
    from PIL import Image

    for split, classes in layout.items():
        for c in classes:
            for i in range(4):
                path = root / split / c / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (40 * i, 60 * ord(c) % 256, 0)).save(path)
    return root


@pytest.mark.parametrize("layout, test_folder, warning", [
    ({"train": "ab", "test": "ab"}, "test", None),
    ({"training": "ab", "testing": "ab"}, "testing", None),  # datasets' other names
    ({"train": "ab", "val": "ab"}, "val", r"no test split: its validation split \(7 images\) is the test split"),
    ({"train": "ab", "validation": "ab", "eval": "ab"}, "eval", "its validation split is not used"),
])
def test_image_folder_splits_are_named_as_datasets_names_them(tmp_path, layout, test_folder, warning):
    import re
    import warnings

    folder = image_folder(tmp_path, layout)
    (folder / test_folder / "a" / "0.png").unlink()  # test/ has 7 images, no other split has
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_splits(str(folder), val_size=2)
    said = [str(w.message) for w in caught if "validation split" in str(w.message)]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 7)
    if warning is None:
        assert said == []
    else:
        assert len(said) == 1 and re.search(warning, said[0])


def test_parquet_files_are_named_as_datasets_names_them(tmp_path):
    folder = parquet_with(tmp_path, [(png(i), i % 3) for i in range(30)])
    (folder / "test.parquet").rename(folder / "val.parquet")
    (folder / "train_notes.txt").write_text("not a parquet file")  # named like a split: left out
    with pytest.warns(UserWarning, match="its validation split .6 images. is the test split"):
        splits = load_splits(str(folder), val_size=6)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 6)


@pytest.mark.parametrize("layout", [{"": "ab"}, {"train": "ab"}, {"Train": "ab", "Test": "ab"}])
def test_data_without_a_test_split_is_refused_before_training(tmp_path, layout):
    """Class folders at the root, train/ alone, or capitalised split folders (which datasets reads as one
    train split): refused with the folder and the layouts read, before the trainer writes anything."""
    from timm_scan.cli import main

    folder = image_folder(tmp_path / "data", layout)
    message = rf"dataset '{folder}' has no test split \(its splits: \['train'\]\).*<folder>/train/<class>/<image>"
    with pytest.raises(ValueError, match=message):
        load_splits(str(folder))
    with pytest.raises(SystemExit, match=message):
        main(["train", "--dataset", str(folder), "--output-dir", str(tmp_path / "run"), "--model", "test_resnet",
              "--epochs", "1", "--num-workers", "0"])
    assert not (tmp_path / "run" / "train_config.json").exists()


def test_a_class_only_in_the_test_split_is_refused(tmp_path):
    folder = image_folder(tmp_path, {"train": "ab", "test": "abc"})
    with pytest.raises(ValueError, match=r"classes \['c'\] are in the test split but in none of the 8 training images"):
        load_splits(str(folder), val_size=2)


def test_a_hub_dataset_that_cannot_be_fetched_is_one_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"dataset 'someone/not-cached' is not in the local cache and the Hugging Face "
                                         r"Hub .* cannot be reached .*or pass a local folder: a local folder is split"):
        load_splits("someone/not-cached")


def noise_image(format, size=32):
    """An image of noise (large compressed data to damage) encoded as ``format``."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format=format)
    return buffer.getvalue()


def corrupt_idat(data, valid_crc):
    """A PNG whose first IDAT chunk has 16 bytes of its compressed data overwritten, its CRC recomputed or not."""
    import struct
    import zlib

    at = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[at:at + 4])[0]
    body = bytearray(data[at + 8:at + 8 + length])
    body[length // 2:length // 2 + 16] = b"\xff" * 16
    crc = zlib.crc32(b"IDAT" + body) if valid_crc else struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0]
    return data[:at + 8] + bytes(body) + struct.pack(">I", crc) + data[at + 12 + length:]


@pytest.mark.parametrize("name, data", [
    ("cut.jpg", noise_image("JPEG")[:-600]),
    ("inside.png", corrupt_idat(noise_image("PNG"), valid_crc=True)),
    ("crc.png", corrupt_idat(noise_image("PNG"), valid_crc=False)),
], ids=["truncated-jpeg", "png-idat-valid-crc", "png-idat-bad-crc"])
def test_images_that_fail_only_a_full_decode_are_found_before_training(tmp_path, name, data):
    from PIL import Image

    for split, n in (("train", 30), ("test", 6)):
        for i in range(n):
            path = tmp_path / split / f"class{i % 3}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(path)
    (tmp_path / "test" / "class1" / name).write_bytes(data)
    with Image.open(tmp_path / "test" / "class1" / name) as image:
        image.size  # the header opens: only a full decode finds the damage
    with pytest.raises(ValueError, match=rf"of the test split \(.*{name}\): the image cannot be read .*--skip-bad-images"):
        load_splits(str(tmp_path), val_size=6)
    with pytest.warns(UserWarning, match=rf"of the test split \(.*{name}\): the image cannot be read"):
        splits = load_splits(str(tmp_path), val_size=6, skip_bad_images=True)
    assert len(splits.test) == 6
