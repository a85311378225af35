"""The evaluation loop: inpaint every frozen pair, composite, quantise once, score, write results.

Everything a report needs is written to one folder per cell:
  per_image.csv   one row per pair (image, mask, output paths; ratio, bin; every per-image metric)
  features.npz    per-pair feature vectors of the composite and the ground truth (FID / KID per bin)
  summary.csv     metric × bin with N, computed from the two files above
  images/*.png    the scored composites (optional)
Files are written atomically and per_image.csv last-but-one, summary.csv last, so a folder with a
summary is complete.

The loop itself (:func:`evaluate_pairs`) scores any run of consecutive pairs and returns the rows and
features instead of writing them, so a cell can be evaluated in one piece or in shards that are merged
later (:mod:`bench.shards`) with the same files. What keeps the network busy:
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
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bench.aggregate import load_features, save_features, summarize
from bench.errors import UserError
from bench.images import quantize, read_image, to_tensor, write_png
from bench.manifest import Manifest, Pair
from bench.methods import AUTOCAST_DTYPES, PRECISIONS, InpaintingMethod, in_memory_format
from bench.scoring import Scorer, select

GT_FEATURES_FILE = "gt_features.npz"
PNG_WRITER_THREADS = 2  # PNG encoding releases the GIL: two threads keep up with a fast GPU method
PENDING_PNG_BATCHES = 4  # composites waiting to be written, in batches, before the loop waits for the writers
PREFETCH_BATCHES = 2  # batches each data worker decodes ahead


@dataclass
class EvalResult:
    per_image: pd.DataFrame
    summary: pd.DataFrame
    out_dir: Path


@dataclass
class PairResults:
    """The scored results of a run of consecutive pairs, not yet written (one shard, or a whole cell)."""

    per_image: pd.DataFrame  # one row per pair, in manifest order
    features: dict[str, np.ndarray]  # "pred/<extractor>" → [pairs, D] float64
    seconds: float  # wall time of the loop


def write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike, float_format: str | None = "%.10g") -> None:
    """``float_format=None`` writes every float exactly (shortest round-trip form): for files read back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False, float_format=float_format)
    os.replace(tmp, path)


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
    """``uint8`` → float in [0,1], the same values :func:`bench.images.to_tensor` gives."""
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
    """``torch.autocast`` at ``precision`` for the method's forward pass; nothing at fp32 (whose path stays exactly
    as it was). Metric networks never run under it: they take the quantised composite afterwards."""
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


@torch.no_grad()
def evaluate_pairs(method: InpaintingMethod, manifest: Manifest, scorer: Scorer, *, start: int = 0,
                   stop: int | None = None, batch_size: int = 16, save_images: bool = True,
                   image_dir: str | os.PathLike | None = None, data_workers: int = 0, precision: str = "fp32",
                   on_pairs: Callable[[int], None] | None = None, progress: bool = True,
                   description: str = "eval") -> PairResults:
    """Inpaint, composite, quantise and score the pairs ``start:stop`` of ``manifest`` (composites written to
    ``image_dir`` when ``save_images``). ``on_pairs`` gets the number of pairs done after each batch."""
    started = time.perf_counter()
    method.eval()
    device = method.device
    pairs = list(manifest.pairs[start:stop])
    image_dir = Path(image_dir) if image_dir is not None else None
    if save_images and image_dir is None:
        raise ValueError("save_images needs an image_dir")
    loader = pair_batches(manifest, pairs, batch_size, workers=data_workers, device=device,
                          host_preprocessing=method.host_preprocessing("inpaint"))
    rows: list[dict] = []
    features: dict[str, list[np.ndarray]] = {}
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
            for name, values in scorer.features(composite).items():
                features.setdefault(f"pred/{name}", []).append(values.double().cpu().numpy())
            if save_images:
                pixels = composite.permute(0, 2, 3, 1).contiguous().cpu().numpy()
                for pair, image in zip(batch_pairs, pixels):
                    writer.submit(image_dir / f"{pair.pair_id}.png", image)
            for pair, values in zip(batch_pairs, score_table.tolist()):
                output = str(image_dir / f"{pair.pair_id}.png") if save_images else ""
                rows.append({"pair_id": pair.pair_id, "image": str(manifest.image_path(pair)),
                             "mask": str(manifest.mask_path(pair)), "output": output,
                             "ratio": pair.ratio, "bin": pair.bin, **dict(zip(scores, values))})
            bar.update(len(batch_pairs))
            if on_pairs is not None:
                on_pairs(len(rows))
    bar.close()
    stacked = {name: np.concatenate(parts) for name, parts in features.items()}
    return PairResults(pd.DataFrame(rows), stacked, time.perf_counter() - started)


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


