from pathlib import Path

import pytest
import torch
from conftest import create

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
