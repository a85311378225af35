"""Ray's parallel efficiency on N independent cells with N CPUs, and the per-cell overhead of Ray + MLflow.

    python -m pipelines.benchmarks.ray_efficiency                 # N = the number of CPUs
    python -m pipelines.benchmarks.ray_efficiency --cells 4 --images 12

The cells are real benchmark cells (``diffusion_fill`` evaluated on a synthetic folder of images, one
seed each: identical, independent work), run through the same code as the pipeline:
  serial   each cell alone in this process, with the thread count a Ray task gets (1 per CPU asked)
  Ray      all N cells at once on a fresh local cluster of N CPUs, each finished cell logged to MLflow
           (sqlite) by the driver, exactly as ``pipelines.full_benchmark`` does
Parallel efficiency = T_serial / (N × T_ray), target ≥ 80%. The per-cell overhead is measured apart
from the work: the round trip of a Ray task for a cell that is already finished (submit → the record
is back in the driver: serialisation, scheduling, the task's imports and its read of cell.json) plus
the driver's MLflow logging of one finished cell; target ≤ 1 s. One-off costs (starting the cluster,
the job's progress-board actor, a fresh process's first cell: imports, metric networks, kernel caches)
are printed separately: this process and every worker run one untimed cell first, so both sides are
timed in their steady state.

For context it prints the CPU other processes took meanwhile, and the machine's own parallel
efficiency: N plain processes with a fixed load, alone versus at once, without Ray. On a shared
machine (or one whose vCPUs share cores) that ceiling is below 100%, for reasons that are not Ray's.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.run import distributed
from bench.run.resources import cell_threads, torch_threads
from bench.run.cell import CellSpec, run_cell
from bench.config import BenchmarkConfig, DataConfig, MaskConfig, ResourceConfig, TrackingConfig, to_dict
from bench.data.images import write_png
from bench.data.manifest import load_manifest
from bench.run.tracking import Tracker, default_uri

ROUND_TRIPS = 5
# A fixed single-threaded CPU load, for the machine's own parallel efficiency (no Ray, no harness).
BURN = """
import time, torch
torch.set_num_threads(1)
x, w = torch.rand(16, 3, 64, 64), torch.rand(3, 3, 3, 3)
start = time.perf_counter()
for _ in range(1500):
    x = torch.nn.functional.conv2d(x, w, padding=1).clamp(0, 1)
print(time.perf_counter() - start)
"""


def machine_efficiency(n: int) -> tuple[float, float, float]:
    """(seconds alone, seconds when n run at once, efficiency) of n plain processes with the same load:
    the ceiling for any scheduler on this machine right now (shared cores, hyper-threads, other users)."""
    import subprocess
    import sys

    def burn(count: int) -> list[float]:
        processes = [subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, text=True)
                     for _ in range(count)]
        return [float(p.communicate(timeout=600)[0]) for p in processes]

    alone = statistics.mean(burn(1)[0] for _ in range(n))
    together = max(burn(n))
    return alone, together, alone / together


class OtherLoad:
    """CPUs used by processes outside this benchmark (this process and everything it started) while
    the block ran: on a shared machine, the reason a measured efficiency can be low."""

    def __enter__(self) -> "OtherLoad":
        self.started = time.perf_counter()
        self.system_busy, self.ours = _system_busy(), _our_cpu()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.started
        others = (_system_busy() - self.system_busy) - (_our_cpu() - self.ours)
        self.cpus = max(0.0, others / wall) if wall > 0 else 0.0


def _system_busy() -> float:
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _our_cpu() -> float:
    import psutil

    total = 0.0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # exited meanwhile
            continue
    return total


def synthetic_folder(root: Path, count: int, size: int) -> Path:
    """Smooth random images (blocks plus noise): something for the fill and the metrics to work on."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        blocks = np.kron(rng.random((8, 8, 3)), np.ones((size // 8, size // 8, 1)))
        image = (255 * (0.8 * blocks + 0.2 * rng.random((size, size, 3)))).round().astype(np.uint8)
        write_png(root / f"{index:03d}.png", image)
    return root


def benchmark_config(work: Path, images: Path, cells: int, image_size: int) -> BenchmarkConfig:
    """``2 × cells`` cells: the first ``cells`` are timed, the others warm the processes up."""
    return BenchmarkConfig(out=str(work / "ray"), methods=["diffusion_fill"], seeds=list(range(2 * cells)),
                           save_images=True, data=DataConfig(datasets=[f"folder:{images}"], image_size=image_size),
                           masks=MaskConfig(bins=["(0.1,0.2]", "(0.3,0.4]", "(0.5,0.6]"]),
                           resources=ResourceConfig(device="cpu", cpus_per_cell=1.0),
                           tracking=TrackingConfig(experiment="ray-efficiency"))


def relocated(cells: list[CellSpec], old: Path, new: Path) -> list[CellSpec]:
    return [CellSpec(c.method, c.dataset, c.seed, c.cell_dir.replace(str(old), str(new), 1), c.manifest_dir)
            for c in cells]


