"""From per-image results to the summary table: metric × ratio bin with N, set-level FID/KID, bootstrap CIs.

``per_image.csv`` is the source of truth; :func:`summarize` turns it (and the per-pair features of
``features.npz``) into the long frame ``bin, metric, value, n`` that reports render. Metric
conventions: :mod:`bench.metrics.functional`.
"""
from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from bench.files import atomic_path
from bench.errors import UserError
from bench.data.masks import PAPER_BINS, RATIO_BINS, bin_label, in_bin, parse_bin
from bench.metrics.functional import (frechet_distance, frechet_distance_of_features, kid, kid_draws, kid_of_subsets,
                                      streamed_gaussian_statistics)
from bench.metrics.table import PER_IMAGE_METRICS

NVIDIA_BINS = tuple(bin_label(low, high) for low, high in RATIO_BINS)
DEFAULT_BINS = PAPER_BINS + NVIDIA_BINS

#: set-level metric names (Fréchet distance, KID) for each feature extractor; FID only for Inception
SET_METRIC_NAMES = {"inception_v3_fid": ("FID", "KID"), "efficientnet_lite0": ("FD_lite0", "KID_lite0")}
SUMMARY_COLUMNS = ["bin", "metric", "value", "n"]


def bin_members(ratios, label: str) -> np.ndarray:
    """Boolean membership of every hole ratio in a bin, by :func:`bench.data.masks.in_bin` (half-open ``(a,b]``)."""
    parse_bin(label)  # a bad label is an error even when there are no ratios
    return np.array([in_bin(ratio, label) for ratio in np.asarray(ratios, dtype=np.float64)], dtype=bool)


# ---------------------------------------------------------------------------------- summary
def set_metric_names(extractor: str) -> tuple[str, str]:
    return SET_METRIC_NAMES.get(extractor, (f"FD_{extractor}", f"KID_{extractor}"))


#: a bin of at most this many pairs has its features read whole (at most 32 MiB per set at 2048 dimensions in
#: float64), exactly as FID and KID always took them; a larger bin streams its covariances and reads KID's
#: subsets by index, so a bin's memory never grows past this (KID switches to per-subset kernels at the same
#: size, see :data:`bench.metrics.functional.FULL_KERNEL_MAX_ENTRIES`).
SET_METRIC_ROWS_IN_MEMORY = 4096
#: rows per read when a bin's covariances are streamed
STREAM_CHUNK_ROWS = 4096
#: ``gt_rows`` in a features mapping: for every pair, the row of its test image in the ``gt/<extractor>`` arrays,
#: which then hold one row per test image (the manifest's cache) instead of one per pair
GT_ROWS = "gt_rows"


def _paired_extractors(features: Mapping[str, np.ndarray], rows: int) -> list[str]:
    """Extractor names with both ``pred/<name>`` and ``gt/<name>``, each with one row per pair (the ground
    truth through ``gt_rows`` when it is stored per image)."""
    names = []
    per_image_truth = GT_ROWS in features
    if per_image_truth and len(features[GT_ROWS]) != rows:
        raise ValueError(f"features {GT_ROWS!r} have {len(features[GT_ROWS])} rows for {rows} per-image rows")
    for key in features:
        side, _, name = key.partition("/")
        if side != "pred" or f"gt/{name}" not in features:
            continue
        for part in (key, *(() if per_image_truth else (f"gt/{name}",))):
            if len(features[part]) != rows:
                raise ValueError(f"features {part!r} have {len(features[part])} rows for {rows} per-image rows")
        names.append(name)
    return names


