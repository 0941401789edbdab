"""Reading what the trainer wrote: the best model, the run's splits, and cached per-exit outputs.

Cached outputs live in ``<run>/outputs/<split>.safetensors`` (``probs_exit1`` … shallowest first,
``labels``); they are recomputed when the best model's weights are newer than the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import ImageSplits, TorchImageDataset, eval_transform
from .hub import from_pretrained
from .model import MultiExitModel
from .training import TrainConfig


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[MultiExitModel, TrainConfig]:
    """The best model of a training run (``<run>/best``, strict load) and the run's TrainConfig."""
    run = Path(run_dir)
    for needed in ("train_config.json", "best/scan_config.json"):
        if not (run / needed).is_file():
            raise ValueError(f"{run} is not a finished timm-scan training run: {needed} is missing")
    cfg = TrainConfig(**json.loads((run / "train_config.json").read_text()))
    return from_pretrained(run / "best").to(device).eval(), cfg


def epoch_seconds(run_dir: str | Path) -> list[float]:
    """Wall-clock of each epoch of a training run (training and validation), from ``metrics.jsonl``."""
    metrics = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line)["seconds"] for line in metrics.read_text().splitlines() if line]


def eval_dataset(splits: ImageSplits, split: str, data_config: dict) -> TorchImageDataset:
    """``split`` ("val" or "test") through the eval transform of ``data_config``."""
    ds = getattr(splits, split)
    if ds is None:
        raise ValueError(f"the run's dataset has no {split} split")
    return TorchImageDataset(ds, splits.image_column, splits.label_column, eval_transform(data_config))


@torch.no_grad()
def compute_outputs(
    model: MultiExitModel, dataset: TorchImageDataset, batch_size: int = 256, num_workers: int = 2
) -> tuple[list[np.ndarray], np.ndarray]:
    """Softmax of every exit over ``dataset``: K arrays ``(N, C)`` (shallowest first) and labels ``(N,)``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    device = next(model.parameters()).device
    probs: list[list[torch.Tensor]] = [[] for _ in range(model.num_exits)]
    labels = []
    for images, y in tqdm(loader, desc="outputs", leave=False):
        for i, z in enumerate(model(images.to(device)).logits):
            probs[i].append(torch.softmax(z.float(), -1).cpu())
        labels.append(y)
    return [torch.cat(p).numpy() for p in probs], torch.cat(labels).numpy()


def cached_outputs(run_dir: str | Path, split: str, model: MultiExitModel, dataset: TorchImageDataset) -> tuple[list[np.ndarray], np.ndarray]:
    """``compute_outputs`` once per split and model; later calls read ``<run>/outputs/<split>.safetensors``."""
    run = Path(run_dir)
    cache = run / "outputs" / f"{split}.safetensors"
    weights = [run / "best" / name for name in ("model.safetensors", "scan_exits.safetensors")]
    if cache.is_file() and all(cache.stat().st_mtime >= w.stat().st_mtime for w in weights):
        tensors = load_file(str(cache))
        if len(tensors) == model.num_exits + 1 and len(tensors["labels"]) == len(dataset):
            return [tensors[f"probs_exit{i + 1}"].numpy() for i in range(model.num_exits)], tensors["labels"].numpy()
    probs, labels = compute_outputs(model, dataset)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"probs_exit{i + 1}": torch.from_numpy(p) for i, p in enumerate(probs)}
    save_file({**tensors, "labels": torch.from_numpy(labels)}, str(cache))
    return probs, labels
