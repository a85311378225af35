"""Which differences to SAHN are real: seeded paired-bootstrap confidence intervals per metric and bin.

For every dataset, every method other than the reference (the first method whose ``paper_name`` is
``SAHN``) and every per-image metric, the per-image scores of the method and the reference are aligned
by ``pair_id`` (the same frozen test pairs) and :func:`bench.metrics.aggregate.paired_bootstrap` resamples the
pairs: Δ = method − reference, with a percentile interval. With several seeds, a pair's score is first
averaged over the seeds. Set-level metrics (FID, KID) have no per-pair value and get no interval.

A difference is marked † when its interval excludes 0: at that confidence the two methods differ on
this test set (it says nothing about other images). The same seed gives the same intervals.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from bench.metrics.aggregate import NVIDIA_BINS, bin_members, paired_bootstrap
from bench.run.evaluate import write_csv_atomic
from bench.data.masks import PAPER_BINS
from bench.metrics.table import PER_IMAGE_METRICS
from reports.qualitative import has_per_image
from reports.tables import STYLE, latex_grid, markdown_grid, method_header, write_text_atomic

REFERENCE_PAPER_NAME = "SAHN"
INTERVAL_COLUMNS = ["dataset", "method", "reference", "metric", "bin", "n", "difference", "low", "high",
                    "excludes_zero", "method_better", "confidence", "samples", "seed"]


def reference_method(cells: Sequence) -> str | None:
    """The first method standing for the paper's SAHN column, or None."""
    return next((c.method for c in cells if c.record.get("paper_name") == REFERENCE_PAPER_NAME), None)


def per_pair_scores(cells: Sequence) -> pd.DataFrame:
    """One method's per-image scores, indexed by pair_id, averaged over its seeds (cells)."""
    frames = [c.per_image() for c in cells]
    data = pd.concat(frames, ignore_index=True)
    data["pair_id"] = data["pair_id"].astype(str)
    columns = ["ratio"] + [m for m in PER_IMAGE_METRICS if m in data.columns]
    return data.groupby("pair_id", sort=True)[columns].mean()


def interval_rows(method: pd.DataFrame, reference: pd.DataFrame, bins: Sequence[str], *, num_samples: int,
                  seed: int, confidence: float) -> list[dict]:
    """Δ = method − reference and its interval for every shared metric and bin (pairs in both only)."""
    shared = method.index.intersection(reference.index)
    method, reference = method.loc[shared], reference.loc[shared]
    rows = []
    for metric in [m for m in PER_IMAGE_METRICS if m in method.columns and m in reference.columns]:
        valid = method[metric].notna() & reference[metric].notna()
        valid &= np.isfinite(method[metric]) & np.isfinite(reference[metric])
        for label in bins:
            selected = bin_members(reference["ratio"].to_numpy(), label) & valid.to_numpy()
            n = int(selected.sum())
            if n < 2:  # one pair has no spread to resample
                continue
            difference, low, high = paired_bootstrap(method[metric].to_numpy()[selected],
                                                     reference[metric].to_numpy()[selected],
                                                     num_samples=num_samples, seed=seed, confidence=confidence)
            excludes = bool(low > 0 or high < 0)
            higher_better = STYLE[metric].higher_is_better if metric in STYLE else True
            rows.append({"metric": metric, "bin": label, "n": n, "difference": difference, "low": low, "high": high,
                         "excludes_zero": excludes,
                         "method_better": bool(excludes and ((difference > 0) == higher_better)),
                         "confidence": confidence, "samples": num_samples, "seed": seed})
    return rows


