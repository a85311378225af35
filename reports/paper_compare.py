"""The paper's numbers (Tables 1–4) beside ours, with the difference and the protocol differences marked.

Our methods map to the paper's columns through ``paper_name`` in ``cell.json``; our datasets map to the
paper's tables by kind: ``paris`` → Table 1 (Paris StreetView), ``celeba`` → Table 2 (CelebA), ``places2``
→ Table 3 (Places2). The embedded suites (``faces``, ``scenes``, ``facades``) are built from other
photographs: their rows show the paper's number of the dataset they stand in for, but **no difference**
(``n/c``, not comparable) — a difference between two different image sets would look like a finding and
is not one. ``folder:`` datasets have no paper table.

Every row is marked with the ways our protocol differs from the paper's (legend under each table):
D stand-in dataset, R resolution other than 256², M free-form masks instead of the NVIDIA set,
S a substitute pretrained network inside the method, T trained here with our budget (the paper: 10
epochs), F FID unavailable offline. A paper value with a transcription note is marked [n].

Table 4 (the ablation, ``python -m pipelines.ablation``) is rendered by :func:`table4_section`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from bench.run.cell import parse_dataset
from bench.data.suites import STANDS_IN_FOR
from reports.intervals import interval_frame, render_intervals
from reports.qualitative import cell_manifest
from reports.results import combined_summary, find_cells
from reports.tables import (STYLE, dataset_table, fmt, latex_grid, markdown_grid, to_latex, to_markdown,
                            write_text_atomic)

PAPER_DATA = Path(__file__).parent / "paper_data" / "tables_1_to_4.csv"
PAPER_TABLES = {"Paris StreetView": 1, "CelebA": 2, "Places2": 3}
DATASET_OF_KIND = {"paris": "Paris StreetView", "celeba": "CelebA", "places2": "Places2"}
#: the paper's metric names → ours (summary.csv metric, lower-cased)
PAPER_METRICS = {"PSNR": "psnr", "SSIM": "ssim", "MAE_x1e-1": "mae", "FID": "fid"}
PAPER_SIZE = 256
#: the ablation's columns in Table 4, as ``paper_name`` of the ablated variants (see pipelines.ablation)
NO_UNET = "SAHN w/o U-Net"
NO_MSF = "SAHN w/o multi-scale semantic fusion"
ABLATION_COLUMNS = (NO_UNET, NO_MSF)
ABLATION_BIN = "(0.5,0.6]"
ABLATION_DATASET = "Paris StreetView"
MARKS = {
    "D": "stand-in dataset: other images than the paper's, not comparable (no difference shown)",
    "R": "other resolution than the paper's 256²",
    "M": "seeded free-form masks instead of the NVIDIA irregular mask test set",
    "S": "a substitute pretrained network inside the method (the paper's could not be had offline)",
    "T": "trained here with our budget (steps × batch in cell.json); the paper trains 10 epochs",
    "F": "FID unavailable (no Inception weights offline): not compared",
}


# ------------------------------------------------------------------------------------------ paper data
def paper_numbers(path: Path = PAPER_DATA) -> pd.DataFrame:
    """The transcribed Tables 1–4: table, dataset, metric, bin, method, value, note."""
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    frame["note"] = frame["note"].fillna("")
    return frame


def paper_dataset(cell) -> tuple[str | None, bool]:
    """(the paper dataset this cell's dataset matches or stands in for, whether it is a stand-in)."""
    kind = parse_dataset(cell.record.get("dataset_entry", cell.dataset)).kind
    if kind in DATASET_OF_KIND:
        return DATASET_OF_KIND[kind], False
    if kind in STANDS_IN_FOR:
        return STANDS_IN_FOR[kind], True
    return None, False


# ------------------------------------------------------------------------------------------ protocol marks
def protocol_marks(cell, stand_in: bool) -> dict[str, str]:
    """{mark letter: detail} of the ways this cell's protocol differs from the paper's."""
    marks: dict[str, str] = {}
    if stand_in:
        marks["D"] = f"`{cell.dataset}` stands in for {paper_dataset(cell)[0]}"
    manifest = cell_manifest(cell)
    if manifest is not None:
        if manifest.image_size != PAPER_SIZE:
            marks["R"] = f"{manifest.image_size}² images"
        if manifest.protocol.source != "nvidia":
            marks["M"] = f"{manifest.protocol.source} masks ({manifest.protocol.preset})"
    substitutions = cell.record.get("substitutions") or {}
    if substitutions:
        marks["S"] = "substitute " + ", ".join(sorted(substitutions))
    train = cell.record.get("train")
    if train:
        marks["T"] = f"{train.get('steps')} steps at batch {train.get('batch_size')}"
    fid_network = str((cell.record.get("metric_networks") or {}).get("inception_v3_fid", "unavailable"))
    if fid_network.startswith("unavailable"):
        marks["F"] = "no Inception weights"
    return marks


def _legend(used: set[str]) -> list[str]:
    return [f"{letter} = {MARKS[letter]}" for letter in MARKS if letter in used]


# ------------------------------------------------------------------------------------------ Tables 1–3
def comparison_rows(cells: Sequence, paper: pd.DataFrame, table: int, dataset: str,
                    stand_in: bool) -> tuple[list[list[str]], set[str], list[str]]:
    """Rows (metric, bin, paper column, our method, paper, ours, Δ, marks) for one of our datasets,
    the marks used, and the paper notes referenced as [n]."""
    summary = combined_summary(cells)
    summary["metric"] = summary["metric"].str.lower()
    part = paper[(paper["table"] == table) & (paper["dataset"] == dataset)]
    rows, used, notes = [], set(), []
    ours_by_column = {}
    for cell in cells:
        if cell.record.get("paper_name"):
            ours_by_column.setdefault(cell.record["paper_name"], []).append(cell)
    for paper_metric, metric in PAPER_METRICS.items():
        style = STYLE[metric]
        for label in dict.fromkeys(part["bin"]):
            for _, entry in part[(part["metric"] == paper_metric) & (part["bin"] == label)].iterrows():
                for cell in dict((c.method, c) for c in ours_by_column.get(entry["method"], [])).values():
                    found = summary[(summary["method"] == cell.method) & (summary["metric"] == metric)
                                    & (summary["bin"] == label)]
                    ours = float(found["value"].iloc[0]) * style.scale if not found.empty else float("nan")
                    marks = protocol_marks(cell, stand_in)
                    if metric != "fid":
                        marks.pop("F", None)
                    used |= set(marks)
                    paper_text = fmt(float(entry["value"]), style.digits)
                    if entry["note"]:
                        if entry["note"] not in notes:
                            notes.append(entry["note"])
                        paper_text += f" [{notes.index(entry['note']) + 1}]"
                    difference = "n/c" if stand_in else fmt(ours - float(entry["value"]), style.digits, signed=True)
                    rows.append([style.header, label, entry["method"], cell.method, paper_text,
                                 fmt(ours, style.digits), difference, "".join(sorted(marks))])
    return rows, used, notes


COMPARISON_HEADER = ["Metric", "Bin", "Paper column", "Our method", "Paper", "Ours", "Δ ours − paper", "Differs"]


def mark_details(cells: Sequence, stand_in: bool, used: set[str]) -> list[str]:
    """One line per method of ours: what each of its marks that the table uses stands for in its case."""
    lines = []
    for cell in dict((c.method, c) for c in cells).values():
        marks = {key: value for key, value in protocol_marks(cell, stand_in).items() if key in used}
        if marks:
            lines.append(f"{cell.method}: " + "; ".join(f"{k} {v}" for k, v in sorted(marks.items())))
    return lines


def _render(rows, used, notes, caption: str, label: str, tex_path: Path, out: Path,
            details: Sequence[str] = ()) -> list[str]:
    header = COMPARISON_HEADER
    legend = _legend(used)
    note_lines = [f"[{i}] paper value: {note}" for i, note in enumerate(notes, start=1)]
    align = "l" * 4 + "r" * (len(header) - 5) + "l"
    write_text_atomic(latex_grid(header, rows, caption, label, align=align, notes=legend + note_lines), tex_path)
    lines = [markdown_grid(header, rows, align=align), ""]
    lines += [f"- {line}" for line in legend + note_lines + list(details)]
    return lines + ["", f"LaTeX: `{tex_path.relative_to(out).as_posix()}`", ""]


def section(cells: Sequence, out: Path) -> list[str]:
    """Paper vs ours for Tables 1–3, one table per dataset of ours that has a paper table; LaTeX to
    ``out/report/tables/paper_vs_ours_<dataset>.tex``."""
    out = Path(out)
    paper = paper_numbers()
    lines = ["## Paper vs ours (Tables 1–3)", "",
             "Paper values from Technologies 2025, 13(11), 521 (reports/paper_data). Δ = ours − paper, in the "
             "paper's units (MAE ×10⁻¹). Ours = mean over seeds. Rows are marked where our protocol differs.", ""]
    shown = 0
    ablation = {c.record.get("manifest_digest") for group in ablation_groups(cells) for c in group}
    for dataset_label in dict.fromkeys(c.dataset for c in cells):
        group = [c for c in cells if c.dataset == dataset_label and c.record.get("manifest_digest") not in ablation]
        if not group:
            continue
        paper_name, stand_in = paper_dataset(group[0])
        if paper_name is None:
            continue
        table = PAPER_TABLES[paper_name]
        rows, used, notes = comparison_rows(group, paper, table, paper_name, stand_in)
        if not rows:
            continue
        shown += 1
        lines += [f"### Table {table} ({paper_name}) vs ours on `{dataset_label}`", ""]
        if stand_in:
            lines += [f"**Stand-in dataset: not comparable.** `{dataset_label}` is an embedded suite of other "
                      f"photographs standing in for {paper_name}; the paper's numbers are shown for orientation "
                      "only and no difference is computed.", ""]
        lines += _render(rows, used, notes, f"Table {table} ({paper_name}): paper vs ours on {dataset_label}",
                         f"tab:paper-vs-ours-{dataset_label}",
                         out / "report" / "tables" / f"paper_vs_ours_{dataset_label}.tex", out,
                         details=mark_details([c for c in group if c.record.get("paper_name")], stand_in, used))
    if not shown:
        lines += ["No dataset of these results maps to one of the paper's tables (celeba, paris, places2 or "
                  "their embedded stand-ins).", ""]
    return lines


# ------------------------------------------------------------------------------------------ Table 4
def ablation_groups(cells: Sequence) -> list[list]:
    """Cells of ablation runs: per manifest, the ablated variants and the full SAHN scored on it."""
    ablated = [c for c in cells if c.record.get("paper_name") in ABLATION_COLUMNS]
    groups = []
    for digest in dict.fromkeys(c.record.get("manifest_digest") for c in ablated):
        members = [c for c in cells if c.record.get("manifest_digest") == digest
                   and c.record.get("paper_name") in ("SAHN",) + ABLATION_COLUMNS]
        groups.append(members)
    return groups


def _ablation_order(cell) -> tuple[int, str]:
    order = {"SAHN": 0, NO_UNET: 1, NO_MSF: 2}
    return order.get(cell.record.get("paper_name"), 3), cell.method


def table4_rows(group: Sequence, paper: pd.DataFrame) -> tuple[list[list[str]], set[str], list[str]]:
    summary = combined_summary(group)
    summary["metric"] = summary["metric"].str.lower()
    part = paper[paper["table"] == 4]
    rows, used = [], set()
    stand_in = paper_dataset(group[0])[1] or paper_dataset(group[0])[0] != ABLATION_DATASET
    for paper_metric, metric in PAPER_METRICS.items():
        style = STYLE[metric]
        for cell in sorted(dict((c.method, c) for c in group).values(), key=_ablation_order):
            entry = part[(part["metric"] == paper_metric) & (part["method"] == cell.record.get("paper_name"))]
            if entry.empty:
                continue
            paper_value = float(entry["value"].iloc[0])
            found = summary[(summary["method"] == cell.method) & (summary["metric"] == metric)
                            & (summary["bin"] == ABLATION_BIN)]
            ours = float(found["value"].iloc[0]) * style.scale if not found.empty else float("nan")
            marks = protocol_marks(cell, stand_in)
            marks.pop("F", None)
            used |= set(marks)
            difference = "n/c" if stand_in else fmt(ours - paper_value, style.digits, signed=True)
            rows.append([style.header, ABLATION_BIN, cell.record["paper_name"], cell.method,
                         fmt(paper_value, style.digits), fmt(ours, style.digits), difference, "".join(sorted(marks))])
    return rows, used, []


def _table4_for_group(group: Sequence, out: Path, paper: pd.DataFrame) -> list[str]:
    group = sorted(group, key=_ablation_order)
    dataset = group[0].dataset
    tables = out / "report" / "tables"
    summary = combined_summary(group)
    ours = dataset_table(summary, (ABLATION_BIN,))
    tex = write_text_atomic(to_latex(ours, f"Table 4: ablation of the U-Net and the multi-scale fusion on {dataset}, "
                                           f"hole ratio {ABLATION_BIN}", f"tab:ablation-{dataset}"),
                            tables / f"table4_{dataset}.tex")
    paper_name, stand_in = paper_dataset(group[0])
    lines = [f"### Table 4 on `{dataset}`", ""]
    if stand_in or paper_name != ABLATION_DATASET:
        lines += [f"**Not the paper's data.** The paper's ablation uses {ABLATION_DATASET}; `{dataset}` is "
                  f"{'an embedded stand-in suite for ' + paper_name if stand_in else 'another dataset'}. "
                  "Compare the variants with each other, not with the paper's numbers.", ""]
    lines += [to_markdown(ours), "", f"LaTeX: `{tex.relative_to(out).as_posix()}`", ""]
    rows, used, notes = table4_rows(group, paper)
    if rows:
        lines += ["Paper vs ours:", ""]
        lines += _render(rows, used, notes, f"Table 4: paper vs ours on {dataset}",
                         f"tab:paper-vs-ours-ablation-{dataset}", tables / f"paper_vs_ours_table4_{dataset}.tex", out,
                         details=mark_details(group, stand_in or paper_name != ABLATION_DATASET, used))
    full = next((c for c in group if c.record.get("paper_name") == "SAHN"), None)
    if full is not None:
        frame = interval_frame(group, reference=full.method, bins=(ABLATION_BIN,))
        if not frame.empty:
            lines += [f"Paired bootstrap intervals, variant − {full.method}:", ""]
            lines += render_intervals(frame, out, f"ablation_intervals_{dataset}",
                                      f"Table 4 variants minus the full SAHN on {dataset}")
    return lines


def table4_section(cells: Sequence, out: Path, ablation_dir: Path | None = None) -> list[str]:
    """Table 4 (ours), the paper's Table 4 beside it, and the variants' intervals against the full model.

    Uses the ablation cells among ``cells``; if there are none, the cells of ``ablation_dir`` (default:
    the sibling folder ``<out>-ablation`` that ``python -m pipelines.ablation`` writes)."""
    out = Path(out)
    groups = ablation_groups(cells)
    source = ""
    if not groups:
        folder = Path(ablation_dir) if ablation_dir else out.resolve().with_name(out.resolve().name + "-ablation")
        if folder.is_dir() and any(folder.rglob("cell.json")):
            groups = ablation_groups(find_cells(folder))
            source = f" (from `{folder.name}`)"
    lines = ["## Ablation (Table 4)" + source, ""]
    if not groups:
        return lines + ["No ablation results: run `python -m pipelines.ablation` (SAHN without the U-Net and "
                        "without multi-scale semantic fusion beside the full model, hole ratio (0.5,0.6]).", ""]
    paper = paper_numbers()
    for group in groups:
        lines += _table4_for_group(group, out, paper)
    return lines
