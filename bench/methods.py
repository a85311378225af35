"""The method interface every inpainting method implements, and the registry that creates them by name.

Conventions (the same for every method; conversions happen inside the method):
  images  float tensor [B, 3, H, W] in [0, 1]
  masks   float tensor [B, 1, H, W], 1 = hole, 0 = known
  inpaint returns the raw prediction [B, 3, H, W] in [0, 1]; the harness composites
  ``pred * m + gt * (1 - m)`` and quantises it, so methods never do that for scoring.

Methods are registered as entry points in the group ``sahn_bench.methods`` (see pyproject.toml), so a
user's own package can add a method the same way. Each entry point names a *variant constructor*
(timm style: ``sahn_tiny``, ``lama_fourier``) that accepts keyword overrides of the method's config
dataclass and returns an :class:`InpaintingMethod`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.metadata
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn

from bench.errors import CheckpointError, NotTrainable, UserError

ENTRY_POINT_GROUP = "sahn_bench.methods"
CHECKPOINT_FORMAT = "sahn-bench/1"
Scale = Literal["tiny", "paper", "any", "ablation"]  # "ablation": only when asked for by name


class InpaintingMethod(nn.Module):
    """Base class: a method is an ``nn.Module`` holding its networks, its config and its optimisers.

    Subclasses implement :meth:`inpaint` and, if they train, :meth:`train_step`; methods with an
    official checkpoint format override :meth:`load_official`.
    """

    #: registry name of the variant, set by the constructor (e.g. ``"sahn_tiny"``)
    name: str = ""
    #: the column this method stands for in the seed paper's tables (``"SAHN"``, ``"LaMa-Fourier"``, ...)
    paper_name: str | None = None
    #: False for classical methods: :meth:`train_step` raises :class:`NotTrainable`
    trainable: bool = True

    def __init__(self, config: Any = None):
        super().__init__()
        self.config = config
        # Optimisers live on the method because GAN methods step several of them per batch.
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # Substitute networks used instead of the paper's (offline), recorded with every run.
        self.substitutions: dict[str, str] = {}

    # ----------------------------------------------------------------- the interface
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimisation step on ``{"image": [B,3,H,W], "mask": [B,1,H,W]}``; returns named losses."""
        raise NotTrainable(f"method {self.name!r} has nothing to train")

    def networks(self) -> dict[str, nn.Module]:
        """Sub-networks reported by :meth:`num_parameters` (default: every child module with parameters)."""
        return {n: m for n, m in self.named_children() if any(True for _ in m.parameters())}

    def num_parameters(self) -> dict[str, int]:
        return {n: sum(p.numel() for p in m.parameters()) for n, m in self.networks().items()}

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    # ----------------------------------------------------------------- checkpoints
    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}

    def save(self, path: str | os.PathLike) -> None:
        """Weights only (no optimiser state), written atomically."""
        payload = {"format": CHECKPOINT_FORMAT, "method": self.name, "config": self.config_dict(),
                   "state_dict": self.state_dict()}
        atomic_torch_save(payload, path)

    def load(self, path: str | os.PathLike) -> "InpaintingMethod":
        """Load a harness checkpoint strictly, or the method's official format via :meth:`load_official`."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"checkpoint not found: {path}")
        if path.is_file():
            try:
                payload = safe_torch_load(path)
            except CheckpointError:  # official formats may hold objects the plain loader refuses
                payload = None
            if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
                load_state_dict_strict(self, payload["state_dict"], what=f"{path}")
                return self
        self.load_official(path)
        return self

    def load_official(self, path: Path) -> None:
        raise CheckpointError(f"{path}: not a sahn-bench checkpoint, and method {self.name!r} "
                              "has no official checkpoint format")

    def training_state(self) -> dict[str, Any]:
        """Everything needed to resume training: weights and optimiser states."""
        return {"state_dict": self.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()}}

    def load_training_state(self, state: dict[str, Any]) -> None:
        load_state_dict_strict(self, state["state_dict"], what="training checkpoint")
        for key, opt_state in state["optimizers"].items():
            # A copy: Adam keeps same-device tensors as given, which would tie two methods' moments.
            self.optimizers[key].load_state_dict(copy.deepcopy(opt_state))


# --------------------------------------------------------------------- checkpoint helpers
def safe_torch_load(path: str | os.PathLike, extra_globals: Iterable[Any] = ()) -> Any:
    """``torch.load(weights_only=True)`` on CPU; ``extra_globals`` allow-lists what an official format needs."""
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors name the offending global: keep that text
        raise CheckpointError(f"{path}: cannot be loaded safely (weights_only=True): {exc}") from exc


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
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------- registry
MethodFactory = Callable[..., InpaintingMethod]
_LOCAL: dict[str, MethodFactory] = {}


def variant(scale: Scale = "any", paper_name: str | None = None,
            trainable: bool = True) -> Callable[[MethodFactory], MethodFactory]:
    """Mark a constructor as a variant: ``scale`` picks it for the ``default`` (tiny) or ``paper`` preset;
    ``trainable=False`` tells pipelines, without building the method, that it needs no training data."""

    def mark(factory: MethodFactory) -> MethodFactory:
        factory.scale = scale  # type: ignore[attr-defined]
        factory.paper_name = paper_name  # type: ignore[attr-defined]
        factory.trainable = trainable  # type: ignore[attr-defined]
        return factory

    return mark


def register_method(name: str, factory: MethodFactory) -> None:
    """Register a constructor in this process (tests, notebooks); packages use entry points instead."""
    _LOCAL[name] = factory


@functools.lru_cache(maxsize=1)
def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_methods(scale: Scale | None = None) -> list[str]:
    """Registered method names, optionally only those for a preset scale (``any`` counts for both)."""
    names = sorted(set(_entry_points()) | set(_LOCAL))
    if scale is None:
        return names
    chosen = []
    for name in names:
        try:
            factory = get_factory(name)
        except Exception as exc:  # a broken plugin must not take the whole benchmark down
            warnings.warn(f"method {name!r} cannot be loaded and is skipped: {exc}")
            continue
        if getattr(factory, "scale", "any") in (scale, "any"):
            chosen.append(name)
    return chosen


def get_factory(name: str) -> MethodFactory:
    if name in _LOCAL:
        return _LOCAL[name]
    entry = _entry_points().get(name)
    if entry is None:
        known = ", ".join(available_methods()) or "none (is the package installed with pip install -e .?)"
        raise UserError(f"unknown method {name!r}; registered methods: {known}")
    return entry.load()


def create_method(name: str, **overrides: Any) -> InpaintingMethod:
    """Create a registered method by name; ``overrides`` replace fields of its config dataclass."""
    factory = get_factory(name)
    method = factory(**overrides)
    method.name = name
    if getattr(factory, "paper_name", None):  # the variant names the paper column it stands for
        method.paper_name = factory.paper_name
    return method


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """``dataclasses.replace`` with a clear error naming the valid fields."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown option(s) {unknown} for {type(config).__name__}; valid: {sorted(fields)}")
    return dataclasses.replace(config, **overrides)
