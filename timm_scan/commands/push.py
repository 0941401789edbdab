"""``timm-scan push RUN owner/name``: a trained run's best model to the Hugging Face Hub, with its card.

The card is the run's (`run_card`, as in ``<run>/best/README.md``): the test accuracy and MACs per exit
(``<run>/results.json``), the searched thresholds and their measured speed-up (``<run>/evaluation.json``,
from ``timm-scan evaluate``) and the trade-off plot, where those exist. The files are first written to
``<run>/hub/``; if the upload fails they stay.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..model.card import run_card
from ..model.hub import push_to_hub
from ..options import option
from ..training.runs import load_run, run_results

__all__ = ["PushConfig", "push"]


@dataclass
class PushConfig:
    """What ``timm-scan push`` does."""

    run: str = option(help="output directory of a training run", positional=True)
    repo_id: str = option(help="the Hub model repo, owner/name", positional=True)
    private: bool = option(False, "create the repo private")
    revision: str | None = option(None, "a branch to push to (created if needed)")
    license: str = option("apache-2.0", "license in the card's header")
    onnx: bool = option(False, "upload the ONNX export (<run>/onnx, from timm-scan export) beside the model")


def push(cfg: PushConfig) -> str:
    """Push and return the commit URL."""
    run = Path(cfg.run)
    model, _ = load_run(run)
    run_results(run)  # a finished run only: its test results are on the card
    plot = run / "tradeoff_test.png"
    card = run_card(run / "best", model, repo_id=cfg.repo_id, license=cfg.license,
                    plot=plot.name if plot.is_file() else None)
    if cfg.onnx and not (run / "onnx" / "manifest.json").is_file():
        raise ValueError(f"{run / 'onnx'} holds no ONNX export: run timm-scan export {run} first")
    shutil.rmtree(run / "hub", ignore_errors=True)  # what a previous push left there is not uploaded again
    url = push_to_hub(model, cfg.repo_id, save_directory=run / "hub", card=card,
                      extra_files=[plot] if plot.is_file() else [], extra_folders=[run / "onnx"] if cfg.onnx else [],
                      private=cfg.private or None, revision=cfg.revision)
    print(f"pushed {run} to {cfg.repo_id}: {url}")
    return url
