"""bench.data.datasets: every real layout, built in tmp_path from tiny generated images, loads the right splits."""
from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data.datasets import (CELEBA_LAYOUT, PARIS_LAYOUT, PLACES2_LAYOUT, ImageDataset, load_image_set, validate,
                            write_split_manifest)
from bench.errors import UserError
from bench.data.images import write_png


def _image(path: Path, seed: int = 0, height: int = 12, width: int = 10) -> Path:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, format="JPEG")
    else:
        write_png(path, array)
    return path


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return path


def _names(image_set) -> list[str]:
    return [Path(path).name for path in image_set.paths]


# ----------------------------------------------------------------------------- CelebA
def _celeba(root: Path) -> Path:
    for number in range(1, 7):
        _image(root / "img_align_celeba" / f"{number:06d}.jpg", seed=number, height=22, width=18)
    _image(root / "img_align_celeba" / "999999.jpg")  # not in the partition: ignored
    # deliberately unsorted lines: the order must come from sorting, not from the file
    (root / "list_eval_partition.txt").write_text(
        "000005.jpg 2\n000001.jpg 0\n000003.jpg 1\n000002.jpg 0\n000006.jpg 2\n000004.jpg 2\n")
    return root


def test_celeba_uses_the_official_partition_sorted(tmp_path):
    root = _celeba(tmp_path / "celeba")
    expected = {"train": ["000001.jpg", "000002.jpg"], "val": ["000003.jpg"],
                "test": ["000004.jpg", "000005.jpg", "000006.jpg"]}
    for split, names in expected.items():
        image_set = load_image_set("celeba", split, root=root, image_size=16)
        assert _names(image_set) == names
        assert image_set.crop == "celeba" and image_set.split == split and image_set.name == "celeba"
        assert [item.source for item in image_set.items] == [Path(name).stem for name in names]
    assert load_image_set("celeba", "test", root=root, image_size=16).read(0).shape == (16, 16, 3)


def test_celeba_kaggle_layout_is_accepted(tmp_path):
    root = tmp_path / "kaggle"
    for number in (1, 2):
        _image(root / "img_align_celeba" / "img_align_celeba" / f"{number:06d}.jpg", seed=number)
    (root / "list_eval_partition.csv").write_text("image_id,partition\n000001.jpg,0\n000002.jpg,2\n")
    assert _names(load_image_set("celeba", "test", root=root)) == ["000002.jpg"]


def test_celeba_missing_layout_names_the_expected_files(tmp_path):
    (tmp_path / "img_align_celeba").mkdir()
    with pytest.raises(UserError) as excinfo:
        load_image_set("celeba", "test", root=tmp_path)
    assert CELEBA_LAYOUT in str(excinfo.value)
    assert "CelebA expects <root>/img_align_celeba/ and <root>/list_eval_partition.txt" in str(excinfo.value)


def test_celeba_listed_but_missing_images_and_bad_lines_are_errors(tmp_path):
    root = _celeba(tmp_path / "celeba")
    (root / "img_align_celeba" / "000005.jpg").unlink()
    with pytest.raises(UserError, match=r"1 of the 3 test images .* missing \(first: 000005.jpg\)"):
        load_image_set("celeba", "test", root=root)
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg seven\n")
    with pytest.raises(UserError, match=r"list_eval_partition.txt:2:"):
        load_image_set("celeba", "train", root=root)


# ----------------------------------------------------------------------------- Paris StreetView
def _paris(root: Path, eval_folder: str = "paris_eval_gt") -> Path:
    for location in range(12):
        for heading in (0, 90):
            _image(root / "paris_train_original" / f"48.{location:04d}_2.{location:04d}_{heading}_-004.JPG",
                   seed=location * 10 + heading)
    for number in (3, 1, 2):
        _image(root / eval_folder / f"{number:03d}_im.png", seed=100 + number)
    return root


