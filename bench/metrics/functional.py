"""Image-quality metrics as small pure functions, and the one place every metric convention is written down.

Inputs of the per-image metrics are the scored images of the protocol (docs/protocol.md): the composite
``pred*m + gt*(1-m)`` quantised once to ``uint8 [B,3,H,W]`` RGB by rounding, and the ground truth quantised
the same way. Every per-image metric returns a ``float64`` tensor ``[B]`` on the inputs' device; a table's
number is the mean over the images of a bin (:mod:`bench.metrics.aggregate`).

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
    use_sample_covariance=False, data_range=255, channel_axis=-1)`` to 1e-5 (tested: about 1e-9 on
    noise, 2e-6 on photographs, from the float32 moments; the protocol asks for 1e-4). Images must be
    at least 11×11.

    How it is computed (:func:`ssim`): where the 11×11 window sees identical pixels in both images,
    μx = μy and σx² = σy² = σxy, so both ratios of the SSIM formula are exactly 1 — in exact
    arithmetic and in scikit-image's floating point alike. A composite equals its ground truth outside
    the hole, so only windows touching the hole are computed: the SSIM map is cut into 32×32 tiles,
    tiles whose 42×42 input patch holds no differing pixel count as exactly 1, and the others are
    filtered in float32 on values centred at 127.5 (variances are differences of large squares; the
    centring keeps them accurate); each tile's deficits ``1 - SSIM`` are summed in float32 and the tiles'
    sums in float64. The separable Gaussian filter of a tile is two matrix products with a banded
    matrix, which CPUs and GPUs run fastest in eager mode.

    Compiled (``pixel_metrics(..., compiled=True)``, CPU only): one ``torch.compile`` (inductor)
    kernel per image size fuses the whole computation: no tiles, each filter pass as eleven shifted
    multiply-adds, nothing but the per-image sums written to memory. It is several times faster than
    the eager path after a one-time compile per image size, so it pays on large sets of pairs (compile
    times and the break-even are in docs/measurements.md). It filters the sum
    ``s = x + y`` and the difference ``d = x - y`` of the centred images: with ``P = μs² + 2C1``,
    ``Q = μd²``, ``R = σs² + 2C2`` and ``V = σd²`` (``μs`` the uncentred mean of ``s``), SSIM is
    ``(P-Q)(R-V) / ((P+Q)(R+V))``, so ``1 - SSIM = 2(PV + QR) / ((P+Q)(R+V))`` is computed directly,
    as a ratio of sums of non-negative terms, not as the difference of two numbers near 1. Both
    paths round in float32, differently: on photographs the compiled kernel is within 1e-6 of
    scikit-image and the eager path within 1e-5 (docs/measurements.md), so the choice
    is part of a run's configuration. Without a working C++ compiler, or past
    :data:`COMPILED_SHAPES_LIMIT` image sizes in one process, it warns and computes eagerly.
MAE
    Mean absolute difference over all pixels and channels on the [0,1] scale (``|a-b|/255``).
    Tables print it ×10⁻¹ like the seed paper, with the unit in the header.
LPIPS (``lpips``)
    The ``lpips`` package v0.1, net ``alex`` by default, inputs mapped to [-1,1] (``u8/127.5-1``),
    its shipped linear layers and the ImageNet AlexNet trunk from the pretrained-network registry, both
    loaded strictly (:func:`bench.metrics.features.lpips_metric`). Offline, without the trunk file, LPIPS
    is *unavailable* and never computed with a random trunk.
``lite0_dist`` (not LPIPS)
    An unlearned LPIPS-style distance on the five feature stages of the pretrained
    EfficientNet-Lite0 (the offline substitute): per stage, features unit-normalised over
    channels, squared differences summed over channels and averaged over space, then summed over
    stages (:func:`bench.metrics.features.lite0_distance`). It is reported beside LPIPS, never as LPIPS.
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
    (:meth:`bench.metrics.scoring.Scorer.provenance`), or as ``"unavailable: <reason>"``.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bench.metrics.table import PIXEL_METRICS

#: PSNR of identical images (instead of inf); every PSNR is clipped to it.
PSNR_CAP = 100.0

SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)  # scipy.ndimage's truncate=3.5, as skimage uses
SSIM_WINDOW = 2 * SSIM_RADIUS + 1
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 255.0

SSIM_TILE = 32  # SSIM outputs per tile side (see "How it is computed")
SSIM_CENTRE = 127.5  # subtracted before the float32 moments, added back for the luminance term
GPU_CHUNK = 64  # images per chunk off the CPU (see _chunk_size)
#: image sizes compiled per process (each is its own kernel; torch._dynamo stops recompiling at 8)
COMPILED_SHAPES_LIMIT = 4


def _check_pair(pred: torch.Tensor, gt: torch.Tensor) -> None:
    for name, images in (("pred", pred), ("gt", gt)):
        if images.dtype != torch.uint8:
            raise TypeError(f"{name}: metrics take the quantised uint8 images, got {images.dtype}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{name}: expected [B,3,H,W], got {tuple(images.shape)}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")


def _chunk_size(device: torch.device) -> int:
    """Images per chunk: one on the CPU, where its maps stay in the caches; :data:`GPU_CHUNK` elsewhere."""
    return 1 if device.type == "cpu" else GPU_CHUNK


def _chunks(pred: torch.Tensor, gt: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    size = _chunk_size(pred.device)
    return zip(pred.split(size), gt.split(size))


def _absolute_differences(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``|pred - gt|`` of uint8 images, exactly, as uint8."""
    return torch.maximum(pred, gt).sub_(torch.minimum(pred, gt))


