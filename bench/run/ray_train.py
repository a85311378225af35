"""One training run by several processes, data-parallel, under Ray Train (``TorchTrainer``).

A cell whose request is ``--gpus-per-cell N`` (N > 1), or ``--train-workers N`` (also on CPUs, with gloo),
trains in N Ray Train workers, on one node or several, and so does a search trial: Ray Train starts them, sets
up their process group (NCCL on GPUs, gloo on CPUs) and restarts them all when one is lost (``FailureConfig``).
Each worker runs the caller's ordinary training at its rank (a cell's is :func:`bench.run.cell.train_on_workers`),
which splits every batch and averages gradients (:mod:`bench.run.data_parallel`). This module knows nothing of
cells: it is the generic loop under them. A restarted group resumes from
the cell's own ``train_state.pt``, which rank 0 writes like a single process does, so the result is the same
as without the failure. ``train_state.pt`` and ``model.pt`` live in the cell folder, on the filesystem every
node mounts (as for any cell), so Ray Train needs no checkpoint storage of its own.

The cell's request is split evenly over its workers (:func:`bench.run.resources.worker_resources`): one GPU each and a share of the
CPUs. Its evaluation needs no data parallelism, so it runs in tasks of that same share, N shards at a time.

Two kinds of failure are not Ray Train's to retry. Workers the cluster can never hold at once would be waited for
forever (Ray Train places them again every minute), so :func:`fit_on_workers` refuses them first. And an error
that a retry would only raise again — a :class:`~bench.errors.UserError` or a non-finite loss, which every rank
meets at the same point — is handed back by the workers rather than raised there: they record it and return,
and the caller of :func:`fit_on_workers` gets it as itself, once, instead of three restarts and a
``WorkerGroupError``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bench.config import ResourceConfig
from bench.errors import UserError
from bench.run.resources import (alive_nodes, cell_threads, cluster_problem, torch_threads, training_workers,
                             worker_resources)

if TYPE_CHECKING:
    import torch

#: restarts of a cell's worker group after a worker or node was lost
MAX_FAILURES = 3
#: Ray Train's own run folder inside the cell folder (its logs); removed with the cell's other scratch files
RUN_FOLDER = "ray_train"
#: inside the folder given to :func:`fit_on_workers`: the errors its workers handed back, one file per rank
HANDED_BACK_FOLDER = "handed_back"
#: errors a worker hands back instead of raising: a retry would meet them again (see the module's doc)
HANDED_BACK = {"UserError": UserError, "FloatingPointError": FloatingPointError}


def check_workers_fit(resources: ResourceConfig) -> None:
    """Refuse workers the connected Ray cluster can never hold at once, before anything waits for them. Judged by
    the nodes' total resources, not what is free now: trials and cells that run side by side free theirs."""
    problem = cluster_problem(resources, alive_nodes())
    if problem:
        raise UserError(problem)


def run_on_workers(train_rank: Callable[..., Any], resources: ResourceConfig, factories: dict[str, Callable], *,
                   name: str, folder: str | Path) -> None:
    """:func:`fit_on_workers` of one training, as a cell and a search trial run it: each worker registers
    ``factories`` (methods the driver registered), takes its share of the threads, and calls
    ``train_rank(device, ranks=ranks)`` with its device and rank."""
    fit_on_workers(_worker_loop, {"train_rank": train_rank, "resources": resources, "factories": factories},
                   resources, name=name, folder=folder)


