"""Scalable inference (SCAN Algorithm 1), for real: confident samples leave at shallow exits and only
the samples still undecided run the next section (the batch shrinks). What it runs is an
`ExitPolicy` (``timm_scan.exit_policy``); how a policy decides (which sample leaves where, the
fallback) is `timm_scan.deploy.policy`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import timm.data
import torch
import torch.nn.functional as F
from torch import Tensor

from ..exit_policy import ExitPolicy
from ..model.backbone import fixed_input_size
from ..model.runner import eval_mode
from ..model.multi_exit import MultiExitModel
from .fast_heads import inference_copy
from .policy import decision_step, fallback_probs, leaves

__all__ = ["EarlyExitPredictor", "EarlyExitResult", "ExitCarry", "check_images", "chosen_policy", "exit_step",
           "run_early_exit"]


@dataclass
class EarlyExitResult:
    """Per sample, in input order: ``labels`` (N,), ``exit_index`` (N,) 0-based (K-1: it ran every
    section), ``confidence`` (N,) the answering distribution's max, ``probs`` (N, C), ``macs`` (N,)
    what the sample cost."""

    labels: Tensor
    exit_index: Tensor
    confidence: Tensor
    probs: Tensor
    macs: Tensor


class EarlyExitPredictor:
    """Runs a ``MultiExitModel`` with early exits; ``predictor(images)`` → ``EarlyExitResult``.

    ``policy``: the `ExitPolicy` to run (thresholds, rule, fallback, temperatures); ``None`` runs the model's
    own (``model.policy``, saved with it). A policy without thresholds is a ``ValueError``. The
    earlier form ``EarlyExitPredictor(model, thresholds, fallback)`` still works, with a deprecation
    warning (the thresholds replace the model policy's; temperatures stay the model's). The model is
    put in eval mode.

    ``optimize_heads`` (default on) runs ``fast_heads.inference_copy`` of each exit head: BatchNorm folded
    into the convs; on CPU, heads on small maps run as a chain of matrix products in a channel-major
    layout, and take channels_last input on larger maps. The same function up to float rounding, and
    cheaper. The copies are taken here, so build a new predictor after changing the model's weights or
    moving it to another device.
    """

    def __init__(
        self,
        model: MultiExitModel,
        policy: ExitPolicy | None = None,
        *legacy: Any,
        optimize_heads: bool = True,
        **legacy_keywords: Any,
    ) -> None:
        self.policy = chosen_policy(model.policy, policy, legacy, legacy_keywords, "EarlyExitPredictor").check(
            model.num_exits, needs_thresholds="load a model saved with some (model.policy)")
        self.model = model.eval()
        self.inference_heads = [inference_copy(h) if optimize_heads else h for h in model.exits]
        self._macs: dict[tuple[int, ...], Tensor] = {}
        data_config = model.data_config or timm.data.resolve_model_data_config(model.backbone)
        self._channels = data_config["input_size"][0]
        self._size = fixed_input_size(model.backbone)
        weight = next(model.parameters())
        self._dtype, self._device = weight.dtype, weight.device

    def exit_macs(self, input_size: tuple[int, int, int], device: torch.device | str = "cpu") -> Tensor:
        """Cumulative MACs per exit for one sample of ``input_size``, counted once and cached."""
        key = (*input_size, str(device))
        if key not in self._macs:
            self._macs[key] = torch.tensor(self.model.exit_macs(input_size), dtype=torch.int64, device=device)
        return self._macs[key]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> EarlyExitResult:
        """Answer a batch ``(B, C, H, W)`` of float images (B may be 0 or 1); non-finite pixels are a
        ``ValueError``, as are images the model cannot take (channels other than its data config's, a size
        other than the one a fixed-size model takes, a dtype or device other than the model's: they are
        refused, not converted). The model runs in eval mode even if it was switched to train mode since."""
        check_images(images)
        self._check_fits(images)
        model = self.model
        image_size = (images.shape[-2], images.shape[-1])
        macs = self.exit_macs((images.shape[1], *image_size), images.device)
        with eval_mode(model) if model.training else nullcontext():
            return run_early_exit(images, model.num_exits, *self.section_functions(image_size), self.policy, macs,
                                  model.num_classes)

    def section_functions(self, image_size: tuple[int, int]) -> tuple[Callable[[int, Any], Any], Callable[[int, Any], Tensor]]:
        """``(section, exit_logits)`` for images of ``image_size``, as `run_early_exit` takes them: section k of
        the model on its hidden state, and exit k's logits on section k's output (this predictor's inference
        copies of the heads). Call them under ``torch.no_grad()`` with the model in eval mode."""
        model, k = self.model, self.model.num_exits

        def exit_logits(i: int, h: Any) -> Tensor:
            return model.exit_logits(i, h, image_size, self.inference_heads[i] if i < k - 1 else None)

        return model.forward_section, exit_logits

    def _check_fits(self, images: Tensor) -> None:
        """A ``ValueError`` unless the model takes ``images`` (checked by `check_images`) as they are."""
        channels, size = images.shape[1], tuple(images.shape[-2:])
        if channels != self._channels:
            raise ValueError(f"images have {channels} channels; this model takes {self._channels} (its data config's "
                             f"input_size): convert them as it was trained (e.g. PIL's .convert('RGB') before the "
                             f"transforms), or set model.data_config for a model built for {channels} channels")
        if self._size is not None and size != self._size:
            raise ValueError(f"images are {size[0]}x{size[1]}; this model takes {self._size[0]}x{self._size[1]} only "
                             "(its patch embedding has a fixed size): resize them with its transforms")
        if images.dtype != self._dtype or images.device != self._device:
            raise ValueError(f"images are {images.dtype} on {images.device}; the model is {self._dtype} on "
                             f"{self._device}: pass images.to({self._device.type!r}, {self._dtype})")


def chosen_policy(
    own: ExitPolicy, policy: ExitPolicy | None, legacy: tuple[Any, ...], legacy_keywords: dict[str, Any], who: str
) -> ExitPolicy:
    """The policy a predictor runs: ``policy``, else ``own`` (the model's or the export's). The earlier
    arguments (``thresholds, fallback``, positional or by keyword) give ``own`` with those thresholds and
    fallback (given thresholds without a fallback get ``"ensemble"``; a fallback alone keeps the own
    thresholds), with a ``DeprecationWarning``."""
    if isinstance(policy, ExitPolicy) or (policy is None and not legacy and not legacy_keywords):
        if legacy or legacy_keywords:
            raise TypeError(f"{who}: pass either policy=ExitPolicy(...) or nothing else; got also "
                            f"{[*legacy, *legacy_keywords]}")
        return own if policy is None else policy
    names = ("thresholds", "fallback")
    if len(legacy) > 1 or set(legacy_keywords) - set(names):
        raise TypeError(f"{who}(model, policy) takes one ExitPolicy; got unexpected arguments "
                        f"{sorted(set(legacy_keywords) - set(names)) or legacy[1:]}")
    values = dict(zip(names, (policy, *legacy)), **legacy_keywords)
    warnings.warn(f"{who}(..., thresholds, fallback) is deprecated: pass {who}(..., ExitPolicy(thresholds=..., "
                  "fallback=...)), or nothing to run the saved policy", DeprecationWarning, stacklevel=3)
    thresholds, fallback = values.get("thresholds"), values.get("fallback")
    if thresholds is None:
        return own.replace(fallback=fallback) if fallback is not None else own
    return own.replace(thresholds=thresholds, fallback=fallback or "ensemble")


def check_images(images: Tensor) -> None:
    """A ``ValueError`` unless ``images`` is a float tensor ``(B, C, H, W)`` of finite pixels."""
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (batch, channels, height, width), normalised as the model "
                         f"expects (e.g. by timm's transforms; .float() alone does not scale uint8); got {got}")
    # a finite sum means every pixel is finite, at a twentieth or less of the cost of an elementwise check on a large
    # batch; a non-finite sum (a NaN, an infinity, or finite pixels that overflow it) gets the full check
    if not torch.isfinite(images.sum(dtype=torch.float32)) and not torch.isfinite(images).all():
        bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero()[:, 0].tolist()
        raise ValueError(f"images {bad[:10]} hold NaN or infinite pixels; nothing was answered")


def run_early_exit(
    images: Tensor,
    num_exits: int,
    section: Callable[[int, Tensor], Tensor],
    exit_logits: Callable[[int, Tensor], Tensor],
    policy: ExitPolicy,
    macs: Tensor,
    num_classes: int,
) -> EarlyExitResult:
    """SCAN Algorithm 1 run for real on any staged model: ``section(k, h)`` runs section k and
    ``exit_logits(k, h)`` exit k's classifier (k = 0..K-1, shallowest first), divided by the policy's
    temperature for exit k; after each shallow exit the samples that pass its threshold (`leaves`) on the
    probabilities the policy's rule decides with (`decision_step`) are answered with them and only the
    rest run on. ``macs`` (K,): each exit's cumulative cost. The torch and the ONNX Runtime predictors
    both run this."""
    thresholds = policy.thresholds
    n = images.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=images.device)
        return EarlyExitResult(empty, empty, empty.float(), images.new_zeros(0, num_classes), empty)
    pending: Tensor | None = None  # input positions of the samples still running; None: all, in order
    answered: list[tuple[Tensor | None, Tensor, int]] = []  # (positions, probs, exit) per group that left
    carry = ExitCarry()
    h = images
    for i in range(num_exits):
        h = section(i, h)
        decided, carry = exit_step(policy, i, num_exits, exit_logits(i, h), carry)
        if i == num_exits - 1:
            answered.append((pending, decided, i))
            break
        if len(decided) == 1:  # one sample: one comparison, no mask (most of the cost at batch 1 is per op)
            n_done = int(leaves(decided.max(), thresholds[i]))  # as a tensor: compared in float32, as batches are
        else:
            done = leaves(decided.amax(-1), thresholds[i])
            n_done = int(done.sum())
        if n_done == len(decided):
            answered.append((pending, decided, i))
            break
        if n_done:
            keep = ~done
            pending = torch.arange(n, device=images.device) if pending is None else pending
            answered.append((pending[done], decided[done], i))
            pending, h, carry = pending[keep], h[keep], carry[keep]
    result = _assemble(answered, n, macs)
    if not torch.isfinite(result.confidence).all():  # a NaN anywhere in a sample's probabilities makes its max NaN
        bad = (~torch.isfinite(result.confidence)).nonzero()[:, 0].tolist()
        raise ValueError(f"images {bad[:10]} produced non-finite logits (NaN or infinite): pixel values far outside "
                         "the normalised range (not normalised, or scaled wrongly) or a damaged model do that; "
                         "nothing was answered")
    return result


@dataclass
class ExitCarry:
    """What Algorithm 1 carries from exit to exit for the samples still running, one row each: their softmax
    at every exit so far (``seen``, kept for the ensemble fallback only) and its running sum (``total``, for
    the running-mean rule; ``None`` under ``"own"``). ``carry[keep]`` keeps the rows a mask or positions
    select; `ExitCarry.cat` joins the rows of several (of the same exits, as a batch joins samples)."""

    seen: list[Tensor] = field(default_factory=list)
    total: Tensor | None = None

    def __getitem__(self, keep: Tensor) -> ExitCarry:
        return ExitCarry([p[keep] for p in self.seen], self.total[keep] if self.total is not None else None)

    @staticmethod
    def cat(carries: Sequence[ExitCarry]) -> ExitCarry:
        seen = [torch.cat(rows) for rows in zip(*(c.seen for c in carries), strict=True)]
        totals = [c.total for c in carries]
        return ExitCarry(seen, torch.cat(totals) if totals[0] is not None else None)


def exit_step(policy: ExitPolicy, i: int, num_exits: int, logits: Tensor, carry: ExitCarry) -> tuple[Tensor, ExitCarry]:
    """Exit i of ``num_exits`` under ``policy``, for the rows of ``logits`` ``(N, C)`` and their ``carry``: the
    probabilities they decide and answer with (exit i's softmax at its temperature, through the policy's rule,
    `decision_step`; at the deepest exit the fallback, `fallback_probs`) and the carry on to exit i+1. Which
    rows leave is ``leaves(probs.amax(-1), policy.thresholds[i])`` at a shallow exit, every row at the deepest."""
    temperatures = policy.temperatures
    probs = F.softmax((logits if temperatures is None else logits / temperatures[i]).float(), dim=-1)
    if i == num_exits - 1:
        return fallback_probs([*carry.seen, probs], policy.fallback), ExitCarry()
    decided, total = decision_step(policy.rule, probs, carry.total, i)
    return decided, ExitCarry([*carry.seen, probs] if policy.fallback == "ensemble" else [], total)


def _assemble(answered: list[tuple[Tensor | None, Tensor, int]], n: int, macs: Tensor) -> EarlyExitResult:
    """Groups of answered samples → one result in input order (positions ``None``: the whole batch
    left at one exit, already in input order)."""
    if len(answered) == 1:
        probs, exit_index = answered[0][1], torch.full((n,), answered[0][2], device=macs.device)
    else:
        positions = torch.cat([pos for pos, _, _ in answered])
        order = torch.empty_like(positions)
        order[positions] = torch.arange(n, device=positions.device)
        probs = torch.cat([p for _, p, _ in answered])[order]
        exit_index = torch.cat([torch.full((len(pos),), i, device=macs.device) for pos, _, i in answered])[order]
    confidence, labels = probs.max(-1)
    return EarlyExitResult(labels, exit_index, confidence, probs, macs[exit_index])
