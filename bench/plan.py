"""A plan before the bill: what a benchmark will run and what it will cost, without running it.

    python -m pipelines.full_benchmark --config paper --plan                       # times each method here
    python -m pipelines.full_benchmark --config paper --plan --plan-latency-from results/efficiency

For every cell: its pairs, its evaluation shards (the layout the run would use on the cluster Ray sees), the
training steps it will run, and the evaluation cost per pair in two parts:
  inpaint   the method's ``inpaint`` per pair, from an efficiency results folder (``efficiency.csv`` of
            ``pipelines.efficiency``: throughput if measured, else latency ÷ batch size; rows of another image
            size are scaled by the pixel count), or else timed here on a few real pairs of the cell's
            manifest at the run's precision (one warm-up call, then one timed batch);
  harness   what the harness adds per pair (decode, composite, quantise, every metric and its networks, PNG),
            timed here with a method that returns its input.
Then the cell's evaluation GPU-hours (or CPU-hours for CPU cells: seconds × the cell's request), the totals,
and the evaluation's wall time on the cluster: its shards spread over the slots (cells the cluster runs at
once) longest first. Training is not estimated (no step latency is measured); the table gives its steps.
Latencies measured here are this machine's: on a GPU cluster, run the plan on one of its nodes, or pass the
efficiency folder measured there.
"""
from __future__ import annotations

import heapq
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from bench.cell import CellSpec, cell_method, cell_scorer, cell_train_config, plan_cell_shards
from bench.config import BenchmarkConfig
from bench.errors import UserError
from bench.evaluate import evaluate_pairs, inference_autocast, pair_batches, unit_float
from bench.manifest import load_manifest
from bench.methods import InpaintingMethod, get_factory
from bench.ray_train import worker_resources

EFFICIENCY_CSV = "efficiency.csv"  # what pipelines.efficiency writes
TIMED_PAIRS = 4  # pairs per timed call when a method is timed here


@dataclass
class CellCost:
    cell: CellSpec
    pairs: int
    shards: list[int]  # pairs per shard
    train_steps: int  # 0 when the cell does not train
    inpaint_seconds: float  # per pair
    harness_seconds: float  # per pair

    @property
    def eval_seconds(self) -> float:
        return self.pairs * (self.inpaint_seconds + self.harness_seconds)


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
        started = time.perf_counter()
        method.inpaint(images, masks, **extra)
        synchronize(device)
    return (time.perf_counter() - started) / len(images)


def time_harness(cell: CellSpec, config: BenchmarkConfig, device: torch.device, pairs: int = TIMED_PAIRS) -> float:
    """Seconds per pair the harness spends around ``inpaint`` (decode, composite, scores, features, PNG)."""
    manifest = load_manifest(cell.manifest_dir)
    scorer = cell_scorer(config, device)
    method = InputReturned().to(device)
    with tempfile.TemporaryDirectory(prefix="plan-") as folder:
        run = dict(scorer=scorer, batch_size=min(pairs, config.eval_batch_size), save_images=config.save_images,
                   image_dir=folder, progress=False)
        evaluate_pairs(method, manifest, start=0, stop=1, **run)  # warm-up: networks' first calls
        synchronize(device)
        timed = evaluate_pairs(method, manifest, start=0, stop=pairs, **run)
    return timed.seconds / len(timed.per_image)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ the plan
def wall_seconds(task_seconds: Sequence[float], slots: int) -> float:
    """When the last of independent tasks ends if ``slots`` run at once, each next task (longest first) on the
    slot that frees first: the scheduler's greedy rule, within 4/3 of the best possible."""
    ends = [0.0] * max(1, slots)
    for seconds in sorted(task_seconds, reverse=True):
        heapq.heapreplace(ends, ends[0] + seconds)
    return max(ends)


def estimate(config: BenchmarkConfig, cells: list[CellSpec], slots: int, device: torch.device,
             latency_folder: str | None = None, log=print) -> list[CellCost]:
    """The cost of every cell (see the module docstring); ``log`` tells what is being timed."""
    measured = efficiency_latencies(latency_folder, config.data.image_size) if latency_folder else {}
    layouts = plan_cell_shards(config, cells, slots)
    inpaint: dict[tuple, float] = {}
    harness: dict[str, float] = {}
    costs = []
    for cell in cells:
        if cell.manifest_dir not in harness:
            log(f"timing the harness on {TIMED_PAIRS} pairs of {Path(cell.manifest_dir).parent.name} ({device})")
            harness[cell.manifest_dir] = time_harness(cell, config, device)
        key = (cell.method, cell.weights.sha256 if cell.weights else None)
        if key not in inpaint:
            if cell.method in measured:
                inpaint[key] = measured[cell.method][0]
            else:
                log(f"timing {cell.method} on {TIMED_PAIRS} pairs ({device}, {config.resources.precision})")
                inpaint[key] = time_inpaint(cell_method(config, cell, device, trained=False), cell, config)
        train = cell_train_config(config, cell)
        trains = (getattr(get_factory(cell.method), "trainable", True) and train.steps > 0
                  and (cell.weights is None or train.finetune))
        shards = layouts[cell]
        costs.append(CellCost(cell, shards[-1].stop, [shard.pairs for shard in shards],
                              train.steps if trains else 0, inpaint[key], harness[cell.manifest_dir]))
    return costs


def render(config: BenchmarkConfig, costs: list[CellCost], slots: int, where: str, sources: list[str]) -> str:
    share = worker_resources(config.resources)  # an evaluation task's request
    gpus, cpus = share.gpus_per_cell, share.cpus_per_cell
    unit, per_cell = ("GPU-h", gpus) if gpus > 0 else ("CPU-h", cpus)
    header = ["cell", "pairs", "shards", "train steps", "inpaint ms/pair", "harness ms/pair", f"eval {unit}"]
    rows = [[cost.cell.key, f"{cost.pairs:,}", str(len(cost.shards)), f"{cost.train_steps:,}",
             f"{1000 * cost.inpaint_seconds:.1f}", f"{1000 * cost.harness_seconds:.1f}",
             f"{cost.eval_seconds * per_cell / 3600:.3g}"] for cost in costs]
    total_seconds = sum(cost.eval_seconds for cost in costs)
    rows.append(["total", f"{sum(c.pairs for c in costs):,}", str(sum(len(c.shards) for c in costs)),
                 f"{sum(c.train_steps for c in costs):,}", "", "", f"{total_seconds * per_cell / 3600:.3g}"])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(text.ljust(w) if i == 0 else text.rjust(w)  # noqa: E731
                                 for i, (text, w) in enumerate(zip(row, widths)))
    shard_seconds = [(cost.inpaint_seconds + cost.harness_seconds) * pairs for cost in costs for pairs in cost.shards]
    wall = wall_seconds(shard_seconds, slots)
    training = [cost for cost in costs if cost.train_steps]
    lines = [f"plan: {len(costs)} cells on {where}: {slots} slot(s) of {cpus:g} CPU + {gpus:g} GPU per evaluation task",
             line(header), line(["-" * w for w in widths]), *map(line, rows), "",
             f"evaluation wall time on {slots} slot(s): {wall / 3600:.3g} h ({wall:.0f} s); "
             f"evaluation {unit}: {total_seconds * per_cell / 3600:.3g}",
             (f"training not estimated: {len(training)} cell(s) train first, up to "
              f"{max(c.train_steps for c in training):,} steps each" if training else "no cell trains"),
             *sources, "nothing was run: no cell, no training (the test manifests are frozen, as a run would)"]
    return "\n".join(lines)
