"""A rehearsal of one paper-size cell: the real pipeline at the paper's pair counts, measured per stage.

    python -m pipelines.benchmarks.paper_scale_rehearsal                  # 36,500 images × 6 bins = 219,000 pairs
    python -m pipelines.benchmarks.paper_scale_rehearsal --images 2000 --out rehearsal   # smaller, kept

What runs is the full benchmark's own machinery on one cell of Places2's size: ``prepare`` of
``pipelines.full_benchmark`` (image set, frozen NVIDIA-protocol manifest), ``bench.run.distributed.run_cells`` on a
local Ray cluster of this machine's CPUs (the manifest's ground-truth features once, the cell's evaluation in
shards, the finishing task that merges them and summarises), then ``reports.build``. Not run: training (the
method has none) and MLflow logging.

STAND-INS, only where compute is not what is measured (on 2 cores nothing else fits the time); every one is
named in the printed output and, through the method's ``substitutions`` and the metric networks' provenance,
in the report:
  method            ``stand_in_input_returned``: ``inpaint`` returns its input (registered here through
                    ``bench.methods.register_method``, as a user's code would)
  test images       synthetic, deterministic, small (``--image-size``, 32² by default) PNGs
  NVIDIA masks      synthetic, deterministic free-form masks in the six bins (``--mask-files``), used as the
                    NVIDIA test folder is
  set-level features  a fixed random projection of the image pooled to 8×8, of FID's width (2,048): the bytes,
                    merge and FID/KID arithmetic of a paper run, not a metric
  per-image distances ``lpips`` and ``lite0_dist`` are stubs (mean absolute difference of pooled images), so the
                    per-image columns and their summaries have the real shape
PSNR, SSIM and MAE are the real ones. Ray workers are separate processes: the stand-ins are installed in each
by Ray's ``worker_process_setup_hook`` (:func:`install_stand_ins`), which also wraps the stages to measure them;
nothing in ``bench/`` knows about the rehearsal.

Per stage it prints wall time, the peak RSS of the process that ran it and the peak of its private part
(anonymous pages: what the process holds, without the mapped feature files that the kernel can drop), both
sampled every 20 ms, the process's lifetime maximum RSS beside them (Ray reuses workers for shards; the
finishing task has a fresh one), and the bytes the stage wrote, per pair. Bytes are the files
each stage leaves: the shards' folders (removed by the merge, so counted when each shard ends), the kept
composites (``save_images: sample``, the paper preset's), the cell's merged files, the summary, the report.
``--budget-minutes`` stops the run (cancelling Ray's tasks) when it would take longer, printing what finished.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import io
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

#: where worker processes append their stage records (set for them through Ray's runtime_env)
LOG_ENV = "SAHN_REHEARSAL_STAGE_LOG"
METHOD = "stand_in_input_returned"
#: the set-level feature stand-in's name: not FID's, so no table calls its numbers FID
FEATURES = "stand_in_2048"
FEATURE_WIDTH = 2048  # FID's Inception pool3 width: what the bytes and the covariances are measured at
SAMPLE_SECONDS = 0.02
STAND_IN_NOTES = {
    "method": f"{METHOD}: inpaint returns its input (stand-in; no network)",
    "test images": "synthetic deterministic PNGs (stand-in for Places2's test set)",
    "masks": "synthetic free-form masks in the six bins, used as the NVIDIA test folder (stand-in)",
    "set-level features": f"{FEATURES}: fixed random projection of the image pooled to 8x8, {FEATURE_WIDTH}-d "
                          "(stand-in of FID's width, not a metric)",
    "per-image distances": "lpips, lite0_dist: stubs, mean absolute difference of pooled images (not the metrics)",
}


# ------------------------------------------------------------------------------------ stand-ins
def stand_in_input_returned(**overrides):
    from bench.run.plan import InputReturned

    method = InputReturned()
    method.substitutions = {"inpainting network": STAND_IN_NOTES["method"]}
    return method


stand_in_input_returned.trainable = False  # type: ignore[attr-defined]


class StandInFeatures(nn.Module):
    """STAND-IN of a feature network of FID's width, not a metric: only the storage, merge and set-level arithmetic
    of its features are what the rehearsal measures."""

    name = FEATURES

    def __init__(self):
        super().__init__()
        self.provenance = f"STAND-IN (not a metric): {STAND_IN_NOTES['set-level features']}"
        self.register_buffer("projection", torch.randn(3 * 8 * 8, FEATURE_WIDTH,
                                                       generator=torch.Generator().manual_seed(FEATURE_WIDTH)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images.float() / 255, 8).flatten(1) @ self.projection


class StubDistance(nn.Module):
    """STAND-IN of a per-image distance network (the embed/compare interface of LPIPS and the Lite0 distance)."""

    def __init__(self, name: str):
        super().__init__()
        self.provenance = f"STAND-IN stub of {name} (not the metric): {STAND_IN_NOTES['per-image distances']}"

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)]

    def compare(self, pred: list[torch.Tensor], gt: list[torch.Tensor]) -> torch.Tensor:
        return (pred[0] - gt[0]).abs().mean(dim=1)


@functools.lru_cache(maxsize=None)
def stand_in_scorer(compile_pixel_metrics: bool):
    from bench.metrics.scoring import Scorer

    scorer = Scorer(compile_pixel_metrics=compile_pixel_metrics, networks=False)  # the real PSNR, SSIM, MAE
    # Scorer has no public way to add networks; these are the same slots its own networks fill
    for name in ("lpips", "lite0_dist"):
        scorer._distances[name] = StubDistance(name)
        scorer._provenance[name] = scorer._distances[name].provenance
    scorer._extractors[FEATURES] = StandInFeatures()
    scorer._provenance[FEATURES] = scorer._extractors[FEATURES].provenance
    return scorer


# ------------------------------------------------------------------------------------ measuring a stage
def memory_bytes() -> tuple[int, int]:
    """This process's resident memory and its private part: the anonymous pages (heap, arrays), what the process
    really holds. The rest of RSS is mapped files (the features read by the merge and summary, the libraries),
    page cache the kernel drops under pressure. From /proc on Linux; elsewhere RSS minus its shared pages."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import psutil

        info = psutil.Process().memory_info()
        return info.rss, info.rss - getattr(info, "shared", 0)


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


