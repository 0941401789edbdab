"""The run folder's protocol: what a training run writes to its ``output_dir``, and how a rerun resumes it.

Layout::

    train_config.json         the TrainConfig of the run (what evaluation rebuilds the splits from)
    checkpoints/epoch_0003/   Accelerate ``save_state``: weights (safetensors), optimizer, RNG, progress
    best/                     the best epoch on validation (deepest-exit accuracy), as ``save_pretrained``
                              writes it: timm's config.json and model.safetensors, the exits, a card
    metrics.jsonl             one ``EpochMetrics`` per line: loss parts per exit, validation accuracy
    results.json              ``RunResults``: validation and test accuracy per exit, MACs per exit
    training_tradeoff.png     the validation β sweep of the best model (when the run logs to a tracker)

Every folder is written under a temporary name (``<name>.partial``) and renamed when complete, and every
file with `atomic_write`, so an interrupted write is never taken for a finished one; `RunFolder.clean_up`
removes what an interruption left. Methods that take an ``accelerator`` are collective (every process
calls them); the others read or write files and are called on the main process only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .._io import atomic_write
from ..report import EpochMetrics, RunResults
from .config import TRAIN_CONFIG, TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..model.multi_exit import MultiExitModel

__all__ = ["RESUMABLE_CHANGES", "RunFolder"]

RESUMABLE_CHANGES = ("output_dir", "num_workers", "keep_checkpoints", "log_with", "push_to_hub")  # may differ on resume
CHECKPOINT_NAME = re.compile(r"epoch_\d{4}")


class RunFolder:
    """The files of one training run under ``root`` (layout above)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.train_config = self.root / TRAIN_CONFIG
        self.checkpoint_dir = self.root / "checkpoints"
        self.best = self.root / "best"
        self.metrics = self.root / "metrics.jsonl"
        self.results = self.root / "results.json"
        self.tradeoff_plot = self.root / "training_tradeoff.png"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return sorted(p for p in self.checkpoint_dir.glob("epoch_*") if CHECKPOINT_NAME.fullmatch(p.name))

    def save_config(self, cfg: TrainConfig) -> None:
        """Create the folder and write the run's ``train_config.json``."""
        self.root.mkdir(parents=True, exist_ok=True)
        cfg.save(self.root)

    # ---------------------------------------------------------------- resume
    def clean_up(self) -> None:
        """Remove the partial folders an interrupted write left; finish a swap of ``best/`` cut short."""
        partials = [*self.checkpoint_dir.glob("*.partial"), self.best.with_name(f"{self.best.name}.partial")]
        for partial in filter(Path.exists, partials):
            warnings.warn(f"removing {partial}, left by an interrupted write")
            shutil.rmtree(partial, ignore_errors=True)
        previous = self.best.with_name(f"{self.best.name}.previous")
        if previous.is_dir():  # interrupted between the two renames of save_best
            if self.best.is_dir():
                shutil.rmtree(previous)
            else:
                os.replace(previous, self.best)

    def resume(self, accelerator: Accelerator, cfg: TrainConfig) -> Path | None:
        """Load into ``accelerator`` the last checkpoint that loads (an earlier one, with a warning, where the
        last does not) and return it; ``None`` where there is none. A folder holding a run of another
        configuration (beyond ``RESUMABLE_CHANGES``), or whose checkpoints all fail, is a ``ValueError``."""
        checkpoints = self.checkpoints()
        if checkpoints and self.train_config.is_file():
            saved = TrainConfig.load(self.root).to_dict()
            changed = sorted(k for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
            if changed:
                raise ValueError(f"{self.root} holds a run of another configuration (it differs in {changed}); "
                                 "rerun with the same settings to resume, or use another --output-dir")
        for i, checkpoint in enumerate(reversed(checkpoints)):
            try:
                accelerator.load_state(str(checkpoint))
            except Exception as exc:  # a damaged checkpoint: fall back to the one before
                if i == len(checkpoints) - 1:
                    raise ValueError(f"no checkpoint in {self.checkpoint_dir} can be loaded ({exc}); delete "
                                     "the folder to start the run over") from exc
                warnings.warn(f"checkpoint {checkpoint} cannot be loaded ({type(exc).__name__}: {exc}); "
                              f"resuming from the one before")
                continue
            return checkpoint
        return None

    def keep_metrics(self, epochs: int) -> None:
        """``metrics.jsonl`` without the lines of epochs after ``epochs`` (redone on resume) or cut short."""
        if not self.metrics.is_file():
            return
        kept = []
        for line in self.metrics.read_text().splitlines():
            try:
                if json.loads(line)["epoch"] <= epochs:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                break
        atomic_write(self.metrics, "".join(f"{line}\n" for line in kept))

    # ----------------------------------------------------------------- write
    def append_metrics(self, metrics: EpochMetrics) -> None:
        """One line of ``metrics.jsonl``; written before the epoch's checkpoint, so resume drops it if that fails."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(metrics.to_dict()) + "\n")

    def save_checkpoint(self, accelerator: Accelerator, epoch: int, keep: int) -> None:
        """Accelerate's state as ``checkpoints/epoch_NNNN``, renamed in when complete; only the last ``keep`` stay."""
        final = self.checkpoint_dir / f"epoch_{epoch:04d}"
        partial = final.with_name(final.name + ".partial")
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            for old in self.checkpoints()[:-keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def save_best(self, model: MultiExitModel, card: str) -> None:
        """``model`` as ``best/`` (``save_pretrained``, ``card`` its README.md), swapped in whole: the old one is
        renamed to ``best.previous``, the new one in, the old one removed."""
        partial = self.best.with_name(f"{self.best.name}.partial")
        previous = self.best.with_name(f"{self.best.name}.previous")
        model.save_pretrained(str(partial), card=card)
        if self.best.exists():
            os.replace(self.best, previous)
        os.replace(partial, self.best)
        shutil.rmtree(previous, ignore_errors=True)

    def write_results(self, results: RunResults, card: str) -> None:
        """``results.json``, and ``card`` (which reports them) as ``best/README.md``."""
        results.save(self.results)
        atomic_write(self.best / "README.md", card)
