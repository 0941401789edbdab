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
from typing import Any

import timm
import torch
from huggingface_hub import HfApi, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ScanConfig, jsonable
from .backbone import model_name
from .model import MultiExitModel, wrap

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
    (default: ``model_card(model)``)."""
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
        "class_names": model.class_names,
        "data_config": jsonable(model.data_config),
        "thresholds": model.thresholds,
        "fallback": model.fallback,
    }
    (folder / SCAN_CONFIG).write_text(json.dumps(meta, indent=2))
    (folder / "README.md").write_text(card if card is not None else model_card(model))
    return folder


def from_pretrained(
    name_or_path: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None, token: str | None = None
) -> MultiExitModel:
    """Load a saved multi-exit model from a folder or from the Hub (``"hf-hub:owner/name"``).

    Raises ``ValueError`` when the source is not a timm-scan model or a file is missing, truncated,
    corrupt or of the wrong shape.
    """
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
    data_config = meta.get("data_config")
    size = tuple(data_config["input_size"]) if data_config else None
    model = wrap(backbone.eval(), ScanConfig.from_dict(meta["scan_config"]), check_input_size=size)
    _load_strict(model.exits, _load_safetensors(folder / EXITS_WEIGHTS, name_or_path), EXITS_WEIGHTS, name_or_path)
    model.class_names = meta.get("class_names")
    model.data_config = data_config
    model.thresholds = meta.get("thresholds")
    model.fallback = meta.get("fallback", "ensemble")
    return model


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
        _load_strict(model.backbone, state, path.name, src)
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
    _load_strict(model.backbone, state, BACKBONE_WEIGHTS, src)
    if not (folder / SCAN_CONFIG).is_file():
        return "backbone"
    saved = ScanConfig.from_dict(_read_meta(folder / SCAN_CONFIG)["scan_config"])
    if not saved.exits:  # a plain backbone (a --baseline run): the exits start afresh
        return "backbone"
    if saved != model.config:
        raise ValueError(f"{src} has exits {saved.to_dict()} but this run wraps {model.config.to_dict()}; pass the "
                         "same exits and head settings, or start from a model without exits")
    _load_strict(model.exits, _load_safetensors(folder / EXITS_WEIGHTS, src), EXITS_WEIGHTS, src)
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
    _load_strict(model.backbone, _load_safetensors(folder / BACKBONE_WEIGHTS, folder), BACKBONE_WEIGHTS, folder)
    _load_strict(model.exits, _load_safetensors(folder / EXITS_WEIGHTS, folder), EXITS_WEIGHTS, folder)


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


def model_card(
    model: MultiExitModel,
    *,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    dataset: str | None = None,
    train_config: dict[str, Any] | None = None,
    results: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    plot: str | None = None,
) -> str:
    """README.md for the Hub: YAML header (library, tags, license, datasets, metrics), per-exit
    accuracy and MACs, thresholds and their measured acceleration, how to load, how it was trained.

    ``results``: the trainer's ``results.json``; ``evaluation``: ``examples/evaluate.py``'s
    ``evaluation.json``; ``plot``: a file name in the saved folder to show (the trade-off plot).
    """
    from huggingface_hub import ModelCardData

    arch = model.backbone.pretrained_cfg.get("architecture", type(model.backbone).__name__)
    data = ModelCardData(
        library_name="timm",
        license=license,
        tags=["image-classification", "timm", "timm-scan", "early-exit", "self-distillation"],
        datasets=[dataset] if dataset and "/" in dataset and not Path(dataset).exists() else None,
        metrics=["accuracy"],
        pipeline_tag="image-classification",
    )
    name = repo_id or "<owner>/<name>"
    stages = ", ".join(s.module for s in model.exit_stages[:-1]) or "none"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {name.split('/')[-1]}", "",
        f"A multi-exit **{arch}** made with timm-scan (SCAN, NeurIPS 2019; "
        f"Self-Distillation, TPAMI 2021): {model.num_exits} classifiers, shallow exits after {stages} "
        f"and the backbone's own head as the deepest. Easy images can leave at a shallow exit.", "",
    ]
    lines += _card_table(model, results, evaluation)
    if model.thresholds:
        lines += ["## Early exit", "",
                  f"Thresholds (max softmax, one per shallow exit): {', '.join(f'{t:.3f}' for t in model.thresholds)}; "
                  f"samples that pass none get the {model.fallback}."]
        if evaluation:
            ee = evaluation["early_exit"]
            lines.append(f"On the test split: accuracy {ee['accuracy']:.2f}%, MACs speed-up {ee['macs_speedup']:.2f}x, "
                         "share of samples per exit " + ", ".join(f"{s:.0%}" for s in ee["exit_shares"]) + ".")
            for t in ee.get("wall_clock", []):
                lines.append(f"Measured wall-clock speed-up at batch {t['batch_size']}: {t['measured_speedup']:.2f}x.")
        lines.append("")
    if plot:
        lines += [f"![accuracy against MACs]({plot})", ""]
    lines += [
        "## How to load", "",
        "```python", "import timm_scan", "",
        f'model = timm_scan.from_pretrained("hf-hub:{name}")',
        "out = model(images)                # logits of every exit, shallowest first",
        "predictor = timm_scan.EarlyExitPredictor(model)   # uses the saved thresholds" if model.thresholds else
        "predictor = timm_scan.EarlyExitPredictor(model, thresholds=[...])",
        "```", "",
        "The backbone alone, with plain timm:", "",
        "```python", "import timm", "",
        f'backbone = timm.create_model("hf-hub:{name}", pretrained=True)', "```", "",
    ]
    if train_config:
        recipe = ", ".join(f"{k}={v}" for k, v in train_config.items() if k in _RECIPE_KEYS and v is not None)
        lines += ["## Training", "", f"`examples/train.py` with {recipe}.", ""]
    return "\n".join(lines)


_RECIPE_KEYS = ("dataset", "model", "baseline", "input_size", "epochs", "batch_size", "optimizer", "lr", "weight_decay",
                "schedule", "loss_preset", "alpha", "lam", "temperature", "teacher", "anneal_epochs", "mixed_precision", "seed")


def _card_table(model: MultiExitModel, results: dict | None, evaluation: dict | None) -> list[str]:
    macs = (results or {}).get("exit_macs") or (evaluation or {}).get("exit_macs")
    base = (results or {}).get("backbone_macs") or (evaluation or {}).get("backbone_macs")
    test = (results or {}).get("test")
    if not macs:
        return []
    lines = ["## Exits", "", "| exit | stage | test accuracy | MMACs | of backbone |", "| --- | --- | --- | --- | --- |"]
    for i, (stage, m) in enumerate(zip(model.exit_stages, macs)):
        acc = f"{100 * test[f'acc_exit{i + 1}']:.2f}%" if test else "-"
        lines.append(f"| {i + 1} | {stage.module} | {acc} | {m / 1e6:.2f} | {m / base:.1%} |")
    if test and model.num_exits > 1:
        lines.append(f"| ensemble | all | {100 * test['acc_ensemble']:.2f}% | {macs[-1] / 1e6:.2f} | {macs[-1] / base:.1%} |")
    lines += ["", "MACs per image, cumulative: a sample leaving at exit i pays for sections 1..i and heads 1..i.", ""]
    return lines


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


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], filename: str, source: str | Path) -> None:
    """``load_state_dict(strict=True)``, with missing, unexpected or mis-shaped tensors as a ``ValueError``."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{source}: {filename} does not match the model ({exc})") from exc