class Sampler:
    """This process's memory (:func:`memory_bytes`) every :data:`SAMPLE_SECONDS` while a stage runs: ru_maxrss
    alone is the lifetime peak of a process, and Ray runs several stages in one worker."""

    def __init__(self):
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), *memory_bytes()))
            self._stop.wait(SAMPLE_SECONDS)

    def __enter__(self) -> "Sampler":
        self.samples.append((time.time(), *memory_bytes()))
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), *memory_bytes()))

    def mark(self) -> float:
        """A sample now (a stage boundary inside the sampled span: a short stage then has one of its own)."""
        now = time.time()
        self.samples.append((now, *memory_bytes()))
        return now

    def peak(self, start: float = -math.inf, stop: float = math.inf) -> tuple[int, int]:
        """The largest resident and private memory sampled between ``start`` and ``stop``."""
        inside = [(rss, private) for t, rss, private in self.samples if start <= t <= stop]
        return (max(rss for rss, _ in inside), max(private for _, private in inside)) if inside else (0, 0)


def tree_bytes(paths: Iterable[Path], skip_suffix: str | None = None) -> int:
    total = 0
    for path in paths:
        path = Path(path)
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            for directory, _, files in os.walk(path):
                total += sum((Path(directory) / name).stat().st_size for name in files
                             if skip_suffix is None or not name.endswith(skip_suffix))
    return total


def stage_record(stage: str, started: float, ended: float, peak: tuple[int, int], written: int, **extra: Any) -> dict:
    return {"stage": stage, "start": started, "end": ended, "seconds": ended - started, "peak_rss": peak[0],
            "peak_private": peak[1], "max_rss": max_rss_bytes(), "bytes": written, "pid": os.getpid(), **extra}


