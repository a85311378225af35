"""§4.5 of the paper: model size and inference cost, ours (``python -m pipelines.efficiency``) beside the
paper's RTX 4090 figures.

Absolute latencies only compare on the same device: the paper's were measured on an RTX 4090, ours on
the device named in each row. Ratios to SAHN (method ÷ SAHN on the same device) do compare across
devices, as far as the methods' costs scale alike on both.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from reports.tables import fmt, latex_grid, markdown_grid, write_text_atomic

PAPER_EFFICIENCY = Path(__file__).parent / "paper_data" / "efficiency_4_5.csv"
DEFAULT_CSV = Path("efficiency") / "efficiency.csv"
REFERENCE = "SAHN"


def load_efficiency(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    for column in ("paper_name", "scaled", "error", "device_name", "memory_kind"):
        if column not in frame.columns:
            frame[column] = ""
        frame[column] = ["" if pd.isna(value) else str(value) for value in frame[column]]
    return frame


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["error"] == ""]


def _reference_row(frame: pd.DataFrame) -> pd.Series | None:
    rows = _ok(frame)
    rows = rows[rows["paper_name"] == REFERENCE]
    return None if rows.empty else rows.iloc[0]


def _ratio(value: float, reference: float | None) -> str:
    if reference is None or not reference or any(isinstance(v, float) and math.isnan(v) for v in (value, reference)):
        return "–"
    return f"{value / reference:.2f}×"


def _significant(value: float, digits: int = 3) -> str:
    """Three significant digits: throughputs range from thousands to thousandths of images per second."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{float(value):.{digits}g}"


def ours_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    reference = _reference_row(frame)
    ref_latency = None if reference is None else float(reference["latency_ms"])
    batches = frame["throughput_batch"].dropna() if "throughput_batch" in frame else pd.Series(dtype=float)
    batch = int(batches.iloc[0]) if not batches.empty else 0
    header = ["Method", "Device", "Params (M)", "Checkpoint (MB)", "Latency (ms)", "× SAHN", "Peak memory (MB)",
              "GFLOPs", f"Throughput (img/s, batch {batch})", "Note"]
    rows = []
    for _, row in frame.iterrows():
        paper_name = row["paper_name"]
        name = row["method"] + (f" ({paper_name})" if paper_name and paper_name != row["method"] else "")
        device = row["device_name"] or row.get("device", "")
        if row["error"]:
            rows.append([name, device] + ["–"] * 7 + [f"failed: {row['error']}"])
            continue
        rows.append([name, device, fmt(row["params_M"], 1), fmt(row["checkpoint_MB"], 1), fmt(row["latency_ms"], 0),
                     _ratio(float(row["latency_ms"]), ref_latency), fmt(row["peak_memory_MB"], 0),
                     fmt(row["gflops_per_image"], 1), _significant(row.get("throughput_img_s", float("nan"))),
                     row["scaled"]])
    return header, rows


