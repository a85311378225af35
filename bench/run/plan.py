"""A plan before the bill: what a benchmark will run and what it will cost, without running it.

    python -m pipelines.full_benchmark --config paper --plan                       # times each method here
    python -m pipelines.full_benchmark --config paper --plan --plan-latency-from results/efficiency \
        --plan-train-from results/plan_train.csv

For every cell: its pairs, its evaluation shards (the layout the run would use on the cluster Ray sees), and
  training    seconds per step × steps, plus the cell's setup (building the method, reading the training set, the
              first step's one-time costs). A step is timed here at the run's precision and image size, on one
              training worker's share of the batch (with several workers each takes its share; the gradient
              all-reduce is not counted), as the median time between the ends of the steps after a warm-up step; or
              read from a file (``--plan-train-from``: CSV ``method,step_seconds[,image_size,batch_size]``, scaled
              by pixels and batch when those differ: the first-order cost). Every plan writes the steps it timed to
              ``<out>/plan_train.csv`` in that format, so a plan made on a cluster node serves later ones.
              GPU-hours (CPU-hours) are the training seconds × the cell's whole request (every worker's share);
  evaluation  the method's ``inpaint`` per pair (from an efficiency results folder, ``--plan-latency-from``:
              throughput if measured, else latency ÷ batch size, other image sizes scaled by the pixel count; or
              timed here on a few real pairs at the run's precision) plus the harness's own cost per pair (decode,
              composite, quantise, every metric and its networks, PNG), timed with a method returning its input;
              each timed after a warm-up call, the faster of two calls (a slower one met other work); plus the
              summary: FID and KID of every bin (:func:`summary_seconds`, from one KID subset, one Fréchet
              distance and the covariances timed here at each feature width with the cell's CPU threads);
  disk        what the cell leaves, from the storage format: float32 composite features × the metric networks'
              dimensions per pair (+ a 4-byte ground-truth row index) in features.npz; the manifest's ground-truth
              cache once per test image and feature key (charged to the manifest's first cell); composites per
              ``save_images`` (all, the seeded sample, none) × the PNG bytes of a composite, taken as the mean PNG
              size of the first timed test images at the run's size (a composite is its test image with the hole
              repainted: smoother holes make real composites a little smaller); per_image.csv rows as long as the
              timed harness rows; model.pt (the method's state_dict bytes) and, while training runs,
              train_state.pt (weights + optimiser states after a real step: removed when the cell finishes, so it
              is a peak, not a total); the MLflow artifact copies (summary.csv, per_image.csv, losses.csv,
              model.pt, samples.png, the cell record, pip freeze); MLflow's database is not counted;
  memory      the finishing task's Ray ``memory`` request of a sharded cell
              (:func:`bench.run.resources.finish_task_memory`; cells in one piece have no finishing task).
Then the totals and the wall time on the cluster: every cell's training on the slots (one per worker), then its
shards once its training ended, longest first, then its summary. Latencies measured here are this machine's: on a
GPU cluster, run the plan on one of its nodes, or pass the files measured there. ``plan.json`` beside ``plan.txt`` holds the
figures (pipelines/benchmarks/plan_accuracy.py compares them with a real run).
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from bench import devices
from bench.run.cell import (CellSpec, cell_method, cell_scorer, cell_train_config, cell_trains, parse_dataset,
                        plan_cell_shards)
from bench.config import BenchmarkConfig
from bench.data.datasets import load_image_set
from bench.run.resources import finish_task_memory
from bench.errors import UserError
from bench.metrics.aggregate import DEFAULT_BINS, GT_ROWS, SET_METRIC_ROWS_IN_MEMORY, STREAM_CHUNK_ROWS, bin_members
from bench.metrics.functional import (FULL_KERNEL_MAX_ENTRIES, frechet_distance, kid_draws, kid_of_subsets,
                                      streamed_gaussian_statistics, unbiased_mmd2)
from bench.run.evaluate import (GT_FEATURES_FILE, distinct_images, evaluate_pairs, image_policy, inference_autocast, pair_batches,
                            sampled_pairs, unit_float)
from bench.data.images import encode_png
from bench.data.manifest import load_manifest
from bench.methods import InpaintingMethod
from bench.run.resources import cell_threads, training_workers, worker_resources
from bench.run.tracking import GRID_ROWS

EFFICIENCY_CSV = "efficiency.csv"  # what pipelines.efficiency writes
TRAIN_CSV = "plan_train.csv"  # the training steps a plan timed, in --plan-train-from's format
TIMED_PAIRS = 8  # pairs per timed call when a method is timed here
TIMED_CALLS = 2  # timed calls, of which the fastest counts: on a shared machine a slow one met other work
TIMED_STEPS = 4  # training steps timed after the warm-up step (the median counts, for the same reason)
FEATURE_BYTES = 4  # float32 composite and ground-truth features
ROW_INDEX_BYTES = 4  # int32 ground-truth row per pair
#: cell.json, summary.csv, the MLflow cell record and pip freeze: a few KB each, whatever the cell's size
RECORD_BYTES = 24 * 1024


@dataclass
class TrainTiming:
    step_seconds: float
    setup_seconds: float = 0.0  # building the method, reading the training set, the first step's one-time costs
    model_bytes: int = 0  # model.pt
    resume_bytes: int = 0  # train_state.pt
    loss_row_bytes: int = 0  # a row of losses.csv
    source: str = "timed here"


@dataclass
class Disk:
    """Bytes one cell leaves (``resume`` is transient: train_state.pt, removed when the cell finishes)."""

    features: int = 0
    ground_truth: int = 0
    composites: int = 0
    per_image: int = 0
    checkpoints: int = 0
    mlflow: int = 0
    other: int = 0
    resume: int = 0

    @property
    def total(self) -> int:
        return (self.features + self.ground_truth + self.composites + self.per_image + self.checkpoints
                + self.mlflow + self.other)


@dataclass
class CellCost:
    cell: CellSpec
    pairs: int
    shards: list[int]  # pairs per shard
    train_steps: int  # 0 when the cell does not train
    inpaint_seconds: float  # per pair
    harness_seconds: float  # per pair
    train: TrainTiming | None = None
    disk: Disk = field(default_factory=Disk)
    finish_memory: int | None = None  # bytes the finishing task asks Ray for; None: one piece, no finishing task
    summary_seconds: float = 0.0  # the set-level metrics of every bin, once the pairs are scored

    @property
    def eval_seconds(self) -> float:
        return self.pairs * (self.inpaint_seconds + self.harness_seconds) + self.summary_seconds

    @property
    def train_seconds(self) -> float:
        if not self.train_steps or self.train is None:
            return 0.0
        return self.train.setup_seconds + self.train_steps * self.train.step_seconds


# ------------------------------------------------------------------------------------ latencies
def efficiency_latencies(folder: str | os.PathLike, image_size: int) -> dict[str, tuple[float, str]]:
    """``{method: (seconds per pair, where it was measured)}`` from ``<folder>/efficiency.csv``."""
    path = Path(folder).expanduser() / EFFICIENCY_CSV
    if not path.is_file():
        raise UserError(f"--plan-latency-from {folder}: no {EFFICIENCY_CSV} there (python -m pipelines.efficiency "
                        "writes it)")
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    latencies = {}
    for row in frame.to_dict("records"):
        failed = row.get("error")
        if (isinstance(failed, str) and failed) or pd.isna(row.get("latency_ms")):  # an empty error reads as NaN
            continue
        throughput = row.get("throughput_img_s")
        seconds = (1.0 / throughput if isinstance(throughput, float) and math.isfinite(throughput) and throughput > 0
                   else row["latency_ms"] / 1000.0 / row["batch_size"])
        scale = (image_size / row["image_size"]) ** 2  # inpainting cost grows with the pixels, to first order
        note = f"{row.get('device_name') or row['device']} at {row['image_size']}²"
        latencies[row["method"]] = (seconds * scale, note + (f", scaled to {image_size}²" if scale != 1 else ""))
    return latencies


def measured_train_steps(path: str | os.PathLike, image_size: int, batch_size: int) -> dict[str, TrainTiming]:
    """``{method: timing}`` from a CSV of ``method,step_seconds`` with optional ``image_size`` and ``batch_size``
    columns (rows measured at other values are scaled by pixels and batch: a step's cost grows with both)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--plan-train-from {path}: no such file (a plan writes {TRAIN_CSV} in that format)")
    try:
        frame = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"--plan-train-from {path}: not a CSV ({exc})") from None
    missing = {"method", "step_seconds"} - set(frame.columns)
    if missing:
        raise UserError(f"--plan-train-from {path}: needs the columns method and step_seconds (missing "
                        f"{', '.join(sorted(missing))})")
    timings = {}
    for row in frame.to_dict("records"):
        seconds = float(row["step_seconds"])
        if not math.isfinite(seconds) or seconds <= 0:
            raise UserError(f"--plan-train-from {path}: step_seconds of {row['method']} is {row['step_seconds']!r}, "
                            "not a positive number")
        scale = 1.0
        if "image_size" in row and not pd.isna(row["image_size"]):
            scale *= (image_size / float(row["image_size"])) ** 2
        if "batch_size" in row and not pd.isna(row["batch_size"]):
            scale *= batch_size / float(row["batch_size"])
        setup = row.get("setup_seconds")
        timings[str(row["method"])] = TrainTiming(
            seconds * scale, 0.0 if setup is None or pd.isna(setup) else float(setup),
            source=f"{path.name}" + (f" (scaled ×{scale:.3g})" if scale != 1 else ""))
    return timings


