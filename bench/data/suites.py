"""Embedded default suites: small image sets built offline from photographs that pip packages ship.

No package ships CelebA, Places2 or Paris StreetView, so the default benchmark runs on three
labelled substitutes built from the real photographs inside scikit-image, scikit-learn and
matplotlib. They are never called by the name of the dataset they stand in for:

==========  ===================  ==========================================================
suite       stands in for        built from
==========  ===================  ==========================================================
faces       CelebA               100 LFW faces (25×25 grey, upscaled) + two colour portraits
scenes      Places2              tiles of coffee, chelsea, rocket, motorcycle, hubble, flower
facades     Paris StreetView     tiles of china (temple facade), brick, coins, gravel, grass, camera
==========  ===================  ==========================================================

Every split is chosen **by source photograph** (all views of one photo land in one split), and no
photograph is used by two suites. Every image is stored as a 256×256 RGB PNG; loaders resize.
Views per photo: its centred square (``full``) plus 256² tiles at scales 1.0 and 0.75. Tiles of
training photos overlap (stride 128) to give more training views; evaluation photos get evenly
spread tiles that just cover the image, so test images are few and less redundant.

Layout: ``<cache>/suites/<name>/{train,val,test}/*.png``, ``SOURCES.json`` (each source photo,
its package and version, file hashes, licence and attribution, split, and output images) and
``.complete``, written last. A suite is built in a temporary sibling folder and renamed into
place, so an interrupted or concurrent build is never half-used; a folder without a matching
``.complete`` (other recipe, other source files, other Pillow) is rebuilt. The build is
deterministic: rebuilding gives identical bytes.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from bench.errors import UserError
from bench.data.images import encode_png, read_image
from bench.files import atomic_write_bytes, sha256_file

SUITES = ("faces", "scenes", "facades")
SPLITS = ("train", "val", "test")
RECIPE_VERSION = 1
STORED_SIZE = 256
TILE_SCALES = (1.0, 0.75)
TRAIN_TILE_STRIDE = 128
SOURCES_FILE = "SOURCES.json"
COMPLETE_MARKER = ".complete"
STANDS_IN_FOR = {"faces": "CelebA", "scenes": "Places2", "facades": "Paris StreetView"}
LFW_FACE_COUNT = 100  # entries 0..99 of lfw_subset.npy are faces, 100..199 background patches
LFW_SPLIT_COUNTS = {"train": 70, "val": 10, "test": 20}


@dataclass(frozen=True)
class PackageFile:
    """A file inside an installed distribution, named relative to its import package's folder."""

    distribution: str  # pip name, e.g. "scikit-image"
    module: str  # import name, e.g. "skimage"
    relative_path: str  # e.g. "data/coffee.png"

    @property
    def label(self) -> str:
        return f"{self.module}/{self.relative_path}"


@dataclass(frozen=True)
class SourcePhoto:
    """One source photograph (the unit of splitting) and how its views are made."""

    source_id: str
    files: tuple[PackageFile, ...]
    split: str
    licence: str
    attribution: str
    views: str  # "tiles" | "face_box" | "lfw"
    face_box: tuple[int, int, int, int] | None = None  # (left, top, right, bottom) for "face_box"
    lfw_index: int | None = None  # entry of lfw_subset.npy for "lfw"


def _skimage(name: str) -> PackageFile:
    return PackageFile("scikit-image", "skimage", f"data/{name}")


def _sklearn(name: str) -> PackageFile:
    return PackageFile("scikit-learn", "sklearn", f"datasets/images/{name}")


