"""Every resource rule of a run in one place: what a cell, a training worker and an evaluation task ask Ray for,
how many of them a cluster holds, how many torch threads each uses, and which requests no cluster can serve.

All of it is arithmetic on :class:`~bench.config.ResourceConfig` and the nodes' resources (``ray.nodes()``'s
``Resources``), so the driver, ``--plan`` and the workers agree without asking Ray twice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Sequence

from bench.config import ResourceConfig
from bench.devices import parse_device, request_problem
from bench.errors import UserError


# ------------------------------------------------------------------------------------------ threads
def cell_threads(resources: ResourceConfig) -> int:
    """Torch threads per cell: the whole CPUs it asked for (at least one), the rule Ray uses for
    OMP_NUM_THREADS. Set explicitly, in Ray tasks and in --serial runs alike, because float sums depend
    on the thread count: the same config then gives bit-identical results either way."""
    return max(1, math.floor(resources.cpus_per_cell))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------- training workers
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


# ------------------------------------------------------------------------------------------ cluster
def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def cluster_slots(nodes: Sequence[dict[str, float]], cpus_per_cell: float, gpus_per_cell: float) -> int:
    """How many cells the nodes can run at once, each asking for ``cpus_per_cell`` CPUs and ``gpus_per_cell``
    GPUs (a cell runs on one node)."""
    slots = 0
    for node in nodes:
        fits = [node.get("CPU", 0.0) / cpus_per_cell if cpus_per_cell > 0 else math.inf,
                node.get("GPU", 0.0) / gpus_per_cell if gpus_per_cell > 0 else math.inf]
        per_node = min(fits)
        slots += 0 if math.isinf(per_node) else int(per_node + 1e-9)
    return slots


def cell_request(resources: ResourceConfig) -> dict[str, float]:
    return {"CPU": float(resources.cpus_per_cell), "GPU": float(resources.gpus_per_cell)}


def infeasibility(request: dict[str, float], nodes: Sequence[dict[str, float]]) -> str | None:
    """Why no single node can run a task asking for ``request`` (``None`` if some node can).

    Ray would keep such a task pending forever without an error, so the driver checks first."""
    wanted = {k: v for k, v in request.items() if v > 0}
    if any(all(node.get(k, 0.0) >= v for k, v in wanted.items()) for node in nodes):
        return None
    largest = {k: max((node.get(k, 0.0) for node in nodes), default=0.0) for k in wanted}
    asked = ", ".join(f"{_count(v)} {k}" for k, v in wanted.items())
    have = ", ".join(f"{_count(v)} {k}" for k, v in largest.items())
    return f"each cell asks for {asked}, but no node of the Ray cluster has that (largest node: {have}; {len(nodes)} node(s))"


def cluster_problem(resources: ResourceConfig, nodes: Sequence[dict[str, float]]) -> str | None:
    """Why the nodes (their total resources) can never hold all of ``resources``' training workers at once, or
    None. One worker counts too: Ray Train waits for a worker that no node can hold just as long."""
    workers = training_workers(resources)
    share = worker_resources(resources)
    if share.cpus_per_cell <= 0 and share.gpus_per_cell <= 0:
        return None
    fit = cluster_slots(nodes, share.cpus_per_cell, share.gpus_per_cell)
    if fit >= workers:
        return None
    totals = {kind: sum(node.get(kind, 0.0) for node in nodes) for kind in ("CPU", "GPU")}
    return (f"{workers} training worker(s) of {share.cpus_per_cell:g} CPU and {share.gpus_per_cell:g} GPU each, but "
            f"the Ray cluster ({len(nodes)} node(s), {totals['CPU']:g} CPU and {totals['GPU']:g} GPU in all) can hold "
            f"only {fit} of them at once, and Ray Train would wait forever for the rest")


def check_feasible(resources: ResourceConfig, nodes: Sequence[dict[str, float]]) -> None:
    """Refuse a request no node can run (with several training workers: one worker's share, and all of them)."""
    if resources.cpus_per_cell < 0 or resources.gpus_per_cell < 0:
        raise UserError("--cpus-per-cell and --gpus-per-cell must be ≥ 0")
    problem = request_problem(resources.device, resources.gpus_per_cell)  # a cell would fail on its first tensor
    if problem:
        raise UserError(problem)
    share = worker_resources(resources)
    if training_workers(resources) > 1 and parse_device(resources.device)[1]:
        raise UserError(f"--device {resources.device}: a cell with {training_workers(resources)} training workers "
                        "runs each of them, and each evaluation task, on one GPU of its own: use --device cuda or auto")
    problem = infeasibility(cell_request(share), nodes) or cluster_problem(resources, nodes)
    if problem:
        raise UserError(f"{problem}: lower --gpus-per-cell / --cpus-per-cell / --train-workers, or use a "
                        "cluster with such a node (--ray-address)")


def _count(value: float) -> str:
    return f"{value:g}"


# ----------------------------------------------------------------------------------- finishing task
#: memory a finishing task asks Ray for: the merge's fixed part (a few D×D float64 matrices per extractor, one
#: bin of at most bench.metrics.aggregate.SET_METRIC_ROWS_IN_MEMORY rows per set and KID's kernels, the interpreter with
#: torch and pandas) plus the per-pair scalars it averages (see bench.run.shards). Its growth per pair is tested in
#: tests/test_feature_storage.py; pipelines/benchmarks/paper_scale_rehearsal.py measures the whole task (its
#: figures are in docs/measurements.md). Mapped feature files count in RSS but not here: they are page cache.
FINISH_TASK_BASE_BYTES = 2 * 2**30
FINISH_TASK_BYTES_PER_PAIR = 256


def finish_task_memory(pairs: int) -> int:
    """Bytes of Ray's ``memory`` resource a finishing task of a ``pairs``-pair cell asks for, so a node starts no
    more merges than its memory holds."""
    return FINISH_TASK_BASE_BYTES + FINISH_TASK_BYTES_PER_PAIR * pairs
