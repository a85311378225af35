"""Ratio bins, reading mask files, the seeded free-form generator, NVIDIA folders, training masks."""
from __future__ import annotations

import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.errors import UserError
from bench.data.masks import (PAPER_BINS, PRESETS, RATIO_BINS, FreeFormConfig, MaskNotBinaryWarning, MaskResizedWarning,
                         TrainMaskSampler, _preset_shapes, bin_label, generate_mask, generate_mask_in_bin, hole_ratio,
                         in_bin, nvidia_bin, nvidia_mask_set, parse_bin, read_mask)

SIX_BINS = ("(0.0,0.1]", "(0.1,0.2]", "(0.2,0.3]", "(0.3,0.4]", "(0.4,0.5]", "(0.5,0.6]")


def save_grey(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8), "L").save(path)
    return path


def square_mask(size, top, left, side):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top:top + side, left:left + side] = 1
    return mask


# ----------------------------------------------------------------------------- bins
def test_bin_labels_are_the_six_nvidia_bins_and_round_trip():
    assert tuple(bin_label(lo, hi) for lo, hi in RATIO_BINS) == SIX_BINS
    assert PAPER_BINS == ("(0.2,0.4]", "(0.4,0.6]", "All")
    for label in SIX_BINS + PAPER_BINS[:2]:
        assert bin_label(*parse_bin(label)) == label
    assert parse_bin("All") == (0.0, 1.0)
    assert parse_bin(" ( 0.25 , 0.5 ] ") == (0.25, 0.5)
    assert bin_label(0.25, 1) == "(0.25,1.0]"


@pytest.mark.parametrize("label", ["[0.1,0.2]", "(0.2,0.1]", "(0.1,1.5]", "0.1-0.2", "(a,b]", ""])
def test_malformed_bins_are_user_errors(label):
    with pytest.raises(UserError, match="ratio bin"):
        parse_bin(label)


def test_exact_boundaries_fall_in_the_lower_half_open_bin():
    assert nvidia_bin(20 / 100) == "(0.1,0.2]"
    mask = np.zeros(100, dtype=np.uint8)
    mask[:20] = 1
    assert hole_ratio(mask) == 0.2
    assert in_bin(hole_ratio(mask), "(0.1,0.2]") and not in_bin(hole_ratio(mask), "(0.2,0.3]")
    assert nvidia_bin(0.1) == "(0.0,0.1]"
    assert nvidia_bin(0.6) == "(0.5,0.6]"
    assert nvidia_bin(0.0) is None and nvidia_bin(61 / 100) is None
    assert in_bin(0.4, "(0.2,0.4]") and not in_bin(0.4, "(0.4,0.6]")
    assert in_bin(1.0, "All") and not in_bin(0.0, "All")


