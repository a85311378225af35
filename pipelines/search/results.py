"""What a finished search yields: its trials and curves as tables, the best trial and its benchmark config."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from bench.config import to_dict
from bench.errors import UserError
from bench.metrics.table import metric as metric_row
from pipelines.search.options import (COMPLETED, FAILED, PROGRESS, SEARCHED, STOPPED_EARLY, VALIDATION_METRICS,
                                      TuneConfig, expected_trials)


def trial_tables(grid: Any, config: TuneConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per trial, one row per report) from Tune's results and each trial's last checkpoint."""
    rows, curves = [], []
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_")
        curve = []
        if result.checkpoint is not None:
            curve = json.loads((Path(result.checkpoint.path) / PROGRESS).read_text())["curve"]
        last = curve[-1] if curve else {}
        step = int(last.get("step", 0))
        status = FAILED if result.error else COMPLETED if step >= config.train.steps else STOPPED_EARLY
        params = {name: result.config.get(name) for name in SEARCHED}
        rows.append({"trial_id": trial_id, "status": status, "step": step, **params,
                     **{name: last.get(name, float("nan")) for name in VALIDATION_METRICS},
                     "restored_from_step": (result.metrics or {}).get("restored_from_step", 0),
                     "error": error_line(str(result.error)) if result.error else ""})
        for report in curve:
            losses = {key: value for key, value in report.items() if key.startswith("loss_")}
            curves.append({"trial_id": trial_id, **params, "step": report["step"],
                           **{name: report.get(name) for name in VALIDATION_METRICS}, **losses})
    return pd.DataFrame(rows), pd.DataFrame(curves)


def choose_best(trials: pd.DataFrame, metric: str) -> pd.Series:
    """The best trial by its last validation value; trials that ran every step come before those
    stopped early (an early value is not comparable with a fully trained one)."""
    scored = trials[(trials["status"] != FAILED) & trials[metric].notna()]
    if scored.empty:
        errors = "; ".join(sorted(set(trials["error"]) - {""})) or "no trial reported a value"
        raise UserError(f"no trial finished with a validation {metric}: {errors}")
    completed = scored[scored["status"] == COMPLETED]
    pool = completed if not completed.empty else scored
    ascending = not metric_row(metric).higher_is_better
    return pool.sort_values(metric, ascending=ascending, kind="stable").iloc[0]


def best_config_values(config: TuneConfig, best: pd.Series) -> dict[str, Any]:
    """The best trial as a ``pipelines.full_benchmark`` config: its method with the found options."""
    found = {name: float(best[name]) for name in SEARCHED}
    train = {key: value for key, value in to_dict(config.train).items() if key not in ("checkpoint_every", "log_every")}
    return {"out": f"{config.out}-best", "methods": [config.method],
            "data": {"datasets": [config.dataset], "image_size": config.image_size, "train_limit": config.train_limit},
            "train": train, "resources": {"device": config.resources.device},
            "method_options": {config.method: {**config.method_options, **found}}}


def best_config_text(config: TuneConfig, best: pd.Series, values: dict[str, Any]) -> str:
    import yaml

    header = (f"# Best trial of the search in {config.out}: {best['trial_id']}, validation {config.metric} "
              f"{best[config.metric]:.4f} after {int(best['step'])} steps ({best['status']}).\n"
              f"# Validation pairs: the val split of {config.dataset}; the test pairs were not used.\n"
              f"# Run it: python -m pipelines.full_benchmark --config <this file>\n")
    return header + yaml.safe_dump(values, sort_keys=False, default_flow_style=None)


def is_unfinished(grid: Any, config: TuneConfig) -> bool:
    """True when Tune returned before every trial ended (Ctrl-C: its state is saved for resuming)."""
    return len(grid) < expected_trials(config) or grid.num_terminated + grid.num_errors < len(grid)


def error_line(text: str) -> str:
    """What an error's text says went wrong: its last line (a traceback's), at most 500 characters."""
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""