def _row_reader(features: Mapping[str, np.ndarray], key: str, positions: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``read(i)``: float64 rows of ``features[key]`` for the pairs ``positions[i]`` (of their test images for a
    per-image ground truth). Widening float32 to float64 is exact, so the values are those stored."""
    values = features[key]
    if key.startswith("gt/") and GT_ROWS in features:
        positions = np.asarray(features[GT_ROWS][positions], dtype=np.int64)

    def read(indices: np.ndarray) -> np.ndarray:
        return np.asarray(values[positions[indices]], dtype=np.float64)

    return read


def _set_level_rows(label: str, selected: np.ndarray, features: Mapping[str, np.ndarray], extractor: str,
                    kid_subsets: int, kid_subset_size: int, seed: int) -> list[dict]:
    fd_name, kid_name = set_metric_names(extractor)
    positions = np.flatnonzero(selected)
    n = len(positions)
    fd_value = kid_mean = kid_std = float("nan")
    if n >= 2:  # a covariance needs two samples; fewer gives NaN with n shown
        pred = _row_reader(features, f"pred/{extractor}", positions)
        truth = _row_reader(features, f"gt/{extractor}", positions)
        if n <= SET_METRIC_ROWS_IN_MEMORY:
            everything = np.arange(n)
            pred_rows, truth_rows = pred(everything), truth(everything)
            fd_value = frechet_distance_of_features(pred_rows, truth_rows)
            kid_mean, kid_std = kid(pred_rows, truth_rows, num_subsets=kid_subsets, subset_size=kid_subset_size,
                                    seed=seed)
        else:
            fd_value = frechet_distance(*streamed_gaussian_statistics(pred, n, STREAM_CHUNK_ROWS),
                                        *streamed_gaussian_statistics(truth, n, STREAM_CHUNK_ROWS))
            kid_mean, kid_std = kid_of_subsets(pred, truth, kid_draws(n, n, kid_subsets, kid_subset_size, seed))
    return [{"bin": label, "metric": fd_name, "value": fd_value, "n": n},
            {"bin": label, "metric": kid_name, "value": kid_mean, "n": n},
            {"bin": label, "metric": f"{kid_name}_std", "value": kid_std, "n": n}]


def summary_columns(per_image: pd.DataFrame) -> pd.DataFrame:
    """The columns of per-image rows that :func:`summarize` reads (the ratio and the per-image metrics): what a
    writer streaming rows to disk keeps in memory for the summary."""
    return per_image[[name for name in ("ratio", *PER_IMAGE_METRICS) if name in per_image.columns]]


def summarize(per_image: pd.DataFrame, features: Mapping[str, np.ndarray] | None = None, bins=DEFAULT_BINS,
              metrics=None, *, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Long summary ``bin, metric, value, n``: per-image metric means per bin, then set-level metrics.

    ``per_image`` needs a ``ratio`` column; ``metrics`` defaults to the columns of
    :data:`bench.metrics.functional.PER_IMAGE_METRICS` it has. ``features`` maps ``"pred/<extractor>"`` and
    ``"gt/<extractor>"`` to ``[N,D]`` arrays aligned with the rows of ``per_image`` (or, with ``gt_rows``, the
    ground truth per test image: :data:`GT_ROWS`); FID compares the composites with the ground truths of the same
    pairs in each bin. Arrays may be mapped files (:func:`open_features`): a bin reads at most
    :data:`SET_METRIC_ROWS_IN_MEMORY` rows at once.
    """
    if "ratio" not in per_image.columns:
        raise ValueError("per-image results need a 'ratio' column")
    if metrics is None:
        metrics = [name for name in PER_IMAGE_METRICS if name in per_image.columns]
    features = features or {}
    extractors = _paired_extractors(features, len(per_image))
    rows: list[dict] = []
    for label in bins:
        selected = bin_members(per_image["ratio"].to_numpy(), label)
        n = int(selected.sum())
        for metric in metrics:
            values = per_image.loc[selected, metric]
            rows.append({"bin": label, "metric": metric, "value": float(values.mean()) if n else float("nan"), "n": n})
        for extractor in extractors:
            rows += _set_level_rows(label, selected, features, extractor, kid_subsets, kid_subset_size, seed)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# ---------------------------------------------------------------------------------- statistics
def paired_bootstrap(a, b, num_samples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over pairs and its percentile-bootstrap confidence interval ``(mean, lo, hi)``.

    ``a`` and ``b`` are one per-image metric of two methods on the *same* pairs, in the same order;
    resampling pairs (not images of each method separately) keeps the pairing. A win is real at
    this confidence when the interval excludes 0.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two 1-d arrays of the same non-zero length, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_bootstrap: values contain NaN or inf")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0,1), got {confidence}")
    differences = a - b
    rng = np.random.default_rng(seed)
    means = np.array([differences[rng.integers(0, len(differences), len(differences))].mean()
                      for _ in range(num_samples)])
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(differences.mean()), float(low), float(high)


# ---------------------------------------------------------------------------------- feature files
#: zip entries get this fixed time, so the same arrays always give the same bytes (a one-piece cell and its
#: merged shards, or two cells writing one ground-truth cache at once)
NPZ_ENTRY_TIME = (1980, 1, 1, 0, 0, 0)
MAP_ENTRIES_FROM_BYTES = 1 << 20


@dataclass(frozen=True)
class StreamedArray:
    """An array written to an ``.npz`` in row chunks without ever being whole in memory."""

    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: Iterable[np.ndarray]


def save_features(path: str | os.PathLike, features: Mapping[str, np.ndarray | StreamedArray]) -> None:
    """Write ``{key: array}`` to an uncompressed ``.npz`` atomically (temporary file, then rename).

    Uncompressed, so :func:`open_features` can map each array instead of reading it; entries carry a fixed time,
    so equal arrays give equal files. A :class:`StreamedArray` is written chunk by chunk."""
    with atomic_path(path) as temporary:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, value in features.items():
                _write_npz_entry(archive, key, value)


def _write_npz_entry(archive: zipfile.ZipFile, key: str, value: np.ndarray | StreamedArray) -> None:
    if not isinstance(value, StreamedArray):
        array = np.asarray(value)
        value = StreamedArray(array.dtype, array.shape, [array])
    entry = zipfile.ZipInfo(f"{key}.npy", date_time=NPZ_ENTRY_TIME)
    entry.compress_type = zipfile.ZIP_STORED
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(value.dtype)), "fortran_order": False,
              "shape": tuple(value.shape)}
    written = 0
    with archive.open(entry, "w", force_zip64=True) as stream:
        np.lib.format.write_array_header_1_0(stream, header)
        for chunk in value.chunks:
            chunk = np.asarray(chunk, dtype=value.dtype)
            stream.write(chunk.tobytes(order="C"))
            written += chunk.size
    if written != int(np.prod(value.shape)):
        raise RuntimeError(f"{key}: wrote {written} values for shape {tuple(value.shape)}")