def paper_rows(frame: pd.DataFrame, paper: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The paper's three methods: its figures (RTX 4090) beside ours, with ratios to SAHN on each side."""
    reference = _reference_row(frame)
    paper_ref = paper[paper["method"] == REFERENCE]["latency_ms"]
    paper_ref_latency = float(paper_ref.iloc[0]) if not paper_ref.empty else None
    ours_ref_latency = None if reference is None else float(reference["latency_ms"])
    header = ["Paper column", "Ours", "Params paper (M)", "Params ours (M)", "Storage paper (MB)",
              "Checkpoint ours (MB)", "Latency paper (ms, RTX 4090)", "Latency ours (ms)", "Device (ours)",
              "× SAHN paper", "× SAHN ours"]
    rows = []
    ok = _ok(frame)
    for _, entry in paper.iterrows():
        matches = ok[ok["paper_name"] == entry["method"]]
        if matches.empty:
            matches = pd.DataFrame([{"method": "not measured", "params_M": float("nan"), "checkpoint_MB": float("nan"),
                                     "latency_ms": float("nan"), "device_name": "–"}])
        for _, ours in matches.iterrows():
            rows.append([entry["method"], ours["method"], fmt(entry["params_M"], 1), fmt(ours["params_M"], 1),
                         fmt(entry["storage_MB"], 0), fmt(ours["checkpoint_MB"], 1), fmt(entry["latency_ms"], 0),
                         fmt(ours["latency_ms"], 0), ours["device_name"],
                         _ratio(float(entry["latency_ms"]), paper_ref_latency),
                         _ratio(float(ours["latency_ms"]), ours_ref_latency)])
    return header, rows


def ddnm_claim(frame: pd.DataFrame) -> str | None:
    """Our counterpart of the paper's 'SAHN 3.9× faster, 50% less memory than DDNM'."""
    ok = _ok(frame)
    sahn, ddnm = ok[ok["paper_name"] == REFERENCE], ok[ok["paper_name"] == "DDNM"]
    if sahn.empty or ddnm.empty:
        return None
    s, d = sahn.iloc[0], ddnm.iloc[0]
    speed = float(d["latency_ms"]) / float(s["latency_ms"])
    memory = float(d["peak_memory_MB"]) / float(s["peak_memory_MB"]) if float(s["peak_memory_MB"]) > 0 else float("nan")
    return (f"Ours on {s['device_name']}: latency {d['method']} ÷ {s['method']} = {speed:.1f}× (the paper: 3.9×); "
            f"peak memory {d['method']} ÷ {s['method']} = {memory:.2f}× (the paper: SAHN needs 50% less memory than "
            "DDNM, i.e. 2×).")


def notes(frame: pd.DataFrame) -> list[str]:
    kinds = sorted(k for k in set(frame["memory_kind"]) if k)
    lines = [f"Input {int(frame['image_size'].dropna().iloc[0])}², batch {int(frame['batch_size'].dropna().iloc[0])}; "
             "latency = median of the timed calls after warm-up (CUDA events on a GPU). Weights are random: "
             "cost does not depend on them.",
             "Peak memory: " + ("; ".join(kinds) if kinds else "–") + "."
             + (" A CPU figure leaves out the weights loaded before the call (the CUDA "
                "figure includes them)." if (frame["device"] == "cpu").any() else ""),
             "GFLOPs per image from torch's FlopCounterMode: convolutions and matrix products only (FFT, deformable "
             "convolution and element-wise work count 0), so a lower bound.",
             "Absolute times compare only on one device; the ratios to SAHN compare across devices."]
    loads = frame["load_average"].dropna() if "load_average" in frame else pd.Series(dtype=float)
    if not loads.empty and (frame["device"] == "cpu").any():
        lines.append(f"Machine load (1-min average) while measuring: {loads.min():.1f}–{loads.max():.1f}; other "
                     "processes on the same cores slow parallel CPU inference unevenly.")
    if (frame["scaled"] != "").any():
        lines.append("Rows with a note were timed with fewer sampler steps and scaled to the full count "
                     "(one-off costs scaled too: an upper bound).")
    return lines


def section(out: Path, csv_path: Path | None = None) -> list[str]:
    """Markdown lines; LaTeX to ``out/report/tables/efficiency{,_paper}.tex``. Reads ``csv_path`` (default
    ``out/efficiency/efficiency.csv``, written by ``python -m pipelines.efficiency``)."""
    out = Path(out)
    csv_path = Path(csv_path) if csv_path else out / DEFAULT_CSV
    lines = ["## Computational efficiency (§4.5)", ""]
    if not csv_path.is_file():
        return lines + ["No measurements: run `python -m pipelines.efficiency` (it writes `efficiency/efficiency.csv` "
                        "in the results folder).", ""]
    frame = load_efficiency(csv_path)
    paper = pd.read_csv(PAPER_EFFICIENCY, keep_default_na=False, na_values=[""])
    tables = out / "report" / "tables"
    footnotes = notes(frame)
    header, rows = ours_rows(frame)
    align = "ll" + "r" * (len(header) - 3) + "l"
    ours_tex = write_text_atomic(latex_grid(header, rows, "Model size and inference cost (ours)", "tab:efficiency",
                                            align=align, notes=footnotes), tables / "efficiency.tex")
    lines += [markdown_grid(header, rows, align=align), ""] + [f"- {n}" for n in footnotes] + [""]
    header, rows = paper_rows(frame, paper)
    paper_notes = [f"{r['method']}: {r['note']}" for _, r in paper.iterrows() if r.get("note")]
    align = "ll" + "r" * 6 + "l" + "rr"
    paper_tex = write_text_atomic(latex_grid(header, rows, "Paper (RTX 4090) vs ours", "tab:efficiency-paper",
                                             align=align, notes=paper_notes), tables / "efficiency_paper.tex")
    lines += ["Paper vs ours (the paper's figures are from an RTX 4090):", "", markdown_grid(header, rows, align=align),
              ""] + [f"- {n}" for n in paper_notes]
    claim = ddnm_claim(frame)
    if claim:
        lines += [f"- {claim}"]
    return lines + ["", f"LaTeX: `{ours_tex.relative_to(out).as_posix()}`, "
                        f"`{paper_tex.relative_to(out).as_posix()}`", ""]
