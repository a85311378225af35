"""A search in MLflow: its parent run (through :class:`bench.run.tracking.Tracker`, as a benchmark's) and one nested
run per trial, logged from the driver by a Ray Tune callback that survives a restored search."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from ray.tune import Callback

from bench.run.cell import parse_dataset
from bench.config import to_dict
from bench.errors import UserError
from bench.data.manifest import first_difference
from bench.run.tracking import (GIT_COMMIT_TAG, OUT_TAG, PARENT_TAG, ROLE_TAG, RunContext, Tracker, config_params,
                            safe_name, search_runs)
from pipelines.search.options import (FAILED, SEARCH_RECORD, STOPPED_EARLY, VALIDATION_METRICS,
                                      TuneConfig, identity_digest, search_identity)
from pipelines.search.results import error_line
from pipelines.search.trial import write_json

SEARCH_ROLE = "search"  # ROLE_TAG of the parent run
TRIAL_ROLE = "trial"  # ROLE_TAG of a trial's nested run
TRIAL_ID_TAG = "sahn.trial_id"
SEARCH_KEY_TAG = "sahn.search_key"  # the search's identity digest
ERROR_TAG = "sahn.error"
STOPPED_EARLY_TAG = "sahn.stopped_early"
DATA_TAG_PREFIX = "sahn.data."  # what a trial trained and scored on (reported by the trial itself)


class TrialRuns(Callback):
    """Tune callback, in the driver: one MLflow run per trial, nested under the search's parent run.

    Runs are found by the trial id tag, so a restored search logs into the runs it created before, and
    a step that was logged before (re-run after resuming from an older checkpoint) is not logged again.
    Tune pickles this object with the experiment: only plain values are kept across pickling."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, run_params: dict[str, str],
                 total_steps: int, git_commit: str):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.run_params, self.total_steps, self.git_commit = run_params, total_steps, git_commit
        self._client: Any = None
        self._runs: dict[str, tuple[str, int]] = {}  # trial id → (run id, last logged step)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def run_of(self, trial: Any) -> tuple[str, int]:
        """The trial's run (created on first use) and the last step logged to it."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        query = f"tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'"
        found = list(search_runs(self.client, self.experiment_id, query))
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, "step")
            last = int(max((m.value for m in history), default=0))
        else:
            tags = {PARENT_TAG: self.parent_run_id, ROLE_TAG: TRIAL_ROLE, TRIAL_ID_TAG: trial.trial_id,
                    GIT_COMMIT_TAG: self.git_commit, "sahn.trial_path": str(trial.path)}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"trial {trial.trial_id}")
            run_id = run.info.run_id
            params = {**self.run_params, **{safe_name(k): json.dumps(v) for k, v in trial.config.items()}}
            from mlflow.entities import Param

            self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            last = 0
        self._runs[trial.trial_id] = (run_id, last)
        return run_id, last

    # Tune's hooks. A tracking failure (a server gone away) is a warning, not the end of the search: the
    # trials' results stay in the Tune experiment and in trials.csv / curves.csv.
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._safely(self.log_result, trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safely(self.finish, trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safely(self.finish, trial, "FAILED")

    def _safely(self, log: Callable[..., None], *args: Any) -> None:
        try:
            log(*args)
        except Exception as exc:  # noqa: BLE001 - any tracking failure
            print(f"warning: MLflow logging of trial {args[0].trial_id} failed ({type(exc).__name__}: "
                  f"{error_line(str(exc))})", file=sys.stderr)

    def log_result(self, trial: Any, result: dict) -> None:
        """The validation metrics and mean losses of one report, at its training step (once per step)."""
        from mlflow.entities import Metric

        run_id, last = self.run_of(trial)
        step = int(result["step"])
        if step <= last:
            return
        now = int(time.time() * 1000)
        metrics = [Metric("step", float(step), now, step)]
        metrics += [Metric(f"val/{name}", float(result[name]), now, step) for name in VALIDATION_METRICS
                    if name in result]
        metrics += [Metric(f"loss/{safe_name(key[len('loss_'):])}", float(value), now, step)
                    for key, value in result.items() if key.startswith("loss_")]
        self.client.log_batch(run_id, metrics=metrics)
        if last == 0:
            for key, value in result.items():
                if key.startswith("data_"):
                    self.client.set_tag(run_id, DATA_TAG_PREFIX + key[len("data_"):], str(value))
        self._runs[trial.trial_id] = (run_id, step)

    def finish(self, trial: Any, status: str) -> None:
        run_id, last = self.run_of(trial)
        if status == "FAILED":
            self.client.set_tag(run_id, ERROR_TAG, error_line(getattr(trial, "error_msg", None) or "failed"))
        else:
            self.client.set_tag(run_id, STOPPED_EARLY_TAG, str(last < self.total_steps).lower())
        self.client.set_terminated(run_id, status)


# ------------------------------------------------------------------------------------------ search state
@dataclass
class SearchRecord:
    parent_run_id: str
    identity: dict[str, Any]


def open_search(config: TuneConfig, out: Path, tracker: Tracker, context: RunContext) -> tuple[SearchRecord, bool]:
    """This search's record and parent run: reused when ``out`` holds the same search (resuming), created
    otherwise. Returns (record, resumed)."""
    identity = search_identity(config)
    path = out / SEARCH_RECORD
    if path.exists():
        stored = json.loads(path.read_text())
        difference = first_difference(stored["identity"], identity)
        if difference:
            key, old, new = difference
            raise UserError(f"{out} holds a search with other options ({key} is {old!r} there, {new!r} now): re-run "
                            f"with the same options to resume it, or use another --out")
        try:
            tracker.resume_parent(stored["parent_run_id"])
        except Exception as exc:  # noqa: BLE001 - deleted run or another store: say which
            raise UserError(f"{path}: its MLflow parent run {stored['parent_run_id']} is not in {tracker.uri} "
                            f"({type(exc).__name__}); use the --mlflow-uri of the first run, or another --out") from exc
        return SearchRecord(stored["parent_run_id"], identity), True
    run_name = f"search {config.method} {parse_dataset(config.dataset).label} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    run_id = tracker.start_parent(to_dict(config), role=SEARCH_ROLE, source="pipelines.tune", run_name=run_name,
                                  tags={OUT_TAG: str(out), SEARCH_KEY_TAG: identity_digest(identity)}, context=context)
    write_json(path, {"parent_run_id": run_id, "identity": identity})
    return SearchRecord(run_id, identity), False


def trial_run_params(config: TuneConfig) -> dict[str, str]:
    """What every trial of the search shares, as params of its run (the sampled values are added)."""
    shared = {"method": config.method, "dataset": config.dataset, "image_size": config.image_size,
              "metric": config.metric, "method_options": config.method_options, "train": to_dict(config.train),
              "val": to_dict(config.val)}
    return {f"search.{key}": value for key, value in config_params(shared).items()}


def close_trial_runs(tracker: Tracker, parent_run_id: str, trials: pd.DataFrame) -> None:
    """Give every trial run its final status (a driver killed between a trial's end and its callback
    leaves the run RUNNING)."""
    statuses = dict(zip(trials["trial_id"], trials["status"]))
    for run in search_runs(tracker.client, tracker.experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}'"):
        status = statuses.get(run.data.tags.get(TRIAL_ID_TAG))
        if status is None or run.info.status != "RUNNING":
            continue
        tracker.client.set_tag(run.info.run_id, STOPPED_EARLY_TAG, str(status == STOPPED_EARLY).lower())
        tracker.client.set_terminated(run.info.run_id, "FAILED" if status == FAILED else "FINISHED")
