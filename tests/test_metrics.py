"""Conformance of the pixel metrics with scikit-image / numpy, and of FID/KID with pytorch-fid's definitions."""
import functools
import warnings

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from skimage import data
from skimage.filters import gaussian
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bench.metrics import functional as metrics
from bench.metrics.functional import (PSNR_CAP, frechet_distance, frechet_distance_of_features, gaussian_statistics, kid, mae,
                           pixel_metrics, psnr, ssim)


def to_tensor(batch_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch_hwc)).permute(0, 3, 1, 2).contiguous()


def random_pairs(rng, batch, height, width, noise=40):
    truth = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    noisy = truth.astype(np.int64) + rng.integers(-noise, noise + 1, truth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), truth


def structured_pairs(height, width):
    """Real photographs (astronaut, coffee crops) against blurred + noisy versions of themselves."""
    rng = np.random.default_rng(3)
    truth = np.stack([data.astronaut()[100:100 + height, 150:150 + width],
                      data.coffee()[50:50 + height, 200:200 + width]])
    blurred = np.stack([gaussian(image, sigma=1.2, channel_axis=-1, preserve_range=True) for image in truth])
    degraded = np.clip(np.rint(blurred + rng.normal(0, 6, truth.shape)), 0, 255).astype(np.uint8)
    return degraded, truth


def skimage_ssim(pred, truth):
    return np.array([structural_similarity(truth[i], pred[i], gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, data_range=255, channel_axis=-1)
                     for i in range(len(pred))])


@pytest.mark.parametrize("height,width", [(11, 11), (32, 32), (24, 57), (65, 40)])
def test_ssim_matches_skimage_on_random_images(height, width):
    pred, truth = random_pairs(np.random.default_rng(height * width), 3, height, width)
    ours = ssim(to_tensor(pred), to_tensor(truth)).numpy()
    assert np.abs(ours - skimage_ssim(pred, truth)).max() <= 1e-6


@pytest.mark.parametrize("height,width", [(64, 64), (48, 80), (97, 31)])
def test_ssim_matches_skimage_on_photographs(height, width):
    pred, truth = structured_pairs(height, width)
    ours = ssim(to_tensor(pred), to_tensor(truth)).numpy()
    reference = skimage_ssim(pred, truth)
    assert np.abs(ours - reference).max() <= 1e-5  # float32 moments: ~2e-6 here; the protocol asks for 1e-4
    assert 0.3 < reference.min() < 1.0  # structured and degraded, so the comparison is not trivial


@pytest.mark.parametrize("height,width", [(64, 64), (75, 50), (140, 97)])
def test_ssim_of_composites_that_differ_only_in_a_hole_matches_skimage(height, width):
    """Composites are identical to the ground truth outside the hole: only tiles near it are computed."""
    rng = np.random.default_rng(height + width)
    truth = rng.integers(0, 256, (4, height, width, 3), dtype=np.uint8)
    pred = truth.copy()
    pred[0, 3:9, 5:12] = rng.integers(0, 256, (6, 7, 3))  # a hole by the corner
    pred[1, height - 4:, width - 3:] = 0  # in the last rows and columns (padded tiles)
    pred[2, height // 2, :] = 255  # a line across every tile column
    # pred[3] is the ground truth itself: SSIM exactly 1
    ours = ssim(to_tensor(pred), to_tensor(truth)).numpy()
    assert np.abs(ours - skimage_ssim(pred, truth)).max() <= 1e-6
    assert ours[3] == 1.0 and (ours[:3] < 1.0).all()


def test_chunks_of_several_images_give_the_per_image_results(monkeypatch):
    """Off the CPU several images share a chunk (tile indices then span images); forced here on the CPU."""
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 256, (7, 75, 50, 3), dtype=np.uint8)
    pred = truth.copy()
    pred[0, 3:9, 5:12] = 0
    pred[2, 37, :] = 255
    pred[6] = random_pairs(rng, 1, 75, 50)[0][0]
    # the chunk of images 3-5 has no differing pixel at all
    per_image = pixel_metrics(to_tensor(pred), to_tensor(truth))
    monkeypatch.setattr(metrics, "_chunk_size", lambda device: 3)
    chunked = pixel_metrics(to_tensor(pred), to_tensor(truth))
    for name in ("psnr", "ssim", "mae"):
        torch.testing.assert_close(chunked[name], per_image[name], rtol=0, atol=1e-9, msg=name)
    assert (chunked["ssim"][[1, 3, 4, 5]] == 1.0).all() and (chunked["ssim"][[0, 2, 6]] < 1.0).all()


