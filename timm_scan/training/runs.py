"""Reading what the trainer wrote (without Accelerate): the best model, the run's splits, its typed
results, and cached per-exit outputs.

Cached outputs live in ``<run>/outputs/<split>.safetensors`` (``probs_exit1`` … shallowest first,
``labels``); they are recomputed when the best model's weights are newer than the cache.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from .._io import atomic_write
from ..model.multi_exit import MultiExitModel
from ..report import EpochMetrics, RunResults
from .config import TrainConfig
from .data import ImageSplits, TorchImageDataset, eval_transform, load_splits
from .run_folder import RunFolder

__all__ = ["cached_outputs", "compute_outputs", "epoch_metrics", "eval_dataset", "load_run", "run_results",
           "run_splits"]


def run_splits(cfg: TrainConfig, *, trained: bool = False) -> ImageSplits:
    """The run's train/val/test splits: its source, seed and sizes (which of the data's splits is which
    follows from the data's split names alone, `load_splits`, so every command rebuilds the same).
    ``trained``: the run has trained on them, so its images were decoded and checked then, not again."""
    return load_splits(cfg.dataset, image_column=cfg.image_column, label_column=cfg.label_column,
                       val_size=cfg.val_size, seed=cfg.seed, max_train_samples=cfg.max_train_samples,
                       max_test_samples=cfg.max_test_samples, skip_bad_images=cfg.skip_bad_images,
                       check_images=not trained)


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[MultiExitModel, TrainConfig]:
    """The best model of a training run (``<run>/best``, strict load) and the run's TrainConfig."""
    run = RunFolder(run_dir)
    for needed in (run.train_config, run.best / "scan_config.json"):
        if not needed.is_file():
            raise ValueError(f"{run.root} is not a finished timm-scan training run: "
                             f"{needed.relative_to(run.root)} is missing")
    return MultiExitModel.from_pretrained(run.best).to(device).eval(), TrainConfig.load(run.root)


def run_results(run_dir: str | Path) -> RunResults:
    """``<run>/results.json``: the finished run's validation and test accuracy per exit, its MACs; a damaged one
    is a ``ValueError`` naming it and how to write it again."""
    path = RunFolder(run_dir).results
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a finished timm-scan training run: {path.name} is missing")
    try:
        return RunResults.load(path)
    except ValueError as exc:
        raise ValueError(f"{exc}. Rerun the run's timm-scan train command (or timm-scan train --resume {run_dir}): "
                         "it resumes the finished run and writes results.json again") from None


def epoch_metrics(run_dir: str | Path) -> list[EpochMetrics]:
    """``<run>/metrics.jsonl``: one entry per epoch trained; a line that is not the next epoch's record is a
    ``ValueError`` naming the file and the line (`RunFolder.read_metrics`)."""
    return RunFolder(run_dir).read_metrics()


def eval_dataset(splits: ImageSplits, split: str, data_config: dict) -> TorchImageDataset:
    """``split`` ("val" or "test") through the eval transform of ``data_config``."""
    return TorchImageDataset(getattr(splits, split), splits.image_column, splits.label_column,
                             eval_transform(data_config))


@torch.no_grad()
def compute_outputs(
    model: MultiExitModel, dataset: TorchImageDataset, batch_size: int = 256, num_workers: int = 2
) -> tuple[list[Tensor], Tensor]:
    """Softmax of every exit over ``dataset``: K tensors ``(N, C)`` (shallowest first) and labels ``(N,)``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    device = next(model.parameters()).device
    probs: list[list[Tensor]] = [[] for _ in range(model.num_exits)]
    labels = []
    for images, y in tqdm(loader, desc="outputs", leave=False):
        for i, z in enumerate(model(images.to(device)).logits):
            probs[i].append(torch.softmax(z.float(), -1).cpu())
        labels.append(y)
    return [torch.cat(p) for p in probs], torch.cat(labels)


def cached_outputs(
    run_dir: str | Path, split: str, model: MultiExitModel, dataset: TorchImageDataset
) -> tuple[list[Tensor], Tensor]:
    """``compute_outputs`` once per split and model; later calls read ``<run>/outputs/<split>.safetensors``."""
    run = Path(run_dir)
    cache = run / "outputs" / f"{split}.safetensors"
    weights = [run / "best" / name for name in ("model.safetensors", "scan_exits.safetensors")]
    if cache.is_file() and all(cache.stat().st_mtime >= w.stat().st_mtime for w in weights):
        tensors = load_file(str(cache))
        if len(tensors) == model.num_exits + 1 and len(tensors["labels"]) == len(dataset):
            return [tensors[f"probs_exit{i + 1}"] for i in range(model.num_exits)], tensors["labels"]
    probs, labels = compute_outputs(model, dataset)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, save({**{f"probs_exit{i + 1}": p for i, p in enumerate(probs)}, "labels": labels}))
    return probs, labels
