"""Summaries per ratio bin (means, N, set-level FID/KID), the paired bootstrap, and feature files."""
import math
import os
import warnings

import numpy as np
import pandas as pd
import pytest
from pytorch_fid.fid_score import calculate_frechet_distance

from bench.metrics.aggregate import (DEFAULT_BINS, bin_members, load_features, paired_bootstrap, save_features,
                             summarize)
from bench.errors import UserError
from bench.metrics.functional import kid

# Seven pairs; the bin of each is read off by hand from the half-open rule (a, b].
RATIOS = [0.05, 0.1, 0.2, 0.25, 0.4, 0.45, 0.6]
PSNR = [40.0, 38.0, 30.0, 28.0, 24.0, 22.0, 18.0]
SSIM = [0.99, 0.98, 0.9, 0.88, 0.8, 0.78, 0.7]
EXPECTED_MEMBERS = {  # indices of RATIOS in each bin
    "(0.0,0.1]": [0, 1], "(0.1,0.2]": [2], "(0.2,0.3]": [3], "(0.3,0.4]": [4], "(0.4,0.5]": [5],
    "(0.5,0.6]": [6], "(0.2,0.4]": [3, 4], "(0.4,0.6]": [5, 6], "All": [0, 1, 2, 3, 4, 5, 6],
}


def per_image_frame():
    return pd.DataFrame({"pair_id": [f"p{i}" for i in range(7)], "ratio": RATIOS, "psnr": PSNR, "ssim": SSIM,
                         "seed": range(7)})


def value(summary, label, metric):
    row = summary[(summary["bin"] == label) & (summary["metric"] == metric)]
    assert len(row) == 1, (label, metric)
    return row["value"].item(), row["n"].item()


def test_bins_are_half_open_and_all_takes_every_pair():
    for label, members in EXPECTED_MEMBERS.items():
        assert list(np.flatnonzero(bin_members(RATIOS, label))) == members, label
    with pytest.raises(UserError, match="half-open"):
        bin_members(RATIOS, "[0.1,0.2]")


def test_summary_means_and_counts_per_bin():
    summary = summarize(per_image_frame())
    assert list(summary.columns) == ["bin", "metric", "value", "n"]
    assert list(dict.fromkeys(summary["bin"])) == list(DEFAULT_BINS)
    assert set(summary["metric"]) == {"psnr", "ssim"}  # 'seed' and 'ratio' are not metrics
    for label, members in EXPECTED_MEMBERS.items():
        assert value(summary, label, "psnr") == (pytest.approx(np.mean([PSNR[i] for i in members])), len(members))
        assert value(summary, label, "ssim")[0] == pytest.approx(np.mean([SSIM[i] for i in members]))


def test_an_empty_bin_has_nan_and_n_zero():
    summary = summarize(per_image_frame(), bins=("(0.6,0.7]", "All"))
    empty_value, empty_n = value(summary, "(0.6,0.7]", "psnr")
    assert math.isnan(empty_value) and empty_n == 0
    assert value(summary, "All", "psnr")[1] == 7


def reference_fid(pred, truth):
    with warnings.catch_warnings():  # pytorch-fid passes scipy's deprecated ``disp`` argument
        warnings.simplefilter("ignore", DeprecationWarning)
        return calculate_frechet_distance(pred.mean(0), np.cov(pred, rowvar=False),
                                          truth.mean(0), np.cov(truth, rowvar=False))


def test_set_level_metrics_per_bin_compare_each_bins_composites_with_its_ground_truths():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(7, 3))
    pred = truth + rng.normal(scale=0.5, size=(7, 3)) + 0.3
    features = {"pred/inception_v3_fid": pred, "gt/inception_v3_fid": truth,
                "pred/efficientnet_lite0": pred * 2, "gt/efficientnet_lite0": truth * 2}
    summary = summarize(per_image_frame(), features, kid_subsets=5)
    for label, members in EXPECTED_MEMBERS.items():
        fid, n = value(summary, label, "FID")
        assert n == len(members)
        if len(members) < 2:
            assert math.isnan(fid) and math.isnan(value(summary, label, "KID")[0])
            continue
        assert fid == pytest.approx(reference_fid(pred[members], truth[members]), rel=1e-6, abs=1e-9)
        assert value(summary, label, "FD_lite0")[0] == pytest.approx(
            reference_fid(2 * pred[members], 2 * truth[members]), rel=1e-6, abs=1e-9)
        expected_kid = kid(pred[members], truth[members], num_subsets=5, seed=0)
        assert (value(summary, label, "KID")[0], value(summary, label, "KID_std")[0]) == pytest.approx(expected_kid)
    assert {"FID", "KID", "KID_std", "FD_lite0", "KID_lite0", "KID_lite0_std"} <= set(summary["metric"])


def test_features_must_have_one_row_per_pair():
    features = {"pred/efficientnet_lite0": np.zeros((6, 4)), "gt/efficientnet_lite0": np.zeros((6, 4))}
    with pytest.raises(ValueError, match="6 rows for 7"):
        summarize(per_image_frame(), features)


def test_paired_bootstrap_of_a_constant_difference_is_that_constant():
    a = np.linspace(20, 30, 50)
    assert paired_bootstrap(a + 0.5, a) == pytest.approx((0.5, 0.5, 0.5))


def test_paired_bootstrap_interval_matches_the_normal_approximation_and_is_seeded():
    rng = np.random.default_rng(1)
    b = rng.normal(25, 3, size=400)
    a = b + rng.normal(0.2, 1.0, size=400)  # a better by 0.2 on average, noisy per pair
    mean, low, high = paired_bootstrap(a, b, num_samples=2000, seed=3)
    differences = a - b
    half_width = 1.959964 * differences.std(ddof=1) / np.sqrt(len(differences))
    assert mean == pytest.approx(differences.mean())
    assert low < mean < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)
    assert paired_bootstrap(a, b, num_samples=2000, seed=3) == (mean, low, high)
    # pairing matters: the per-image spread of b (3.0) dwarfs that of the differences (1.0)
    unpaired_half_width = 1.959964 * np.sqrt(a.var(ddof=1) + b.var(ddof=1)) / np.sqrt(len(a))
    assert (high - low) / 2 < 0.5 * unpaired_half_width


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_bootstrap(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap(np.array([1.0, np.nan]), np.ones(2))


def test_features_round_trip_atomically(tmp_path):
    features = {"pred/efficientnet_lite0": np.arange(12.0).reshape(3, 4), "gt/inception_v3_fid": np.ones((3, 2))}
    path = tmp_path / "cell" / "features.npz"
    save_features(path, features)
    assert os.listdir(path.parent) == ["features.npz"]  # no temporary file left behind
    loaded = load_features(path)
    assert set(loaded) == set(features)
    for key, array in features.items():
        np.testing.assert_array_equal(loaded[key], array)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="garbage.npz"):
        load_features(tmp_path / "garbage.npz")