def test_paris_splits_carve_val_by_location_and_resize_whole_images(tmp_path):
    root = _paris(tmp_path / "paris")
    test = load_image_set("paris", "test", root=root)
    assert _names(test) == ["001_im.png", "002_im.png", "003_im.png"]
    assert test.crop == "resize"
    train = load_image_set("paris", "train", root=root)
    val = load_image_set("paris", "val", root=root)
    assert len(val) >= 2 and len(train) + len(val) == 24
    assert set(train.paths).isdisjoint(val.paths)
    # both headings of a location travel together
    assert {item.source for item in train.items}.isdisjoint(item.source for item in val.items)
    assert all(len([item for item in val.items if item.source == source]) == 2 for source in
               {item.source for item in val.items})
    assert train.paths == sorted(train.paths)
    assert load_image_set("paris", "val", root=root).paths == val.paths  # deterministic


def test_paris_nested_eval_folder_and_missing_layout(tmp_path):
    root = _paris(tmp_path / "paris", eval_folder="paris_eval/paris_eval_gt")
    assert len(load_image_set("paris", "test", root=root)) == 3
    with pytest.raises(UserError) as excinfo:
        load_image_set("paris", "test", root=tmp_path / "empty")
    assert PARIS_LAYOUT in str(excinfo.value)


# ----------------------------------------------------------------------------- Places2
def test_places2_standard_layout(tmp_path):
    root = tmp_path / "places"
    standard = root / "places365_standard"
    for category in ("airfield", "bakery"):
        for number in range(1, 6):
            # the same file names repeat in every category, as in the real release
            _image(standard / "train" / category / f"{number:08d}.jpg", seed=number)
        _image(standard / "val" / category / "00000001.jpg", seed=50)
    test = load_image_set("places2", "test", root=root)
    assert [Path(path).relative_to(standard / "val").as_posix() for path in test.paths] == \
        ["airfield/00000001.jpg", "bakery/00000001.jpg"]
    assert len({item.source for item in test.items}) == 2 and test.crop == "center"
    train, val = (load_image_set("places2", split, root=root) for split in ("train", "val"))
    assert len(train) + len(val) == 10 and len(val) >= 1
    assert set(train.paths).isdisjoint(val.paths)


def test_places2_256_layout_flat_and_nested(tmp_path):
    root = tmp_path / "places"
    _image(root / "data_256" / "a" / "airfield" / "00000001.jpg", seed=1)
    _image(root / "data_256" / "a" / "airfield" / "00000002.jpg", seed=2)
    _image(root / "data_256" / "b" / "bakery" / "00000001.jpg", seed=3)
    for number in (2, 1):
        _image(root / "val_256" / f"Places365_val_{number:08d}.jpg", seed=10 + number)
    assert _names(load_image_set("places2", "test", root=root)) == \
        ["Places365_val_00000001.jpg", "Places365_val_00000002.jpg"]
    assert len(load_image_set("places2", "train", root=root)) + len(load_image_set("places2", "val", root=root)) == 3


