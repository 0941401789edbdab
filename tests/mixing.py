"""Thresholds that send some samples out at every shallow exit, each in the widest gap between the
samples' confidences near the quantile asked for: two runtimes whose confidences differ by float noise
(torch and ONNX Runtime) then agree on which sample leaves where. Used by the tests and by
``benchmarks/onnx_export.py --families``."""

from collections.abc import Sequence

import torch
from torch import Tensor


def mixing_thresholds(probs: Sequence[Tensor], quantiles: Sequence[float]) -> list[float]:
    """One threshold per shallow exit: ``probs[i]`` (B, classes) are exit i's probabilities on the
    batch (shallowest first; the deepest exit's, if given, is ignored), and about ``1 - quantiles[i]``
    of the samples reach exit i's threshold. Each threshold is the midpoint of the widest gap between
    sorted confidences within B/4 places of the quantile."""
    thresholds = []
    for p, q in zip(probs[: len(quantiles)], quantiles):
        confidence = p.amax(-1).sort().values
        n = len(confidence)
        assert n > 1, "a gap needs two samples"
        at, reach = round(q * n), max(1, n // 4)
        cuts = torch.arange(max(1, at - reach), min(n - 1, at + reach) + 1)  # cut j: samples j.. leave
        j = cuts[(confidence[cuts] - confidence[cuts - 1]).argmax()]
        thresholds.append(((confidence[j - 1] + confidence[j]) / 2).item())
    return thresholds