def fit_on_workers(worker_loop: Callable[[dict[str, Any]], None], setup: dict[str, Any], resources: ResourceConfig,
                   *, name: str, folder: str | Path) -> None:
    """Run ``worker_loop(setup)`` in ``training_workers(resources)`` Ray Train workers, each with one worker's
    share of ``resources``, restarting them all (up to :data:`MAX_FAILURES` times) when one is lost; raises what
    a worker raised, and a :class:`~bench.errors.UserError` or non-finite loss (``FloatingPointError``) as itself,
    without a restart. First refuses workers the cluster can never hold at once (:func:`check_workers_fit`).
    ``folder``: Ray Train's own run folder (logs), on storage every node can reach."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_workers_fit(resources)
    handed_back = Path(folder) / HANDED_BACK_FOLDER
    shutil.rmtree(handed_back, ignore_errors=True)  # an earlier run's: its error may be fixed now
    share = worker_resources(resources)
    per_worker = {"CPU": share.cpus_per_cell, **({"GPU": share.gpus_per_cell} if share.gpus_per_cell else {})}
    trainer = TorchTrainer(
        _handing_back_worker_loop, train_loop_config={"loop": worker_loop, "setup": setup, "folder": str(handed_back)},
        scaling_config=ScalingConfig(num_workers=training_workers(resources), use_gpu=share.gpus_per_cell > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=str(folder),
                             failure_config=FailureConfig(max_failures=MAX_FAILURES)))
    try:
        failure = trainer.fit().error
    except Exception as exc:  # noqa: BLE001 - Ray Train 2.x raises what older versions returned
        failure = exc
    error = handed_back_error(handed_back)
    if error is not None:
        raise error from None  # the worker's own one line; Ray's wrapping would only hide it
    if failure is not None:
        raise failure


def handed_back_error(folder: str | Path) -> Exception | None:
    """The error the workers handed back in ``folder`` (the lowest rank's), or None."""
    records = sorted(Path(folder).glob("rank-*.json"), key=lambda path: int(path.stem.split("-")[1]))
    if not records:
        return None
    record = json.loads(records[0].read_text())
    return HANDED_BACK[record["type"]](record["message"])


def _handing_back_worker_loop(config: dict[str, Any]) -> None:
    """A Ray Train worker: ``config["loop"](config["setup"])``, handing back the errors of :data:`HANDED_BACK`.

    They are recorded in ``config["folder"]`` and the worker returns normally, so Ray Train does not restart the
    group. Every rank meets them at the same point (a UserError comes from the config or files every rank reads
    alike; the non-finite check is agreed over the ranks), so no rank is left waiting in a collective. A group
    restarted for another reason after one was handed back trains nothing: the driver raises it."""
    folder = Path(config["folder"])
    if any(folder.glob("rank-*.json")):
        return
    try:
        config["loop"](config["setup"])
    except tuple(HANDED_BACK.values()) as exc:
        from bench.run.data_parallel import Ranks
        from bench.files import atomic_write_bytes

        folder.mkdir(parents=True, exist_ok=True)
        kind = next(name for name, error in HANDED_BACK.items() if isinstance(exc, error))
        rank = Ranks.of_process_group().rank
        atomic_write_bytes(folder / f"rank-{rank}.json", json.dumps({"type": kind, "message": str(exc)}).encode())


def worker_device(resources: ResourceConfig) -> "torch.device":
    """Inside a Ray Train worker: the GPU Ray Train gave it, or the CPU when the request has no GPU."""
    import torch

    if worker_resources(resources).gpus_per_cell > 0:
        from ray.train.torch import get_device

        return get_device()
    return torch.device("cpu")


def remove_run_folder(cell_dir: str | Path) -> None:
    shutil.rmtree(Path(cell_dir) / RUN_FOLDER, ignore_errors=True)


def _worker_loop(setup: dict[str, Any]) -> None:
    """One Ray Train worker of :func:`run_on_workers`: the training at this worker's rank, on its GPU or the CPU."""
    from bench.run.data_parallel import Ranks
    from bench.devices import deterministic_algorithms
    from bench.methods import register_method

    resources = setup["resources"]
    for name, factory in setup["factories"].items():
        register_method(name, factory)
    with torch_threads(cell_threads(worker_resources(resources))), deterministic_algorithms(resources.deterministic):
        setup["train_rank"](worker_device(resources), ranks=Ranks.of_process_group())
