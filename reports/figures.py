"""Figures from tracked results (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bench.files import atomic_path  # noqa: E402


def save_figure(figure, base: Path, dpi: int) -> list[Path]:
    """``base`` + ``.png`` and ``.pdf``, each written atomically (a failure leaves no half-written figure);
    closes the figure and returns the two paths."""
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for suffix in (".png", ".pdf"):
            target = base.parent / (base.name + suffix)
            with atomic_path(target) as partial:
                figure.savefig(partial, dpi=dpi, format=suffix[1:])
            written.append(target)
    finally:
        plt.close(figure)
    return written


def loss_curves(histories: dict[str, pd.DataFrame], title: str, path: Path, smooth: int = 10) -> list[Path]:
    """Figure 5 style: one panel per method, every loss term against the training step (moving average).
    Writes PNG and PDF; returns both paths."""
    methods = [m for m, h in histories.items() if h is not None and not h.empty]
    if not methods:
        return []
    cols = min(3, len(methods))
    rows = (len(methods) + cols - 1) // cols
    figure, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for axis, method in zip(axes.flat, methods):
        history = histories[method]
        for term in [c for c in history.columns if c != "step"]:
            series = history[term].rolling(smooth, min_periods=1).mean()
            axis.plot(history["step"], series, label=term, linewidth=1.2)
        axis.set_title(method, fontsize=10)
        axis.set_xlabel("step")
        axis.set_ylabel("loss (symlog)")
        axis.set_yscale("symlog", linthresh=1e-2)  # loss terms differ by orders of magnitude
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(methods):]:
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path, dpi=120)
