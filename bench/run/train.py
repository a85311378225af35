"""The training loop: one function, read top to bottom (nanoGPT style).

Data order and training masks are pure functions of (seed, step), and the checkpoint holds the
method's weights, optimiser states and torch RNG states (the CPU's and, when training on a GPU, that
GPU's: DDNM draws timesteps and noise there), so a resumed run is bit-identical to an uninterrupted one
on CPU, and on a GPU with ``--deterministic`` when the method's operations are deterministic there.

Batches are made on the CPU, in this process or in ``data_workers`` DataLoader worker processes (decode,
flips, masks and the method's :meth:`~bench.methods.InpaintingMethod.host_preprocessing`, such as EC's
Canny edges), pinned and copied without blocking when training on a GPU. Each worker makes whole batches
from their step number alone, so the batches, and every loss, are the same with or without workers.

The loop never waits for the device between log steps: ``train_step`` returns detached 0-d tensors, read
to floats only at log steps (``log_every``). Whether a loss was not finite is tracked on the device at
every step (the first such step) and read at log steps, before every checkpoint and at the end: a
non-finite loss stops training with its step number by the next of those, and no checkpoint is written
after it.

Several processes can run this loop together on one method (``ranks``, :mod:`bench.run.data_parallel`, started
by :mod:`bench.run.ray_train`): each takes its share of every batch, and everything else above holds for the
group — the checkpoint (written by rank 0) holds every rank's RNG states.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bench.config import TrainConfig
from bench.run.data_parallel import SINGLE, Ranks, data_parallel, diverged_keys
from bench.data.datasets import ImageSet
from bench.errors import NotTrainable, UserError
from bench.data.images import to_tensor
from bench.data.masks import FreeFormConfig, TrainMaskSampler
from bench.methods import HostPreprocessing, InpaintingMethod, in_memory_format
from bench.checkpoint_format import atomic_torch_save, safe_torch_load

#: called after every step with the step's losses (detached 0-d tensors: reading one waits for the device)
StepCallback = Callable[[int, dict[str, "torch.Tensor | float"]], None]
#: memory all processes that make batches may spend on decoded training images, shared among the workers
IMAGE_CACHE_BYTES = 1 << 30
#: batches each data worker makes ahead of the step that needs them
PREFETCH_BATCHES_PER_WORKER = 2


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per logged step, with "step"
    steps: int = 0
    resumed_from: int | None = None
    precision: str = "fp32"  # what the forward passes ran at


class ImageCache:
    """Decoded training images; small sets are kept in memory, large ones read on demand. Kept images are
    the decoded ``uint8`` arrays (3 bytes a pixel, what the budget counts), converted on each access."""

    def __init__(self, images: ImageSet, budget_bytes: int = 1 << 30):
        self.images = images
        per_image = 3 * images.image_size ** 2
        self.keep = len(images) * per_image <= budget_bytes
        self._cache: dict[int, np.ndarray] = {}

    def __getitem__(self, index: int) -> torch.Tensor:
        pixels = self._cache.get(index)
        if pixels is None:
            pixels = self.images.read(index)
            if self.keep:
                self._cache[index] = pixels
        return to_tensor(pixels)

    def cached_bytes(self) -> int:
        return sum(pixels.nbytes for pixels in self._cache.values())


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The torch RNG states a training step may draw from: the CPU's, and the GPU's when training on one."""
    states = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, torch.Tensor], device: torch.device, source: object = "checkpoint") -> None:
    torch.set_rng_state(states["torch_rng"])
    if device.type != "cuda":
        return
    if "cuda_rng" not in states:  # saved by a CPU run, or before GPU states were saved: noise would differ
        raise UserError(f"{source} holds no CUDA RNG state, so training cannot resume on {device} "
                        "reproducibly; delete it to train from the start")
    torch.cuda.set_rng_state(states["cuda_rng"], device)


def restore_rank_rng_states(state: dict[str, Any], device: torch.device, ranks: Ranks, source: object,
                            seed: int) -> None:
    """This rank's RNG states from a checkpoint written by as many ranks (one process's checkpoints have one).
    Resuming on another number of ranks keeps the weights and optimiser states but cannot continue the draws."""
    saved_ranks = state.get("workers", 1)
    if saved_ranks == ranks.size:
        restore_rng_states(state["rank_rng"][ranks.rank] if "rank_rng" in state else state, device, source)
        return
    warnings.warn(f"{source} was written by {saved_ranks} training worker(s) and resumes on {ranks.size}: weights "
                  "and optimiser states continue, but the random draws, and so the losses, differ from an "
                  "uninterrupted run's")
    torch.manual_seed(int(np.random.SeedSequence([seed, state["step"], ranks.rank]).generate_state(1)[0]))


