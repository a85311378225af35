"""Ray Tune search over SAHN's α and loss weights, scored on a validation split (never the test pairs).

    python -m pipelines.tune                                # default preset: sahn_tiny on `faces`, CPU, minutes
    python -m pipelines.tune --config paper --dataset paris:/data/paris_streetview
    python -m pipelines.tune --searcher grid --w-rec 1.0 --w-fm 0.3 --w-adv 0.1 --w-prior 0.5   # α grid only
    python -m pipelines.full_benchmark --config results-tune/best_config.yaml           # benchmark the winner

Searched: α of the semantic prior loss and the loss weights w1..w4 (``w_rec``, ``w_fm``, ``w_adv``,
``w_prior``; the paper uses 0.2–0.8 and 1.0, 0.3, 0.1, 0.5). Each option takes one value (fixed), a list
of values (``choice`` sampling), or ``low high`` (``uniform`` / ``loguniform`` sampling). Searchers:
``optuna`` (TPE, seeded), ``random`` (seeded) or ``grid`` (every combination of the value lists).

A trial trains the method in chunks of ``--steps-per-report`` steps; after each chunk it scores the
*validation* pairs, reports the metric with a checkpoint, and ASHA stops the weaker trials early. With
``--train-workers N`` (or ``--gpus-per-trial N``, N > 1) each chunk trains data-parallel in N Ray Train
workers, as a benchmark cell does (:mod:`bench.run.ray_train`), so a search can use a multi-GPU cluster. The
validation pairs are frozen once, before any trial runs, from the dataset's ``val`` split into
``<out>/val_manifest`` (the same manifest machinery as the test protocol, on other images); this
pipeline never lists, builds or reads a test split or a test manifest.

Output folder (``--out``):
  val_manifest/      the frozen validation pairs
  search/            Ray Tune's experiment (trial checkpoints, state for resuming)
  search.json        the options of the search and its MLflow parent run (a re-run must match them)
  trials.csv         one row per trial: its values, status, last step and validation metrics
  curves.csv         every report of every trial (step, validation metrics, mean losses of the chunk)
  best_config.yaml   the best trial as a benchmark config (``python -m pipelines.full_benchmark --config``)
  sensitivity.png/.pdf   the validation metric against α and each loss weight

MLflow: one parent run per search (its options as params; best value, tables and figure at the end),
one nested run per trial (sampled values as params, validation metrics and losses per reported step),
written from the driver only. Re-running the same command after an interruption (Ctrl-C, a killed
driver, a lost node) restores the search with ``Tuner.restore``: finished trials are kept, unfinished
ones continue from their last checkpoint, and they log into their existing MLflow runs (steps logged
before are not logged twice). A trial that crashes is retried from its last checkpoint up to
``--max-failures`` times.

This module is the entry point; the search's options, its trial, its MLflow runs and its results live in
:mod:`pipelines.search`.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd

from bench.cli import parse_config, run_main
from bench.run.evaluate import write_csv_atomic
from bench.files import atomic_write_bytes
from bench.metrics.table import metric as metric_row
from bench.methods import get_factory
from bench.run.tracking import RunContext, Tracker, resolve_uri
from pipelines.search.options import (BEST_CONFIG, COMPLETED, CURVES_CSV, EXPERIMENT_FOLDER, FAILED, SENSITIVITY,
                                      STOPPED_EARLY, TRIALS_CSV, TuneConfig, absolute_paths, check_config,
                                      param_space, trial_resource_config, trial_workers)
from pipelines.search.results import best_config_text, best_config_values, choose_best, is_unfinished, trial_tables
from pipelines.search.runs import TrialRuns, close_trial_runs, open_search, trial_run_params
from pipelines.search.trial import (build_validation_pairs, make_trainable, remove_worker_scratch, trial_dirname,
                                    trial_folder_name)

PRESETS = Path(__file__).parent / "presets" / "tune"


@contextlib.contextmanager
def snapshot_period(seconds: float) -> Iterator[None]:
    """Tune saves its state every ``TUNE_GLOBAL_CHECKPOINT_S`` (default ≥ 10 s); a killed driver loses
    what happened since, so a search asks for a shorter period."""
    saved = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S")
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = str(seconds)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TUNE_GLOBAL_CHECKPOINT_S", None)
        else:
            os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = saved


def make_tuner(config: TuneConfig, trainable: Any, experiment: Path, callback: Any) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if config.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=config.search_seed)
    else:  # random and grid: Tune's variant generator (grid_search domains are enumerated)
        searcher = BasicVariantGenerator(random_state=config.search_seed)
    scheduler = ASHAScheduler(time_attr="step", max_t=config.train.steps, grace_period=config.asha.grace_steps,
                              reduction_factor=config.asha.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=param_space(config.space, config.searcher),
        tune_config=tune.TuneConfig(metric=config.metric, mode=metric_row(config.metric).mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=config.num_samples,
                                    max_concurrent_trials=config.max_concurrent_trials,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=experiment.name, storage_path=str(experiment.parent),
                                  failure_config=tune.FailureConfig(max_failures=config.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  callbacks=[callback], verbose=config.verbose))


@dataclass
class SearchOutcome:
    out: Path
    best: pd.Series
    best_config: Path
    trials: pd.DataFrame
    parent_run_id: str
    resumed: bool


def run_search(config: TuneConfig) -> SearchOutcome:
    """The whole search for a parsed config (a Ray connection is made or reused)."""
    from ray import tune

    from bench.run.distributed import ray_cluster

    started = time.perf_counter()
    config = absolute_paths(config)
    check_config(config)
    get_factory(config.method)  # an unknown method fails before any work
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker.open(resolve_uri(config.tracking.mlflow_uri, out), config.tracking.experiment)
    context = RunContext.collect()
    # Ray's checks of a cell's request, for a trial's: a trial with workers also needs room for all of them.
    with ray_cluster(trial_resource_config(config.resources), log_to_driver=config.verbose > 0):
        manifest = build_validation_pairs(config, out)
        record, resumed = open_search(config, out, tracker, context)
        print(f"mlflow: experiment {tracker.experiment_name!r} in {tracker.uri}, parent run {record.parent_run_id}")
        print(f"validation: {len(manifest.pairs)} pairs from the val split of {config.dataset} in {manifest.out_dir}")
        experiment = out / EXPERIMENT_FOLDER
        trainable = make_trainable(config, manifest.out_dir)
        with tracker.closing_parent_on_failure():
            if tune.Tuner.can_restore(str(experiment)):
                print(f"resuming the search in {experiment}")
                tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
            else:
                logger = TrialRuns(tracker.uri, tracker.experiment_id, record.parent_run_id, trial_run_params(config),
                                   config.train.steps, context.git_commit)
                tuner = make_tuner(config, trainable, experiment, logger)
            with snapshot_period(config.snapshot_seconds):
                grid = tuner.fit()
            if is_unfinished(grid, config):
                raise KeyboardInterrupt
            if trial_workers(config.resources) > 1:  # trials ASHA stopped mid-chunk may have left their files
                for trial in experiment.glob(trial_folder_name("*")):
                    remove_worker_scratch(trial)
            trials, curves = trial_tables(grid, config)
            write_csv_atomic(trials, out / TRIALS_CSV)
            write_csv_atomic(curves, out / CURVES_CSV)
            close_trial_runs(tracker, record.parent_run_id, trials)
            best = choose_best(trials, config.metric)
            values = best_config_values(config, best)
            best_path = out / BEST_CONFIG
            text = best_config_text(config, best, values)
            atomic_write_bytes(best_path, text.encode())
            from reports.sensitivity import sensitivity_figure

            figures = sensitivity_figure(trials, config.metric, out / SENSITIVITY)
    wall = time.perf_counter() - started
    counts = trials["status"].value_counts()
    tracker.finish_benchmark(
        "FINISHED", tags={"sahn.best_trial": str(best["trial_id"])},
        metrics={f"best/{config.metric}": float(best[config.metric]), "wall_seconds": wall, "trials": len(trials),
                 **{f"trials_{status}": counts.get(status, 0) for status in (COMPLETED, STOPPED_EARLY, FAILED)}},
        artifacts=[(path, None) for path in (best_path, out / TRIALS_CSV, out / CURVES_CSV, *figures)])
    print(text, end="")
    print(f"best config written to {best_path}")
    print(f"trials: {out / TRIALS_CSV}   sensitivity figure: {figures[0] if figures else 'none'}")
    print(f"benchmark it: python -m pipelines.full_benchmark --config {best_path}")
    print(f"wall time: {wall:.1f}s")
    return SearchOutcome(out, best, best_path, trials, record.parent_run_id, resumed)


def main(argv: Sequence[str] | None = None) -> SearchOutcome:
    return run_search(parse_config(TuneConfig, argv, presets=PRESETS, default_preset="default",
                                   description=__doc__))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