_GRACE_HOPPER = PackageFile("matplotlib", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg")
_LFW = _skimage("lfw_subset.npy")
_SKLEARN_ATTRIBUTION = "scikit-learn datasets/images/README.txt; retrieved by Robert Layton"
_LFW_LICENCE = "not stated by scikit-image (Labeled Faces in the Wild, research data set)"
_LFW_ATTRIBUTION = ("LFW (Huang et al., vis-www.cs.umass.edu/lfw), 25x25 subset shipped by scikit-image "
                    "(skimage.data.lfw_subset)")


def _lfw_sources() -> list[SourcePhoto]:
    # The LFW entries were drawn at random by scikit-image, so consecutive blocks make fair splits.
    splits = [split for split in SPLITS for _ in range(LFW_SPLIT_COUNTS[split])]
    assert len(splits) == LFW_FACE_COUNT
    return [SourcePhoto(f"lfw_{index:03d}", (_LFW,), split, _LFW_LICENCE, _LFW_ATTRIBUTION, "lfw",
                        lfw_index=index) for index, split in enumerate(splits)]


_RECIPES: dict[str, list[SourcePhoto]] = {
    "faces": _lfw_sources() + [
        SourcePhoto("astronaut", (_skimage("astronaut.png"),), "train",
                    "public domain (NASA; 'no known copyright restrictions')",
                    "Eileen Collins, NASA Great Images database (skimage.data.astronaut)",
                    "face_box", face_box=(110, 0, 330, 220)),
        SourcePhoto("grace_hopper", (_GRACE_HOPPER,), "test",
                    "public domain (official U.S. Navy photograph); not stated in matplotlib's sample_data README",
                    "Commodore Grace M. Hopper, U.S. Navy; shipped as matplotlib sample data",
                    "face_box", face_box=(100, 40, 420, 360)),
    ],
    "scenes": [
        SourcePhoto("coffee", (_skimage("coffee.png"),), "test", "CC0",
                    "Rachel Michetti, courtesy of Pikolo Espresso Bar (skimage.data.coffee)", "tiles"),
        SourcePhoto("rocket", (_skimage("rocket.jpg"),), "test", "public domain (SpaceX)",
                    "DSCOVR launch on Falcon 9, SpaceX Photos (skimage.data.rocket)", "tiles"),
        SourcePhoto("chelsea", (_skimage("chelsea.png"),), "val", "CC0",
                    "Stefan van der Walt (skimage.data.chelsea)", "tiles"),
        # Left and right views of one stereo pair are one photograph for splitting purposes.
        SourcePhoto("motorcycle", (_skimage("motorcycle_left.png"), _skimage("motorcycle_right.png")), "train",
                    "not stated by scikit-image (Middlebury 2014 stereo data set)",
                    "Scharstein et al., Middlebury 2014 stereo (skimage.data.stereo_motorcycle)", "tiles"),
        SourcePhoto("hubble_deep_field", (_skimage("hubble_deep_field.jpg"),), "train",
                    "public domain (NASA)", "Hubble eXtreme Deep Field, HubbleSite (skimage.data.hubble_deep_field)",
                    "tiles"),
        SourcePhoto("flower", (_sklearn("flower.jpg"),), "train", "CC BY 2.0",
                    f"flickr.com/photos/vultilion/6056698931 ({_SKLEARN_ATTRIBUTION})", "tiles"),
    ],
    "facades": [
        SourcePhoto("china", (_sklearn("china.jpg"),), "test", "CC BY 2.0",
                    f"danielbuechele, flickr.com/photos/danielbuechele/6061409035 ({_SKLEARN_ATTRIBUTION})", "tiles"),
        SourcePhoto("brick", (_skimage("brick.png"),), "test", "CC0",
                    "CC0Textures Bricks25, processed by scikit-image (skimage.data.brick)", "tiles"),
        SourcePhoto("coins", (_skimage("coins.png"),), "val", "no known copyright restrictions",
                    "Greek coins from Pompeii, Brooklyn Museum Collection (skimage.data.coins)", "tiles"),
        SourcePhoto("gravel", (_skimage("gravel.png"),), "train", "CC0",
                    "CC0Textures Gravel04, processed by scikit-image (skimage.data.gravel)", "tiles"),
        SourcePhoto("grass", (_skimage("grass.png"),), "train", "CC0",
                    "linolafett on DeviantArt, processed by scikit-image (skimage.data.grass)", "tiles"),
        SourcePhoto("camera", (_skimage("camera.png"),), "train", "CC0",
                    "Lav Varshney (skimage.data.camera)", "tiles"),
    ],
}


# ----------------------------------------------------------------------------- public API
def suite_notes(name: str) -> str:
    """One sentence saying what the suite is and what it stands in for."""
    _check_name(name)
    return (f"embedded substitute suite {name!r}: real photographs shipped by pip packages, standing in for "
            f"{STANDS_IN_FOR[name]} (which is not available offline); not {STANDS_IN_FOR[name]} itself, so its "
            "numbers are not comparable with published ones")


def suite_sources(name: str) -> list[dict]:
    """The recipe's source photographs: id, split, package and version, files, licence, attribution."""
    _check_name(name)
    return [_describe_source(source) for source in _RECIPES[name]]


def suites_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/suites``; the cache is ``cache_dir``, else ``$SAHN_BENCH_CACHE``, else ``~/.cache/sahn-bench``."""
    if cache_dir is None:
        cache_dir = os.environ.get("SAHN_BENCH_CACHE") or Path.home() / ".cache" / "sahn-bench"
    return Path(cache_dir).expanduser() / "suites"


def build_suite(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of a complete suite, building it first if it is missing or stale."""
    _check_name(name)
    target = suites_root(cache_dir) / name
    file_hashes = _source_file_hashes(name)
    fingerprint = _fingerprint(name, file_hashes)
    if _is_complete(target, fingerprint):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the installed suite should be readable like any cache
    try:
        _render_suite(name, staging, file_hashes, fingerprint)
        _install(staging, target, fingerprint)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def suite_image_sources(suite_dir: str | os.PathLike) -> dict[str, str]:
    """``{"test/coffee_full.png": "coffee", ...}`` read from a built suite's SOURCES.json."""
    path = Path(suite_dir) / SOURCES_FILE
    try:
        record = json.loads(path.read_text())
        return {image: source["source"] for source in record["sources"] for image in source["images"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable suite source list ({exc}); delete {path.parent} to rebuild it") from None


# ----------------------------------------------------------------------------- locating sources
def _check_name(name: str) -> None:
    if name not in SUITES:
        raise UserError(f"unknown embedded suite {name!r}: expected one of {', '.join(SUITES)}")


def _locate(package_file: PackageFile) -> Path:
    spec = importlib.util.find_spec(package_file.module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"embedded suites need the pip package {package_file.distribution} "
                        f"(pip install {package_file.distribution})")
    path = Path(next(iter(spec.submodule_search_locations))) / package_file.relative_path
    if not path.is_file():
        raise UserError(f"{path}: missing from the installed {package_file.distribution} "
                        f"{_version(package_file.distribution)}; reinstall it (embedded suites read this file)")
    return path


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _describe_source(source: SourcePhoto) -> dict:
    return {
        "source": source.source_id,
        "split": source.split,
        "package": source.files[0].distribution,
        "version": _version(source.files[0].distribution),
        "files": [package_file.label for package_file in source.files],
        "entry": source.lfw_index,
        "licence": source.licence,
        "attribution": source.attribution,
    }


def _source_file_hashes(name: str) -> dict[str, str]:
    files = {package_file for source in _RECIPES[name] for package_file in source.files}
    return {package_file.label: sha256_file(_locate(package_file))
            for package_file in sorted(files, key=lambda package_file: package_file.label)}


def _fingerprint(name: str, file_hashes: dict[str, str]) -> str:
    """Changes whenever the built bytes could change: recipe, source file contents, Pillow, numpy."""
    payload = {
        "recipe_version": RECIPE_VERSION,
        "sources": [source.source_id + ":" + source.split for source in _RECIPES[name]],
        "files": file_hashes,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _is_complete(folder: Path, fingerprint: str) -> bool:
    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("fingerprint") == fingerprint


# ----------------------------------------------------------------------------- rendering
def _render_suite(name: str, staging: Path, file_hashes: dict[str, str], fingerprint: str) -> None:
    records = []
    decoded: dict[PackageFile, np.ndarray] = {}  # each source file is decoded once per build
    for source in _RECIPES[name]:
        images = []
        for view_name, view in _views(source, decoded):
            relative = f"{source.split}/{source.source_id}_{view_name}.png"
            atomic_write_bytes(staging / relative, encode_png(view))
            images.append(relative)
        record = _describe_source(source)
        record["file_sha256"] = {package_file.label: file_hashes[package_file.label]
                                 for package_file in source.files}
        record["images"] = images
        records.append(record)
    manifest = {
        "suite": name,
        "stands_in_for": STANDS_IN_FOR[name],
        "notes": suite_notes(name),
        "recipe_version": RECIPE_VERSION,
        "built_with": {"pillow": PIL.__version__, "numpy": np.__version__},
        "image_size": STORED_SIZE,
        "sources": records,
    }
    atomic_write_bytes(staging / SOURCES_FILE, _json_bytes(manifest))
    # The marker goes last: a folder without it is treated as an interrupted build.
    atomic_write_bytes(staging / COMPLETE_MARKER, _json_bytes({"fingerprint": fingerprint}))


def _install(staging: Path, target: Path, fingerprint: str) -> None:
    if target.exists():
        if _is_complete(target, fingerprint):
            return  # another process finished the same build first
        # Move the stale folder aside atomically before deleting it, so readers never see it half-deleted.
        discarded = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
        os.replace(target, discarded)
        shutil.rmtree(discarded, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        if not _is_complete(target, fingerprint):  # lost a race to a concurrent build: use its result
            raise


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _views(source: SourcePhoto, decoded: dict[PackageFile, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    for package_file in source.files:
        if package_file not in decoded:
            decoded[package_file] = _decode(package_file)
    if source.views == "lfw":
        return [("face", _lfw_face(decoded[_LFW][source.lfw_index]))]
    photos = [decoded[package_file] for package_file in source.files]
    if source.views == "face_box":
        return [("face", _resized(Image.fromarray(photos[0]).crop(source.face_box)))]
    stride = TRAIN_TILE_STRIDE if source.split == "train" else STORED_SIZE
    views = []
    for photo_index, photo in enumerate(photos):
        prefix = f"v{photo_index}_" if len(photos) > 1 else ""
        views.extend((prefix + name, view) for name, view in _tile_views(Image.fromarray(photo), stride))
    return views


def _decode(package_file: PackageFile) -> np.ndarray:
    path = _locate(package_file)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    return read_image(path, crop="resize")


def _lfw_face(face: np.ndarray) -> np.ndarray:
    grey = np.round(np.clip(face, 0.0, 1.0) * 255.0).astype(np.uint8)
    upscaled = np.asarray(_resized(Image.fromarray(grey, "L")))
    return np.repeat(upscaled[:, :, None], 3, axis=2)


def _resized(image: Image.Image) -> np.ndarray:
    return np.array(image.resize((STORED_SIZE, STORED_SIZE), Image.Resampling.BICUBIC))


def _tile_views(photo: Image.Image, stride: int) -> list[tuple[str, np.ndarray]]:
    width, height = photo.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    views = [("full", _resized(photo.crop((left, top, left + side, top + side))))]
    for scale in TILE_SCALES:
        scaled_size = (round(width * scale), round(height * scale))
        if min(scaled_size) < STORED_SIZE:
            continue
        scaled = photo if scaled_size == photo.size else photo.resize(scaled_size, Image.Resampling.BICUBIC)
        for row, y in enumerate(_tile_offsets(scaled_size[1], stride)):
            for column, x in enumerate(_tile_offsets(scaled_size[0], stride)):
                tile = scaled.crop((x, y, x + STORED_SIZE, y + STORED_SIZE))
                views.append((f"s{round(scale * 100):03d}_r{row}_c{column}", np.array(tile)))
    return views


def _tile_offsets(length: int, stride: int) -> list[int]:
    """Evenly spread offsets of 256-wide windows covering ``length``, at most ``stride`` apart."""
    span = length - STORED_SIZE
    count = math.ceil(span / stride) + 1
    if count == 1:
        return [span // 2]
    return [round(index * span / (count - 1)) for index in range(count)]