class InputReturned(InpaintingMethod):
    """``inpaint`` returns its input: what is left of a cell's evaluation is the harness's own cost."""

    trainable = False

    def __init__(self):
        super().__init__(None)
        self.register_buffer("anchor", torch.zeros(()))  # gives the method a device

    def inpaint(self, images: torch.Tensor, masks: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return images


def time_inpaint(method: InpaintingMethod, cell: CellSpec, config: BenchmarkConfig, pairs: int = TIMED_PAIRS) -> float:
    """Seconds per pair of ``method.inpaint`` on the first ``pairs`` pairs of the cell's manifest."""
    manifest = load_manifest(cell.manifest_dir)
    device = method.device
    host = method.host_preprocessing("inpaint")
    batch = next(iter(pair_batches(manifest, list(manifest.pairs[:pairs]), pairs, device=device,
                                   host_preprocessing=host)))
    images, masks = unit_float(batch["image"]).to(device), batch["mask"].float().to(device)
    extra = {name: value.to(device) for name, value in batch["extra"].items()}
    method.eval()
    with torch.no_grad(), inference_autocast(device, config.resources.precision):
        method.inpaint(images[:1], masks[:1], **{k: v[:1] for k, v in extra.items()})  # warm-up: first-call costs
        synchronize(device)
        seconds = []
        for _ in range(TIMED_CALLS):
            started = time.perf_counter()
            method.inpaint(images, masks, **extra)
            synchronize(device)
            seconds.append(time.perf_counter() - started)
    return min(seconds) / len(images)


@dataclass
class HarnessTiming:
    seconds: float  # per pair
    feature_widths: dict[str, int]  # {"pred/<network>": dimensions}
    key_chars: int  # the ground-truth cache's feature key, as stored
    row_bytes: float  # a per_image.csv row without the composite's path
    path_bytes: float  # what a composite's path adds to its row
    png_bytes: float  # a composite's PNG


def measure_harness(cell: CellSpec, config: BenchmarkConfig, device: torch.device,
                    pairs: int = TIMED_PAIRS) -> HarnessTiming:
    """The harness's seconds per pair around ``inpaint`` (decode, composite, scores, features, PNG), and the sizes
    of what it writes per pair, from a few real pairs of the cell's manifest."""
    manifest = load_manifest(cell.manifest_dir)
    pairs = min(pairs, len(manifest.pairs))
    scorer = cell_scorer(config, device)
    method = InputReturned().to(device)
    with tempfile.TemporaryDirectory(prefix="plan-") as folder:
        run = dict(scorer=scorer, batch_size=min(pairs, config.eval_batch_size), save_images=config.save_images,
                   image_dir=folder, progress=False)
        evaluate_pairs(method, manifest, start=0, stop=1, **run)  # warm-up: networks' first calls
        synchronize(device)
        timed = min((evaluate_pairs(method, manifest, start=0, stop=pairs, **run) for _ in range(TIMED_CALLS)),
                    key=lambda result: result.seconds)
    rows = timed.per_image.copy()
    count = max(1, len(rows))
    widths = {name: int(np.prod(values.shape[1:])) for name, values in timed.features.items()}
    key = json.dumps(scorer.feature_key(device), sort_keys=True)
    rows["output"] = ""
    bare = len(rows.to_csv(index=False, header=False, float_format="%.10g").encode()) / count
    example = Path(cell.cell_dir) / "images" / f"{manifest.pairs[0].pair_id}.png"
    batch = next(iter(pair_batches(manifest, list(manifest.pairs[:pairs]), pairs, device=torch.device("cpu"),
                                   with_masks=False)))
    png = np.mean([len(encode_png(image.permute(1, 2, 0).contiguous().numpy())) for image in batch["image"]])
    return HarnessTiming(timed.seconds / count, widths, len(key), bare, len(str(example).encode()), float(png))


def time_harness(cell: CellSpec, config: BenchmarkConfig, device: torch.device, pairs: int = TIMED_PAIRS) -> float:
    """Seconds per pair the harness spends around ``inpaint`` (decode, composite, scores, features, PNG)."""
    return measure_harness(cell, config, device, pairs).seconds


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a nested state (what ``torch.save`` writes, less its small framing)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def time_training(config: BenchmarkConfig, cell: CellSpec, device: torch.device, steps: int = TIMED_STEPS
                  ) -> TrainTiming:
    """A cell's training as the run would do it, for 1 + ``steps`` steps on one worker's share of the batch, in
    memory (no checkpoint, nothing written): the setup until the first step ended, the seconds per later step, and
    the sizes of model.pt and train_state.pt from the method's real state after those steps."""
    from bench.run.train import train  # imported here, as bench.run.cell does: the training stack only when needed

    started = time.perf_counter()
    method = cell_method(config, cell, device, trained=False)
    dataset = parse_dataset(cell.dataset)
    train_set = load_image_set(dataset.kind, "train", root=dataset.root, image_size=config.data.image_size,
                               limit=config.data.train_limit, cache_dir=config.data.cache_dir)
    workers = training_workers(config.resources)
    run = cell_train_config(config, cell)
    timed = dataclasses.replace(run, steps=1 + steps, batch_size=max(1, run.batch_size // workers), log_every=1)
    ends: list[float] = []

    def on_step(step: int, losses: dict) -> None:
        synchronize(device)  # a step has ended when its device work has
        ends.append(time.perf_counter())

    with devices.cuda_tf32(device, devices.tf32_enabled(config.resources.tf32)):
        result = train(method, train_set, timed, on_step=on_step, progress=False,
                       data_workers=config.resources.data_workers, precision=config.resources.precision)
    history = pd.DataFrame(result.history)
    loss_row = len(history.to_csv(index=False, header=False, float_format="%.10g").encode()) / max(1, len(history))
    return TrainTiming(float(np.median(np.diff(ends))), ends[0] - started, tensor_bytes(method.state_dict()),
                       tensor_bytes(method.training_state()), round(loss_row))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_train_timings(path: str | os.PathLike, config: BenchmarkConfig, timings: dict[str, TrainTiming]) -> None:
    """The steps a plan timed, as ``--plan-train-from`` reads them."""
    rows = [{"method": method, "step_seconds": timing.step_seconds, "setup_seconds": timing.setup_seconds,
             "image_size": config.data.image_size,
             "batch_size": max(1, config.train.batch_size // training_workers(config.resources))}
            for method, timing in timings.items() if timing.source == "timed here"]
    if rows:
        pd.DataFrame(rows).to_csv(path, index=False)


# ------------------------------------------------------------------------------------ disk
def npz_bytes(entries: dict[str, int]) -> int:
    """Size of an uncompressed ``.npz`` of ``{name: payload bytes}``: each entry adds its ``.npy`` header and
    its zip headers (about 236 bytes plus its name twice, measured with :func:`bench.metrics.aggregate.save_features`)."""
    return 22 + sum(payload + 236 + 2 * len(name) for name, payload in entries.items())


def cell_disk(config: BenchmarkConfig, cell: CellSpec, harness: HarnessTiming, train: TrainTiming | None,
              train_steps: int, first_of_manifest: bool) -> Disk:
    """What the cell will leave on disk (see the module docstring for each part)."""
    manifest = load_manifest(cell.manifest_dir)
    pairs = len(manifest.pairs)
    policy = image_policy(config.save_images)
    saved = {"all": pairs, "sample": len(sampled_pairs(manifest)), "none": 0}[policy]
    cache = f"{GT_FEATURES_FILE.format(key='0' * 16)}"
    reference = len(os.path.relpath(Path(cell.manifest_dir) / cache, cell.cell_dir))
    unicode = 4  # numpy stores a str as 4-byte code points
    features = npz_bytes({**{name: pairs * width * FEATURE_BYTES for name, width in harness.feature_widths.items()},
                          "format": 8, "gt_cache": unicode * reference, "gt_key": unicode * 16,
                          GT_ROWS: pairs * ROW_INDEX_BYTES})
    images = len(distinct_images(manifest)[0])
    truth = npz_bytes({**{"gt/" + name.removeprefix("pred/"): images * width * FEATURE_BYTES
                          for name, width in harness.feature_widths.items()},
                       "images_digest": unicode * 64, "provenance": unicode * harness.key_chars})
    truth = truth if first_of_manifest else 0
    per_image = round(pairs * harness.row_bytes + saved * harness.path_bytes)
    grid = min(GRID_ROWS, len({pair.bin for pair in manifest.pairs})) * 2 * harness.png_bytes if saved else 0
    composites = round(saved * harness.png_bytes + grid)
    model = train.model_bytes if (train is not None and train_steps) else 0
    losses = train.loss_row_bytes * math.ceil(train_steps / max(1, config.train.log_every)) if model else 0
    mlflow = per_image + model + losses + round(grid) + RECORD_BYTES // 2
    return Disk(features=features, ground_truth=truth, composites=composites, per_image=per_image, checkpoints=model,
                mlflow=mlflow, other=losses + RECORD_BYTES // 2,
                resume=train.resume_bytes if model else 0)


# ------------------------------------------------------------------------------------ the summary
#: KID as every summary computes it (bench.metrics.aggregate.summarize's defaults)
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
#: rows per set when the set-level metrics are timed: one covariance chunk, above KID's subset size
SUMMARY_TIMED_ROWS = STREAM_CHUNK_ROWS


@dataclass(frozen=True)
class SummaryTiming:
    """The set-level metrics' costs at one feature width, timed here on synthetic float64 features."""

    width: int  # feature dimensions
    kid_subset_seconds: float  # the three kernels of one KID subset of KID_SUBSET_SIZE rows per set
    kid_index_seconds: float  # one subset read out of precomputed full kernels (small bins)
    frechet_seconds: float  # the distance between two Gaussians of this width (D×D covariances)
    row_seconds: float  # mean and covariance, per row of one set


def time_summary(width: int, threads: int, rows: int = SUMMARY_TIMED_ROWS) -> SummaryTiming:
    """:class:`SummaryTiming` at ``width`` with ``threads`` BLAS threads (what the finishing task has: Ray gives a
    task as many as its CPUs). Each part is timed after a call that warms it up; the whole takes seconds."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    sets = rng.standard_normal((2, rows, width))
    sets[1] += 0.1 * sets[0]
    subset = min(KID_SUBSET_SIZE, rows)
    draws = kid_draws(rows, rows, 1, subset, seed=0)
    (a, b), = kid_draws(2 * subset, 2 * subset, 1, subset, seed=1)
    kernel = rng.standard_normal((2 * subset, 2 * subset))  # stands for a small bin's precomputed full kernels

    def timed(call) -> float:
        call()  # warm-up: first-touch pages, BLAS buffers
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    with threadpool_limits(limits=threads, user_api="blas"):
        statistics = [streamed_gaussian_statistics(sets[0].__getitem__, rows, STREAM_CHUNK_ROWS)]  # and a warm-up
        started = time.perf_counter()
        statistics.append(streamed_gaussian_statistics(sets[1].__getitem__, rows, STREAM_CHUNK_ROWS))
        row_seconds = (time.perf_counter() - started) / rows
        frechet_seconds = timed(lambda: frechet_distance(*statistics[0], *statistics[1]))
        subset_seconds = timed(lambda: kid_of_subsets(sets[0].__getitem__, sets[1].__getitem__, draws))
        index_seconds = timed(lambda: unbiased_mmd2(kernel[np.ix_(a, a)], kernel[np.ix_(b, b)], kernel[np.ix_(a, b)]))
    scale = (KID_SUBSET_SIZE / subset) ** 2  # fewer rows than a subset (tests): scaled to a whole one
    return SummaryTiming(width, subset_seconds * scale, index_seconds * scale, frechet_seconds, row_seconds)


def summary_seconds(bin_pairs: Sequence[int], timings: Sequence[SummaryTiming]) -> float:
    """Seconds of a cell's set-level metrics: for every bin of ``bin_pairs`` pairs and every feature width, a
    Fréchet distance and KID, each in the regime :mod:`bench.metrics.aggregate` and
    :mod:`bench.metrics.functional` choose for the bin's size, from the costs timed at full size scaled as the
    arithmetic grows: covariances by the rows, kernels by the square of the rows, decompositions by the cube."""
    return sum(_frechet_seconds(pairs, timing) + _kid_seconds(pairs, timing)
               for pairs in bin_pairs if pairs >= 2 for timing in timings)


def _frechet_seconds(pairs: int, timing: SummaryTiming) -> float:
    if pairs > SET_METRIC_ROWS_IN_MEMORY or pairs >= timing.width:  # both sets' D×D covariances, then the distance
        return 2 * pairs * timing.row_seconds + timing.frechet_seconds
    share = pairs / timing.width  # fewer pairs than dimensions: the same distance from an N×N product
    return 2 * pairs * timing.row_seconds * share + timing.frechet_seconds * share ** 3


def _kid_seconds(pairs: int, timing: SummaryTiming) -> float:
    if pairs > SET_METRIC_ROWS_IN_MEMORY or pairs ** 2 > FULL_KERNEL_MAX_ENTRIES:  # every subset's kernels
        return KID_SUBSETS * timing.kid_subset_seconds
    subset_share = (min(pairs, KID_SUBSET_SIZE) / KID_SUBSET_SIZE) ** 2  # full kernels once, subsets read from them
    return (timing.kid_subset_seconds * (pairs / KID_SUBSET_SIZE) ** 2
            + KID_SUBSETS * timing.kid_index_seconds * subset_share)


def manifest_bin_pairs(manifest_dir: str | os.PathLike) -> list[int]:
    """Pairs in each bin a cell's summary reports (:data:`bench.metrics.aggregate.DEFAULT_BINS`)."""
    ratios = np.array([pair.ratio for pair in load_manifest(manifest_dir).pairs], dtype=np.float64)
    return [int(bin_members(ratios, label).sum()) for label in DEFAULT_BINS]


# ------------------------------------------------------------------------------------ the plan
def wall_seconds(task_seconds: Sequence[float], slots: int) -> float:
    """When the last of independent tasks ends if ``slots`` run at once, each next task (longest first) on the
    slot that frees first: the scheduler's greedy rule, within 4/3 of the best possible."""
    ends = [0.0] * max(1, slots)
    for seconds in sorted(task_seconds, reverse=True):
        heapq.heapreplace(ends, ends[0] + seconds)
    return max(ends)


def run_wall_seconds(costs: Sequence[CellCost], slots: int, workers: int = 1) -> float:
    """When the last cell ends on ``slots`` slots: each training first (longest first, on ``workers`` slots at
    once), then every shard (longest first) on the slot that frees first, not before its cell's training ended,
    then each cell's summary, not before its last shard ended."""
    ends = [0.0] * max(1, slots)
    trained: dict[int, float] = {}
    width = min(max(1, workers), len(ends))
    for index, cost in sorted(enumerate(costs), key=lambda item: -item[1].train_seconds):
        if cost.train_seconds <= 0:
            continue
        ends.sort()
        begin = ends[width - 1]  # the training starts once all its workers' slots are free
        for slot in range(width):
            ends[slot] = begin + cost.train_seconds
        trained[index] = begin + cost.train_seconds
    heapq.heapify(ends)
    tasks = sorted(((cost.inpaint_seconds + cost.harness_seconds) * pairs, index)
                   for index, cost in enumerate(costs) for pairs in cost.shards)
    evaluated: dict[int, float] = {}
    for seconds, index in reversed(tasks):
        free = heapq.heappop(ends)
        end = max(free, trained.get(index, 0.0)) + seconds
        heapq.heappush(ends, end)
        evaluated[index] = max(evaluated.get(index, 0.0), end)
    for index, cost in sorted(enumerate(costs), key=lambda item: -item[1].summary_seconds):
        if cost.summary_seconds > 0:  # the summary follows the cell's last shard
            free = heapq.heappop(ends)
            heapq.heappush(ends, max(free, evaluated.get(index, 0.0)) + cost.summary_seconds)
    return max(ends)


def estimate(config: BenchmarkConfig, cells: list[CellSpec], slots: int, device: torch.device,
             latency_folder: str | None = None, log=print, train_file: str | None = None) -> list[CellCost]:
    """The cost of every cell (see the module docstring); ``log`` tells what is being timed."""
    measured = efficiency_latencies(latency_folder, config.data.image_size) if latency_folder else {}
    workers = training_workers(config.resources)
    steps_from = (measured_train_steps(train_file, config.data.image_size,
                                       max(1, config.train.batch_size // workers)) if train_file else {})
    layouts = plan_cell_shards(config, cells, slots)
    inpaint: dict[tuple, float] = {}
    harness: dict[str, HarnessTiming] = {}
    training: dict[tuple, TrainTiming] = {}
    summaries: dict[int, SummaryTiming] = {}  # by feature width
    bin_pairs: dict[str, list[int]] = {}
    costs = []
    for cell in cells:
        first_of_manifest = cell.manifest_dir not in harness
        if first_of_manifest:
            log(f"timing the harness on {TIMED_PAIRS} pairs of {Path(cell.manifest_dir).parent.name} ({device})")
            harness[cell.manifest_dir] = measure_harness(cell, config, device)
        key = (cell.method, cell.weights.sha256 if cell.weights else None)
        if key not in inpaint:
            if cell.method in measured:
                inpaint[key] = measured[cell.method][0]
            else:
                log(f"timing {cell.method} on {TIMED_PAIRS} pairs ({device}, {config.resources.precision})")
                inpaint[key] = time_inpaint(cell_method(config, cell, device, trained=False), cell, config)
        trains = cell_trains(config, cell)
        steps = cell_train_config(config, cell).steps if trains else 0
        if trains and key not in training:
            if cell.method in steps_from:
                training[key] = steps_from[cell.method]
            else:
                log(f"timing {cell.method}'s training: 1 + {TIMED_STEPS} steps ({device}, "
                    f"{config.resources.precision})")
                training[key] = time_training(config, cell, device)
        timing = training.get(key) if trains else None
        widths = list(harness[cell.manifest_dir].feature_widths.values())
        for width in sorted(set(widths) - set(summaries)):
            log(f"timing the set-level metrics (FID, KID) at {width} dimensions")
            summaries[width] = time_summary(width, cell_threads(config.resources))
        if cell.manifest_dir not in bin_pairs:
            bin_pairs[cell.manifest_dir] = manifest_bin_pairs(cell.manifest_dir)
        shards = layouts[cell]
        costs.append(CellCost(cell, shards[-1].stop, [shard.pairs for shard in shards], steps, inpaint[key],
                              harness[cell.manifest_dir].seconds, timing,
                              cell_disk(config, cell, harness[cell.manifest_dir], timing, steps, first_of_manifest),
                              finish_task_memory(shards[-1].stop) if len(shards) > 1 else None,
                              summary_seconds(bin_pairs[cell.manifest_dir], [summaries[width] for width in widths])))
    return costs


def training_timings(costs: Sequence[CellCost]) -> dict[str, TrainTiming]:
    return {cost.cell.method: cost.train for cost in costs if cost.train is not None}


def _size(count: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f} B"


def plan_figures(config: BenchmarkConfig, costs: list[CellCost], slots: int) -> dict[str, Any]:
    """The plan's figures, for ``plan.json``: per cell and in total, seconds and bytes."""
    workers = training_workers(config.resources)
    wall = run_wall_seconds(costs, slots, workers)
    cells = [{"cell": cost.cell.key, "pairs": cost.pairs, "shards": cost.shards, "train_steps": cost.train_steps,
              "train_step_seconds": cost.train.step_seconds if cost.train else None,
              "train_setup_seconds": cost.train.setup_seconds if cost.train else None,
              "train_seconds": cost.train_seconds, "eval_seconds": cost.eval_seconds,
              "inpaint_seconds_per_pair": cost.inpaint_seconds, "harness_seconds_per_pair": cost.harness_seconds,
              "summary_seconds": cost.summary_seconds,
              "disk": {**dataclasses.asdict(cost.disk), "total": cost.disk.total},
              "finish_memory_bytes": cost.finish_memory} for cost in costs]
    return {"slots": slots, "train_workers": workers, "wall_seconds": wall,
            "train_seconds": sum(c.train_seconds for c in costs), "eval_seconds": sum(c.eval_seconds for c in costs),
            "disk_bytes": sum(c.disk.total for c in costs), "cells": cells}


def held_seconds(cost: CellCost, gpus: float) -> float:
    """Seconds a cell's evaluation holds its evaluation request: a sharded cell's summary runs in a finishing
    task that holds CPUs but no GPU."""
    return cost.eval_seconds - (cost.summary_seconds if gpus > 0 and len(cost.shards) > 1 else 0.0)


def render(config: BenchmarkConfig, costs: list[CellCost], slots: int, where: str, sources: list[str]) -> str:
    share = worker_resources(config.resources)  # an evaluation task's request
    gpus, cpus = share.gpus_per_cell, share.cpus_per_cell
    unit, per_cell = ("GPU-h", gpus) if gpus > 0 else ("CPU-h", cpus)
    whole = config.resources  # a training holds the cell's whole request: every worker's share
    train_unit, train_per_cell = ("GPU-h", whole.gpus_per_cell) if whole.gpus_per_cell > 0 else ("CPU-h",
                                                                                                   whole.cpus_per_cell)
    workers = training_workers(config.resources)
    header = ["cell", "pairs", "shards", "train steps", "s/step", f"train {train_unit}", "inpaint ms/pair",
              "harness ms/pair", f"eval {unit}", "disk", "finish mem"]
    rows = [[cost.cell.key, f"{cost.pairs:,}", str(len(cost.shards)), f"{cost.train_steps:,}",
             f"{cost.train.step_seconds:.3g}" if cost.train_steps and cost.train else "-",
             f"{cost.train_seconds * train_per_cell / 3600:.3g}",
             f"{1000 * cost.inpaint_seconds:.1f}", f"{1000 * cost.harness_seconds:.1f}",
             f"{held_seconds(cost, gpus) * per_cell / 3600:.3g}", _size(cost.disk.total).replace(" ", ""),
             f"{cost.finish_memory / 2**30:.3g}GiB" if cost.finish_memory else "-"] for cost in costs]
    train_total = sum(cost.train_seconds for cost in costs)
    total_seconds = sum(held_seconds(cost, gpus) for cost in costs)
    disk_total = sum(cost.disk.total for cost in costs)
    memories = [cost.finish_memory for cost in costs if cost.finish_memory]
    rows.append(["total", f"{sum(c.pairs for c in costs):,}", str(sum(len(c.shards) for c in costs)),
                 f"{sum(c.train_steps for c in costs):,}", "", f"{train_total * train_per_cell / 3600:.3g}", "", "",
                 f"{total_seconds * per_cell / 3600:.3g}", _size(disk_total).replace(" ", ""),
                 f"{max(memories) / 2**30:.3g}GiB" if memories else "-"])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(text.ljust(w) if i == 0 else text.rjust(w)  # noqa: E731
                                 for i, (text, w) in enumerate(zip(row, widths)))
    wall = run_wall_seconds(costs, slots, workers)
    eval_wall = wall_seconds([(c.inpaint_seconds + c.harness_seconds) * p for c in costs for p in c.shards]
                             + [c.summary_seconds for c in costs if c.summary_seconds], slots)
    parts = {name: sum(getattr(c.disk, name) for c in costs)
             for name in ("features", "ground_truth", "composites", "per_image", "checkpoints", "mlflow", "other")}
    resume = max((c.disk.resume for c in costs), default=0)
    training = [cost for cost in costs if cost.train_steps]
    lines = [f"plan: {len(costs)} cells on {where}: {slots} slot(s) of {cpus:g} CPU + {gpus:g} GPU per evaluation task"
             + (f"; training in {workers} workers" if workers > 1 else ""),
             line(header), line(["-" * w for w in widths]), *map(line, rows), "",
             f"wall time on {slots} slot(s): {wall / 3600:.3g} h ({wall:.0f} s), training then evaluation; "
             f"evaluation alone {eval_wall / 3600:.3g} h ({eval_wall:.0f} s)",
             f"training {train_unit}: {train_total * train_per_cell / 3600:.3g} ({len(training)} cell(s), "
             f"{train_total:.0f} s{f' on {workers} workers each' if workers > 1 else ''}); "
             f"evaluation {unit}: {total_seconds * per_cell / 3600:.3g}; the summaries (FID and KID per bin, after a "
             f"cell's last shard) take {sum(c.summary_seconds for c in costs):.0f} s in all"
             + (", in CPU-only finishing tasks for sharded cells" if gpus > 0 else ""),
             f"disk: {_size(disk_total)} = " + ", ".join(f"{name.replace('_', ' ')} {_size(size)}"
                                                         for name, size in parts.items())
             + (f"; plus up to {_size(resume)} per training cell in train_state.pt while it trains" if resume else ""),
             (f"memory: finishing tasks ask Ray for {_size(min(memories))} to {_size(max(memories))} each "
              "(bench.run.resources.finish_task_memory)" if memories
              else "memory: no cell is sharded, so there is no finishing task (each cell's task merges nothing)"),
             *sources, "nothing was run but a few timed steps and pairs in memory: no cell, no cell folder "
             "(the test manifests are frozen, as a run would)"]
    return "\n".join(lines)


def write_figures(path: str | os.PathLike, config: BenchmarkConfig, costs: list[CellCost], slots: int) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(plan_figures(config, costs, slots), indent=2))
    os.replace(tmp, path)
