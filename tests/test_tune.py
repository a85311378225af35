"""Ray Tune search over SAHN's α and loss weights, on a local 2-CPU cluster: two-trial searches of sahn_tiny
at 32², trials as nested MLflow runs, a killed driver resumed with the same command, the test split
and test manifest never read, and a trial trained by two Ray Train workers (gloo) like one process."""
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

from bench.cli import parse_config
from bench.config import BenchmarkConfig, TrackingConfig, TrainConfig, to_dict
from bench.data.datasets import load_image_set
from bench.errors import UserError
from bench.data.images import write_png
from bench.data.manifest import MaskProtocol, build_manifest
from bench.methods import create_method, register_method, variant
from bench.run.resources import worker_resources
from bench.run.tracking import PARENT_TAG, ROLE_TAG
from pipelines import full_benchmark
from pipelines.search.options import (COMPLETED, FAILED, STOPPED_EARLY, AshaConfig, SearchSpace, TrialResources,
                                      TuneConfig, ValidationConfig, check_config, expected_trials, param_space,
                                      search_identity, trial_request, trial_resource_config)
from pipelines.search.results import choose_best
from pipelines.search.trial import chunk_losses
from pipelines.tune import PRESETS, run_search
from reports.sensitivity import sensitivity_figure
from tiny_methods import empty_mlflow_store, ensure_local_ray, wait_for

pytestmark = pytest.mark.timeout(420)

TESTS = Path(__file__).parent
EXPERIMENT = "tune-test"
ALPHAS = [0.2, 0.8]
PAPER_WEIGHTS = {"w_rec": [1.0], "w_fm": [0.3], "w_adv": [0.1], "w_prior": [0.5]}
PAUSED_TRIALS = 2  # both trials park at their first step after the first report


# ------------------------------------------------------------------------------------ a method that fails on cue
@variant(scale="ablation", paper_name="SAHN")  # "ablation": created by name only, never by a preset
def sahn_tiny_faulty(pause_folder: str | None = None, crash_folder: str | None = None, **overrides):
    """sahn_tiny that, in the kill test, (1) parks the first process of each trial before its third
    training step (after the step-2 report and checkpoint) until the test kills the driver, then
    (2) once both trials were parked, kills the first process that trains again (a crashed worker)."""
    method = create_method("sahn_tiny", **overrides)
    step = method.train_step
    calls = [0]

    def train_step(batch):
        calls[0] += 1
        parked = len(list(Path(pause_folder).glob("*.json"))) if pause_folder else PAUSED_TRIALS
        if pause_folder and calls[0] == 3 and parked < PAUSED_TRIALS:
            (Path(pause_folder) / f"{os.getpid()}.json").write_text(json.dumps({"pid": os.getpid()}))
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # until the test kills the driver (and with it this trial)
                time.sleep(0.2)
        if crash_folder and parked >= PAUSED_TRIALS:
            try:
                with open(Path(crash_folder) / "crashed", "x") as marker:  # exactly one process crashes
                    marker.write(str(os.getpid()))
            except FileExistsError:
                pass
            else:
                os._exit(1)  # what a segfault or an OOM kill looks like to Ray
        return step(batch)

    method.train_step = train_step
    return method


def drive(config_file: str) -> None:
    """The search driver of the kill test, run in a subprocess: ``python -m pipelines.tune --config FILE``
    with the parking method registered."""
    from bench.cli import run_main
    from pipelines.tune import main

    register_method("sahn_tiny_faulty", sahn_tiny_faulty)
    run_main(lambda: main(["--config", config_file]))


