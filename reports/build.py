"""Rebuild the report from tracked results, without re-running any model.

    python -m reports.build --from results            # an output folder of python -m pipelines.full_benchmark
    python -m reports.build --from sahn-bench --mlflow-uri sqlite:////abs/results/mlflow.db --out report-mlflow
                                                      # an MLflow experiment (values from metrics, curves
                                                      # from metric histories)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from bench.errors import UserError
from bench.files import atomic_write_text
from bench.data.masks import RATIO_BINS, bin_label
from reports import efficiency_table, intervals, paper_compare, qualitative
from reports.figures import loss_curves
from reports.results import CellResult, combined_summary, find_cells
from reports.tables import PAPER_BINS, dataset_table, to_latex, to_markdown

SIX_BINS = tuple(bin_label(lo, hi) for lo, hi in RATIO_BINS) + ("All",)


def _sensitivity_section(out: Path) -> list[str]:
    """The Ray Tune search's sensitivity figure, from ``<out>-tune/trials.csv`` (python -m pipelines.tune)."""
    from reports.sensitivity import sensitivity_figure

    trials = out.parent / f"{out.name}-tune" / "trials.csv"
    lines = ["## Sensitivity to α and the loss weights (Ray Tune)", ""]
    if not trials.is_file():
        return lines + ["No search results: run `python -m pipelines.tune` (its folder `<results>-tune` is read).", ""]
    metric = _searched_metric(trials.parent)
    figures = sensitivity_figure(pd.read_csv(trials), metric, out / "report" / "figures" / "sensitivity")
    lines += [f"Validation {metric.upper()} of every trial of the search in `{trials.parent.name}` (validation split, never "
              "the test pairs); hollow markers: trials stopped early by ASHA.", ""]
    return lines + [f"![Sensitivity]({figures[0].relative_to(out).as_posix()})", ""] if figures else lines


def _searched_metric(search_folder: Path) -> str:
    """The validation metric the search optimised, from its ``search.json`` (PSNR for older searches)."""
    record = search_folder / "search.json"
    if not record.is_file():
        return "psnr"
    return json.loads(record.read_text()).get("identity", {}).get("metric", "psnr")


