"""Exit heads: attention modules, SepConv align nets and the shallow classifiers they feed.

All modules take and return NCHW maps and work at any input resolution (global pooling only).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct, SelectAdaptivePool2d, SeparableConvNormAct, make_divisible
from timm.layers.norm_act import BatchNormAct2d
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class SdAttention(nn.Module):
    """Self-Distillation attention (TPAMI 2021): depthwise-pointwise conv stride 2, BN, ReLU,
    bilinear upsampling back to the input size, sigmoid; the mask multiplies the input map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = SeparableConvNormAct(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        mask = F.interpolate(self.conv(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(mask)


class ScanAttention(nn.Module):
    """SCAN attention (NeurIPS 2019): conv 3x3 stride 2, BN, ReLU, transposed conv x2 (to the
    input's exact size, odd sizes included), BN, sigmoid; the mask multiplies the input map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.down = ConvNormAct(channels, channels, kernel_size=3, stride=2)
        self.up = nn.ConvTranspose2d(channels, channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        mask = self.bn(self.up(self.down(x), output_size=x.shape[-2:]))
        return x * torch.sigmoid(mask)


def make_attention(kind: str, channels: int) -> nn.Module:
    """``"sd"``, ``"scan"`` or ``"none"`` (identity)."""
    if kind == "sd":
        return SdAttention(channels)
    if kind == "scan":
        return ScanAttention(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"attention must be 'sd', 'scan' or 'none'; got {kind!r}")


class SepConv(nn.Sequential):
    """Align-net block of the papers' code: two depthwise-pointwise convs with BN and ReLU; the
    first carries the stride, the second changes the width."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__(
            SeparableConvNormAct(in_chs, in_chs, kernel_size=3, stride=stride),
            SeparableConvNormAct(in_chs, out_chs, kernel_size=3, stride=1),
        )


def align_plan(
    in_chs: int, in_reduction: int, out_chs: int, out_reduction: int, num_blocks: int
) -> list[tuple[int, int, int]]:
    """``(in_chs, out_chs, stride)`` per SepConv block.

    Widths grow geometrically from ``in_chs`` to exactly ``out_chs`` (intermediates divisible by
    8); a block halves the map (stride 2) while the reduction is below ``out_reduction``.
    """
    plan = []
    chs, reduction = in_chs, in_reduction
    for j in range(1, num_blocks + 1):
        nxt = out_chs if j == num_blocks else make_divisible(in_chs * (out_chs / in_chs) ** (j / num_blocks), 8)
        stride = 2 if reduction * 2 <= out_reduction else 1
        plan.append((chs, nxt, stride))
        chs, reduction = nxt, reduction * stride
    return plan


class ExitHead(nn.Module):
    """Shallow classifier ``c_i``: attention mask → align net → global average pool → linear.

    ``forward`` maps ``(B, in_chs, H, W)`` to ``(logits (B, num_classes), pooled (B, out_chs))``;
    ``proj`` is a learned linear map of the pooled feature to the deepest classifier's pre-logits
    width, for the hint loss (always learned, even where the widths agree, so that the hint can reach
    zero on backbones whose pre-logits are signed; training only, not part of the inference cost).
    """

    def __init__(
        self,
        in_chs: int,
        in_reduction: int,
        out_chs: int,
        out_reduction: int,
        num_blocks: int,
        num_classes: int,
        feature_dim: int,
        attention: str,
    ) -> None:
        super().__init__()
        self.attention = make_attention(attention, in_chs)
        plan = align_plan(in_chs, in_reduction, out_chs, out_reduction, num_blocks)
        self.align = nn.Sequential(*(SepConv(a, b, s) for a, b, s in plan))
        self.pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.fc = nn.Linear(out_chs, num_classes)
        self.proj = nn.Linear(out_chs, feature_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.pool(self.align(self.attention(x)))
        return self.fc(pooled), pooled


SMALL_MAP = 1024
"""Largest ``H·W·H'·W'`` for which the inference heads run a depthwise conv (or the attention's
upsampling) as a matrix product instead of a oneDNN call."""


def channel_major(x: Tensor) -> Tensor:
    """``x`` ``(B, C, H, W)`` with its memory laid out as ``(C, B, H, W)``: the layout the matrix
    path of the inference heads computes in (a copy unless ``x`` already is)."""
    if x.transpose(0, 1).is_contiguous():
        return x
    # by way of NCHW: from channels_last, two plain copies take a quarter of the time of torch's one
    return x.contiguous().transpose(0, 1).contiguous().transpose(0, 1)


class InferenceSeparableConv(nn.Module):
    """Inference form of timm's ``SeparableConvNormAct`` with its BatchNorm folded into the pointwise
    conv: depthwise conv → pointwise (1x1, stride 1) conv with bias → activation; ``(B, C, H, W)`` in
    any memory layout.

    On CPU and small maps (``H·W·H'·W' <= SMALL_MAP``, e.g. 8x8 → 4x4) it runs as two matrix
    products in the channel-major layout (`channel_major`): the depthwise conv as
    ``(C, B, H·W) @ (C, H·W, H'·W')``, with each channel's matrix built once per map size from the
    conv itself, then the pointwise conv as ``(C_out, C) @ (C, B·H'·W')`` (on a 1x1 map the depthwise
    conv is folded into it: one product). The output is channel-major too, so a chain of these blocks
    never copies; ``matmul`` is the same on the flat ``(C, B·H·W)`` form, for `InferenceHead`. Same
    function up to float rounding; it avoids oneDNN's fixed cost per conv call (about 40 µs, whatever
    the map size), which dominates exit heads at small batches. Elsewhere the two convs run as they are.
    """

    def __init__(self, conv_dw: nn.Module, conv_pw: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv_dw, self.conv_pw, self.act = conv_dw, conv_pw, act
        self._relu = isinstance(act, nn.ReLU)
        self._matrices: dict[tuple, tuple[Tensor | None, Tensor | None, Tensor, Tensor, torch.Size] | None] = {}

    def matrices(
        self, h: int, w: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor, torch.Size] | None:
        """For an ``h`` x ``w`` input map: ``(depthwise matrices (C, H·W, H'·W'), their bias
        (C, 1, H'·W') or ``None`` where it is zero, pointwise matrix (C_out, C), its bias (C_out, 1),
        (H', W'))``, or ``None`` where the map is too large to be worth it. On a 1x1 map the depthwise
        conv is a scale and shift per channel, folded into the pointwise matrix and bias (the first
        two entries are then ``None``). Built on the first call for each size, dtype and device."""
        key = (h, w, dtype, device)
        if key not in self._matrices:
            c, pw = self.conv_dw.in_channels, self.conv_pw
            with torch.no_grad():  # cached constants, never part of a graph
                zeros = torch.zeros(1, c, h, w, dtype=dtype, device=device)
                bias = self.conv_dw(zeros)[0]  # (C, H', W'): the response to a zero map
                self._matrices[key] = None
                if h * w * bias[0].numel() <= SMALL_MAP:  # the response to each pixel, minus the bias
                    basis = torch.eye(h * w, dtype=dtype, device=device).view(h * w, 1, h, w).expand(-1, c, -1, -1)
                    columns = (self.conv_dw(basis) - bias).flatten(2).transpose(0, 1)  # (C, HW, H'W')
                    pw_weight = pw.weight.flatten(1)
                    pw_bias = pw.bias if pw.bias is not None else zeros.new_zeros(pw.out_channels)
                    if h * w == 1:  # pw @ (scale * x + shift) = (pw * scale) @ x + pw @ shift
                        folded_bias = (pw_bias + pw_weight @ bias.view(c))[:, None]
                        self._matrices[key] = (None, None, pw_weight * columns.view(1, c), folded_bias, bias.shape[-2:])
                    else:
                        dw_bias = bias.flatten(1)[:, None] if bias.any() else None  # timm's depthwise convs have none
                        self._matrices[key] = (columns.contiguous(), dw_bias, pw_weight.clone(),
                                               pw_bias[:, None].clone(), bias.shape[-2:])
        return self._matrices[key]

    def matrix_path(self, x: Tensor) -> bool:
        """Whether ``x`` would run as matrix products (CPU and a small map)."""
        return x.device.type == "cpu" and self.matrices(x.shape[-2], x.shape[-1], x.dtype, x.device) is not None

    def matmul(self, z: Tensor, batch: int, h: int, w: int) -> tuple[Tensor, int, int]:
        """The matrix path on the flat channel-major form: ``z`` ``(C, B·H·W)`` (contiguous) of an
        ``h`` x ``w`` map → ``(output (C_out, B·H'·W'), H', W')``. The map must be small enough
        (``matrix_path``)."""
        dw, dw_bias, pw, pw_bias, (h, w) = self.matrices(h, w, z.dtype, z.device)
        if dw is not None:
            x = z.view(dw.shape[0], batch, -1)  # (C, B, HW)
            y = torch.bmm(x, dw) if dw_bias is None else torch.baddbmm(dw_bias, x, dw)  # (C, B, H'W')
            z = y.view(dw.shape[0], -1)
        y = torch.addmm(pw_bias, pw, z)  # (C_out, B·H'W')
        return (y.relu_() if self._relu else self.act(y)), h, w

    def forward(self, x: Tensor) -> Tensor:
        if not self.matrix_path(x):
            return self.act(F.conv2d(self.conv_dw(x), self.conv_pw.weight, self.conv_pw.bias))  # no nested module call
        b, c = x.shape[:2]
        y, h, w = self.matmul(channel_major(x).transpose(0, 1).reshape(c, -1), b, x.shape[-2], x.shape[-1])
        return y.view(-1, b, h, w).transpose(0, 1)


class InferenceSdAttention(nn.Module):
    """Inference form of `SdAttention` around an ``InferenceSeparableConv``: where that conv takes
    its matrix path, the bilinear upsampling is one matrix product too, ``(C·B, H'·W') @ (H'·W', H·W)``
    (built once per map size from ``F.interpolate`` itself), and the output stays channel-major."""

    def __init__(self, conv: InferenceSeparableConv) -> None:
        super().__init__()
        self.conv = conv
        self._upsampling: dict[tuple, Tensor] = {}

    def _upsampling_matrix(
        self, mask_size: tuple[int, int], size: tuple[int, int], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """``(H'·W', H·W)``: row j is the map of ``size`` upsampled from the j-th pixel of ``mask_size``."""
        key = (*mask_size, *size, dtype, device)
        if key not in self._upsampling:
            n = mask_size[0] * mask_size[1]
            basis = torch.eye(n, dtype=dtype, device=device).view(n, 1, *mask_size)
            self._upsampling[key] = F.interpolate(basis, size=size, mode="bilinear", align_corners=False).view(n, -1)
        return self._upsampling[key]

    def matmul(self, z: Tensor, batch: int, h: int, w: int) -> Tensor:
        """The matrix path on the flat channel-major form: ``z`` ``(C, B·H·W)`` → the masked map, same
        shape. The conv must take its matrix path (``self.conv.matrix_path``)."""
        mask, mh, mw = self.conv.matmul(z, batch, h, w)  # (C, B·H'W')
        mask = mask.view(-1, mh * mw) @ self._upsampling_matrix((mh, mw), (h, w), z.dtype, z.device)  # (C·B, HW)
        return mask.sigmoid_().mul_(z.view(mask.shape)).view(z.shape)  # in place: mask is a fresh tensor

    def forward(self, x: Tensor) -> Tensor:
        if not self.conv.matrix_path(x):
            mask = F.interpolate(self.conv(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
            return mask.sigmoid_().mul_(x)  # in place: mask is a fresh tensor
        x = channel_major(x)
        b, c, h, w = x.shape
        return self.matmul(x.transpose(0, 1).reshape(c, -1), b, h, w).view(c, b, h, w).transpose(0, 1)


class InferenceAvgPool(nn.Module):
    """Global average pooling, ``(B, C, H, W)`` → ``(B, C)``, in any layout; a channel-major map is
    averaged as its contiguous ``(C, B, H·W)`` view, about twice as fast as the strided reduction."""

    def forward(self, x: Tensor) -> Tensor:
        if x.transpose(0, 1).is_contiguous():
            return x.transpose(0, 1).reshape(x.shape[1], x.shape[0], -1).mean(-1).t()
        return x.mean((2, 3))


class InferenceHead(nn.Module):
    """Runs ``module`` (an inference copy of a head) the fast way for its input on CPU; elsewhere as
    it is. Outputs are whatever ``module`` returns.

    - Small maps (the first ``InferenceSeparableConv`` takes its matrix path): an `ExitHead` whose
      attention (SD or none) and align net are all matrix products runs flat: from the input's
      channel-major ``(C, B·H·W)`` view through each block's ``matmul`` to the pooling and the
      classifier, with no module calls and no copies between blocks (at batch 1 the per-call
      overhead is most of a head's time). Any other head runs on channel-major input.
    - Larger maps: the input goes channels_last, where oneDNN's convs are faster than in NCHW.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        # tuples, so that no block is registered twice as a submodule
        self._first = tuple(m for m in module.modules() if isinstance(m, InferenceSeparableConv))[:1]
        self._flat = _flat_chain(module)

    def forward(self, x: Tensor) -> Any:
        if x.device.type != "cpu":
            return self.module(x)
        if not (self._first and self._first[0].matrix_path(x)):
            return self.module(x.contiguous(memory_format=torch.channels_last))
        if not self._flat:
            return self.module(channel_major(x))
        attention, blocks = self._flat
        b, c, h, w = x.shape
        z = channel_major(x).transpose(0, 1).reshape(c, -1)  # (C, B·H·W), a view
        if attention is not None:
            z = attention.matmul(z, b, h, w)
        for block in blocks:  # maps only shrink along the align net, so every block takes its matrix path
            z, h, w = block.matmul(z, b, h, w)
        pooled = z.view(z.shape[0], b, -1).mean(-1).t()  # (B, C_out)
        return self.module.fc(pooled), pooled


def _flat_chain(head: nn.Module) -> tuple[InferenceSdAttention | None, tuple[InferenceSeparableConv, ...]] | None:
    """``(attention or None, align blocks)`` where ``head`` is an `ExitHead` that `InferenceHead` can
    run flat (SD or no attention, every align block an ``InferenceSeparableConv``, average pooling);
    ``None`` otherwise."""
    if not isinstance(head, ExitHead) or not isinstance(head.pool, InferenceAvgPool):
        return None
    if not isinstance(head.attention, (InferenceSdAttention, nn.Identity)):
        return None
    blocks = tuple(block for sep_conv in head.align for block in sep_conv)
    if not all(isinstance(block, InferenceSeparableConv) for block in blocks):
        return None
    return (head.attention if isinstance(head.attention, InferenceSdAttention) else None), blocks


def _folded(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> tuple[nn.Module, nn.Module]:
    """``(conv with bn folded in, what is left of bn)``: its activation for timm's BatchNormAct2d."""
    fused = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
    if not isinstance(bn, BatchNormAct2d):
        return fused, nn.Identity()
    return fused, bn.act if isinstance(bn.drop, nn.Identity) else nn.Sequential(bn.drop, bn.act)


def _depthwise(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels


def _plain_pointwise(conv: nn.Module) -> bool:
    """A 1x1 conv that ``F.conv2d(x, weight, bias)`` computes with its defaults."""
    return type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and (
        conv.padding == (0, 0) and conv.groups == 1
    )


def _global_avg_pool(mod: nn.Module) -> bool:
    """timm's ``SelectAdaptivePool2d`` averaging ``(B, C, H, W)`` to ``(B, C)``, as the exit heads use it."""
    pool = getattr(mod, "pool", None)
    return isinstance(mod, SelectAdaptivePool2d) and isinstance(mod.flatten, nn.Flatten) and (
        isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))
    )


def inference_copy(head: nn.Module) -> nn.Module:
    """An eval-mode copy of an exit head for fast inference: every BatchNorm folded into the conv
    before it, timm's ``SeparableConvNormAct`` replaced by ``InferenceSeparableConv`` (and
    ``SdAttention`` by ``InferenceSdAttention``), average pooling by ``InferenceAvgPool``, and the
    whole wrapped in ``InferenceHead``.

    The copy computes the same function as ``head.eval()`` (up to float rounding) with fewer and
    cheaper kernels. It is for inference only: it cannot be trained, and it does not follow later
    changes to ``head``'s weights.
    """
    head = copy.deepcopy(head).eval()
    for parent in list(head.modules()):
        for name, mod in list(parent.named_children()):
            if isinstance(mod, SeparableConvNormAct):
                conv_pw, act = _folded(mod.conv_pw, mod.bn)
                if _depthwise(mod.conv_dw) and _plain_pointwise(conv_pw):
                    setattr(parent, name, InferenceSeparableConv(mod.conv_dw, conv_pw, act))
                else:
                    mod.conv_pw, mod.bn = conv_pw, act
            elif isinstance(mod, ConvNormAct):
                mod.conv, mod.bn = _folded(mod.conv, mod.bn)
            elif isinstance(mod, ScanAttention):
                mod.up, mod.bn = _folded(mod.up, mod.bn)
            elif _global_avg_pool(mod):
                setattr(parent, name, InferenceAvgPool())
    for parent in list(head.modules()):  # after the loop above has made its conv an InferenceSeparableConv
        for name, mod in list(parent.named_children()):
            if isinstance(mod, SdAttention) and isinstance(mod.conv, InferenceSeparableConv):
                setattr(parent, name, InferenceSdAttention(mod.conv))
    return InferenceHead(head)
