"""One cell trained by several Ray Train workers (gloo on these CPUs, the stand-in for NCCL on GPUs): the
workers split one process's batch, so they train like it; a worker lost mid-run is restarted and the result is
bit-identical; checkpoints carry the method's own keys; batch norm is synchronised over the global batch."""
import json
import os
import socket
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bench.run import distributed
from bench.run.cell import TRAINED_FILE, cell_fingerprint, train_and_save, train_cell
from bench.config import ResourceConfig
from bench.run.data_parallel import Ranks, SynchronisedBatchNorm, diverged_keys, synchronise_batch_norm
from bench.errors import UserError
from bench.methods import create_method
from bench.checkpoint_format import safe_torch_load
from bench.cli import run_main
from bench.run.ray_train import fit_on_workers
from bench.run.resources import check_feasible, cluster_problem, training_workers, worker_resources
from pipelines.full_benchmark import prepare, run_benchmark
from tiny_methods import config_from_dict, ensure_local_ray, tiny_config_dict, write_folder_dataset

pytestmark = pytest.mark.timeout(600)

STEPS = 5
BATCH = 8
#: Adam normalises each update by the gradient's running magnitude, so gradients that differ by float round-off
#: (two halves' means averaged instead of one mean) move weights by up to a few lr·1e-6; over 5 steps at lr 1e-2
#: that stays far below this bound, while one step of a different update would move a weight by about lr.
WEIGHT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "data", train=8, test=2, size=32)


def cell_config(out: Path, dataset: Path, *, workers: int, methods=("tiny_trainer",), steps=STEPS, batch=BATCH,
                method_options=None, size=32, checkpoint_every=2, **resources):
    values = tiny_config_dict(out, dataset, methods=methods, steps=steps, method_options=method_options)
    values["data"]["image_size"] = size
    values["train"].update(batch_size=batch, checkpoint_every=checkpoint_every)
    values["resources"].update(train_workers=workers, **resources)
    return config_from_dict(values)


def only_cell(config):
    (cell,) = prepare(config).cells
    return cell


def trained_weights(cell) -> dict[str, torch.Tensor]:
    return safe_torch_load(Path(cell.cell_dir) / "model.pt")["state_dict"]


def losses(cell) -> pd.DataFrame:
    return pd.read_csv(Path(cell.cell_dir) / "losses.csv")


def train_alone(config, cell) -> None:
    """The cell's training in this process, with the thread count a one-process Ray task would have."""
    with distributed.cell_settings(config.resources):
        train_and_save(config, cell, torch.device("cpu"), progress=False)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, dataset):
    """tiny_trainer (no batch norm, no random draws in its step) trained by 2 workers × 4 images."""
    ensure_local_ray()
    config = cell_config(tmp_path_factory.mktemp("two"), dataset, workers=2)
    cell = only_cell(config)
    _, training = train_cell(config, cell, progress=False)
    assert training["trained"] and training["train_workers"] == 2
    return cell


def test_two_workers_train_like_one_process_with_the_whole_batch(tmp_path, dataset, two_workers):
    config = cell_config(tmp_path, dataset, workers=1)
    alone = only_cell(config)
    train_alone(config, alone)
    ours, theirs = losses(two_workers), losses(alone)
    assert list(ours.columns) == list(theirs.columns) and len(ours) == len(theirs) == STEPS
    # Step 0 runs on the same weights and images: the averaged halves' losses are the whole batch's.
    pd.testing.assert_series_equal(ours.iloc[0], theirs.iloc[0], check_exact=False, rtol=1e-6, atol=0)
    mine, other = trained_weights(two_workers), trained_weights(alone)
    assert mine.keys() == other.keys()
    start = create_method("tiny_trainer").state_dict()
    for key, value in mine.items():
        if value.is_floating_point():
            assert torch.allclose(value, other[key], rtol=0, atol=WEIGHT_TOLERANCE), key
            assert not torch.equal(value, start[key])  # it did train
        else:
            assert torch.equal(value, other[key]), key  # the step counter: both took every step