def sample_images(cache: ImageCache, config: TrainConfig, step: int, share: slice = slice(None)) -> torch.Tensor:
    """The step's images (``share`` of them): a pure function of (seed, step), so resuming needs no data-loader
    state. The whole batch is drawn and only the share decoded, so ranks split exactly one process's batch."""
    rng = np.random.default_rng([config.seed, step, 1])
    indices = rng.integers(0, len(cache.images), size=config.batch_size)[share]
    flips = torch.from_numpy(rng.random(config.batch_size) < 0.5)[share]  # horizontal flips: the only augmentation
    images = torch.stack([cache[int(i)] for i in indices])
    images[flips] = images[flips].flip(-1)
    return images


def sample_masks(sampler: TrainMaskSampler, batch_size: int, step: int, share: slice = slice(None)) -> torch.Tensor:
    """The step's training masks (``share`` of them). The sampler draws its n-th batch from
    ``default_rng([seed, n])`` and training takes one batch a step, so step t's masks are the sampler's batch t,
    whichever process draws them."""
    sampler.batches_drawn = step
    return sampler.sample(batch_size)[share]


class TrainingBatches(Dataset):
    """Item t is step t's batch on the CPU (``share`` of it, for one of several ranks): images, masks and the
    method's host-side inputs. A pure function of (seed, t, share), so any process can make any step's batch
    and a resumed run needs no loader state."""

    def __init__(self, images: ImageSet, config: TrainConfig, masks: TrainMaskSampler,
                 host_preprocessing: HostPreprocessing | None, cache_bytes: int = IMAGE_CACHE_BYTES,
                 share: slice = slice(None)):
        self.cache = ImageCache(images, cache_bytes)
        self.config = config
        self.masks = masks
        self.host_preprocessing = host_preprocessing
        self.share = share

    def __len__(self) -> int:
        return self.config.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        images = sample_images(self.cache, self.config, step, self.share)
        masks = sample_masks(self.masks, self.config.batch_size, step, self.share)
        batch = {"image": images, "mask": masks}
        if self.host_preprocessing is not None:
            batch.update(self.host_preprocessing(images, masks))
        return batch


def batch_loader(batches: TrainingBatches, start: int, data_workers: int, device: torch.device) -> DataLoader:
    """Steps ``start`` … end of ``batches`` in order; with workers, made ahead in parallel. On a GPU the
    batches are pinned, so their copies to the device need not block this process."""
    if isinstance(data_workers, bool) or not isinstance(data_workers, int) or data_workers < 0:
        raise UserError(f"data workers must be a non-negative integer, got {data_workers!r}")
    # Its own generator: a loader seeds its workers from a draw of that generator, which from the global one
    # would shift the random numbers of methods that draw from it (DDNM's timesteps and noise).
    return DataLoader(batches, batch_size=None, sampler=range(start, len(batches)), num_workers=data_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(batches.config.seed),
                      prefetch_factor=PREFETCH_BATCHES_PER_WORKER if data_workers else None)


def split_losses(losses: dict[str, torch.Tensor | float]) -> tuple[list[str], torch.Tensor | None]:
    """The names of a step's tensor losses and those losses stacked into one vector (None when there are none).
    Stacking promotes to the widest dtype, which represents every value exactly."""
    names = [name for name, value in losses.items() if torch.is_tensor(value)]
    if not names:
        return names, None
    return names, torch.stack([losses[name].detach().reshape(()) for name in names])


def losses_to_floats(losses: dict[str, torch.Tensor | float], names: list[str],
                     stacked: torch.Tensor | None) -> dict[str, float]:
    """The step's losses as Python floats, with one device→host copy for all of them (the same values
    ``float()`` of each would give). Methods that still return floats keep them as they are."""
    read = dict(zip(names, stacked.cpu().tolist())) if stacked is not None else {}
    return {name: read[name] if name in read else float(value) for name, value in losses.items()}


class NonFiniteWatch:
    """The first step whose losses were not all finite, kept on the device: a per-step check on the host would
    wait for the device every step. Read at log steps, before checkpoints and at the end (:meth:`check`)."""

    def __init__(self, device: torch.device, ranks: Ranks = SINGLE):
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.ranks = ranks  # a non-finite loss on any rank stops every rank at the same check

    def update(self, step: int, stacked: torch.Tensor | None, losses: dict[str, torch.Tensor | float]) -> None:
        not_finite = torch.zeros((), dtype=torch.bool, device=self.first_step.device)
        if stacked is not None:
            not_finite = ~torch.isfinite(stacked).all()
        if not all(math.isfinite(value) for value in losses.values() if not torch.is_tensor(value)):
            not_finite = torch.ones_like(not_finite)  # a method returning floats: known here without waiting
        self.first_step = torch.where(not_finite & (self.first_step < 0), step, self.first_step)

    def check(self, method: InpaintingMethod, step: int, values: dict[str, float] | None = None) -> None:
        first = int(self.ranks.earliest(self.first_step))
        if first >= 0:
            shown = f": {values}" if values is not None and first == step else ""
            raise FloatingPointError(f"{method.name}: non-finite loss at step {first}{shown}")


