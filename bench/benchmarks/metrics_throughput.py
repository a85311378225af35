"""Throughput of the batched PSNR + SSIM + MAE against scikit-image's per-image functions.

    python -m bench.benchmarks.metrics_throughput [--pairs 60 --size 256 --repeats 3 --threads N]

Both sides score the same seeded uint8 pairs. The main workload is what the harness scores: a
photograph-like ground truth and its composite, which differs from it only inside a free-form hole
(the protocol's DeepFill masks, the pairs spread evenly over the six ratio bins; the hole holds a
noisy copy of the ground truth). For context it also times a dense workload where every pixel
differs (the worst case for :func:`bench.metrics.ssim`, which skips windows with no differing pixel).
It prints pairs/s of each side, the largest absolute difference per metric, and the speed-up
(target ≥ 10× on the composites). Timings take the best of ``--repeats`` runs, alternating the sides.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bench.masks import RATIO_BINS, bin_label, generate_mask_in_bin
from bench.metrics import PIXEL_METRICS, PSNR_CAP, pixel_metrics


def ground_truths(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random images with texture: blocks, a gradient and noise (``uint8 [N,H,W,3]``)."""
    blocks = np.kron(rng.random((count, 8, 8, 3)), np.ones((1, size // 8 + 1, size // 8 + 1, 1)))[:, :size, :size]
    ramp = np.linspace(0, 1, size)[None, :, None, None]
    image = 0.6 * blocks + 0.25 * ramp + 0.15 * rng.random((count, size, size, 3))
    return np.clip(255 * image, 0, 255).round().astype(np.uint8)


def make_pairs(count: int, size: int, seed: int = 0, dense: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``uint8 [N,H,W,3]`` composites and ground truths; the composites differ inside a free-form hole
    (the six ratio bins in turn), or everywhere when ``dense``."""
    rng = np.random.default_rng(seed)
    truth = ground_truths(count, size, rng)
    noisy = np.clip(truth.astype(np.int64) + rng.integers(-30, 31, truth.shape), 0, 255).astype(np.uint8)
    if dense:
        return noisy, truth
    bins = [bin_label(lo, hi) for lo, hi in RATIO_BINS]
    holes = np.stack([generate_mask_in_bin(size, bins[index % len(bins)], seed + index)[0].astype(bool)
                      for index in range(count)])
    return np.where(holes[..., None], noisy, truth), truth


def reference_scores(composite: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    scores = {"psnr": [], "ssim": [], "mae": []}
    for pred, gt in zip(composite, truth):
        scores["psnr"].append(min(peak_signal_noise_ratio(gt, pred, data_range=255), PSNR_CAP))
        scores["ssim"].append(structural_similarity(gt, pred, gaussian_weights=True, sigma=1.5,
                                                    use_sample_covariance=False, data_range=255, channel_axis=-1))
        scores["mae"].append(np.abs(pred.astype(np.float64) - gt.astype(np.float64)).mean() / 255.0)
    return {name: np.array(values) for name, values in scores.items()}


def batched_scores(composite: torch.Tensor, truth: torch.Tensor) -> dict[str, np.ndarray]:
    return {name: values.cpu().numpy() for name, values in pixel_metrics(composite, truth).items()}


def compare(label: str, composite: np.ndarray, truth: np.ndarray, repeats: int) -> float:
    composite_t = torch.from_numpy(composite).permute(0, 3, 1, 2).contiguous()
    truth_t = torch.from_numpy(truth).permute(0, 3, 1, 2).contiguous()
    reference_seconds = batched_seconds = float("inf")
    for _ in range(repeats):  # alternating, so a busy moment of the machine hits both sides alike
        started = time.perf_counter()
        reference = reference_scores(composite, truth)
        reference_seconds = min(reference_seconds, time.perf_counter() - started)
        started = time.perf_counter()
        batched = batched_scores(composite_t, truth_t)
        batched_seconds = min(batched_seconds, time.perf_counter() - started)
    pairs = len(composite)
    speedup = reference_seconds / batched_seconds
    print(f"{label}:")
    print(f"  scikit-image per image: {pairs / reference_seconds:9.1f} pairs/s ({reference_seconds:.3f} s)")
    print(f"  bench.metrics batched : {pairs / batched_seconds:9.1f} pairs/s ({batched_seconds:.3f} s)")
    print("  max |difference|: " + ", ".join(f"{name} {np.abs(batched[name] - reference[name]).max():.1e}"
                                             for name in PIXEL_METRICS))
    print(f"  speed-up: {speedup:.1f}x")
    return speedup


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=60, help="pairs per workload (default: 10 per ratio bin)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"{args.pairs} pairs of {args.size}x{args.size} RGB uint8, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")
    speedup = compare("composites (free-form holes, six ratio bins)", *make_pairs(args.pairs, args.size), args.repeats)
    compare("dense (every pixel differs; for context)", *make_pairs(args.pairs, args.size, dense=True), args.repeats)
    print(f"speed-up on the composites: {speedup:.1f}x (target >= 10x: {'met' if speedup >= 10 else 'NOT met'})")


if __name__ == "__main__":
    main()
