"""Saving, loading and sharing multi-exit models: ``save_pretrained``, ``from_pretrained``, ``push_to_hub``.

A saved model is a folder (or a Hub model repo) that plain timm can read too::

    config.json              timm's own config of the backbone (``timm.models.save_for_hf``)
    model.safetensors        the backbone's weights, timm's key names
    scan_config.json         timm-scan: ScanConfig, the exit policy, measured latency, both weights files' SHA-256
    scan_exits.safetensors   the shallow exit heads' weights
    README.md                model card (Hub YAML header), plus any plot it shows

so ``timm.create_model("hf-hub:owner/name", pretrained=True)`` still gives the plain backbone, and
``timm_scan.from_pretrained("hf-hub:owner/name")`` the whole multi-exit model. Weights are
safetensors only, and loading is strict: every tensor must be there with its shape, and every byte as
saved (the SHA-256). A folder is untrusted input: what it would cost to build is checked before anything
is allocated (`read_pretrained`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_url,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from .._io import atomic_write, check_sha256, read_json, sha256
from ..exit_policy import ExitPolicy
from ..report import ExitLatency
from .runner import feature_stages, model_name
from .card import CardModel, is_run_best, model_card, run_card
from .config import ScanConfig, check_data_config
from .heads import exit_heads
from .positions import resolve_exits

__all__ = ["MAX_PARAMETERS", "HubUploadError", "Pretrained", "check_pretrained_weights", "load_initial_weights",
           "load_weights", "push_to_hub", "read_pretrained", "read_tensors", "save_deployment", "save_pretrained",
           "write_run_card"]

FORMAT = "timm-scan"
# 3: the weights' SHA-256 ("sha256"); 2: the exit policy as one object, "policy"; 1: thresholds, fallback, temperatures
FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, 3)
SCAN_CONFIG = "scan_config.json"
EXITS_WEIGHTS = "scan_exits.safetensors"
BACKBONE_CONFIG = "config.json"
BACKBONE_WEIGHTS = "model.safetensors"
WEIGHT_FILES = (BACKBONE_WEIGHTS, EXITS_WEIGHTS)
HUB_PREFIX = "hf-hub:"
FORMAT_FILES = (SCAN_CONFIG, BACKBONE_CONFIG, BACKBONE_WEIGHTS, EXITS_WEIGHTS)  # what loading fetches from the Hub
_META_KEYS = {"format", "format_version", "scan_config", "policy", "exit_latency", "sha256"}
_V1_POLICY_KEYS = {"thresholds", "fallback", "temperatures"}  # format 1's loose policy fields
MAX_PARAMETERS = 2_000_000_000  # the most values (parameters and buffers) from_pretrained loads by default: 8 GB in float32
# Building config.json's backbone (on the meta device) stops once it has registered more than this many times the
# tensors and values model.safetensors holds: a config that describes a larger model fails in the time its weights take
BUILD_SLACK = 2
CHECK_SIDE = 256  # the wrap-time proof of a loaded model runs at most this size, unless its input size is fixed
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class HubUploadError(RuntimeError):
    """Pushing to the Hub failed; the message says what failed and where the local files are."""


def save_pretrained(model: nn.Module, save_directory: str | Path, card: str | None = None) -> Path:
    """Write ``model`` (a `MultiExitModel`) to ``save_directory`` in the layout above; ``card`` is the
    README.md text (default: ``model_card(model)``). Class names and the data config are stored once, in
    timm's ``config.json``; ``scan_config.json`` holds what timm-scan adds: the exits, the exit policy,
    measured latency, and the SHA-256 of both weights files, which loading verifies. It is written last:
    every file but timm's own is written whole or not at all. A data config that loading would refuse
    (`check_data_config`) is a ``ValueError`` before anything is written."""
    data_config = dict(model.data_config) if model.data_config else None
    if data_config is not None:
        check_data_config(data_config)
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    model_config = {"label_names": list(model.class_names)} if model.class_names else None
    timm.models.save_for_hf(model.backbone, str(folder), model_config=model_config, data_config=data_config,
                            safe_serialization=True)
    atomic_write(folder / EXITS_WEIGHTS, save({k: v.contiguous() for k, v in model.exits.state_dict().items()}))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "scan_config": model.config.to_dict(),
        "policy": model.policy.to_dict(),
    }
    if model.exit_latency:
        meta["exit_latency"] = [latency.to_dict() for latency in model.exit_latency]
    meta["sha256"] = {name: sha256(folder / name) for name in WEIGHT_FILES}
    atomic_write(folder / SCAN_CONFIG, json.dumps(meta, indent=2))
    atomic_write(folder / "README.md", card if card is not None else model_card(model))
    return folder


@dataclass
class Pretrained:
    """A saved model's files, read and validated: the timm ``backbone`` with its weights, the exits'
    ``config`` and the file of their weights (loaded once the exits are built), the exit policy and
    measured latency, the ``data_config`` (timm's, checked), and ``check_size``, the input size the
    wrap-time proof may run at."""

    source: str
    backbone: nn.Module
    config: ScanConfig
    exits_file: Path
    policy: ExitPolicy
    data_config: dict[str, Any]
    check_size: tuple[int, int, int]
    exit_latency: list[ExitLatency] = dataclasses.field(default_factory=list)


def read_pretrained(
    name_or_path: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None,
    token: str | None = None, max_parameters: int = MAX_PARAMETERS,
) -> Pretrained:
    """What ``MultiExitModel.from_pretrained`` builds from, from a folder or from the Hub
    (``"hf-hub:owner/name"``: only the format's files are fetched). Everything is validated before
    anything is allocated, each ``ValueError`` naming the file and what is wrong: JSON types and ranges
    and the data config; the size, against ``max_parameters`` (the most values, parameters and buffers
    of backbone and exits, a folder may hold; raise it to load larger models) and against each other:
    the weights files' headers, the model ``config.json`` describes (built on the meta device, stopped
    once it outgrows ``model.safetensors``) and the exits ``scan_config.json`` describes (counted on the
    meta device); the weights' SHA-256 (format 3 on); then every tensor's name, shape, kind of dtype and
    finiteness."""
    if isinstance(max_parameters, bool) or not isinstance(max_parameters, numbers.Integral) or max_parameters < 1:
        raise ValueError(f"max_parameters must be a positive int; got {max_parameters!r}")
    src = str(name_or_path)
    folder = _resolve(src, revision, cache_dir, token)
    if not (folder / SCAN_CONFIG).is_file():
        hint = f" To load the plain timm model: timm.create_model('{src}', pretrained=True)." if (
            folder / BACKBONE_CONFIG).is_file() else ""
        raise ValueError(f"{src} is not a timm-scan model: it has no {SCAN_CONFIG}.{hint}")
    meta = _read_meta(folder / SCAN_CONFIG)
    for needed in (BACKBONE_CONFIG, BACKBONE_WEIGHTS, EXITS_WEIGHTS):
        if not (folder / needed).is_file():
            raise ValueError(f"{src}: {needed} is missing")
    try:
        config = ScanConfig.from_dict(meta["scan_config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{src}: {SCAN_CONFIG} field 'scan_config': {exc}") from None
    try:
        policy, exit_latency = _deployment(meta, len(config.exits or []) + 1)
    except ValueError as exc:
        raise ValueError(f"{src}: {SCAN_CONFIG}: {exc}") from None
    headers = {name: _header(folder / name, src) for name in WEIGHT_FILES}
    sizes = {name: _values(header) for name, header in headers.items()}
    if sum(sizes.values()) > max_parameters:
        raise ValueError(f"{src}: {BACKBONE_WEIGHTS} and {EXITS_WEIGHTS} hold {sizes[BACKBONE_WEIGHTS]:,} and "
                         f"{sizes[EXITS_WEIGHTS]:,} values (parameters and buffers), above max_parameters="
                         f"{max_parameters:,}; to load a model this large, pass a larger max_parameters")
    _verify_weights(folder, meta, src)
    skeleton = _skeleton(folder, src, headers[BACKBONE_WEIGHTS])
    _check_header(headers[BACKBONE_WEIGHTS], skeleton.state_dict(), BACKBONE_WEIGHTS, src,
                  f"the model {BACKBONE_CONFIG} describes")
    try:
        data_config = check_data_config(timm.data.resolve_model_data_config(skeleton))
    except ValueError as exc:
        raise ValueError(f"{src}: {BACKBONE_CONFIG} (pretrained_cfg): {exc}") from None
    size = data_config["input_size"]
    check_size = size if skeleton.pretrained_cfg.get("fixed_input_size", False) else (
        size[0], min(size[1], CHECK_SIDE), min(size[2], CHECK_SIDE))
    _check_exits(skeleton, config, headers[EXITS_WEIGHTS], max_parameters - sizes[BACKBONE_WEIGHTS], check_size, src)
    backbone = timm.create_model(f"local-dir:{folder}", pretrained=False)
    load_strict(backbone, _read_finite(folder / BACKBONE_WEIGHTS, src), BACKBONE_WEIGHTS, src)
    return Pretrained(src, backbone, config, folder / EXITS_WEIGHTS, policy, data_config, check_size, exit_latency)


def _deployment(meta: dict[str, Any], num_exits: int) -> tuple[ExitPolicy, list[ExitLatency]]:
    """The deployment fields of ``scan_config.json`` (the exit policy, in either format, and measured
    latency), validated against a ``num_exits``-exit model."""
    if meta.get("format_version") == 1:
        policy = ExitPolicy(meta.get("thresholds"), meta.get("fallback", "ensemble"), meta.get("temperatures"))
    else:
        policy = ExitPolicy.from_dict(meta.get("policy", {}))
    policy.check(num_exits)
    entries = meta.get("exit_latency") or []
    if not isinstance(entries, list):
        raise ValueError(f"exit_latency must be a list of measurements; got {type(entries).__name__}")
    try:
        exit_latency = [ExitLatency.from_dict(entry) for entry in entries]
    except TypeError as exc:
        raise ValueError(f"exit_latency: {exc}") from None
    for latency in exit_latency:
        if len(latency.ms_per_image) != num_exits:
            raise ValueError(f"exit_latency: {len(latency.ms_per_image)} values for a {num_exits}-exit model")
    return policy, exit_latency


class _Outgrown(Exception):
    """A model under construction registered more parameters than `_at_most` allows."""


@contextlib.contextmanager
def _at_most(tensors: int, values: int) -> Iterator[None]:
    """Raise `_Outgrown` inside the modules built in this thread, within the block, once they have
    registered more than ``tensors`` parameters or ``values`` parameter values (replaced ones count)."""
    thread, count = threading.get_ident(), [0, 0]

    def registered(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and threading.get_ident() == thread:
            count[0] += 1
            count[1] += param.numel()
            if count[0] > tensors or count[1] > values:
                raise _Outgrown

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(registered)
    try:
        yield
    finally:
        handle.remove()


def _skeleton(folder: Path, src: str, weights: dict[str, tuple[str, tuple[int, ...]]]) -> nn.Module:
    """The backbone ``config.json`` describes, checked, built on the meta device (nothing allocated) and
    stopped once it outgrows the weights' header ``weights`` (`BUILD_SLACK`)."""
    config = _read_json(folder / BACKBONE_CONFIG, src)
    _check_backbone_config(config, src)
    try:
        with torch.device("meta"), _at_most(BUILD_SLACK * len(weights), BUILD_SLACK * _values(weights)):
            return timm.create_model(f"local-dir:{folder}", pretrained=False)
    except _Outgrown:
        raise ValueError(
            f"{src}: {BACKBONE_CONFIG} (fields 'architecture' {config['architecture']!r} and 'model_args' "
            f"{config.get('model_args', {})}) describes a larger model than {BACKBONE_WEIGHTS} holds "
            f"({len(weights)} tensors, {_values(weights):,} values): the two files do not belong together, or one "
            "is damaged") from None
    except Exception as exc:  # timm raises many types for configs it cannot build
        raise ValueError(f"{src}: {BACKBONE_CONFIG} does not describe a model timm can build "
                         f"({type(exc).__name__}: {exc})") from None


def _check_exits(skeleton: nn.Module, config: ScanConfig, weights: dict[str, tuple[str, tuple[int, ...]]],
                 max_values: int, input_size: tuple[int, int, int], src: str) -> None:
    """The exit heads ``config`` puts on ``skeleton``, counted on the meta device (blocks inside stages
    probed there at ``input_size``): at most ``max_values`` values, and the tensors of
    ``scan_exits.safetensors`` (header ``weights``)."""
    try:
        with torch.device("meta"):
            cuts = resolve_exits(skeleton, config.exits, torch.empty(1, *input_size))
    except ValueError as exc:
        raise ValueError(f"{src}: {SCAN_CONFIG} field 'scan_config': {exc}") from None
    if cuts and config.head == "sepconv" and config.head_budget is not None and config.head_channels is None:
        raise ValueError(f"{src}: {SCAN_CONFIG} field 'scan_config' has a head_budget but no head_channels; a saved "
                         "config records the width wrap chose for its heads")
    with torch.device("meta"):
        expected = nn.ModuleList(exit_heads(skeleton, config, cuts)).state_dict()
    values = sum(t.numel() for t in expected.values())
    if values > max_values:
        raise ValueError(
            f"{src}: {SCAN_CONFIG} field 'scan_config' (exits {config.exits}, head_channels {config.head_channels}, "
            f"head_blocks {config.head_blocks}) gives exit heads of {values:,} values, above the {max_values:,} that "
            "max_parameters leaves beside the backbone; to load a model this large, pass a larger max_parameters")
    _check_header(weights, expected, EXITS_WEIGHTS, src, f"the exits {SCAN_CONFIG} describes")


def _check_backbone_config(config: dict[str, Any], src: str) -> None:
    """timm's ``config.json``: a timm architecture, a number of classes, JSON objects where objects go."""
    arch = config.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ValueError(f"{src}: {BACKBONE_CONFIG} field 'architecture' is {arch!r}, not a model of timm "
                         f"{timm.__version__}")
    num_classes = config.get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{src}: {BACKBONE_CONFIG} field 'num_classes' must be a positive int; got {num_classes!r}")
    for key in ("model_args", "pretrained_cfg"):
        if key in config and not isinstance(config[key], dict):
            raise ValueError(f"{src}: {BACKBONE_CONFIG} field {key!r} must be a JSON object; got {config[key]!r}")
    labels = config.get("label_names")
    if labels is not None and (not isinstance(labels, list) or len(labels) != num_classes
                               or not all(isinstance(n, str) for n in labels)):
        raise ValueError(f"{src}: {BACKBONE_CONFIG} field 'label_names' must be {num_classes} class names (strings)")


def read_tensors(path: Path, expected: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked against ``expected`` (a state dict, possibly on the meta
    device) before they are read (`_check_header`), then every floating tensor finite."""
    _check_header(_header(path, src), expected, path.name, src, "the model")
    return _read_finite(path, src)


def _check_header(header: dict[str, tuple[str, tuple[int, ...]]], expected: dict[str, torch.Tensor], file: str,
                  src: str, model: str) -> None:
    """A safetensors header (`_header`) of ``file`` against ``expected``, the state dict of ``model`` (in
    words, for the message): the same names and shapes, floating point where the model's are (other float
    precisions are cast on loading), the exact dtype otherwise."""
    missing, unexpected = sorted(expected.keys() - header.keys()), sorted(header.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{src}: {file} does not match {model}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}" + (" (and more)" if len(missing) > 5 or len(unexpected) > 5 else ""))
    for name, want in expected.items():
        dtype, shape = header[name]
        got = _SAFETENSORS_DTYPES.get(dtype)
        if shape != tuple(want.shape):
            raise ValueError(f"{src}: {file} tensor {name!r} has shape {shape}; in {model} it is {tuple(want.shape)}")
        if got is None or (got != want.dtype and not (got.is_floating_point and want.dtype.is_floating_point)):
            raise ValueError(f"{src}: {file} tensor {name!r} is {dtype}; in {model} it is {want.dtype}")


def _read_finite(path: Path, src: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose header was checked; a NaN or infinite value is a ``ValueError``."""
    state = _load_safetensors(path, src)
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{src}: {path.name} tensor {name!r} holds NaN or infinite values")
    return state


def load_initial_weights(
    model: nn.Module, source: str | Path, *, revision: str | None = None, token: str | None = None
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
        _load_backbone_weights(model, path, src)
        return "backbone"
    folder = _resolve(src, revision, None, token)
    if not (folder / BACKBONE_CONFIG).is_file():
        raise ValueError(f"{src} is not a timm model folder or repo: it has no {BACKBONE_CONFIG}")
    config = _read_json(folder / BACKBONE_CONFIG, src)
    if config.get("architecture") != arch:
        raise ValueError(f"{src} holds a {config.get('architecture')!r} model but this run builds {arch!r}; "
                         f"pass --model {config.get('architecture')}")
    meta = _read_meta(folder / SCAN_CONFIG) if (folder / SCAN_CONFIG).is_file() else None
    if meta is not None:
        _verify_weights(folder, meta, src)
    _load_backbone_weights(model, folder / BACKBONE_WEIGHTS, src)
    if meta is None:
        return "backbone"
    try:
        saved = ScanConfig.from_dict(meta["scan_config"])
    except TypeError as exc:
        raise ValueError(f"{src}: {SCAN_CONFIG} field 'scan_config': {exc}") from None
    if not saved.exits:  # a plain backbone (a --baseline run): the exits start afresh
        return "backbone"
    if saved != model.config:
        raise ValueError(f"{src} has exits {saved.to_dict()} but this run wraps {model.config.to_dict()}; pass the "
                         "same exits and head settings, or start from a model without exits")
    load_strict(model.exits, read_tensors(folder / EXITS_WEIGHTS, model.exits.state_dict(), src), EXITS_WEIGHTS, src)
    return "backbone and exits"


def check_pretrained_weights(name: str) -> None:
    """A ``ValueError`` at once where timm could not have the pretrained weights of model ``name`` (before
    ``timm.create_model(name, pretrained=True)``, which would retry for about a minute, then raise a
    traceback): they are not in the Hugging Face cache and the Hub cannot be reached (offline mode, or no
    answer from ``HF_ENDPOINT`` within ``HF_HUB_ETAG_TIMEOUT``). Weights that are cached, or that the Hub
    answers for, or that are not on the Hub (a URL or file of the model's ``pretrained_cfg``) pass."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id or cfg.file:
        return
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]  # timm's order
    if any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision or None), str) for f in files):
        return
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, files[0], revision=revision or None))
    except HfHubHTTPError:  # the Hub answered (a file it does not have, ...): timm fetches or says the rest
        return
    except Exception as exc:  # no answer: offline mode, refused, DNS, timeout (requests or httpx errors by version)
        raise ValueError(
            f"the pretrained weights of {name} ({repo_id} on the Hugging Face Hub) are not in the local cache "
            f"({constants.HF_HUB_CACHE}) and the Hub ({constants.ENDPOINT}) cannot be reached ({type(exc).__name__}: "
            f"{exc}). Offline, train from random weights (no --pretrained), start from weights you have (--init-from "
            f"a save_pretrained folder or a .safetensors checkpoint of {name} for your classes; in Python, "
            f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file='weights.safetensors'))), "
            "or download the weights once where the Hub can be reached: they are then cached"
        ) from None


def _load_backbone_weights(model: nn.Module, path: Path, src: str) -> None:
    """A timm checkpoint into the backbone, with a clear error where its classifier is for another
    number of classes."""
    classifier = model.backbone.pretrained_cfg.get("classifier")
    shape = _header(path, src).get(f"{classifier}.weight", (None, None))[1] if isinstance(classifier, str) else None
    if shape is not None and shape[0] != model.num_classes:
        raise ValueError(
            f"{src} classifies {shape[0]} classes ({classifier}.weight {shape}) but the data has {model.num_classes}; "
            "start from weights for these classes, or from timm's own (--pretrained), whose classifier is replaced"
        )
    load_strict(model.backbone, read_tensors(path, model.backbone.state_dict(), src), path.name, src)


def _header(path: Path, src: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype, shape)}`` of a safetensors file, read without its data."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{src}: {path.name} cannot be read as safetensors ({exc}); it is truncated or damaged") from None


def _values(header: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """How many values (parameters and buffers) a safetensors header (`_header`) describes."""
    return sum(math.prod(shape) for _, shape in header.values())


def _verify_weights(folder: Path, meta: dict[str, Any], src: str | Path) -> None:
    """Both weights files against the SHA-256 that ``scan_config.json`` (``meta``, `_read_meta`) records
    (format 3 on; earlier folders have none, and their files are checked by their contents only)."""
    for name, digest in meta.get("sha256", {}).items():
        check_sha256(folder / name, digest, f"{src}: {name}")


def _read_json(path: Path, src: str | Path) -> dict[str, Any]:
    """A JSON object file of a saved model (`read_json`), or a ``ValueError`` naming the model and file."""
    data = read_json(path, f"{src}: {path.name}")
    if not isinstance(data, dict):
        raise ValueError(f"{src}: {path.name} must hold a JSON object; it holds a {type(data).__name__}")
    return data


def _read_meta(path: Path) -> dict[str, Any]:
    """``scan_config.json``, checked to be a JSON object of a format this version reads (1 to 3), with the
    fields of its version: from 3 on, ``sha256`` maps both weights files to their SHA-256 (hex)."""
    meta = _read_json(path, path.parent)
    version = meta.get("format_version")
    if meta.get("format") != FORMAT or isinstance(version, bool) or version not in READ_VERSIONS:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} version {version!r}; this timm-scan "
            f"reads {FORMAT!r} versions {', '.join(map(str, READ_VERSIONS))}"
        )
    known = {1: _META_KEYS - {"policy", "sha256"} | _V1_POLICY_KEYS, 2: _META_KEYS - {"sha256"}}.get(version, _META_KEYS)
    unknown = sorted(set(meta) - known)
    if unknown or not isinstance(meta.get("scan_config"), dict):
        raise ValueError(f"{path}: needs a 'scan_config' object and knows only {sorted(known)}; "
                         f"unknown {unknown}" if unknown else f"{path}: field 'scan_config' must be a JSON object")
    sums = meta.get("sha256")
    if "sha256" in known and not (isinstance(sums, dict) and sorted(sums) == sorted(WEIGHT_FILES) and all(
            isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) for v in sums.values())):
        raise ValueError(f"{path}: field 'sha256' must map {list(WEIGHT_FILES)} to their SHA-256 checksums "
                         f"(64 hex digits); got {sums!r}")
    return meta


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Load a ``save_pretrained`` folder's weights into an existing model of the same shape (strict), after
    checking their SHA-256 where the folder records it."""
    folder = Path(folder)
    _verify_weights(folder, _read_meta(folder / SCAN_CONFIG), folder)
    load_strict(model.backbone, _load_safetensors(folder / BACKBONE_WEIGHTS, folder), BACKBONE_WEIGHTS, folder)
    load_strict(model.exits, _load_safetensors(folder / EXITS_WEIGHTS, folder), EXITS_WEIGHTS, folder)


def save_deployment(
    folder: str | Path,
    policy: ExitPolicy,
    *legacy_fallback: str,
    exit_latency: Sequence[ExitLatency] = (),
    **legacy: Any,
) -> None:
    """Record what deployment uses in a saved model's ``scan_config.json`` (weights untouched): the exit
    ``policy`` and measured exit latency (added to what is there, replacing a measurement at the same
    device, batch size, input size, dtype and memory format). Validated against the saved model, and
    written whole or not at all, in the current format (a format-1 folder is upgraded). In a training
    run's ``best/`` the card is rewritten to show them (`write_run_card`); elsewhere it is left as it is."""
    if not isinstance(policy, ExitPolicy):  # the earlier save_deployment(folder, thresholds, fallback, temperatures=...)
        fallback = legacy.pop("fallback", legacy_fallback[0] if legacy_fallback else "ensemble")
        warnings.warn("save_deployment(folder, thresholds, fallback, temperatures=...) is deprecated: pass "
                      "save_deployment(folder, ExitPolicy(thresholds, fallback, temperatures))", DeprecationWarning,
                      stacklevel=2)
        policy = ExitPolicy(policy, fallback, legacy.pop("temperatures", None))
    elif legacy_fallback:
        raise TypeError("save_deployment(folder, policy): the fallback is part of the ExitPolicy")
    if legacy:
        raise TypeError(f"save_deployment got unexpected arguments {sorted(legacy)}")
    path = Path(folder) / SCAN_CONFIG
    meta = _read_meta(path)
    exits = len(ScanConfig.from_dict(meta["scan_config"]).exits or []) + 1
    try:
        old = _deployment(meta, exits)[1]
        new = {latency.describe() for latency in exit_latency}
        latency = [*[m for m in old if m.describe() not in new], *exit_latency]
        meta = {k: v for k, v in meta.items() if k not in _V1_POLICY_KEYS | {"exit_latency"}}
        meta.update(format_version=FORMAT_VERSION, policy=policy.to_dict())
        meta.setdefault("sha256", {name: sha256(Path(folder) / name) for name in WEIGHT_FILES})  # an upgraded folder
        if latency:
            meta["exit_latency"] = [m.to_dict() for m in latency]
        _deployment(meta, exits)  # what loading will check
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    atomic_write(path, json.dumps(meta, indent=2))
    if is_run_best(folder):
        write_run_card(folder)


def write_run_card(best: str | Path) -> None:
    """Rewrite ``<run>/best/README.md`` as `card.run_card` of the model saved there, read without building
    it (after a search saved a policy, after an evaluation)."""
    best = Path(best)
    meta = _read_meta(best / SCAN_CONFIG)
    exits = ScanConfig.from_dict(meta["scan_config"]).exits or []  # saved resolved: indices, or blocks' names
    policy, exit_latency = _deployment(meta, len(exits) + 1)
    with torch.device("meta"):
        backbone = timm.create_model(f"local-dir:{best}", pretrained=False)
    stages = feature_stages(backbone)
    names = [stages[e].module if isinstance(e, int) else e for e in [*exits, -1]]
    model = CardModel(model_name(backbone), names, policy, exit_latency)
    atomic_write(best / "README.md", run_card(best, model))


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    save_directory: str | Path | None = None,
    card: str | None = None,
    extra_files: Sequence[str | Path] = (),
    extra_folders: Sequence[str | Path] = (),
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload timm-scan model",
    token: str | None = None,
) -> str:
    """``save_pretrained`` into ``save_directory`` (default: a new temporary folder), copy
    ``extra_files`` (plots the card shows) beside and ``extra_folders`` (an ONNX export) under their names, create the repo if needed and upload the folder
    (to branch ``revision`` if given, created if needed); returns the commit URL. On failure,
    raises ``HubUploadError`` naming what failed and the folder, which is left intact."""
    folder = Path(save_directory) if save_directory else Path(tempfile.mkdtemp(prefix="timm-scan-"))
    save_pretrained(model, folder, card=card if card is not None else model_card(model, repo_id=repo_id))
    for extra in extra_files:
        if Path(extra).resolve() != (folder / Path(extra).name).resolve():
            shutil.copy(extra, folder / Path(extra).name)
    for extra in map(Path, extra_folders):
        if extra.resolve() != (folder / extra.name).resolve():
            shutil.copytree(extra, folder / extra.name, dirs_exist_ok=True)
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
    """The folder ``name`` names, or the format's files of Hub repo ``"hf-hub:owner/name"`` fetched; a repo or
    revision the Hub does not have is a ``ValueError`` saying what to check."""
    if name.startswith(HUB_PREFIX):
        repo_id = name[len(HUB_PREFIX):]
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                          allow_patterns=list(FORMAT_FILES)))
        except RepositoryNotFoundError:
            raise ValueError(f"{name}: the Hub ({constants.ENDPOINT}) has no repo {repo_id!r} that this token can "
                             "read; check the name (owner/name) and, for a private or gated repo, pass token= or "
                             "log in (huggingface-cli login)") from None
        except RevisionNotFoundError:
            raise ValueError(f"{name}: the repo has no revision {revision!r}; check the branch or tag name or the "
                             "full commit sha (the repo's page lists them)") from None
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
