"""Training steps per second of a method with 0 and N data workers, and whether the losses are the same.

    python -m pipelines.benchmarks.train_throughput [--method ec_tiny] [--size 64] [--batch-size 8] [--steps 12]
                                                [--workers 0 2] [--precision fp32] [--device cpu] [--threads N]

Trains a fresh, identically seeded method once per worker count on the embedded ``faces`` suite through
:func:`bench.run.train.train` (the harness's own loop: batches, masks, the method's host-side preprocessing such as
EC's Canny edges, the step). The first step is left out of the rate (lazily built loss networks, worker start-up);
the rest is wall time up to the end of training, after waiting for the device. Prints steps/s per worker count
with the machine's core count and torch's thread count, and whether every logged loss and the final weights
are bit-identical across worker counts (they must be; on a GPU only with --deterministic and deterministic
operations). On a CPU the workers share cores with the network, so the gain there is bounded by the share of
a step spent making the batch; on a GPU that share is all of the host's time.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from bench.config import TrainConfig
from bench.data.datasets import load_image_set
from bench.methods import create_method
from bench.run.train import train


def wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method_name: str, size: int, batch_size: int, steps: int, workers: int, precision: str,
            device: torch.device) -> tuple[float, list[dict[str, float]], torch.Tensor]:
    """(steps per second after the first step, the loss history, the final weights flattened)."""
    images = load_image_set("faces", "train", image_size=size)
    torch.manual_seed(0)
    method = create_method(method_name).to(device)
    first_step_done: list[float] = []

    def on_step(step: int, losses: dict) -> None:
        if step == 0:
            wait_for(device)
            first_step_done.append(time.perf_counter())

    config = TrainConfig(steps=steps, batch_size=batch_size, seed=0, log_every=max(1, steps // 4),
                         checkpoint_every=steps + 1)
    result = train(method, images, config, on_step=on_step, progress=False, data_workers=workers,
                   precision=precision)
    wait_for(device)
    rate = (steps - 1) / (time.perf_counter() - first_step_done[0])
    weights = torch.cat([p.detach().float().cpu().flatten() for p in method.parameters()])
    return rate, result.history, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="ec_tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{args.method}, {args.size}², batch {args.batch_size}, {args.steps} steps, {args.precision}, {device}; "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    runs = {}
    for workers in args.workers:
        rate, history, weights = measure(args.method, args.size, args.batch_size, args.steps, workers,
                                         args.precision, device)
        runs[workers] = (history, weights)
        print(f"  data workers {workers}: {rate:.2f} steps/s ({1000 / rate:.0f} ms a step)")
    first_history, first_weights = next(iter(runs.values()))
    same = all(history == first_history and torch.equal(weights, first_weights) for history, weights in runs.values())
    print(f"  losses and weights bit-identical across worker counts: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
