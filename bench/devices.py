"""Which device a benchmark cell runs on, and the CUDA settings its numbers depend on.

A cell's device follows from its own resource request (``--device``, ``--gpus-per-cell``), the same way
under Ray and with ``--serial``:

- ``auto`` is the CPU for a cell that asks for no GPU, and the first of the cell's GPUs otherwise.
- Under Ray a cell's GPUs are the ones Ray assigned to its task (``ray.get_gpu_ids()``): ``cuda`` is the
  first of them and ``cuda:N`` the N-th, so N must be below ``ceil(--gpus-per-cell)`` (checked before any
  work, :func:`request_problem`). A task that asked for no GPU is also made to *see* none
  (``CUDA_VISIBLE_DEVICES=""``): Ray 2.60 leaves that variable as it is for such tasks, so without this
  every such cell on a GPU node would find physical GPU 0, which Ray does not account for.
- With ``--serial`` every GPU of the process is the cell's: ``cuda:N`` is the process's N-th, and an
  explicit ``cuda`` needs no GPU request (nothing else runs there).
- Callers with no per-cell request (``gpus_per_cell=None``: the efficiency pipeline) keep the plain
  meaning of ``auto``: CUDA when present.

A cell that asks for GPUs and finds none raises instead of falling back to the CPU, so GPU runs never
silently become CPU runs. :func:`device_record` is what ``cell.json`` records about the device.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Any, Callable, Iterator

import torch

from bench.errors import UserError

VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"
#: the workspace setting cuBLAS needs for reproducible results (one of the two torch documents)
DETERMINISTIC_CUBLAS_WORKSPACE = ":4096:8"
#: how metric networks run (:func:`full_fp32`); part of the key of cached ground-truth features
METRIC_PRECISION = "float32 (no TF32)"
#: memory a process's CUDA context takes outside the caching allocator (about half a GiB once cuDNN and cuBLAS
#: are loaded; it varies with the GPU and the libraries): a cell on a fraction of a GPU leaves it out of its
#: allocator's share
CUDA_CONTEXT_RESERVE_BYTES = 512 * 2**20
#: values of ``--tf32``: whether a CUDA cell's float32 matmuls and convolutions may run as TF32 (``off``: exact fp32)
TF32_CHOICES = ("off", "on")
#: values of ``--memory-format`` (:func:`resolve_memory_format` turns ``auto`` into one of the other two)
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


# ----------------------------------------------------------------------------- the request
def gpus_held(gpus_per_cell: float) -> int:
    """Whole GPUs a cell holds: Ray gives a fractional request a share of one GPU, a whole request that many."""
    return math.ceil(gpus_per_cell)


def parse_device(name: str) -> tuple[str, int | None]:
    """``("auto", None)``, ``("cpu", None)``, ``("cuda", None)``, ``("cuda", 3)``, ..."""
    if name == "auto":
        return "auto", None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N)") from exc
    return device.type, device.index


def request_problem(device: str, gpus_per_cell: float) -> str | None:
    """Why Ray cannot run cells that ask for ``gpus_per_cell`` GPUs on ``device`` (``None`` if it can)."""
    if gpus_per_cell > 1 and not float(gpus_per_cell).is_integer():
        return (f"--gpus-per-cell {gpus_per_cell:g}: Ray shares a GPU between cells only below 1 GPU per "
                "cell; above that use a whole number")
    kind, index = parse_device(device)
    if kind != "cuda":
        return None
    held = gpus_held(gpus_per_cell)
    if held == 0:
        return (f"--device {device} needs --gpus-per-cell > 0 under Ray: a cell that asks for no GPU runs "
                "on the CPU and sees no GPU")
    if index is not None and index >= held:
        valid = "cuda (= cuda:0)" if held == 1 else f"cuda:0 to cuda:{held - 1}"
        return (f"--device {device} names GPU {index} of a cell's own GPUs, but each cell holds {held} "
                f"(--gpus-per-cell {gpus_per_cell:g}): use {valid}, or raise --gpus-per-cell")
    return None


#: images per network call off the CPU, for networks that take images one at a time on the CPU
GPU_NETWORK_CHUNK = 64


def network_chunk(device: torch.device) -> int:
    """Images per call of a network whose per-image results must not depend on the batch (the metric networks,
    DDNM's sampler): one on the CPU, where kernels pick their blocking (and matrix products their kernels) by
    batch size, so a batched result would change by round-off with the other images of the batch; a whole
    chunk elsewhere, where batching is what the hardware is for and bitwise promises are not made."""
    return 1 if device.type == "cpu" else GPU_NETWORK_CHUNK


# ----------------------------------------------------------------------------- resolution
def ray_assigned_gpus() -> tuple[str, ...] | None:
    """The ids of the GPUs Ray assigned to the running task or actor; ``None`` outside a Ray worker."""
    ray = sys.modules.get("ray")  # a process that never imported Ray is not a Ray worker
    if ray is None or not ray.is_initialized():
        return None
    if ray.get_runtime_context().worker.mode != ray.WORKER_MODE:  # the driver: no assignment of its own
        return None
    return tuple(str(gpu) for gpu in ray.get_gpu_ids())


def visible_entries(visible: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list (``None`` when unset: every GPU is visible)."""
    if visible is None:
        return None
    return [entry.strip() for entry in visible.split(",") if entry.strip()]


def cuda_ordinal(gpu_id: str, visible: str | None) -> int:
    """The CUDA ordinal under which this process sees the GPU Ray calls ``gpu_id``. Ray narrows
    ``CUDA_VISIBLE_DEVICES`` to a task's own GPUs (then the N-th assigned GPU is ordinal N), unless told not
    to; then the variable lists more GPUs, or is unset and Ray's ids are the ordinals."""
    entries = visible_entries(visible)
    if entries is None:
        return int(gpu_id)
    if gpu_id not in entries:
        raise RuntimeError(f"Ray assigned GPU {gpu_id} to this cell, but {VISIBLE_DEVICES}={visible!r} "
                           "does not list it")
    return entries.index(gpu_id)


def choose_device(requested: str, *, gpus_per_cell: float | None, assigned: tuple[str, ...] | None,
                  visible: str | None, cuda_device_count: Callable[[], int]) -> torch.device:
    """The rules of the module docstring as a pure function. ``assigned`` is ``None`` outside Ray;
    ``cuda_device_count`` is called only when the answer may be a GPU, so CPU cells never touch CUDA."""
    kind, index = parse_device(requested)
    if kind not in ("auto", "cuda"):
        return torch.device(requested)
    if assigned is not None:  # a Ray task: its GPUs are exactly the ones Ray assigned
        if not assigned:
            if kind == "auto":
                return torch.device("cpu")
            raise UserError(f"--device {requested}: Ray assigned this cell no GPU (it asked for none); "
                            "set --gpus-per-cell")
        position = index or 0
        if position >= len(assigned):
            raise UserError(f"--device {requested}: this cell holds {len(assigned)} GPU(s) "
                            f"({', '.join(assigned)}); cuda:N names the N-th of them")
        ordinal = cuda_ordinal(assigned[position], visible)
        whose = f"Ray assigned GPU {assigned[position]} to this cell, but"
    elif kind == "auto" and gpus_per_cell is None:
        return torch.device("cuda", 0) if cuda_device_count() > 0 else torch.device("cpu")
    elif kind == "auto" and gpus_per_cell <= 0:
        return torch.device("cpu")
    else:
        ordinal = index or 0
        whose = f"--device {requested} asks for a GPU, but"
    found = cuda_device_count()
    if ordinal >= found:
        raise UserError(f"{whose} torch sees {found} CUDA device(s) ({VISIBLE_DEVICES}={visible!r}, torch "
                        f"{torch.__version__}, CUDA build {torch.version.cuda}); no CPU fallback for a GPU request")
    return torch.device("cuda", ordinal)


def resolve_device(requested: str, *, gpus_per_cell: float | None = None) -> torch.device:
    """The device for ``requested`` in this process (see the module docstring). In a Ray task that was
    assigned no GPU it also hides every GPU, which works because it runs before anything initialises
    CUDA in a cell (a process reads ``CUDA_VISIBLE_DEVICES`` once, when CUDA starts)."""
    assigned = ray_assigned_gpus()
    if assigned == ():
        os.environ[VISIBLE_DEVICES] = ""
    return choose_device(requested, gpus_per_cell=gpus_per_cell, assigned=assigned,
                         visible=os.environ.get(VISIBLE_DEVICES), cuda_device_count=torch.cuda.device_count)


def gpu_ids(device: torch.device) -> list[str]:
    """The GPUs a cell held, as ``nvidia-smi`` and ``CUDA_VISIBLE_DEVICES`` number them: under Ray its
    whole assignment, otherwise the one it ran on; none on the CPU."""
    if device.type != "cuda":
        return []
    assigned = ray_assigned_gpus()
    if assigned:
        return list(assigned)
    entries = visible_entries(os.environ.get(VISIBLE_DEVICES))
    ordinal = device.index or 0
    return [str(ordinal) if entries is None else entries[ordinal]]


def memory_share(device: torch.device, gpus_per_cell: float) -> float | None:
    """The fraction of the GPU's memory a cell on a shared GPU may use (``None``: the whole device)."""
    return gpus_per_cell if device.type == "cuda" and 0 < gpus_per_cell < 1 else None


def requested_device_type(device: str, gpus_per_cell: float) -> str:
    """The type of device (``cpu``, ``cuda``) a cell with this request runs on, known before it runs: a cell that
    asks for a GPU gets one or fails (:func:`choose_device`), so the driver can key results by it."""
    kind, _ = parse_device(device)
    if kind == "auto":
        return "cuda" if gpus_per_cell > 0 else "cpu"
    return kind


def resolve_memory_format(name: str, device: torch.device | str, precision: str) -> str:
    """``contiguous`` or ``channels_last``: the memory layout of a cell's networks and inputs for
    ``--memory-format name``. ``auto`` is channels_last only on CUDA at bf16 or fp16, whose tensor-core
    convolutions work on NHWC (a contiguous network pays a transpose around each one); at fp32 and on the CPU it
    is contiguous, so reproduction runs keep their numbers exactly. Touches no CUDA API."""
    if name not in MEMORY_FORMATS:
        raise UserError(f"--memory-format {name!r}: choose one of {', '.join(MEMORY_FORMATS)}")
    if name != "auto":
        return name
    reduced = precision in ("bf16", "fp16")
    return "channels_last" if torch.device(device).type == "cuda" and reduced else "contiguous"


def device_record(device: torch.device, *, gpus_per_cell: float, deterministic: bool) -> dict[str, Any]:
    """The device fields of ``cell.json``."""
    return {"device": str(device), "gpu_ids": gpu_ids(device),
            "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "gpu_memory_fraction": memory_share(device, gpus_per_cell), "deterministic": deterministic}


# ----------------------------------------------------------------------------- settings
def allocator_fraction(share: float, total_bytes: int, gpus_per_cell: float) -> float:
    """The fraction of a GPU's memory a cell's CUDA allocator may hold so that the cell's whole process stays
    within its ``share``: the allocator's cap leaves out the process's CUDA context (kernels, cuBLAS and cuDNN
    handles), which every process sharing the GPU pays on top, so that reserve is taken off the share."""
    usable = share * total_bytes - CUDA_CONTEXT_RESERVE_BYTES
    if usable <= 0:
        raise UserError(f"--gpus-per-cell {gpus_per_cell:g}: a {share:g} share of this GPU's "
                        f"{total_bytes / 2**30:.1f} GiB leaves nothing beside the "
                        f"{CUDA_CONTEXT_RESERVE_BYTES / 2**30:.1f} GiB CUDA context each process needs; raise it")
    return usable / total_bytes


@contextlib.contextmanager
def gpu_memory_cap(device: torch.device, gpus_per_cell: float) -> Iterator[float | None]:
    """Cap this process's CUDA allocator so that the process, its CUDA context included, fits the cell's share of
    a shared GPU: one cell cannot take the memory its neighbours were promised. Yields the allocator's fraction;
    the cap is lifted afterwards (``--serial`` runs go on)."""
    share = memory_share(device, gpus_per_cell)
    if share is None:
        yield None
        return
    fraction = allocator_fraction(share, torch.cuda.get_device_properties(device).total_memory, gpus_per_cell)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield fraction
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``--deterministic``: cuDNN's deterministic algorithms without autotuning, and torch's deterministic
    implementations wherever they exist. An operation that has none (on CUDA: bilinear-upsampling and
    reflection-padding backward, torchvision's ``deform_conv2d`` backward, ...) still runs, with a
    warning naming it, so a run never stops for it but says why it is not bit-identical. cuBLAS needs a
    fixed workspace for reproducible results; the variable is read when cuBLAS starts, which in a cell is
    after this point."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, os.environ.get(CUBLAS_WORKSPACE))
    os.environ.setdefault(CUBLAS_WORKSPACE, DETERMINISTIC_CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        enabled_before, warn_only_before, cudnn_deterministic, cudnn_benchmark, workspace = previous
        torch.use_deterministic_algorithms(enabled_before, warn_only=warn_only_before)
        torch.backends.cudnn.deterministic = cudnn_deterministic
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if workspace is None:
            os.environ.pop(CUBLAS_WORKSPACE, None)


def _precision_settings() -> tuple[Any, ...]:
    backends = torch.backends
    # parents before children: restoring a parent resets its children, which are restored after it
    return backends, backends.cuda.matmul, backends.cudnn, backends.cudnn.conv, backends.cudnn.rnn


def _operation_settings() -> dict[str, Any]:
    """The per-operation float32 settings of CUDA: what cuBLAS matmuls, cuDNN convolutions and cuDNN RNNs run
    as. Setting all three explicitly, and nothing else, keeps torch's legacy ``allow_tf32`` flags readable."""
    backends = torch.backends
    return {"matmul": backends.cuda.matmul, "conv": backends.cudnn.conv, "rnn": backends.cudnn.rnn}


def tf32_enabled(value: Any) -> bool:
    """``--tf32`` as a bool. YAML reads a bare ``on``/``off`` as a boolean, so both spellings are accepted."""
    if value is True or value == "on":
        return True
    if value is False or value == "off":
        return False
    raise UserError(f"--tf32 {value!r}: choose {' or '.join(TF32_CHOICES)}")


def tf32_state() -> str:
    """``on`` or ``off``: whether CUDA float32 matmuls, convolutions and RNNs run as TF32 now, read back from
    torch's per-operation settings; ``mixed (...)`` naming each when they disagree. Touches no CUDA API."""
    backends = torch.backends
    parents = {"matmul": (backends.cudnn, backends), "conv": (backends.cudnn, backends),
               "rnn": (backends.cudnn, backends)}
    effective = {}
    for operation, setting in _operation_settings().items():
        value = setting.fp32_precision
        for parent in parents[operation]:  # "none" defers to the backend's, then the global setting
            value = parent.fp32_precision if value == "none" else value
        effective[operation] = value
    values = set(effective.values())
    if values == {"tf32"}:
        return "on"
    if values == {"ieee"}:
        return "off"
    return "mixed (" + ", ".join(f"{operation} {value}" for operation, value in effective.items()) + ")"


@contextlib.contextmanager
def cuda_tf32(device: torch.device | None, enabled: bool) -> Iterator[str | None]:
    """For the duration, CUDA float32 matmuls, cuDNN convolutions and RNNs run as TF32 (``enabled``) or in full
    IEEE float32, through torch's ``fp32_precision`` settings alone (mixing them with the legacy ``allow_tf32``
    flags makes torch refuse to read the flags afterwards); every setting is put back exactly as it was. Yields
    the state read back (:func:`tf32_state`). On other devices there is no TF32: nothing changes, it yields None."""
    if device is None or device.type != "cuda":
        yield None
        return
    settings = _precision_settings()
    previous = [setting.fp32_precision for setting in settings]
    for setting in _operation_settings().values():
        setting.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield tf32_state()
    finally:
        for setting, value in zip(settings, previous):
            setting.fp32_precision = value


@contextlib.contextmanager
def full_fp32(device: torch.device | None) -> Iterator[None]:
    """float32 matmuls and convolutions in full precision on CUDA for the duration (:func:`cuda_tf32` off).
    torch runs float32 convolutions as TF32 on Ampere and later GPUs by default, which would make a metric
    network's features differ from the CPU's. On other devices there is no TF32 and nothing changes."""
    with cuda_tf32(device, False):
        yield
