"""Image sets: which files make up a data set's train / val / test split, in a fixed order.

``load_image_set(kind, split, root=..., image_size=...)`` lists files (it never decodes them, so
CelebA's 200k images load in seconds); images are decoded lazily by :meth:`ImageSet.read`, and
:func:`validate` decodes everything up front when a clear early error is wanted.

Layouts (``root`` is the folder the user points at):

``faces``, ``scenes``, ``facades``
    Embedded substitute suites (see :mod:`bench.data.suites`), built on first use; no ``root``.
``celeba``
    ``root/img_align_celeba/*.jpg`` and ``root/list_eval_partition.txt`` (0 train, 1 val, 2 test).
    The Kaggle layout (``img_align_celeba/img_align_celeba/`` and ``list_eval_partition.csv``) works
    too. Crop ``"celeba"``: centre 178×178, then resize (as CTSDG and SPL do).
``paris``
    ``root/paris_train_original/`` (train) and ``root/paris_eval_gt/`` (test, also found as
    ``root/paris_eval/paris_eval_gt/``). Crop ``"resize"``: SPL (``cv2.resize(img, (256, 256))``) and
    CTSDG (``Resize((256, 256))``) both squash the whole 936×537 photo without cropping.
``places2``
    ``root/places365_standard/{train,val}/<category>/*.jpg`` or ``root/data_256/`` + ``root/val_256/``
    (flat or nested). The official val set is our test split. Crop ``"center"`` (the 256² releases are
    already square, so this only matters for other sizes).
``folder``
    Any folder of images (recursive; png, jpg, jpeg, bmp, tif, tiff, webp, any case; names starting
    with ``.`` are skipped). A flat folder is a **test set only**: asking it for ``train``/``val`` is
    an error, because the only alternative would be training on the test images. A folder holding
    ``train/``, ``val/`` or ``test/`` subfolders serves each split from its subfolder. Crop ``"center"``.

``val`` for Paris and Places2 is carved from the training folder, deterministically, by source:
the sources whose sha256(source id) rank lowest form ``VAL_FRACTION`` of them (at least one, at
most ``VAL_MAX_SOURCES``), so the choice does not depend on listing order or on other files.

Every item carries its **source** photo id, the unit of splitting: Paris training images named
``<lat>_<lon>_...`` share the location as source (neighbouring views of one street spot); elsewhere
each file is its own source. Items are sorted by path relative to ``root``; ``limit`` keeps the
first ``limit`` of that order.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from bench.data import suites
from bench.errors import UserError
from bench.data.images import read_image, to_tensor
from bench.files import atomic_write_bytes, sha256_file

SPLITS = ("train", "val", "test")
KINDS = ("faces", "scenes", "facades", "celeba", "paris", "places2", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VAL_FRACTION = 0.02
VAL_MAX_SOURCES = 1000

CELEBA_LAYOUT = "CelebA expects <root>/img_align_celeba/ and <root>/list_eval_partition.txt"
PARIS_LAYOUT = "Paris StreetView expects <root>/paris_train_original/ (train) and <root>/paris_eval_gt/ (test)"
PLACES2_LAYOUT = ("Places2 expects <root>/places365_standard/{train,val}/<category>/*.jpg "
                  "or <root>/data_256/ (train) and <root>/val_256/ (test)")
FOLDER_LAYOUT = "folder expects a folder of png/jpg/jpeg/bmp/tif/tiff/webp images"
_CELEBA_SPLIT_CODES = {"0": "train", "1": "val", "2": "test"}
_PARIS_LOCATION = re.compile(r"^(-?\d+\.\d+)_(-?\d+\.\d+)_")


@dataclass(frozen=True)
class ImageItem:
    path: str  # absolute
    source: str  # source photo id: items of one source never straddle splits


@dataclass
class ImageSet:
    name: str
    kind: str
    split: str
    items: list[ImageItem]
    image_size: int
    crop: str
    root: str
    notes: str = ""

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[str]:
        return [item.path for item in self.items]

    def relative_path(self, index: int) -> str:
        """Path of item ``index`` relative to ``root``, with ``/`` separators (stable across machines)."""
        return _relative(self.items[index].path, self.root)

    def digest(self) -> str:
        """sha256 over (relative path, file sha256) of every item, in sorted order.

        It identifies the files only: ``image_size`` and ``crop`` are recorded beside it, not in it.
        """
        digest = hashlib.sha256()
        for relative, path in sorted((self.relative_path(index), item.path) for index, item in enumerate(self.items)):
            digest.update(f"{relative}\t{sha256_file(path)}\n".encode())
        return digest.hexdigest()

    def read(self, index: int) -> np.ndarray:
        """Item ``index`` decoded, cropped and resized: ``uint8 [image_size, image_size, 3]``."""
        return read_image(self.items[index].path, size=self.image_size, crop=self.crop)


class ImageDataset(Dataset):
    """``{"image": float [3, S, S] in [0, 1], "index": int}`` for each item of an :class:`ImageSet`."""

    def __init__(self, image_set: ImageSet):
        self.image_set = image_set

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {"image": to_tensor(self.image_set.read(index)), "index": index}


# ----------------------------------------------------------------------------- loading
def load_image_set(kind: str, split: str, *, root: str | os.PathLike | None = None, image_size: int = 256,
                   limit: int | None = None, cache_dir: str | os.PathLike | None = None) -> ImageSet:
    """List the files of one split of a data set (see the module doc for layouts)."""
    if kind not in KINDS:
        raise UserError(f"unknown data set kind {kind!r}: expected one of {', '.join(KINDS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image size must be a positive integer, got {image_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer or None, got {limit!r}")
    if kind in suites.SUITES:
        if root is not None:
            raise UserError(f"the embedded suite {kind!r} takes no root folder (it is built in the cache); "
                            f"got root={root}")
        base, items, crop, notes = _suite(kind, split, cache_dir)
        name = kind
    else:
        if root is None:
            raise UserError(f"{kind} needs a root folder: {_LAYOUTS[kind]}")
        base = Path(root).expanduser().resolve()
        items, crop, notes = _LOADERS[kind](base, split)
        name = base.name if kind == "folder" else kind
    items = sorted(items, key=lambda item: _relative(item.path, base))
    if limit is not None:
        items = items[:limit]
    return ImageSet(name, kind, split, items, image_size, crop, str(base), notes)


def _suite(name: str, split: str, cache_dir) -> tuple[Path, list[ImageItem], str, str]:
    folder = suites.build_suite(name, cache_dir)
    sources = suites.suite_image_sources(folder)
    items = [ImageItem(str(folder / relative), source) for relative, source in sources.items()
             if relative.startswith(f"{split}/")]
    missing = [item.path for item in items if not os.path.isfile(item.path)]
    if missing:
        raise UserError(f"{missing[0]}: listed in {folder / suites.SOURCES_FILE} but missing; "
                        f"delete {folder} to rebuild the suite")
    if not items:
        raise UserError(f"embedded suite {name!r} has no {split!r} images in {folder}; delete it to rebuild")
    return folder, items, "center", suites.suite_notes(name)


def _celeba(root: Path, split: str) -> tuple[list[ImageItem], str, str]:
    image_folder = root / "img_align_celeba"
    if (image_folder / "img_align_celeba").is_dir():
        image_folder = image_folder / "img_align_celeba"  # Kaggle's zip nests the folder
    partition = next((path for path in (root / "list_eval_partition.txt", root / "list_eval_partition.csv")
                      if path.is_file()), None)
    if not image_folder.is_dir() or partition is None:
        raise UserError(f"{root}: not a CelebA folder. {CELEBA_LAYOUT}")
    names = _celeba_partition(partition)[split]
    present = set(os.listdir(image_folder))
    missing = [name for name in names if name not in present]
    if missing:
        raise UserError(f"{image_folder}: {len(missing)} of the {len(names)} {split} images listed in "
                        f"{partition.name} are missing (first: {missing[0]})")
    if not names:
        raise UserError(f"{partition}: lists no {split} images. {CELEBA_LAYOUT}")
    items = [ImageItem(str(image_folder / name), Path(name).stem) for name in names]
    return items, "celeba", "CelebA aligned, official partition; centre 178x178 crop then resize"


def _celeba_partition(path: Path) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}`` of file names; any malformed line is an error."""
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read ({exc})") from None
    for number, line in enumerate(lines, start=1):
        fields = line.replace(",", " ").split()
        if not fields or fields == ["image_id", "partition"]:
            continue
        if len(fields) != 2 or fields[1] not in _CELEBA_SPLIT_CODES:
            raise UserError(f"{path}:{number}: expected '<file name> <0|1|2>', got {line.strip()!r}")
        splits[_CELEBA_SPLIT_CODES[fields[1]]].append(fields[0])
    return splits