COMPILED_SIZE = (48, 80)  # one image size for every compiled test: each size is one more compile


def compiled_test_pairs():
    """Photographs against degraded copies, and composites differing in a hole, by a border, or not at all."""
    height, width = COMPILED_SIZE
    photographs, photograph_truth = structured_pairs(height, width)
    rng = np.random.default_rng(17)
    truth = rng.integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    composites = truth.copy()
    composites[0, 10:30, 20:50] = rng.integers(0, 256, (20, 30, 3))
    composites[1, height - 3:, :] = 255
    return np.concatenate([photographs, composites]), np.concatenate([photograph_truth, truth])


def test_compiled_pixel_metrics_match_skimage_numpy_and_the_eager_path():
    pred, truth = compiled_test_pairs()
    compiled = pixel_metrics(to_tensor(pred), to_tensor(truth), compiled=True)
    assert metrics.pixel_metrics_backend(torch.device("cpu"), compiled=True) == "compiled"
    eager = pixel_metrics(to_tensor(pred), to_tensor(truth))
    assert torch.equal(compiled["psnr"], eager["psnr"]) and torch.equal(compiled["mae"], eager["mae"])  # exact sums
    assert np.abs(compiled["ssim"].numpy() - skimage_ssim(pred, truth)).max() <= 1e-6  # the eager path: 1e-5
    torch.testing.assert_close(compiled["ssim"], eager["ssim"], rtol=0, atol=1e-5)
    assert compiled["ssim"][4] == 1.0 and (compiled["ssim"][:4] < 1.0).all()  # pred[4] is its ground truth
    again = pixel_metrics(to_tensor(pred), to_tensor(truth), compiled=True)
    assert all(torch.equal(again[name], compiled[name]) for name in compiled)  # deterministic
    channels_last = torch.from_numpy(np.ascontiguousarray(pred)).permute(0, 3, 1, 2)  # a view, as methods may return
    from_view = pixel_metrics(channels_last, to_tensor(truth), compiled=True)
    assert all(torch.equal(from_view[name], compiled[name]) for name in compiled)
    assert metrics.pixel_metrics_backend(torch.device("cpu"), compiled=True) == "compiled"
    assert set(pixel_metrics(to_tensor(pred), to_tensor(truth), ("ssim",), compiled=True)) == {"ssim"}


class _FakeCompiled:
    """Stands in for the torch.compile'd function: records its calls, raises ``error`` when given one."""

    def __init__(self, error: Exception | None = None):
        self.error, self.calls = error, 0

    def __call__(self, pred, gt):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return metrics._fused_pixel_sums(pred, gt)


def fresh_compiled_sums(monkeypatch, fake: _FakeCompiled):
    kernel = metrics._CompiledPixelSums()
    kernel._compiled = fake
    monkeypatch.setattr(metrics, "compiled_pixel_sums", lambda: kernel)
    return kernel


