"""Measurement functions for the efficiency comparison (the paper's §4.5): latency, peak memory, FLOPs,
parameter count and checkpoint size. Pure infrastructure: each function takes a callable or a module and
knows nothing about inpainting methods beyond :class:`bench.methods.InpaintingMethod`'s ``save``.

What each figure means (printed with every table):

latency      wall time of one call. On CUDA: ``torch.cuda.Event`` pairs around the call, the device
             synchronised before and after, so queued kernels are counted. Elsewhere:
             ``time.perf_counter``. Callers take the median of N runs after warm-up runs (the first
             call pays one-off costs: allocator growth, oneDNN/cuDNN kernel selection).
peak memory  on CUDA: ``torch.cuda.max_memory_allocated`` during the call after resetting the peak —
             tensors only (weights included, the caching allocator's reserve excluded). On CPU: how far
             the process's peak resident set size rose above its size just before the call. Linux lets a
             process reset its peak (``/proc/self/clear_refs`` ← 5, then ``VmHWM``), which is exact;
             elsewhere a thread samples the RSS every millisecond (may miss a shorter spike). Memory
             freed earlier in the same process can be reused without growing the RSS, so a figure per
             method is only trustworthy in a fresh process (``pipelines.efficiency`` isolates methods).
FLOPs        ``torch.utils.flop_counter.FlopCounterMode``: convolutions, matrix products and attention
             (one multiply-add = 2 FLOPs). Operators without a registered formula (FFT, deformable
             convolution, element-wise ops, numpy code) count 0, so the figure is a lower bound.
checkpoint   bytes of the file ``method.save`` writes (weights only), in MB = 10⁶ bytes like the paper.
"""
from __future__ import annotations

import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

MB = 1e6
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
SAMPLE_SECONDS = 0.001


# ------------------------------------------------------------------------------------------ latency
@dataclass(frozen=True)
class Latency:
    runs_ms: tuple[float, ...]  # every timed run, in order

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _synchronize(device)
        start.record()
        fn()
        end.record()
        _synchronize(device)
        return float(start.elapsed_time(end))
    started = time.perf_counter()
    fn()
    _synchronize(device)
    return (time.perf_counter() - started) * 1000.0


def measure_latency(fn: Callable[[], Any], *, device: torch.device | str, warmup: int = 1,
                    repeats: int = 3) -> Latency:
    """Time ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, on ``device``'s clock."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats ≥ 1 and warmup ≥ 0, got repeats={repeats}, warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _synchronize(device)
    return Latency(tuple(_time_once(fn, device) for _ in range(repeats)))


# ------------------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class PeakMemory:
    bytes: int
    kind: str  # what was measured, for the table's footnote
    value: Any = None  # what ``fn`` returned (so one call can be measured and used)

    @property
    def megabytes(self) -> float:
        return self.bytes / MB


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{_STATUS} has no {field}")


def _can_reset_peak_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def _current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss_linux(fn: Callable[[], Any]) -> PeakMemory:
    _CLEAR_REFS.write_text("5")  # the kernel resets the peak (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    value = fn()
    peak = _status_kib("VmHWM")
    return PeakMemory(max(0, peak - before) * 1024, "peak RSS rise during the call (Linux VmHWM)", value)


def _peak_rss_sampled(fn: Callable[[], Any]) -> PeakMemory:
    before = _current_rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss_bytes())
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        value = fn()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _current_rss_bytes())
    return PeakMemory(max(0, peak[0] - before), "peak RSS rise during the call (sampled every 1 ms)", value)


def measure_peak_memory(fn: Callable[[], Any], *, device: torch.device | str) -> PeakMemory:
    """Peak memory of one call of ``fn`` (see the module doc for what is measured on each device)."""
    device = torch.device(device)
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        value = fn()
        _synchronize(device)
        return PeakMemory(int(torch.cuda.max_memory_allocated(device)),
                          "CUDA max allocated during the call (weights included)", value)
    if _can_reset_peak_rss():
        return _peak_rss_linux(fn)
    return _peak_rss_sampled(fn)


# ------------------------------------------------------------------------------------------ FLOPs
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as counted by ``FlopCounterMode`` (a lower bound: see the module doc)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------ size
def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def checkpoint_size_mb(method: Any) -> float:
    """Size of the file ``method.save(path)`` writes, in MB (10⁶ bytes)."""
    with tempfile.TemporaryDirectory(prefix="sahn-bench-size-") as folder:
        path = Path(folder) / "checkpoint.pt"
        method.save(path)
        return path.stat().st_size / MB


# ------------------------------------------------------------------------------------------ device
def device_name(device: torch.device | str) -> str:
    """A human name for the device the figures were measured on, e.g. ``NVIDIA GeForce RTX 4090`` or
    ``AMD EPYC (cpu, 2 threads)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({device.type}, {torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