def cached_ground_truth_features(manifest: Manifest, key: str) -> dict[str, np.ndarray] | None:
    """The ground truths' features per pair from the cache beside ``manifest`` if it was made with ``key``."""
    cache = manifest.out_dir / GT_FEATURES_FILE
    if not cache.exists():
        return None
    cached = load_features(cache)
    firsts, index = distinct_images(manifest)
    if str(cached.pop("provenance", "")) != key or cached.pop("images", np.array([])).tolist() != [
            pair.image for pair in firsts]:
        return None
    return {name: values[index] for name, values in cached.items()}


def ground_truth_features(manifest: Manifest, scorer: Scorer, batch_size: int, device: torch.device,
                          data_workers: int = 0) -> dict[str, np.ndarray]:
    """``{"gt/<extractor>": [pairs, D]}``: features of the ground-truth images, the same for every method and
    shard. Computed once per test image (not per pair: an image has a pair per ratio bin) and cached beside the
    manifest, keyed by the networks' provenance, the device type, the precision and the row layout (a cache from
    other weights, or a CPU run's cache in a GPU run, is not reused: FID would mix the two). The cache is written
    atomically, so concurrent cells computing it at once both leave a whole, identical file."""
    key = json.dumps(scorer.feature_key(device), sort_keys=True)
    found = cached_ground_truth_features(manifest, key)
    if found is not None:
        return found
    firsts, index = distinct_images(manifest)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches_of(pair_batches(manifest, firsts, batch_size, workers=data_workers, device=device,
                                         with_masks=False)):
        for name, values in scorer.features(batch["image"].to(device)).items():
            parts.setdefault(f"gt/{name}", []).append(values.double().cpu().numpy())
    per_image = {name: np.concatenate(values) for name, values in parts.items()}
    save_features(manifest.out_dir / GT_FEATURES_FILE,
                  {**per_image, "images": np.array([pair.image for pair in firsts]), "provenance": np.array(key)})
    return {name: values[index] for name, values in per_image.items()}


_ground_truth_features = ground_truth_features  # the name tests of the cache use


# ------------------------------------------------------------------------------------ the cell's files
def write_results(out_dir: str | os.PathLike, results: PairResults,
                  ground_truth: dict[str, np.ndarray]) -> EvalResult:
    """features.npz, per_image.csv, then summary.csv (the last file: a folder with a summary is complete)."""
    out_dir = Path(out_dir)
    stacked = {**results.features, **ground_truth}
    save_features(out_dir / "features.npz", stacked)
    write_csv_atomic(results.per_image, out_dir / "per_image.csv")
    summary = summarize(results.per_image, stacked)
    write_csv_atomic(summary, out_dir / "summary.csv")
    return EvalResult(results.per_image, summary, out_dir)


def evaluate(method: InpaintingMethod, manifest: Manifest, out_dir: str | os.PathLike, scorer: Scorer, *,
             batch_size: int = 16, save_images: bool = True, progress: bool = True, description: str = "eval",
             data_workers: int = 0, precision: str = "fp32") -> EvalResult:
    """Every pair of ``manifest`` in one piece, written to ``out_dir``."""
    out_dir = Path(out_dir)
    results = evaluate_pairs(method, manifest, scorer, batch_size=batch_size, save_images=save_images,
                             image_dir=out_dir / "images", data_workers=data_workers, precision=precision,
                             progress=progress, description=description)
    truth = ground_truth_features(manifest, scorer, batch_size, method.device, data_workers)
    return write_results(out_dir, results, truth)
