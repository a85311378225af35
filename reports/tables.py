"""Tables in the layout of the paper's Tables 1–3: metric × bin rows, methods as columns.

Rendering is pure: a long frame in, Markdown or LaTeX (booktabs) text out.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class MetricStyle:
    key: str  # metric name in summary.csv
    header: str  # display name with unit and direction
    scale: float  # displayed value = value × scale
    digits: int
    higher_is_better: bool


METRICS = (
    MetricStyle("psnr", "PSNR (dB) ↑", 1.0, 2, True),
    MetricStyle("ssim", "SSIM ↑", 1.0, 3, True),
    MetricStyle("mae", "MAE (×10⁻¹) ↓", 10.0, 3, False),
    MetricStyle("fid", "FID ↓", 1.0, 2, False),
    MetricStyle("kid", "KID ↓", 1.0, 4, False),
    MetricStyle("lpips", "LPIPS ↓", 1.0, 4, False),
    MetricStyle("fd_lite0", "FD-Lite0 ↓ (substitute for FID)", 1.0, 3, False),
    MetricStyle("kid_lite0", "KID-Lite0 ↓ (substitute for KID)", 1.0, 4, False),
    MetricStyle("lite0_dist", "Lite0 distance ↓ (substitute for LPIPS)", 1.0, 4, False),
)
STYLE = {m.key: m for m in METRICS}
PAPER_BINS = ("(0.2,0.4]", "(0.4,0.6]", "All")


def method_header(method: str, paper_name: str | None) -> str:
    if not isinstance(paper_name, str) or not paper_name or paper_name.lower() == method.lower():
        return method
    return f"{method} ({paper_name})"


def dataset_table(summary: pd.DataFrame, bins=PAPER_BINS) -> pd.DataFrame:
    """One dataset's long summary → wide table; index (metric header, bin), columns method headers,
    plus an ``N`` row per bin. Values are already scaled for display; missing cells are NaN."""
    summary = summary.copy()
    summary["metric"] = summary["metric"].str.lower()
    methods = list(dict.fromkeys(summary["method"]))
    headers = {m: method_header(m, summary.loc[summary["method"] == m, "paper_name"].iloc[0]) for m in methods}
    rows, index = [], []
    present = [s for s in METRICS if s.key in set(summary["metric"])]
    for style in present:
        for label in bins:
            cells = summary[(summary["metric"] == style.key) & (summary["bin"] == label)]
            if cells.empty:
                continue
            values = {headers[m]: float(v) * style.scale for m, v in zip(cells["method"], cells["value"])}
            rows.append(values)
            index.append((style.header, label))
    for label in bins:
        counts = summary[summary["bin"] == label].groupby("method")["n"].first()
        if not counts.empty:
            rows.append({headers[m]: float(n) for m, n in counts.items()})
            index.append(("N (pairs)", label))
    table = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["metric", "bin"]))
    return table.reindex(columns=[headers[m] for m in methods])


def _format(value: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _style_for(header: str) -> MetricStyle | None:
    return next((s for s in METRICS if s.header == header), None)


def _best_columns(row: pd.Series, style: MetricStyle | None) -> set[str]:
    values = row.dropna()
    if style is None or len(values) < 2:
        return set()
    best = values.max() if style.higher_is_better else values.min()
    return set(values.index[values == best])


def to_markdown(table: pd.DataFrame) -> str:
    """GitHub Markdown; the best value of each metric row is bold."""
    columns = list(table.columns)
    lines = ["| Metric | Bin | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for (metric, label), row in table.iterrows():
        style = _style_for(metric)
        digits = style.digits if style else 0
        best = _best_columns(row, style)
        cells = [(f"**{_format(row[c], digits)}**" if c in best else _format(row[c], digits)) for c in columns]
        lines.append(f"| {metric} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "↑": r"$\uparrow$", "↓": r"$\downarrow$", "×": r"$\times$", "⁻¹": r"$^{-1}$", "–": "--"}


def latex_escape(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        if text.startswith("⁻¹", i):
            out.append(LATEX_SPECIAL["⁻¹"])
            i += 2
            continue
        out.append(LATEX_SPECIAL.get(text[i], text[i]))
        i += 1
    return "".join(out)


def latex_label(text: str) -> str:
    """A \\label key: letters, digits, ':' and '-' only (escaping does not make a valid key)."""
    return re.sub(r"[^A-Za-z0-9:-]+", "-", text)


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table; every text cell is escaped, the best value per metric row is bold."""
    columns = list(table.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
             rf"\label{{{latex_label(label)}}}", r"\begin{tabular}{ll" + "r" * len(columns) + "}", r"\toprule",
             "Metric & Bin & " + " & ".join(latex_escape(c) for c in columns) + r" \\", r"\midrule"]
    previous = None
    for (metric, label_), row in table.iterrows():
        style = _style_for(metric)
        digits = style.digits if style else 0
        best = _best_columns(row, style)
        cells = [(rf"\textbf{{{_format(row[c], digits)}}}" if c in best else _format(row[c], digits)) for c in columns]
        if previous is not None and metric != previous:
            lines.append(r"\midrule")
        shown = latex_escape(metric) if metric != previous else ""
        lines.append(f"{shown} & {latex_escape(label_)} & " + " & ".join(latex_escape(c) if not c.startswith("\\")
                                                                            else c for c in cells) + r" \\")
        previous = metric
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)