@pytest.mark.parametrize("pixels", [100, 1000, 64 * 64, 250 * 250, 256 * 256])
def test_float_bins_agree_with_exact_fractions_for_every_hole_count(pixels):
    # Only counts next to a bin edge can be misfiled; check every one of them against exact arithmetic.
    near_edges = {k * pixels // 10 + offset for k in range(8) for offset in range(-3, 4)}
    for count in sorted(c for c in near_edges if 0 <= c <= pixels):
        exact = Fraction(count, pixels)
        index = next((k for k in range(6) if Fraction(k, 10) < exact <= Fraction(k + 1, 10)), None)
        assert nvidia_bin(count / pixels) == (None if index is None else SIX_BINS[index]), count


# ----------------------------------------------------------------------------- reading
def test_white_is_hole_in_every_mode(tmp_path):
    mask = square_mask(16, 3, 5, 6)
    grey = mask * 255
    save_grey(tmp_path / "l.png", grey)
    Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB").save(tmp_path / "rgb.png")
    rgba = np.dstack([np.repeat(grey[:, :, None], 3, axis=2), np.full((16, 16), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")  # alpha must not matter
    Image.fromarray(grey, "L").convert("1").save(tmp_path / "one.png")
    Image.fromarray(mask.astype(np.uint16) * 65535).save(tmp_path / "sixteen.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("l.png", "rgb.png", "rgba.png", "one.png", "sixteen.png"):
            read = read_mask(tmp_path / name, 16)
            assert read.dtype == np.uint8 and read.shape == (16, 16)
            np.testing.assert_array_equal(read, mask, err_msg=name)


def test_jpeg_mask_is_binarised_with_a_warning_naming_the_file(tmp_path):
    path = tmp_path / "stroke.jpg"
    Image.fromarray(square_mask(32, 4, 4, 20) * 255, "L").save(path, quality=60)
    with pytest.warns(MaskNotBinaryWarning, match="stroke.jpg"):
        read = read_mask(path, 32)
    assert set(np.unique(read)) <= {0, 1}
    decoded = np.asarray(Image.open(path), dtype=np.float64)
    np.testing.assert_array_equal(read, (decoded >= 127.5).astype(np.uint8))


def test_zero_one_coded_mask_reads_one_as_hole_with_a_warning(tmp_path):
    mask = square_mask(16, 2, 2, 4)
    path = save_grey(tmp_path / "zero_one.png", mask)
    with pytest.warns(MaskNotBinaryWarning, match="zero_one.png"):
        np.testing.assert_array_equal(read_mask(path, 16), mask)


def test_resize_is_nearest_and_warns_and_ratio_is_measured_after_it(tmp_path):
    small = (np.random.default_rng(0).random((16, 16)) < 0.3).astype(np.uint8)
    big = np.kron(small, np.ones((4, 4), dtype=np.uint8))  # every 4x4 block is one pixel of `small`
    path = save_grey(tmp_path / "big.png", big * 255)
    with pytest.warns(MaskResizedWarning, match="big.png"):
        np.testing.assert_array_equal(read_mask(path, 16), small)
    # one hole pixel of a 4x4 file lands on pixel (0, 0) of its 2x2 nearest-neighbour version
    single = np.zeros((4, 4), dtype=np.uint8)
    single[1, 1] = 255
    with pytest.warns(MaskResizedWarning):
        resized = read_mask(save_grey(tmp_path / "single.png", single), 2)
    assert hole_ratio(resized) == 0.25 and resized[0, 0] == 1


def test_non_square_mask_is_refused(tmp_path):
    path = save_grey(tmp_path / "wide.png", np.zeros((16, 24)))
    with pytest.raises(UserError, match="wide.png.*not square"):
        read_mask(path, 16)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_corrupt_or_empty_mask_is_a_user_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    if content == "truncated":
        save_grey(path, np.random.default_rng(1).integers(0, 2, (64, 64)) * 255)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(UserError, match="bad.png"):
        read_mask(path, 64)


def test_missing_mask_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nothing.png.*does not exist"):
        read_mask(tmp_path / "nothing.png", 8)


# ----------------------------------------------------------------------------- generator
def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="unknown free-form mask preset"):
        FreeFormConfig("huge")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_generate_mask_is_deterministic_binary_and_seed_dependent(preset):
    config = FreeFormConfig(preset)
    first = [generate_mask(48, np.random.default_rng(5), config) for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    assert first[0].dtype == np.uint8 and first[0].shape == (48, 48) and set(np.unique(first[0])) <= {0, 1}
    others = [generate_mask(48, np.random.default_rng(seed), config) for seed in range(6, 10)]
    assert any(not np.array_equal(first[0], other) for other in others)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_generated_mask_lies_in_its_requested_bin(preset):
    config = FreeFormConfig(preset)
    for label in SIX_BINS + ("All",):
        for seed in (0, 1):
            mask, ratio = generate_mask_in_bin(64, label, seed, config)
            assert ratio == hole_ratio(mask) and in_bin(ratio, label), (preset, label, seed, ratio)
            again, _ = generate_mask_in_bin(64, label, seed, config)
            np.testing.assert_array_equal(mask, again)


def test_unreachable_bins_and_exhausted_tries_are_clear_errors():
    with pytest.raises(UserError, match=r"no 4x4 mask can have a hole ratio in \(0.5,0.55\]"):
        generate_mask_in_bin(4, "(0.5,0.55]", 0)  # 8/16 = 0.5 and 9/16 = 0.5625 both miss the bin
    with pytest.raises(UserError, match="could not draw"):  # a DeepFill stroke never covers only 4 of 4096 pixels
        generate_mask_in_bin(64, "(0.0,0.001]", 0, FreeFormConfig("deepfill"), max_tries=5)


def _primitive_widths(shape):
    return {primitive[2] for primitive in shape if primitive[0] in ("line", "disc")}


def test_deepfill_preset_follows_the_documented_parameters_at_256():
    stroke_counts, vertex_counts, widths = set(), set(), set()
    for seed in range(300):
        shapes = list(_preset_shapes(256, np.random.default_rng(seed), FreeFormConfig("deepfill")))
        stroke_counts.add(len(shapes))
        for shape in shapes:
            polyline = [primitive for primitive in shape if primitive[0] == "line"]
            assert len(polyline) == 1
            vertex_counts.add(len(polyline[0][1]) - 1)  # steps after the start point
            widths |= _primitive_widths(shape)
    assert stroke_counts == {1, 2, 3}
    assert vertex_counts == set(range(4, 12))
    assert min(widths) >= 12 and max(widths) <= 39 and len(widths) > 20


def test_lama_thin_preset_follows_the_documented_parameters_at_256():
    stroke_counts, segment_counts, widths = set(), set(), set()
    for seed in range(200):
        shapes = list(_preset_shapes(256, np.random.default_rng(seed), FreeFormConfig("thin")))
        stroke_counts.add(len(shapes))
        for shape in shapes:
            segment_counts.add(sum(primitive[0] == "line" for primitive in shape))
            widths |= _primitive_widths(shape)
    assert min(stroke_counts) >= 4 and max(stroke_counts) <= 50
    assert segment_counts == {1, 2, 3, 4, 5}
    assert widths == set(range(5, 15))


def test_lengths_scale_with_size_so_hole_ratios_are_alike():
    config = FreeFormConfig("deepfill")
    means = {size: np.mean([hole_ratio(generate_mask(size, np.random.default_rng(seed), config))
                            for seed in range(150)]) for size in (64, 128)}
    assert abs(means[64] - means[128]) < 0.03


# ----------------------------------------------------------------------------- training sampler
def test_train_sampler_batches_are_binary_bounded_and_seeded():
    sampler = TrainMaskSampler(32, seed=3, config=FreeFormConfig("thick"), max_ratio=0.5)
    batch = sampler.sample(6)
    assert batch.dtype == torch.float32 and batch.shape == (6, 1, 32, 32)
    assert set(torch.unique(batch).tolist()) <= {0.0, 1.0}
    ratios = batch.mean(dim=(1, 2, 3))
    assert bool(((ratios > 0) & (ratios <= 0.5)).all())
    assert torch.equal(TrainMaskSampler(32, seed=3, config=FreeFormConfig("thick"), max_ratio=0.5).sample(6), batch)
    assert not torch.equal(TrainMaskSampler(32, seed=4, config=FreeFormConfig("thick"), max_ratio=0.5).sample(6), batch)
    assert not torch.equal(sampler.sample(6), batch)  # the next batch is a new draw


def test_train_sampler_resumes_bit_identically():
    uninterrupted = TrainMaskSampler(32, seed=9)
    batches = [uninterrupted.sample(4) for _ in range(3)]
    first = TrainMaskSampler(32, seed=9)
    first.sample(4)
    state = first.state_dict()
    resumed = TrainMaskSampler(32, seed=9)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.sample(4), batches[1])
    assert torch.equal(resumed.sample(4), batches[2])
    with pytest.raises(UserError, match="seed"):
        TrainMaskSampler(32, seed=10).load_state_dict(state)


# ----------------------------------------------------------------------------- NVIDIA folders
def _fake_nvidia_folder(folder, size=64):
    """Masks whose ratios are known by construction: a k-row band covers k/size of the image."""
    folder.mkdir()
    rows = {"00000.png": 4, "00001.png": 10, "00002.png": 16, "00003.png": 26, "00004.png": 45}
    for name, count in rows.items():
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[10:10 + count, :] = 255  # full-width band: touches the left and right border
        save_grey(folder / name, mask)
    inner = np.zeros((size, size), dtype=np.uint8)
    inner[20:28, 20:28] = 255  # away from the border
    save_grey(folder / "00005.png", inner)
    return {name: count / size for name, count in rows.items()} | {"00005.png": 64 / size ** 2}


def test_nvidia_folder_bins_ratios_and_border_come_from_each_file(tmp_path):
    ratios = _fake_nvidia_folder(tmp_path / "masks")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = nvidia_mask_set(tmp_path / "masks")
    assert [Path(m.path).name for m in masks] == sorted(ratios)
    for mask in masks:
        name = Path(mask.path).name
        assert mask.ratio == ratios[name]
        assert mask.bin_label == nvidia_bin(ratios[name])
        assert mask.border == (name != "00005.png")
    assert masks[4].bin_label is None  # 45/64 > 0.6


def test_nvidia_folder_resizing_warns_once_and_measures_after_resize(tmp_path):
    ratios = _fake_nvidia_folder(tmp_path / "masks")
    with pytest.warns(MaskResizedWarning) as caught:
        masks = nvidia_mask_set(tmp_path / "masks", size=32)
    assert len([w for w in caught if issubclass(w.category, MaskResizedWarning)]) == 1
    for mask in masks:
        assert mask.ratio == hole_ratio(read_mask_quietly(mask.path, 32))
    assert masks[0].ratio == ratios["00000.png"]  # even-aligned bands keep their ratio at half size


def read_mask_quietly(path, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskResizedWarning)
        return read_mask(path, size)


def test_missing_or_empty_nvidia_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        nvidia_mask_set(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no mask images"):
        nvidia_mask_set(tmp_path / "empty")