def load_features(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a features file, read into memory."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: cannot read features ({exc})") from exc


def open_features(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a features file, each stored (uncompressed) one mapped read-only instead of read: rows
    are read when indexed, so a cell's features never have to fit in memory. Compressed entries (written by
    other tools) are read."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as stream:
            arrays = {}
            for entry in archive.infolist():
                key = entry.filename[:-len(".npy")] if entry.filename.endswith(".npy") else entry.filename
                arrays[key] = (_mapped_entry(path, stream, entry) if entry.compress_type == zipfile.ZIP_STORED
                               else np.load(archive.open(entry), allow_pickle=False))
            return arrays
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: cannot read features ({exc})") from exc


def _mapped_entry(path: Path, stream, entry: zipfile.ZipInfo) -> np.ndarray:
    stream.seek(entry.header_offset)
    local_header = stream.read(30)  # the fixed part of a zip local file header; the data follows its two fields
    if local_header[:4] != b"PK\x03\x04":
        raise ValueError(f"{entry.filename}: not a zip local header")
    name_length, extra_length = struct.unpack("<HH", local_header[26:30])
    stream.seek(entry.header_offset + 30 + name_length + extra_length)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError(f"{entry.filename}: object arrays are not features")
    if entry.file_size < MAP_ENTRIES_FROM_BYTES:  # a mapping costs a file handle and a page: read small ones
        return np.fromfile(stream, dtype=dtype, count=int(np.prod(shape))).reshape(shape, order="F" if fortran_order else "C")
    return np.memmap(path, dtype=dtype, mode="r", offset=stream.tell(), shape=shape,
                     order="F" if fortran_order else "C")