def _provenance_section(cells: list[CellResult]) -> list[str]:
    lines = ["## Networks behind the numbers", ""]
    networks: dict[str, str] = {}
    for cell in cells:
        networks.update(cell.record.get("metric_networks", {}))
    if networks:
        lines += ["| Metric network | Weights (sha256) or why unavailable |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(networks.items())]
    backends = sorted({c.record.get("pixel_metrics", "eager") for c in cells})  # records before it: eager
    lines += ["", f"Pixel-metric backend (PSNR, SSIM, MAE): {'; '.join(backends)}. The compiled and eager backends "
              "give equal PSNR and MAE, and SSIM within 1e-5 of each other."]
    published = sorted({(c.dataset, c.method, json.dumps(c.record["weights"], sort_keys=True))
                        for c in cells if c.record.get("weights")})
    if published:
        lines += ["", "Published checkpoints loaded (column marks: *published weights* = evaluated as released):", "",
                  "| Dataset | Method | Checkpoint | sha256 | Format | Release | Use |", "|---|---|---|---|---|---|---|"]
        for dataset, method, text in published:
            weights = json.loads(text)
            use = weights["use"] + (f", {weights['finetune_steps']} steps" if weights.get("finetune_steps") else "")
            lines.append(f"| {dataset} | {method} | `{Path(weights['path']).name}` | `{weights['sha256'][:16]}…` | "
                         f"{weights['format']} | {weights['release']} | {use} |")
    substitutions = {(c.method, role): what for c in cells for role, what in c.record.get("substitutions", {}).items()}
    if substitutions:
        lines += ["", "Substitute networks used by methods (the paper's network could not be had):", ""]
        lines += [f"- `{method}` {role}: {what}" for (method, role), what in sorted(substitutions.items())]
    return lines + [""]


def build_report(out: str | Path) -> Path:
    """Write ``report.md`` plus ``report/`` (LaTeX tables, loss-curve figures) into ``out``, from the
    cell folders (``cell.json``, ``summary.csv``, ``losses.csv``) under ``out``."""
    return write_report(find_cells(out), Path(out))


def build_report_from_mlflow(uri: str, experiment: str, out: str | Path) -> Path:
    """The same report from an MLflow experiment: the newest finished run of each cell."""
    from bench.run.tracking import load_cells

    cells = load_cells(uri, experiment)  # a missing experiment is refused before any folder is made
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return write_report(cells, out)


def write_report(cells: Sequence[CellResult], out: Path) -> Path:
    """Render ``cells`` (anything with ``record``, ``method``, ``dataset``, ``summary()``, ``losses()``)."""
    summary = combined_summary(cells)
    report_dir = out / "report"
    (report_dir / "tables").mkdir(parents=True, exist_ok=True)
    protocols = sorted({c.record.get("protocol", "?") for c in cells})
    lines = ["# sahn-bench report", "",
             f"{len(cells)} finished cells; protocol {', '.join(protocols)}. Scores are on the rounded uint8 "
             "composite `pred*m + gt*(1-m)`; bins are hole ratios (a, b]; N = scored pairs per bin. "
             "Bold = best in the row.", ""]
    for dataset, part in summary.groupby("dataset", sort=False):
        notes = {c.record.get("dataset_entry", dataset) for c in cells if c.dataset == dataset}
        lines += [f"## {dataset}", ""]
        if dataset in ("faces", "scenes", "facades"):
            lines += [f"Embedded `{dataset}` suite built from images shipped in pip packages — a stand-in, "
                      "not one of the paper's datasets.", ""]
        table = dataset_table(part, PAPER_BINS)
        lines += [to_markdown(table), ""]
        tex = report_dir / "tables" / f"{dataset}.tex"
        tex.write_text(to_latex(table, f"Inpainting results on {dataset} ({', '.join(sorted(notes))})",
                                f"tab:{dataset}"))
        full = dataset_table(part, SIX_BINS)
        (report_dir / "tables" / f"{dataset}_all_bins.tex").write_text(
            to_latex(full, f"All ratio bins on {dataset}", f"tab:{dataset}-bins"))
        lines += ["<details><summary>All six NVIDIA ratio bins</summary>", "", to_markdown(full), "", "</details>", ""]
        histories = {c.method: c.losses() for c in cells if c.dataset == dataset}
        figures = loss_curves(histories, f"Training losses on {dataset}", report_dir / "figures" / f"losses_{dataset}")
        if figures:
            lines += [f"![Training losses on {dataset}]({figures[0].relative_to(out).as_posix()})", ""]
        lines += [f"LaTeX: `{tex.relative_to(out).as_posix()}`", ""]
    lines += paper_compare.section(cells, out)
    lines += paper_compare.table4_section(cells, out)
    lines += intervals.section(cells, out)
    lines += qualitative.section(cells, out)
    lines += efficiency_table.section(out)
    lines += _sensitivity_section(out)
    lines += _provenance_section(cells)
    report = atomic_write_text(out / "report.md", "\n".join(lines))
    summary.to_csv(report_dir / "summary_all.csv", index=False)
    return report


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", default="results",
                        help="results folder to read, or the name of an MLflow experiment (with --mlflow-uri or "
                             "MLFLOW_TRACKING_URI) (default: results)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="tracking store holding the experiment named by --from, e.g. "
                             "sqlite:////abs/results/mlflow.db or http://127.0.0.1:5000 (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--out", default=None,
                        help="where to write report.md and report/ (default: the --from folder; for an MLflow "
                             "experiment ./report-<experiment>)")
    args = parser.parse_args(argv)
    uri = args.mlflow_uri or (None if Path(args.source).is_dir() else os.environ.get("MLFLOW_TRACKING_URI"))
    if uri:
        report = build_report_from_mlflow(uri, args.source, args.out or f"report-{args.source}")
    elif Path(args.source).is_dir():
        report = build_report(args.source) if args.out is None else write_report(find_cells(args.source), _made(args.out))
    else:
        raise UserError(f"--from {args.source}: no such results folder; to read an MLflow experiment of that name "
                        "pass --mlflow-uri (e.g. sqlite:////abs/results/mlflow.db)")
    print(f"report: {report}")
    print(f"tables: {report.parent / 'report' / 'tables'}   figures: {report.parent / 'report' / 'figures'}")
    return report


def _made(folder: str) -> Path:
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    from bench.cli import run_main

    run_main(lambda: main(sys.argv[1:]))
