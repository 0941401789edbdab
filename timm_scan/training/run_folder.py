"""The run folder's protocol: what a training run writes to its ``output_dir``, and how a rerun resumes it.

Layout::

    train.lock                held (``flock``) by the process that trains in the folder; says which one
    train_config.json         the TrainConfig of the run (what evaluation rebuilds the splits from)
    checkpoints/epoch_0003/   Accelerate ``save_state``: weights (safetensors), optimizer, RNG, progress, and
                              manifest.json: the sha256 of each of those files, checked on resume
    best/                     the best epoch on validation (deepest-exit accuracy), as ``save_pretrained``
                              writes it: timm's config.json and model.safetensors, the exits, a card
    metrics.jsonl             one ``EpochMetrics`` per line: loss parts per exit, validation accuracy
    results.json              ``RunResults``: validation and test accuracy per exit, MACs per exit
    training_tradeoff.png     the validation β sweep of the best model (when the run logs to a tracker)

One process owns the folder: the trainer's main process holds ``train.lock`` from its start to the end of
``fit`` (`RunFolder.hold`), and the operating system releases it when the process dies, however it dies;
another run on the folder meanwhile is a ``ValueError`` naming the holder. Every folder is written under a
temporary name (``<name>.partial``) and renamed when complete, and every file with `atomic_write`
(``train.lock`` aside: its lock is on the file itself), so an interrupted write is never taken for a
finished one; `RunFolder.clean_up` removes what an interruption left. A file found damaged anyway (changed
from outside) is a ``ValueError`` naming it; a checkpoint whose files do not match its manifest is passed
over for the one before, with a warning naming the file (one without a manifest, as an earlier timm-scan
wrote them, is loaded with a warning). Methods that take an ``accelerator`` are collective (every process
calls them); the others read or write files and are called on the main process only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .._io import atomic_write, sha256
from ..report import EpochMetrics, RunResults
from .config import TRAIN_CONFIG, TrainConfig

if os.name == "nt":
    import msvcrt
else:
    import fcntl

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..model.multi_exit import MultiExitModel

__all__ = ["RESUMABLE_CHANGES", "RunFolder", "config_changes"]

RESUMABLE_CHANGES = ("output_dir", "num_workers", "keep_checkpoints", "log_with", "push_to_hub")  # may differ on resume


def config_changes(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """The fields in which ``cfg`` asks for another run than the ``saved`` one: all but
    ``RESUMABLE_CHANGES``; a precision ``cfg`` leaves to Accelerate (``None``) matches the one recorded."""
    recorded = saved.to_dict()
    return sorted(k for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and recorded.get(k) != v
                  and not (k == "mixed_precision" and v is None))
CHECKPOINT_NAME = re.compile(r"epoch_\d{4}")
MANIFEST = "manifest.json"  # in each checkpoint: {"sha256": {file: digest}}
LOCKED_BYTE = 1 << 20  # Windows locks a byte range: one past the holder's line, which others must read


class RunFolder:
    """The files of one training run under ``root`` (layout above)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.lock_file = self.root / "train.lock"
        self.train_config = self.root / TRAIN_CONFIG
        self.checkpoint_dir = self.root / "checkpoints"
        self.best = self.root / "best"
        self.metrics = self.root / "metrics.jsonl"
        self.results = self.root / "results.json"
        self.tradeoff_plot = self.root / "training_tradeoff.png"
        self._lock: IO[str] | None = None

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return sorted(p for p in self.checkpoint_dir.glob("epoch_*") if CHECKPOINT_NAME.fullmatch(p.name))

    def save_config(self, cfg: TrainConfig) -> None:
        """Create the folder and write the run's ``train_config.json``."""
        self.root.mkdir(parents=True, exist_ok=True)
        cfg.save(self.root)

    # --------------------------------------------------------------- owning
    def hold(self, accelerator: Accelerator) -> None:
        """Create the folder and `lock` it for this job: its main process takes the lock, and every process
        raises the ``ValueError`` where another job holds it."""
        from accelerate.utils import broadcast_object_list

        refused = None
        if accelerator.is_main_process:
            try:
                self.lock()
            except ValueError as exc:
                refused = str(exc)
        refused = broadcast_object_list([refused])[0]
        if refused is not None:
            raise ValueError(refused)

    def lock(self) -> None:
        """Create the folder and take ``train.lock`` for this process, writing in it which process holds it
        (nothing to do where this object holds it already); the lock lasts until `unlock` or the process ends
        (the OS releases it, however the process dies). A folder held by another process, or by another
        `RunFolder` of this one, is a ``ValueError`` naming the folder and that process."""
        if self._lock is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_file, "a+")
        try:
            if os.name == "nt":
                handle.seek(LOCKED_BYTE)
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.readline().strip() or "a process that is starting"
            handle.close()
            raise ValueError(f"{self.root} is in use by another training run ({holder}): one run at a time trains "
                             "in an --output-dir; wait for that one to end (or stop it), or use another --output-dir"
                             ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        """Release the lock `lock` took, if this process holds it."""
        if self._lock is not None:
            self._lock.close()  # closing the file releases its lock
            self._lock = None

    # ---------------------------------------------------------------- resume
    def clean_up(self) -> None:
        """Remove the partial folders and files an interrupted write left; finish a swap of ``best/`` cut short."""
        partials = [*self.checkpoint_dir.glob("*.partial"), *self.root.glob("*.partial"), *self.best.glob("*.partial")]
        for partial in partials:
            warnings.warn(f"removing {partial}, left by an interrupted write")
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)
        previous = self.best.with_name(f"{self.best.name}.previous")
        if previous.is_dir():  # interrupted between the two renames of save_best
            if self.best.is_dir():
                shutil.rmtree(previous)
            else:
                os.replace(previous, self.best)

    def resume(self, accelerator: Accelerator, cfg: TrainConfig) -> Path | None:
        """Load into ``accelerator`` the last checkpoint whose files match its manifest and load (an earlier one,
        with a warning naming what is wrong, where the last does not) and return it; ``None`` where there is
        none. A folder holding a run of another configuration (beyond ``RESUMABLE_CHANGES``), checkpoints
        without a readable ``train_config.json``, or checkpoints that all fail, are a ``ValueError``."""
        from accelerate.utils import broadcast_object_list

        checkpoints = self.checkpoints()
        if checkpoints:
            if not self.train_config.is_file():
                raise ValueError(f"{self.root} holds checkpoints but no {TRAIN_CONFIG}, which says what they were "
                                 "trained with: restore it, or use another --output-dir")
            changed = config_changes(TrainConfig.load(self.root), cfg)
            if changed:
                raise ValueError(f"{self.root} holds a run of another configuration (it differs in {changed}); "
                                 "rerun with the same settings to resume, or use another --output-dir")
        for i, checkpoint in enumerate(reversed(checkpoints)):
            problem = broadcast_object_list([self.damage(checkpoint) if accelerator.is_main_process else None])[0]
            if problem is None:
                try:
                    accelerator.load_state(str(checkpoint))
                    return checkpoint
                except Exception as exc:  # a damaged checkpoint: fall back to the one before
                    problem = f"{type(exc).__name__}: {exc}"
            if i == len(checkpoints) - 1:
                raise ValueError(f"no checkpoint in {self.checkpoint_dir} can be loaded ({checkpoint}: {problem}); "
                                 "delete the folder to start the run over")
            warnings.warn(f"checkpoint {checkpoint} cannot be loaded ({problem}); resuming from the one before")
        return None

    def damage(self, checkpoint: Path) -> str | None:
        """What is wrong with ``checkpoint``'s files against its manifest (a file missing, or changed since it was
        written), ``None`` where nothing is. A checkpoint an earlier timm-scan wrote has no manifest: a warning."""
        manifest = checkpoint / MANIFEST
        if not manifest.is_file():
            warnings.warn(f"checkpoint {checkpoint} has no {MANIFEST} (an earlier timm-scan wrote it): its files are "
                          "loaded unverified")
            return None
        try:
            digests = json.loads(manifest.read_text())["sha256"]
            expected = {str(name): str(digest) for name, digest in digests.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError) as exc:
            return f"{MANIFEST} is damaged ({type(exc).__name__}: {exc})"
        for name, digest in expected.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            if sha256(path) != digest:
                return f"{name} is damaged: its sha256 differs from the one {MANIFEST} recorded"
        return None

    def read_metrics(self) -> list[EpochMetrics]:
        """``metrics.jsonl``: one entry per epoch trained, epochs 1, 2, ... in order; a line that is not the
        next epoch's record is a ``ValueError`` naming the file and the line."""
        metrics: list[EpochMetrics] = []
        for number, line in enumerate(self.metrics.read_text().splitlines(), 1):
            if not line:
                continue
            try:
                record = EpochMetrics.from_json(line)
            except ValueError as exc:  # bad JSON (a JSONDecodeError), an unknown or missing field
                raise ValueError(f"{self.metrics}, line {number}, is not an EpochMetrics record ({exc}); the file is "
                                 "written whole, so it was changed from outside: repair or delete that line (the "
                                 "checkpoints, not this log, hold the run)") from None
            if record.epoch != len(metrics) + 1:
                raise ValueError(f"{self.metrics}, line {number}, is epoch {record.epoch} where epoch "
                                 f"{len(metrics) + 1} was expected; delete the lines out of order (the checkpoints, "
                                 "not this log, hold the run)")
            metrics.append(record)
        return metrics

    def keep_metrics(self, epochs: int) -> None:
        """``metrics.jsonl`` without the lines of epochs after ``epochs`` (redone on resume)."""
        if self.metrics.is_file():
            atomic_write(self.metrics, "".join(_line(m) for m in self.read_metrics() if m.epoch <= epochs))

    # ----------------------------------------------------------------- write
    def append_metrics(self, metrics: EpochMetrics) -> None:
        """One line of ``metrics.jsonl`` (the file rewritten whole); written before the epoch's checkpoint, so
        resume drops it if that fails."""
        before = self.metrics.read_text() if self.metrics.is_file() else ""
        atomic_write(self.metrics, before + _line(metrics))

    def save_checkpoint(self, accelerator: Accelerator, epoch: int, keep: int) -> None:
        """Accelerate's state and its manifest as ``checkpoints/epoch_NNNN``, renamed in when complete; only the
        last ``keep`` stay."""
        final = self.checkpoint_dir / f"epoch_{epoch:04d}"
        partial = final.with_name(final.name + ".partial")
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            digests = {p.relative_to(partial).as_posix(): sha256(p) for p in sorted(partial.rglob("*")) if p.is_file()}
            atomic_write(partial / MANIFEST, json.dumps({"sha256": digests}, indent=2))
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


def _line(metrics: EpochMetrics) -> str:
    return json.dumps(metrics.to_dict()) + "\n"