def _paris(root: Path, split: str) -> tuple[list[ImageItem], str, str]:
    notes = "Paris StreetView; whole image resized without cropping (as SPL and CTSDG)"
    if split == "test":
        folder = next((path for path in (root / "paris_eval_gt", root / "paris_eval" / "paris_eval_gt")
                       if path.is_dir()), None)
        if folder is None:
            raise UserError(f"{root}: no paris_eval_gt/ folder. {PARIS_LAYOUT}")
        return _folder_items(folder, _file_source, PARIS_LAYOUT), "resize", notes
    folder = root / "paris_train_original"
    if not folder.is_dir():
        raise UserError(f"{root}: no paris_train_original/ folder. {PARIS_LAYOUT}")
    items = _carve(_folder_items(folder, _paris_source, PARIS_LAYOUT), split)
    return items, "resize", notes + f"; val = {VAL_FRACTION:.0%} of the training locations (hash-ranked)"


def _paris_source(path: Path, folder: Path) -> str:
    match = _PARIS_LOCATION.match(path.name)
    return f"{match.group(1)}_{match.group(2)}" if match else _file_source(path, folder)


def _places2(root: Path, split: str) -> tuple[list[ImageItem], str, str]:
    standard = root / "places365_standard"
    if standard.is_dir():
        train_folder, test_folder = standard / "train", standard / "val"
    elif (root / "data_256").is_dir() or (root / "val_256").is_dir():
        train_folder, test_folder = root / "data_256", root / "val_256"
    else:
        raise UserError(f"{root}: not a Places2 folder. {PLACES2_LAYOUT}")
    notes = "Places2 (Places365); official val set used as test; centre square then resize"
    folder = test_folder if split == "test" else train_folder
    if not folder.is_dir():
        raise UserError(f"{folder}: missing, needed for the {split} split. {PLACES2_LAYOUT}")
    items = _folder_items(folder, _file_source, PLACES2_LAYOUT)
    if split != "test":
        items = _carve(items, split)
        notes += f"; val = {VAL_FRACTION:.0%} of the training images (hash-ranked)"
    return items, "center", notes


