"""Throughput of the batched PSNR + SSIM + MAE against scikit-image's per-image functions.

    python -m bench.benchmarks.metrics_throughput [--pairs 64 --size 256 --repeats 3 --threads N]

Both sides score the same seeded uint8 pairs (a ground truth and a noisy, partly replaced copy, like
a composite); the script prints pairs/s of each, the largest absolute difference per metric, and
the speed-up (target ≥ 10×). Timings take the best of ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bench.metrics import PSNR_CAP, mae, psnr, ssim


def make_pairs(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``uint8 [N,H,W,3]`` ground truths and composites that differ inside a square hole."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    composite = truth.copy()
    hole = slice(size // 4, size // 4 + size // 2)
    noise = rng.integers(-30, 31, composite[:, hole, hole].shape)
    composite[:, hole, hole] = np.clip(composite[:, hole, hole].astype(np.int64) + noise, 0, 255)
    return composite, truth


def reference_scores(composite: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    scores = {"psnr": [], "ssim": [], "mae": []}
    for pred, gt in zip(composite, truth):
        scores["psnr"].append(min(peak_signal_noise_ratio(gt, pred, data_range=255), PSNR_CAP))
        scores["ssim"].append(structural_similarity(gt, pred, gaussian_weights=True, sigma=1.5,
                                                    use_sample_covariance=False, data_range=255, channel_axis=-1))
        scores["mae"].append(np.abs(pred.astype(np.float64) - gt.astype(np.float64)).mean() / 255.0)
    return {name: np.array(values) for name, values in scores.items()}


def batched_scores(composite: torch.Tensor, truth: torch.Tensor) -> dict[str, np.ndarray]:
    return {name: metric(composite, truth).cpu().numpy() for name, metric in
            (("psnr", psnr), ("ssim", ssim), ("mae", mae))}


def best_time(function, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    composite, truth = make_pairs(args.pairs, args.size)
    composite_t = torch.from_numpy(composite).permute(0, 3, 1, 2).contiguous()
    truth_t = torch.from_numpy(truth).permute(0, 3, 1, 2).contiguous()

    reference_seconds, reference = best_time(lambda: reference_scores(composite, truth), args.repeats)
    batched_seconds, batched = best_time(lambda: batched_scores(composite_t, truth_t), args.repeats)

    print(f"{args.pairs} pairs of {args.size}x{args.size} RGB uint8, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")
    print(f"scikit-image per image: {args.pairs / reference_seconds:9.1f} pairs/s ({reference_seconds:.3f} s)")
    print(f"bench.metrics batched : {args.pairs / batched_seconds:9.1f} pairs/s ({batched_seconds:.3f} s)")
    for name in ("psnr", "ssim", "mae"):
        print(f"max |difference| {name:4s}: {np.abs(batched[name] - reference[name]).max():.3e}")
    print(f"speed-up: {reference_seconds / batched_seconds:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