# ------------------------------------------------------------------------------------ data and configs
def write_split_dataset(root: Path, size: int = 32) -> Path:
    """A ``folder:`` dataset with train/, val/ and test/ subfolders of blocky random images."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            blocks = np.kron(rng.random((4, 4, 3)), np.ones((size // 4, size // 4, 1)))
            image = (255 * (0.7 * blocks + 0.3 * rng.random((size, size, 3)))).round().astype(np.uint8)
            write_png(root / split / f"{split}_{index:02d}.png", image)
    return root


def search_config(out: Path, dataset: Path, **changes) -> TuneConfig:
    """Two trials of sahn_tiny at 32² (α ∈ {0.2, 0.8}, the paper's weights), 4 steps in two reports."""
    config = TuneConfig(
        out=str(out), method="sahn_tiny", dataset=f"folder:{dataset}", image_size=32, searcher="optuna",
        search_seed=0, num_samples=2, max_concurrent_trials=2, max_failures=1, snapshot_seconds=0.2, verbose=0,
        space=SearchSpace(alpha=list(ALPHAS), **{k: list(v) for k, v in PAPER_WEIGHTS.items()}),
        val=ValidationConfig(bins=["(0.1,0.2]", "(0.3,0.4]"], batch_size=8),
        asha=AshaConfig(steps_per_report=2, grace_steps=4, reduction_factor=2),
        train=TrainConfig(steps=4, batch_size=2, seed=0),
        resources=TrialResources(device="cpu", cpus_per_trial=1.0),
        tracking=TrackingConfig(experiment=EXPERIMENT))
    return replace(config, **changes)


def with_store(out: Path, template: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "mlflow.db").write_bytes(template.read_bytes())


def freeze_test_pairs(dataset: Path, out: Path) -> list[Path]:
    """The test manifest a benchmark of this dataset would build in ``out``; returns every file a reader of
    the test split or of that manifest would open."""
    test_set = load_image_set("folder", "test", root=dataset, image_size=32)
    manifest_dir = out / "folder-data" / "manifest"
    build_manifest(test_set, MaskProtocol(bins=("(0.1,0.2]",)), manifest_dir)
    return sorted(p for p in [*Path(dataset, "test").rglob("*"), *manifest_dir.rglob("*")] if p.is_file())


def backdate_access_times(paths: list[Path]) -> dict[Path, int]:
    """Access time an hour before modification: on relatime mounts the next read of a file updates it."""
    times = {}
    for path in paths:
        stat = path.stat()
        os.utime(path, ns=(stat.st_mtime_ns - 3600 * 10**9, stat.st_mtime_ns))
        times[path] = path.stat().st_atime_ns
    return times


def mlflow_runs(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    return client, client.search_runs([experiment])


def curve_rows(curves: pd.DataFrame) -> list[tuple]:
    """Every report as (α, step, metrics, total loss), in a trial-order-free order."""
    columns = ["alpha", "step", "psnr", "ssim", "mae", "loss_total"]
    return sorted(tuple(row) for row in curves[columns].itertuples(index=False))


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def store_template(tmp_path_factory):
    return empty_mlflow_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_split_dataset(tmp_path_factory.mktemp("data") / "data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset, store_template):
    """One uninterrupted two-trial search, with a benchmark's test manifest beside it whose files (and the
    test images) have back-dated access times."""
    ensure_local_ray()
    out = tmp_path_factory.mktemp("reference") / "out"
    with_store(out, store_template)
    test_files = freeze_test_pairs(dataset, out)
    access_times = backdate_access_times(test_files)
    outcome = run_search(search_config(out, dataset))
    return {"out": out, "outcome": outcome, "access_times": access_times}


# ------------------------------------------------------------------------------------ pure checks
def test_search_space_domains_and_their_errors():
    from ray.tune.search.sample import Categorical, Float

    space = SearchSpace(alpha=[0.2, 0.4], w_rec=[0.5, 2.0], w_fm=[0.3], w_adv=[0.1], w_prior=[0.5])
    domains = param_space(space, "optuna")
    assert isinstance(domains["alpha"], Categorical) and domains["alpha"].categories == [0.2, 0.4]
    assert isinstance(domains["w_rec"], Float) and (domains["w_rec"].lower, domains["w_rec"].upper) == (0.5, 2.0)
    assert domains["w_fm"] == 0.3  # one value: fixed
    grid = param_space(replace(space, w_rec=[1.0]), "grid")
    assert grid["alpha"] == {"grid_search": [0.2, 0.4]}
    two_by_two = replace(space, w_rec=[1.0, 2.0], weight_sampling="choice")
    config = TuneConfig(searcher="grid", num_samples=3, space=two_by_two)
    assert expected_trials(config) == 3 * 2 * 2  # repetitions × α values × w_rec values
    with pytest.raises(UserError, match="--w-rec.*grid"):
        param_space(space, "grid")  # a range cannot be enumerated
    with pytest.raises(UserError, match="--w-rec.*low > 0"):
        param_space(replace(space, w_rec=[0.0, 1.0]), "optuna")
    with pytest.raises(UserError, match="--w-rec.*low < high"):
        param_space(replace(space, w_rec=[2.0, 1.0]), "random")
    with pytest.raises(UserError, match="--grace-steps"):
        check_config(TuneConfig(asha=AshaConfig(grace_steps=100), train=TrainConfig(steps=50)))
    with pytest.raises(UserError, match="method_options.*alpha"):
        check_config(TuneConfig(method_options={"alpha": 0.4}))


def test_presets_parse_and_pass_the_checks():
    for name, method in (("default", "sahn_tiny"), ("paper", "sahn_paper")):
        config = parse_config(TuneConfig, ["--config", name], presets=PRESETS, default_preset=None, description="")
        check_config(config)
        assert config.method == method and config.space.alpha == [0.2, 0.4, 0.6, 0.8]
    flags = ["--config", "paper", "--searcher", "grid", "--num-samples", "1", "--w-rec", "1.0", "--w-fm", "0.3",
             "--w-adv", "0.1", "--w-prior", "0.5"]
    alpha_grid = parse_config(TuneConfig, flags, presets=PRESETS, default_preset=None, description="")
    assert expected_trials(alpha_grid) == 4  # the paper's α sweep, as the preset's comment says


def test_best_trial_prefers_trials_that_ran_every_step():
    trials = pd.DataFrame({"trial_id": list("abcd"), "status": [STOPPED_EARLY, COMPLETED, COMPLETED, FAILED],
                           "psnr": [30.0, 20.0, 21.0, float("nan")], "mae": [0.01, 0.05, 0.04, float("nan")],
                           "error": ["", "", "", "boom"]})
    assert choose_best(trials, "psnr")["trial_id"] == "c"
    assert choose_best(trials, "mae")["trial_id"] == "c"  # lower is better
    only_early = trials.assign(status=[STOPPED_EARLY, STOPPED_EARLY, STOPPED_EARLY, FAILED])
    assert choose_best(only_early, "psnr")["trial_id"] == "a"
    with pytest.raises(UserError, match="boom"):
        choose_best(trials.assign(status=FAILED), "psnr")


def test_chunk_losses_average_only_the_chunk():
    history = [{"step": s, "total": float(s), "rec": 1.0} for s in range(6)]
    assert chunk_losses(history, 2, 4) == {"loss_total": 2.5, "loss_rec": 1.0}


def test_sensitivity_figure_has_a_panel_per_varied_option(tmp_path):
    import matplotlib.pyplot as plt

    trials = pd.DataFrame({"alpha": [0.2, 0.4, 0.4, 0.8], "w_rec": [0.5, 1.0, 2.0, 3.0], "w_fm": [0.3] * 4,
                           "psnr": [20.0, 21.0, 20.5, float("nan")],
                           "status": [COMPLETED, COMPLETED, STOPPED_EARLY, FAILED]})
    panels = []
    original = plt.subplots
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt, "subplots", lambda *a, **k: panels.append(a) or original(*a, **k))
        written = sensitivity_figure(trials, "psnr", tmp_path / "fig")
    assert [p.name for p in written] == ["fig.png", "fig.pdf"] and all(p.stat().st_size > 0 for p in written)
    assert panels == [(1, 2)]  # α and w_rec vary; w_fm is fixed; the failed trial is left out
    assert sensitivity_figure(trials.assign(psnr=float("nan")), "psnr", tmp_path / "none") == []


def test_trial_worker_requests_are_checked_before_anything_runs(tmp_path, dataset):
    two = TrialResources(device="cpu", cpus_per_trial=2.0, train_workers=2)
    with pytest.raises(UserError, match=r"batch of 7 .* 2 training workers: use --train.batch-size 6 or 8"):
        check_config(TuneConfig(train=TrainConfig(steps=60, batch_size=7), resources=two))
    with pytest.raises(UserError, match="--train-workers 2 with --gpus-per-trial 1:"):
        check_config(TuneConfig(resources=TrialResources(train_workers=2, gpus_per_trial=1.0)))
    with pytest.raises(UserError, match="--gpus-per-trial 2.5:"):
        check_config(TuneConfig(resources=TrialResources(gpus_per_trial=2.5)))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="batch of 3"):
        run_search(search_config(out, dataset, train=TrainConfig(steps=4, batch_size=3, seed=0), resources=two))
    assert not out.exists()  # refused before the output folder, Ray or MLflow were touched


def test_a_trial_with_workers_holds_nothing_its_workers_need():
    two = TrialResources(cpus_per_trial=2.0, train_workers=2)
    assert trial_request(two)["cpu"] == 0 and trial_request(two)["gpu"] == 0
    share = worker_resources(trial_resource_config(two))
    assert (share.cpus_per_cell, share.gpus_per_cell) == (1.0, 0.0)  # each worker: half the trial's CPUs
    on_gpus = worker_resources(trial_resource_config(TrialResources(cpus_per_trial=8.0, gpus_per_trial=4.0)))
    assert (on_gpus.cpus_per_cell, on_gpus.gpus_per_cell) == (2.0, 1.0)  # one worker per GPU by default
    assert trial_request(TrialResources(cpus_per_trial=1.5, gpus_per_trial=0.5)) == {"cpu": 1.5, "gpu": 0.5}
    # Searches begun before the option keep their identity, so they still resume.
    assert "train_workers" not in search_identity(TuneConfig())["resources"]
    assert search_identity(TuneConfig(resources=two))["resources"]["train_workers"] == 2


# ------------------------------------------------------------------------------------ a search on the cluster
def test_trials_are_mlflow_runs_nested_under_one_parent_with_their_curves(reference):
    client, runs = mlflow_runs(reference["out"])
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "search"]
    trials = [r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 2 and len(runs) == 3
    assert {t.data.tags[PARENT_TAG] for t in trials} == {parents[0].info.run_id}
    assert sorted(float(t.data.params["alpha"]) for t in trials) == ALPHAS  # seeded Optuna drew both values
    table = reference["outcome"].trials
    for run in trials:
        assert run.info.status == "FINISHED"
        assert float(run.data.params["w_fm"]) == 0.3 and run.data.params["search.method"] == "sahn_tiny"
        history = client.get_metric_history(run.info.run_id, "val/psnr")
        assert [m.step for m in history] == [2, 4]  # one value per report
        row = table[table["trial_id"] == run.data.tags["sahn.trial_id"]].iloc[0]
        assert history[-1].value == pytest.approx(row["psnr"])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")] == [2, 4]
    assert math.isclose(parents[0].data.metrics["best/psnr"], table["psnr"].max())


def test_the_best_config_is_a_benchmark_preset_of_the_best_trial(reference, dataset):
    out, outcome = reference["out"], reference["outcome"]
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials["status"]) == [COMPLETED, COMPLETED] and list(trials["step"]) == [4, 4]
    best = trials.loc[trials["psnr"].idxmax()]
    config = parse_config(BenchmarkConfig, ["--config", str(outcome.best_config)], presets=full_benchmark.PRESETS,
                          default_preset="default", description="")
    assert config.methods == ["sahn_tiny"] and config.data.datasets == [f"folder:{dataset}"]
    assert config.method_options["sahn_tiny"] == {"alpha": best["alpha"], **{k: v[0] for k, v in PAPER_WEIGHTS.items()}}
    assert config.data.image_size == 32 and config.train.steps == 4
    assert (out / "sensitivity.png").exists() and (out / "sensitivity.pdf").exists()


