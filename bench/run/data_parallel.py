"""Data-parallel training inside a process group (the ranks Ray Train starts: :mod:`bench.run.ray_train`).

What the training loop (:func:`bench.run.train.train`) needs when one cell trains in several processes:

* **Which samples.** The global batch of step t is the one a single process draws from (seed, t); rank r takes
  its r-th equal share (:meth:`Ranks.share`). So the data of N ranks is exactly that of one process, and a
  batch size the ranks do not divide is refused rather than silently changed.
* **Which networks.** Every trainable network of the method (``networks()`` with a parameter that requires a
  gradient) is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, which averages the gradients
  over the ranks during ``backward``; frozen ones (teachers, perceptual networks) are left alone. Batch norm
  becomes :class:`SynchronisedBatchNorm` first, so its statistics are those of the global batch.
* **Which normalisers.** A loss divided by a statistic of its batch (SAHN's count of fake patches, EdgeConnect's
  hole fraction, LaMa's feature energy) divides by the whole global batch's (:func:`whole_batch_normaliser`):
  averaging the ranks' ratios (what DDP does) is not the ratio of the whole batch.
* **What is saved.** Checkpoints hold the method's own modules (:meth:`WrappedNetworks.unwrapped`): no
  ``module.`` prefixes, so N ranks' checkpoints load into one process and back.
* **What is reported.** Losses are averaged over the ranks at log steps; each rank's RNG state is gathered into
  the checkpoint so a resumed run continues bit-identically.

``broadcast_buffers`` is off: the ranks' buffers (spectral-norm vectors, synchronised batch-norm statistics, EMA
copies) receive identical updates from identical weights, and broadcasting them before every forward would
overwrite, in place, buffers that an earlier forward of the same step still needs for its backward.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bench.errors import UserError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes training one cell (``size`` 1: training alone)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def of_process_group(cls) -> "Ranks":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes files and reports progress."""
        return self.rank == 0

    def share(self, batch_size: int) -> slice:
        """This rank's samples of a global batch of ``batch_size``."""
        if batch_size % self.size:
            lower = batch_size - batch_size % self.size
            suggestions = " or ".join(str(n) for n in (lower, lower + self.size) if n > 0)
            raise UserError(f"a batch of {batch_size} cannot be split evenly over {self.size} training workers: "
                            f"use --batch-size {suggestions} (every worker takes the same number of samples, "
                            "so that averaging their gradients gives the gradient of the whole batch)")
        per_rank = batch_size // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def seed(self, seed: int) -> int:
        """The torch seed of this rank: the run's own for rank 0 (so one process seeds as it always did), one
        derived from (seed, rank) for the others, so that ranks draw different noise."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` averaged over the ranks (the same on every rank)."""
        if not self.distributed:
            return values
        total = values.detach().clone()
        dist.all_reduce(total)
        return total / self.size

    def earliest(self, step: torch.Tensor) -> torch.Tensor:
        """The smallest non-negative ``step`` over the ranks (-1 when every rank has -1)."""
        if not self.distributed:
            return step
        missing = torch.iinfo(torch.long).max
        found = torch.where(step < 0, torch.full_like(step, missing), step)
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
        return torch.where(found == missing, torch.full_like(found, -1), found)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered


SINGLE = Ranks()

#: batch-norm buffers, which differ between ranks when batch norm is not synchronised
BATCH_NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # the bytes, of any dtype
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def diverged_keys(state_dict: dict[str, Any], ranks: Ranks, *, batch_norm_synchronised: bool = True) -> list[str]:
    """The entries of a state dict that are not bit-identical on every rank. Ranks start equal and apply the same
    averaged gradients, so they stay equal unless something is updated per rank (an EMA fed rank-local values,
    a buffer changed in the forward pass); checked before each checkpoint, which holds rank 0's alone."""
    if not ranks.distributed:
        return []
    digests = {key: tensor_digest(value) for key, value in state_dict.items() if torch.is_tensor(value)
               and (batch_norm_synchronised or not key.endswith(BATCH_NORM_STATISTICS))}
    everyone = ranks.gather(digests)
    return sorted(key for key, digest in digests.items() if any(other.get(key) != digest for other in everyone))


