"""Image-quality metrics as small pure functions, and the one place every metric convention is written down.

Inputs of the per-image metrics are the scored images of the protocol (docs in
``/work/shared/docs/protocol.md``): the composite ``pred*m + gt*(1-m)`` quantised once to
``uint8 [B,3,H,W]`` RGB by rounding, and the ground truth quantised the same way. Every per-image
metric returns a ``float64`` tensor ``[B]`` on the inputs' device; a table's number is the mean over
the images of a bin (:mod:`bench.aggregate`).

Conventions
-----------
PSNR
    ``10·log10(255² / MSE)`` per image, MSE over all pixels and the three RGB channels on the
    [0,255] scale, in float64 — the same as ``skimage.metrics.peak_signal_noise_ratio(gt, pred,
    data_range=255)``. Values are clipped at :data:`PSNR_CAP` = 100 dB, so identical images give
    100 dB instead of ``inf`` (and a mean stays finite). 100 dB means fewer than about one
    channel value in 150 off by one level; no inpainting result gets near it.
SSIM
    Wang et al. (2004): Gaussian window 11×11 (σ = 1.5, i.e. radius ``int(3.5·σ + 0.5)`` = 5 as
    in scipy.ndimage), K1 = 0.01, K2 = 0.03, data_range = 255, population (not sample)
    covariances, per RGB channel, then the mean of the SSIM map over the *valid* region only
    (the 5-pixel border where the window would leave the image is excluded, so no padding mode
    enters the result) and the mean over the three channels. This equals
    ``skimage.metrics.structural_similarity(gt, pred, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, channel_axis=-1)`` to 1e-4 (tested). Images
    must be at least 11×11.
MAE
    Mean absolute difference over all pixels and channels on the [0,1] scale (``|a-b|/255``).
    Tables print it ×10⁻¹ like the seed paper, with the unit in the header.
LPIPS (``lpips``)
    The ``lpips`` package v0.1, net ``alex`` by default, inputs mapped to [-1,1] (``u8/127.5-1``),
    its shipped linear layers and the ImageNet AlexNet trunk from the weights registry, both
    loaded strictly (:func:`bench.features.lpips_metric`). Offline, without the trunk file, LPIPS
    is *unavailable* and never computed with a random trunk.
``lite0_dist`` (not LPIPS)
    An unlearned LPIPS-style distance on the five feature stages of the pretrained
    EfficientNet-Lite0 (the offline substitute): per stage, features unit-normalised over
    channels, squared differences summed over channels and averaged over space, then summed over
    stages (:func:`bench.features.lite0_distance`). It is reported beside LPIPS, never as LPIPS.
FID
    pytorch-fid's FID InceptionV3 (``pt_inception-2015-12-05``), pool3 2048-d features of the
    image resized to 299² (bilinear, ``align_corners=False``, no antialias) and scaled to [-1,1].
    Set-level: the Fréchet distance between Gaussians fitted (mean, covariance with ``N-1``) to
    the features of the composites and of the ground-truth images *of the same pairs* of a bin;
    bins with fewer than two images get NaN. FID is biased by N: tables print N and use the
    same pairs for every method. :func:`frechet_distance` uses the eigenvalue identity
    ``tr sqrt(Σ1 Σ2) = Σ sqrt(λ(Σ1^½ Σ2 Σ1^½))`` (symmetric, so no complex round-off and no
    diagonal offset is needed) and agrees with ``pytorch_fid.fid_score.calculate_frechet_distance``.
``FD_lite0``
    The same Fréchet distance on the 1280-d global-average-pooled penultimate features of the
    pretrained EfficientNet-Lite0 (input resized to 224², bicubic with antialias, clamped to
    [0,1], Lite0 scaling ``(x·255-127)/128``). Reported beside FID, never called FID.
KID, ``KID_lite0``
    Kernel Inception Distance (Bińkowski et al. 2018) as torch-fidelity / clean-fid compute it:
    cubic polynomial kernel ``k(x,y) = (x·y/d + 1)³``, unbiased MMD² (within-set sums exclude
    the diagonal, the cross term averages all pairs), averaged over ``num_subsets`` = 100 random
    subsets of ``subset_size`` = 1000 drawn without replacement (clipped to the smaller set),
    from ``numpy.random.default_rng(seed)`` with seed 0. Reported as mean and standard deviation
    over the subsets (``KID``, ``KID_std``).
Provenance
    Every metric network is recorded with its weights file name and sha256
    (:meth:`bench.scoring.Scorer.provenance`), or as ``"unavailable: <reason>"``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: PSNR of identical images (instead of inf); every PSNR is clipped to it.
PSNR_CAP = 100.0

SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)  # scipy.ndimage's truncate=3.5, as skimage uses
SSIM_WINDOW = 2 * SSIM_RADIUS + 1
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 255.0

#: per-image metric columns of ``per_image.csv``, in table order (absent ones are skipped)
PER_IMAGE_METRICS = ("psnr", "ssim", "mae", "lpips", "lite0_dist")


def _check_pair(pred: torch.Tensor, gt: torch.Tensor) -> None:
    for name, images in (("pred", pred), ("gt", gt)):
        if images.dtype != torch.uint8:
            raise TypeError(f"{name}: metrics take the quantised uint8 images, got {images.dtype}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{name}: expected [B,3,H,W], got {tuple(images.shape)}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")


def _differences(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``pred - gt`` as exact integers, flattened per image (uint8 differences fit in int16)."""
    return (pred.to(torch.int16) - gt.to(torch.int16)).flatten(1)


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on [0,255] RGB, clipped at :data:`PSNR_CAP`; float64 ``[B]``."""
    _check_pair(pred, gt)
    differences = _differences(pred, gt).to(torch.int32)
    squared_sum = differences.square().sum(dim=1, dtype=torch.int64)  # exact integer sum
    mse = squared_sum.double() / differences.shape[1]
    decibels = 10.0 * torch.log10(DATA_RANGE**2 / mse)  # mse 0 gives inf, clipped below
    return decibels.clamp(max=PSNR_CAP)


def mae(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute error on the [0,1] scale over all pixels and channels; float64 ``[B]``."""
    _check_pair(pred, gt)
    differences = _differences(pred, gt)
    absolute_sum = differences.abs().sum(dim=1, dtype=torch.int64)  # exact integer sum
    return absolute_sum.double() / (differences.shape[1] * DATA_RANGE)


