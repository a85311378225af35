"""Evaluation shards: a cell's frozen pairs cut into runs of consecutive pairs that are evaluated as tasks of
their own (on as many GPUs as the cluster has) and merged back in manifest order.

Layout. Shards start at multiples of the evaluation batch size, so every batch of a sharded run is a batch of
the unsharded run: the merged ``per_image.csv``, ``features.npz`` and ``summary.csv`` are those of one piece.
(Per-pair results do not depend on the batch layout on the CPU anyway — see :mod:`bench.scoring` — but a
method's own network may, by float round-off.)

Files. Shard ``[start, stop)`` of a cell lives in ``<cell>/shards/<start>-<stop>/`` (seven-digit numbers):
``per_image.csv`` (floats written exactly, so the merge reads back the very values), ``features.npz``
(the composites' features) and ``shard.json``, written last: a shard is finished when its ``shard.json``
exists, and a finished shard is never evaluated again. Composites go straight to ``<cell>/images/``. Folders
are named by their range, so a re-run with another layout (another ``--eval-shard-pairs``, a bigger cluster)
ignores the old shards instead of mixing them in; the merge removes the shard folders once the cell's own
files are written.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bench.aggregate import load_features, save_features
from bench.errors import UserError
from bench.evaluate import PairResults, write_csv_atomic

SHARDS_FOLDER = "shards"
SHARD_DONE = "shard.json"
#: automatic sharding never makes shards smaller than this (each shard loads the method and the metric
#: networks once: small shards would spend more time loading than evaluating); smaller cells stay whole
AUTO_MIN_SHARD_PAIRS = 1000
#: columns of per_image.csv that hold text (everything else is a number)
TEXT_COLUMNS = ("pair_id", "image", "mask", "output", "bin")


@dataclass(frozen=True)
class Shard:
    index: int  # position among the cell's shards
    start: int  # first pair (manifest order)
    stop: int  # one past the last pair

    @property
    def pairs(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"{self.start:07d}-{self.stop:07d}"

    def folder(self, cell_dir: str | os.PathLike) -> Path:
        return Path(cell_dir) / SHARDS_FOLDER / self.name


# ------------------------------------------------------------------------------------ layout
def shard_layout(pairs: int, batch_size: int, shard_pairs: int) -> list[Shard]:
    """Shards of ``shard_pairs`` pairs (rounded up to a multiple of ``batch_size``) over ``pairs`` pairs; one
    shard when ``shard_pairs`` is 0 or covers them all."""
    if batch_size < 1:
        raise UserError(f"--eval-batch-size {batch_size}: needs an integer ≥ 1")
    if shard_pairs < 0:
        raise UserError(f"--eval-shard-pairs {shard_pairs}: needs an integer ≥ 0 (0 = automatic)")
    size = math.ceil(shard_pairs / batch_size) * batch_size if shard_pairs else pairs
    if size <= 0 or size >= pairs:
        return [Shard(0, 0, pairs)]
    return [Shard(index, start, min(start + size, pairs)) for index, start in enumerate(range(0, pairs, size))]


def automatic_shard_pairs(cell_pairs: Sequence[int], slots: int) -> int:
    """Pairs per shard when ``--eval-shard-pairs`` is 0: the pairs of all cells spread evenly over the cluster's
    ``slots`` (how many cells it runs at once), but never below :data:`AUTO_MIN_SHARD_PAIRS`. With at least as
    many cells as slots (and cells of similar size) no cell is split; with more slots than cells the big cells
    are split until every slot has work. 0 (no split) when there is nothing to spread."""
    total = sum(cell_pairs)
    if slots <= 1 or total == 0:
        return 0
    return max(AUTO_MIN_SHARD_PAIRS, math.ceil(total / slots))


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


# ------------------------------------------------------------------------------------ shard files
def read_shard_done(cell_dir: str | os.PathLike, shard: Shard) -> dict[str, Any] | None:
    path = shard.folder(cell_dir) / SHARD_DONE
    return json.loads(path.read_text()) if path.exists() else None


def write_shard(cell_dir: str | os.PathLike, shard: Shard, results: PairResults, record: dict[str, Any]) -> dict:
    """The shard's rows and features, then ``shard.json`` (its record, with the range and timing) last."""
    folder = shard.folder(cell_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if len(results.per_image) != shard.pairs:
        raise RuntimeError(f"shard {shard.name}: {len(results.per_image)} rows for {shard.pairs} pairs")
    write_csv_atomic(results.per_image, folder / "per_image.csv", float_format=None)  # exact: the merge reads it
    save_features(folder / "features.npz", results.features)
    done = {**record, "start": shard.start, "stop": shard.stop, "seconds": round(results.seconds, 3)}
    tmp = folder / f".{SHARD_DONE}.tmp"
    tmp.write_text(json.dumps(done, indent=2, sort_keys=True, default=str))
    os.replace(tmp, folder / SHARD_DONE)
    return done


def read_shard(cell_dir: str | os.PathLike, shard: Shard) -> PairResults:
    folder = shard.folder(cell_dir)
    # Read as text and converted by Python's float(), which is exact for the shortest round-trip form written.
    per_image = pd.read_csv(folder / "per_image.csv", dtype=str, keep_default_na=False)
    for column in per_image.columns:
        if column not in TEXT_COLUMNS:
            per_image[column] = per_image[column].replace("", "nan").astype(np.float64)
    done = read_shard_done(cell_dir, shard) or {}
    return PairResults(per_image, load_features(folder / "features.npz"), float(done.get("seconds", 0.0)))


def merge_shards(cell_dir: str | os.PathLike, shards: Sequence[Shard], pairs: int) -> PairResults:
    """The shards' results in manifest order, as one piece; every shard must be finished and together they
    must cover the pairs exactly."""
    covered = 0
    for shard in shards:
        if shard.start != covered:
            raise RuntimeError(f"{cell_dir}: shards leave a gap or overlap at pair {covered} ({shard.name})")
        if read_shard_done(cell_dir, shard) is None:
            raise RuntimeError(f"{cell_dir}: shard {shard.name} is not finished")
        covered = shard.stop
    if covered != pairs:
        raise RuntimeError(f"{cell_dir}: shards cover {covered} of {pairs} pairs")
    parts = [read_shard(cell_dir, shard) for shard in shards]
    per_image = pd.concat([part.per_image for part in parts], ignore_index=True)
    names = parts[0].features.keys()
    features = {name: np.concatenate([part.features[name] for part in parts]) for name in names}
    return PairResults(per_image, features, sum(part.seconds for part in parts))


def remove_shards(cell_dir: str | os.PathLike) -> None:
    """Once the cell's merged files are written, its shards are redundant."""
    shutil.rmtree(Path(cell_dir) / SHARDS_FOLDER, ignore_errors=True)
