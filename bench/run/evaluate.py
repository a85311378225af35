"""The evaluation loop: inpaint every frozen pair, composite, quantise once, score, write results.

Everything a report needs is written to one folder per cell:
  per_image.csv   one row per pair (image, mask, output paths; ratio, bin; the sha256 digest of the scored
                  composite; every per-image metric)
  features.npz    per-pair float32 feature vectors of the composite (FID / KID per bin) and a reference to the
                  ground truths' features: the manifest's cache, one row per test image, and each pair's row in it
  summary.csv     metric × bin with N, computed from the files above
  images/*.png    the scored composites: every one, a fixed seeded sample per bin, or none (``save_images``)
Files are written atomically and per_image.csv last-but-one, summary.csv last, so a folder with a
summary is complete.

The loop itself (:func:`scored_batches`) scores any run of consecutive pairs and hands over each batch's rows
and features, so a cell can be evaluated in one piece or in shards that are merged later
(:mod:`bench.run.shards`) with the same files. A piece's files are written as its batches come
(:func:`write_pair_files`): its memory does not grow with its pairs, only by the per-image scalars a summary
averages (a few hundred bytes a pair at most). :func:`evaluate_pairs` gathers the batches in memory, for small runs (a
search's validation, a plan's timing). What keeps the network busy:
  - images and masks are read and decoded in DataLoader worker processes (``data_workers``; 0 = in this
    process), prefetched, pinned on CUDA; a method's host-side preprocessing (EC's and CTSDG's Canny edges)
    runs there too, where the batch is still on the host;
  - composites are PNG-encoded and written by background threads (:class:`PngWriter`);
  - each ground truth goes through the distance networks once per batch however many pairs share it, and
    the ground truths' FID features once per manifest (cached beside it);
  - per-image scores come to the host in one copy per batch.
None of this changes a number: results are identical with and without workers, in any shard layout.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bench.metrics.aggregate import GT_ROWS, StreamedArray, open_features, save_features, summarize, summary_columns
from bench.errors import UserError
from bench.files import atomic_path
from bench.data.images import quantize, read_image, to_tensor, write_png
from bench.data.manifest import Manifest, Pair
from bench.methods import AUTOCAST_DTYPES, PRECISIONS, InpaintingMethod, in_memory_format
from bench.metrics.scoring import Scorer, select

#: the ground truths' features beside a manifest, one file per key (networks, device type, precision), so a run
#: with another key never replaces features that a finished cell points to
GT_FEATURES_FILE = "gt_features-{key}.npz"
#: how features.npz stores features: 2 = float32 composites and a reference to the manifest's per-image ground
#: truth; 1 (no ``format`` entry) = float64, the ground truth copied per pair
FEATURES_FORMAT = 2
#: ``save_images``: which scored composites are written as PNG
IMAGE_POLICIES = ("all", "sample", "none")
#: ``save_images: sample`` keeps this many pairs per ratio bin, drawn from the manifest alone with this seed, so
#: every method and shard keeps the same pairs (what side-by-side figures need)
SAMPLED_PER_BIN = 16
SAMPLE_SEED = 0
#: hex digits of a composite's sha256 kept in per_image.csv: 64 bits. A digest tells a re-run of the same pair
#: whether it made the same image (nobody forges these), so a collision matters only between two of a cell's
#: pairs at random: below 1e-9 for the paper's 219,000 pairs, at 16 bytes a row instead of 64
DIGEST_HEX_DIGITS = 16
PNG_WRITER_THREADS = 2  # PNG encoding releases the GIL: two threads keep up with a fast GPU method
PENDING_PNG_BATCHES = 4  # composites waiting to be written, in batches, before the loop waits for the writers
PREFETCH_BATCHES = 2  # batches each data worker decodes ahead


@dataclass
class EvalResult:
    summary: pd.DataFrame  # the rows per pair are in out_dir/per_image.csv
    out_dir: Path


@dataclass
class PairResults:
    """The scored results of a run of consecutive pairs, not yet written (one shard, or a whole cell)."""

    per_image: pd.DataFrame  # one row per pair, in manifest order
    features: dict[str, np.ndarray]  # "pred/<extractor>" → [pairs, D] float32, as the networks computed them
    seconds: float  # wall time of the loop


def write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike, float_format: str | None = "%.10g") -> None:
    """``float_format=None`` writes every float exactly (shortest round-trip form): for files read back."""
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False, float_format=float_format)


# ------------------------------------------------------------------------------------ reading pairs
class PairImages(Dataset):
    """The decoded test pairs ``pairs`` of a manifest: ``(position, image uint8 [3,H,W], mask uint8 [1,H,W])``.

    uint8, not float: a quarter of the bytes between worker processes and to the device, and the ground truth
    scored is the decoded image itself (``quantize(image / 255)`` gives it back exactly)."""

    def __init__(self, manifest: Manifest, pairs: list[Pair], with_masks: bool = True):
        self.manifest, self.pairs, self.with_masks = manifest, pairs, with_masks

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        pair = self.pairs[position]
        pixels = read_image(self.manifest.image_path(pair), size=self.manifest.image_size, crop=self.manifest.crop)
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        mask = torch.from_numpy(self.manifest.read_mask(pair))[None] if self.with_masks else None
        return position, image, mask


def unit_float(images_u8: torch.Tensor) -> torch.Tensor:
    """``uint8`` → float in [0,1], the same values :func:`bench.data.images.to_tensor` gives."""
    return images_u8.float().div(255.0)


class CollatePairs:
    """Stacks a batch and runs the method's host-side preprocessing on it (in the data worker that read it)."""

    def __init__(self, host_preprocessing: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None):
        self.host_preprocessing = host_preprocessing

    def __call__(self, items: list[tuple[int, torch.Tensor, torch.Tensor | None]]) -> dict[str, Any]:
        positions, images, masks = zip(*items)
        batch: dict[str, Any] = {"positions": list(positions), "image": torch.stack(images), "extra": {}}
        if masks[0] is not None:
            batch["mask"] = torch.stack(masks)
            if self.host_preprocessing is not None:
                batch["extra"] = self.host_preprocessing(unit_float(batch["image"]), batch["mask"].float())
        return batch


