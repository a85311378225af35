"""One cell trained by several processes, data-parallel, under Ray Train (``TorchTrainer``).

A cell whose request is ``--gpus-per-cell N`` (N > 1), or ``--train-workers N`` (also on CPUs, with gloo),
trains in N Ray Train workers, on one node or several: Ray Train starts them, sets up their process group
(NCCL on GPUs, gloo on CPUs) and restarts them all when one is lost (``FailureConfig``). Each worker runs
the cell's ordinary training (:func:`bench.cell.train_and_save` → :func:`bench.train.train`) with its rank,
which splits every batch and averages gradients (:mod:`bench.data_parallel`). A restarted group resumes from
the cell's own ``train_state.pt``, which rank 0 writes like a single process does, so the result is the same
as without the failure. ``train_state.pt`` and ``model.pt`` live in the cell folder, on the filesystem every
node mounts (as for any cell), so Ray Train needs no checkpoint storage of its own.

The cell's request is split evenly over its workers (:func:`worker_resources`): one GPU each and a share of the
CPUs. Its evaluation needs no data parallelism, so it runs in tasks of that same share, N shards at a time.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from bench.config import BenchmarkConfig, ResourceConfig
from bench.errors import UserError
from bench.shards import cluster_slots

if TYPE_CHECKING:
    import torch

    from bench.cell import CellSpec

#: restarts of a cell's worker group after a worker or node was lost
MAX_FAILURES = 3
#: Ray Train's own run folder inside the cell folder (its logs); removed with the cell's other scratch files
RUN_FOLDER = "ray_train"


def training_workers(resources: ResourceConfig) -> int:
    """How many processes train one cell: ``--train-workers``, or one per GPU of ``--gpus-per-cell``."""
    workers, gpus = resources.train_workers, resources.gpus_per_cell
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UserError(f"--train-workers must be a whole number ≥ 0, got {workers!r}")
    if gpus > 1 and gpus != int(gpus):
        raise UserError(f"--gpus-per-cell {gpus:g}: above one GPU a cell trains with one worker per GPU, so ask for "
                        "a whole number of GPUs")
    if workers == 0:
        return int(gpus) if gpus > 1 else 1
    if gpus > 1 and workers != gpus or 0 < gpus <= 1 < workers:
        raise UserError(f"--train-workers {workers} with --gpus-per-cell {gpus:g}: each training worker trains on "
                        "one whole GPU of its own, so ask for as many GPUs as workers (or leave --train-workers 0)")
    return workers


def worker_resources(resources: ResourceConfig) -> ResourceConfig:
    """One training worker's share of the cell's request: what each worker asks Ray for, and what each of the
    cell's evaluation tasks asks for. The request itself when the cell trains in one process."""
    workers = training_workers(resources)
    if workers == 1:
        return resources
    return dataclasses.replace(resources, cpus_per_cell=resources.cpus_per_cell / workers,
                               gpus_per_cell=resources.gpus_per_cell / workers, train_workers=1)


def workers_problem(resources: ResourceConfig, nodes: Sequence[dict[str, float]]) -> str | None:
    """Why the cluster cannot hold one cell's training workers at once (None if it can). Ray Train would wait
    for them forever, so the driver checks first."""
    workers = training_workers(resources)
    share = worker_resources(resources)
    fit = cluster_slots(nodes, share.cpus_per_cell, share.gpus_per_cell)
    if workers > 1 and fit < workers:
        return (f"a cell trains in {workers} workers of {share.cpus_per_cell:g} CPU and {share.gpus_per_cell:g} GPU "
                f"each, but the Ray cluster holds only {fit} of them at once")
    return None


def train_on_workers(config: BenchmarkConfig, cell: "CellSpec", factories: dict[str, Callable],
                     on_step: Callable[[int, dict[str, Any]], None] | None = None) -> None:
    """Train ``cell`` in its workers and return when rank 0 has written ``model.pt`` and ``losses.csv``.
    ``factories``: the method constructors the workers register (methods registered in the driver only)."""
    import ray

    if not ray.is_initialized():
        raise UserError(f"{cell.key} trains in {training_workers(config.resources)} workers under Ray Train, "
                        "which needs Ray: run without --serial")
    fit_on_workers(_cell_worker_loop, {"config": config, "cell": cell, "factories": factories, "on_step": on_step},
                   config.resources, name=cell.key.replace("/", "-"), folder=Path(cell.cell_dir) / RUN_FOLDER)


def fit_on_workers(worker_loop: Callable[[dict[str, Any]], None], setup: dict[str, Any], resources: ResourceConfig,
                   *, name: str, folder: str | Path) -> None:
    """Run ``worker_loop(setup)`` in ``training_workers(resources)`` Ray Train workers, each with one worker's
    share of ``resources``, restarting them all (up to :data:`MAX_FAILURES` times) when one is lost; raises what
    a worker raised. ``folder``: Ray Train's own run folder (logs), on storage every node can reach."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    share = worker_resources(resources)
    per_worker = {"CPU": share.cpus_per_cell, **({"GPU": share.gpus_per_cell} if share.gpus_per_cell else {})}
    trainer = TorchTrainer(
        worker_loop, train_loop_config=setup,
        scaling_config=ScalingConfig(num_workers=training_workers(resources), use_gpu=share.gpus_per_cell > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=str(folder),
                             failure_config=FailureConfig(max_failures=MAX_FAILURES)))
    result = trainer.fit()
    if result.error is not None:
        raise result.error


def worker_device(resources: ResourceConfig) -> "torch.device":
    """Inside a Ray Train worker: the GPU Ray Train gave it, or the CPU when the request has no GPU."""
    import torch

    if worker_resources(resources).gpus_per_cell > 0:
        from ray.train.torch import get_device

        return get_device()
    return torch.device("cpu")


def remove_run_folder(cell_dir: str | Path) -> None:
    shutil.rmtree(Path(cell_dir) / RUN_FOLDER, ignore_errors=True)


def _cell_worker_loop(setup: dict[str, Any]) -> None:
    """One Ray Train worker: the cell's training at this worker's rank, on its GPU or the CPU."""
    from bench.cell import train_and_save
    from bench.data_parallel import Ranks
    from bench.devices import deterministic_algorithms
    from bench.distributed import cell_threads, torch_threads
    from bench.methods import register_method

    config, cell = setup["config"], setup["cell"]
    for name, factory in setup["factories"].items():
        register_method(name, factory)
    with torch_threads(cell_threads(worker_resources(config.resources))), \
            deterministic_algorithms(config.resources.deterministic):
        train_and_save(config, cell, worker_device(config.resources), ranks=Ranks.of_process_group(),
                       progress=False, on_step=setup["on_step"])
