"""SAHN against its ancestor SPN at the paper's size: CPU latency ratio beside FLOP ratio.

    python -m pipelines.benchmarks.sahn_vs_spn_latency [--size 256] [--batch 1] [--repeats 7] [--threads N]
    python -m pipelines.benchmarks.sahn_vs_spn_latency --set sahn_paper deform_inference=gather  # inference with the training kernel

Times ``inpaint`` of two registered methods (default ``sahn_paper`` and ``spn``) on the same photograph
(scikit-image's astronaut, a centred square hole of a quarter of the image), and prints each one's median
wall time and process CPU time, its FLOPs (``FlopCounterMode``, 1 multiply-add = 2 FLOPs) and its effective
FLOP rate, then the latency ratio beside the FLOP ratio. A latency ratio at or below the FLOP ratio means
the first method turns its FLOPs into time at least as efficiently as the second.

The two methods' runs alternate (A, B, A, B, ...): load from other processes on a shared machine then hits
both alike, and the ratio of the medians stays meaningful when the absolute times do not; the ratio of
the fastest runs (``best``) is the least disturbed by other processes. Weights are
random (each method's own initialisation); latency and FLOPs do not depend on them.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from skimage import data

from bench.methods import create_method
from bench.run.profiling import count_flops


@dataclass
class Timing:
    name: str
    wall_ms: list[float]
    cpu_ms: list[float]
    flops: int

    @property
    def median_wall_ms(self) -> float:
        return statistics.median(self.wall_ms)

    @property
    def best_wall_ms(self) -> float:
        return min(self.wall_ms)

    @property
    def median_cpu_ms(self) -> float:
        return statistics.median(self.cpu_ms)

    @property
    def gflops_per_second(self) -> float:
        return self.flops / 1e9 / (self.median_wall_ms / 1e3)


def photo_batch(size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float().div(255)[None]
    images = F.interpolate(image, size=(size, size), mode="area").repeat(batch, 1, 1, 1)
    masks = torch.zeros(batch, 1, size, size)
    masks[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return images, masks


def parse_value(text: str) -> Any:
    """``deform_inference=gather`` → "gather", ``alpha=0.4`` → 0.4, ``use_msf=false`` → False."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def time_alternating(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """(wall ms, CPU ms) of ``repeats`` calls of each run, interleaved, after one untimed call of each."""
    for run in runs.values():
        run()  # warm-up: allocator growth, oneDNN kernel selection
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            run()
            times[name][0].append((time.perf_counter() - wall_start) * 1e3)
            times[name][1].append((time.process_time() - cpu_start) * 1e3)
    return times


def measure(methods: list[str], overrides: dict[str, dict[str, Any]], size: int = 256, batch: int = 1,
            repeats: int = 7) -> list[Timing]:
    images, masks = photo_batch(size, batch)
    runs = {}
    for name in methods:
        torch.manual_seed(0)
        method = create_method(name, **overrides.get(name, {})).eval()
        runs[name] = (lambda m=method: m.inpaint(images, masks))
    flops = {name: count_flops(run) for name, run in runs.items()}
    times = time_alternating(runs, repeats)
    return [Timing(name, *times[name], flops[name]) for name in methods]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs=2, default=["sahn_paper", "spn"], metavar=("A", "B"),
                        help="the two registered methods to compare; ratios are A / B (default sahn_paper spn)")
    parser.add_argument("--set", nargs="+", action="append", default=[], metavar=("METHOD", "KEY=VALUE"),
                        help="config overrides for one method, e.g. --set sahn_paper deform_inference=gather")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per method; medians are printed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides: dict[str, dict[str, Any]] = {}
    for method, *pairs in args.set:
        if method not in args.methods:
            parser.error(f"--set {method}: not one of --methods {' '.join(args.methods)}")
        for pair in pairs:
            key, separator, value = pair.partition("=")
            if not separator:
                parser.error(f"--set {method} {pair}: expected KEY=VALUE")
            overrides.setdefault(method, {})[key] = parse_value(value)

    first, second = measure(args.methods, overrides, args.size, args.batch, args.repeats)
    print(f"inpaint on CPU: {args.size}x{args.size}, batch {args.batch}, {torch.get_num_threads()} torch threads, "
          f"median of {args.repeats} alternating runs, torch {torch.__version__}")
    for timing in (first, second):
        chosen = overrides.get(timing.name)
        if chosen:
            print(f"  {timing.name}: {', '.join(f'{k}={v}' for k, v in chosen.items())}")
    print(f"{'method':<14}{'latency ms':>12}{'best ms':>10}{'CPU ms':>10}{'GFLOPs':>10}{'GFLOP/s':>10}")
    for timing in (first, second):
        print(f"{timing.name:<14}{timing.median_wall_ms:>12.1f}{timing.best_wall_ms:>10.1f}{timing.median_cpu_ms:>10.1f}"
              f"{timing.flops / 1e9:>10.2f}{timing.gflops_per_second:>10.1f}")
    latency_ratio = first.median_wall_ms / second.median_wall_ms
    flop_ratio = first.flops / second.flops
    print(f"{first.name} / {second.name}: latency ratio {latency_ratio:.2f}, FLOP ratio {flop_ratio:.2f} → "
          f"{first.name} reaches {100 * flop_ratio / latency_ratio:.0f}% of {second.name}'s effective FLOP rate "
          f"(best-run ratio {first.best_wall_ms / second.best_wall_ms:.2f}, "
          f"CPU-time ratio {first.median_cpu_ms / second.median_cpu_ms:.2f})")


if __name__ == "__main__":
    main()
