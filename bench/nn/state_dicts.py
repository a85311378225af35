"""Reading official checkpoints without building a network: what the methods' ``inspect_official`` share.

An inspector decides from a file's structure (key names, tensor shapes) whether it is its method's release
and which configuration it needs. These helpers read files safely and count indexed modules in a state_dict.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from bench.errors import CheckpointError
from bench.checkpoint_format import safe_torch_load


def read_plain_checkpoint(path: str | os.PathLike) -> Any | None:
    """The payload of a file of tensors and plain containers, read with ``weights_only=True``.

    ``None`` when the file holds pickled Python objects: it is no plain release, though a method whose
    official format needs them (LaMa's Lightning files) may read it inertly. Raises :class:`CheckpointError`
    (one line) when torch cannot read the file at all: truncated, corrupted or not a torch file."""
    try:
        return safe_torch_load(path)
    except CheckpointError:
        if pickled_globals(path):
            return None
        raise


def pickled_globals(path: str | os.PathLike) -> list[str]:
    """Names of the Python objects a torch file would unpickle (read without running any of them)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a readable zip checkpoint: it names nothing we could report
        return []


def is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(torch.is_tensor(v) for v in value.values())


def without_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state`` without ``prefix`` when every key has it (``module.`` from ``nn.DataParallel``), else as is."""
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return dict(state)


def consecutive_count(state: Mapping[str, Any], prefix: str, start: int = 0) -> int:
    """How many indexed modules ``prefix{start}.``, ``prefix{start+1}.``, … the keys hold without a gap
    (``consecutive_count(state, "middle.")`` = the residual blocks). Stops at the first missing index, so a
    stray ``middle.99.weight`` is not counted and the strict load names it."""
    present = set()
    for key in state:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                present.add(int(head))
    count = 0
    while start + count in present:
        count += 1
    return count


def tensor_shape(state: Mapping[str, torch.Tensor], key: str, path: str | os.PathLike, what: str) -> torch.Size:
    """The shape of ``state[key]``; a one-line error naming the file, the key and the format when absent."""
    value = state.get(key)
    if not torch.is_tensor(value):
        raise CheckpointError(f"{path}: {what} without {key}; the file is incomplete or of another layout")
    return value.shape
