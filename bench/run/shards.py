"""Evaluation shards: a cell's frozen pairs cut into runs of consecutive pairs that are evaluated as tasks of
their own (on as many GPUs as the cluster has) and merged back in manifest order.

Layout. Shards start at multiples of the evaluation batch size, so every batch of a sharded run is a batch of
the unsharded run: the merged ``per_image.csv``, ``features.npz`` and ``summary.csv`` are those of one piece.
(Per-pair results do not depend on the batch layout on the CPU anyway — see :mod:`bench.metrics.scoring` — but a
method's own network may, by float round-off.)

Files. Shard ``[start, stop)`` of a cell lives in ``<cell>/shards/<start>-<stop>/`` (seven-digit numbers):
``per_image.csv`` (floats written exactly, so the merge reads back the very values), ``features.npz``
(the composites' float32 features) and ``shard.json``, written last: a shard is finished when its ``shard.json``
exists, and a finished shard is never evaluated again (unless it was written in an earlier storage format).
Composites go straight to ``<cell>/images/``. Folders are named by their range, so a re-run with another layout
(another ``--eval-shard-pairs``, a bigger cluster) ignores the old shards instead of mixing them in; the merge
removes the shard folders once the cell's own files are written.

Memory. A shard's files are written as its batches are scored (:func:`bench.run.evaluate.write_pair_files`),
so an evaluation task holds one batch, not its shard. The merge streams: shard by shard, ``per_image.csv`` in
chunks of rows and each feature array in chunks read from the shard's mapped file, so its memory does not grow
with the cell's pairs except for the per-image scalars a summary averages (ratio and metrics: 8 bytes each per
pair, about 50 bytes a pair in all). The summary then reads features bin by bin
(:func:`bench.metrics.aggregate.summarize`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from bench.metrics.aggregate import StreamedArray, open_features, save_features, summarize, summary_columns
from bench.files import atomic_path, atomic_write_text
from bench.errors import UserError
from bench.run.evaluate import (FEATURES_FORMAT, GroundTruth, PairResults, ScoredBatch, WrittenPairs, as_batches,
                                cell_feature_entries, write_csv_atomic, write_pair_files)

SHARDS_FOLDER = "shards"
SHARD_DONE = "shard.json"
#: automatic sharding never makes shards smaller than this (each shard loads the method and the metric
#: networks once: small shards would spend more time loading than evaluating); smaller cells stay whole
AUTO_MIN_SHARD_PAIRS = 1000
#: columns of per_image.csv that hold text (everything else is a number)
TEXT_COLUMNS = ("pair_id", "image", "mask", "output", "bin", "digest")
#: rows of a shard's per_image.csv (and of its features) the merge holds at once
MERGE_CHUNK_ROWS = 4096


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


def finished_shard_size(cell_dir: str | os.PathLike, pairs: int, batch_size: int) -> int | None:
    """Pairs per shard of the shards an earlier run finished in ``cell_dir`` (None if there are none, or they do
    not form one layout with ``batch_size``): automatic sharding keeps that layout, so no finished shard is lost."""
    folder = Path(cell_dir) / SHARDS_FOLDER
    ranges = sorted(tuple(int(n) for n in done.parent.name.split("-")) for done in folder.glob(f"*/{SHARD_DONE}"))
    if not ranges:
        return None
    size = max(stop - start for start, stop in ranges)  # the last shard may be shorter
    layout = {(shard.start, shard.stop) for shard in shard_layout(pairs, batch_size, size)}
    return size if set(ranges) <= layout and size % batch_size == 0 else None


# ------------------------------------------------------------------------------------ shard files
def read_shard_done(cell_dir: str | os.PathLike, shard: Shard) -> dict[str, Any] | None:
    path = shard.folder(cell_dir) / SHARD_DONE
    return json.loads(path.read_text()) if path.exists() else None


def write_shard_files(cell_dir: str | os.PathLike, shard: Shard,
                      results: PairResults | Iterable[ScoredBatch]) -> WrittenPairs:
    """The shard's per_image.csv (floats exact: the merge reads them back) and features.npz, from results in
    memory or from batches written as the loop scores them. The shard is finished once
    :func:`write_shard_done` has written its record."""
    batches = as_batches(results) if isinstance(results, PairResults) else results
    written = write_pair_files(shard.folder(cell_dir), batches, float_format=None)
    if len(written.scalars) != shard.pairs:
        raise RuntimeError(f"shard {shard.name}: {len(written.scalars)} rows for {shard.pairs} pairs")
    return written


def write_shard_done(cell_dir: str | os.PathLike, shard: Shard, seconds: float, record: dict[str, Any]) -> dict:
    """``shard.json``, the shard's last file: its record, range and evaluation seconds."""
    done = {**record, "start": shard.start, "stop": shard.stop, "seconds": round(seconds, 3),
            "features_format": FEATURES_FORMAT}
    atomic_write_text(shard.folder(cell_dir) / SHARD_DONE, json.dumps(done, indent=2, sort_keys=True, default=str))
    return done


