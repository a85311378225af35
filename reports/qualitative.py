"""Figures 6–8 of the paper: qualitative grids (original, masked, each method) per ratio bin and dataset.

The pairs shown are chosen by a fixed rule from the frozen manifest, never by looking at any method's
output: among the test pairs whose hole ratio lies in the figure's bin (and that every method scored, with
its composite saved), the ``per_dataset`` pairs whose ratio is closest to the middle of the bin, ties broken
by pair id. The same results therefore always give the same figure, and no method's good or bad cases are
picked. With ``save_images: sample`` every method saved the same seeded pairs (drawn from the manifest), so
the rule picks among those; with ``none`` there is no composite to show, and the section says so.

Panels: the original image, the masked input (holes white, the paper's ``I_broken``), then the scored
composite PNG of each method (``<cell>/images/<pair_id>.png``, written by the evaluation), SAHN last as
in the paper.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.errors import UserError  # noqa: E402
from bench.data.images import read_image  # noqa: E402
from bench.data.manifest import Manifest, load_manifest  # noqa: E402
from bench.data.masks import in_bin, parse_bin  # noqa: E402
from reports.figures import save_figure  # noqa: E402
from reports.tables import method_header  # noqa: E402

#: the paper's Figures 6, 7 and 8: breakage rates 0–20%, 20–40%, 40–60%
FIGURE_BINS = {6: "(0.0,0.2]", 7: "(0.2,0.4]", 8: "(0.4,0.6]"}
PANEL_INCHES = 1.6


# ------------------------------------------------------------------------------------------ results access
def cell_manifest(cell) -> Manifest | None:
    """The frozen manifest a cell was scored on: the ``manifest/`` folder beside or above the cell folder
    whose digest matches ``cell.json``; None for cells without a folder (read from MLflow) or when the
    manifest is gone."""
    folder = getattr(cell, "folder", None)
    if folder is None:
        return None
    return _manifest_near(str(Path(folder).resolve()), str(cell.record.get("manifest_digest")))


@functools.lru_cache(maxsize=64)
def _manifest_near(folder: str, digest: str) -> Manifest | None:
    # Cached: every section asks for the manifests of the same cells, and a digest hashes every pair.
    for parent in (Path(folder).parent, Path(folder).parent.parent):
        candidate = parent / "manifest"
        if (candidate / "manifest.json").is_file():
            try:
                manifest = load_manifest(candidate)
            except UserError:
                continue
            if manifest.digest() == digest:
                return manifest
    return None


def has_per_image(cell) -> bool:
    folder = getattr(cell, "folder", None)
    return folder is not None and (Path(folder) / "per_image.csv").is_file()


def saved_pairs(cell) -> set[str]:
    """The pair ids whose scored composite the cell saved (``output`` set in per_image.csv)."""
    rows = cell.per_image()
    if "output" not in rows:
        return set()
    outputs = rows["output"].fillna("").astype(str)
    return set(rows.loc[outputs != "", "pair_id"].astype(str))


def choose_pairs(ratios: pd.Series, label: str, count: int) -> list[str]:
    """The fixed rule: pair ids (the index of ``ratios``) in bin ``label`` closest to its middle, ties by id."""
    low, high = parse_bin(label)
    middle = (low + high) / 2
    inside = [(abs(float(r) - middle), str(pair_id)) for pair_id, r in ratios.items() if in_bin(float(r), label)]
    return [pair_id for _, pair_id in sorted(inside)[:count]]


def _first_seed_cells(cells: Sequence) -> dict[str, object]:
    """One cell per method (the lowest seed), in the order methods first appear."""
    chosen: dict[str, object] = {}
    for cell in sorted(cells, key=lambda c: c.record.get("seed", 0)):
        chosen.setdefault(cell.method, cell)
    order = list(dict.fromkeys(c.method for c in cells))
    return {method: chosen[method] for method in order}


# ------------------------------------------------------------------------------------------ panels
def masked_view(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The damaged input as the paper shows it: holes painted white."""
    out = image.copy()
    out[hole.astype(bool)] = 255
    return out


def _composite(cell, pair_id: str, shape: tuple[int, ...]) -> np.ndarray | str:
    path = Path(cell.folder) / "images" / f"{pair_id}.png"
    if not path.is_file():
        return "image not saved"
    image = read_image(path)
    return image if image.shape == shape else "other image size"


Panel = np.ndarray | str  # an image, or why there is none


def _row_panels(cells: dict[str, object], columns: list[str], manifest: Manifest, pair_id: str) -> list[Panel]:
    pair = next(p for p in manifest.pairs if p.pair_id == pair_id)
    original = read_image(manifest.image_path(pair), size=manifest.image_size, crop=manifest.crop)
    hole = manifest.read_mask(pair)
    methods = [cells[m] if m in cells else None for m in columns]
    return [original, masked_view(original, hole)] + [
        "not run" if cell is None else _composite(cell, pair_id, original.shape) for cell in methods]