def _squared_and_absolute_sums(differences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the sums of ``d²`` and ``|d|`` over all pixels and channels: exact, because every term
    and partial sum is an integer below 2⁵³ in float64."""
    values = differences.reshape(len(differences), -1).double()
    return (values * values).sum(dim=1), values.sum(dim=1)


def _psnr_from(squared_sum: torch.Tensor, count: int) -> torch.Tensor:
    return (10.0 * torch.log10(DATA_RANGE**2 * count / squared_sum)).clamp(max=PSNR_CAP)  # 0 gives inf, clipped


def _mae_from(absolute_sum: torch.Tensor, count: int) -> torch.Tensor:
    return absolute_sum / (count * DATA_RANGE)


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on [0,255] RGB, clipped at :data:`PSNR_CAP`; float64 ``[B]``."""
    return pixel_metrics(pred, gt, ("psnr",))["psnr"]


def mae(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute error on the [0,1] scale over all pixels and channels; float64 ``[B]``."""
    return pixel_metrics(pred, gt, ("mae",))["mae"]


def ssim(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al.; conventions in the module docstring); float64 ``[B]``."""
    return pixel_metrics(pred, gt, ("ssim",))["ssim"]


def gaussian_kernel_1d(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS,
                       dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> torch.Tensor:
    """Normalised Gaussian taps ``exp(-x²/2σ²)`` for ``x = -radius..radius``."""
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


_SSIM_TAPS = tuple(gaussian_kernel_1d().tolist())  # Python floats: constants of the compiled kernel


def banded_filter_matrix(taps: torch.Tensor, block: int = SSIM_TILE) -> torch.Tensor:
    """``[block + len(taps) - 1, block]`` matrix whose column ``j`` holds ``taps`` from row ``j``:
    a window of ``block + len(taps) - 1`` samples times it gives ``block`` valid filter outputs."""
    matrix = taps.new_zeros(block + len(taps) - 1, block)
    for column in range(block):
        matrix[column:column + len(taps), column] = taps
    return matrix


class _SSIMTiling:
    """How ``H×W`` images are cut into tiles of ``SSIM_TILE²`` valid SSIM outputs (see the module doc)."""

    def __init__(self, height: int, width: int, device: torch.device):
        self.patch = SSIM_TILE + 2 * SSIM_RADIUS  # input pixels a tile's outputs see, per side
        self.outputs = (height - 2 * SSIM_RADIUS) * (width - 2 * SSIM_RADIUS)  # valid SSIM values per channel
        self.rows = -(-(height - 2 * SSIM_RADIUS) // SSIM_TILE)
        self.cols = -(-(width - 2 * SSIM_RADIUS) // SSIM_TILE)
        self.per_image = self.rows * self.cols
        # zeros on the right and bottom complete the last tiles; their outputs are masked out
        self.padding = (0, self.cols * SSIM_TILE + 2 * SSIM_RADIUS - width,
                        0, self.rows * SSIM_TILE + 2 * SSIM_RADIUS - height)
        self.banded = banded_filter_matrix(gaussian_kernel_1d(dtype=torch.float32, device=device))
        valid = torch.zeros(self.rows * SSIM_TILE, self.cols * SSIM_TILE, device=device)
        valid[:height - 2 * SSIM_RADIUS, :width - 2 * SSIM_RADIUS] = 1
        # per tile, transposed: the second matrix product leaves each filtered tile transposed
        self.valid = valid.view(self.rows, SSIM_TILE, self.cols, SSIM_TILE).permute(0, 2, 3, 1).reshape(
            self.per_image, 1, SSIM_TILE, SSIM_TILE)

    def active_tiles(self, differs: torch.Tensor) -> torch.Tensor:
        """Indices ``image·per_image + tile`` of the tiles whose input patch holds a nonzero of ``differs [n,H,W]``."""
        padded = F.pad(differs, self.padding)
        per_tile = padded.unfold(-1, self.patch, SSIM_TILE).amax(-1).unfold(-2, self.patch, SSIM_TILE).amax(-1)
        return per_tile.flatten().nonzero().squeeze(1)

    def patches(self, pair: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        """``[2, len(tiles), C, patch, patch]``: the input patches of ``tiles`` in both images of ``pair [2,n,C,H,W]``."""
        padded = F.pad(pair, self.padding)
        every = padded.unfold(-2, self.patch, SSIM_TILE).unfold(-2, self.patch, SSIM_TILE).movedim((-4, -3), (2, 3))
        return every.reshape(2, -1, pair.shape[2], self.patch, self.patch).index_select(1, tiles)


def _ssim_deficits(pred: torch.Tensor, gt: torch.Tensor, differences: torch.Tensor, tiling: _SSIMTiling) -> torch.Tensor:
    """Per image of the chunk, the sum over channels and valid outputs of ``1 - SSIM``; float64 ``[n]``."""
    count, channels = len(pred), pred.shape[1]
    deficits = torch.zeros(count, dtype=torch.float64, device=pred.device)
    active = tiling.active_tiles(differences.amax(dim=1))
    if not len(active):
        return deficits
    side, tile = tiling.patch, SSIM_TILE
    moments = torch.empty((4, len(active), channels, side, side), dtype=torch.float32, device=pred.device)
    torch.sub(tiling.patches(torch.stack((pred, gt)), active), SSIM_CENTRE, out=moments[:2])
    x, y, squares, products = moments
    torch.mul(x, x, out=squares).addcmul_(y, y)  # x² + y²: SSIM needs only σx² + σy²
    torch.mul(x, y, out=products)
    rows_filtered = (moments.view(-1, side) @ tiling.banded).view(-1, side, tile)
    filtered = (rows_filtered.transpose(1, 2).reshape(-1, side) @ tiling.banded).view(4, len(active), channels, tile, tile)
    mean_x, mean_y, mean_squares, mean_xy = filtered  # of the centred values
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    # In place from here on: these maps dominate the memory traffic.
    product = mean_x * mean_y
    squares = torch.mul(mean_x, mean_x).addcmul_(mean_y, mean_y)
    contrast_structure = mean_xy.sub_(product).mul_(2).add_(c2)  # 2σxy + C2
    variances = mean_squares.sub_(squares).add_(c2)  # σx² + σy² + C2
    # Luminance of the uncentred means (μ + c): 2μxμy + C1 and μx² + μy² + C1 share 2c(μx+μy) + 2c².
    shared = mean_x.add_(mean_y).mul_(2 * SSIM_CENTRE).add_(2 * SSIM_CENTRE**2 + c1)
    numerator = product.mul_(2).add_(shared).mul_(contrast_structure)
    denominator = squares.add_(shared).mul_(variances)
    deficit_map = denominator.sub(numerator).div_(denominator).mul_(tiling.valid.index_select(0, active % tiling.per_image))
    # float32 sums of at most C·SSIM_TILE² values per tile, float64 across tiles
    per_tile = deficit_map.view(len(active), -1).sum(dim=1).double()
    return deficits.index_add_(0, active // tiling.per_image, per_tile)


def _gaussian_filter_valid(maps: torch.Tensor) -> torch.Tensor:
    """The 11×11 SSIM Gaussian over the last two dims, valid outputs only, as shifted multiply-adds:
    the form a compiler fuses into one loop (eager code is faster with the banded matrices)."""
    for dim in (-1, -2):
        length = maps.shape[dim] - 2 * SSIM_RADIUS
        maps = sum(tap * maps.narrow(dim, offset, length) for offset, tap in enumerate(_SSIM_TAPS))
    return maps


def _fused_pixel_sums(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: the exact int64 sums of ``|d|`` and ``d²``, and the float64 sum over channels and valid
    outputs of ``1 - SSIM`` in the sum/difference form of the module docstring. Written to be compiled."""
    differences = pred.to(torch.int32) - gt.to(torch.int32)
    x, y = pred.float() - SSIM_CENTRE, gt.float() - SSIM_CENTRE
    total, difference = x + y, x - y
    mean_s, mean_d, mean_ss, mean_dd = _gaussian_filter_valid(
        torch.stack((total, difference, total * total, difference * difference)))
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    luminance_sum = (mean_s + 2 * SSIM_CENTRE) ** 2 + 2 * c1  # P
    luminance_difference = mean_d * mean_d  # Q
    contrast_sum = mean_ss - mean_s * mean_s + 2 * c2  # R
    contrast_difference = mean_dd - luminance_difference  # V
    deficit = 2 * (luminance_sum * contrast_difference + luminance_difference * contrast_sum) / (
        (luminance_sum + luminance_difference) * (contrast_sum + contrast_difference))
    return (differences.abs().flatten(1).sum(1), (differences * differences).flatten(1).sum(1),
            deficit.flatten(1).sum(1, dtype=torch.float64))


class _CompiledPixelSums:
    """:func:`_fused_pixel_sums` compiled once per image size; a call returns ``None`` where it cannot be."""

    def __init__(self):
        self._shapes: set[tuple[int, ...]] = set()
        self.failure: str | None = None
        try:
            self._compiled = torch.compile(_fused_pixel_sums, dynamic=False)
        except Exception as exc:  # torch.compile refuses this Python or platform
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self.failure = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        warnings.warn(f"compiled pixel metrics unavailable ({self.failure}); computing them eagerly", stacklevel=4)

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        shape = tuple(pred.shape)
        if self.failure is not None:
            return None
        if shape not in self._shapes and len(self._shapes) >= COMPILED_SHAPES_LIMIT:
            warnings.warn(f"compiled pixel metrics: {COMPILED_SHAPES_LIMIT} image sizes are compiled in this "
                          f"process already; {shape[-2]}x{shape[-1]} is scored eagerly", stacklevel=3)
            return None
        try:  # contiguous and without autograd: one memory layout and grad mode, so one compile per size
            with torch.no_grad():
                sums = self._compiled(pred.contiguous(), gt.contiguous())
        except Exception as exc:  # no C++ compiler, an unsupported platform: any reason means eager
            self._fail(exc)
            return None
        self._shapes.add(shape)
        return sums


@functools.cache
def compiled_pixel_sums() -> _CompiledPixelSums:
    """The process's one compiled pixel-metric kernel, which remembers why it failed, if it did."""
    return _CompiledPixelSums()


def pixel_metrics_backend(device: torch.device, compiled: bool) -> str:
    """What :func:`pixel_metrics` scores with on ``device``: ``"compiled"``, or ``"eager"`` (with the reason
    when compiling was asked for and failed)."""
    if not compiled or device.type != "cpu":
        return "eager"
    failure = compiled_pixel_sums().failure
    return f"eager (compiled unavailable: {failure})" if failure else "compiled"


def _check_ssim_size(pred: torch.Tensor) -> None:
    height, width = pred.shape[-2:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {height}x{width}")


def pixel_metrics(pred: torch.Tensor, gt: torch.Tensor, names: tuple[str, ...] = PIXEL_METRICS,
                  compiled: bool = False) -> dict[str, torch.Tensor]:
    """``{name: float64 [B]}`` for ``names`` among psnr, ssim and mae, each as the module docstring defines
    it, computed together chunk by chunk from the same absolute differences.

    ``compiled`` (CPU only, ignored elsewhere): score with the fused ``torch.compile`` kernel of the
    module docstring, or eagerly with a warning where it cannot be compiled.
    """
    _check_pair(pred, gt)
    unknown = set(names) - set(PIXEL_METRICS)
    if unknown:
        raise ValueError(f"unknown pixel metrics {sorted(unknown)}; choose among {', '.join(PIXEL_METRICS)}")
    if "ssim" in names:
        _check_ssim_size(pred)
        tiling = _SSIMTiling(*pred.shape[-2:], pred.device)
    count = pred[0].numel()
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for p, g in _chunks(pred, gt):
        fused = compiled_pixel_sums()(p, g) if compiled and "ssim" in names and p.device.type == "cpu" else None
        if fused is not None:
            absolute_sum, squared_sum, deficits = (values.double() for values in fused)
        else:
            differences = _absolute_differences(p, g)
            if "psnr" in names or "mae" in names:
                squared_sum, absolute_sum = _squared_and_absolute_sums(differences)
            if "ssim" in names:
                deficits = _ssim_deficits(p, g, differences, tiling)
        if "psnr" in names:
            scores["psnr"].append(_psnr_from(squared_sum, count))
        if "mae" in names:
            scores["mae"].append(_mae_from(absolute_sum, count))
        if "ssim" in names:
            scores["ssim"].append(1.0 - deficits / (p.shape[1] * tiling.outputs))
    return {name: torch.cat(values) for name, values in scores.items()}


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


def kid_draws(count_a: int, count_b: int, num_subsets: int = 100, subset_size: int = 1000,
              seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """KID's seeded subsets of two sets of ``count_a`` and ``count_b`` rows: ``num_subsets`` pairs of row indices."""
    size = min(subset_size, count_a, count_b)
    if size < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {count_a} and {count_b}")
    rng = np.random.default_rng(seed)
    return [(rng.choice(count_a, size, replace=False), rng.choice(count_b, size, replace=False))
            for _ in range(num_subsets)]


def kid_of_subsets(rows_a: Callable[[np.ndarray], np.ndarray], rows_b: Callable[[np.ndarray], np.ndarray],
                   draws: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """KID (mean, std) from subsets whose rows are read when needed (``rows_a(indices)`` → float64 ``[n,D]``):
    only one subset per set is ever in memory, however many rows the sets have."""
    estimates = []
    for a, b in draws:
        subset_a, subset_b = rows_a(a), rows_b(b)
        estimates.append(unbiased_mmd2(polynomial_kernel(subset_a, subset_a), polynomial_kernel(subset_b, subset_b),
                                       polynomial_kernel(subset_a, subset_b)))
    return float(np.mean(estimates)), float(np.std(estimates))


def kid(feats_a, feats_b, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        full_kernel_max_entries: int = FULL_KERNEL_MAX_ENTRIES) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased polynomial MMD² over seeded subsets."""
    feats_a, feats_b = _as_float64(feats_a), _as_float64(feats_b)
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"need [N,D] feature sets of the same D, got {feats_a.shape} and {feats_b.shape}")
    draws = kid_draws(len(feats_a), len(feats_b), num_subsets, subset_size, seed)
    if max(len(feats_a), len(feats_b)) ** 2 <= full_kernel_max_entries:
        kernel_aa = polynomial_kernel(feats_a, feats_a)
        kernel_bb = polynomial_kernel(feats_b, feats_b)
        kernel_ab = polynomial_kernel(feats_a, feats_b)
        estimates = [unbiased_mmd2(kernel_aa[np.ix_(a, a)], kernel_bb[np.ix_(b, b)], kernel_ab[np.ix_(a, b)])
                     for a, b in draws]
        return float(np.mean(estimates)), float(np.std(estimates))
    return kid_of_subsets(feats_a.__getitem__, feats_b.__getitem__, draws)


def streamed_gaussian_statistics(rows: Callable[[np.ndarray], np.ndarray], count: int,
                                 chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and ``N-1`` covariance of ``count`` rows read ``chunk_rows`` at a time (``rows(indices)`` → float64
    ``[n,D]``): two passes, the second over centred rows (as :func:`numpy.cov` centres), so memory is
    ``D×D`` plus one chunk whatever ``count`` is. Equal to :func:`gaussian_statistics` up to the order of the
    float64 sums."""
    if count < 2:
        raise ValueError(f"need at least 2 rows, got {count}")
    starts = range(0, count, chunk_rows)
    total = None
    for start in starts:
        chunk = rows(np.arange(start, min(start + chunk_rows, count)))
        total = chunk.sum(axis=0) if total is None else total + chunk.sum(axis=0)
    mean = total / count
    scatter = np.zeros((len(mean), len(mean)))
    for start in starts:
        centred = rows(np.arange(start, min(start + chunk_rows, count))) - mean
        scatter += centred.T @ centred
    return mean, scatter / (count - 1)
