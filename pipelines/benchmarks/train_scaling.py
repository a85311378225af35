"""Data-parallel training throughput with 1, 2, … Ray Train workers, and the scaling efficiency.

    python -m pipelines.benchmarks.train_scaling [--method ec_tiny] [--size 64] [--batch-per-worker 4]
                                                 [--steps 20] [--workers 1 2] [--cpus-per-worker 1] [--gpu]

Each run trains a fresh, identically seeded method on the embedded ``faces`` suite through the harness's own
path for a cell with several workers (:func:`bench.run.ray_train.fit_on_workers` → :func:`bench.run.train.train` with
the worker's rank: DDP, the batch split over the ranks), on a fresh local Ray cluster. Every worker takes
``--batch-per-worker`` images a step (weak scaling: N workers train on batches N times as large), so

    efficiency(N) = images/s with N workers / (N × images/s with one worker)

and 100% means the gradient all-reduce and the rest of the coordination cost nothing. Rank 0 times the steps
after the first (process-group warm-up, lazily built loss networks), after waiting for its device. Prints the
machine's core count, each worker's CPU share and torch threads. ``--gpu`` runs on GPUs (one per worker, NCCL);
without it, on CPUs with gloo, where the workers also compete for memory bandwidth with each other. Every worker
count of ``--workers`` is checked against the local cluster before the first run (``--gpu --workers 1 2`` on a
machine with one GPU stops with one line, instead of Ray Train waiting forever for the second GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.cli import run_main
from bench.config import ResourceConfig, TrainConfig
from bench.run.data_parallel import Ranks
from bench.data.datasets import load_image_set
from bench.run.resources import cell_threads, torch_threads
from bench.methods import create_method
from bench.run.ray_train import check_workers_fit, fit_on_workers, worker_device
from bench.run.resources import worker_resources
from bench.run.train import train


def _timed_training(setup: dict[str, Any]) -> None:
    """A Ray Train worker: train for ``steps`` steps at its rank; rank 0 writes its steps/s to ``setup["out"]``."""
    resources: ResourceConfig = setup["resources"]
    ranks = Ranks.of_process_group()
    device = worker_device(resources)
    images = load_image_set("faces", "train", image_size=setup["size"])
    with torch_threads(cell_threads(worker_resources(resources))):
        torch.manual_seed(0)
        method = create_method(setup["method"]).to(device)
        started: list[float] = []

        def on_step(step: int, losses: dict) -> None:
            if step == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started.append(time.perf_counter())

        steps = setup["steps"]
        config = TrainConfig(steps=steps, batch_size=setup["batch_per_worker"] * ranks.size, seed=0,
                             log_every=steps, checkpoint_every=steps + 1)
        train(method, images, config, on_step=on_step, progress=False, ranks=ranks)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if ranks.leader:
            rate = (steps - 1) / (time.perf_counter() - started[0])
            Path(setup["out"]).write_text(json.dumps({"steps_per_second": rate, "threads": torch.get_num_threads(),
                                                      "device": str(device)}))


def run_resources(workers: int, cpus_per_worker: float, gpu: bool) -> ResourceConfig:
    """The request of the run with ``workers`` workers."""
    return ResourceConfig(cpus_per_cell=cpus_per_worker * workers, gpus_per_cell=workers if gpu else 0,
                          train_workers=workers)


def measure(method: str, size: int, batch_per_worker: int, steps: int, workers: int, cpus_per_worker: float,
            gpu: bool, folder: Path) -> dict[str, Any]:
    resources = run_resources(workers, cpus_per_worker, gpu)
    out = folder / f"rate-{workers}.json"
    fit_on_workers(_timed_training, {"resources": resources, "method": method, "size": size, "steps": steps,
                                     "batch_per_worker": batch_per_worker, "out": str(out)},
                   resources, name=f"train-scaling-{workers}", folder=folder / "ray_train")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="ec_tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-per-worker", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL) instead of CPUs (gloo)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    if 1 not in args.workers:
        parser.error("--workers must include 1: efficiency is measured against one worker")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: torch sees no CUDA device here")
    needed = max(args.workers) * args.cpus_per_worker
    if needed > (os.cpu_count() or 1):
        parser.error(f"{max(args.workers)} workers × {args.cpus_per_worker:g} CPU do not fit on {os.cpu_count()} cores")
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        for workers in sorted(set(args.workers)):
            check_workers_fit(run_resources(workers, args.cpus_per_worker, args.gpu))
        run_all(args)
    finally:
        ray.shutdown()


def run_all(args: argparse.Namespace) -> None:
    """Train with each worker count of ``args.workers`` in turn and print its rate and efficiency."""
    print(f"{args.method}, {args.size}², {args.batch_per_worker} images per worker a step, {args.steps} steps, "
          f"{'GPUs (NCCL)' if args.gpu else 'CPUs (gloo)'}; {os.cpu_count()} cores, "
          f"{args.cpus_per_worker:g} CPU per worker")
    rates = {}
    with tempfile.TemporaryDirectory(prefix="train-scaling-") as folder:
        for workers in sorted(set(args.workers)):
            run = measure(args.method, args.size, args.batch_per_worker, args.steps, workers, args.cpus_per_worker,
                          args.gpu, Path(folder))
            rates[workers] = run["steps_per_second"] * args.batch_per_worker * workers
            efficiency = rates[workers] / (workers * rates[1]) if 1 in rates else float("nan")
            print(f"  {workers} worker(s): {run['steps_per_second']:.2f} steps/s, {rates[workers]:.1f} images/s, "
                  f"efficiency {efficiency:.0%} ({run['threads']} torch threads each, {run['device']})")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
