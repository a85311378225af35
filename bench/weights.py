"""Published checkpoints as inputs of a benchmark: which cell uses which file, its digest, and the check
that every one of them loads before any cell runs.

The ``weights`` option maps a method to one path, or to one path per dataset label:

    weights: {ec: {celeba: /ckpt/ec/celeba, paris: /ckpt/ec/paris}, lama_fourier: /ckpt/lama/lama-fourier}

A cell with weights loads them (harness or official format, the method configured from the checkpoint)
and evaluates them as released; with ``finetune`` in its training config it trains from them instead.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from bench.errors import CheckpointError, UserError
from bench.files import sha256_file

WeightsMapping = Mapping[str, "str | Mapping[str, str]"]


def checkpoint_sha256(path: str | os.PathLike, files: Sequence[str] = ()) -> str:
    """A file's sha256; for a folder release, the sha256 of ``"relative/path<TAB>sha256"`` lines over the
    files it is read from (``files``, relative to it), or over every regular file under it when none are
    named, sorted by path."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    names = sorted(files) if files else sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\t{sha256_file(path / name)}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class PublishedWeights:
    """The checkpoint one cell loads, as recorded in its ``cell.json`` and MLflow run."""

    path: str  # absolute
    sha256: str
    format: str  # official | harness
    release: str  # what the checkpoint is, in words
    variant: str  # the registered variant its shapes belong to

    def record(self, finetune_steps: int | None) -> dict[str, Any]:
        use = "fine-tuned" if finetune_steps else "as released"
        return {**dataclasses.asdict(self), "use": use, "finetune_steps": finetune_steps}


def weights_path(weights: WeightsMapping, method: str, dataset_label: str) -> str | None:
    """The path the mapping gives ``method`` on ``dataset_label`` (None when the method has no entry)."""
    entry = weights.get(method)
    if entry is None:
        return None
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping):
        if dataset_label not in entry:
            raise UserError(f"weights for {method} name datasets {sorted(entry)} but not {dataset_label!r}; "
                            f"add {method}: {{{dataset_label}: PATH}} or give one path for every dataset")
        path = entry[dataset_label]
        if not isinstance(path, str):
            raise UserError(f"weights for {method} on {dataset_label}: expected a path, got {path!r}")
        return path
    raise UserError(f"weights for {method}: expected a path or a mapping dataset → path, got {entry!r}")


def absolute_weights(weights: WeightsMapping) -> dict[str, Any]:
    """Every path of the mapping made absolute (``~`` expanded), so it means the same in every worker."""
    def absolute(path: Any) -> Any:
        return os.path.abspath(os.path.expanduser(path)) if isinstance(path, str) else path

    return {method: ({label: absolute(p) for label, p in entry.items()} if isinstance(entry, Mapping)
                     else absolute(entry)) for method, entry in weights.items()}


def check_published_weights(weights: WeightsMapping, methods: Sequence[str], dataset_labels: Iterable[str], *,
                            create: Callable[[str], Any], finetune: Callable[[str], bool],
                            progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda items: items,
                            ) -> dict[tuple[str, str], PublishedWeights]:
    """Load every checkpoint the run will use, once per (method, path), before any cell runs.

    Returns ``{(method, dataset label): PublishedWeights}``. Any problem — a method the run does not
    include, a dataset missing from a per-dataset mapping, a missing, truncated or foreign file, a
    checkpoint of another method, fine-tuning a method that cannot train — is one :class:`UserError`
    naming the file and what was expected, raised before anything is written."""
    unknown = sorted(set(weights) - set(methods))
    if unknown:
        raise UserError(f"weights given for {unknown}, which this run does not include (methods: {list(methods)})")
    wanted: dict[tuple[str, str], str] = {}
    for method in weights:
        for label in dataset_labels:
            path = weights_path(weights, method, label)
            if path is not None:
                wanted[(method, label)] = path
    checked: dict[tuple[str, str], PublishedWeights] = {}
    for method, path in progress(sorted({(m, p) for (m, _), p in wanted.items()})):
        checked[(method, path)] = _load_once(method, path, create, finetune(method))
    return {(method, label): checked[(method, path)] for (method, label), path in wanted.items()}


def _load_once(method_name: str, path: str, create: Callable[[str], Any], finetune: bool) -> PublishedWeights:
    if not Path(path).exists():
        raise UserError(f"weights for {method_name}: {path} does not exist")
    method = create(method_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cell repeats any warning (generator-only release) in its own log
        method.load(path)
    info = method.loaded_checkpoint
    if finetune and not method.trainable:
        raise UserError(f"weights for {method_name}: {path} cannot be fine-tuned ({method_name} only samples "
                        "with it); drop finetune for this method")
    return PublishedWeights(path=path, sha256=checkpoint_sha256(path, info.files), format=info.format,
                            release=info.release, variant=info.variant)


def verify_unchanged(weights: PublishedWeights, files: Sequence[str] = ()) -> None:
    """A cell refuses a checkpoint whose bytes changed since the run was planned (its fingerprint would lie)."""
    now = checkpoint_sha256(weights.path, files)
    if now != weights.sha256:
        raise CheckpointError(f"{weights.path} changed since this run was planned (sha256 {weights.sha256[:12]}… "
                              f"then, {now[:12]}… now); re-run to plan with the new file")