# ------------------------------------------------------------------------------------------ the figure
def _figure_rows(cells: Sequence, label: str, per_dataset: int) -> tuple[list[str], list[tuple[str, list]], list[str]]:
    """(column titles, [(row label, panels)], notes) for one bin: one column per method of any dataset."""
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    paper_names = {c.method: c.record.get("paper_name") for c in cells}
    methods = sorted(dict.fromkeys(c.method for c in cells), key=lambda m: paper_names[m] == "SAHN")  # ours last
    titles = ["original", "masked"] + [method_header(m, paper_names[m]) for m in methods]
    rows: list[tuple[str, list]] = []
    notes: list[str] = []
    for dataset in datasets:
        chosen = _first_seed_cells([c for c in cells if c.dataset == dataset])
        manifest = cell_manifest(next(iter(chosen.values())))
        if manifest is None:
            notes.append(f"`{dataset}`: the frozen manifest was not found beside the cells; no grid")
            continue
        common = set.intersection(*[set(c.per_image()["pair_id"].astype(str)) for c in chosen.values()])
        shown = common & set.intersection(*[saved_pairs(c) for c in chosen.values()])
        if not shown:
            notes.append(f"`{dataset}`: no pair has a saved composite of every method (save_images: none, or "
                         "methods run with different save_images); no grid")
            continue
        ratios = pd.Series({p.pair_id: p.ratio for p in manifest.pairs if p.pair_id in shown}, dtype=float)
        for pair_id in choose_pairs(ratios, label, per_dataset):
            row_label = f"{dataset}\n{pair_id}\nhole {float(ratios[pair_id]):.0%}"
            rows.append((row_label, _row_panels(chosen, methods, manifest, pair_id)))
    return titles, rows, notes


def _draw(titles: list[str], rows: list[tuple[str, list]], title: str, path: Path) -> list[Path]:
    columns = len(titles)
    figure, axes = plt.subplots(len(rows), columns, figsize=(PANEL_INCHES * columns, PANEL_INCHES * len(rows) + 0.5),
                                squeeze=False)
    for r, (row_label, panels) in enumerate(rows):
        for c, panel in enumerate(panels):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if isinstance(panel, str):
                axis.text(0.5, 0.5, panel, ha="center", va="center", fontsize=7)
            else:
                axis.imshow(panel, interpolation="nearest")
            if r == 0:
                axis.set_title(titles[c], fontsize=8)
            if c == 0:
                axis.set_ylabel(row_label, fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path, dpi=150)


def qualitative_grids(cells: Sequence, figures_dir: Path,
                      per_dataset: int = 1) -> tuple[list[tuple[int, str, Path]], list[str]]:
    """Write one grid per paper figure bin; returns ([(figure number, bin, PNG path)], notes)."""
    usable = [c for c in cells if has_per_image(c)]
    written, notes = [], []
    for number, label in FIGURE_BINS.items():
        titles, rows, row_notes = _figure_rows(usable, label, per_dataset)
        notes += [n for n in row_notes if n not in notes]
        if not rows:
            notes.append(f"Figure {number} {label}: no test pair in this bin")
            continue
        paths = _draw(titles, rows, f"Figure {number} style: hole ratio {label}",
                      figures_dir / f"qualitative_fig{number}")
        written.append((number, label, paths[0]))
    return written, notes


def section(cells: Sequence, out: Path, per_dataset: int = 1) -> list[str]:
    """Markdown lines for the report; the grids go to ``out/report/figures/qualitative_fig{6,7,8}.{png,pdf}``."""
    out = Path(out)
    lines = ["## Qualitative comparison (Figures 6–8 style)", ""]
    if not any(has_per_image(c) for c in cells):
        return lines + ["Needs the per-image results and composites of a results folder (not available for "
                        "cells read from MLflow).", ""]
    written, notes = qualitative_grids(cells, out / "report" / "figures", per_dataset)
    lines += ["Columns: the original, the masked input (holes white), then each method's scored composite. "
              f"Pairs chosen by a fixed rule from the frozen manifest: per dataset, the {per_dataset} pair(s) "
              "whose hole ratio is closest to the middle of the bin (ties by pair id) — never by any method's "
              "score.", ""]
    for number, label, png in written:
        lines += [f"![Figure {number} style, hole ratio {label}]({png.relative_to(out).as_posix()})", ""]
    lines += [f"- {note}" for note in notes]
    return lines + ([""] if notes else [])
