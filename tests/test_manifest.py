"""The frozen test protocol: determinism, reuse, checksum verification, NVIDIA folders."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bench.data.manifest
from bench.data.datasets import load_image_set
from bench.errors import UserError
from bench.data.manifest import (MANIFEST_CSV, MANIFEST_JSON, PROTOCOL_VERSION, MaskProtocol, build_manifest,
                            load_manifest, mask_seed)
from bench.data.masks import MaskResizedWarning, hole_ratio, in_bin, read_mask

SIZE = 32
SIX_BINS = ("(0.0,0.1]", "(0.1,0.2]", "(0.2,0.3]", "(0.3,0.4]", "(0.4,0.5]", "(0.5,0.6]")


def make_images(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        shape = (40, 48, 3) if index % 2 else (36, 36, 3)
        pixels = np.random.default_rng(index).integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo_{index}.png")
    return folder


def image_set(folder: Path):
    return load_image_set("folder", "test", root=folder, image_size=SIZE)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def quiet_read_mask(path, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskResizedWarning)
        return read_mask(path, size)


@pytest.fixture
def photos(tmp_path):
    return make_images(tmp_path / "photos")


# ----------------------------------------------------------------------------- free-form manifests
def test_freeform_pairs_lie_in_their_bins_and_match_their_files(photos, tmp_path):
    protocol = MaskProtocol(masks_per_bin=2, seed=4)
    manifest = build_manifest(image_set(photos), protocol, tmp_path / "out")
    assert len(manifest.pairs) == 3 * 6 * 2
    assert len({pair.pair_id for pair in manifest.pairs}) == len(manifest.pairs)
    assert len({pair.mask_seed for pair in manifest.pairs}) == len(manifest.pairs)
    assert manifest.counts_per_bin() == {**{label: 6 for label in SIX_BINS}, "All": 36}
    for pair in manifest.pairs:
        mask_file = manifest.mask_path(pair)
        assert mask_file.parent == tmp_path / "out" / "masks"
        mask = read_mask(mask_file, SIZE)
        assert hole_ratio(mask) == pair.ratio and in_bin(pair.ratio, pair.bin)
        assert pair.mask_sha256 == sha256(mask_file)
        assert pair.image_sha256 == sha256(manifest.image_path(pair))
        assert manifest.image_path(pair) == photos / pair.image
        assert pair.mask_seed == mask_seed(4, pair.image, pair.bin, int(pair.pair_id.rsplit("_", 1)[1]))
        assert json.loads(pair.generator) == {"algorithm": "sahn-bench-freeform/1", "preset": "deepfill",
                                              "reference_size": 256}
        np.testing.assert_array_equal(manifest.read_mask(pair), mask)
    paper = manifest.counts_per_bin(("(0.2,0.4]", "(0.4,0.6]", "All"))
    assert paper == {"(0.2,0.4]": 12, "(0.4,0.6]": 12, "All": 36}


def test_manifest_files_are_byte_identical_across_folders(photos, tmp_path):
    first = build_manifest(image_set(photos), MaskProtocol(preset="medium"), tmp_path / "a")
    second = build_manifest(image_set(photos), MaskProtocol(preset="medium"), tmp_path / "b")
    for name in (MANIFEST_CSV, MANIFEST_JSON):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for pair in first.pairs:
        assert first.mask_path(pair).read_bytes() == second.mask_path(pair).read_bytes()
    assert first.digest() == second.digest()
    record = json.loads((tmp_path / "a" / MANIFEST_JSON).read_text())
    assert record["protocol_version"] == PROTOCOL_VERSION
    assert record["image_size"] == SIZE and record["crop"] == "center"
    assert record["dataset"]["digest"] == image_set(photos).digest()
    assert str(tmp_path / "a") not in (tmp_path / "a" / MANIFEST_JSON).read_text()


def test_a_mask_depends_only_on_its_image_bin_and_seed(tmp_path):
    photos = make_images(tmp_path / "photos", count=2)
    two = build_manifest(image_set(photos), MaskProtocol(), tmp_path / "two")
    make_images(photos, count=3)
    three = build_manifest(image_set(photos), MaskProtocol(), tmp_path / "three")
    shared = {(p.image, p.bin): p.mask_sha256 for p in two.pairs}
    assert shared == {(p.image, p.bin): p.mask_sha256 for p in three.pairs if (p.image, p.bin) in shared}
    reseeded = build_manifest(image_set(photos), MaskProtocol(seed=1), tmp_path / "reseeded")
    assert reseeded.digest() != three.digest()
    assert all(a.mask_sha256 != b.mask_sha256 for a, b in zip(three.pairs, reseeded.pairs))


def test_load_manifest_reads_back_exactly_what_was_built(photos, tmp_path):
    built = build_manifest(image_set(photos), MaskProtocol(bins=("(0.2,0.3]", "All")), tmp_path / "out")
    loaded = load_manifest(tmp_path / "out")
    assert loaded.pairs == built.pairs
    assert loaded.digest() == built.digest()
    assert loaded.protocol == MaskProtocol(bins=("(0.2,0.3]", "All"))
    assert loaded.image_size == SIZE and loaded.crop == "center"


def test_rebuilding_reuses_the_manifest_without_regenerating(photos, tmp_path, monkeypatch):
    built = build_manifest(image_set(photos), MaskProtocol(), tmp_path / "out")
    stamps = {path: path.stat().st_mtime_ns for path in (tmp_path / "out").rglob("*") if path.is_file()}

    def refuse(*args, **kwargs):
        raise AssertionError("a reused manifest must not draw masks again")

    monkeypatch.setattr(bench.data.manifest, "generate_mask_in_bin", refuse)
    reused = build_manifest(image_set(photos), MaskProtocol(), tmp_path / "out")
    assert reused.pairs == built.pairs
    assert stamps == {path: path.stat().st_mtime_ns for path in (tmp_path / "out").rglob("*") if path.is_file()}


@pytest.mark.parametrize("change", ["seed", "preset", "bins", "size"])
def test_rebuilding_with_another_protocol_or_dataset_is_refused(photos, tmp_path, change):
    build_manifest(image_set(photos), MaskProtocol(), tmp_path / "out")
    protocol = {"seed": MaskProtocol(seed=1), "preset": MaskProtocol(preset="thin"),
                "bins": MaskProtocol(bins=SIX_BINS[:3]), "size": MaskProtocol()}[change]
    images = load_image_set("folder", "test", root=photos, image_size=SIZE * 2) if change == "size" else image_set(photos)
    with pytest.raises(UserError, match="different protocol or data set.*another output folder"):
        build_manifest(images, protocol, tmp_path / "out")


def test_a_changed_image_is_detected_by_checksum(photos, tmp_path):
    manifest = build_manifest(image_set(photos), MaskProtocol(), tmp_path / "out")
    target = photos / "photo_1.png"
    pixels = np.asarray(Image.open(target)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(target)
    with pytest.raises(UserError, match="photo_1.png: image changed"):
        manifest.verify()
    with pytest.raises(UserError, match="photo_1.png: image changed"):
        build_manifest(image_set(photos), MaskProtocol(), tmp_path / "out")


def test_a_changed_or_missing_mask_is_detected_by_checksum(photos, tmp_path):
    manifest = build_manifest(image_set(photos), MaskProtocol(), tmp_path / "out")
    pair = manifest.pairs[4]
    mask_file = manifest.mask_path(pair)
    mask = read_mask(mask_file, SIZE)
    mask[0, 0] ^= 1
    Image.fromarray(mask * 255).save(mask_file)
    with pytest.raises(UserError, match=f"{mask_file.name}: hole ratio .* was frozen for pair {pair.pair_id}"):
        manifest.read_mask(pair)
    with pytest.raises(UserError, match=f"{mask_file.name}: mask changed"):
        load_manifest(tmp_path / "out").verify()
    mask_file.unlink()
    with pytest.raises(UserError, match=f"{mask_file.name}: mask of test pair {pair.pair_id} is missing"):
        manifest.verify()


def test_verify_passes_on_an_untouched_manifest(photos, tmp_path):
    manifest = build_manifest(image_set(photos), MaskProtocol(), tmp_path / "out")
    assert load_manifest(tmp_path / "out").verify().pairs == manifest.pairs


def test_bad_protocols_and_missing_manifests_are_user_errors(photos, tmp_path):
    for protocol, message in ((MaskProtocol(source="random"), "unknown mask source"),
                              (MaskProtocol(bins=()), "at least one ratio bin"),
                              (MaskProtocol(bins=("(0.1,0.2]", "(0.1,0.2]")), "listed twice"),
                              (MaskProtocol(masks_per_bin=0), "masks_per_bin"),
                              (MaskProtocol(source="nvidia"), "needs the folder")):
        with pytest.raises(UserError, match=message):
            build_manifest(image_set(photos), protocol, tmp_path / "out")
    with pytest.raises(UserError, match="manifest.json: missing"):
        load_manifest(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- NVIDIA manifests
def make_nvidia_folder(folder: Path, size: int = 64) -> dict[str, int]:
    """Full-width bands starting at an even row: their ratio (rows / size) survives halving the size."""
    folder.mkdir()
    rows = {"00000.png": 4, "00001.png": 2, "00002.png": 10, "00003.png": 16, "00004.png": 18, "00005.png": 50}
    for name, count in rows.items():
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[6:6 + count, :] = 255
        Image.fromarray(mask, "L").save(folder / name)
    return rows


def test_nvidia_pairs_use_the_folder_files_in_their_measured_bins(photos, tmp_path):
    make_nvidia_folder(tmp_path / "nvidia")
    protocol = MaskProtocol(source="nvidia", folder=str(tmp_path / "nvidia"), bins=("(0.0,0.1]", "(0.2,0.3]"))
    with pytest.warns(MaskResizedWarning):
        manifest = build_manifest(image_set(photos), protocol, tmp_path / "out")
    assert manifest.counts_per_bin() == {"(0.0,0.1]": 3, "(0.2,0.3]": 3, "All": 6}
    for pair in manifest.pairs:
        path = manifest.mask_path(pair)
        assert path.parent == tmp_path / "nvidia"
        assert pair.mask_seed is None and pair.generator == ""
        assert pair.mask_sha256 == sha256(path)
        assert pair.ratio == hole_ratio(quiet_read_mask(path, SIZE)) and in_bin(pair.ratio, pair.bin)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the resize was measured when freezing: no warning per pair
            np.testing.assert_array_equal(manifest.read_mask(pair), quiet_read_mask(path, SIZE))
    low = [pair.mask for pair in manifest.pairs if pair.bin == "(0.0,0.1]"]
    assert sorted(set(low)) == ["00000.png", "00001.png"]  # two candidates for three images: both used
    assert low[0] != low[1]  # no repeat until every candidate was used
    assert {pair.mask for pair in manifest.pairs if pair.bin == "(0.2,0.3]"} == {"00003.png", "00004.png"}
    record = json.loads((tmp_path / "out" / MANIFEST_JSON).read_text())
    assert record["nvidia"]["files"] == 6 and record["nvidia"]["outside_requested_bins"] == 2


def test_nvidia_manifest_is_deterministic_and_verified(photos, tmp_path):
    make_nvidia_folder(tmp_path / "nvidia")
    protocol = MaskProtocol(source="nvidia", folder=str(tmp_path / "nvidia"), bins=("(0.0,0.1]",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskResizedWarning)
        build_manifest(image_set(photos), protocol, tmp_path / "a")
        build_manifest(image_set(photos), protocol, tmp_path / "b")
    assert (tmp_path / "a" / MANIFEST_CSV).read_bytes() == (tmp_path / "b" / MANIFEST_CSV).read_bytes()
    Image.fromarray(np.full((64, 64), 255, np.uint8), "L").save(tmp_path / "nvidia" / "00001.png")
    with pytest.raises(UserError, match="00001.png: mask changed"):
        load_manifest(tmp_path / "a").verify()


def test_nvidia_bins_without_masks_and_missing_folders_are_user_errors(photos, tmp_path):
    make_nvidia_folder(tmp_path / "nvidia")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskResizedWarning)
        with pytest.raises(UserError, match=r"no mask has a hole ratio in \(0.4,0.5\]"):
            build_manifest(image_set(photos), MaskProtocol(source="nvidia", folder=str(tmp_path / "nvidia"),
                                                           bins=("(0.4,0.5]",)), tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        build_manifest(image_set(photos), MaskProtocol(source="nvidia", folder=str(tmp_path / "absent")),
                       tmp_path / "out2")
    assert not (tmp_path / "out" / MANIFEST_JSON).exists()