def append_record(record: dict) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as stream:  # one short line per write: appends from several workers do not interleave
            stream.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def measured(stage: str, outputs: Callable[[], Iterable[Path]], **extra: Any) -> Iterator[dict]:
    """Measure the block as ``stage`` (its wall time, sampled peak RSS and the bytes of ``outputs()`` at its end)
    and append the record to the stage log."""
    started = time.time()
    append_record({"stage": stage, "begin": started, "pid": os.getpid()})  # what a stopped run was doing
    with Sampler() as sampler:
        yield extra
    ended = time.time()
    append_record(stage_record(stage, started, ended, sampler.peak(), tree_bytes(outputs()), **extra))


# ------------------------------------------------------------------------------------ in every Ray worker
_FINISHING: dict[str, Any] = {}  # the finishing call running in this process: its start, sampler and cell folder


def install_stand_ins() -> None:
    """Ray's worker setup hook (and the driver's): the stand-in scorer and the stage wrappers."""
    import bench.run.cell
    import bench.run.distributed
    import bench.run.shards

    if getattr(bench.run.distributed, "_rehearsal_installed", False):
        return
    bench.run.distributed._rehearsal_installed = True
    bench.run.cell.cell_scorer = lambda config, device: stand_in_scorer(bool(config.compile_metrics))

    evaluate_shard, prepare_ground_truth = bench.run.distributed.evaluate_shard, bench.run.distributed.prepare_ground_truth
    finish_cell, summarize = bench.run.distributed.finish_cell, bench.run.shards.summarize

    def shard_measured(config, cell, shard, **kwargs):
        with measured("evaluation", lambda: [shard.folder(cell.cell_dir)], shard=shard.name, pairs=shard.pairs):
            return evaluate_shard(config, cell, shard, **kwargs)

    def ground_truth_measured(config, cell):
        from bench.data.manifest import load_manifest

        out = Path(cell.manifest_dir)
        with measured("ground truth", lambda: out.glob("gt_features-*.npz"),
                      images=len({pair.image for pair in load_manifest(out).pairs})):
            return prepare_ground_truth(config, cell)

    def summarize_measured(*args, **kwargs):
        # merge and summarise are one call in one task (merge_shards ends by summarising): split them here, and
        # record the merge at once, so a run stopped by its budget during the summary still shows it
        started, sampler, cell_dir = _FINISHING["start"], _FINISHING["sampler"], _FINISHING["cell_dir"]
        middle = sampler.mark()
        append_record(stage_record("merge", started, middle, sampler.peak(started, middle),
                                   tree_bytes([cell_dir / "features.npz", cell_dir / "per_image.csv"])))
        append_record({"stage": "summarise", "begin": middle, "pid": os.getpid()})
        summary = summarize(*args, **kwargs)
        _FINISHING["summarised"] = (middle, sampler.mark())
        return summary

    def finish_measured(config, cell, shards, **kwargs):
        cell_dir = Path(cell.cell_dir)
        with Sampler() as sampler:
            _FINISHING.update(start=sampler.mark(), sampler=sampler, cell_dir=cell_dir)
            record = finish_cell(config, cell, shards, **kwargs)
            ended = sampler.mark()
        middle, summarised = _FINISHING.pop("summarised")
        append_record(stage_record("summarise", middle, summarised, sampler.peak(middle, summarised),
                                   tree_bytes([cell_dir / "summary.csv"])))
        append_record(stage_record("finish", summarised, ended, sampler.peak(summarised, ended),
                                   tree_bytes([cell_dir / "cell.json"])))
        return record

    bench.run.distributed.evaluate_shard = shard_measured
    bench.run.distributed.prepare_ground_truth = ground_truth_measured
    bench.run.distributed.finish_cell = finish_measured
    bench.run.shards.summarize = summarize_measured


