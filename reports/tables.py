"""Tables in the layout of the paper's Tables 1–3: metric × bin rows, methods as columns.

Rendering is pure: a long frame in, Markdown or LaTeX (booktabs) text out. The plain grids at the end
(:func:`markdown_grid`, :func:`latex_grid`) render any rows of text cells for the other report sections.
"""
from __future__ import annotations

import math
import re
import unicodedata
from pathlib import Path
from typing import Sequence

import pandas as pd

from bench.metrics.table import BY_NAME, METRICS, Metric
from bench.files import atomic_write_text

STYLE = BY_NAME  # how each metric is shown (the other report sections look metrics up here)
PAPER_BINS = ("(0.2,0.4]", "(0.4,0.6]", "All")


def method_header(method: str, paper_name: str | None, weights: str | None = None) -> str:
    """``lama_fourier (LaMa-Fourier) [published weights]``: the column's method, the paper column it stands
    for, and where its weights come from."""
    header = method
    if isinstance(paper_name, str) and paper_name and paper_name.lower() != method.lower():
        header = f"{method} ({paper_name})"
    return f"{header} [{weights}]" if isinstance(weights, str) and weights else header


def dataset_table(summary: pd.DataFrame, bins=PAPER_BINS) -> pd.DataFrame:
    """One dataset's long summary → wide table; index (metric header, bin), columns method headers,
    plus an ``N`` row per bin. Values are already scaled for display; missing cells are NaN."""
    summary = summary.copy()
    summary["metric"] = summary["metric"].str.lower()
    methods = list(dict.fromkeys(summary["method"]))
    first = summary.drop_duplicates("method").set_index("method")
    headers = {m: method_header(m, first.at[m, "paper_name"], first.get("weights", {}).get(m)) for m in methods}
    rows, index = [], []
    present = [s for s in METRICS if s.name in set(summary["metric"])]
    for style in present:
        for label in bins:
            cells = summary[(summary["metric"] == style.name) & (summary["bin"] == label)]
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


def _style_for(header: str) -> Metric | None:
    return next((s for s in METRICS if s.header == header), None)


def _best_columns(row: pd.Series, style: Metric | None) -> set[str]:
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


# ------------------------------------------------------------------------------------------ plain grids
# Text cells in, Markdown or booktabs LaTeX out, every cell escaped: the renderers every report section shares.
LATEX_EXTRA = {"Δ": r"$\Delta$", "†": r"\textsuperscript{\dag}", "²": r"\textsuperscript{2}", "±": r"$\pm$",
               "—": "---", "≥": r"$\geq$", "≤": r"$\leq$", "−": "-", "·": r"$\cdot$", "≈": r"$\approx$",
               "→": r"$\rightarrow$", "µ": r"$\mu$", "…": r"\dots{}", "‘": "`", "’": "'", "“": "``",
               "”": "''"}


def latex_text(text: str) -> str:
    """Any text as compile-safe LaTeX: special characters escaped, known symbols as commands, any other
    non-ASCII character reduced to its ASCII letters (or dropped)."""
    escaped = latex_escape(str(text))
    out = []
    for char in escaped:
        if char.isascii():
            out.append(char)
        elif char in LATEX_EXTRA:
            out.append(LATEX_EXTRA[char])
        else:
            out.append(unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode())
    return "".join(out)


def _latex_cell(cell: str) -> str:
    if len(cell) > 4 and cell.startswith("**") and cell.endswith("**"):
        return rf"\textbf{{{latex_text(cell[2:-2])}}}"
    return latex_text(cell)


def _latex_row(cells: Sequence[str]) -> str:
    row = " & ".join(_latex_cell(str(c)) for c in cells)
    return ("{}" + row if row.startswith("[") else row) + r" \\"  # "\\[" would read as a row skip length


def markdown_grid(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` has one ``l``/``r`` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
                     + [line(row) for row in rows])


def latex_grid(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str, label: str,
               align: str | None = None, notes: Sequence[str] = ()) -> str:
    """A booktabs table; every cell escaped (``**x**`` becomes bold); ``notes`` go under the rule."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_text(caption)}}}",
             rf"\label{{{latex_label(label)}}}", rf"\begin{{tabular}}{{{align}}}", r"\toprule", _latex_row(header),
             r"\midrule"]
    lines += [_latex_row(row) for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par\footnotesize {latex_text(note)}" for note in notes]
    lines.append(r"\end{table}")
    return "\n".join(lines)


def write_text_atomic(text: str, path: Path) -> Path:
    return atomic_write_text(path, text)


def fmt(value: float, digits: int, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
