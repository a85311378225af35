"""From per-image results to the summary table: metric × ratio bin with N, set-level FID/KID, bootstrap CIs.

``per_image.csv`` is the source of truth; :func:`summarize` turns it (and the per-pair features of
``features.npz``) into the long frame ``bin, metric, value, n`` that reports render. Metric
conventions: :mod:`bench.metrics`.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import UserError
from bench.masks import PAPER_BINS, RATIO_BINS, bin_label, in_bin, parse_bin
from bench.metrics import PER_IMAGE_METRICS, frechet_distance_of_features, kid

NVIDIA_BINS = tuple(bin_label(low, high) for low, high in RATIO_BINS)
DEFAULT_BINS = PAPER_BINS + NVIDIA_BINS

#: set-level metric names (Fréchet distance, KID) for each feature extractor; FID only for Inception
SET_METRIC_NAMES = {"inception_v3_fid": ("FID", "KID"), "efficientnet_lite0": ("FD_lite0", "KID_lite0")}
SUMMARY_COLUMNS = ["bin", "metric", "value", "n"]


def bin_members(ratios, label: str) -> np.ndarray:
    """Boolean membership of every hole ratio in a bin, by :func:`bench.masks.in_bin` (half-open ``(a,b]``)."""
    parse_bin(label)  # a bad label is an error even when there are no ratios
    return np.array([in_bin(ratio, label) for ratio in np.asarray(ratios, dtype=np.float64)], dtype=bool)


# ---------------------------------------------------------------------------------- summary
def set_metric_names(extractor: str) -> tuple[str, str]:
    return SET_METRIC_NAMES.get(extractor, (f"FD_{extractor}", f"KID_{extractor}"))


def _paired_extractors(features: dict[str, np.ndarray], rows: int) -> list[str]:
    """Extractor names with both ``pred/<name>`` and ``gt/<name>``, each with one row per pair."""
    names = []
    for key in features:
        side, _, name = key.partition("/")
        if side != "pred" or f"gt/{name}" not in features:
            continue
        for part in (key, f"gt/{name}"):
            if len(features[part]) != rows:
                raise ValueError(f"features {part!r} have {len(features[part])} rows for {rows} per-image rows")
        names.append(name)
    return names


def _set_level_rows(label: str, selected: np.ndarray, features: dict[str, np.ndarray], extractor: str,
                    kid_subsets: int, kid_subset_size: int, seed: int) -> list[dict]:
    fd_name, kid_name = set_metric_names(extractor)
    n = int(selected.sum())
    fd_value = kid_mean = kid_std = float("nan")
    if n >= 2:  # a covariance needs two samples; fewer gives NaN with n shown
        pred, truth = features[f"pred/{extractor}"][selected], features[f"gt/{extractor}"][selected]
        fd_value = frechet_distance_of_features(pred, truth)
        kid_mean, kid_std = kid(pred, truth, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    return [{"bin": label, "metric": fd_name, "value": fd_value, "n": n},
            {"bin": label, "metric": kid_name, "value": kid_mean, "n": n},
            {"bin": label, "metric": f"{kid_name}_std", "value": kid_std, "n": n}]


def summarize(per_image: pd.DataFrame, features: dict[str, np.ndarray] | None = None, bins=DEFAULT_BINS,
              metrics=None, *, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Long summary ``bin, metric, value, n``: per-image metric means per bin, then set-level metrics.

    ``per_image`` needs a ``ratio`` column; ``metrics`` defaults to the columns of
    :data:`bench.metrics.PER_IMAGE_METRICS` it has. ``features`` maps ``"pred/<extractor>"`` and
    ``"gt/<extractor>"`` to ``[N,D]`` arrays aligned with the rows of ``per_image``; FID compares
    the composites with the ground truths of the same pairs in each bin.
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
def save_features(path: str | os.PathLike, features: dict[str, np.ndarray]) -> None:
    """Write ``{key: array}`` to an ``.npz`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:  # a file object keeps numpy from appending ".npz"
            np.savez(stream, **{key: np.asarray(value) for key, value in features.items()})
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def load_features(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: cannot read features ({exc})") from exc