def pair_batches(manifest: Manifest, pairs: list[Pair], batch_size: int, *, workers: int = 0,
                 device: torch.device = torch.device("cpu"), with_masks: bool = True,
                 host_preprocessing: Callable | None = None) -> DataLoader:
    """Batches of ``pairs`` in order, decoded by ``workers`` processes (0: in this one)."""
    if workers < 0:
        raise UserError(f"--data-workers {workers}: needs an integer ≥ 0")
    return DataLoader(PairImages(manifest, pairs, with_masks), batch_size=batch_size, shuffle=False,
                      num_workers=workers, collate_fn=CollatePairs(host_preprocessing),
                      pin_memory=device.type == "cuda", prefetch_factor=PREFETCH_BATCHES if workers else None)


def one_line(exc: UserError) -> UserError:
    """A UserError raised in a data worker comes back with the worker's traceback in its message; keep the
    message's own line (user errors are one line)."""
    lines = str(exc).strip().splitlines()
    found = re.match(r"^[\w.]+: (.*)$", lines[-1]) if len(lines) > 1 else None
    return type(exc)(found.group(1)) if found else exc


def batches_of(loader: DataLoader) -> Iterator[dict[str, Any]]:
    try:
        yield from loader
    except UserError as exc:
        raise one_line(exc) from None


def load_pair_batch(manifest: Manifest, pairs: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    size = manifest.image_size
    images = torch.stack([to_tensor(read_image(manifest.image_path(p), size=size, crop=manifest.crop)) for p in pairs])
    masks = torch.stack([torch.from_numpy(manifest.read_mask(p).astype(np.float32))[None] for p in pairs])
    return images.to(device), masks.to(device)


# ------------------------------------------------------------------------------------ writing composites
class PngWriter:
    """Encodes and writes PNGs on background threads, at most ``max_pending`` waiting, so the loop never waits
    on the encoder unless it is behind. The first error is raised in the loop (at the next :meth:`submit` or at
    :meth:`close`); leaving the ``with`` block waits for every write, so all files exist afterwards."""

    def __init__(self, threads: int = PNG_WRITER_THREADS, max_pending: int = 64):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png-writer")
        self.pending: collections.deque[concurrent.futures.Future] = collections.deque()
        self.max_pending = max_pending

    def submit(self, path: Path, pixels: np.ndarray) -> None:
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(write_png, path, pixels))

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "PngWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:  # the loop failed: finish what is running, drop the rest, keep the loop's error
            self.pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------ the loop