def test_two_worker_checkpoints_have_the_methods_own_keys(two_workers, tmp_path):
    fresh = create_method("tiny_trainer")
    saved = trained_weights(two_workers)
    assert list(saved) == list(fresh.state_dict())  # no "module." anywhere
    fresh.load(Path(two_workers.cell_dir) / "model.pt")  # strict loading into one process
    state = safe_torch_load(Path(two_workers.cell_dir) / "train_state.pt")
    assert list(state["method"]["state_dict"]) == list(fresh.state_dict())
    assert state["workers"] == 2 and len(state["rank_rng"]) == 2
    assert not torch.equal(state["rank_rng"][0]["torch_rng"], state["rank_rng"][1]["torch_rng"])


def test_checkpoints_move_between_worker_counts(two_workers, tmp_path, dataset):
    """A 2-worker training checkpoint resumes in one process, and that one's in 2 workers again: the weights and
    optimiser states continue, with a warning that the random draws cannot."""
    config = cell_config(tmp_path / "one", dataset, workers=1, steps=STEPS + 1)
    cell = only_cell(config)
    Path(cell.cell_dir).mkdir(parents=True)
    state = Path(two_workers.cell_dir) / "train_state.pt"
    (Path(cell.cell_dir) / "train_state.pt").write_bytes(state.read_bytes())
    with pytest.warns(UserWarning, match="written by 2 training worker"):
        train_alone(config, cell)
    history = losses(cell)
    assert list(history["step"]) == list(range(STEPS + 1))  # the 2-worker run's steps, then one more here
    pd.testing.assert_frame_equal(history.iloc[:STEPS], losses(two_workers))

    ensure_local_ray()
    config = cell_config(tmp_path / "two", dataset, workers=2, steps=STEPS + 2)
    back = only_cell(config)
    Path(back.cell_dir).mkdir(parents=True)
    (Path(back.cell_dir) / "train_state.pt").write_bytes((Path(cell.cell_dir) / "train_state.pt").read_bytes())
    train_cell(config, back, progress=False)
    assert list(losses(back)["step"]) == list(range(STEPS + 2))
    pd.testing.assert_frame_equal(losses(back).iloc[:STEPS + 1], history)
    assert trained_weights(back).keys() == trained_weights(cell).keys()


def test_a_lost_worker_is_restarted_and_the_result_is_bit_identical(tmp_path, dataset, two_workers):
    """Rank processes exit at step 3 (after the step-2 checkpoint); Ray Train restarts the group, which resumes
    from train_state.pt: weights and losses equal the uninterrupted 2-worker run's bit for bit."""
    ensure_local_ray()
    marker, start_log = tmp_path / "crashed", tmp_path / "starts.log"
    options = {"tiny_trainer": {"crash_at_step": 3, "crash_marker": str(marker), "start_log": str(start_log)}}
    config = cell_config(tmp_path / "out", dataset, workers=2, method_options=options)
    cell = only_cell(config)
    train_cell(config, cell, progress=False)
    assert marker.exists()  # a worker did die
    starts = sorted(int(line) for line in start_log.read_text().split())
    assert starts[:2] == [0, 0] and set(starts[2:]) == {2}  # both ranks restarted from the step-2 checkpoint
    pd.testing.assert_frame_equal(losses(cell), losses(two_workers), check_exact=True)
    mine, other = trained_weights(cell), trained_weights(two_workers)
    assert all(torch.equal(mine[key], other[key]) for key in other)


@pytest.mark.parametrize("sync", [True, False])
def test_ctsdg_batch_norm_is_synchronised_over_the_workers(tmp_path, dataset, sync):
    """After one step, CTSDG's batch-norm running statistics are those of the global batch of 4 (what one
    process with the whole batch gets) when synchronised, and differ from them when each worker keeps its own."""
    ensure_local_ray()
    data = write_folder_dataset(tmp_path / "data64", train=4, test=2, size=64)
    options = {"ctsdg_tiny": {}}
    runs = {}
    for workers in (1, 2):
        config = cell_config(tmp_path / f"w{workers}", data, workers=workers, methods=("ctsdg_tiny",), steps=1,
                             batch=4, size=64, method_options=options, sync_batch_norm=sync)
        cell = only_cell(config)
        if workers == 1:
            train_alone(config, cell)
        else:
            train_cell(config, cell, progress=False)
        runs[workers] = (trained_weights(cell), losses(cell))
    (parallel, parallel_losses), (alone, alone_losses) = runs[2], runs[1]
    statistics = [key for key in alone if key.endswith(("running_mean", "running_var"))]
    assert statistics and parallel.keys() == alone.keys()
    close = [torch.allclose(parallel[key], alone[key], rtol=1e-4, atol=1e-5) for key in statistics]
    assert all(close) if sync else not all(close)
    if sync:  # the step's losses are the whole batch's too
        pd.testing.assert_series_equal(parallel_losses.iloc[0], alone_losses.iloc[0], check_exact=False, rtol=1e-4)