def gaussian_kernel_1d(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS,
                       dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> torch.Tensor:
    """Normalised Gaussian taps ``exp(-x²/2σ²)`` for ``x = -radius..radius``."""
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


#: output columns per block of the banded filter matrix (see :func:`_valid_filter_last_axis`)
FILTER_BLOCK = 32
#: images per SSIM chunk: keeps the float64 moment maps of a chunk small enough for the CPU caches
SSIM_CHUNK = 4


def banded_filter_matrix(taps: torch.Tensor, block: int = FILTER_BLOCK) -> torch.Tensor:
    """``[block + len(taps) - 1, block]`` matrix whose column ``j`` holds ``taps`` from row ``j``:
    a window of ``block + len(taps) - 1`` samples times it gives ``block`` valid filter outputs."""
    matrix = taps.new_zeros(block + len(taps) - 1, block)
    for column in range(block):
        matrix[column:column + len(taps), column] = taps
    return matrix


def _valid_filter_last_axis(maps: torch.Tensor, banded: torch.Tensor) -> torch.Tensor:
    """Valid (unpadded) correlation of every row of ``maps`` along its last axis with the taps in ``banded``.

    Rows are cut into overlapping windows, one per block of outputs, and filtered by one matrix
    product: float64 convolutions have no fast CPU kernel, a float64 GEMM has.
    """
    window, block = banded.shape
    width = maps.shape[-1]
    outputs = width - (window - block)
    blocks = -(-outputs // block)
    padded = F.pad(maps, (0, blocks * block + window - block - width))  # zeros only reach dropped outputs
    windows = padded.unfold(-1, window, block).reshape(-1, window)
    filtered = (windows @ banded).reshape(*maps.shape[:-1], blocks * block)
    return filtered[..., :outputs]


def _valid_gaussian_blur(maps: torch.Tensor, banded: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of ``[..., H, W]`` maps over the valid region (no padding)."""
    rows = _valid_filter_last_axis(maps, banded)
    return _valid_filter_last_axis(rows.transpose(-1, -2), banded).transpose(-1, -2)


def _ssim_of_chunk(pred: torch.Tensor, gt: torch.Tensor, banded: torch.Tensor) -> torch.Tensor:
    # The five moment maps x, y, x², y², xy of every channel, filtered in one pass.
    moments = torch.empty((5, *pred.shape), dtype=torch.float64, device=pred.device)
    x, y = moments[0], moments[1]
    x.copy_(pred)
    y.copy_(gt)
    torch.mul(x, x, out=moments[2])
    torch.mul(y, y, out=moments[3])
    torch.mul(x, y, out=moments[4])
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = _valid_gaussian_blur(moments, banded)
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    # In place from here on: these maps dominate the memory traffic, which bounds the speed on CPU.
    mean_x_mean_y = mean_x * mean_y
    square_x, square_y = mean_x.square_(), mean_y.square_()
    contrast_structure = mean_xy.sub_(mean_x_mean_y).mul_(2).add_(c2)  # 2σxy + C2
    luminance = mean_x_mean_y.mul_(2).add_(c1)  # 2μxμy + C1
    variances = mean_xx.sub_(square_x).add_(mean_yy.sub_(square_y)).add_(c2)  # σx² + σy² + C2
    squares = square_x.add_(square_y).add_(c1)  # μx² + μy² + C1
    ssim_map = luminance.mul_(contrast_structure).div_(variances.mul_(squares))  # [B,3,H-10,W-10]
    # Equal channel sizes make the mean of per-channel means the mean over all three.
    return ssim_map.flatten(1).mean(dim=1)


def ssim(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al.; conventions in the module docstring); float64 ``[B]``."""
    _check_pair(pred, gt)
    height, width = pred.shape[-2:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {height}x{width}")
    banded = banded_filter_matrix(gaussian_kernel_1d(device=pred.device))
    chunks = zip(pred.split(SSIM_CHUNK), gt.split(SSIM_CHUNK))
    return torch.cat([_ssim_of_chunk(pred_chunk, gt_chunk, banded) for pred_chunk, gt_chunk in chunks])


def _as_float64(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (round-off negatives clipped to 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance ``|μ1-μ2|² + tr(Σ1 + Σ2 - 2 sqrt(Σ1 Σ2))`` between two Gaussians.

    ``tr sqrt(Σ1 Σ2)`` is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix ``Σ1^½ Σ2 Σ1^½`` (same spectrum as ``Σ1 Σ2``), which is exact for singular
    covariances (N < D) too. ``eps`` is accepted for drop-in compatibility with pytorch-fid's
    ``calculate_frechet_distance``; this method never needs its diagonal offset.
    """
    del eps
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("statistics contain NaN or inf")
    root1 = _sqrt_psd((sigma1 + sigma1.T) / 2)
    middle = root1 @ sigma2 @ root1
    product_eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(product_eigenvalues, 0.0, None)).sum()
    difference = mu1 - mu2
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``N-1`` normalisation, as pytorch-fid) of ``[N,D]`` features."""
    features = _as_float64(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need [N,D] features with N >= 2, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _centred_scaled(features: np.ndarray) -> np.ndarray:
    """``A`` with ``AᵀA`` = the ``N-1`` covariance of ``features``."""
    return (features - features.mean(axis=0)) / np.sqrt(len(features) - 1)


def frechet_distance_of_features(features_a, features_b) -> float:
    """:func:`frechet_distance` between Gaussians fitted to two ``[N,D]`` feature sets.

    With fewer images than dimensions (every bin of a 2048-d FID below 2048 images) the
    covariances are ``Σ = AᵀA`` of rank < D, and ``tr sqrt(Σa Σb)`` equals the nuclear norm of
    the small ``Na×Nb`` matrix ``Aa Abᵀ`` (its squared singular values are the non-zero
    eigenvalues of ``Σa Σb``), so no D×D decomposition is needed.
    """
    features_a, features_b = _as_float64(features_a), _as_float64(features_b)
    for features in (features_a, features_b):
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"need [N,D] features with N >= 2, got {features.shape}")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sets differ in dimension: {features_a.shape} vs {features_b.shape}")
    if min(len(features_a), len(features_b)) >= features_a.shape[1]:
        return frechet_distance(*gaussian_statistics(features_a), *gaussian_statistics(features_b))
    scaled_a, scaled_b = _centred_scaled(features_a), _centred_scaled(features_b)
    trace_sqrt = np.linalg.svd(scaled_a @ scaled_b.T, compute_uv=False).sum()
    difference = features_a.mean(axis=0) - features_b.mean(axis=0)
    traces = np.square(scaled_a).sum() + np.square(scaled_b).sum()  # tr(AᵀA) = |A|²
    return float(difference @ difference + traces - 2.0 * trace_sqrt)


def polynomial_kernel(features_a: np.ndarray, features_b: np.ndarray) -> np.ndarray:
    """KID's cubic polynomial kernel ``(x·y/d + 1)³`` between all rows of two ``[N,D]`` sets."""
    return (features_a @ features_b.T / features_a.shape[1] + 1.0) ** 3


def unbiased_mmd2(kernel_aa: np.ndarray, kernel_bb: np.ndarray, kernel_ab: np.ndarray) -> float:
    """Unbiased MMD² of two equal-size sets from their kernel matrices (diagonals of the within terms
    excluded, the cross term averaged over all pairs)."""
    size = len(kernel_aa)
    within = (kernel_aa.sum() - np.trace(kernel_aa) + kernel_bb.sum() - np.trace(kernel_bb)) / (size * (size - 1))
    return float(within - 2.0 * kernel_ab.mean())


#: KID precomputes the three full kernel matrices when they hold at most this many entries each
#: (128 MB of float64), then only indexes them per subset; larger sets compute per subset.
FULL_KERNEL_MAX_ENTRIES = 4096 * 4096


def kid(feats_a, feats_b, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        full_kernel_max_entries: int = FULL_KERNEL_MAX_ENTRIES) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased polynomial MMD² over seeded subsets."""
    feats_a, feats_b = _as_float64(feats_a), _as_float64(feats_b)
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"need [N,D] feature sets of the same D, got {feats_a.shape} and {feats_b.shape}")
    size = min(subset_size, len(feats_a), len(feats_b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(feats_a)} and {len(feats_b)}")
    rng = np.random.default_rng(seed)
    draws = [(rng.choice(len(feats_a), size, replace=False), rng.choice(len(feats_b), size, replace=False))
             for _ in range(num_subsets)]
    if max(len(feats_a), len(feats_b)) ** 2 <= full_kernel_max_entries:
        kernel_aa = polynomial_kernel(feats_a, feats_a)
        kernel_bb = polynomial_kernel(feats_b, feats_b)
        kernel_ab = polynomial_kernel(feats_a, feats_b)
        estimates = [unbiased_mmd2(kernel_aa[np.ix_(a, a)], kernel_bb[np.ix_(b, b)], kernel_ab[np.ix_(a, b)])
                     for a, b in draws]
    else:
        estimates = [unbiased_mmd2(polynomial_kernel(feats_a[a], feats_a[a]), polynomial_kernel(feats_b[b], feats_b[b]),
                                   polynomial_kernel(feats_a[a], feats_b[b])) for a, b in draws]
    return float(np.mean(estimates)), float(np.std(estimates))
