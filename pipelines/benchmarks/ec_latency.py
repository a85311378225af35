"""EdgeConnect (paper size) inference latency on CPU next to its FLOPs.

    python -m pipelines.benchmarks.ec_latency [--size 256] [--batch 1] [--repeats 5] [--threads N]

Times each part of ``EdgeConnect.inpaint`` (scikit-image gray + Canny, G1, G2) and the whole call, as the
median of ``--repeats`` runs after one warm-up (wall clock, and the process's CPU time summed over its threads,
which stays meaningful when other jobs share the CPU), on a real photograph (scikit-image's astronaut) with a
centred square hole of a quarter of the image. FLOPs are counted by ``torch.utils.flop_counter.
FlopCounterMode`` (convolutions and matrix products; 1 multiply-add = 2 FLOPs); the numpy Canny is not
counted. Weights are random (initialised as the official code does): latency and FLOPs do not depend on them.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from skimage import data
from torch.utils.flop_counter import FlopCounterMode

from bench import create_method
from bench.data.edges import gray_and_edges


def photo_batch(size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float().div(255)[None]
    images = F.interpolate(image, size=(size, size), mode="area").repeat(batch, 1, 1, 1)
    masks = torch.zeros(batch, 1, size, size)
    masks[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return images, masks


def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of ``repeats`` runs."""
    run()  # warm-up: allocator, oneDNN kernel selection
    wall, cpu = [], []
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(wall), statistics.median(cpu)


def count_flops(run: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


def measure(size: int = 256, batch: int = 1, repeats: int = 5) -> list[tuple[str, float, float, int | None]]:
    """Rows of (part, median wall seconds, median CPU seconds, FLOPs or None)."""
    torch.manual_seed(0)
    method = create_method("ec").eval()
    images, masks = photo_batch(size, batch)
    gray, edges = gray_and_edges(images, method.config.canny_sigma, masks)
    with torch.no_grad():
        predicted_edges = method.predict_edges(gray, edges, masks)
        parts: list[tuple[str, Callable[[], object], bool]] = [
            ("gray + Canny (scikit-image)", lambda: gray_and_edges(images, method.config.canny_sigma, masks), False),
            ("G1 edge generator", lambda: method.predict_edges(gray, edges, masks), True),
            ("G2 inpaint generator", lambda: method.predict_image(images, predicted_edges, masks), True),
            ("inpaint() end to end", lambda: method.inpaint(images, masks), True),
        ]
        return [(name, *median_seconds(run, repeats), count_flops(run) if counted else None)
                for name, run, counted in parts]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per part; the median is printed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args.size, args.batch, args.repeats)
    print(f"EdgeConnect `ec` (paper size) inference on CPU: {args.size}x{args.size}, batch {args.batch}, "
          f"{torch.get_num_threads()} torch threads, median of {args.repeats} runs, torch {torch.__version__}")
    print(f"{'part':<30}{'latency ms':>12}{'CPU ms':>10}{'GFLOPs':>10}{'ms/image':>10}")
    for name, wall, cpu, flops in rows:
        gflops = f"{flops / 1e9:.2f}" if flops is not None else "-"
        print(f"{name:<30}{wall * 1e3:>12.1f}{cpu * 1e3:>10.1f}{gflops:>10}{wall * 1e3 / args.batch:>10.1f}")


if __name__ == "__main__":
    main()
