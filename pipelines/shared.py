"""What the entry points that freeze pairs and train methods (``full_benchmark``, ``tune``) do alike with their
options: paths made absolute, mask options turned into the manifest's protocol."""
from __future__ import annotations

import os
from typing import Any

from bench.data.manifest import MaskProtocol


def absolute_path(path: str | None) -> str | None:
    """``path`` with ``~`` expanded, made absolute: it then means the same in every Ray worker (whose working folder
    may differ) and in the MLflow params. Empty or None stays as it is."""
    return os.path.abspath(os.path.expanduser(path)) if path else path


def absolute_dataset(entry: str) -> str:
    """A dataset option with its path made absolute: ``celeba:~/data`` → ``celeba:/home/me/data``; an embedded
    suite's name (``faces``) stays as it is."""
    kind, sep, root = entry.partition(":")
    return f"{kind}:{absolute_path(root)}" if sep and root else entry


def mask_protocol(masks: Any, *, source: str | None = None) -> MaskProtocol:
    """The protocol of frozen pairs from a config's mask options (a benchmark's ``masks``, a search's ``val``);
    ``source`` for options that do not choose one (a search's validation masks are always free-form)."""
    return MaskProtocol(source=source or masks.source, preset=masks.preset, folder=getattr(masks, "folder", None),
                        bins=tuple(masks.bins), masks_per_bin=masks.masks_per_bin, seed=masks.seed)
