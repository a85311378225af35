"""The checkpoint format: how the harness reads and writes checkpoint files, whoever made them.

Every file is read through :func:`safe_torch_load` (``torch.load(weights_only=True)``, with only what an official
format needs allow-listed), once per file inside a :func:`checkpoint_reads` scope, and written through
:func:`atomic_torch_save`. The harness's own files are ``{"format": CHECKPOINT_FORMAT, "method", "config",
"state_dict"}``; :class:`CheckpointInfo` is what a file is, read from its structure without building a network.
It sits under everything that loads a file: methods, metric networks and the teacher.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import torch
from torch import nn

from bench.errors import CheckpointError
from bench.files import atomic_path

CHECKPOINT_FORMAT = "sahn-bench/1"


class CheckpointReads:
    """What :func:`safe_torch_load` read while a :func:`checkpoint_reads` scope was open: payloads and refusals
    per (file, allow-list). Identifying a release asks every method class, and loading it inspects it again
    before reading the weights; within one scope all of that is one read per file."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[Any, ...], Any] = {}


_READS: contextvars.ContextVar[CheckpointReads | None] = contextvars.ContextVar("checkpoint_reads", default=None)


@contextlib.contextmanager
def checkpoint_reads(reads: CheckpointReads | None = None) -> Iterator[CheckpointReads]:
    """Share reads of checkpoint files inside the ``with`` block (an enclosing scope's when one is open, else
    ``reads`` or a new one). Payloads live as long as the scope: open it around one release, not a whole run."""
    active = _READS.get()
    scope = reads if reads is not None else active if active is not None else CheckpointReads()
    token = _READS.set(scope)
    try:
        yield scope
    finally:
        _READS.reset(token)


def _read_key(path: str | os.PathLike, extra_globals: list[Any]) -> tuple[Any, ...] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    names = sorted(item[1] if isinstance(item, tuple) else f"{item.__module__}.{item.__qualname__}"
                   for item in extra_globals)
    # the file's identity, so a file replaced inside a scope is read again
    return (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, tuple(names))


def is_zip_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is in torch's zip format (torch >= 1.6), which torch can load memory-mapped; files
    of torch 1.0-1.5 (EdgeConnect's releases) are in the legacy format, which can only be read whole."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except (OSError, TypeError):  # not a path: torch reads it without mapping
        return False


def safe_torch_load(path: str | os.PathLike, extra_globals: Iterable[Any] = ()) -> Any:
    """``torch.load(weights_only=True)`` on CPU; ``extra_globals`` allow-lists what an official format needs.

    Zip-format files are memory-mapped: tensors are read from the page cache when used, so inspecting a
    2.2 GB release reads its shapes, not its weights, and loading one copies them once into the network.
    Inside a :func:`checkpoint_reads` scope a file is read once; later calls get the same payload (treat it
    as read-only) or the same refusal."""
    extra_globals = list(extra_globals)
    reads = _READS.get()
    key = _read_key(path, extra_globals) if reads is not None else None
    if key is not None and key in reads.outcomes:
        outcome = reads.outcomes[key]
        if isinstance(outcome, CheckpointError):
            raise CheckpointError(str(outcome)) from outcome.__cause__
        return outcome
    try:
        with torch.serialization.safe_globals(extra_globals):
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip_checkpoint(path))
    except Exception as exc:
        error = CheckpointError(f"{path}: {unreadable_reason(exc)}")
        error.__cause__ = exc
        if key is not None:
            reads.outcomes[key] = error
        raise error from exc
    if key is not None:
        reads.outcomes[key] = payload
    return payload


def unreadable_reason(exc: BaseException) -> str:
    """One line on why torch refused a file. Torch's own message is several paragraphs and suggests
    ``weights_only=False``, which would run whatever code the file names: never pass that on."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"holds a pickled Python object ({found.group(1)}) that safe loading (weights_only=True) refuses; "
                "it is not a checkpoint format sahn-bench reads — check that this is the file the authors release")
    if ("central directory" in text or "zip archive" in text or "Invalid argument" in text
            or isinstance(exc, (EOFError, KeyError))):
        return "truncated or corrupted (torch cannot read it); download it again"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"cannot be loaded safely (weights_only=True): {first}"


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Strict load whose error lists missing and unexpected keys and shape mismatches in one message."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(k for k in set(own) & set(state_dict)
                        if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or mismatched:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f" (+{len(keys) - 12} more)" if len(keys) > 12 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            parts.append("shape mismatches: " + show(
                [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]))
        raise CheckpointError(f"{what} does not match {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`bench.files.atomic_path`: a crash never leaves half a file."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is, read from its files without building a network."""

    variant: str  # the registered variant it loads into ("big_lama", "spl")
    release: str  # what it is, for people ("a LaMa big-lama release (18 FFC blocks)")
    format: Literal["official", "harness"]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # config fields the checkpoint decides
    networks: tuple[str, ...] = ("generator", "discriminator")  # the networks it holds
    files: tuple[str, ...] = ()  # for a folder release: the files read, relative to it (its digest covers these)


def harness_checkpoint_info(payload: dict[str, Any], path: Path) -> CheckpointInfo:
    networks = sorted({key.split(".", 1)[0] for key in payload.get("state_dict", {})})
    return CheckpointInfo(variant=str(payload.get("method")), format="harness", config=dict(payload.get("config") or {}),
                          release=f"a sahn-bench checkpoint of {payload.get('method')}", networks=tuple(networks))