def train(method: InpaintingMethod, images: ImageSet, config: TrainConfig, *,
          checkpoint_path: str | os.PathLike | None = None, on_step: StepCallback | None = None,
          progress: bool = True, description: str = "train", data_workers: int = 0,
          precision: str = "fp32", ranks: Ranks = SINGLE, sync_batch_norm: bool = True) -> TrainResult:
    """Train ``method`` for ``config.steps`` steps, resuming from ``checkpoint_path`` when it exists.

    ``data_workers`` processes make the batches (0: this process); the losses are the same either way.
    ``precision`` (fp32 | bf16 | fp16) is what the forward passes run at; a checkpoint resumes only at its own.
    ``ranks``: this process's place when several train the method together (:mod:`bench.run.data_parallel`): each
    takes its share of every batch, gradients and reported losses are averaged over the ranks, batch norm is
    synchronised unless ``sync_batch_norm`` is off, and rank 0 alone writes the checkpoint and calls ``on_step``.
    """
    if not method.trainable:
        raise NotTrainable(f"method {method.name!r} has nothing to train")
    if len(images) == 0:
        raise UserError(f"training set {images.name!r} ({images.split}) has no images")
    device = method.device
    share = ranks.share(config.batch_size)
    method.set_precision(precision)
    result = TrainResult(precision=precision)
    masks = TrainMaskSampler(images.image_size, config.seed, FreeFormConfig(preset=config.mask_preset),
                             max_ratio=config.max_mask_ratio)
    start = 0
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    if checkpoint_path and checkpoint_path.exists():
        state = safe_torch_load(checkpoint_path)
        saved_precision = state.get("precision", "fp32")  # checkpoints from before mixed precision were fp32
        if saved_precision != precision:
            raise UserError(f"{checkpoint_path} was trained at precision {saved_precision}, not {precision}: resume "
                            f"with --precision {saved_precision}, or delete it to train from the start")
        method.load_training_state(state["method"])
        if method.grad_scaler is not None:
            method.grad_scaler.load_state_dict(state["grad_scaler"])
        restore_rank_rng_states(state, device, ranks, checkpoint_path, config.seed)
        masks.load_state_dict(state["masks"])  # checks the mask settings are the original run's
        start, result.history, result.resumed_from = state["step"], state["history"], state["step"]
    else:
        torch.manual_seed(ranks.seed(config.seed))

    cache_bytes = IMAGE_CACHE_BYTES // max(1, data_workers)  # every worker keeps its own decoded images
    batches = TrainingBatches(images, config, masks, method.host_preprocessing("train"), cache_bytes, share)
    loader = batch_loader(batches, start, data_workers, device)
    nonfinite = NonFiniteWatch(device, ranks)
    method.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=description,
               disable=not (progress and ranks.leader), leave=False, dynamic_ncols=True)
    with data_parallel(method, device, ranks, sync_batch_norm=sync_batch_norm) as parallel:
        for step, batch in zip(bar, loader):
            batch = {name: in_memory_format(tensor.to(device, non_blocking=True), method.memory_format)
                     for name, tensor in batch.items()}
            with method.autocast():
                losses = method.train_step(batch)
            method.end_training_step()
            if ranks.distributed:  # every loss a tensor, so that all of them are averaged over the ranks
                losses = {name: torch.as_tensor(value, device=device) for name, value in losses.items()}
            names, stacked = split_losses(losses)
            nonfinite.update(step, stacked, losses)
            if step % config.log_every == 0 or step == config.steps - 1:
                values = losses_to_floats(losses, names, None if stacked is None else ranks.mean(stacked))
                nonfinite.check(method, step, values)
                result.history.append({"step": step, **values})
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(values.items())[:4]}, refresh=False)
            if on_step is not None and ranks.leader:
                on_step(step, losses)
            done = step + 1
            if checkpoint_path and (done % config.checkpoint_every == 0 or done == config.steps):
                nonfinite.check(method, step)  # never save weights a non-finite loss has updated
                with parallel.unwrapped() if parallel else contextlib.nullcontext():
                    training_state = method.training_state()
                diverged = diverged_keys(training_state["state_dict"], ranks, batch_norm_synchronised=sync_batch_norm)
                if diverged:
                    raise RuntimeError(f"{method.name}: the training workers' weights differ at step {done} in "
                                       f"{', '.join(diverged[:5])}: something is updated per worker, not from the "
                                       "averaged gradients")
                rank_states = ranks.gather(rng_states(device))
                if ranks.leader:
                    scaler = {"grad_scaler": method.grad_scaler.state_dict()} if method.grad_scaler is not None else {}
                    atomic_torch_save({"step": done, "method": training_state, "history": result.history,
                                       **rank_states[0], "rank_rng": rank_states, "workers": ranks.size,
                                       "masks": {**masks.state_dict(), "batches_drawn": done},
                                       "precision": precision, **scaler}, checkpoint_path)
        bar.close()
        nonfinite.check(method, config.steps - 1)
    method.eval()
    result.steps = config.steps
    return result
