"""bench.data.suites: embedded suites build offline, deterministically, split by source photo, fully documented."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.data import suites
from bench.data.datasets import load_image_set
from bench.errors import UserError
from bench.data.suites import SOURCES_FILE, SUITES, build_suite, suite_sources


def _file_hashes(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("cache")
    for name in SUITES:
        build_suite(name, cache_dir)
    return cache_dir


@pytest.mark.parametrize("name", SUITES)
def test_suite_layout_sizes_and_images(cache, name):
    folder = suites.suites_root(cache) / name
    counts = {split: len(list((folder / split).glob("*.png"))) for split in ("train", "val", "test")}
    assert 15 <= counts["test"] <= 30
    assert 40 <= counts["train"] <= 150
    assert counts["val"] >= 1
    some_image = Image.open(next((folder / "test").glob("*.png")))
    assert some_image.size == (256, 256) and some_image.mode == "RGB"


@pytest.mark.parametrize("name", SUITES)
def test_sources_json_accounts_for_every_image_and_every_source_file(cache, name):
    folder = suites.suites_root(cache) / name
    record = json.loads((folder / SOURCES_FILE).read_text())
    assert record["suite"] == name and record["stands_in_for"] == suites.STANDS_IN_FOR[name]
    listed = [image for source in record["sources"] for image in source["images"]]
    on_disk = sorted(path.relative_to(folder).as_posix() for path in folder.glob("*/*.png"))
    assert sorted(listed) == on_disk and len(set(listed)) == len(listed)
    for source in record["sources"]:
        assert source["licence"] and source["attribution"]
        assert source["version"] == importlib.metadata.version(source["package"])
        assert all(image.startswith(source["split"] + "/") for image in source["images"])
        for label in source["files"]:
            module, _, relative = label.partition("/")
            path = Path(importlib.util.find_spec(module).submodule_search_locations[0]) / relative
            assert source["file_sha256"][label] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [source["source"] for source in record["sources"]] == [row["source"] for row in suite_sources(name)]


@pytest.mark.parametrize("name", SUITES)
def test_splits_are_disjoint_by_source_photo(cache, name):
    sources = {split: {item.source for item in load_image_set(name, split, cache_dir=cache).items}
               for split in ("train", "val", "test")}
    assert sources["train"].isdisjoint(sources["test"])
    assert sources["train"].isdisjoint(sources["val"])
    assert sources["val"].isdisjoint(sources["test"])


def test_no_photograph_is_shared_between_suites():
    files = {name: {label for row in suite_sources(name) for label in row["files"]} for name in SUITES}
    for index, first in enumerate(SUITES):
        for second in SUITES[index + 1:]:
            assert files[first].isdisjoint(files[second]), (first, second)


def test_suites_load_as_labelled_substitutes(cache):
    test = load_image_set("faces", "test", image_size=64, cache_dir=cache)
    assert test.name == "faces" and test.kind == "faces"
    assert "substitute" in test.notes and "CelebA" in test.notes
    assert test.paths == sorted(test.paths)
    image = test.read(0)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    lfw_test = [item for item in test.items if item.source.startswith("lfw_")]
    assert len(lfw_test) == 20


def test_build_is_deterministic(cache, tmp_path):
    for name in ("faces", "facades"):  # between them: LFW faces, face crops and tiles
        rebuilt = build_suite(name, tmp_path)
        assert _file_hashes(rebuilt) == _file_hashes(suites.suites_root(cache) / name)


def test_complete_suite_is_reused_and_interrupted_build_is_redone(tmp_path):
    folder = build_suite("facades", tmp_path)
    before = _file_hashes(folder)
    victim = next((folder / "train").glob("*.png"))
    victim.write_bytes(b"half-written")
    assert build_suite("facades", tmp_path) == folder
    assert victim.read_bytes() == b"half-written"  # marker present and matching: reused untouched
    (folder / suites.COMPLETE_MARKER).unlink()  # as if the build had been interrupted
    build_suite("facades", tmp_path)
    assert _file_hashes(folder) == before


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []
    real_encode = suites.encode_png

    def encode_then_fail(array):
        calls.append(1)
        if len(calls) > 5:
            raise OSError("disk full")
        return real_encode(array)

    monkeypatch.setattr(suites, "encode_png", encode_then_fail)
    with pytest.raises(OSError, match="disk full"):
        build_suite("facades", tmp_path)
    root = suites.suites_root(tmp_path)
    assert list(root.iterdir()) == []


def test_missing_package_file_is_a_user_error(tmp_path, monkeypatch):
    missing = suites.PackageFile("scikit-image", "skimage", "data/no_such_photo.png")
    recipe = [suites.SourcePhoto("ghost", (missing,), "test", "CC0", "nobody", "tiles")]
    monkeypatch.setitem(suites._RECIPES, "facades", recipe)
    with pytest.raises(UserError) as excinfo:
        build_suite("facades", tmp_path)
    assert "no_such_photo.png" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SAHN_BENCH_CACHE", str(tmp_path / "env-cache"))
    assert suites.suites_root() == tmp_path / "env-cache" / "suites"
    assert suites.suites_root(tmp_path / "explicit") == tmp_path / "explicit" / "suites"
    monkeypatch.delenv("SAHN_BENCH_CACHE")
    assert suites.suites_root() == Path.home() / ".cache" / "sahn-bench" / "suites"


def test_unknown_suite_is_a_user_error():
    with pytest.raises(UserError, match="unknown embedded suite"):
        suite_sources("celeba")