def inference_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` at ``precision`` for the method's forward pass; nothing at fp32 (whose path is
    plain float32). Metric networks never run under it: they take the quantised composite afterwards."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def shared_images(pairs: list[Pair]) -> tuple[list[int], torch.Tensor]:
    """For a batch: the position of the first pair of each distinct test image, and for every pair the index of
    its image among them (pairs of one image are consecutive in a manifest: its ratio bins)."""
    rows: dict[str, int] = {}
    firsts, index = [], []
    for position, pair in enumerate(pairs):
        if pair.image not in rows:
            rows[pair.image] = len(firsts)
            firsts.append(position)
        index.append(rows[pair.image])
    return firsts, torch.tensor(index)


def image_policy(save_images: str | bool) -> str:
    """``save_images`` as one of :data:`IMAGE_POLICIES` (``true``/``false`` of earlier configs: all, none)."""
    if save_images is True or save_images is False:
        return "all" if save_images else "none"
    if save_images not in IMAGE_POLICIES:
        raise UserError(f"--save-images {save_images!r}: choose one of {', '.join(IMAGE_POLICIES)}")
    return save_images


def sampled_pairs(manifest: Manifest, per_bin: int | None = None, seed: int = SAMPLE_SEED) -> frozenset[str]:
    """The pair ids ``save_images: sample`` keeps: ``per_bin`` pairs of every ratio bin (all of a smaller bin),
    drawn with ``seed`` from the frozen manifest alone, never from any method's output."""
    per_bin = SAMPLED_PER_BIN if per_bin is None else per_bin
    by_bin: dict[str, list[str]] = {}
    for pair in manifest.pairs:
        by_bin.setdefault(pair.bin, []).append(pair.pair_id)
    rng = np.random.default_rng(seed)
    kept: set[str] = set()
    for label in sorted(by_bin):
        members = by_bin[label]
        kept.update(members[index] for index in rng.choice(len(members), min(per_bin, len(members)), replace=False))
    return frozenset(kept)


def composite_digest(pixels: np.ndarray) -> str:
    """The digest of a scored composite (``uint8 [H,W,3]``, the PNG's pixels): a re-run can be checked against it
    without the image."""
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:DIGEST_HEX_DIGITS]


@dataclass
class ScoredBatch:
    """One batch of the loop: its per-image rows and its composites' features (``"pred/<extractor>"`` →
    float32 ``[batch, D]``, as the networks computed them)."""

    rows: list[dict[str, Any]] | pd.DataFrame
    features: dict[str, np.ndarray]


@torch.no_grad()
def scored_batches(method: InpaintingMethod, manifest: Manifest, scorer: Scorer, *, start: int = 0,
                   stop: int | None = None, batch_size: int = 16, save_images: str | bool = "all",
                   image_dir: str | os.PathLike | None = None, data_workers: int = 0, precision: str = "fp32",
                   on_pairs: Callable[[int], None] | None = None, progress: bool = True,
                   description: str = "eval") -> Iterator[ScoredBatch]:
    """Inpaint, composite, quantise and score the pairs ``start:stop`` of ``manifest``, batch by batch
    (composites written to ``image_dir`` as ``save_images`` says: :data:`IMAGE_POLICIES`). ``on_pairs`` gets the
    number of pairs done after each batch. Every composite is on disk once the iteration ends."""
    method.eval()
    device = method.device
    pairs = list(manifest.pairs[start:stop])
    image_dir = Path(image_dir) if image_dir is not None else None
    policy = image_policy(save_images)
    if policy != "none" and image_dir is None:
        raise ValueError("save_images needs an image_dir")
    kept = sampled_pairs(manifest) if policy == "sample" else None
    loader = pair_batches(manifest, pairs, batch_size, workers=data_workers, device=device,
                          host_preprocessing=method.host_preprocessing("inpaint"))
    done = 0
    bar = tqdm(total=len(pairs), desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    with PngWriter(max_pending=PENDING_PNG_BATCHES * batch_size) as writer:
        for batch in batches_of(loader):
            batch_pairs = [pairs[position] for position in batch["positions"]]
            truth = batch["image"].to(device, non_blocking=True)  # uint8: the scored ground truth
            masks = batch["mask"].to(device, non_blocking=True).float()
            extra = {name: value.to(device, non_blocking=True) for name, value in batch["extra"].items()}
            images = unit_float(truth)
            layout = method.memory_format  # the inputs in the networks' layout: no conversion inside each network
            with inference_autocast(device, precision):
                prediction = method.inpaint(in_memory_format(images, layout), in_memory_format(masks, layout),
                                            **{name: in_memory_format(value, layout) for name, value in extra.items()})
            if prediction.shape != images.shape:
                raise RuntimeError(f"{method.name}: inpaint returned {tuple(prediction.shape)} for {tuple(images.shape)}")
            composite = quantize(prediction.float() * masks + images * (1 - masks))
            if layout != "contiguous":  # the metrics take the composite in the layout they always had
                composite = composite.contiguous()

            firsts, index = shared_images(batch_pairs)
            reference = {name: select(embedding, index) for name, embedding in scorer.reference(truth[firsts]).items()}
            scores = scorer.per_image(composite, truth, reference)
            score_table = torch.stack([values.double() for values in scores.values()], dim=1).cpu().numpy()
            features = {f"pred/{name}": values.float().cpu().numpy()
                        for name, values in scorer.features(composite).items()}
            pixels = composite.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # every digest needs the pixels
            rows = []
            for pair, image, values in zip(batch_pairs, pixels, score_table.tolist()):
                saved = policy == "all" or (policy == "sample" and pair.pair_id in kept)
                if saved:
                    writer.submit(image_dir / f"{pair.pair_id}.png", image)
                rows.append({"pair_id": pair.pair_id, "image": str(manifest.image_path(pair)),
                             "mask": str(manifest.mask_path(pair)),
                             "output": str(image_dir / f"{pair.pair_id}.png") if saved else "",
                             "ratio": pair.ratio, "bin": pair.bin, "digest": composite_digest(image),
                             **dict(zip(scores, values))})
            done += len(rows)
            yield ScoredBatch(rows, features)
            bar.update(len(batch_pairs))
            if on_pairs is not None:
                on_pairs(done)
    bar.close()


def evaluate_pairs(method: InpaintingMethod, manifest: Manifest, scorer: Scorer, **loop: Any) -> PairResults:
    """:func:`scored_batches` (same arguments), gathered in memory: for runs of pairs small enough to hold (a
    search's validation, a plan's timing). A cell's files are written batch by batch instead
    (:func:`write_pair_files`)."""
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    features: dict[str, list[np.ndarray]] = {}
    for batch in scored_batches(method, manifest, scorer, **loop):
        rows += batch.rows
        for name, values in batch.features.items():
            features.setdefault(name, []).append(values)
    stacked = {name: np.concatenate(parts) for name, parts in features.items()}
    return PairResults(pd.DataFrame(rows), stacked, time.perf_counter() - started)


def as_batches(results: PairResults) -> list[ScoredBatch]:
    """Results gathered in memory as the one batch :func:`write_pair_files` takes."""
    return [ScoredBatch(results.per_image, results.features)]


# ------------------------------------------------------------------------------------ streamed files
#: rows of a spilled feature array copied into features.npz at a time
SPILL_CHUNK_ROWS = 4096


@dataclass
class WrittenPairs:
    """What :func:`write_pair_files` keeps of the pairs it wrote: what a summary averages, not the features."""

    scalars: pd.DataFrame  # ratio and every per-image metric, one row per pair, exact
    seconds: float  # wall time from the first batch asked for to the files written


class _FeatureSpill:
    """Feature batches appended to unnamed temporary files in the destination's folder (gone with the process,
    whatever happens), then copied into the ``.npz`` a chunk at a time: the features of a cell are never in
    memory at once."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, Any] = {}
        self.shapes: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}  # dtype, row shape, rows

    def append(self, features: dict[str, np.ndarray]) -> None:
        if self.files and set(features) != set(self.files):
            raise RuntimeError(f"a batch has features {sorted(features)}, earlier ones {sorted(self.files)}")
        for name, values in features.items():
            values = np.ascontiguousarray(values)
            if name not in self.files:
                self.files[name] = tempfile.TemporaryFile(dir=self.folder, prefix=".features-spill-")
                self.shapes[name] = (values.dtype, values.shape[1:], 0)
            dtype, row_shape, rows = self.shapes[name]
            if values.dtype != dtype or values.shape[1:] != row_shape:
                raise RuntimeError(f"{name}: a batch of {values.dtype}{list(values.shape[1:])} after "
                                   f"{dtype}{list(row_shape)}")
            self.files[name].write(values.tobytes())
            self.shapes[name] = (dtype, row_shape, rows + len(values))

    def streamed(self) -> dict[str, StreamedArray]:
        return {name: StreamedArray(dtype, (rows, *row_shape), self._chunks(name))
                for name, (dtype, row_shape, rows) in self.shapes.items()}

    def _chunks(self, name: str) -> Iterator[np.ndarray]:
        dtype, row_shape, rows = self.shapes[name]
        stream = self.files[name]
        stream.flush()
        stream.seek(0)
        width = int(np.prod(row_shape, dtype=np.int64))
        for first in range(0, rows, SPILL_CHUNK_ROWS):
            count = min(SPILL_CHUNK_ROWS, rows - first)
            yield np.fromfile(stream, dtype=dtype, count=count * width).reshape(count, *row_shape)

    def close(self) -> None:
        for stream in self.files.values():
            stream.close()


def write_pair_files(folder: str | os.PathLike, batches: Iterable[ScoredBatch], *, float_format: str | None,
                     entries: dict[str, np.ndarray] | None = None) -> WrittenPairs:
    """``per_image.csv`` and ``features.npz`` (the composites' features, then ``entries``) of ``batches`` in
    ``folder``, written as the batches come: memory holds one batch and the per-image scalars (a few
    hundred bytes a pair at most), never a run's rows or features. The two files appear at the end, features.npz
    first; on an error neither is touched. ``float_format=None`` writes every float exactly (files read back)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    scalars: list[pd.DataFrame] = []
    spill = _FeatureSpill(folder)
    try:
        with atomic_path(folder / "per_image.csv") as temporary, open(temporary, "w", newline="") as stream:
            for batch in batches:
                frame = pd.DataFrame(batch.rows)
                frame.to_csv(stream, index=False, header=not scalars, float_format=float_format)
                scalars.append(summary_columns(frame))
                spill.append(batch.features)
            stream.flush()
            save_features(folder / "features.npz", {**spill.streamed(), **(entries or {})})
    finally:
        spill.close()
    return WrittenPairs(pd.concat(scalars, ignore_index=True) if scalars else pd.DataFrame(columns=["ratio"]),
                        time.perf_counter() - started)


# ------------------------------------------------------------------------------------ ground truth
def distinct_images(manifest: Manifest) -> tuple[list[Pair], np.ndarray]:
    """The first pair of every distinct test image (manifest order), and for every pair the row of its image."""
    rows: dict[str, int] = {}
    firsts: list[Pair] = []
    index = []
    for pair in manifest.pairs:
        if pair.image not in rows:
            rows[pair.image] = len(firsts)
            firsts.append(pair)
        index.append(rows[pair.image])
    return firsts, np.asarray(index, dtype=np.int64)


def images_digest(firsts: list[Pair]) -> str:
    """Which test images, in which order, the rows of a ground-truth cache are."""
    return hashlib.sha256("\n".join(pair.image for pair in firsts).encode()).hexdigest()


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def ground_truth_cache_path(manifest: Manifest, key: str) -> Path:
    return manifest.out_dir / GT_FEATURES_FILE.format(key=key_digest(key))


@dataclass(frozen=True)
class GroundTruth:
    """The ground truths' features of a manifest for one key: the cache file (one row per test image) and, for
    every pair, the row of its image. Cells store this reference instead of copies of the rows."""

    path: Path
    key: str  # :func:`key_digest` of the feature key
    rows: np.ndarray  # int32 [pairs]

    def reference(self, cell_dir: str | os.PathLike) -> dict[str, np.ndarray]:
        """What a cell's features.npz holds of the ground truth: the cache's path relative to the cell (the
        results folder can move), its key, and every pair's row."""
        return {"gt_cache": np.array(os.path.relpath(self.path, Path(cell_dir))), "gt_key": np.array(self.key),
                GT_ROWS: self.rows}

    def arrays(self) -> dict[str, np.ndarray]:
        """``{"gt/<extractor>": [images, D] (mapped), "gt_rows": [pairs]}`` for :func:`bench.metrics.aggregate.summarize`."""
        cached = open_features(self.path)
        if key_digest(str(cached.get("provenance", ""))) != self.key:
            raise UserError(f"{self.path}: holds ground-truth features of another key than the cell's; re-run "
                            "the cell (delete its folder)")
        return {**{name: values for name, values in cached.items() if name.startswith("gt/")}, GT_ROWS: self.rows}


def cached_ground_truth_features(manifest: Manifest, key: str) -> GroundTruth | None:
    """The ground truths' features in the cache beside ``manifest`` for ``key``, if it is there and made for
    the manifest's test images."""
    path = ground_truth_cache_path(manifest, key)
    if not path.exists():
        return None
    cached = open_features(path)
    firsts, index = distinct_images(manifest)
    if str(cached.get("provenance", "")) != key or str(cached.get("images_digest", "")) != images_digest(firsts):
        return None
    return GroundTruth(path, key_digest(key), index.astype(np.int32))


def ground_truth_features(manifest: Manifest, scorer: Scorer, batch_size: int, device: torch.device,
                          data_workers: int = 0) -> GroundTruth:
    """The features of the ground-truth images, the same for every method and shard. Computed once per test
    image (not per pair: an image has a pair per ratio bin) and cached beside the manifest in a file of its own
    per key — the networks' provenance, the device type, the precision and the row layout (a cache from other
    weights, or a CPU run's cache in a GPU run, is not reused: FID would mix the two; nor replaced: cells of that
    key point to it). Written atomically with fixed bytes, so concurrent cells computing it at once both leave a
    whole, identical file."""
    key = json.dumps(scorer.feature_key(device), sort_keys=True)
    found = cached_ground_truth_features(manifest, key)
    if found is not None:
        return found
    firsts, index = distinct_images(manifest)
    path = ground_truth_cache_path(manifest, key)
    spill = _FeatureSpill(path.parent)  # one batch in memory, not every test image's features
    try:
        for batch in batches_of(pair_batches(manifest, firsts, batch_size, workers=data_workers, device=device,
                                             with_masks=False)):
            spill.append({f"gt/{name}": values.float().cpu().numpy()
                          for name, values in scorer.features(batch["image"].to(device)).items()})
        save_features(path, {**spill.streamed(), "images_digest": np.array(images_digest(firsts)),
                             "provenance": np.array(key)})
    finally:
        spill.close()
    return GroundTruth(path, key_digest(key), index.astype(np.int32))


_ground_truth_features = ground_truth_features  # the name tests of the cache use


def cell_features(cell_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """A cell's features as :func:`bench.metrics.aggregate.summarize` takes them, mapped, in either storage format:
    float32 composites with the ground truth referenced (format 2), or float64 with it copied per pair (1)."""
    path = Path(cell_dir) / "features.npz"
    stored = open_features(path)
    if "gt_cache" not in stored:  # format 1: everything is in the file
        return stored
    cache = Path(cell_dir) / str(stored["gt_cache"])
    if not cache.exists():
        raise UserError(f"{path}: the ground-truth features it points to ({cache}) are gone; re-run the cell "
                        "(delete its folder)")
    truth = GroundTruth(cache, str(stored["gt_key"]), np.asarray(stored[GT_ROWS]))
    return {**{name: values for name, values in stored.items() if name.startswith("pred/")}, **truth.arrays()}


# ------------------------------------------------------------------------------------ the cell's files
def cell_feature_entries(ground_truth: GroundTruth, cell_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Everything of a cell's features.npz but the composites' features: the format and the ground truth's
    reference."""
    return {"format": np.array(FEATURES_FORMAT), **ground_truth.reference(cell_dir)}


def write_results(out_dir: str | os.PathLike, results: PairResults | Iterable[ScoredBatch],
                  ground_truth: GroundTruth) -> EvalResult:
    """features.npz, per_image.csv, then summary.csv (the last file: a folder with a summary is complete), from
    results in memory or batches as the loop scores them (streamed: :func:`write_pair_files`)."""
    out_dir = Path(out_dir)
    batches = as_batches(results) if isinstance(results, PairResults) else results
    written = write_pair_files(out_dir, batches, float_format="%.10g",
                               entries=cell_feature_entries(ground_truth, out_dir))
    composites = {name: values for name, values in open_features(out_dir / "features.npz").items()
                  if name.startswith("pred/")}
    summary = summarize(written.scalars, {**composites, **ground_truth.arrays()})
    write_csv_atomic(summary, out_dir / "summary.csv")
    return EvalResult(summary, out_dir)


def evaluate(method: InpaintingMethod, manifest: Manifest, out_dir: str | os.PathLike, scorer: Scorer, *,
             batch_size: int = 16, save_images: str | bool = "all", progress: bool = True, description: str = "eval",
             data_workers: int = 0, precision: str = "fp32") -> EvalResult:
    """Every pair of ``manifest`` in one piece, written to ``out_dir``."""
    out_dir = Path(out_dir)
    truth = ground_truth_features(manifest, scorer, batch_size, method.device, data_workers)
    batches = scored_batches(method, manifest, scorer, batch_size=batch_size, save_images=save_images,
                             image_dir=out_dir / "images", data_workers=data_workers, precision=precision,
                             progress=progress, description=description)
    return write_results(out_dir, batches, truth)