def _folder(root: Path, split: str) -> tuple[list[ImageItem], str, str]:
    if not root.is_dir():
        raise UserError(f"{root}: not a folder. {FOLDER_LAYOUT}")
    split_folders = [name for name in SPLITS if (root / name).is_dir()]
    if split_folders:
        if split not in split_folders:
            raise UserError(f"{root}: has split subfolders ({', '.join(split_folders)}) but no {split}/")
        folder, notes = root / split, f"user folder, split from its {split}/ subfolder"
    elif split == "test":
        folder, notes = root, "user folder, every image is a test image"
    else:
        raise UserError(f"{root}: a flat folder is a test set only; put {split} images in {root / split}/ "
                        "(and test images in test/) to use it for that split")
    return _folder_items(folder, _file_source, FOLDER_LAYOUT), "center", notes


_LOADERS = {"celeba": _celeba, "paris": _paris, "places2": _places2, "folder": _folder}
_LAYOUTS = {"celeba": CELEBA_LAYOUT, "paris": PARIS_LAYOUT, "places2": PLACES2_LAYOUT, "folder": FOLDER_LAYOUT}


# ----------------------------------------------------------------------------- helpers
def _folder_items(folder: Path, source_of, layout: str) -> list[ImageItem]:
    paths = list_images(folder)
    if not paths:
        raise UserError(f"{folder}: no images found. {layout}")
    return [ImageItem(str(path), source_of(path, folder)) for path in paths]


def _file_source(path: Path, folder: Path) -> str:
    # Relative, without extension: Places365 reuses names like 00000001.jpg in every category.
    return Path(_relative(str(path), folder)).with_suffix("").as_posix()


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden names skipped)."""
    found = []
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.extend(Path(directory) / name for name in files
                     if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found, key=lambda path: _relative(str(path), Path(folder)))


def _carve(items: list[ImageItem], split: str) -> list[ImageItem]:
    """Train or val part of a training folder; val is a hash-ranked set of whole sources."""
    sources = sorted({item.source for item in items})
    if len(sources) < 2:
        val_sources: set[str] = set()
    else:
        count = min(VAL_MAX_SOURCES, max(1, round(VAL_FRACTION * len(sources))))
        val_sources = set(sorted(sources, key=lambda source: hashlib.sha256(source.encode()).hexdigest())[:count])
    chosen = [item for item in items if (item.source in val_sources) == (split == "val")]
    if not chosen:
        raise UserError(f"{Path(items[0].path).parent}: too few source photos ({len(sources)}) to carve a "
                        f"{split} split")
    return chosen


def _relative(path: str, root: str | os.PathLike) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


# ----------------------------------------------------------------------------- checks and records
def validate(image_set: ImageSet) -> int:
    """Decode every image; the first bad one raises :class:`UserError` naming it. Returns the count."""
    for item in image_set.items:
        read_image(item.path, crop="resize")
    return len(image_set)


def write_split_manifest(image_set: ImageSet, path: str | os.PathLike, *, check_images: bool = True) -> Path:
    """Write ``path`` (CSV: relative path, source, split, sha256) atomically.

    With ``check_images`` every image is decoded first, so a bad file is reported (and no CSV is
    left behind) before any method is scored on the set.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "source", "split", "sha256"])
    for index, item in enumerate(image_set.items):
        if check_images:
            read_image(item.path, crop="resize")
        writer.writerow([image_set.relative_path(index), item.source, image_set.split, sha256_file(item.path)])
    return atomic_write_bytes(path, buffer.getvalue().encode())
