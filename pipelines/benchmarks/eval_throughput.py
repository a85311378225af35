"""The harness's own cost per evaluated pair, and how well one cell's evaluation spreads over CPUs.

    python -m pipelines.benchmarks.eval_throughput                      # 16 photos × 6 bins = 96 pairs at 256²
    python -m pipelines.benchmarks.eval_throughput --images 32 --shards 2

A method that returns its input (``bench.run.plan.InputReturned``) is evaluated on synthetic 256² JPEG photos
with six free-form masks each, so everything timed is the harness: decode, mask, composite, quantise,
scores, PNG write, CSV. Three figures, each printed with the machine's core count and load:

  pairs/s, in-process      ``bench.run.evaluate.evaluate`` of the whole cell with one torch thread (a cell's default),
                           ``--data-workers 0`` and then ``--data-workers 2``; once with every available metric
                           network (Lite0 distance and features offline) and once with PSNR/SSIM/MAE only (the
                           data path alone). The ground truths' features are cached first, as after the first
                           method of a benchmark.
  sharding efficiency      the cell in one piece in this process (one CPU) against the cell split into N shards
                           on a fresh local Ray cluster of N CPUs (one per shard), from submission to the merged
                           cell.json: efficiency = T_one / (N × T_sharded), target ≥ 80%. The Ray workers are
                           warmed up first (imports, metric networks) with another sharded cell, so both sides
                           are timed in their steady state. On a shared machine other processes take CPUs
                           from the shards: the script also prints the machine's own parallel efficiency for N
                           plain processes (the ceiling for any scheduler there), and what the sharding
                           machinery adds to the longest shard.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.run import distributed
from bench.run.resources import torch_threads
from pipelines.benchmarks.ray_efficiency import machine_efficiency
from bench.run.cell import CellSpec, run_cell
from bench.config import BenchmarkConfig, DataConfig, ResourceConfig, TrackingConfig
from bench.data.datasets import load_image_set
from bench.run.evaluate import evaluate
from bench.files import atomic_write_bytes
from bench.data.manifest import MaskProtocol, build_manifest, load_manifest
from bench.methods import register_method
from bench.run.plan import InputReturned
from bench.metrics.scoring import Scorer

METHOD = "input_returned"
BATCH = 16


def input_returned(**overrides) -> InputReturned:
    return InputReturned()


input_returned.trainable = False  # type: ignore[attr-defined]
register_method(METHOD, input_returned)


def synthetic_photos(root: Path, count: int, size: int) -> Path:
    """JPEGs (as CelebA and Places2 ship) of smooth colour blocks with noise."""
    rng = np.random.default_rng(0)
    (root / "test").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        blocks = np.kron(rng.random((8, 8, 3)), np.ones((size // 8, size // 8, 1)))
        pixels = (255 * (0.7 * blocks + 0.3 * rng.random((size, size, 3)))).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        atomic_write_bytes(root / "test" / f"{index:03d}.jpg", buffer.getvalue())
    return root


def machine() -> str:
    return f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"


def pairs_per_second(manifest, scorer: Scorer, out: Path, workers: int) -> float:
    method = InputReturned()
    with torch_threads(1):
        evaluate(method, manifest, out / "warm-up", scorer, batch_size=BATCH, progress=False, data_workers=workers)
        started = time.perf_counter()
        evaluate(method, manifest, out / "timed", scorer, batch_size=BATCH, progress=False, data_workers=workers)
    shutil.rmtree(out, ignore_errors=True)
    return len(manifest.pairs) / (time.perf_counter() - started)


def benchmark_config(out: Path, data: Path, size: int, shard_pairs: int) -> BenchmarkConfig:
    return BenchmarkConfig(out=str(out), methods=[METHOD], eval_batch_size=BATCH, eval_shard_pairs=shard_pairs,
                           data=DataConfig(datasets=[f"folder:{data}"], image_size=size),
                           resources=ResourceConfig(device="cpu", cpus_per_cell=1.0),
                           tracking=TrackingConfig(mlflow_uri=None))


def cell_in(out: Path, data: Path, manifest_dir: Path) -> CellSpec:
    return CellSpec(METHOD, f"folder:{data}", 0, str(out / METHOD), str(manifest_dir))


def sharding_efficiency(work: Path, data: Path, manifest_dir: Path, size: int, shards: int, pairs: int) -> None:
    import ray

    shard_pairs = -(-pairs // shards)
    one = benchmark_config(work / "one", data, size, 0)
    with distributed.cell_settings(one.resources):
        run_cell(one, cell_in(work / "warm", data, manifest_dir), progress=False)  # this process's first cell
        started = time.perf_counter()
        run_cell(one, cell_in(work / "one", data, manifest_dir), progress=False)
        alone = time.perf_counter() - started
    print(f"one piece, in-process, 1 CPU: {alone:.1f} s ({pairs / alone:.2f} pairs/s)   [{machine()}]")

    sharded = benchmark_config(work / "sharded", data, size, shard_pairs)
    ray.init(address="local", num_cpus=shards, include_dashboard=False, log_to_driver=False,
             object_store_memory=distributed.LOCAL_OBJECT_STORE_BYTES, logging_level=logging.WARNING)
    try:
        distributed.run_cells(sharded, [cell_in(work / "ray-warm", data, manifest_dir)], progress=False)
        started = time.perf_counter()
        (outcome,) = distributed.run_cells(sharded, [cell_in(work / "sharded", data, manifest_dir)], progress=False)
        together = time.perf_counter() - started
    finally:
        ray.shutdown()
    seconds = [shard["seconds"] for shard in outcome.record["eval_shards"]]
    print(f"{len(seconds)} shards on a local Ray cluster of {shards} CPUs: {together:.1f} s "
          f"(shards {' + '.join(f'{s:.1f}' for s in seconds)} s of evaluation; training, merging and Ray add "
          f"{together - max(seconds):.1f} s to the longest)   [{machine()}]")
    ours = (work / "sharded" / METHOD / "summary.csv").read_bytes()
    same = ours == (work / "one" / METHOD / "summary.csv").read_bytes()
    print(f"sharding efficiency over {shards} CPUs: {alone / (shards * together):.0%} (target ≥ 80%); "
          f"summary.csv identical to one piece: {same}   [{machine()}]")
    single, parallel, ceiling = machine_efficiency(shards)
    print(f"for context, this machine's own parallel efficiency right now ({shards} plain processes with a fixed "
          f"load, no Ray, no harness): {ceiling:.0%} ({single:.1f} s alone, {parallel:.1f} s at once)   [{machine()}]")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="test photos (6 pairs each)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--shards", type=int, default=os.cpu_count() or 2, help="N: shards and CPUs (default: all)")
    parser.add_argument("--skip", choices=["throughput", "sharding"], help="leave one part out")
    parser.add_argument("--keep", default=None, help="keep the work folder here (default: a temporary folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("SAHN_BENCH_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(args.keep or tempfile.mkdtemp(prefix="eval-throughput-")).resolve()
    try:
        data = synthetic_photos(work / "data", args.images, args.size)
        test_set = load_image_set("folder", "test", root=str(data), image_size=args.size)
        manifest = build_manifest(test_set, MaskProtocol(), work / "manifest")
        pairs = len(manifest.pairs)
        print(f"{pairs} pairs at {args.size}², batch {BATCH}, a method that returns its input   [{machine()}]")
        if args.skip != "throughput":
            cpu = torch.device("cpu")
            for label, scorer in (("every metric network", Scorer(device=cpu)),
                                  ("PSNR/SSIM/MAE only", Scorer(device=cpu, networks=False))):
                for workers in (0, 2):
                    rate = pairs_per_second(load_manifest(work / "manifest"), scorer, work / "eval", workers)
                    print(f"{label}, --data-workers {workers}: {rate:.2f} pairs/s ({1000 / rate:.1f} ms/pair)   "
                          f"[{machine()}]")
        if args.skip != "sharding":
            sharding_efficiency(work, data, work / "manifest", args.size, args.shards, pairs)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
