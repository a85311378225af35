"""Read benchmark results from an output folder (never from models): one record per finished cell."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.errors import UserError


@dataclass
class CellResult:
    record: dict  # cell.json
    folder: Path

    @property
    def method(self) -> str:
        return self.record["method"]

    @property
    def dataset(self) -> str:
        return self.record["dataset"]

    def summary(self) -> pd.DataFrame:
        return pd.read_csv(self.folder / "summary.csv")

    def per_image(self) -> pd.DataFrame:
        return pd.read_csv(self.folder / "per_image.csv")

    def losses(self) -> pd.DataFrame | None:
        path = self.folder / "losses.csv"
        return pd.read_csv(path) if path.exists() else None


def find_cells(out: str | Path) -> list[CellResult]:
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out}: no such results folder")
    # Only benchmark cells (never copies under MLflow's artifact store or elsewhere).
    cells = [CellResult(json.loads(p.read_text()), p.parent) for p in sorted(out.rglob("cell.json"))
             if "mlartifacts" not in p.relative_to(out).parts]
    if not cells:
        raise UserError(f"{out}: no finished cells (cell.json) found — run python -m pipelines.full_benchmark first")
    return cells


def weights_label(record: dict) -> str | None:
    """Where a column's weights come from: "published weights", "fine-tuned N steps from published
    weights", "trained here, N steps", or None for a method with nothing to train."""
    weights, train = record.get("weights"), record.get("train")
    if weights:
        steps = weights.get("finetune_steps")
        return f"fine-tuned {steps} steps from published weights" if steps else "published weights"
    if train:
        return f"trained here, {train['steps']} steps"
    return None


def combined_summary(cells: list[CellResult]) -> pd.DataFrame:
    """metric × bin rows of every cell, averaged over seeds: columns dataset, method, paper_name, weights,
    bin, metric, value, n."""
    frames = []
    for cell in cells:
        frame = cell.summary()
        frame["dataset"], frame["method"] = cell.dataset, cell.method
        frame["paper_name"], frame["seed"] = cell.record.get("paper_name"), cell.record["seed"]
        frame["weights"] = weights_label(cell.record)
        frames.append(frame)
    data = pd.concat(frames, ignore_index=True)
    keys = ["dataset", "method", "bin", "metric"]
    grouped = data.groupby(keys, sort=False, dropna=False)
    merged = grouped.agg(value=("value", "mean"), n=("n", "first"), seeds=("seed", "nunique"),
                         paper_name=("paper_name", "first"), weights=("weights", "first")).reset_index()
    return merged