def test_the_search_never_reads_the_test_split_or_a_test_manifest(reference, dataset):
    for path, before in reference["access_times"].items():
        assert path.stat().st_atime_ns == before, f"{path} was read during the search"
    client, runs = mlflow_runs(reference["out"])
    for run in (r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"):  # what each trial says it loaded
        tags = run.data.tags
        assert tags["sahn.data.train_split"] == "train" and tags["sahn.data.eval_split"] == "val"
        assert tags["sahn.data.eval_manifest"] == str(reference["out"] / "val_manifest")
    frozen = json.loads((reference["out"] / "val_manifest" / "manifest.json").read_text())
    assert frozen["dataset"]["split"] == "val" and frozen["pairs"] == 4  # 2 val images × 2 bins


def test_a_rerun_with_other_options_is_refused(reference, dataset):
    changed = search_config(reference["out"], dataset, space=SearchSpace(alpha=[0.4], **PAPER_WEIGHTS))
    with pytest.raises(UserError, match="space.alpha"):
        run_search(changed)


def test_a_trial_trains_in_two_workers_like_one_process(tmp_path, dataset, store_template, reference):
    """One trial (α 0.2) whose chunks train in 2 Ray Train workers × 1 image, against the reference search's
    α 0.2 trial (one process × 2 images): the same reports, the same losses up to the round-off of two training
    steps (the workers split the process's batch), and the trial scored the weights its workers trained.

    The tolerance is what holds on any CPU, not on this one. A report's losses are the mean over its chunk's steps,
    and step 1 follows an Adam update, which does not shrink differences the way a forward pass does. On the
    machines of tests/test_data_parallel.py both steps agree within 3e-7 (and that test compares step 0's
    losses and gradients of every GAN method within round-off), but a fresh machine's first report differed by
    2.1e-4 (29.106 vs 29.100). A different computation is far outside the bound: another share of the batch,
    or each worker normalising by its own half's statistics, moves these losses by 1e-2 or more."""
    out = tmp_path / "out"
    with_store(out, store_template)
    # cpus_per_trial 2 on the 2-CPU cluster: the workers take both CPUs, so a trial holding any would hang.
    config = search_config(out, dataset, num_samples=1, searcher="random",  # Optuna needs something to sample
                           space=SearchSpace(alpha=[0.2], **PAPER_WEIGHTS),
                           resources=TrialResources(device="cpu", cpus_per_trial=2.0, train_workers=2))
    outcome = run_search(config)
    assert list(outcome.trials["status"]) == [COMPLETED] and list(outcome.trials["step"]) == [4]
    ours = pd.read_csv(out / "curves.csv")
    theirs = pd.read_csv(reference["out"] / "curves.csv")
    theirs = theirs[theirs["alpha"] == 0.2].reset_index(drop=True)
    assert list(ours["step"]) == list(theirs["step"]) == [2, 4]
    losses = [column for column in theirs if column.startswith("loss_")]
    assert losses and sorted(losses) == sorted(c for c in ours if c.startswith("loss_"))
    np.testing.assert_allclose(ours.loc[0, losses].astype(float), theirs.loc[0, losses].astype(float), rtol=1e-3,
                               atol=0)
    # The trial process scored what its workers trained (untrained weights would score alike at steps 2 and 4);
    # weights within round-off may still flip a few uint8 pixels of the composites, hence not exact.
    metrics = ["psnr", "ssim", "mae"]
    np.testing.assert_allclose(ours[metrics].astype(float), theirs[metrics].astype(float), rtol=1e-3, atol=0)
    assert not np.allclose(theirs.loc[0, metrics].astype(float), theirs.loc[1, metrics].astype(float), rtol=1e-3,
                           atol=0)  # the bound tells trained weights from untrained ones
    assert not list((out / "search").glob("trial_*/workers")) and not list((out / "search").glob("trial_*/ray_train"))


def test_killing_the_driver_and_rerunning_resumes_the_trials_from_their_checkpoints(tmp_path, dataset,
                                                                                      store_template, reference):
    """Kill the driver while both trials are parked after their step-2 checkpoint, re-run the same command:
    both continue from step 2 (one of them crashes once more and is retried from it), with the numbers of
    the uninterrupted search and no duplicate MLflow runs or values."""
    address = ensure_local_ray()  # the driver subprocess joins this cluster, as on a real cluster
    out, parked, crashed = tmp_path / "out", tmp_path / "parked", tmp_path / "crashed"
    parked.mkdir()
    crashed.mkdir()
    with_store(out, store_template)
    config = search_config(out, dataset, method="sahn_tiny_faulty",
                           method_options={"pause_folder": str(parked), "crash_folder": str(crashed)})
    config_file = tmp_path / "search.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(config)))
    command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_tune; "
                                     "test_tune.drive(sys.argv[1])", str(config_file)]
    log = tmp_path / "driver.log"
    with open(log, "w") as stream:
        driver = subprocess.Popen(command, env={**os.environ, "RAY_ADDRESS": address}, stdout=stream,
                                  stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: len(list(parked.glob("*.json"))) == PAUSED_TRIALS, driver, log)
            newest_park = max(p.stat().st_mtime for p in parked.glob("*.json"))
            # Tune saves its state every snapshot_seconds: wait for a save made after both trials reported.
            def saved_after_parking() -> bool:
                states = (out / "search").glob("experiment_state*")
                return any(state.stat().st_mtime > newest_park + 1.0 for state in states)

            wait_for(saved_after_parking, driver, log)
        finally:
            driver.kill()  # SIGKILL: no handler, no cleanup — a crashed or killed driver
            driver.wait(timeout=30)
    for marker in parked.glob("*.json"):  # Ray ends the dead driver's trials
        pid = json.loads(marker.read_text())["pid"]
        deadline = time.monotonic() + 60
        while psutil.pid_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not psutil.pid_exists(pid), "a trial of the killed driver kept running"
    assert not (out / "trials.csv").exists() and not (crashed / "crashed").exists()

    register_method("sahn_tiny_faulty", sahn_tiny_faulty)
    rerun = run_search(parse_config(TuneConfig, ["--config", str(config_file)], presets=PRESETS, default_preset=None,
                                    description=""))
    assert rerun.resumed
    assert (crashed / "crashed").exists()  # one resumed trial lost its worker: max_failures=1 retried it
    assert list(rerun.trials["restored_from_step"]) == [2, 2]  # both continued from their step-2 checkpoint
    assert list(rerun.trials["status"]) == [COMPLETED, COMPLETED]
    # The same numbers as the uninterrupted search: resuming is exact, not a restart with other data.
    assert curve_rows(pd.read_csv(out / "curves.csv")) == curve_rows(pd.read_csv(reference["out"] / "curves.csv"))

    client, runs = mlflow_runs(out)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "search"]
    trials = [r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the first driver's parent, finished
    assert len(trials) == 2 and {t.data.tags[PARENT_TAG] for t in trials} == {parents[0].info.run_id}
    for run in trials:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr")] == [2, 4]  # no duplicates


if __name__ != "__main__":
    import ray.cloudpickle

    # Trials get the method's constructor from the driver; workers cannot import tests/, so this module's
    # functions travel as code.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
