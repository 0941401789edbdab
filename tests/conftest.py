"""Shared fixtures (helpers live in ``helpers.py``). The Hub client is pointed at a local test server
before anything imports it."""

import atexit
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

# benchmarks/fuzz_folders.py holds the fuzz tests' mutations (its longer run is a benchmark)
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# huggingface_hub reads these at import (timm and datasets import it), so they are set first.
HUB_PORT = _free_port()
_HF_HOME = tempfile.mkdtemp(prefix="timm-scan-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, True)
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ["HF_XET_CACHE"] = os.path.join(_HF_HOME, "xet")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import synthetic_images  # noqa: E402
from hub_server import HubServer  # noqa: E402


if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # pytest-xdist runs a worker per core: one torch thread each, not a core's worth each


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one global state per process; each test's Trainer gets its own settings."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tiny_parquet(tmp_path_factory):
    """A folder in the Hub's parquet layout (img: Image, label: ClassLabel), 4 classes."""
    import datasets

    folder = tmp_path_factory.mktemp("tiny_parquet")
    names = ["red", "green", "blue", "grey"]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names),
                                  "note": datasets.Value("string")})
    for split, n, seed in (("train", 96, 0), ("test", 32, 1)):
        images, labels = synthetic_images(n, len(names), seed)
        ds = datasets.Dataset.from_dict({"img": images, "label": labels, "note": ["x"] * n}, features=features)
        ds.to_parquet(str(folder / f"{split}.parquet"))
    return folder


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory):
    """An image folder: train/<class>/*.png and test/<class>/*.png, 3 classes."""
    folder = tmp_path_factory.mktemp("tiny_imagefolder")
    for split, n, seed in (("train", 30, 0), ("test", 12, 1)):
        images, labels = synthetic_images(n, 3, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            path = folder / split / f"class{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    return folder


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """The test Hub on 127.0.0.1:HUB_PORT, where HF_ENDPOINT points; its uploads succeed unless a
    test sets ``hub.fail_uploads`` (and resets it)."""
    with HubServer(tmp_path_factory.mktemp("hub"), port=HUB_PORT) as server:
        yield server