# ------------------------------------------------------------------------------------ synthetic inputs
def synthetic_images(folder: Path, count: int, size: int) -> None:
    """``count`` deterministic PNGs: smooth colour blocks with noise (something SSIM and the features vary on)."""
    rng = np.random.default_rng(0)
    block = max(1, size // 4)
    for index in range(count):
        blocks = np.kron(rng.random((size // block, size // block, 3)), np.ones((block, block, 1)))
        pixels = (255 * (0.7 * blocks + 0.3 * rng.random(blocks.shape))).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        path = folder / f"{index // 1000:03d}" / f"{index:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())  # not atomic: inputs.json, written last, marks the inputs complete


def synthetic_masks(folder: Path, count: int, size: int, bins: tuple[str, ...]) -> None:
    """``count`` masks, as many per bin, drawn in their bins by the project's free-form generator (seeded)."""
    from bench.data.images import atomic_write_bytes, encode_png
    from bench.data.masks import FreeFormConfig, generate_mask_in_bin

    config = FreeFormConfig("deepfill")
    per_bin = max(1, count // len(bins))
    for number, label in enumerate(bins):
        for k in range(per_bin):
            mask, _ = generate_mask_in_bin(size, label, 1_000_003 * number + k, config)
            atomic_write_bytes(folder / f"{number}_{k:05d}.png", encode_png(mask * np.uint8(255)))


def synthetic_inputs(work: Path, images: int, size: int, mask_files: int, bins: tuple[str, ...]) -> tuple[Path, Path]:
    """The test folder and mask folder, made once per (images, size, masks, bins) and reused after."""
    data, masks = work / "data" / "test", work / "nvidia_masks"
    identity = {"images": images, "size": size, "mask_files": mask_files, "bins": list(bins), "version": 1}
    marker = work / "inputs.json"
    if marker.exists() and json.loads(marker.read_text()) == identity:
        return data.parent, masks
    shutil.rmtree(work / "data", ignore_errors=True)
    shutil.rmtree(masks, ignore_errors=True)
    synthetic_images(data, images, size)
    synthetic_masks(masks, mask_files, size, bins)
    marker.write_text(json.dumps(identity))
    return data.parent, masks


# ------------------------------------------------------------------------------------ the run
def machine() -> str:
    return f"{os.cpu_count()} cores, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}"


class Budget:
    """Interrupts the main thread when the budget runs out (Ray's driver loop then cancels its tasks)."""

    def __init__(self, minutes: float):
        self.deadline = time.time() + 60 * minutes
        self.expired = False
        self._timer = threading.Timer(max(0.0, self.deadline - time.time()), self._expire)
        self._timer.daemon = True

    def _expire(self) -> None:
        import _thread

        self.expired = True
        _thread.interrupt_main()

    def __enter__(self) -> "Budget":
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def combine(stage: str, records: list[dict], pairs: int, extra_bytes: int = 0) -> dict | None:
    """Several processes' records of one stage as one row: the span of their wall times, the largest peak."""
    if not records:
        return None
    start, end = min(r["start"] for r in records), max(r["end"] for r in records)
    seconds = end - start if len(records) > 1 else records[0]["seconds"]
    written = sum(r["bytes"] for r in records) + extra_bytes
    where = f"{len(records)} Ray tasks" if len(records) > 1 else ("driver" if records[0]["pid"] == os.getpid()
                                                                  else "Ray task")
    return {"stage": stage, "seconds": seconds, "peak_rss": max(r["peak_rss"] for r in records),
            "peak_private": max(r["peak_private"] for r in records), "max_rss": max(r["max_rss"] for r in records),
            "bytes": written, "per_pair": written / pairs,
            "where": where}


def render(rows: list[dict]) -> str:
    header = f"{'stage':<28} {'wall s':>8} {'peak RSS MiB':>13} {'private MiB':>12} {'proc max MiB':>13} " \
             f"{'bytes written':>15} {'B/pair':>9}  process"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['stage']:<28} {row['seconds']:>8.2f} {row['peak_rss'] / 2**20:>13.0f} "
                     f"{row['peak_private'] / 2**20:>12.0f} {row['max_rss'] / 2**20:>13.0f} {row['bytes']:>15,d} "
                     f"{row['per_pair']:>9.1f}  {row['where']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import ray

    from bench.run import distributed
    from bench.metrics.aggregate import NVIDIA_BINS
    from bench.config import BenchmarkConfig, DataConfig, MaskConfig, ResourceConfig, TrackingConfig
    from bench.methods import register_method
    from bench.run.plan import manifest_bin_pairs, summary_seconds, time_summary
    from bench.run.resources import cell_threads
    from pipelines.full_benchmark import prepare
    from reports.build import build_report

    os.environ.setdefault("SAHN_BENCH_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    began = time.time()
    bins = tuple(NVIDIA_BINS[:args.bins]) if args.bins <= len(NVIDIA_BINS) else None
    if bins is None:
        raise SystemExit(f"--bins {args.bins}: at most {len(NVIDIA_BINS)} (the NVIDIA ratio bins)")
    pairs = args.images * len(bins)
    cpus = args.cpus or os.cpu_count() or 1
    shard_pairs = args.eval_shard_pairs or math.ceil(pairs / (args.shards or cpus))
    work = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="rehearsal-")).resolve()
    results = work / "results"
    if results.exists():
        shutil.rmtree(results)  # cells are keyed by folder: a rehearsal always measures a fresh run
    log = work / "stages.jsonl"
    log.unlink(missing_ok=True)
    os.environ[LOG_ENV] = str(log)

    print(f"paper-scale rehearsal: {args.images:,} test images × {len(bins)} bins = {pairs:,} pairs in one cell, "
          f"{args.image_size}² images, shards of {shard_pairs:,} pairs on a local Ray cluster of {cpus} CPUs "
          f"(1 CPU per task), eval batch {args.eval_batch_size}, save_images {args.save_images}")
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; work folder {work}")
    print("STAND-INS (compute not measured; labelled in the report's provenance too):")
    for role, what in STAND_IN_NOTES.items():
        print(f"  {role}: {what}")
    print("not run: training (the method has none), MLflow logging")

    started = time.time()
    data, mask_folder = synthetic_inputs(work, args.images, args.image_size, args.mask_files, bins)
    print(f"synthetic inputs ready in {time.time() - started:.1f} s (not a pipeline stage)", flush=True)

    register_method(METHOD, stand_in_input_returned)
    install_stand_ins()
    config = BenchmarkConfig(
        out=str(results), methods=[METHOD], eval_batch_size=args.eval_batch_size, eval_shard_pairs=shard_pairs,
        save_images=args.save_images, compile_metrics=args.compile_metrics,
        data=DataConfig(datasets=[f"folder:{data}"], image_size=args.image_size),
        masks=MaskConfig(source="nvidia", folder=str(mask_folder), bins=list(bins), masks_per_bin=1, seed=0),
        resources=ResourceConfig(device="cpu", cpus_per_cell=1.0), tracking=TrackingConfig(mlflow_uri=None))
    rows: list[dict] = []
    finished = True
    with Budget(args.budget_minutes - (time.time() - began) / 60) as budget:
        try:
            with measured("manifest", lambda: [results / "config.json", *results.glob("*/manifest"),
                                               *results.glob("*/split_test.csv")]):
                plan = prepare(config)
            print(f"manifest frozen: {sum(1 for _ in plan.cells)} cell, {pairs:,} pairs", flush=True)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     object_store_memory=distributed.LOCAL_OBJECT_STORE_BYTES, logging_level=logging.WARNING,
                     # OMP_NUM_THREADS as Ray sets it for a task of one CPU: the setup hook imports numpy, whose
                     # BLAS would otherwise size its thread pool before Ray sets the variable (and use every core)
                     runtime_env={"worker_process_setup_hook": f"{__name__}.install_stand_ins",
                                  "env_vars": {LOG_ENV: str(log), "SAHN_BENCH_OFFLINE": "1",
                                               "OMP_NUM_THREADS": str(cell_threads(config.resources))}})
            try:
                with distributed.ray_cluster(config.resources):
                    ray_started = time.time()
                    (outcome,) = distributed.run_cells(config, plan.cells, progress=args.progress)
                    ray_seconds = time.time() - ray_started
            finally:
                ray.shutdown()
            with measured("report", lambda: [results / "report.md", results / "report"]):
                report = build_report(results)
        except KeyboardInterrupt:
            if not budget.expired:
                raise
            finished = False
    records = read_records(log)
    by_stage: dict[str, list[dict]] = {}
    for record in records:
        if "begin" not in record:
            by_stage.setdefault(record["stage"], []).append(record)
    cell_dir = Path(plan.cells[0].cell_dir) if finished else None
    images = tree_bytes([cell_dir / "images"]) if cell_dir else 0
    for stage, label, extra in (("manifest", "manifest", 0), ("ground truth", "evaluation: ground truth", 0),
                                ("evaluation", "evaluation: shards", images), ("merge", "merge", 0),
                                ("summarise", "summarise", 0), ("finish", "finish: cell.json, tidy", 0),
                                ("report", "report", 0)):
        row = combine(stage, by_stage.get(stage, []), pairs, extra)
        if row is not None:
            rows.append({**row, "stage": label})
    print()
    print(render(rows))
    if not finished:
        ends = collections.Counter((r["stage"], r["pid"]) for r in records if "begin" not in r)
        running = []
        for r in records:  # a process runs its stages one after another: its k-th begin matches its k-th end
            if "begin" in r:
                if ends[r["stage"], r["pid"]] > 0:
                    ends[r["stage"], r["pid"]] -= 1
                else:
                    running.append(f"{r['stage']} (pid {r['pid']}, running for {time.time() - r['begin']:.0f} s)")
        print(f"BUDGET EXCEEDED: stopped after {args.budget_minutes:g} minutes; stages finished: "
              f"{', '.join(row['stage'] for row in rows) or 'none'}; unfinished: {', '.join(running) or 'none'}   "
              f"[{machine()}]")
        return 2
    dataset_folder = Path(plan.cells[0].manifest_dir).parent
    kept = tree_bytes([dataset_folder], skip_suffix=".png")
    shards = outcome.record.get("eval_shards", [])
    seconds = " + ".join(f"{shard['seconds']:.1f}" for shard in shards)
    print(f"shards: {len(shards)} × {shard_pairs:,} pairs, evaluation seconds {seconds}; run_cells (Ray tasks, "
          f"scheduling, merge) {ray_seconds:.1f} s")
    print(f"kept on disk, non-image files under the dataset's folder (manifest, ground-truth cache, cell): "
          f"{kept:,} B = {kept / pairs:,.1f} B/pair; composites kept ({args.save_images}): {images:,} B")
    print(f"finishing task: Ray memory request {distributed.finish_task_memory(pairs) / 2**30:.2f} GiB for "
          f"{pairs:,} pairs")
    summarised = next(row["seconds"] for row in rows if row["stage"] == "summarise")
    estimate = summary_seconds(manifest_bin_pairs(plan.cells[0].manifest_dir),
                               [time_summary(FEATURE_WIDTH, cell_threads(config.resources))])
    print(f"--plan's estimate of this summary: {estimate:.1f} s, measured {summarised:.1f} s "
          f"(predicted / actual {estimate / summarised:.2f})")
    print(f"report: {report}")
    print(f"total wall time {time.time() - began:.1f} s (budget {args.budget_minutes:g} min)   [{machine()}]")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=36_500, help="test images (Places2's test set: 36,500)")
    parser.add_argument("--bins", type=int, default=6, help="NVIDIA ratio bins, one pair each per image (6)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the synthetic images (stand-in size)")
    parser.add_argument("--mask-files", type=int, default=12_000,
                        help="synthetic NVIDIA mask files, spread over the bins (the NVIDIA test set: 12,000)")
    parser.add_argument("--shards", type=int, default=0, help="shards of the cell (default: one per CPU)")
    parser.add_argument("--eval-shard-pairs", type=int, default=0, help="pairs per shard (overrides --shards)")
    parser.add_argument("--cpus", type=int, default=0, help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--eval-batch-size", type=int, default=32, help="the paper preset's 32")
    parser.add_argument("--save-images", default="sample", choices=["all", "sample", "none"],
                        help="the paper preset's sample")
    parser.add_argument("--compile-metrics", action="store_true",
                        help="the compiled PSNR/SSIM/MAE kernel (the paper preset's; a compile per worker)")
    parser.add_argument("--out", default=None, help="work folder, kept (default: a temporary folder, removed)")
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="stop (exit 2) when the run takes longer")
    parser.add_argument("--progress", action="store_true", help="Ray's progress bars")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    # Run through the module's own name, so Ray pickles the method and the hook by reference, not as __main__'s.
    from pipelines.benchmarks.paper_scale_rehearsal import main as _main

    sys.exit(_main())