def read_shard_rows(cell_dir: str | os.PathLike, shard: Shard, chunk_rows: int = MERGE_CHUNK_ROWS
                    ) -> Iterator[pd.DataFrame]:
    """A shard's per-image rows, ``chunk_rows`` at a time, every float exactly as computed."""
    # Read as text and converted by Python's float(), which is exact for the shortest round-trip form written.
    with pd.read_csv(shard.folder(cell_dir) / "per_image.csv", dtype=str, keep_default_na=False,
                     chunksize=chunk_rows) as reader:
        for rows in reader:
            for column in rows.columns:
                if column not in TEXT_COLUMNS:
                    rows[column] = rows[column].replace("", "nan").astype(np.float64)
            yield rows


def read_shard(cell_dir: str | os.PathLike, shard: Shard) -> PairResults:
    """A shard's results, whole (for one shard; merging streams instead)."""
    per_image = pd.concat(list(read_shard_rows(cell_dir, shard)), ignore_index=True)
    features = {name: np.asarray(values) for name, values in open_features(shard.folder(cell_dir) / "features.npz").items()}
    done = read_shard_done(cell_dir, shard) or {}
    return PairResults(per_image, features, float(done.get("seconds", 0.0)))


def check_cover(cell_dir: str | os.PathLike, shards: Sequence[Shard], pairs: int) -> None:
    """Every shard finished, and together they cover the pairs exactly, in order."""
    covered = 0
    for shard in shards:
        if shard.start != covered:
            raise RuntimeError(f"{cell_dir}: shards leave a gap or overlap at pair {covered} ({shard.name})")
        if read_shard_done(cell_dir, shard) is None:
            raise RuntimeError(f"{cell_dir}: shard {shard.name} is not finished")
        covered = shard.stop
    if covered != pairs:
        raise RuntimeError(f"{cell_dir}: shards cover {covered} of {pairs} pairs")


def _streamed_features(cell_dir: str | os.PathLike, shards: Sequence[Shard],
                       chunk_rows: int) -> dict[str, StreamedArray]:
    """Each composite feature array of the cell, as the shards' arrays read in chunks, in manifest order."""
    first = open_features(shards[0].folder(cell_dir) / "features.npz")
    streamed = {}
    for name, values in first.items():
        width = values.shape[1:]

        def chunks(name: str = name) -> Iterator[np.ndarray]:
            for shard in shards:
                part = open_features(shard.folder(cell_dir) / "features.npz")[name]
                for start in range(0, len(part), chunk_rows):
                    yield np.asarray(part[start:start + chunk_rows], dtype=np.float32)

        streamed[name] = StreamedArray(np.dtype(np.float32), (shards[-1].stop - shards[0].start, *width), chunks())
    return streamed


def merge_shards(cell_dir: str | os.PathLike, shards: Sequence[Shard], pairs: int, ground_truth: GroundTruth,
                 chunk_rows: int = MERGE_CHUNK_ROWS) -> pd.DataFrame:
    """Write the cell's features.npz, per_image.csv and summary.csv (last) from its finished shards, in manifest
    order, as one piece would have; returns the summary. Streams (see the module's note on memory)."""
    check_cover(cell_dir, shards, pairs)
    cell_dir = Path(cell_dir)
    save_features(cell_dir / "features.npz", {**_streamed_features(cell_dir, shards, chunk_rows),
                                              **cell_feature_entries(ground_truth, cell_dir)})
    scalars: list[pd.DataFrame] = []
    with atomic_path(cell_dir / "per_image.csv") as temporary, open(temporary, "w", newline="") as stream:
        header = True
        for shard in shards:
            for rows in read_shard_rows(cell_dir, shard, chunk_rows):
                rows.to_csv(stream, index=False, header=header, float_format="%.10g")
                header = False
                scalars.append(summary_columns(rows))
    per_image = pd.concat(scalars, ignore_index=True)
    del scalars
    features = open_features(cell_dir / "features.npz")
    summary = summarize(per_image, {**{k: v for k, v in features.items() if k.startswith("pred/")},
                                    **ground_truth.arrays()})
    write_csv_atomic(summary, cell_dir / "summary.csv")
    return summary


def shards_seconds(cell_dir: str | os.PathLike, shards: Sequence[Shard]) -> float:
    """The shards' evaluation seconds, summed."""
    return sum(float((read_shard_done(cell_dir, shard) or {}).get("seconds", 0.0)) for shard in shards)


def remove_shards(cell_dir: str | os.PathLike) -> None:
    """Once the cell's merged files are written, its shards are redundant."""
    shutil.rmtree(Path(cell_dir) / SHARDS_FOLDER, ignore_errors=True)
