"""Staged execution of timm models: how a backbone is created (``create_backbone``), where the exits go,
and the runner that runs a backbone section by section, cut after those stages.

``resolve_exits`` turns ``ScanConfig.exits`` into ``Stage``s (it lives in ``positions``, and is re-exported
here); ``build_runner``
picks the runner for a model and proves it (``verify_runner``): `VitRunner` for timm's
``VisionTransformer``, `SequentialRunner` for models whose ``forward_features`` runs its children in
order, ``traced.TracedRunner`` where neither can. The base class `Runner` and what the runners share
live in ``runner``; its names are re-exported here.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .hub import check_pretrained_weights
from .runner import (
    Runner,
    Stage,
    check_close,
    expected_maps,
    forward_features_with,
    eval_mode,
    feature_stages,
    model_name,
)
from ..options import did_you_mean
from .positions import default_exit_indices, resolve_exits
from .traced import TracedRunner

__all__ = ["SequentialRunner", "VitRunner", "build_runner", "check_input_fits", "check_model_kwargs", "create_backbone",
           "default_exit_indices", "resolve_exits", "verify_runner"]

OWN_ARGUMENTS = {"num_classes": "--num-classes", "pretrained": "--pretrained"}  # model kwargs that have a flag


def check_model_kwargs(kwargs: Any, what: str = "model_kwargs") -> None:
    """A ``ValueError`` unless ``kwargs`` are keyword arguments for ``timm.create_model`` that a JSON file can
    record: identifiers to JSON values, none of those set otherwise (``num_classes``, ``pretrained``)."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise ValueError(f"{what} must map keyword names to values, such as {{'img_size': 32}}; got {kwargs!r}")
    for key, flag in OWN_ARGUMENTS.items():
        if key in kwargs:
            raise ValueError(f"{what} sets {key!r}, which has its own setting: use {flag} instead")
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must hold JSON values (numbers, strings, lists, true/false, null); {exc}") from None


