"""Scalable inference (SCAN Algorithm 1), for real: confident samples leave at shallow exits and only
the samples still undecided run the next section (the batch shrinks). The policy itself (which
sample leaves where, the fallback) is `timm_scan.deploy.policy`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.backbone import eval_mode
from ..model.config import validate_fallback, validate_temperatures, validate_thresholds
from ..model.multi_exit import MultiExitModel
from .fast_heads import inference_copy
from .policy import fallback_probs, leaves

__all__ = ["EarlyExitPredictor", "EarlyExitResult", "check_images", "resolve_policy", "run_early_exit"]


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

    ``thresholds``: one per shallow exit (K-1 numbers in [0, 1]); ``None`` takes the model's saved
    ones (``model.thresholds``, with ``model.fallback``). ``fallback``: ``"ensemble"`` or
    ``"deepest"`` for samples that pass no threshold. The model is put in eval mode.

    ``optimize_heads`` (default on) runs ``fast_heads.inference_copy`` of each exit head: BatchNorm folded
    into the convs; on CPU, heads on small maps run as a chain of matrix products in a channel-major
    layout, and take channels_last input on larger maps. The same function up to float rounding, and
    cheaper. The copies are taken here, so build a new predictor after changing the model's weights or
    moving it to another device.

    Where the model is calibrated (``model.temperatures``, from ``timm_scan.calibrate``), each exit's
    logits are divided by its temperature before the softmax, as the threshold search assumed; the
    temperatures are read here too.
    """

    def __init__(
        self,
        model: MultiExitModel,
        thresholds: Sequence[float] | None = None,
        fallback: str | None = None,
        optimize_heads: bool = True,
    ) -> None:
        self.thresholds, self.fallback = resolve_policy(thresholds, fallback, model.thresholds, model.fallback,
                                                        model.num_exits, "load a model saved with some")
        self.model = model.eval()
        self.heads = [inference_copy(h) if optimize_heads else h for h in model.exits]
        self.temperatures = None if model.temperatures is None else validate_temperatures(model.temperatures, model.num_exits)
        self._macs: dict[tuple[int, ...], Tensor] = {}

    def exit_macs(self, input_size: tuple[int, int, int], device: torch.device | str = "cpu") -> Tensor:
        """Cumulative MACs per exit for one sample of ``input_size``, counted once and cached."""
        key = (*input_size, str(device))
        if key not in self._macs:
            self._macs[key] = torch.tensor(self.model.exit_macs(input_size), dtype=torch.int64, device=device)
        return self._macs[key]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> EarlyExitResult:
        """Answer a batch ``(B, C, H, W)`` of float images (B may be 0 or 1); non-finite pixels are a
        ``ValueError``. The model runs in eval mode even if it was switched to train mode since."""
        check_images(images)
        model, k = self.model, self.model.num_exits
        image_size = (images.shape[-2], images.shape[-1])
        macs = self.exit_macs((images.shape[1], *image_size), images.device)

        def exit_logits(i: int, h: Tensor) -> Tensor:
            logits = model.exit_logits(i, h, image_size, self.heads[i] if i < k - 1 else None)
            return logits if self.temperatures is None else logits / self.temperatures[i]

        with eval_mode(model) if model.training else nullcontext():
            return run_early_exit(images, k, model.forward_section, exit_logits, self.thresholds, self.fallback, macs,
                                  model.num_classes)


def resolve_policy(
    thresholds: Sequence[float] | None,
    fallback: str | None,
    saved_thresholds: Sequence[float] | None,
    saved_fallback: str | None,
    num_exits: int,
    where_saved: str,
) -> tuple[list[float], str]:
    """The thresholds and fallback a predictor runs with: the given ones, or where ``thresholds`` is
    ``None`` the saved ones with their saved fallback (a fallback belongs to the thresholds it was
    searched with); given thresholds without a fallback get ``"ensemble"``. Validated; no thresholds
    at all is a ``ValueError`` that says to pass some or to ``where_saved``."""
    if thresholds is None:
        if saved_thresholds is None:
            raise ValueError(f"no thresholds: pass thresholds=[...] (one per shallow exit) or {where_saved}")
        thresholds, fallback = saved_thresholds, fallback or saved_fallback
    return validate_thresholds(thresholds, num_exits), validate_fallback(fallback or "ensemble")


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
    thresholds: Sequence[float],
    fallback: str,
    macs: Tensor,
    num_classes: int,
) -> EarlyExitResult:
    """SCAN Algorithm 1 run for real on any staged model: ``section(k, h)`` runs section k and
    ``exit_logits(k, h)`` exit k's classifier (k = 0..K-1, shallowest first); after each shallow exit the
    samples that pass its threshold (`leaves`) are answered and only the rest run on. ``macs`` (K,):
    each exit's cumulative cost. The torch and the ONNX Runtime predictors both run this."""
    n = images.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=images.device)
        return EarlyExitResult(empty, empty, empty.float(), images.new_zeros(0, num_classes), empty)
    pending: Tensor | None = None  # input positions of the samples still running; None: all, in order
    answered: list[tuple[Tensor | None, Tensor, int]] = []  # (positions, probs, exit) per group that left
    seen: list[Tensor] = []  # the running samples' probabilities at each exit so far, for the fallback
    h = images
    for i in range(num_exits):
        h = section(i, h)
        probs = F.softmax(exit_logits(i, h).float(), dim=-1)
        if i == num_exits - 1:
            answered.append((pending, fallback_probs([*seen, probs], fallback), i))
            break
        if len(probs) == 1:  # one sample: one comparison, no mask (most of the cost at batch 1 is per op)
            n_done = int(leaves(probs.max(), thresholds[i]))  # as a tensor: compared in float32, as batches are
        else:
            done = leaves(probs.amax(-1), thresholds[i])
            n_done = int(done.sum())
        if n_done == len(probs):
            answered.append((pending, probs, i))
            break
        if fallback == "ensemble":
            seen.append(probs)
        if n_done:
            keep = ~done
            pending = torch.arange(n, device=images.device) if pending is None else pending
            answered.append((pending[done], probs[done], i))
            pending, h = pending[keep], h[keep]
            seen = [p[keep] for p in seen]
    return _assemble(answered, n, macs)


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
