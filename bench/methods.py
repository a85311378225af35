"""The method interface every inpainting method implements, and the registry that creates them by name.

Conventions (the same for every method; conversions happen inside the method):
  images  float tensor [B, 3, H, W] in [0, 1]
  masks   float tensor [B, 1, H, W], 1 = hole, 0 = known
  inpaint returns the raw prediction [B, 3, H, W] in [0, 1]; the harness composites
  ``pred * m + gt * (1 - m)`` and quantises it, so methods never do that for scoring.

A method's module declares its *variant constructors* (timm style: ``sahn_tiny``, ``lama_fourier``) with
:func:`variant`; each accepts keyword overrides of the method's config dataclass and returns an
:class:`InpaintingMethod`. One entry point per module in the group ``sahn_bench.methods`` (see pyproject.toml)
names the module, which the registry imports the first time a method is looked up or listed; a user's own
package adds a method the same way.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import importlib.metadata
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn

from bench.checkpoint_format import (CHECKPOINT_FORMAT, CheckpointInfo, atomic_torch_save, checkpoint_reads,
                                     harness_checkpoint_info, load_state_dict_strict, safe_torch_load)
from bench.errors import CheckpointError, NotTrainable, UserError

ENTRY_POINT_GROUP = "sahn_bench.methods"
Scale = Literal["tiny", "paper", "any", "ablation"]  # "ablation": only when asked for by name
#: the reduced precisions forward passes can run at under ``torch.autocast`` (fp32 runs without it)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("fp32", *AUTOCAST_DTYPES)
#: the memory layouts a method's networks and inputs can take (:meth:`InpaintingMethod.set_memory_format`)
TORCH_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
#: what :meth:`InpaintingMethod.host_preprocessing` returns: CPU (images, masks) → named extra input tensors
HostPreprocessing = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


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
    #: the precision training runs at (:meth:`set_precision`; the training loop sets it)
    precision: str = "fp32"
    #: the fp16 loss scaler :meth:`backward` and :meth:`step` go through (None at fp32 and bf16)
    grad_scaler: torch.amp.GradScaler | None = None
    #: the layout of the networks' weights, and of the inputs the evaluation loop gives :meth:`inpaint`
    memory_format: str = "contiguous"

    def __init__(self, config: Any = None):
        super().__init__()
        self.config = config
        # Optimisers live on the method because GAN methods step several of them per batch.
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # Substitute networks used instead of the paper's (offline), recorded with every run.
        self.substitutions: dict[str, str] = {}
        #: what :meth:`load` read (None for a fresh method)
        self.loaded_checkpoint: CheckpointInfo | None = None

    # ----------------------------------------------------------------- the interface
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimisation step on ``{"image": [B,3,H,W], "mask": [B,1,H,W]}`` (plus what
        :meth:`host_preprocessing` added, when the training loop made the batch); returns named losses as
        detached 0-d tensors on the device. Not floats: reading a value waits for the device, so the
        training loop reads them only at its log steps. Backward passes and optimiser steps go through
        :meth:`backward` and :meth:`step`, which apply the fp16 loss scaler when training at fp16."""
        raise NotTrainable(f"method {self.name!r} has nothing to train")

    def host_preprocessing(self, purpose: Literal["train", "inpaint"]) -> HostPreprocessing | None:
        """Inputs the method computes from a batch by CPU-only code (EC's and CTSDG's gray image and Canny
        edges, by scikit-image), as a function of the CPU ``(images, masks)`` returning named tensors, or None.

        The training loop calls it where a batch is made (in its data workers), before the batch goes to the
        device, and passes its tensors in the batch to :meth:`train_step` (``purpose="train"``). With
        ``purpose="inpaint"`` its tensors are keyword arguments of :meth:`inpaint`. The function must depend
        only on the config, not on weights, and be picklable (workers may be spawned): a module-level function
        or a ``functools.partial`` of one. Methods compute the same inputs themselves when they are absent."""
        return None

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

    # ----------------------------------------------------------------- training helpers (precision)
    def set_precision(self, precision: str) -> None:
        """Train at ``precision``: ``fp32`` (the default, for reproduction), ``bf16`` or ``fp16`` (forward passes
        under :meth:`autocast`; fp16 also scales the loss so small gradients do not flush to zero). Call it
        after moving the method to its device: the fp16 scaler belongs to the device type."""
        if precision not in PRECISIONS:
            raise UserError(f"precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` at the training precision on the method's device; nothing at fp32, whose path
        is plain float32. The training loop runs :meth:`train_step` inside it."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def _outside_autocast(self) -> contextlib.AbstractContextManager:
        # Backward passes and optimiser updates run outside autocast, as torch advises: backward ops take the
        # dtypes their forward ops chose, and parameters are updated in float32.
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)``; at fp16 on the loss times the scaler's factor."""
        with self._outside_autocast():
            (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward(**kwargs)

    def unscale_gradients(self, name: str) -> None:
        """At fp16, divide the gradients of optimiser ``name`` by the loss scale: call it before clipping them."""
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizers[name])

    def step(self, name: str) -> None:
        """Step optimiser ``name``. At fp16 the scaler skips the update when a gradient overflowed."""
        optimizer = self.optimizers[name]
        with self._outside_autocast():
            if self.grad_scaler is None:
                optimizer.step()
            else:
                self.grad_scaler.step(optimizer)

    def end_training_step(self) -> None:
        """Called by the training loop after each :meth:`train_step`: the fp16 scaler adapts its factor once
        per step, after every optimiser of the step has stepped."""
        if self.grad_scaler is not None:
            self.grad_scaler.update()

    # ----------------------------------------------------------------- memory layout
    def set_memory_format(self, memory_format: str) -> None:
        """Lay out the 4-D weights of every network of :meth:`networks` as ``memory_format`` (``contiguous`` or
        ``channels_last``), in place: optimisers keep their parameters. Call it after moving the method to its
        device. Values stay; convolutions pick kernels by layout, so outputs may differ by float round-off."""
        if memory_format not in TORCH_MEMORY_FORMATS:
            raise UserError(f"memory format {memory_format!r}; choose one of {', '.join(TORCH_MEMORY_FORMATS)}")
        for network in self.networks().values():
            network.to(memory_format=TORCH_MEMORY_FORMATS[memory_format])
        self.memory_format = memory_format

    # ----------------------------------------------------------------- checkpoints
    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}

    def save(self, path: str | os.PathLike) -> None:
        """Weights only (no optimiser state), written atomically."""
        payload = {"format": CHECKPOINT_FORMAT, "method": self.name, "config": self.config_dict(),
                   "state_dict": self.state_dict()}
        atomic_torch_save(payload, path)

    def load(self, path: str | os.PathLike) -> "InpaintingMethod":
        """Load a harness checkpoint or the method's official release, configured from the checkpoint.

        The checkpoint decides what shapes the networks have (a harness file's saved config; for official
        releases what :meth:`inspect_checkpoint` reads from the tensors: prior-head widths, network family
        and size, block counts), so the method is rebuilt when they differ from its config. A checkpoint of
        another paper method (another column) is an error naming the variant it belongs to. The result of the
        inspection is kept in :attr:`loaded_checkpoint`."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"checkpoint not found: {path}")
        with checkpoint_reads():  # inspection and loading share one read of each file
            info = type(self).inspect_checkpoint(path)
            if info is None:
                raise CheckpointError(not_this_method(path, self))
            self._check_variant(info, path)
            self.reconfigure(info.config)
            if info.format == "harness":
                load_state_dict_strict(self, safe_torch_load(path)["state_dict"], what=f"{path}")
            else:
                self.load_official(path)
        if not any("discriminator" in name for name in info.networks) and any(
                "discriminator" in name for name in self.networks()):
            warnings.warn(f"{path}: a generator-only release; the discriminator keeps its initial weights "
                          "(fine for evaluation; fine-tuning starts it from scratch)", stacklevel=2)
        self.loaded_checkpoint = info
        return self

    def _check_variant(self, info: "CheckpointInfo", path: Path) -> None:
        if info.format == "harness":
            if self.name and info.variant != self.name:
                raise CheckpointError(f"{path}: a sahn-bench checkpoint of {info.variant!r}, not of {self.name!r}; "
                                      f"use method {info.variant}")
            return
        theirs = getattr(get_factory(info.variant), "paper_name", None) if info.variant in available_methods() else None
        if self.name and info.variant != self.name and theirs is not None and theirs != self.paper_name:
            raise CheckpointError(f"{path}: {info.release}, which loads into method {info.variant} ({theirs}), "
                                  f"not {self.name} ({self.paper_name})")

    @classmethod
    def inspect_checkpoint(cls, path: Path) -> "CheckpointInfo | None":
        """What the file or folder at ``path`` is, read without building a network: a harness checkpoint of
        this class, or (through :meth:`inspect_official`) this method's official release; ``None`` when it is
        neither. Raises :class:`CheckpointError` for a file that cannot be read safely."""
        if path.is_file():
            try:
                payload = safe_torch_load(path)
            except CheckpointError:
                payload = None  # an official format may need allow-listed globals: inspect_official decides
            if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
                return harness_checkpoint_info(payload, path)
        return cls.inspect_official(path)

    @classmethod
    def inspect_official(cls, path: Path) -> "CheckpointInfo | None":
        """Overridden by methods with an official release format (``None`` = not this method's release)."""
        return None

    def reconfigure(self, values: dict[str, Any]) -> None:
        """Rebuild the networks with ``values`` replacing fields of the config (no-op when nothing changes);
        the method keeps its registry name, device and identity (callers hold references to it). The old
        networks are released before the new ones are built, so memory never holds both."""
        if not values or not dataclasses.is_dataclass(self.config):
            return
        current = dataclasses.asdict(self.config)
        changed = {k: tuple(v) if isinstance(current[k], tuple) else v for k, v in values.items()
                   if k in current and _comparable(current[k]) != _comparable(v)}
        if not changed:
            return
        device, keep = self.device, {k: self.__dict__[k] for k in ("name", "paper_name") if k in self.__dict__}
        config = apply_overrides(self.config, changed)
        # The old networks go before the new ones are built: beside each other a paper-size method (DDNM's
        # 552M-parameter ImageNet U-Net) would be held twice. Their weights are replaced anyway; the random
        # stream the new ones are initialised from is the same. Should building fail, the method is left empty.
        self.__dict__.clear()
        nn.Module.__init__(self)
        gc.collect()  # hooks and optimisers can hold the old modules in reference cycles
        fresh = type(self)(config)
        self.__dict__.clear()
        self.__dict__.update(fresh.__dict__)
        self.__dict__.update(keep)
        self.to(device)

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


def in_memory_format(tensor: torch.Tensor, memory_format: str) -> torch.Tensor:
    """A batch of images (4-D) laid out as ``memory_format``; other tensors as they are. No copy when it already is."""
    return tensor.contiguous(memory_format=TORCH_MEMORY_FORMATS[memory_format]) if tensor.dim() == 4 else tensor


# --------------------------------------------------------------------- checkpoints of methods
def not_this_method(path: Path, method: "InpaintingMethod") -> str:
    """The one-line error for a checkpoint the method cannot read, naming what it is when another method can."""
    what = f"{method.name or type(method).__name__}"
    for info in identify_checkpoint(path, quiet=True):
        return f"{path}: {info.release}, which loads into method {info.variant}, not {what}"
    if path.is_file():
        try:
            safe_torch_load(path)
        except CheckpointError as exc:  # truncated, or a pickled object: say that, not "wrong format"
            return str(exc)
    kind = "folder" if path.is_dir() else "file"
    return (f"{path}: this {kind} is neither a sahn-bench checkpoint nor an official release of {what} "
            "(see docs/checkpoints.md for the expected layouts)")


def identify_checkpoint(path: str | os.PathLike, *, quiet: bool = False) -> list[CheckpointInfo]:
    """Every registered method class's reading of ``path`` (usually one). Unreadable files raise
    :class:`CheckpointError` unless ``quiet``."""
    path = Path(path)
    found, seen, problems = [], set(), []
    with checkpoint_reads():  # every class looks at the same payload: one read, not one per class
        for name in available_methods():
            try:
                cls = getattr(get_factory(name), "method_class", None)
            except Exception:  # noqa: BLE001 - a broken plugin cannot claim a checkpoint
                continue
            if cls is None or cls in seen:
                continue
            seen.add(cls)
            try:
                info = cls.inspect_checkpoint(path)
            except CheckpointError as exc:
                problems.append(str(exc))
                continue
            if info is not None and info not in found:  # every class reads a harness file the same way
                found.append(info)
    if not found and problems and not quiet:
        raise CheckpointError(problems[0])
    return found


def _comparable(value: Any) -> Any:
    """Config values as saved (tuples may come back as lists) compared by content."""
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------- registry
MethodFactory = Callable[..., InpaintingMethod]
_LOCAL: dict[str, MethodFactory] = {}
# Every @variant constructor by the module that defines it. Only modules an entry point names (and their
# submodules) reach the registry: a constructor decorated in a test or a notebook stays out of the presets
# unless it is registered by name.
_DECLARED: dict[str, dict[str, MethodFactory]] = {}
#: ``--methods`` entries of the form ``tag:NAME`` select by tag instead of by name
TAG_PREFIX = "tag:"
#: the tags ``tag:NAME`` may name. A tag is a ``@variant`` keyword whose value is the variant's position in the
#: selection (None = not selected): one name cannot tell apart two variants of a paper column (``ddnm`` and
#: ``ddnm_imagenet`` both stand for DDNM), and the columns keep the order they have in the paper's tables.
TAGS = {"paper_column": "the paper preset's columns: the seed paper's methods and the classical references"}


def variant(scale: Scale = "any", paper_name: str | None = None, trainable: bool = True,
            method_class: type[InpaintingMethod] | None = None,
            paper_column: int | None = None) -> Callable[[MethodFactory], MethodFactory]:
    """Declare a constructor as a variant named after the function. Importing its module through an entry point
    of the ``sahn_bench.methods`` group registers it.

    ``scale`` picks it for the ``default`` (tiny) or ``paper`` preset when they name no methods;
    ``paper_column`` is its place among the columns ``tag:paper_column`` selects (the paper preset's);
    ``trainable=False`` tells pipelines, without building the method, that it needs no training data;
    ``method_class`` lets :func:`identify_checkpoint` ask the class what a checkpoint is without building one."""

    def mark(factory: MethodFactory) -> MethodFactory:
        factory.scale = scale  # type: ignore[attr-defined]
        factory.paper_name = paper_name  # type: ignore[attr-defined]
        factory.trainable = trainable  # type: ignore[attr-defined]
        factory.method_class = method_class  # type: ignore[attr-defined]
        factory.paper_column = paper_column  # type: ignore[attr-defined]
        _DECLARED.setdefault(factory.__module__, {})[factory.__name__] = factory
        return factory

    return mark


def register_method(name: str, factory: MethodFactory) -> None:
    """Register a constructor in this process (tests, notebooks); packages use entry points instead."""
    _LOCAL[name] = factory


def refresh_registry() -> None:
    """Read the installed entry points again at the next lookup (a plugin installed into a running process)."""
    _entry_points.cache_clear()
    _plugins.cache_clear()


@functools.lru_cache(maxsize=1)
def _entry_points() -> tuple[importlib.metadata.EntryPoint, ...]:
    return tuple(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


@functools.lru_cache(maxsize=1)
def _plugins() -> tuple[dict[str, Callable[[], MethodFactory]], dict[str, str]]:
    """Every entry point's methods as ``{name: loader}``, and ``{entry point: why it failed to load}``.

    A module entry point (``ec = "baselines.ec"``) is imported here: its variants are only known once it is. A
    ``module:function`` entry point, the older one-line-per-variant form, names its method without an import,
    so its module is imported only when that method is asked for."""
    found: dict[str, tuple[str, Callable[[], MethodFactory]]] = {}
    broken: dict[str, str] = {}

    def add(name: str, source: str, loader: Callable[[], MethodFactory]) -> None:
        if name in found and found[name][0] != source:
            warnings.warn(f"method {name!r} is registered by both {found[name][0]} and {source}; "
                          f"{found[name][0]} is used", stacklevel=3)
            return
        found.setdefault(name, (source, loader))

    for entry in _entry_points():
        if entry.attr:
            add(entry.name, f"{entry.module}:{entry.attr}", entry.load)
            continue
        try:
            importlib.import_module(entry.module)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the whole benchmark down
            broken[entry.name] = f"{entry.value} ({type(exc).__name__}: {exc})"
            warnings.warn(f"methods of entry point {entry.name!r} ({entry.value}) cannot be loaded and are skipped: "
                          f"{type(exc).__name__}: {exc}", stacklevel=3)
            continue
        for module, declared in list(_DECLARED.items()):
            if module == entry.module or module.startswith(entry.module + "."):
                for name, factory in declared.items():
                    add(name, f"{factory.__module__}:{factory.__name__}", lambda factory=factory: factory)
    return {name: loader for name, (_, loader) in found.items()}, broken


def available_methods(scale: Scale | None = None) -> list[str]:
    """Registered method names, optionally only those for a preset scale (``any`` counts for both)."""
    names = sorted(set(_plugins()[0]) | set(_LOCAL))
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
    plugins, broken = _plugins()
    if name not in plugins:
        known = ", ".join(available_methods()) or "none (is the package installed with pip install -e .?)"
        failed = f"; entry points that failed to load: {'; '.join(broken.values())}" if broken else ""
        hint = f" (select by tag with {TAG_PREFIX}NAME, without spaces)" if name.startswith("tag") else ""
        raise UserError(f"unknown method {name!r}{hint}; registered methods: {known}{failed}")
    return plugins[name]()


def tagged_methods(tag: str) -> list[str]:
    """The registered variants carrying ``tag`` (one of :data:`TAGS`), ordered by their positions in it."""
    if tag not in TAGS:
        raise UserError(f"unknown method tag {TAG_PREFIX}{tag}; tags: "
                        + ", ".join(f"{TAG_PREFIX}{known} ({what})" for known, what in TAGS.items()))
    positions = {}
    for name in available_methods():
        try:
            position = getattr(get_factory(name), tag, None)
        except Exception as exc:  # a broken plugin must not take the whole benchmark down
            warnings.warn(f"method {name!r} cannot be loaded and is skipped: {exc}")
            continue
        if position is not None:
            positions[name] = position
    if not positions:
        raise UserError(f"{TAG_PREFIX}{tag}: no registered method carries it (is the package installed with "
                        "pip install -e .?)")
    return sorted(positions, key=lambda name: (positions[name], name))


def select_methods(selectors: Iterable[str], scale: Scale | None = None) -> list[str]:
    """The method names ``--methods`` selects: each entry a name or ``tag:NAME`` (the variants carrying that
    tag, in its order); no entries = every variant of ``scale``. A name selected twice runs once; unknown names
    and tags are a :class:`UserError` before any work starts."""
    chosen: list[str] = []
    for selector in selectors:
        if selector.startswith(TAG_PREFIX):
            chosen += tagged_methods(selector[len(TAG_PREFIX):])
        else:
            get_factory(selector)
            chosen.append(selector)
    if not chosen and scale is not None:
        chosen = available_methods(scale)
    return list(dict.fromkeys(chosen))


def has_tags(selectors: Iterable[str]) -> bool:
    return any(selector.startswith(TAG_PREFIX) for selector in selectors)


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