def create_backbone(name: str, num_classes: int, *, pretrained: bool = False,
                    model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)``; an unknown
    model name (with the nearest names) or a keyword the model does not take is a ``ValueError``."""
    model_kwargs = model_kwargs or {}
    check_model_kwargs(model_kwargs)
    if ":" not in name and not timm.is_model(name):  # hf-hub: and local-dir: names are timm's to resolve
        raise ValueError(f"{name!r} is not a timm model name{did_you_mean(name, timm.list_models())}; "
                         "timm.list_models('*pattern*') lists them")
    if pretrained:
        check_pretrained_weights(name)  # offline and not cached: one ValueError at once, not a minute of retries
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)
    except TypeError as exc:
        if not model_kwargs:
            raise
        raise ValueError(f"timm.create_model({name!r}) does not take the model kwargs {model_kwargs} ({exc}); see the "
                         "model's class in timm for the arguments it takes") from None


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """``(height, width)`` where ``model`` takes that input size only (a fixed-size patch embedding: ViT, DeiT,
    Swin, ...), else ``None``."""
    embed = getattr(model, "patch_embed", None)
    built = getattr(embed, "img_size", None)
    if built is None or not getattr(embed, "strict_img_size", False) or getattr(model, "dynamic_img_size", False):
        return None
    return tuple(built)


def check_input_fits(model: nn.Module, example: Tensor) -> None:
    """A ``ValueError`` where ``model`` takes one input size only (a fixed-size patch embedding: ViT, DeiT, Swin,
    ...) and ``example`` has another, saying how to build it for that size."""
    built = fixed_input_size(model)
    height, width = example.shape[-2:]
    if built is not None and built != (height, width):
        size = height if height == width else [height, width]
        raise ValueError(f"cannot wrap {model_name(model)!r} at {height}x{width}: it was built for {built[0]}x{built[1]} "
                         f"inputs only (its patch embedding has a fixed size); build it for yours with "
                         f"timm.create_model(..., img_size={size}), on the command line --model-kwargs img_size={size}")


class SequentialRunner(Runner):
    """Most CNNs and Swin: ``forward_features`` runs top-level children in order.

    The children that ``forward_features`` calls are recorded once on ``example``; a child that
    holds a cut (``blocks.2`` inside ``blocks``) is expanded if it is an ``nn.Sequential``.
    """

    kind = "sequential"

    def __init__(self, model: nn.Module, cuts: list[Stage], example: Tensor) -> None:
        super().__init__(model, cuts)
        self.output_fmt = getattr(model, "output_fmt", "NCHW")
        top_level = _children_called(model, example)
        cut_names = [c.module for c in self.cuts]
        path = top_level
        try:
            for name in cut_names:
                path = _expand_to(path, name)
        except _CannotCut as reason:
            raise _cannot_cut_error(model, top_level, reason, example) from None
        names = [n for n, _ in path]
        self.sections = []
        start = 0
        for name in cut_names:  # a stage expanded for a block inside it ends with its last element
            end = max(i for i, n in enumerate(names) if n == name or n.startswith(name + ".")) + 1
            self.sections.append([m for _, m in path[start:end]])
            start = end
        self.sections.append([m for _, m in path[start:]])

    def to_map(self, h: Tensor, image_size: tuple[int, int]) -> Tensor:
        return h.permute(0, 3, 1, 2) if self.output_fmt == "NHWC" else h

    def trunk(self, k: int) -> nn.Module:
        layers = copy.deepcopy(nn.Sequential(*(m for section in self.sections[: k + 1] for m in section)))
        if self.output_fmt == "NHWC":
            layers.append(_NhwcToNchw())
        return layers


class _NhwcToNchw(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


class VitRunner(Runner):
    """timm ``VisionTransformer``: embeddings, blocks and norm run by hand, tokens → maps."""

    kind = "vit"

    def __init__(self, model: VisionTransformer, cuts: list[Stage]) -> None:
        super().__init__(model, cuts)
        if any(c.index is None for c in self.cuts):  # unreachable from wrap: a ViT block's output is tokens
            raise ValueError(f"cannot wrap {model_name(model)!r}: a ViT is cut after whole blocks only")
        blocks = list(model.blocks)
        prelude = [model.patch_embed, model._pos_embed, model.patch_drop, model.norm_pre]
        bounds = [0] + [c.index + 1 for c in self.cuts] + [len(blocks)]
        self.sections = [blocks[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self.sections[0] = prelude + self.sections[0]
        self.sections[-1] = self.sections[-1] + [model.norm]

    def to_map(self, h: Tensor, image_size: tuple[int, int]) -> Tensor:
        return vit_tokens_to_map(self.model, h, image_size)

    def trunk(self, k: int) -> nn.Module:
        vit = copy.deepcopy(self.model)
        vit.blocks = vit.blocks[: self.cuts[k].index + 1]
        vit.norm = vit.fc_norm = vit.head_drop = vit.head = nn.Identity()
        return _VitTrunk(vit)


def vit_tokens_to_map(vit: VisionTransformer, h: Tensor, image_size: tuple[int, int]) -> Tensor:
    """ViT tokens ``(B, prefix + H'W', C)`` → ``(B, C, H', W')``, prefix (class, register) tokens dropped."""
    grid_h, grid_w = vit.patch_embed.dynamic_feat_size(image_size)
    tokens = h[:, vit.num_prefix_tokens :]
    return tokens.reshape(h.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2)


class _VitTrunk(nn.Module):
    """A ViT cut after some block: embeddings and the kept blocks, tokens → map."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: Tensor) -> Tensor:
        v = self.vit
        h = v.blocks(v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x)))))
        return vit_tokens_to_map(v, h, (x.shape[-2], x.shape[-1]))


def _children_called(model: nn.Module, example: Tensor) -> list[tuple[str, nn.Module]]:
    """Top-level children that ``forward_features`` calls, in call order (each once)."""
    called: list[tuple[str, nn.Module]] = []
    handles = []
    for name, child in model.named_children():
        def record(module: nn.Module, args: Any, name: str = name) -> None:
            if all(n != name for n, _ in called):
                called.append((name, module))
        handles.append(child.register_forward_pre_hook(record))
    forward_features_with(model, example, handles, f"cannot wrap {model_name(model)!r}")
    return called


class _CannotCut(Exception):
    """A stage the sequential runner cannot end a section at (the message says why)."""