def test_compiled_pixel_metrics_fall_back_to_eager_with_one_warning_when_compiling_fails(monkeypatch):
    fake = _FakeCompiled(RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail"))
    fresh_compiled_sums(monkeypatch, fake)
    pred, truth = random_pairs(np.random.default_rng(8), 2, 24, 30)
    with pytest.warns(UserWarning, match="compiled pixel metrics unavailable .*No working C\\+\\+ compiler"):
        fallen_back = pixel_metrics(to_tensor(pred), to_tensor(truth), compiled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the next call is silent and does not retry
        again = pixel_metrics(to_tensor(pred), to_tensor(truth), compiled=True)
    assert fake.calls == 1
    eager = pixel_metrics(to_tensor(pred), to_tensor(truth))
    assert all(torch.equal(fallen_back[name], eager[name]) and torch.equal(again[name], eager[name]) for name in eager)
    backend = metrics.pixel_metrics_backend(torch.device("cpu"), compiled=True)
    assert backend == ("eager (compiled unavailable: RuntimeError: InvalidCxxCompiler: No working C++ compiler found "
                       "more detail)")


def test_a_platform_torch_compile_refuses_is_scored_eagerly_with_a_warning(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(metrics, "compiled_pixel_sums", functools.cache(metrics._CompiledPixelSums))
    pred, truth = random_pairs(np.random.default_rng(12), 2, 20, 20)
    with pytest.warns(UserWarning, match="compiled pixel metrics unavailable .*not supported on this Python"):
        scores = pixel_metrics(to_tensor(pred), to_tensor(truth), compiled=True)
    eager = pixel_metrics(to_tensor(pred), to_tensor(truth))
    assert all(torch.equal(scores[name], eager[name]) for name in eager)
    assert metrics.pixel_metrics_backend(torch.device("cpu"), compiled=True).startswith("eager (compiled unavailable")


def test_image_sizes_past_the_compiled_limit_are_scored_eagerly(monkeypatch):
    fake = _FakeCompiled()
    fresh_compiled_sums(monkeypatch, fake)
    monkeypatch.setattr(metrics, "COMPILED_SHAPES_LIMIT", 1)
    first, first_truth = random_pairs(np.random.default_rng(9), 2, 20, 20)
    pixel_metrics(to_tensor(first), to_tensor(first_truth), compiled=True)
    assert fake.calls == 2  # one image per call on the CPU
    second, second_truth = random_pairs(np.random.default_rng(10), 2, 20, 21)
    with pytest.warns(UserWarning, match="20x21 is scored eagerly"):
        scores = pixel_metrics(to_tensor(second), to_tensor(second_truth), compiled=True)
    assert fake.calls == 2
    eager = pixel_metrics(to_tensor(second), to_tensor(second_truth))
    assert all(torch.equal(scores[name], eager[name]) for name in eager)
    assert metrics.pixel_metrics_backend(torch.device("cpu"), compiled=True) == "compiled"
    assert metrics.pixel_metrics_backend(torch.device("cpu"), compiled=False) == "eager"


def test_pixel_metrics_equal_the_separate_functions():
    pred, truth = random_pairs(np.random.default_rng(5), 3, 40, 52)
    pred[1] = truth[1]
    together = pixel_metrics(to_tensor(pred), to_tensor(truth))
    for name, metric in (("psnr", psnr), ("ssim", ssim), ("mae", mae)):
        assert torch.equal(together[name], metric(to_tensor(pred), to_tensor(truth))), name
    assert set(pixel_metrics(to_tensor(pred), to_tensor(truth), ("mae",))) == {"mae"}
    with pytest.raises(ValueError, match="unknown pixel metrics"):
        pixel_metrics(to_tensor(pred), to_tensor(truth), ("psnr", "lpips"))


def test_ssim_is_one_for_identical_images_and_rejects_tiny_images():
    pred, _ = random_pairs(np.random.default_rng(0), 2, 16, 16)
    assert torch.allclose(ssim(to_tensor(pred), to_tensor(pred)), torch.ones(2, dtype=torch.float64))
    tiny, _ = random_pairs(np.random.default_rng(0), 1, 10, 30)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(to_tensor(tiny), to_tensor(tiny))


def test_psnr_and_mae_match_numpy_and_skimage():
    pred, truth = random_pairs(np.random.default_rng(1), 4, 20, 33, noise=25)
    difference = pred.astype(np.float64) - truth.astype(np.float64)
    expected_psnr = [10 * np.log10(255.0**2 / np.mean(d**2)) for d in difference]
    expected_mae = [np.mean(np.abs(d)) / 255.0 for d in difference]
    ours_psnr = psnr(to_tensor(pred), to_tensor(truth))
    assert ours_psnr.dtype == torch.float64
    np.testing.assert_allclose(ours_psnr.numpy(), expected_psnr, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours_psnr.numpy(), [peak_signal_noise_ratio(t, p, data_range=255)
                                                   for p, t in zip(pred, truth)], rtol=0, atol=1e-10)
    np.testing.assert_allclose(mae(to_tensor(pred), to_tensor(truth)).numpy(), expected_mae, rtol=0, atol=1e-12)


def test_psnr_of_identical_images_is_the_cap_not_inf():
    pred, truth = random_pairs(np.random.default_rng(2), 2, 16, 16)
    pred[1] = truth[1]
    values = psnr(to_tensor(pred), to_tensor(truth))
    assert values[1].item() == PSNR_CAP
    assert np.isfinite(values.numpy()).all() and values[0].item() < PSNR_CAP


def test_metrics_refuse_float_images_and_mismatched_shapes():
    images = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        psnr(images.float(), images.float())
    with pytest.raises(ValueError, match="differ in shape"):
        mae(images, torch.zeros(1, 3, 16, 17, dtype=torch.uint8))


def pytorch_fid_distance(features_a, features_b):
    with warnings.catch_warnings():  # pytorch-fid passes scipy's deprecated ``disp`` argument
        warnings.simplefilter("ignore", DeprecationWarning)
        return calculate_frechet_distance(features_a.mean(0), np.cov(features_a, rowvar=False),
                                          features_b.mean(0), np.cov(features_b, rowvar=False))


@pytest.mark.parametrize("count_a,count_b,dim", [(200, 150, 24), (20, 27, 48)])
def test_frechet_distance_matches_pytorch_fid(count_a, count_b, dim):
    rng = np.random.default_rng(count_a)
    features_a = rng.normal(size=(count_a, dim)) @ rng.normal(size=(dim, dim)) * 0.3
    features_b = rng.normal(size=(count_b, dim)) * 1.3 + 0.2
    reference = pytorch_fid_distance(features_a, features_b)
    statistics = (*gaussian_statistics(features_a), *gaussian_statistics(features_b))
    assert frechet_distance(*statistics) == pytest.approx(reference, rel=1e-6)
    # the N < D shortcut (nuclear norm of the small cross matrix) and the D×D path agree too
    assert frechet_distance_of_features(features_a, features_b) == pytest.approx(reference, rel=1e-6)


def test_frechet_distance_is_zero_for_identical_statistics_and_grows_with_a_shift():
    features = np.random.default_rng(5).normal(size=(100, 16))
    assert abs(frechet_distance_of_features(features, features)) < 1e-8
    # shifting every dimension by 1 adds exactly |shift|² = 16
    assert frechet_distance_of_features(features, features + 1.0) == pytest.approx(16.0, rel=1e-9)


def explicit_unbiased_mmd2(x, y):
    """Bińkowski et al.'s unbiased estimator written as plain loops (independent of bench.metrics.functional)."""
    m, d = x.shape
    k = lambda u, v: (u @ v / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_on_the_full_set_equals_the_explicit_estimator():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.5
    mean, std = kid(x, y, num_subsets=1, subset_size=12)  # one subset = every sample, permuted
    assert mean == pytest.approx(explicit_unbiased_mmd2(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(400, 32)), rng.normal(size=(300, 32))
    same_mean, same_std = kid(x, y, num_subsets=50, subset_size=200)
    shifted_mean, shifted_std = kid(x, y + 0.5, num_subsets=50, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 10 * max(abs(same_mean), same_std)
    assert shifted_mean > 3 * shifted_std


def test_kid_is_seeded_and_clips_the_subset_size():
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(30, 8)), rng.normal(size=(25, 8))
    first = kid(x, y, num_subsets=20, subset_size=1000, seed=4)
    assert first == kid(x, y, num_subsets=20, subset_size=1000, seed=4)
    assert first != kid(x, y, num_subsets=20, subset_size=1000, seed=5)
    # the precomputed-kernel path and the per-subset path give the same numbers
    per_subset = kid(x, y, num_subsets=20, subset_size=1000, seed=4, full_kernel_max_entries=0)
    assert per_subset == pytest.approx(first, rel=1e-10, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        kid(x[:1], y, num_subsets=2)