def test_places2_missing_layout(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_image_set("places2", "test", root=tmp_path)
    assert PLACES2_LAYOUT in str(excinfo.value)


# ----------------------------------------------------------------------------- any folder
def test_folder_is_recursive_case_insensitive_and_test_only(tmp_path):
    root = tmp_path / "photos"
    _image(root / "b.PNG", seed=1)
    _image(root / "a.JpG", seed=2)
    _image(root / "sub" / "c.jpeg", seed=3)
    _image(root / ".hidden.png", seed=4)
    (root / "notes.txt").write_text("not an image")
    image_set = load_image_set("folder", "test", root=root)
    assert [Path(path).relative_to(root).as_posix() for path in image_set.paths] == ["a.JpG", "b.PNG", "sub/c.jpeg"]
    assert image_set.name == "photos" and image_set.split == "test"
    with pytest.raises(UserError, match="test set only"):
        load_image_set("folder", "train", root=root)


def test_folder_with_split_subfolders(tmp_path):
    root = tmp_path / "mine"
    _image(root / "train" / "x.png", seed=1)
    _image(root / "test" / "y.png", seed=2)
    assert _names(load_image_set("folder", "train", root=root)) == ["x.png"]
    assert _names(load_image_set("folder", "test", root=root)) == ["y.png"]
    with pytest.raises(UserError, match="no val/"):
        load_image_set("folder", "val", root=root)


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        load_image_set("folder", "test", root=tmp_path / "empty")
    with pytest.raises(UserError, match="not a folder"):
        load_image_set("folder", "test", root=tmp_path / "absent")
    with pytest.raises(UserError, match="needs a root folder"):
        load_image_set("celeba", "test")
    with pytest.raises(UserError, match="unknown data set kind"):
        load_image_set("imagenet", "test", root=tmp_path)


# ----------------------------------------------------------------------------- ImageSet behaviour
def test_limit_keeps_the_first_items_in_sorted_order(tmp_path):
    root = tmp_path / "photos"
    for name in ("d", "b", "c", "a"):
        _image(root / f"{name}.png")
    assert _names(load_image_set("folder", "test", root=root, limit=2)) == ["a.png", "b.png"]


def test_digest_is_stable_across_locations_and_tracks_content(tmp_path):
    first = tmp_path / "one" / "photos"
    _image(first / "a.png", seed=1)
    _image(first / "sub" / "b.png", seed=2)
    second = tmp_path / "two" / "elsewhere"
    shutil.copytree(first, second)
    digest = load_image_set("folder", "test", root=first).digest()
    assert load_image_set("folder", "test", root=second).digest() == digest
    _image(second / "a.png", seed=3)
    assert load_image_set("folder", "test", root=second).digest() != digest


def test_image_dataset_returns_float_images_and_indices(tmp_path):
    root = tmp_path / "photos"
    _image(root / "a.png", seed=1, height=30, width=40)
    _image(root / "b.png", seed=2, height=20, width=20)
    dataset = ImageDataset(load_image_set("folder", "test", root=root, image_size=8))
    assert len(dataset) == 2
    sample = dataset[1]
    assert sample["index"] == 1
    assert sample["image"].shape == (3, 8, 8) and sample["image"].dtype == torch.float32
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, 8, 8)


def test_split_manifest_lists_relative_paths_sources_and_hashes(tmp_path):
    root = _celeba(tmp_path / "celeba")
    image_set = load_image_set("celeba", "test", root=root)
    path = write_split_manifest(image_set, tmp_path / "out" / "split_test.csv")
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["path"] for row in rows] == [f"img_align_celeba/00000{n}.jpg" for n in (4, 5, 6)]
    assert {row["split"] for row in rows} == {"test"}
    assert rows[0]["source"] == "000004"
    assert rows[0]["sha256"] == hashlib.sha256((root / "img_align_celeba" / "000004.jpg").read_bytes()).hexdigest()


def test_bad_image_stops_the_manifest_and_leaves_no_file(tmp_path):
    root = tmp_path / "photos"
    _image(root / "a.png", seed=1)
    bad = _corrupt(root / "b.png")
    image_set = load_image_set("folder", "test", root=root)  # listing does not decode
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError) as excinfo:
        write_split_manifest(image_set, out / "split_test.csv")
    assert str(bad) in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert list(out.iterdir()) == []


def test_validate_reports_the_first_bad_file_in_order(tmp_path):
    root = tmp_path / "photos"
    _image(root / "a.png", seed=1)
    first_bad = _corrupt(root / "b.png")
    (root / "c.png").write_bytes(b"")
    with pytest.raises(UserError) as excinfo:
        validate(load_image_set("folder", "test", root=root))
    assert str(first_bad) in str(excinfo.value)
    (root / "b.png").unlink()
    (root / "c.png").unlink()
    assert validate(load_image_set("folder", "test", root=root)) == 1


def test_embedded_suite_takes_no_root(tmp_path):
    with pytest.raises(UserError, match="takes no root"):
        load_image_set("faces", "test", root=tmp_path, cache_dir=tmp_path)