def time_serial(config: BenchmarkConfig, cells: list[CellSpec]) -> list[float]:
    seconds = []
    with torch_threads(cell_threads(config.resources)):
        for cell in cells:
            started = time.perf_counter()
            run_cell(config, cell, progress=False)
            seconds.append(time.perf_counter() - started)
    return seconds


def time_round_trips(config: BenchmarkConfig, finished: list[CellSpec], repeats: int) -> list[float]:
    """Submit → record back for cells that are already finished: Ray's cost per cell without the work."""
    import ray

    board = distributed.step_board()
    seconds = []
    for index in range(repeats):
        cell = finished[index % len(finished)]
        started = time.perf_counter()
        (ref,) = distributed.submit_cells(config, [cell], board)
        ray.get(ref, timeout=120)
        seconds.append(time.perf_counter() - started)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=os.cpu_count() or 2, help="N: cells and CPUs (default: all CPUs)")
    parser.add_argument("--images", type=int, default=32, help="test images per cell (3 masks each)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--keep", default=None, help="keep the work folder here (default: a temporary folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("SAHN_BENCH_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(args.keep or tempfile.mkdtemp(prefix="ray-efficiency-")).resolve()
    try:
        run(work, args.cells, args.images, args.image_size)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, n: int, images: int, image_size: int) -> None:
    import ray

    from pipelines.full_benchmark import prepare

    load_before = os.getloadavg()
    config = benchmark_config(work, synthetic_folder(work / "images", images, image_size), n, image_size)
    plan = prepare(config)
    ray_cells, ray_warm_up = plan.cells[:n], plan.cells[n:]
    serial_cells, serial_warm_up = (relocated(cells, Path(config.out), work / "serial")
                                    for cells in (ray_cells, ray_warm_up))
    pairs = len(load_manifest(ray_cells[0].manifest_dir).pairs)
    print(f"{n} independent cells (diffusion_fill, {pairs} pairs at {image_size}² each) on {os.cpu_count()} CPUs; "
          f"load average before: {load_before[0]:.1f}")

    time_serial(config, serial_warm_up[:1])
    with OtherLoad() as serial_load:
        serial = time_serial(config, serial_cells)
    print(f"serial, one cell at a time in-process: {' + '.join(f'{s:.1f}' for s in serial)} = {sum(serial):.1f} s "
          f"(other processes meanwhile used {serial_load.cpus:.1f} of {os.cpu_count()} CPUs)")

    started = time.perf_counter()
    ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=False,
             object_store_memory=distributed.LOCAL_OBJECT_STORE_BYTES, logging_level=logging.WARNING)
    init_seconds = time.perf_counter() - started
    try:
        started = time.perf_counter()
        distributed.run_cells(config, ray_warm_up, progress=False)  # one cell per worker (one CPU each)
        warm_seconds = time.perf_counter() - started
        tracker = Tracker.open(default_uri(config.out), config.tracking.experiment)
        tracker.start_benchmark(to_dict(config), Path(config.out))
        logged = tracker.logged_digests()
        logging_seconds: list[float] = []

        def log(outcome: distributed.CellOutcome) -> None:
            begun = time.perf_counter()
            tracker.log_cell(outcome.cell.cell_dir, out=config.out, config_values=to_dict(config), logged=logged)
            logging_seconds.append(time.perf_counter() - begun)

        started = time.perf_counter()
        with OtherLoad() as ray_load:
            distributed.run_cells(config, ray_cells, on_done=log, progress=False)
        parallel = time.perf_counter() - started
        tracker.finish_benchmark()
        round_trips = time_round_trips(config, ray_cells, ROUND_TRIPS)
    finally:
        ray.shutdown()

    alone, together, ceiling = machine_efficiency(n)
    efficiency = sum(serial) / (n * parallel)
    print(f"Ray, {n} cells at once on {n} CPUs, MLflow logging included: {parallel:.1f} s "
          f"(other processes meanwhile used {ray_load.cpus:.1f} of {os.cpu_count()} CPUs)")
    print(f"speed-up {sum(serial) / parallel:.2f}x; parallel efficiency T_serial / (N × T_ray) = {efficiency:.0%} "
          f"(target ≥ 80%: {'met' if efficiency >= 0.8 else 'NOT met'})")
    print(f"for comparison, this machine without Ray: a fixed load takes {alone:.2f} s alone and {together:.2f} s "
          f"with {n} copies at once: efficiency {ceiling:.0%} (the ceiling for any scheduler here, now); "
          f"Ray reaches {efficiency / ceiling:.0%} of it")
    ray_overhead = statistics.mean(round_trips)
    mlflow_overhead = statistics.mean(logging_seconds)
    total = ray_overhead + mlflow_overhead
    print(f"per-cell overhead: Ray task round trip {ray_overhead:.3f} s (mean of {len(round_trips)}, "
          f"min {min(round_trips):.3f}) + MLflow logging {mlflow_overhead:.3f} s (mean of {len(logging_seconds)}) "
          f"= {total:.3f} s (target ≤ 1 s: {'met' if total <= 1.0 else 'NOT met'})")
    print(f"one-off: ray.init {init_seconds:.1f} s; the progress board and the first cell of {n} fresh workers, "
          f"at once: {warm_seconds:.1f} s")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
