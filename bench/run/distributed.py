"""Run benchmark cells as Ray tasks, with the CPU/GPU request of the config.

    with ray_cluster(config.resources):           # a local cluster, or --ray-address / RAY_ADDRESS
        outcomes = run_cells(config, cells, on_done=...)

A cell is one task, unless its pairs are split into evaluation shards (:mod:`bench.run.shards`: by
``--eval-shard-pairs``, or automatically when the cluster has more slots than cells fill); then it is a
training task, one task per shard (each loads the trained or published weights and evaluates its pairs)
and a merging task, chained by their results, every one with the cell's request. The driver submits
every unfinished cell at once and Ray runs as many tasks as the cluster's resources allow. A worker that
dies (crash, OOM kill, lost node) is a *system* failure: Ray re-runs the task (``max_retries``), and the
re-run resumes training from the cell's last checkpoint, or re-evaluates its shard, because the functions
of :mod:`bench.run.cell` are idempotent. Exceptions raised by a cell's code are not retried (they
would fail again): the other cells still run, and the failures are reported together at the end.

GPUs: a cell runs on the GPUs Ray assigned to its task, and a cell that asked for none runs on the CPU and
sees no GPU (:mod:`bench.devices`); a cell with a GPU gets a fresh worker process (:func:`cell_task_options`).

Workers need the project's code: on a local cluster they run on this machine, in this folder, with
this interpreter. On a remote cluster, install the package on every node (``pip install -e .``),
and put ``--out`` and the data on a filesystem mounted at the same path on every node: cells read
the frozen manifests and write their results there, and the driver reads them back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tqdm.auto import tqdm

from bench.run.cell import (TRAINED_FILE, CellSpec, cell_train_config, evaluate_shard, finish_cell, plan_cell_shards,
                        prepare_ground_truth,
                        check_fingerprint, run_cell, train_cell)
from bench.config import BenchmarkConfig, ResourceConfig
from bench.devices import deterministic_algorithms, gpu_memory_cap, resolve_device
from bench.errors import UserError
from bench.methods import get_factory, register_method
from bench.run.cell import check_batch_split
from bench.run.resources import (alive_nodes, cell_threads, check_feasible, cluster_slots, finish_task_memory, torch_threads,
                             training_workers, worker_resources)
from bench.run.shards import Shard, read_shard_done
from bench.run.step_board import StepBoard

#: set in finishing tasks' workers only: their own runtime environment, so Ray starts a fresh worker for each
FINISH_WORKER_ENV = "SAHN_BENCH_FINISHING_TASK"
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # cells exchange only small records: keep shared memory small
MAX_RETRIES = 3  # re-runs of a cell whose worker or node died
POLL_SECONDS = 0.5  # how often the driver refreshes the training bars
REPORT_EVERY_SECONDS = 0.5  # how often a worker sends its training step to the driver


@dataclass(frozen=True)
class CellOutcome:
    cell: CellSpec
    record: dict[str, Any]  # the cell's cell.json
    skipped: bool  # finished by an earlier invocation: read back, not run
    node_id: str | None = None  # Ray node that ran it (None when skipped or serial)


OnDone = Callable[[CellOutcome], None]


class CellsFailed(RuntimeError):
    """Some cells raised; every other cell finished and is recorded (re-running retries the failed ones)."""

    def __init__(self, failures: dict[str, str]):
        self.failures = failures
        lines = "\n".join(f"  {key}: {message}" for key, message in failures.items())
        super().__init__(f"{len(failures)} cell(s) failed (finished cells are kept; re-run to retry):\n{lines}")


# ------------------------------------------------------------------------------------ cluster
def cluster_address(resources: ResourceConfig) -> str | None:
    """``--ray-address``, else ``RAY_ADDRESS``; ``None`` means a new local cluster."""
    return resources.ray_address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_cluster(resources: ResourceConfig, *, log_to_driver: bool = True) -> Iterator[list[dict[str, float]]]:
    """Connect to Ray for the duration of the block and check that one cell's request fits on some
    node; yields the alive nodes' resources. A connection that already exists (a test fixture, a
    notebook) is used as is and left open; a cluster started here is shut down on exit."""
    import ray

    started_here = False
    if not ray.is_initialized():
        address = cluster_address(resources)
        try:
            if address:
                ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.WARNING)
            else:
                ray.init(address="local", include_dashboard=False, log_to_driver=log_to_driver,
                         object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if not address:
                raise UserError(f"cannot start a local Ray cluster ({exc})") from exc
            where = f"--ray-address {address}" if resources.ray_address else f"RAY_ADDRESS={address}"
            raise UserError(f"{where}: cannot connect to a Ray cluster ({exc})") from exc
        started_here = True
    try:
        nodes = alive_nodes()
        check_feasible(resources, nodes)
        yield nodes
    finally:
        if started_here:
            ray.shutdown()


@contextlib.contextmanager
def cell_settings(resources: ResourceConfig) -> Iterator[None]:
    """What a cell's run depends on besides its config, the same in a Ray task and with --serial: torch
    threads, ``--deterministic``, and on a shared GPU the cell's memory share. Resolving the device here,
    first, also hides the GPUs from a Ray task that asked for none before anything can initialise CUDA."""
    resources = worker_resources(resources)  # with several training workers, the share each evaluation task has
    device = resolve_device(resources.device, gpus_per_cell=resources.gpus_per_cell)
    with torch_threads(cell_threads(resources)), deterministic_algorithms(resources.deterministic), \
            gpu_memory_cap(device, resources.gpus_per_cell):
        yield


# ------------------------------------------------------------------------------------ the tasks
def _register(factories: dict[str, Callable]) -> None:
    """Make the method constructors the driver resolved exist in this worker (methods registered in the
    driver process — tests, notebooks — are not entry points)."""
    for name, factory in factories.items():
        register_method(name, factory)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _cell_task(config: BenchmarkConfig, cell: CellSpec, factories: dict[str, Callable], board: Any,
               shards: list[Shard] | None = None) -> tuple[dict, str]:
    """A cell in one task: train, evaluate (in one piece unless ``shards`` says otherwise), write
    (:func:`bench.run.cell.run_cell`)."""
    _register(factories)
    total = cell_train_config(config, cell).steps
    with cell_settings(config.resources):
        record = run_cell(config, cell, progress=False, on_step=_step_reporter(board, cell.key, total),
                          on_pairs=_pairs_reporter(board, cell.key, 0, shards[-1].stop if shards else None),
                          shards=shards or None)
    return record, _node_id()


def _train_task(config: BenchmarkConfig, cell: CellSpec, factories: dict[str, Callable], board: Any) -> dict:
    """A sharded cell's training (or the note that it has none), before any of its shards. With several
    training workers this task only starts them (:mod:`bench.run.ray_train`) and holds no resources itself."""
    _register(factories)
    total = cell_train_config(config, cell).steps
    alone = training_workers(config.resources) == 1
    with cell_settings(config.resources) if alone else contextlib.nullcontext():
        _, training = train_cell(config, cell, progress=False, on_step=_step_reporter(board, cell.key, total),
                                 factories=factories)
    return training


def _shard_task(config: BenchmarkConfig, cell: CellSpec, shard: Shard, factories: dict[str, Callable], board: Any,
                training: dict | None) -> dict:
    """One shard of a cell. ``training`` is the training task's result (None when it finished in an earlier
    run): passing it makes Ray start the shard only once the cell is trained."""
    _register(factories)
    with cell_settings(config.resources):
        return evaluate_shard(config, cell, shard, progress=False, extra={"node_id": _node_id()},
                              on_pairs=_pairs_reporter(board, cell.key, shard.start, shard.pairs))


def _ground_truth_task(config: BenchmarkConfig, cell: CellSpec, factories: dict[str, Callable]) -> str:
    """The ground truths' features of a manifest, once, before the shards of its sharded cells (on the cells'
    evaluation device: features must come from the device type the shards use)."""
    _register(factories)
    with cell_settings(config.resources):
        return prepare_ground_truth(config, cell)


def _finish_task(config: BenchmarkConfig, cell: CellSpec, shards: list[Shard], factories: dict[str, Callable],
                 ground_truth: str | None, *shard_records: dict) -> tuple[dict, str]:
    """Merge a sharded cell (started by Ray once every shard is finished and the manifest's ground-truth features
    exist: their results are its inputs). It holds CPUs and memory, no GPU: merging runs no network."""
    _register(factories)
    with torch_threads(cell_threads(config.resources)):
        return finish_cell(config, cell, shards, compute_ground_truth=False), _node_id()


def finish_task_options(resources: ResourceConfig, pairs: int, max_retries: int = MAX_RETRIES) -> dict[str, Any]:
    """A finishing task's Ray options: the cell's CPUs and the merge's memory, no GPU, in a fresh worker process
    that exits after it. Its memory request is then what the process holds: a reused worker would start from
    what earlier shards left in it, and keep the merge's freed heap (which CPython and the allocator do not
    return) for the tasks after it. Ray hands a task any idle worker of its runtime environment, so finishing
    tasks get one of their own (an environment variable, merged into the job's environment) and ``max_calls=1``
    ends each worker after its task. Starting a worker costs seconds; a cell's merge takes minutes."""
    return {**cell_task_options(dataclasses.replace(resources, gpus_per_cell=0), max_retries),
            "memory": finish_task_memory(pairs), "max_calls": 1,
            "runtime_env": {"env_vars": {FINISH_WORKER_ENV: "1"}}}


def _step_reporter(board: Any, key: str, total: int) -> Callable[[int, dict[str, float]], None]:
    last = [0.0]

    def report(step: int, losses: dict[str, float]) -> None:
        now = time.monotonic()
        if now - last[0] >= REPORT_EVERY_SECONDS or step + 1 == total:
            last[0] = now
            board.report.remote(key, step + 1)  # fire and forget: the training never waits for the driver

    return report


def _pairs_reporter(board: Any, key: str, piece: int, total: int | None) -> Callable[[int], None]:
    last = [0.0]

    def report(pairs_done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= REPORT_EVERY_SECONDS or pairs_done == total:
            last[0] = now
            board.report_pairs.remote(key, piece, pairs_done)  # fire and forget, as for training steps

    return report


@dataclass
class Submitted:
    """The Ray tasks of one cell: ``final`` returns ``(record, node id)``; ``refs`` are all of them (to cancel)."""

    cell: CellSpec
    final: Any
    refs: list[Any]
    pairs: int = 0  # pairs of the cell
    pairs_before: int = 0  # pairs in shards an earlier run finished


def submit_cells(config: BenchmarkConfig, cells: Sequence[CellSpec], board: Any, max_retries: int = MAX_RETRIES,
                 layouts: dict[CellSpec, list[Shard]] | None = None) -> dict[Any, CellSpec]:
    """Submit every cell's tasks with the config's resource request; returns {ref of its last task: cell}.

    A cell in one piece (the default for cells below a thousand pairs, see :mod:`bench.run.shards`) is one task. A
    cell in shards (``layouts``) is a training task, one task per unfinished shard and a merging task, chained by
    their results: Ray starts each task when its inputs exist, so the driver submits them all at once."""
    return {entry.final: entry.cell for entry in submit_cell_tasks(config, cells, board, max_retries, layouts)}


def submit_cell_tasks(config: BenchmarkConfig, cells: Sequence[CellSpec], board: Any, max_retries: int = MAX_RETRIES,
                      layouts: dict[CellSpec, list[Shard]] | None = None) -> list[Submitted]:
    factories = {name: get_factory(name) for name in sorted({cell.method for cell in cells})}
    layouts = layouts or {}
    workers = training_workers(config.resources)
    # With several training workers the training task starts them and holds nothing; every other task of the
    # cell asks for one worker's share, so its shards evaluate on as many GPUs as it trained on.
    evaluation = worker_resources(config.resources)
    whole, shard_task, truth_task = (remote_cell_function(function, evaluation, max_retries)
                                     for function in (_cell_task, _shard_task, _ground_truth_task))
    train = remote_cell_function(_train_task, dataclasses.replace(config.resources, cpus_per_cell=0, gpus_per_cell=0)
                                 if workers > 1 else config.resources, max_retries)
    submitted = []
    truths: dict[str, Any] = {}  # manifest folder → its ground-truth task (one per manifest, before its shards)
    for cell in cells:
        shards = layouts.get(cell, [])
        if len(shards) <= 1 and workers == 1:
            ref = whole.remote(config, cell, factories, board, shards or None)
            submitted.append(Submitted(cell, ref, [ref], sum(shard.pairs for shard in shards)))
            continue
        trained = None  # trained in an earlier run
        if not (Path(cell.cell_dir) / TRAINED_FILE).exists():
            trained = train.remote(config, cell, factories, board)
        refs = [] if trained is None else [trained]
        shard_refs, pairs_before = [], 0
        for shard in shards:
            if read_shard_done(cell.cell_dir, shard) is not None:  # finished earlier: kept
                pairs_before += shard.pairs
                continue
            shard_refs.append(shard_task.remote(config, cell, shard, factories, board, trained))
        if cell.manifest_dir not in truths:
            truths[cell.manifest_dir] = truth_task.remote(config, cell, factories)
            refs.append(truths[cell.manifest_dir])
        finish = remote_finish_function(evaluation, shards[-1].stop, max_retries)
        final = finish.remote(config, cell, shards, factories, truths[cell.manifest_dir], *shard_refs)
        refs += [*shard_refs, final]
        submitted.append(Submitted(cell, final, refs, shards[-1].stop, pairs_before))
    return submitted


def cell_task_options(resources: ResourceConfig, max_retries: int = MAX_RETRIES) -> dict[str, Any]:
    """Ray options of a cell's task. A cell with a GPU gets a fresh worker process (``max_calls=1``, which Ray
    applies by default only to GPU requests made in ``@ray.remote``, not through ``.options``): a reused
    worker would keep its CUDA context on the GPU it first saw, its allocator's cached memory and its
    cached metric networks. CPU cells reuse workers (starting one costs about a second)."""
    return {"num_cpus": resources.cpus_per_cell, "num_gpus": resources.gpus_per_cell,
            "max_calls": 1 if resources.gpus_per_cell > 0 else 0, "max_retries": max_retries,
            "retry_exceptions": False}


def remote_cell_function(function: Callable, resources: ResourceConfig, max_retries: int = MAX_RETRIES) -> Any:
    """``function`` as a Ray remote function with a cell's options (``max_calls`` is refused by ``.options``)."""
    import ray

    return ray.remote(**cell_task_options(resources, max_retries))(function)


def remote_finish_function(resources: ResourceConfig, pairs: int, max_retries: int = MAX_RETRIES) -> Any:
    """:func:`_finish_task` as a Ray remote function with :func:`finish_task_options`."""
    import ray

    return ray.remote(**finish_task_options(resources, pairs, max_retries))(_finish_task)


_BOARDS: dict[tuple[str, str], Any] = {}  # (driver's node, job) -> the board of that Ray job


def step_board() -> Any:
    """The training-step board (:class:`bench.run.step_board.StepBoard`) of this Ray job, created at the first
    call on the driver's node (if that node goes, the driver is gone anyway) and reused by later calls:
    starting an actor starts a worker process, which would compete with the first cells for the CPUs.
    The handle is kept because dropping it would end the actor; the actor ends with the job."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    context = ray.get_runtime_context()
    key = (context.get_node_id(), context.get_job_id())  # node ids are new in every cluster; job ids are not
    if key not in _BOARDS:
        here = NodeAffinitySchedulingStrategy(node_id=key[0], soft=True)
        _BOARDS.clear()  # boards of earlier jobs or clusters ended with them
        _BOARDS[key] = ray.remote(num_cpus=0)(StepBoard).options(scheduling_strategy=here).remote()
    return _BOARDS[key]


# ------------------------------------------------------------------------------------ the driver loop
def run_cells(config: BenchmarkConfig, cells: Sequence[CellSpec], *, on_done: OnDone | None = None,
              progress: bool = True, max_retries: int = MAX_RETRIES) -> list[CellOutcome]:
    """Run ``cells`` as Ray tasks (an initialised Ray connection is required: see :func:`ray_cluster`).

    Cells finished earlier are read back without a task. The unfinished ones are split into evaluation shards
    by ``--eval-shard-pairs`` (0: automatically, for the slots the cluster has; see :mod:`bench.run.shards`).
    ``on_done`` runs in the driver as each cell finishes (in completion order); the outcomes are returned in
    the order of ``cells``."""
    # before any task (and the bar): workers would meet it only after Ray Train had started them all
    check_batch_split(config, [cell for cell in cells if not (Path(cell.cell_dir) / TRAINED_FILE).exists()])
    outcomes: dict[CellSpec, CellOutcome] = {}
    bar = tqdm(total=len(cells), desc="cells", unit="cell", dynamic_ncols=True, disable=not progress)

    def finish(outcome: CellOutcome) -> None:
        outcomes[outcome.cell] = outcome
        bar.update(1)
        if on_done is not None:
            on_done(outcome)

    todo = []
    for cell in cells:
        record = check_fingerprint(config, cell)  # refuses a folder made with other options before any task runs
        if record is not None:
            finish(CellOutcome(cell, record, skipped=True))
        else:
            todo.append(cell)
    if todo:
        share = worker_resources(config.resources)  # what each evaluation task asks for
        slots = cluster_slots(alive_nodes(), share.cpus_per_cell, share.gpus_per_cell)
        layouts = plan_cell_shards(config, todo, slots)
        board = step_board()
        submitted = submit_cell_tasks(config, todo, board, max_retries=max_retries, layouts=layouts)
        try:
            failures = _drive(submitted, board, config, finish, progress)
        finally:
            bar.close()
        if failures:
            raise _failure(failures)
    bar.close()
    return [outcomes[cell] for cell in cells]


def _drive(submitted: list[Submitted], board: Any, config: BenchmarkConfig, finish: OnDone,
           progress: bool) -> dict[str, BaseException]:
    """Wait for every cell's last task, refreshing a training and an evaluation bar per running cell; returns
    the cells that raised (or whose training or a shard raised)."""
    import ray

    pending = {entry.final: entry for entry in submitted}
    failures: dict[str, BaseException] = {}
    bars: dict[str, tqdm] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                cell = pending.pop(ref).cell
                _close(bars, cell.key)
                try:
                    record, node_id = ray.get(ref)
                except ray.exceptions.RayError as exc:  # RayTaskError (the cell raised) or a lost worker/node
                    failures[cell.key] = exc
                    tqdm.write(f"FAILED {cell.key}: {_cause_line(exc)}")
                    continue
                finish(CellOutcome(cell, record, skipped=False, node_id=node_id))
            if progress and pending:
                _refresh_bars(bars, _progress(board), pending.values(), config)
    except BaseException:
        for entry in pending.values():  # Ctrl-C or a failing callback: stop the work in flight, keep what finished
            for ref in entry.refs:
                ray.cancel(ref, force=True)
        raise
    finally:
        for key in list(bars):
            _close(bars, key)
    return failures


def _progress(board: Any) -> dict[str, dict[str, int]]:
    import ray

    try:
        return ray.get(board.progress.remote(), timeout=10 * POLL_SECONDS)
    except ray.exceptions.RayError:  # bars are a courtesy: never let them stop the benchmark
        return {"steps": {}, "pairs": {}}


def _refresh_bars(bars: dict[str, tqdm], progress: dict[str, dict[str, int]], running: Any,
                  config: BenchmarkConfig) -> None:
    """A training bar (steps) and an evaluation bar (pairs, over all its shards) for each running cell."""
    for entry in running:
        key = entry.cell.key
        steps, pairs = progress["steps"].get(key), progress["pairs"].get(key)
        if steps is not None:
            if key not in bars:
                bars[key] = tqdm(total=cell_train_config(config, entry.cell).steps, desc=f"train {key}", unit="step",
                                 leave=False, dynamic_ncols=True)
            bars[key].update(steps - bars[key].n)
        if pairs is not None and entry.pairs:
            name = f"eval {key}"
            if name not in bars:
                bars[name] = tqdm(total=entry.pairs, desc=name, unit="pair", leave=False, dynamic_ncols=True)
            bars[name].update(entry.pairs_before + pairs - bars[name].n)


def _close(bars: dict[str, tqdm], key: str) -> None:
    for name in (key, f"eval {key}"):
        bar = bars.pop(name, None)
        if bar is not None:
            bar.close()


def _cause(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _cause_line(exc: BaseException) -> str:
    cause = _cause(exc)
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}" if not isinstance(cause, UserError) else lines[0]


def _failure(failures: dict[str, BaseException]) -> Exception:
    """One UserError when every failure is the user's to fix (bad files, options), else :class:`CellsFailed`."""
    messages = {key: _cause_line(exc) for key, exc in failures.items()}
    if all(isinstance(_cause(exc), UserError) for exc in failures.values()):
        return UserError("; ".join(f"{key}: {message}" for key, message in messages.items()))
    for key, exc in failures.items():
        if not isinstance(_cause(exc), UserError):
            tqdm.write(f"--- {key} ---\n{exc}")  # the worker's traceback, for debugging a method
    return CellsFailed(messages)