def _expand_to(path: list[tuple[str, nn.Module]], target: str) -> list[tuple[str, nn.Module]]:
    """Expand the containers in ``path`` until the module named ``target`` is an entry of it (or, expanded
    already for a block inside it, its elements are)."""
    while all(n != target and not n.startswith(target + ".") for n, _ in path):
        parent = next((i for i, (n, _) in enumerate(path) if target.startswith(n + ".")), None)
        if parent is None:
            raise _CannotCut(f"stage module {target!r} is not reached by running its top-level children in order")
        name, container = path[parent]
        if type(container).forward is not nn.Sequential.forward:
            raise _CannotCut(
                f"stage {target!r} sits inside {name!r}, a {type(container).__name__} that cannot be cut "
                "into sections (only nn.Sequential can)"
            )
        inner = [(f"{name}.{n}", m) for n, m in container.named_children()]
        path = path[:parent] + inner + path[parent + 1 :]
    return path


def _runs_in_order(model: nn.Module, path: list[tuple[str, nn.Module]], example: Tensor) -> bool:
    """Whether running ``path`` then ``forward_head`` gives ``model(example)``."""
    try:
        with eval_mode(model), torch.no_grad():
            h = example
            for _, module in path:
                h = module(h)
            return bool(torch.allclose(model.forward_head(h), model(example), rtol=1e-4, atol=1e-5))
    except Exception:
        return False


def _cannot_cut_error(
    model: nn.Module, path: list[tuple[str, nn.Module]], reason: _CannotCut, example: Tensor
) -> ValueError:
    """The user-facing error: why, and which exits (if any) this runner can cut instead."""
    cuttable = []
    for stage in feature_stages(model)[:-1] if _runs_in_order(model, path, example) else []:
        try:
            _expand_to(path, stage.module)
            cuttable.append(stage.index)
        except _CannotCut:
            pass
    advice = (
        f"pass ScanConfig(exits=...) with stages it can cut: {cuttable}"
        if cuttable
        else "none of its stages can take an exit with the sequential runner: this family needs a runner of its own; "
        "use another family (ResNet, EfficientNet, ConvNeXt, ViT, Swin, …)"
    )
    return ValueError(f"cannot wrap {model_name(model)!r}: {reason}; {advice}")


def build_runner(model: nn.Module, cuts: list[Stage], example: Tensor) -> Runner:
    """The runner for ``model``, proved on ``example`` (``verify_runner``) and attached: timm's ``VisionTransformer``
    by hand, other models by running their children in order; where that cannot cut the model or
    gives other numbers, ``forward_features`` traced with torch.fx (``traced.TracedRunner``). A model built
    for another input size than ``example``'s is refused first (``check_input_fits``)."""
    check_input_fits(model, example)
    runners = [VitRunner] if isinstance(model, VisionTransformer) else [SequentialRunner]
    first_error: ValueError | None = None
    for runner in [*runners, TracedRunner]:
        try:
            built = runner(model, cuts) if runner is VitRunner else runner(model, cuts, example)
            verify_runner(built, example)
            built.attach()
            return built
        except ValueError as exc:
            if first_error is None:
                first_error = exc
                continue
            reason = str(exc).removeprefix(f"cannot wrap {model_name(model)!r}: ")
            raise ValueError(f"{first_error} (tracing its forward_features with torch.fx, the other way to run it "
                             f"section by section, failed too: {reason})") from exc
    raise AssertionError("unreachable")


def verify_runner(runner: Runner, example: Tensor) -> None:
    """Prove on ``example`` that staged features and logits equal the backbone's own.

    Compares each cut's feature map with the backbone's own (`expected_maps`: ``forward_intermediates``'s,
    or a block's output) and the final logits with ``model(x)``, in eval mode
    (training flags are restored). Raises ``ValueError`` on mismatch.
    """
    model = runner.model
    name = model_name(model)
    try:
        with eval_mode(model), torch.no_grad():
            expected_logits = model(example)
            expected = expected_maps(model, runner.cuts, example)
            image_size = tuple(example.shape[-2:])
            h = example
            maps = []
            for k in range(runner.num_sections):
                h = runner.run_section(k, h)
                if k < len(runner.cuts):
                    maps.append(runner.to_map(h, image_size))
            logits, _ = runner.forward_head(h)
    except Exception as exc:
        raise ValueError(
            f"cannot wrap {name!r}: running it section by section failed ({type(exc).__name__}: {exc}). "
            "Its forward does more than run its children in order; this family needs a runner of its own."
        ) from exc
    for stage, got, want in zip(runner.cuts, maps, expected):
        if want is not None:
            check_close(name, f"feature map of {stage.module!r}", got, want)
    check_close(name, "logits", logits, expected_logits)