def interval_frame(cells: Sequence, *, reference: str | None = None, bins: Sequence[str] = PAPER_BINS + NVIDIA_BINS,
                   num_samples: int = 2000, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """Every method's interval against ``reference`` (default: SAHN) per dataset, metric and bin."""
    usable = [c for c in cells if has_per_image(c)]
    rows = []
    for dataset in dict.fromkeys(c.dataset for c in usable):
        in_dataset = [c for c in usable if c.dataset == dataset]
        ref = reference or reference_method(in_dataset)
        if ref is None or not any(c.method == ref for c in in_dataset):
            continue
        ref_scores = per_pair_scores([c for c in in_dataset if c.method == ref])
        for method in dict.fromkeys(c.method for c in in_dataset if c.method != ref):
            scores = per_pair_scores([c for c in in_dataset if c.method == method])
            for row in interval_rows(scores, ref_scores, bins, num_samples=num_samples, seed=seed,
                                     confidence=confidence):
                rows.append({"dataset": dataset, "method": method, "reference": ref, **row})
    return pd.DataFrame(rows, columns=INTERVAL_COLUMNS)


# ------------------------------------------------------------------------------------------ rendering
def interval_text(row: pd.Series) -> str:
    """``+0.52 [+0.10, +0.93]†`` in display units (MAE ×10 as in the tables)."""
    style = STYLE.get(row["metric"])
    scale, digits = (style.scale, style.digits) if style else (1.0, 3)
    mark = "†" if row["excludes_zero"] else ""
    return (f"{row['difference'] * scale:+.{digits}f} [{row['low'] * scale:+.{digits}f}, "
            f"{row['high'] * scale:+.{digits}f}]{mark}")


def interval_table(frame: pd.DataFrame, paper_names: dict[str, str | None],
                   bins: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for one dataset: rows metric × bin (with N), one column per method."""
    methods = list(dict.fromkeys(frame["method"]))
    header = ["Metric", "Bin", "N"] + [method_header(m, paper_names.get(m)) for m in methods]
    rows = []
    for metric in [m for m in PER_IMAGE_METRICS if m in set(frame["metric"])]:
        for label in bins:
            part = frame[(frame["metric"] == metric) & (frame["bin"] == label)]
            if part.empty:
                continue
            cells = {r["method"]: interval_text(r) for _, r in part.iterrows()}
            title = STYLE[metric].header if metric in STYLE else metric
            rows.append([title, label, str(int(part["n"].max()))] + [cells.get(m, "–") for m in methods])
    return header, rows


def render_intervals(frame: pd.DataFrame, out: Path, stem: str, caption: str,
                     paper_names: dict[str, str | None] | None = None, bins: Sequence[str] | None = None) -> list[str]:
    """Markdown lines for one dataset's intervals; LaTeX to ``out/report/tables/<stem>.tex``."""

    bins = tuple(bins or dict.fromkeys(frame["bin"]))
    header, rows = interval_table(frame, paper_names or {}, bins)
    confidence = float(frame["confidence"].iloc[0])
    note = (f"Δ = method − {frame['reference'].iloc[0]} with its {confidence:.0%} paired-bootstrap interval "
            f"({int(frame['samples'].iloc[0])} resamples, seed {int(frame['seed'].iloc[0])}); † = the interval "
            "excludes 0. For ↑ metrics a positive Δ favours the method, for ↓ metrics a negative one. "
            "MAE in ×10⁻¹.")
    align = "llr" + "r" * (len(header) - 3)
    tex = write_text_atomic(latex_grid(header, rows, caption, f"tab:{stem}", align=align, notes=[note]),
                            Path(out) / "report" / "tables" / f"{stem}.tex")
    return [markdown_grid(header, rows, align=align), "", note, "",
            f"LaTeX: `{tex.relative_to(Path(out)).as_posix()}`", ""]


def section(cells: Sequence, out: Path, *, num_samples: int = 2000, seed: int = 0,
            confidence: float = 0.95) -> list[str]:
    """Intervals of every method against SAHN, per dataset (paper bins in the tables, all bins in
    ``out/report/intervals.csv``)."""
    out = Path(out)
    chosen = list(cells)
    lines = ["## Differences to SAHN with paired bootstrap intervals", ""]
    if not any(has_per_image(c) for c in chosen):
        return lines + ["Needs the per-image CSVs of a results folder (not available for cells read from MLflow).", ""]
    frame = interval_frame(chosen, num_samples=num_samples, seed=seed, confidence=confidence)
    if frame.empty:
        return lines + ["No dataset has a SAHN cell and another method scored on the same pairs.", ""]
    csv_path = out / "report" / "intervals.csv"
    write_csv_atomic(frame, csv_path)
    paper_names = {c.method: c.record.get("paper_name") for c in chosen}
    for dataset, part in frame.groupby("dataset", sort=False):
        lines += [f"### `{dataset}`", ""]
        lines += render_intervals(part, out, f"intervals_{dataset}", f"Differences to SAHN on {dataset}",
                                  paper_names, bins=[b for b in PAPER_BINS if b in set(part["bin"])])
    lines += [f"All bins: `{csv_path.relative_to(out).as_posix()}`", ""]
    return lines
