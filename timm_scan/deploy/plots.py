"""Plots a user would rather look at than read: the accuracy / cost trade-off and where samples leave."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from .._io import atomic_write

__all__ = ["plot_exit_shares", "plot_tradeoff"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: str | Path) -> Path:
    """The figure as a PNG at ``path``, written whole or not at all."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())


def plot_tradeoff(
    points: Sequence[tuple[float, float]],
    path: str | Path,
    *,
    baseline: tuple[float, float] | None = None,
    labels: Sequence[str] | None = None,
    title: str = "Accuracy against cost",
    cost: str = "MACs",
) -> Path:
    """PNG of accuracy (percent) against relative cost (``cost``: what it counts, e.g. MACs or latency)
    for ``points`` = (speed-up, accuracy in percent); ``baseline`` = (1.0, accuracy) marks the plain backbone."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    relative = [1.0 / a for a, _ in points]
    ax.plot(relative, [acc for _, acc in points], "o-", label="early exit (β sweep)")
    groups: dict[tuple[float, float], list[str]] = {}  # points that coincide share one label
    for c, (_, acc), text in zip(relative, points, labels or []):
        groups.setdefault((round(c, 4), round(acc, 3)), []).append(text)
    for (c, acc), texts in groups.items():
        text = texts[0] if len(texts) == 1 else f"{texts[0]} … {texts[-1]}"
        ax.annotate(text, (c, acc), textcoords="offset points", xytext=(-4, 6), ha="right", fontsize=7)
    if baseline is not None:
        ax.axhline(baseline[1], color="grey", ls="--", lw=1)
        ax.plot([1.0 / baseline[0]], [baseline[1]], "s", color="black", label="plain backbone")
    ax.set_xlabel(f"{cost} relative to the plain backbone")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_exit_shares(shares: Sequence[float], path: str | Path, title: str) -> Path:
    """Bar chart of the share of samples leaving at each exit (SCAN Fig. 6); the last bar is the
    samples that ran every section."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    names = [f"exit {i + 1}" for i in range(len(shares) - 1)] + ["all sections"]
    ax.bar(names, [100 * s for s in shares], color="tab:blue")
    ax.set_ylabel("share of samples (%)")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, plt, path)