def test_ddnm_ema_weights_stay_identical_on_every_worker(tmp_path):
    """DDNM updates its EMA copy from the averaged weights on every rank; before each checkpoint the training
    loop checks that every rank's state is bit-identical (test_ranks_that_differ_are_named shows it would fail)."""
    ensure_local_ray()
    data = write_folder_dataset(tmp_path / "data64", train=4, test=2, size=64)
    config = cell_config(tmp_path / "out", data, workers=2, methods=("ddnm_tiny",), steps=2, batch=4, size=64,
                         checkpoint_every=1)
    cell = only_cell(config)
    _, training = train_cell(config, cell, progress=False)
    assert training["trained"]
    state = safe_torch_load(Path(cell.cell_dir) / "train_state.pt")
    assert state["step"] == 2 and any("ema" in key for key in state["method"]["state_dict"])


# ------------------------------------------------------------------------------------ the pipeline
def test_full_benchmark_trains_a_cell_in_two_workers_and_evaluates_it(tmp_path, dataset):
    ensure_local_ray()
    values = tiny_config_dict(tmp_path / "out", dataset, methods=("tiny_trainer",), steps=2,
                              mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    values["train"]["batch_size"] = 4
    values["resources"].update(train_workers=2, ray_address=os.environ.get("RAY_ADDRESS") or None)
    config = config_from_dict(values)
    run_benchmark(config)
    (cell,) = prepare(config).cells
    record = json.loads((Path(cell.cell_dir) / "cell.json").read_text())
    assert record["train_workers"] == 2 and record["pairs"] == 4
    assert record["fingerprint"] == cell_fingerprint(config, cell)
    assert not (Path(cell.cell_dir) / TRAINED_FILE).exists() and not (Path(cell.cell_dir) / "ray_train").exists()
    assert len(pd.read_csv(Path(cell.cell_dir) / "per_image.csv")) == 4


def test_serial_runs_refuse_several_training_workers(tmp_path, dataset, capsys):
    values = tiny_config_dict(tmp_path / "out", dataset, methods=("tiny_trainer",), serial=True)
    values["resources"]["train_workers"] = 2
    with pytest.raises(UserError, match="drop --serial"):
        run_benchmark(config_from_dict(values))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ errors workers hand back
def test_full_benchmark_refuses_a_batch_its_workers_cannot_split_before_any_work(tmp_path, dataset, capsys):
    """What a new user tried: --methods lama_tiny --train-workers 2 --batch-size 3. One line and exit code 2, from
    the driver before any training task (Ray Train used to restart the workers 3 times, then print a traceback)."""
    ensure_local_ray()
    values = tiny_config_dict(tmp_path / "out", dataset, methods=("lama_tiny",), steps=2,
                              mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    values["train"]["batch_size"] = 3
    values["resources"].update(train_workers=2, ray_address=os.environ.get("RAY_ADDRESS") or None)
    config = config_from_dict(values)
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_code:
        run_main(lambda: run_benchmark(config))
    assert exit_code.value.code == 2 and time.perf_counter() - started < 120
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]  # beside MLflow's log lines
    assert len(errors) == 1 and "Traceback" not in stderr and stderr.strip().endswith(errors[0])
    assert "a batch of 3 cannot be split evenly over 2 training workers: use --batch-size 2 or 4" in errors[0]
    (cell,) = prepare(config).cells
    assert not (Path(cell.cell_dir) / "train_state.pt").exists() and not (Path(cell.cell_dir) / "ray_train").exists()


def test_a_user_error_in_the_workers_comes_back_as_itself(tmp_path, dataset):
    """The same batch given to the workers themselves (the driver's check bypassed): the UserError they meet comes
    back as itself, not as Ray Train's WorkerGroupError after three restarts."""
    ensure_local_ray()
    config = cell_config(tmp_path, dataset, workers=2, batch=3)
    with pytest.raises(UserError, match="a batch of 3 cannot be split evenly over 2 training workers"):
        train_cell(config, only_cell(config), progress=False)


def test_a_non_finite_loss_in_the_workers_is_reported_once_not_retried(tmp_path, dataset):
    """An infinite learning rate makes step 1's loss NaN on both ranks. The error comes back as the
    FloatingPointError one process raises, and no worker trains again (each rank logged one start)."""
    ensure_local_ray()
    starts = tmp_path / "starts.log"
    options = {"tiny_trainer": {"lr": float("inf"), "start_log": str(starts)}}
    config = cell_config(tmp_path / "out", dataset, workers=2, method_options=options, steps=3)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
        train_cell(config, only_cell(config), progress=False)
    assert starts.read_text().split() == ["0", "0"]


# ------------------------------------------------------------------------------------ feasibility in fit_on_workers
class FakeTrainer:
    """Stands for TorchTrainer: records that it was made and fits at once."""
    made: list[dict] = []

    def __init__(self, *args, **kwargs):
        FakeTrainer.made.append(kwargs)

    def fit(self):
        return type("Result", (), {"error": None})()


@pytest.fixture
def cluster(monkeypatch):
    """A cluster of mocked nodes (total resources) on which nothing is free now, and a fake TorchTrainer."""
    import ray
    import ray.train.torch

    FakeTrainer.made = []
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    monkeypatch.setattr(ray, "available_resources", lambda: {})

    def with_nodes(*nodes: dict) -> None:
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": node} for node in nodes]
                            + [{"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}])  # a dead node counts for nothing
    return with_nodes


def test_workers_the_cluster_can_never_hold_are_refused_before_ray_train_waits(cluster, tmp_path):
    cluster({"CPU": 16.0, "GPU": 1.0})
    with pytest.raises(UserError, match=r"2 training worker\(s\) of 1 CPU and 1 GPU each.*can hold only 1 of them"):
        fit_on_workers(print, {}, ResourceConfig(cpus_per_cell=2, gpus_per_cell=2), name="run", folder=tmp_path)
    cluster({"CPU": 16.0})
    with pytest.raises(UserError, match=r"1 training worker\(s\) of 1 CPU and 1 GPU"):  # one worker waits as long
        fit_on_workers(print, {}, ResourceConfig(cpus_per_cell=1, gpus_per_cell=1), name="run", folder=tmp_path / "gpu")
    assert FakeTrainer.made == []


def test_workers_are_judged_by_the_clusters_totals_not_what_is_free(cluster, tmp_path):
    """Trials and cells side by side hold resources now and free them later: only the totals decide."""
    cluster({"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0})
    fit_on_workers(print, {}, ResourceConfig(cpus_per_cell=2, gpus_per_cell=2), name="run", folder=tmp_path)
    assert len(FakeTrainer.made) == 1


def test_train_scaling_on_one_gpu_stops_with_one_line_before_training(cluster, monkeypatch, capsys):
    import ray

    from pipelines.benchmarks import train_scaling

    cluster({"CPU": 2.0, "GPU": 1.0})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(train_scaling, "measure", lambda *args, **kwargs: pytest.fail("it trained"))
    with pytest.raises(SystemExit) as exit_code:
        run_main(lambda: train_scaling.main(["--gpu"]))  # the default --workers 1 2
    assert exit_code.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: 2 training worker(s) of 1 CPU and 1 GPU each") and len(stderr.splitlines()) == 1


# ------------------------------------------------------------------------------------ requests
@pytest.mark.parametrize("workers, gpus, expected", [(0, 0, 1), (0, 0.5, 1), (0, 1, 1), (0, 4, 4), (2, 0, 2),
                                                     (4, 4, 4), (1, 0, 1)])
def test_training_workers_follow_the_request(workers, gpus, expected):
    assert training_workers(ResourceConfig(train_workers=workers, gpus_per_cell=gpus)) == expected


@pytest.mark.parametrize("workers, gpus, message", [(2, 1, "one whole GPU"), (3, 4, "one whole GPU"),
                                                    (2, 0.5, "one whole GPU"), (0, 2.5, "whole number of GPUs"),
                                                    (-1, 0, "≥ 0")])
def test_impossible_worker_requests_are_refused(workers, gpus, message):
    with pytest.raises(UserError, match=message):
        training_workers(ResourceConfig(train_workers=workers, gpus_per_cell=gpus))


def test_each_worker_and_evaluation_task_asks_for_an_even_share():
    share = worker_resources(ResourceConfig(cpus_per_cell=8, gpus_per_cell=4))
    assert (share.cpus_per_cell, share.gpus_per_cell) == (2, 1)
    alone = ResourceConfig(cpus_per_cell=2, gpus_per_cell=0.5)
    assert worker_resources(alone) is alone
    two_nodes = [{"CPU": 4.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 2.0}]
    assert cluster_problem(ResourceConfig(cpus_per_cell=8, gpus_per_cell=4), two_nodes) is None  # across nodes
    problem = cluster_problem(ResourceConfig(cpus_per_cell=8, gpus_per_cell=8), two_nodes)
    assert "can hold only 4" in problem
    with pytest.raises(UserError, match="can hold only 4"):
        check_feasible(ResourceConfig(cpus_per_cell=8, gpus_per_cell=8), two_nodes)


def test_a_batch_the_workers_cannot_split_is_refused():
    with pytest.raises(UserError, match="batch-size 9 or 12"):
        Ranks(rank=0, size=3).share(10)
    assert Ranks(rank=1, size=2).share(8) == slice(4, 8)


# ------------------------------------------------------------------------------------ synchronised batch norm
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _synchronised_rank(rank: int, port: int, inputs: torch.Tensor, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        assert synchronise_batch_norm(network, torch.device("cpu")) == 1 and isinstance(network[1], SynchronisedBatchNorm)
        share = inputs[rank * 3:(rank + 1) * 3].clone().requires_grad_(True)
        output = network(share)
        # Each rank's loss is its share's mean; DDP averages gradients, so the mean of the shares' gradients is
        # the whole batch's: mirror that by halving before summing.
        (output.square().mean() / 2).backward()
        gradients = [share.grad] + [p.grad.clone() for p in network.parameters()]
        for gradient in gradients[1:]:
            dist.all_reduce(gradient)
        torch.save({"output": output.detach(), "gradients": gradients,
                    "running": [network[1].running_mean.clone(), network[1].running_var.clone()]},
                   Path(folder) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def two_ranks(function, folder: Path, *args) -> dict:
    """``function(rank, port, *args, folder)`` in two gloo processes; returns what each saved as ``folder/<rank>.pt``.
    Files, not a multiprocessing manager: a manager forks this process, and forking a process that holds Ray's
    and Ray Train's connections (earlier tests of this module) left the driver's connection to Ray hung."""
    mp.spawn(function, args=(_free_port(), *args, str(folder)), nprocs=2, join=True)
    return {rank: torch.load(folder / f"{rank}.pt", weights_only=True) for rank in (0, 1)}


def _diverging_rank(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ranks = Ranks.of_process_group()
        same = {"weight": torch.ones(3), "bn.running_mean": torch.full((2,), float(rank))}
        torch.save({"synchronised": diverged_keys(same, ranks),
                    "per_worker": diverged_keys(same, ranks, batch_norm_synchronised=False),
                    "ema": diverged_keys({**same, "ema.weight": torch.full((3,), float(rank))}, ranks,
                                         batch_norm_synchronised=False)}, Path(folder) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_that_differ_are_named(tmp_path):
    results = two_ranks(_diverging_rank, tmp_path)
    for rank in (0, 1):
        assert results[rank] == {"synchronised": ["bn.running_mean"], "per_worker": [], "ema": ["ema.weight"]}


def test_synchronised_batch_norm_on_the_cpu_equals_batch_norm_of_the_whole_batch(tmp_path):
    torch.manual_seed(1)
    inputs = torch.randn(6, 3, 8, 8) * 2 + 1
    results = two_ranks(_synchronised_rank, tmp_path, inputs)
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    whole = inputs.clone().requires_grad_(True)
    output = network(whole)
    output.square().mean().backward()
    combined = torch.cat([results[0]["output"], results[1]["output"]])
    assert torch.allclose(combined, output.detach(), atol=1e-5)
    input_gradient = torch.cat([results[0]["gradients"][0], results[1]["gradients"][0]])
    assert torch.allclose(input_gradient, whole.grad, atol=1e-6)
    for ours, theirs in zip(results[0]["gradients"][1:], network.parameters()):
        assert torch.allclose(ours, theirs.grad, atol=1e-5)
    assert torch.allclose(results[0]["running"][0], network[1].running_mean, atol=1e-6)
    assert torch.allclose(results[0]["running"][1], network[1].running_var, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(results[0]["running"], results[1]["running"]))