def whole_batch_normaliser(local: torch.Tensor) -> torch.Tensor:
    """A loss's data-dependent normaliser, computed on this rank's share of the batch, as the whole global batch's.

    ``local`` is either a mean over the share (a hole fraction, a mean square) or a sum over it (a count). The
    ranks take equal shares, so the global mean is the ranks' mean of the share means; and a rank whose loss is
    its share's sum divided by the ranks' mean of the share sums contributes, once DDP averages the ranks,
    its part of (whole batch's sum) / (whole batch's count). Either way the normaliser to divide by is the mean of
    ``local`` over the ranks, which this returns (without gradient, as befits a normaliser), on every rank.

    Not distributed, it is ``local`` itself: a single process divides by its own count. Distributed, it
    is a collective: every rank must reach it, in the same order, as every rank reaches DDP's backward."""
    local = local.detach()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    total = local.to(torch.promote_types(local.dtype, torch.float32)).clone()  # an fp16 count would overflow
    dist.all_reduce(total)
    return (total / dist.get_world_size()).to(local.dtype)


class SynchronisedBatchNorm(_BatchNorm):
    """Batch norm over the global batch of all ranks, which can be differentiated twice.

    The per-channel sums of x with the element count, then of the squares about their mean, are all-reduced with
    the differentiable :func:`torch.distributed.nn.functional.all_reduce`, and the normalisation is written in
    ordinary tensor operations, so autograd differentiates it, and differentiates that again: the backward pass is
    the whole batch's, and so is a gradient penalty's (LaMa's R1, ``create_graph=True``) second backward.

    It replaces batch norm on every device, GPUs included, rather than torch's :class:`~torch.nn.SyncBatchNorm`:
    torch's backward runs ``batch_norm_backward_reduce``/``batch_norm_backward_elemt``, which have no derivative,
    so a discriminator with batch norm under a gradient penalty cannot train with it (and it has no CPU kernels,
    where gloo stands in for NCCL in the tests). One implementation on every device also means the CPU tests
    check the code the GPUs run. The price is speed, in the few networks that have batch norm: two small
    all-reduces where torch makes one all-gather, and a few elementwise kernels with a float32 copy of a
    half-precision input instead of torch's fused ones.

    The sums and the count are accumulated in float32 (float64 for float64 input): in fp16 a count of 65,536
    elements per channel (LaMa's first normalisation at 256², batch 1) is infinite, and bf16 sums keep only 8
    bits. The output has the input's dtype, as batch norm's under autocast.

    ``force_sync``: synchronise even in a group of one rank (for testing the path on one device: otherwise a lone
    rank, like torch's, runs plain batch norm); it needs an initialised process group."""

    def __init__(self, *args: Any, force_sync: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.force_sync = force_sync

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D input)")

    def _synchronising(self) -> bool:
        if not self.training:
            return False
        grouped = dist.is_available() and dist.is_initialized()
        if self.force_sync and not grouped:
            raise RuntimeError("SynchronisedBatchNorm(force_sync=True) needs an initialised process group")
        return grouped and (self.force_sync or dist.get_world_size() > 1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._synchronising():
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        statistics_dtype = torch.promote_types(input.dtype, torch.float32)
        with torch.autocast(input.device.type, enabled=False):
            values = input.to(statistics_dtype)
            reduce_dims = [0, *range(2, values.dim())]
            channels = values.shape[1]
            shape = [1, channels] + [1] * (values.dim() - 2)
            count = torch.full((1,), values.numel() / channels, dtype=statistics_dtype, device=values.device)
            sums = all_reduce(torch.cat([values.sum(reduce_dims), count]))
            total = sums[-1]
            mean = sums[:channels] / total
            # The squares about the global mean, in a second reduction: E[x²] − E[x]² from one would lose the
            # variance to cancellation wherever the mean is large beside the spread (as after partial convolutions).
            centred = values - mean.view(shape)
            variance = all_reduce(centred.square().sum(reduce_dims)) / total
            if self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                    unbiased = variance * (total / (total - 1).clamp_min(1))
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                    self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)
            normalised = centred * torch.rsqrt(variance.view(shape) + self.eps)
            if self.affine:
                normalised = normalised * self.weight.view(shape) + self.bias.view(shape)
        return normalised.to(input.dtype)


