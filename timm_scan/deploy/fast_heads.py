"""Inference copies of exit heads: BatchNorm folded, and on CPU small maps as a chain of matrix products.

An `ExitHead` as trained calls a dozen small modules, and on CPU each depthwise conv pays a cost per
call in oneDNN whatever the map size (``benchmarks/RESULTS.md`` measures it). `inference_copy` builds
the same function (up to float rounding) from the head's parts, with fewer and cheaper kernels:

- every BatchNorm folded into the conv before it;
- each of timm's ``SeparableConvNormAct`` as an `InferenceSeparableConv`: on small maps (see
  ``SMALL_MAP``) the depthwise conv is one batched matrix product and the pointwise conv another, in a
  channel-major layout ``(C, B, H, W)``, so one block's output is the next block's input with no copy;
- SD attention's bilinear upsampling as one more matrix product (`InferenceSdAttention`).

`InferenceHead` then runs the whole head on the flat ``(C, B·H·W)`` form of its input, block to block
(``forward_flat``), with no module calls; on larger maps it gives oneDNN channels_last input.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import SeparableConvNormAct
from timm.layers.norm_act import BatchNormAct2d
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..model.heads import ExitHead, ScanAttention, SdAttention

__all__ = ["InferenceHead", "InferenceSdAttention", "InferenceSeparableConv", "channel_major", "inference_copy"]

SMALL_MAP = 1024
"""Largest ``H·W·H'·W'`` for which a depthwise conv (or the attention's upsampling) runs as a matrix
product instead of a oneDNN call."""


def channel_major(x: Tensor) -> Tensor:
    """``x`` ``(B, C, H, W)`` with its memory laid out as ``(C, B, H, W)``: the layout the matrix
    path computes in (a copy unless ``x`` already is)."""
    if x.transpose(0, 1).is_contiguous():
        return x
    # by way of NCHW: from channels_last, two plain copies are faster than torch's one permuting copy
    return x.contiguous().transpose(0, 1).contiguous().transpose(0, 1)


def _flat(x: Tensor) -> Tensor:
    """The channel-major ``(C, B·H·W)`` view of ``x`` (a copy only where ``x`` is not channel-major)."""
    return channel_major(x).transpose(0, 1).reshape(x.shape[1], -1)


def _folded(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> tuple[nn.Module, nn.Module]:
    """``(conv with bn folded in, what is left of bn)``: its activation for timm's BatchNormAct2d."""
    fused = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
    if not isinstance(bn, BatchNormAct2d):
        return fused, nn.Identity()
    return fused, bn.act if isinstance(bn.drop, nn.Identity) else nn.Sequential(bn.drop, bn.act)


class InferenceSeparableConv(nn.Module):
    """Inference form of timm's ``SeparableConvNormAct`` (eval mode): depthwise conv → pointwise 1x1
    conv with the BatchNorm folded in → activation; ``(B, C, H, W)`` in any memory layout.

    On CPU and small maps (``H·W·H'·W' <= SMALL_MAP``, e.g. 8x8 → 4x4) it runs as two matrix
    products in the channel-major layout: the depthwise conv as ``(C, B, H·W) @ (C, H·W, H'·W')``,
    each channel's matrix built once per map size from the conv itself (padding and stride included),
    then the pointwise conv as ``(C_out, C) @ (C, B·H'·W')``; on a 1x1 map the depthwise conv is a
    scale and shift per channel, folded into the pointwise product. The output is channel-major too.
    Elsewhere the two convs run as they are.
    """

    def __init__(self, block: SeparableConvNormAct) -> None:
        super().__init__()
        dw, pw = block.conv_dw, block.conv_pw
        if not (dw.groups == dw.in_channels == dw.out_channels and pw.kernel_size == (1, 1) and pw.stride == (1, 1)
                and pw.padding == (0, 0) and pw.groups == 1):
            raise ValueError(f"not a depthwise-pointwise block: {block}")
        self.conv_dw = copy.deepcopy(dw).eval()
        self.conv_pw, self.act = _folded(copy.deepcopy(pw), copy.deepcopy(block.bn).eval())
        self._relu = isinstance(self.act, nn.ReLU)
        self._matrices: dict[tuple, tuple[Tensor | None, Tensor | None, Tensor, Tensor, torch.Size] | None] = {}

    def matrices(
        self, h: int, w: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor, torch.Size] | None:
        """For an ``h`` x ``w`` input map: ``(depthwise matrices (C, H·W, H'·W'), their bias
        (C, 1, H'·W') or ``None`` where it is zero, pointwise matrix (C_out, C), its bias (C_out, 1),
        (H', W'))``, or ``None`` where the map is too large to be worth it (on a 1x1 map the first two
        are ``None``: the depthwise conv is folded into the pointwise matrix). Built on the first call
        for each size, dtype and device."""
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

    def forward_flat(self, z: Tensor, batch: int, h: int, w: int) -> tuple[Tensor, int, int]:
        """The matrix path on the flat channel-major form: ``z`` ``(C, B·H·W)`` (contiguous) of an
        ``h`` x ``w`` map → ``(output (C_out, B·H'·W'), H', W')``. The map must take the matrix path."""
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
        b = x.shape[0]
        y, h, w = self.forward_flat(_flat(x), b, x.shape[-2], x.shape[-1])
        return y.view(-1, b, h, w).transpose(0, 1)


class InferenceSdAttention(nn.Module):
    """Inference form of `SdAttention`: its conv an `InferenceSeparableConv`; where that conv takes its
    matrix path, the bilinear upsampling is one matrix product too, ``(C·B, H'·W') @ (H'·W', H·W)``
    (built once per map size from ``F.interpolate`` itself), and the output stays channel-major."""

    def __init__(self, attention: SdAttention) -> None:
        super().__init__()
        self.conv = InferenceSeparableConv(attention.conv)
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

    def forward_flat(self, z: Tensor, batch: int, h: int, w: int) -> Tensor:
        """The matrix path on the flat channel-major form: ``z`` ``(C, B·H·W)`` → the masked map, same
        shape. The conv must take its matrix path (``self.conv.matrix_path``)."""
        mask, mh, mw = self.conv.forward_flat(z, batch, h, w)  # (C, B·H'W')
        mask = mask.view(-1, mh * mw) @ self._upsampling_matrix((mh, mw), (h, w), z.dtype, z.device)  # (C·B, HW)
        return mask.sigmoid_().mul_(z.view(mask.shape)).view(z.shape)  # in place: mask is a fresh tensor

    def forward(self, x: Tensor) -> Tensor:
        if not self.conv.matrix_path(x):
            mask = F.interpolate(self.conv(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
            return mask.sigmoid_().mul_(x)  # in place: mask is a fresh tensor
        b, c, h, w = x.shape
        return self.forward_flat(_flat(x), b, h, w).view(c, b, h, w).transpose(0, 1)


def _inference_scan_attention(attention: ScanAttention) -> ScanAttention:
    """A copy of SCAN's attention with its two BatchNorms folded into the convs before them."""
    attention = copy.deepcopy(attention).eval()
    attention.down.conv, attention.down.bn = _folded(attention.down.conv, attention.down.bn)
    attention.up, attention.bn = _folded(attention.up, attention.bn)
    return attention


class InferenceHead(nn.Module):
    """An exit head for inference: ``attention`` (an `InferenceSdAttention`, a folded SCAN attention or
    ``None``), the align net's ``blocks`` (`InferenceSeparableConv`, in order), average pooling and
    ``fc``. ``forward`` maps ``(B, C, H, W)`` to ``(logits (B, num_classes), pooled (B, C_out))``, as
    `ExitHead` does. Build it with `inference_copy`.

    On CPU: where the first block takes its matrix path (maps only shrink along the align net, so
    then every block does) and the attention has one too (SD or none), the head runs flat, from the
    input's channel-major ``(C, B·H·W)`` view through each part's ``forward_flat`` to the pooling and
    the classifier, with no module calls and no copies; with SCAN attention it runs module by module on
    channel-major input; on larger maps its input goes channels_last, where oneDNN's convs are fastest.
    """

    def __init__(self, attention: nn.Module | None, blocks: list[InferenceSeparableConv], fc: nn.Linear) -> None:
        super().__init__()
        self.attention = attention
        self.blocks = nn.ModuleList(blocks)
        self.fc = fc
        self._flat = attention is None or isinstance(attention, InferenceSdAttention)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.device.type != "cpu" or not self.blocks:  # a pooled head: pooling and the MLP, nothing to flatten
            return self._modules_path(x)
        if not self.blocks[0].matrix_path(x):
            return self._modules_path(x.contiguous(memory_format=torch.channels_last))
        if not self._flat:
            return self._modules_path(channel_major(x))
        b, _, h, w = x.shape
        z = _flat(x)  # (C, B·H·W), a view where x is channel-major
        if self.attention is not None:
            z = self.attention.forward_flat(z, b, h, w)
        for block in self.blocks:
            z, h, w = block.forward_flat(z, b, h, w)
        pooled = z.view(z.shape[0], b, -1).mean(-1).t()  # (B, C_out)
        return self.fc(pooled), pooled

    def _modules_path(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.attention is not None:
            x = self.attention(x)
        for block in self.blocks:
            x = block(x)
        if x.transpose(0, 1).is_contiguous():  # channel-major: average the contiguous (C, B, H·W) view
            pooled = x.transpose(0, 1).reshape(x.shape[1], x.shape[0], -1).mean(-1).t()
        else:
            pooled = x.mean((2, 3))
        return self.fc(pooled), pooled


def inference_copy(head: ExitHead) -> InferenceHead:
    """An `InferenceHead` computing what ``head.eval()`` computes (up to float rounding), with fewer
    and cheaper kernels. For inference only: it cannot be trained, and it does not follow later
    changes to ``head``'s weights (the hint projection ``proj``, which only serves training, is left out)."""
    if isinstance(head.attention, SdAttention):
        attention = InferenceSdAttention(head.attention)
    elif isinstance(head.attention, ScanAttention):
        attention = _inference_scan_attention(head.attention)
    else:
        attention = None
    blocks = [InferenceSeparableConv(block) for sep_conv in head.align for block in sep_conv]
    return InferenceHead(attention, blocks, copy.deepcopy(head.fc))
