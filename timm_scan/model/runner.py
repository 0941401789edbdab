"""Runners: what runs a timm model section by section, cut after chosen ``feature_info`` stages.

A backbone with shallow exits after stages ``e_1 < … < e_{K-1}`` (``feature_info`` stages or blocks inside
them, ``Stage``) is run as K sections: section ``k`` (0-based) ends at ``e_{k+1}``, the last section runs
to the end of ``forward_features``.
``Runner.forward_head`` then runs the backbone's own ``forward_head``: it is the deepest classifier.
Hidden states between sections keep the backbone's own layout (NCHW for CNNs, NHWC for Swin, tokens for
ViT); ``to_map`` turns one into the NCHW map an exit head reads.

This module holds the base class `Runner` and what every runner shares; the runners themselves are
``backbone.SequentialRunner``, ``backbone.VitRunner`` and ``traced.TracedRunner``, chosen and proved by
``backbone.build_runner``. Runners hold references to the backbone's modules in plain Python lists, so
the modules stay registered once, under the timm model (safetensors refuses shared tensors).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Runner", "Stage", "check_close", "eval_mode", "expected_maps", "feature_stages", "forward_features_with",
           "model_name", "no_checkpointing", "run_mode", "without_capture_hooks"]


@dataclass(frozen=True)
class Stage:
    """Where an exit can go: output of ``module`` has ``num_chs`` channels at ``reduction``. ``index`` is the
    ``feature_info`` entry's, or ``None`` for a block inside a stage (``positions.resolve_exits``)."""

    index: int | None
    module: str
    num_chs: int
    reduction: int


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def feature_stages(model: nn.Module) -> list[Stage]:
    """The backbone's ``feature_info`` as ``Stage``s; a clear error where there is none."""
    info = getattr(model, "feature_info", None)
    if info is None or len(info) == 0:
        raise ValueError(
            f"cannot wrap {model_name(model)!r}: it has no feature_info, so its stages are unknown. "
            "Pass a timm model created with timm.create_model(...) from a family that reports "
            "feature_info (ResNet, EfficientNet, ConvNeXt, ViT, Swin, …)."
        )
    entries = info.info if hasattr(info, "info") else info
    return [Stage(i, e["module"], int(e["num_chs"]), int(e["reduction"])) for i, e in enumerate(entries)]


class _ClassifierInput:
    """Forward pre-hook on the backbone's classifier: records its input while ``active``.

    It never changes what the classifier computes; it is inert when the backbone runs on its own.
    """

    def __init__(self) -> None:
        self.active = False
        self.value: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.active:
            self.value = args[0]


@contextmanager
def run_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """``module.train(training)`` inside; every module's flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def eval_mode(module: nn.Module) -> AbstractContextManager[None]:
    """Eval mode inside (no BN statistics updated, no dropout); every module's flag restored after."""
    return run_mode(module, False)


def without_capture_hooks(model: nn.Module) -> nn.Module:
    """Remove the inert hooks ``wrap`` put on ``model``'s classifier (e.g. from a copy)."""
    hooks = _classifier(model)._forward_pre_hooks
    for key in [key for key, hook in hooks.items() if isinstance(hook, _ClassifierInput)]:
        del hooks[key]
    return model


def _classifier(model: nn.Module) -> nn.Module:
    """The backbone's classifier: its ``get_classifier()``, or the first of two (distilled models: DeiT,
    LeViT, EfficientFormer, whose ``forward_head`` combines a class and a distillation head)."""
    classifier = model.get_classifier()
    if isinstance(classifier, tuple) and classifier:
        classifier = classifier[0]
    if not isinstance(classifier, nn.Module):
        raise ValueError(
            f"cannot wrap {model_name(model)!r}: its get_classifier() returns {type(classifier).__name__}, not a "
            "module; timm models return their classifier (or, distilled, their two classifiers)"
        )
    return classifier


def _run(modules: list[nn.Module], h: Tensor) -> Tensor:
    for m in modules:
        h = m(h)
    return h