def synchronise_batch_norm(module: nn.Module, device: torch.device, *, force_sync: bool = False) -> int:
    """Replace, in place, every batch norm inside ``module`` by a :class:`SynchronisedBatchNorm` holding the same
    parameters and buffers (optimisers keep stepping the same tensors), on ``device``'s kind as on any other (see
    the class for why not torch's :class:`~torch.nn.SyncBatchNorm`). ``force_sync`` makes them synchronise in a
    group of one rank too. Returns how many were replaced."""
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, SynchronisedBatchNorm):
            child.force_sync = child.force_sync or force_sync
        elif isinstance(child, _BatchNorm):
            synced = SynchronisedBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                           child.track_running_stats, force_sync=force_sync)
            if child.affine:
                synced.weight, synced.bias = child.weight, child.bias
            if child.track_running_stats:
                synced.running_mean, synced.running_var = child.running_mean, child.running_var
                synced.num_batches_tracked = child.num_batches_tracked
            synced.train(child.training)
            setattr(module, name, synced)
            replaced += 1
        else:
            replaced += synchronise_batch_norm(child, device, force_sync=force_sync)
    return replaced


class ParallelNetwork(nn.parallel.DistributedDataParallel):
    """A wrapped network that still answers for its attributes: methods read helpers of their networks
    (CTSDG's ``size_multiple``, SAHN's ``fake_patches``) as well as calling them; the call goes through DDP."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class WrappedNetworks:
    """The method's trainable networks, each replaced by a :class:`ParallelNetwork` for as long as it lives."""

    def __init__(self, method: nn.Module, device: torch.device, *, sync_batch_norm: bool = True):
        self.method = method
        self.originals: dict[str, nn.Module] = {}
        for name, network in method.networks().items():
            if not any(parameter.requires_grad for parameter in network.parameters()):
                continue  # frozen: a teacher or a perceptual network, the same on every rank
            if sync_batch_norm:
                synchronise_batch_norm(network, device)
            self.originals[name] = network
        self._wrapped = {name: ParallelNetwork(network, device_ids=[device.index] if device.type == "cuda" else None,
                                               broadcast_buffers=False)
                         for name, network in self.originals.items()}
        self._install(self._wrapped)

    def _install(self, modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            setattr(self.method, name, module)

    @contextlib.contextmanager
    def unwrapped(self) -> Iterator[None]:
        """The method's own networks for the block, so its state dict has its own keys."""
        self._install(self.originals)
        try:
            yield
        finally:
            self._install(self._wrapped)

    def remove(self) -> None:
        """Put the method's own networks back for good (after training)."""
        self._install(self.originals)


@contextlib.contextmanager
def data_parallel(method: nn.Module, device: torch.device, ranks: Ranks, *,
                  sync_batch_norm: bool = True) -> Iterator[WrappedNetworks | None]:
    """The method's trainable networks wrapped for the block when ``ranks`` is distributed (else nothing to do)."""
    if not ranks.distributed:
        yield None
        return
    wrapped = WrappedNetworks(method, device, sync_batch_norm=sync_batch_norm)
    try:
        yield wrapped
    finally:
        wrapped.remove()
