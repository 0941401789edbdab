"""Saving, loading and sharing multi-exit models: ``save_pretrained``, ``from_pretrained``, ``push_to_hub``.

A saved model is a folder (or a Hub model repo) that plain timm can read too::

    config.json              timm's own config of the backbone (``timm.models.save_for_hf``)
    model.safetensors        the backbone's weights, timm's key names
    scan_config.json         timm-scan: ScanConfig, class names, data config, thresholds
    scan_exits.safetensors   the shallow exit heads' weights
    README.md                model card (Hub YAML header), plus any plot it shows

so ``timm.create_model("hf-hub:owner/name", pretrained=True)`` still gives the plain backbone, and
``timm_scan.from_pretrained("hf-hub:owner/name")`` the whole multi-exit model. Weights are
safetensors only, and loading is strict: every tensor must be there with its shape.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from huggingface_hub import HfApi, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import model_name
from .card import model_card
from .config import ScanConfig

if TYPE_CHECKING:
    from .multi_exit import MultiExitModel

__all__ = ["HubUploadError", "load_initial_weights", "load_weights", "push_to_hub", "read_pretrained",
           "save_pretrained", "save_thresholds"]

FORMAT = "timm-scan"
FORMAT_VERSION = 1
SCAN_CONFIG = "scan_config.json"
EXITS_WEIGHTS = "scan_exits.safetensors"
BACKBONE_CONFIG = "config.json"
BACKBONE_WEIGHTS = "model.safetensors"
HUB_PREFIX = "hf-hub:"


class HubUploadError(RuntimeError):
    """Pushing to the Hub failed; the message says what failed and where the local files are."""


def save_pretrained(model: MultiExitModel, save_directory: str | Path, card: str | None = None) -> Path:
    """Write ``model`` to ``save_directory`` in the layout above; ``card`` is the README.md text
    (default: ``model_card(model)``). Class names and the data config are stored once, in timm's
    ``config.json``; ``scan_config.json`` holds what timm-scan adds: the exits and the thresholds."""
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    model_config = {"label_names": list(model.class_names)} if model.class_names else None
    data_config = dict(model.data_config) if model.data_config else None
    timm.models.save_for_hf(model.backbone, str(folder), model_config=model_config, data_config=data_config,
                            safe_serialization=True)
    save_file({k: v.contiguous() for k, v in model.exits.state_dict().items()}, str(folder / EXITS_WEIGHTS))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "scan_config": model.config.to_dict(),
        "thresholds": model.thresholds,
        "fallback": model.fallback,
    }
    (folder / SCAN_CONFIG).write_text(json.dumps(meta, indent=2))
    (folder / "README.md").write_text(card if card is not None else model_card(model))
    return folder


def read_pretrained(
    name_or_path: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None, token: str | None = None
) -> tuple[nn.Module, ScanConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """What ``MultiExitModel.from_pretrained`` builds from: the timm backbone (weights loaded), the
    ``ScanConfig``, the exits' tensors and ``scan_config.json`` (thresholds, fallback), from a folder or
    from the Hub (``"hf-hub:owner/name"``). Raises ``ValueError`` when the source is not a timm-scan model
    or a file is missing, truncated or corrupt."""
    folder = _resolve(str(name_or_path), revision, cache_dir, token)
    meta_path = folder / SCAN_CONFIG
    if not meta_path.is_file():
        hint = f" To load the plain timm model: timm.create_model('{name_or_path}', pretrained=True)." if (
            folder / BACKBONE_CONFIG).is_file() else ""
        raise ValueError(f"{name_or_path} is not a timm-scan model: it has no {SCAN_CONFIG}.{hint}")
    meta = _read_meta(meta_path)
    for needed in (BACKBONE_CONFIG, BACKBONE_WEIGHTS, EXITS_WEIGHTS):
        if not (folder / needed).is_file():
            raise ValueError(f"{name_or_path}: {needed} is missing")
    try:
        backbone = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ValueError(f"{name_or_path}: cannot load the backbone from {BACKBONE_WEIGHTS}: {exc}") from exc
    exits = _load_safetensors(folder / EXITS_WEIGHTS, name_or_path)
    return backbone, ScanConfig.from_dict(meta["scan_config"]), exits, meta


def load_initial_weights(
    model: MultiExitModel, source: str | Path, *, revision: str | None = None, token: str | None = None
) -> str:
    """Start ``model`` from weights a user already has; returns what was loaded: ``"backbone"`` or
    ``"backbone and exits"``.

    ``source``: a ``save_pretrained`` folder or ``hf-hub:`` repo of timm-scan (its exits are loaded
    too when it has some, which must then be the ones ``model`` was wrapped with) or of plain timm
    (``config.json`` and ``model.safetensors``, as ``save_for_hf`` writes them), or a timm checkpoint
    file (``.safetensors``, timm's key names). Loading is strict: the architecture, the number of
    classes and every tensor's shape must match ``model``; a ``ValueError`` says what differs.
    """
    arch, src = model_name(model.backbone), str(source)
    path = Path(src).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(
                f"{src}: only safetensors checkpoints are loaded (pickle can run code). Convert a checkpoint you "
                "trust with safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')"
            )
        state = _load_safetensors(path, src)
        _check_classes(model, state, src)
        load_strict(model.backbone, state, path.name, src)
        return "backbone"
    folder = _resolve(src, revision, None, token)
    if not (folder / BACKBONE_CONFIG).is_file():
        raise ValueError(f"{src} is not a timm model folder or repo: it has no {BACKBONE_CONFIG}")
    try:
        config = json.loads((folder / BACKBONE_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{src}: {BACKBONE_CONFIG} is not valid JSON ({exc}); the file is damaged") from exc
    if config.get("architecture") != arch:
        raise ValueError(f"{src} holds a {config.get('architecture')!r} model but this run builds {arch!r}; "
                         f"pass --model {config.get('architecture')}")
    state = _load_safetensors(folder / BACKBONE_WEIGHTS, src)
    _check_classes(model, state, src)
    load_strict(model.backbone, state, BACKBONE_WEIGHTS, src)
    if not (folder / SCAN_CONFIG).is_file():
        return "backbone"
    saved = ScanConfig.from_dict(_read_meta(folder / SCAN_CONFIG)["scan_config"])
    if not saved.exits:  # a plain backbone (a --baseline run): the exits start afresh
        return "backbone"
    if saved != model.config:
        raise ValueError(f"{src} has exits {saved.to_dict()} but this run wraps {model.config.to_dict()}; pass the "
                         "same exits and head settings, or start from a model without exits")
    load_strict(model.exits, _load_safetensors(folder / EXITS_WEIGHTS, src), EXITS_WEIGHTS, src)
    return "backbone and exits"


def _check_classes(model: MultiExitModel, state: dict[str, torch.Tensor], source: str) -> None:
    """A clear error where the classifier in ``state`` is for another number of classes."""
    classifier = model.backbone.pretrained_cfg.get("classifier")
    weight = state.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    if weight is not None and weight.shape[0] != model.num_classes:
        raise ValueError(
            f"{source} classifies {weight.shape[0]} classes ({classifier}.weight {tuple(weight.shape)}) but the data "
            f"has {model.num_classes}; start from weights for these classes, or from timm's own (--pretrained), "
            "whose classifier is replaced"
        )


def _read_meta(path: Path) -> dict[str, Any]:
    """``scan_config.json``, checked to be valid JSON of the format this version reads."""
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the file is damaged") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; this timm-scan "
            f"reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return meta


def load_weights(model: MultiExitModel, folder: str | Path) -> None:
    """Load a ``save_pretrained`` folder's weights into an existing model of the same shape (strict)."""
    folder = Path(folder)
    load_strict(model.backbone, _load_safetensors(folder / BACKBONE_WEIGHTS, folder), BACKBONE_WEIGHTS, folder)
    load_strict(model.exits, _load_safetensors(folder / EXITS_WEIGHTS, folder), EXITS_WEIGHTS, folder)


def save_thresholds(folder: str | Path, thresholds: list[float], fallback: str = "ensemble") -> None:
    """Record searched thresholds in a saved model's ``scan_config.json`` (weights untouched)."""
    path = Path(folder) / SCAN_CONFIG
    meta = json.loads(path.read_text())
    meta["thresholds"], meta["fallback"] = [float(t) for t in thresholds], fallback
    path.write_text(json.dumps(meta, indent=2))


def push_to_hub(
    model: MultiExitModel,
    repo_id: str,
    *,
    save_directory: str | Path | None = None,
    card: str | None = None,
    extra_files: Sequence[str | Path] = (),
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload timm-scan model",
    token: str | None = None,
) -> str:
    """``save_pretrained`` into ``save_directory`` (default: a new temporary folder), copy
    ``extra_files`` (plots the card shows) beside, create the repo if needed and upload the folder
    (to branch ``revision`` if given, created if needed); returns the commit URL. On failure,
    raises ``HubUploadError`` naming what failed and the folder, which is left intact."""
    folder = Path(save_directory) if save_directory else Path(tempfile.mkdtemp(prefix="timm-scan-"))
    save_pretrained(model, folder, card=card if card is not None else model_card(model, repo_id=repo_id))
    for extra in extra_files:
        if Path(extra).resolve() != (folder / Path(extra).name).resolve():
            shutil.copy(extra, folder / Path(extra).name)
    api = HfApi(token=token)
    step = "creating the repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            step = f"creating branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "uploading the files"
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message)
    except Exception as exc:
        raise HubUploadError(
            f"push of {repo_id} failed while {step}: {str(exc).rstrip('.')}. The saved model is intact in {folder}; "
            f"retry with push_to_hub(..., save_directory={str(folder)!r}) or upload that folder yourself."
        ) from exc
    if save_directory is None:
        shutil.rmtree(folder, ignore_errors=True)
    return str(info)


def _resolve(name: str, revision: str | None, cache_dir: str | Path | None, token: str | None) -> Path:
    if name.startswith(HUB_PREFIX):
        repo_id = name[len(HUB_PREFIX):]
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token))
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{name} is neither a folder nor a Hub model ('hf-hub:owner/name')")
    return folder


def _load_safetensors(path: Path, source: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{source}: {path.name} cannot be read as safetensors ({exc}); it is truncated or damaged") from exc


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], filename: str, source: str | Path) -> None:
    """``load_state_dict(strict=True)``, with missing, unexpected or mis-shaped tensors as a ``ValueError``."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{source}: {filename} does not match the model ({exc})") from exc