class Runner:
    """Base runner: ``sections``, ``to_map`` and ``forward_head`` of a timm model cut after ``cuts``.

    Subclasses fill ``self.sections`` (K lists of callables) from ``self.cuts`` (the shallow exits'
    ``Stage``s, in forward order). ``kind`` names the runner (``MultiExitModel.runner``).
    """

    kind = "base"

    def __init__(self, model: nn.Module, cuts: list[Stage]) -> None:
        self.model = model
        self.cuts = list(cuts)
        self._classifier = _classifier(model)
        self._capture = _ClassifierInput()
        self.sections: list[list[Any]] = []

    @property
    def num_sections(self) -> int:
        return len(self.sections)

    def run_section(self, k: int, h: Tensor) -> Tensor:
        """Section ``k`` (0-based); section 0 takes the image ``(B, 3, H, W)``.

        Where the backbone's own gradient checkpointing is on (``model.grad_checkpointing``, set by
        timm's ``set_grad_checkpointing``) and gradients are recorded, the section is checkpointed as
        a whole: only its input is kept, and it runs again in the backward pass. Families that keep the
        flag on their stages (ConvNeXt, Swin) checkpoint inside the stage modules, which the section
        calls as they are.
        """
        if getattr(self.model, "grad_checkpointing", False) and torch.is_grad_enabled():
            return checkpoint(_run, self.sections[k], h, use_reentrant=False)
        return _run(self.sections[k], h)

    def to_map(self, h: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Hidden state after a section → ``(B, C, H', W')`` feature map."""
        return h

    def trunk(self, k: int) -> nn.Module:
        """A standalone copy of sections 0..k: images ``(B, 3, H, W)`` → exit k's NCHW map."""
        raise NotImplementedError

    def attach(self) -> None:
        """Hook the backbone's classifier so that ``forward_head`` returns the pre-logits (``build_runner`` does
        it once the runner is proved; a runner that failed leaves the backbone untouched)."""
        self._classifier.register_forward_pre_hook(self._capture)

    def forward_head(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Last section's output → (logits ``(B, num_classes)``, pre-logits ``(B, head_hidden_size)``).

        Runs the backbone's own ``forward_head`` (for a distilled model, the combination of both heads
        it returns); the pre-logits are the (first) classifier's input.
        """
        self._capture.active = True
        try:
            logits = self.model.forward_head(h)
            pre_logits = self._capture.value
        finally:
            self._capture.active = False
            self._capture.value = None
        if not isinstance(logits, Tensor):
            raise ValueError(
                f"{model_name(self.model)!r}'s forward_head returned {type(logits).__name__}, not one logits tensor "
                "(a distilled model in distilled training returns both heads' outputs): the deepest exit needs the "
                "combined output, so call set_distilled_training(False) on the backbone"
            )
        return logits, pre_logits


@contextmanager
def no_checkpointing(model: nn.Module) -> Iterator[None]:
    """timm's gradient checkpointing off inside (it runs a stage's blocks, not the stage, so the
    stages' hooks would not fire), every module's flag restored after."""
    flags = [(m, m.grad_checkpointing) for m in model.modules()
             if isinstance(getattr(m, "grad_checkpointing", None), bool)]
    for m, _ in flags:
        m.grad_checkpointing = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.grad_checkpointing = flag


def forward_features_with(model: nn.Module, example: Tensor, handles: list[Any], failure: str) -> None:
    """``model.forward_features(example)`` in eval mode, without checkpointing or gradients, for the hooks
    whose ``handles`` are given (removed after, whatever happens); a forward that fails is a ``ValueError``
    starting with ``failure``."""
    try:
        with eval_mode(model), no_checkpointing(model), torch.no_grad():
            model.forward_features(example)
    except Exception as exc:
        raise ValueError(f"{failure}: its forward_features fails on a batch of {tuple(example.shape)} "
                         f"({type(exc).__name__}: {exc})") from exc
    finally:
        for h in handles:
            h.remove()


def expected_maps(model: nn.Module, cuts: list[Stage], example: Tensor) -> list[Tensor | None]:
    """The backbone's own map at each cut on ``example``, NCHW: ``forward_intermediates``'s for a
    ``feature_info`` stage (``None`` where the model has no ``forward_intermediates``), the block's output
    for a block inside a stage. Call it in eval mode without gradients."""
    indices = [c.index for c in cuts if c.index is not None]
    stage_maps: list[Tensor] = []
    if indices and hasattr(model, "forward_intermediates"):
        stage_maps = model.forward_intermediates(example, indices=indices, intermediates_only=True, stop_early=True)
    blocks: dict[str, Tensor] = {}
    handles = [model.get_submodule(c.module).register_forward_hook(
        lambda module, args, output, name=c.module: blocks.setdefault(name, output)) for c in cuts if c.index is None]
    try:
        if handles:
            with no_checkpointing(model):
                model.forward_features(example)
    finally:
        for h in handles:
            h.remove()
    nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
    stage_iter = iter(stage_maps)
    return [next(stage_iter, None) if c.index is not None else
            (blocks[c.module].permute(0, 3, 1, 2) if nhwc else blocks[c.module]) for c in cuts]


def check_close(name: str, what: str, got: Tensor, want: Tensor, atol: float = 1e-5) -> None:
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=atol):
        detail = (
            f"shape {tuple(got.shape)} vs {tuple(want.shape)}"
            if got.shape != want.shape
            else f"max abs difference {(got - want).abs().max().item():.3g}"
        )
        raise ValueError(
            f"cannot wrap {name!r}: the staged {what} differ from the backbone's own ({detail}). "
            "Its forward does more than run its children in order; this family needs a runner of its own."
        )
