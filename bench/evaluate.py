"""The evaluation loop: inpaint every frozen pair, composite, quantise once, score, write results.

Everything a report needs is written to one folder per cell:
  per_image.csv   one row per pair (image, mask, output paths; ratio, bin; every per-image metric)
  features.npz    per-pair feature vectors of the composite and the ground truth (FID / KID per bin)
  summary.csv     metric × bin with N, computed from the two files above
  images/*.png    the scored composites (optional)
Files are written atomically and per_image.csv last-but-one, summary.csv last, so a folder with a
summary is complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from bench.aggregate import load_features, save_features, summarize
from bench.images import quantize, read_image, to_numpy_uint8, to_tensor, write_png
from bench.manifest import Manifest
from bench.methods import InpaintingMethod
from bench.scoring import Scorer


@dataclass
class EvalResult:
    per_image: pd.DataFrame
    summary: pd.DataFrame
    out_dir: Path


def write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False, float_format="%.10g")
    os.replace(tmp, path)


def load_pair_batch(manifest: Manifest, pairs: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    size = manifest.image_size
    images = torch.stack([to_tensor(read_image(manifest.image_path(p), size=size, crop=manifest.crop)) for p in pairs])
    masks = torch.stack([torch.from_numpy(manifest.read_mask(p).astype(np.float32))[None] for p in pairs])
    return images.to(device), masks.to(device)


def _ground_truth_features(manifest: Manifest, scorer: Scorer, batch_size: int, device: torch.device
                           ) -> dict[str, np.ndarray]:
    """Features of the ground-truth images, the same for every method: computed once per manifest and
    cached beside it, keyed by the networks' provenance (a cache from other weights is not reused)."""
    cache = manifest.out_dir / "gt_features.npz"
    provenance = scorer.provenance()
    if cache.exists():
        cached = load_features(cache)
        if str(cached.pop("provenance", "")) == json.dumps(provenance, sort_keys=True):
            return cached
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(manifest.pairs), batch_size):
        images, _ = load_pair_batch(manifest, manifest.pairs[start:start + batch_size], device)
        for name, values in scorer.features(quantize(images)).items():
            parts.setdefault(f"gt/{name}", []).append(values.double().cpu().numpy())
    features = {k: np.concatenate(v) for k, v in parts.items()}
    save_features(cache, {**features, "provenance": np.array(json.dumps(provenance, sort_keys=True))})
    return features


@torch.no_grad()
def evaluate(method: InpaintingMethod, manifest: Manifest, out_dir: str | os.PathLike, scorer: Scorer, *,
             batch_size: int = 16, save_images: bool = True, progress: bool = True,
             description: str = "eval") -> EvalResult:
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    method.eval()
    device = method.device
    rows: list[dict] = []
    features: dict[str, list[np.ndarray]] = {}
    pairs = list(manifest.pairs)
    bar = tqdm(total=len(pairs), desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        images, masks = load_pair_batch(manifest, batch, device)
        prediction = method.inpaint(images, masks)
        if prediction.shape != images.shape:
            raise RuntimeError(f"{method.name}: inpaint returned {tuple(prediction.shape)} for {tuple(images.shape)}")
        composite = quantize(prediction * masks + images * (1 - masks))
        scores = scorer.per_image(composite, quantize(images))
        for name, values in scorer.features(composite).items():
            features.setdefault(f"pred/{name}", []).append(values.double().cpu().numpy())
        for i, pair in enumerate(batch):
            output = image_dir / f"{pair.pair_id}.png"
            if save_images:
                write_png(output, to_numpy_uint8(composite[i].cpu()))
            rows.append({"pair_id": pair.pair_id, "image": str(manifest.image_path(pair)),
                         "mask": str(manifest.mask_path(pair)), "output": str(output) if save_images else "",
                         "ratio": pair.ratio, "bin": pair.bin,
                         **{k: float(v[i]) for k, v in scores.items()}})
        bar.update(len(batch))
    bar.close()
    per_image = pd.DataFrame(rows)
    stacked = {k: np.concatenate(v) for k, v in features.items()}
    stacked.update(_ground_truth_features(manifest, scorer, batch_size, device))
    save_features(out_dir / "features.npz", stacked)
    write_csv_atomic(per_image, out_dir / "per_image.csv")
    summary = summarize(per_image, stacked)
    write_csv_atomic(summary, out_dir / "summary.csv")
    return EvalResult(per_image, summary, out_dir)
