"""Helpers shared by the tests (and by ``benchmarks/onnx_export.py --families`` and
``benchmarks/certified_thresholds.py``); the fixtures stay in ``conftest.py``, which sets the Hub's
environment before anything here is imported."""

import asyncio
from collections.abc import Sequence

import numpy as np
import timm
import torch
from torch import Tensor


def create(name: str, **kwargs) -> torch.nn.Module:
    """A timm model with random weights and 10 classes unless told otherwise."""
    kwargs.setdefault("num_classes", 10)
    return timm.create_model(name, pretrained=False, **kwargs)


def synthetic_images(n: int, classes: int, seed: int):
    """Learnable toy images: each class has its own mean colour, plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(classes, 3))
    labels = [i % classes for i in range(n)]
    images = []
    for label in labels:
        pixels = np.clip(palette[label] + rng.normal(0, 40, size=(32, 32, 3)), 0, 255).astype("uint8")
        images.append(Image.fromarray(pixels))
    return images, labels


def mixing_thresholds(probs: Sequence[Tensor], quantiles: Sequence[float]) -> list[float]:
    """Thresholds that send some samples out at every shallow exit, each in the widest gap between the
    confidences near the quantile asked for: two runtimes whose confidences differ by float noise (torch
    and ONNX Runtime, a staged run and a whole forward) then agree on which sample leaves where.

    One threshold per shallow exit, as Algorithm 1 sees the batch: ``probs[i]`` (B, classes) are
    exit i's probabilities for every sample (shallowest first; exits past ``len(quantiles)`` are
    ignored), and exit i's threshold is placed among the samples that did not leave before it, so that
    about ``1 - quantiles[i]`` of them leave there, at least one leaves and at least one runs on. Each
    threshold is the midpoint of the widest gap between sorted confidences within a quarter of the
    running samples of the quantile, keeping a sample for each later exit and one for the deepest.
    Needs more samples than shallow exits."""
    running = torch.ones(len(probs[0]), dtype=torch.bool, device=probs[0].device)
    thresholds = []
    shallow = min(len(probs), len(quantiles))
    for i, (p, q) in enumerate(zip(probs[:shallow], quantiles)):
        confidence = p[running].amax(-1).sort().values
        n, later = len(confidence), shallow - 1 - i  # the exits after this one need a sample each, and one more
        assert n >= later + 2, f"{len(probs[0])} samples cannot mix {shallow} shallow exits"
        at, reach = round(q * n), max(1, n // 4)
        lo = max(at - reach, later + 1)
        cuts = torch.arange(lo, max(lo, min(at + reach, n - 1)) + 1)  # cut j: samples j.. leave, later < j < n
        gaps = confidence[cuts] - confidence[cuts - 1]
        assert gaps.max() > 0, "tied confidences: no threshold separates them"
        j = cuts[gaps.argmax()]
        thresholds.append(((confidence[j - 1] + confidence[j]) / 2).item())
        running &= p.amax(-1) < thresholds[-1]
    return thresholds


def synthetic_outputs(n: int = 3000, k: int = 4, classes: int = 10,
                      seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Softmax outputs of ``k`` synthetic exits on ``n`` samples and their labels: deeper exits are more
    accurate, and confidence correlates with correctness (the threshold search's test case)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    probs = []
    for i in range(k):
        logits = rng.normal(size=(n, classes))
        logits[np.arange(n), labels] += rng.normal(1.0 + 0.7 * i, 1.5, n)
        logits *= rng.uniform(0.5, 3.0, (n, 1))
        p = np.exp(logits - logits.max(1, keepdims=True))
        probs.append(p / p.sum(1, keepdims=True))
    return probs, labels


def sharpen(model, x: Tensor) -> None:
    """Give a randomly initialised multi-exit ``model`` answers that vary with the image, as a trained one's do:
    BatchNorm statistics of ``x`` and every classifier's logits ten times sharper. It is left in eval mode."""
    with torch.no_grad():
        model.train()
        for _ in range(20):
            model(x)
        model.eval()
        for fc in [h.fc for h in model.exits] + [model.backbone.get_classifier()]:
            fc.weight.mul_(10)


async def answer_all(batcher, x: Tensor) -> list:
    """Every image of ``x`` sent to a `SectionBatcher` at once: its ``(probs, exit)`` answers, or the exception
    an image got, in order; the batcher is closed after."""
    try:
        return await asyncio.gather(*(batcher(image) for image in x), return_exceptions=True)
    finally:
        batcher.close()
