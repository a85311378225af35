"""Throughput of the batched PSNR + SSIM + MAE against scikit-image's per-image functions.

    python -m pipelines.benchmarks.metrics_throughput [--pairs 60 --size 256 --repeats 3 --threads N --eager-only]

Every side scores the same seeded uint8 pairs. The main workload is what the harness scores: a
photograph-like ground truth and its composite, which differs from it only inside a free-form hole
(the protocol's DeepFill masks, the pairs spread evenly over the six ratio bins; the hole holds a
noisy copy of the ground truth). For context it also times a dense workload where every pixel
differs (the worst case for the eager SSIM, which skips windows with no differing pixel).

Two backends of :func:`bench.metrics.functional.pixel_metrics` are timed: the eager default and the compiled
kernel (``compiled=True``). The compiled kernel's first call compiles it for the image size; that
one-time cost is printed on its own line and left out of the timings, which measure steady-state
throughput. It prints pairs/s of each side, each backend's speed-up and largest absolute difference
from scikit-image per metric (target ≥ 10× on the composites). Timings take the best of
``--repeats`` runs, alternating the sides.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bench.data.masks import RATIO_BINS, bin_label, generate_mask_in_bin
from bench.metrics.functional import PSNR_CAP, pixel_metrics, pixel_metrics_backend
from bench.metrics.table import PIXEL_METRICS


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


def batched_scores(composite: torch.Tensor, truth: torch.Tensor, compiled: bool) -> dict[str, np.ndarray]:
    return {name: values.cpu().numpy() for name, values in pixel_metrics(composite, truth, compiled=compiled).items()}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def compare(label: str, composite: np.ndarray, truth: np.ndarray, repeats: int, backends: dict[str, bool]
            ) -> dict[str, float]:
    """Times scikit-image and each batched backend on the same pairs; returns each backend's speed-up."""
    sides = {"scikit-image per image": lambda: reference_scores(composite, truth)}
    composite_t, truth_t = to_tensor(composite), to_tensor(truth)
    for backend, compiled in backends.items():
        sides[f"bench.metrics.functional {backend}"] = lambda compiled=compiled: batched_scores(composite_t, truth_t, compiled)
    seconds = dict.fromkeys(sides, float("inf"))
    scores = {}
    for _ in range(repeats):  # alternating, so a busy moment of the machine hits every side alike
        for side, run in sides.items():
            started = time.perf_counter()
            scores[side] = run()
            seconds[side] = min(seconds[side], time.perf_counter() - started)
    reference_side = next(iter(sides))
    pairs = len(composite)
    print(f"{label}:")
    speedups = {}
    for side, elapsed in seconds.items():
        line = f"  {side:<24}: {pairs / elapsed:9.1f} pairs/s ({elapsed:.3f} s)"
        if side != reference_side:
            speedups[side] = seconds[reference_side] / elapsed
            differences = ", ".join(f"{name} {np.abs(scores[side][name] - scores[reference_side][name]).max():.1e}"
                                    for name in PIXEL_METRICS)
            line += f"  {speedups[side]:5.1f}x  max |difference|: {differences}"
        print(line)
    return speedups


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=60, help="pairs per workload (default: 10 per ratio bin)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled backend (and its compile)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"{args.pairs} pairs of {args.size}x{args.size} RGB uint8, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")
    backends = {"eager": False}
    composite, truth = make_pairs(args.pairs, args.size)
    if not args.eager_only:
        started = time.perf_counter()
        pixel_metrics(to_tensor(composite[:1]), to_tensor(truth[:1]), compiled=True)
        backend = pixel_metrics_backend(torch.device("cpu"), compiled=True)
        print(f"compiled backend: {backend}; its first call (the compile for {args.size}x{args.size}, once per "
              f"image size and process) took {time.perf_counter() - started:.1f} s and is not in the timings")
        if backend == "compiled":
            backends["compiled"] = True
    speedups = compare("composites (free-form holes, six ratio bins)", composite, truth, args.repeats, backends)
    compare("dense (every pixel differs; for context)", *make_pairs(args.pairs, args.size, dense=True), args.repeats,
            backends)
    verdicts = ", ".join(f"{side.removeprefix('bench.metrics.functional ')} {speedup:.1f}x ({'met' if speedup >= 10 else 'NOT met'})"
                         for side, speedup in speedups.items())
    print(f"speed-up on the composites (target >= 10x): {verdicts}")


if __name__ == "__main__":
    main()
