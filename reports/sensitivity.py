"""The search's sensitivity figure: the validation metric against α and against each loss weight.

Input: ``trials.csv`` of ``python -m pipelines.tune`` (one row per trial: the sampled options, ``status``,
``step`` and the last validation metrics). A trial stopped early by ASHA was scored after fewer steps
than the others, so it is drawn hollow: its value is not comparable with a fully trained one.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.metrics.table import metric as metric_row  # noqa: E402
from reports.figures import save_figure  # noqa: E402

#: searched option → axis label (the paper's names: α of L_prior, w1..w4 of the total loss)
PARAMETERS = {"alpha": "α (L_prior hole weight)", "w_rec": "w1 (reconstruction)", "w_fm": "w2 (feature matching)",
              "w_adv": "w3 (adversarial)", "w_prior": "w4 (semantic prior)"}
CATEGORICAL_LIMIT = 6  # options with at most this many distinct, repeated values also get their per-value mean
LOG_SPAN = 5.0  # an axis spanning at least this ratio (all values > 0) is drawn logarithmic
FAILED = "failed"
STOPPED_EARLY = "stopped_early"


def scored_trials(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Trials with a value of ``metric`` that did not fail."""
    if metric not in trials:
        return trials.iloc[0:0]
    keep = trials[metric].notna()
    if "status" in trials:
        keep &= trials["status"] != FAILED
    return trials[keep]


def _draw_panel(axis, values: pd.Series, scores: pd.Series, early: pd.Series, label: str) -> None:
    distinct = np.unique(values.to_numpy(dtype=float))
    full, hollow = ~early, early
    axis.scatter(values[full], scores[full], s=28, color="tab:blue", label="ran every step", zorder=3)
    if hollow.any():
        axis.scatter(values[hollow], scores[hollow], s=28, facecolors="none", edgecolors="tab:blue",
                     label="stopped early (fewer steps)", zorder=3)
    # A choice among a few values (values repeat): the per-value mean shows the trend. Continuous samples
    # never repeat, and a "mean" of one trial per value would only redraw the points.
    if 1 < len(distinct) <= CATEGORICAL_LIMIT and len(distinct) < len(values) and full.any():
        means = scores[full].groupby(values[full]).mean()
        axis.plot(means.index, means.to_numpy(), color="tab:orange", linewidth=1.2, marker="_", markersize=12,
                  label="mean (every step)", zorder=2)
        axis.set_xticks(distinct)
    if len(distinct) > 1 and distinct.min() > 0 and distinct.max() / distinct.min() >= LOG_SPAN:
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())  # minor labels overlap on short spans
    axis.set_xlabel(label)
    axis.grid(alpha=0.3)


def _varies(column: pd.Series) -> bool:
    return column.dropna().nunique() > 1


def sensitivity_figure(trials: pd.DataFrame, metric: str, out_base: Path) -> list[Path]:
    """One panel per searched option that varies across ``trials``: ``metric`` of each trial against its
    value (fixed options are named in the title). Writes ``<out_base>.png`` and ``<out_base>.pdf``;
    returns both paths ([] when no trial has a value)."""
    out_base = Path(out_base)
    shown = metric_row(metric)
    scored = scored_trials(trials, metric)
    present = [name for name in PARAMETERS if name in scored and scored[name].notna().any()]
    if scored.empty or not present:
        return []
    varied = [name for name in present if _varies(scored[name])] or present
    fixed = [name for name in present if name not in varied]
    early = (scored["status"] == STOPPED_EARLY) if "status" in scored else pd.Series(False, index=scored.index)
    columns = min(3, len(varied))
    rows = -(-len(varied) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(max(3.4 * columns, 5.5), 3.0 * rows + 0.6), sharey=True,
                                squeeze=False)
    for axis, name in zip(axes.flat, varied):
        known = scored[name].notna()
        _draw_panel(axis, scored.loc[known, name].astype(float), scored.loc[known, metric].astype(float),
                    early[known], PARAMETERS[name])
    for axis in list(axes.flat)[len(varied):]:
        axis.axis("off")
    for row in axes:
        row[0].set_ylabel(f"validation {shown.label_with_unit}, {shown.direction}", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    title = f"Validation {shown.label} against the searched options ({len(scored)} trials)"
    if fixed:
        title += "\nfixed: " + ", ".join(f"{PARAMETERS[name].split(' ')[0]} = {scored[name].dropna().iloc[0]:g}"
                                         for name in fixed)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, out_base, dpi=120)
