"""The training loop: one function, read top to bottom (nanoGPT style).

Data order and training masks are pure functions of (seed, step), and the checkpoint holds the
method's weights, optimiser states and torch RNG state, so a resumed run is bit-identical to an
uninterrupted one on CPU.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.config import TrainConfig
from bench.datasets import ImageSet
from bench.errors import NotTrainable, UserError
from bench.images import to_tensor
from bench.masks import FreeFormConfig, TrainMaskSampler
from bench.methods import InpaintingMethod, atomic_torch_save, safe_torch_load

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per logged step, with "step"
    steps: int = 0
    resumed_from: int | None = None


class ImageCache:
    """Decoded training images; small sets are kept in memory, large ones read on demand."""

    def __init__(self, images: ImageSet, budget_bytes: int = 1 << 30):
        self.images = images
        per_image = 3 * images.image_size ** 2
        self.keep = len(images) * per_image <= budget_bytes
        self._cache: dict[int, torch.Tensor] = {}

    def __getitem__(self, index: int) -> torch.Tensor:
        if index in self._cache:
            return self._cache[index]
        tensor = to_tensor(self.images.read(index))
        if self.keep:
            self._cache[index] = tensor
        return tensor


def sample_images(cache: ImageCache, config: TrainConfig, step: int) -> torch.Tensor:
    """The step's images: a pure function of (seed, step), so resuming needs no data-loader state."""
    rng = np.random.default_rng([config.seed, step, 1])
    indices = rng.integers(0, len(cache.images), size=config.batch_size)
    images = torch.stack([cache[int(i)] for i in indices])
    flips = torch.from_numpy(rng.random(config.batch_size) < 0.5)  # horizontal flips: the only augmentation
    images[flips] = images[flips].flip(-1)
    return images


def train(method: InpaintingMethod, images: ImageSet, config: TrainConfig, *,
          checkpoint_path: str | os.PathLike | None = None, on_step: StepCallback | None = None,
          progress: bool = True, description: str = "train") -> TrainResult:
    """Train ``method`` for ``config.steps`` steps, resuming from ``checkpoint_path`` when it exists."""
    if not method.trainable:
        raise NotTrainable(f"method {method.name!r} has nothing to train")
    if len(images) == 0:
        raise UserError(f"training set {images.name!r} ({images.split}) has no images")
    device = method.device
    result = TrainResult()
    masks = TrainMaskSampler(images.image_size, config.seed, FreeFormConfig(preset=config.mask_preset),
                             max_ratio=config.max_mask_ratio)
    start = 0
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    if checkpoint_path and checkpoint_path.exists():
        state = safe_torch_load(checkpoint_path)
        method.load_training_state(state["method"])
        torch.set_rng_state(state["torch_rng"])
        masks.load_state_dict(state["masks"])
        start, result.history, result.resumed_from = state["step"], state["history"], state["step"]
    else:
        torch.manual_seed(config.seed)

    cache = ImageCache(images)
    method.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=description,
               disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        batch = {"image": sample_images(cache, config, step).to(device), "mask": masks.sample(config.batch_size, device)}
        losses = method.train_step(batch)
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"{method.name}: non-finite loss at step {step}: {losses}")
        if step % config.log_every == 0 or step == config.steps - 1:
            result.history.append({"step": step, **losses})
        if on_step is not None:
            on_step(step, losses)
        bar.set_postfix({k: f"{v:.3g}" for k, v in list(losses.items())[:4]}, refresh=False)
        done = step + 1
        if checkpoint_path and (done % config.checkpoint_every == 0 or done == config.steps):
            atomic_torch_save({"step": done, "method": method.training_state(), "history": result.history,
                               "torch_rng": torch.get_rng_state(), "masks": masks.state_dict()}, checkpoint_path)
    bar.close()
    method.eval()
    result.steps = config.steps
    return result
