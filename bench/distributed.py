"""Run benchmark cells as Ray tasks: one task per cell, with the CPU/GPU request of the config.

    with ray_cluster(config.resources):           # a local cluster, or --ray-address / RAY_ADDRESS
        outcomes = run_cells(config, cells, on_done=...)

The driver submits every unfinished cell at once and Ray runs as many as the cluster's resources
allow. A worker that dies (crash, OOM kill, lost node) is a *system* failure: Ray re-runs the task
(``max_retries``), and the re-run resumes training from the cell's last checkpoint because
:func:`bench.cell.run_cell` is idempotent. Exceptions raised by a cell's code are not retried (they
would fail again): the other cells still run, and the failures are reported together at the end.

Workers need the project's code: on a local cluster they run on this machine, in this folder, with
this interpreter. On a remote cluster, install the package on every node (``pip install -e .``),
and put ``--out`` and the data on a filesystem mounted at the same path on every node: cells read
the frozen manifests and write their results there, and the driver reads them back.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from tqdm.auto import tqdm

from bench.cell import CellSpec, cell_train_config, read_done, run_cell
from bench.config import BenchmarkConfig, ResourceConfig
from bench.errors import UserError
from bench.methods import get_factory, register_method
from bench.step_board import StepBoard

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


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


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


def check_feasible(resources: ResourceConfig, nodes: Sequence[dict[str, float]]) -> None:
    if resources.cpus_per_cell < 0 or resources.gpus_per_cell < 0:
        raise UserError("--cpus-per-cell and --gpus-per-cell must be ≥ 0")
    problem = infeasibility(cell_request(resources), nodes)
    if problem:
        raise UserError(f"{problem}: lower --gpus-per-cell / --cpus-per-cell, or use a "
                        "cluster with such a node (--ray-address)")
    if resources.device.startswith("cuda") and resources.gpus_per_cell <= 0:
        # Ray hides every GPU from a task that requests none, so the cell would fail on its first tensor.
        raise UserError(f"--device {resources.device} needs --gpus-per-cell > 0 under Ray")


def _count(value: float) -> str:
    return f"{value:g}"


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


# ------------------------------------------------------------------------------------ the task
def _cell_task(config: BenchmarkConfig, cell: CellSpec, factories: dict[str, Callable], board: Any) -> tuple[dict, str]:
    """Body of one Ray task. ``factories`` are the method constructors the driver resolved: registering
    them here makes methods registered in the driver process (tests, notebooks) exist in the worker."""
    import ray

    for name, factory in factories.items():
        register_method(name, factory)
    total = cell_train_config(config, cell).steps
    with torch_threads(cell_threads(config.resources)):
        record = run_cell(config, cell, progress=False, on_step=_step_reporter(board, cell.key, total))
    return record, ray.get_runtime_context().get_node_id()


def _step_reporter(board: Any, key: str, total: int) -> Callable[[int, dict[str, float]], None]:
    last = [0.0]

    def report(step: int, losses: dict[str, float]) -> None:
        now = time.monotonic()
        if now - last[0] >= REPORT_EVERY_SECONDS or step + 1 == total:
            last[0] = now
            board.report.remote(key, step + 1)  # fire and forget: the training never waits for the driver

    return report


def submit_cells(config: BenchmarkConfig, cells: Sequence[CellSpec], board: Any,
                 max_retries: int = MAX_RETRIES) -> dict[Any, CellSpec]:
    """One Ray task per cell with the config's resource request; returns {object ref: cell}."""
    import ray

    factories = {name: get_factory(name) for name in sorted({cell.method for cell in cells})}
    task = ray.remote(_cell_task).options(num_cpus=config.resources.cpus_per_cell,
                                           num_gpus=config.resources.gpus_per_cell,
                                           max_retries=max_retries, retry_exceptions=False)
    return {task.remote(config, cell, factories, board): cell for cell in cells}


_BOARDS: dict[tuple[str, str], Any] = {}  # (driver's node, job) -> the board of that Ray job


def step_board() -> Any:
    """The training-step board (:class:`bench.step_board.StepBoard`) of this Ray job, created at the first
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

    Cells finished earlier are read back without a task. ``on_done`` runs in the driver as each cell
    finishes (in completion order); the outcomes are returned in the order of ``cells``."""
    outcomes: dict[CellSpec, CellOutcome] = {}
    bar = tqdm(total=len(cells), desc="cells", unit="cell", dynamic_ncols=True, disable=not progress)

    def finish(outcome: CellOutcome) -> None:
        outcomes[outcome.cell] = outcome
        bar.update(1)
        if on_done is not None:
            on_done(outcome)

    todo = []
    for cell in cells:
        record = read_done(cell.cell_dir)
        if record is not None:
            finish(CellOutcome(cell, record, skipped=True))
        else:
            todo.append(cell)
    if todo:
        board = step_board()
        pending = submit_cells(config, todo, board, max_retries=max_retries)
        try:
            failures = _drive(pending, board, config, finish, progress)
        finally:
            bar.close()
        if failures:
            raise _failure(failures)
    bar.close()
    return [outcomes[cell] for cell in cells]


def _drive(pending: dict[Any, CellSpec], board: Any, config: BenchmarkConfig, finish: OnDone,
           progress: bool) -> dict[str, BaseException]:
    """Wait for the tasks, refreshing one training bar per running cell; returns the cells that raised."""
    import ray

    failures: dict[str, BaseException] = {}
    bars: dict[str, tqdm] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                cell = pending.pop(ref)
                _close(bars, cell.key)
                try:
                    record, node_id = ray.get(ref)
                except ray.exceptions.RayError as exc:  # RayTaskError (the cell raised) or a lost worker/node
                    failures[cell.key] = exc
                    tqdm.write(f"FAILED {cell.key}: {_cause_line(exc)}")
                    continue
                finish(CellOutcome(cell, record, skipped=False, node_id=node_id))
            if progress and pending:
                _refresh_bars(bars, _steps(board), pending.values(), config)
    except BaseException:
        for ref in pending:  # Ctrl-C or a failing callback: stop the work in flight, keep what finished
            ray.cancel(ref, force=True)
        raise
    finally:
        for key in list(bars):
            _close(bars, key)
    return failures


def _steps(board: Any) -> dict[str, int]:
    import ray

    try:
        return ray.get(board.snapshot.remote(), timeout=10 * POLL_SECONDS)
    except ray.exceptions.RayError:  # bars are a courtesy: never let them stop the benchmark
        return {}


def _refresh_bars(bars: dict[str, tqdm], steps: dict[str, int], running: Any, config: BenchmarkConfig) -> None:
    for cell in running:
        done = steps.get(cell.key)
        if done is None:
            continue
        if cell.key not in bars:
            total = cell_train_config(config, cell).steps
            bars[cell.key] = tqdm(total=total, desc=f"train {cell.key}", unit="step", leave=False, dynamic_ncols=True)
        bars[cell.key].update(done - bars[cell.key].n)


def _close(bars: dict[str, tqdm], key: str) -> None:
    bar = bars.pop(key, None)
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
