"""The frozen test protocol: which mask goes with which test image, decided once, before any method runs.

``build_manifest(image_set, protocol, out_dir)`` writes

``out_dir/masks/<pair_id>.png``
    free-form masks (white = hole), at the image set's size;
``out_dir/manifest.csv``
    one row per :class:`Pair`: pair_id, image (relative to the dataset root), mask (relative to
    ``out_dir`` for free-form masks, to the NVIDIA folder for NVIDIA masks), hole ratio (``repr`` of
    the float, so it reads back exactly), bin, sha256 of both files, the mask's seed and its generator
    configuration as JSON (algorithm, preset, reference size; both empty for NVIDIA files);
``out_dir/manifest.json``
    the protocol, the data set (name, kind, split, root, digest, image count), image size and crop,
    pair counts per bin, the generator's full parameter table, ``PROTOCOL_VERSION`` and the
    numpy/Pillow versions that drew the masks.

Files are written atomically, masks first, ``manifest.csv`` next and ``manifest.json`` last, so a
folder with a ``manifest.json`` is complete. No absolute path of ``out_dir`` is stored: building the
same protocol on the same data in two folders gives byte-identical manifests.

Order and seeds
    Pairs follow the image set's order, then ``protocol.bins`` in the given order, then
    ``k = 0 … masks_per_bin-1``; ``pair_id`` is ``<image index>_<bin>_<k>`` (``000003_r0.2-0.3_0``).
    A free-form mask's seed is the first 8 bytes of ``sha256("sahn-bench-mask-seed", protocol seed,
    image path relative to the root, bin, k)``, so it depends on nothing else (not on other images,
    nor on Python's randomised ``hash``); it is drawn by :func:`bench.data.masks.generate_mask_in_bin`,
    which guarantees the bin.

NVIDIA masks
    Every file of ``protocol.folder`` is measured after nearest-neighbour resizing to the image size
    (the hole ratio is defined after resizing), and a file is a candidate for every requested bin its
    measured ratio falls in; files outside every requested bin are not used (their count is recorded).
    Each bin's candidates are put in a seeded order, by ``sha256("sahn-bench-nvidia-order", protocol
    seed, bin, file path relative to the folder)``, and the ``j``-th pair of that bin (in pair order)
    takes candidate ``j mod len(candidates)``: no mask repeats within a bin until all were used. Each
    pair keeps the original file, so its sha256 is that of the released mask.

Re-running ``build_manifest`` on a folder that already holds a manifest reuses it (nothing is
regenerated) after checking that the protocol and data set match and that every file still has its
recorded sha256; a different protocol or data set is an error.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL

from bench.errors import UserError
from bench.data.images import encode_png
from bench.files import atomic_write_bytes, sha256_file
from bench.data.masks import (RATIO_BINS, FreeFormConfig, MaskResizedWarning, bin_label, generate_mask_in_bin, hole_ratio,
                         in_bin, nvidia_mask_set, parse_bin, read_mask)

PROTOCOL_VERSION = "sahn-bench-protocol/1"
MANIFEST_CSV = "manifest.csv"
MANIFEST_JSON = "manifest.json"
MASK_FOLDER = "masks"
SOURCES = ("freeform", "nvidia")
CSV_COLUMNS = ("pair_id", "image", "mask", "ratio", "bin", "image_sha256", "mask_sha256", "mask_seed", "generator")
SIX_BINS = tuple(bin_label(lo, hi) for lo, hi in RATIO_BINS)


@dataclass(frozen=True)
class MaskProtocol:
    """How test masks are chosen: the seeded free-form generator or the NVIDIA test set."""

    source: str = "freeform"  # "freeform" | "nvidia"
    preset: str = "deepfill"  # free-form preset (see bench.data.masks)
    folder: str | None = None  # the NVIDIA mask folder (source="nvidia")
    bins: tuple[str, ...] = SIX_BINS
    masks_per_bin: int = 1  # masks per test image and bin
    seed: int = 0

    def record(self) -> dict[str, Any]:
        """The protocol as stored in ``manifest.json``: validated, only the fields its source uses."""
        if self.source not in SOURCES:
            raise UserError(f"unknown mask source {self.source!r}: expected one of {', '.join(SOURCES)}")
        bins = tuple(self.bins)
        if not bins:
            raise UserError("the mask protocol needs at least one ratio bin")
        for label in bins:
            parse_bin(label)
        duplicates = sorted(label for label, count in Counter(bins).items() if count > 1)
        if duplicates:
            raise UserError(f"ratio bin {duplicates[0]} is listed twice in the mask protocol")
        if isinstance(self.masks_per_bin, bool) or not isinstance(self.masks_per_bin, int) or self.masks_per_bin < 1:
            raise UserError(f"masks_per_bin must be a positive integer, got {self.masks_per_bin!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"mask seed must be a non-negative integer, got {self.seed!r}")
        record: dict[str, Any] = {"source": self.source, "bins": list(bins), "masks_per_bin": self.masks_per_bin,
                                  "seed": self.seed}
        if self.source == "freeform":
            record["generator"] = FreeFormConfig(self.preset).record()
        else:
            if not self.folder:
                raise UserError("mask source 'nvidia' needs the folder of the NVIDIA irregular mask test set")
            record["folder"] = str(Path(self.folder).expanduser().resolve())
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "MaskProtocol":
        generator = record.get("generator") or {}
        return cls(source=record["source"], preset=generator.get("preset", cls.preset), folder=record.get("folder"),
                   bins=tuple(record["bins"]), masks_per_bin=record["masks_per_bin"], seed=record["seed"])


@dataclass(frozen=True)
class Pair:
    pair_id: str
    image: str  # relative to the dataset root
    mask: str  # relative to out_dir (free-form) or to the NVIDIA folder
    ratio: float  # hole ratio at the image size
    bin: str  # the requested bin this pair was drawn for (its ratio lies in it)
    image_sha256: str
    mask_sha256: str
    mask_seed: int | None  # None for NVIDIA files
    generator: str  # JSON of the generator configuration; "" for NVIDIA files


@dataclass(frozen=True)
class Manifest:
    out_dir: Path
    record: dict[str, Any]  # the content of manifest.json
    pairs: tuple[Pair, ...] = field(repr=False)

    @property
    def protocol(self) -> MaskProtocol:
        return MaskProtocol.from_record(self.record["protocol"])

    @property
    def image_size(self) -> int:
        return int(self.record["image_size"])

    @property
    def crop(self) -> str:
        return self.record["crop"]

    @property
    def dataset_name(self) -> str:
        return self.record["dataset"]["name"]

    @property
    def dataset_digest(self) -> str:
        return self.record["dataset"]["digest"]

    @property
    def dataset_root(self) -> Path:
        return Path(self.record["dataset"]["root"])

    @property
    def mask_root(self) -> Path:
        folder = self.record["protocol"].get("folder")
        return Path(folder) if folder else self.out_dir

    def image_path(self, pair: Pair) -> Path:
        return self.dataset_root / pair.image

    def mask_path(self, pair: Pair) -> Path:
        return self.mask_root / pair.mask

    def read_mask(self, pair: Pair) -> np.ndarray:
        """The pair's mask at the image size (``uint8``, 1 = hole), checked against its frozen ratio.

        Resizing NVIDIA files is expected here (it was measured when the pairs were frozen), so it
        gives no warning per pair.
        """
        path = self.mask_path(pair)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MaskResizedWarning)
            mask = read_mask(path, self.image_size)
        if hole_ratio(mask) != pair.ratio:
            raise UserError(f"{path}: hole ratio {hole_ratio(mask)!r} at {self.image_size}x{self.image_size}, but "
                            f"{pair.ratio!r} was frozen for pair {pair.pair_id}; run Manifest.verify()")
        return mask

    def counts_per_bin(self, labels: tuple[str, ...] | None = None) -> dict[str, int]:
        """Pairs per bin. By default the requested bins (pairs drawn for each) and ``"All"``; with
        ``labels``, the pairs whose ratio lies in each label (e.g. the paper's ``(0.2,0.4]``)."""
        if labels is None:
            drawn = Counter(pair.bin for pair in self.pairs)
            counts = {label: drawn.get(label, 0) for label in self.record["protocol"]["bins"]}
            counts["All"] = len(self.pairs)
            return counts
        return {label: sum(in_bin(pair.ratio, label) for pair in self.pairs) for label in labels}

    def digest(self) -> str:
        """sha256 of what defines the test pairs: the protocol, the data set, size, crop, every pair."""
        identity = {key: self.record[key] for key in ("protocol_version", "protocol", "image_size", "crop")}
        identity["dataset_digest"] = self.dataset_digest
        digest = hashlib.sha256(_canonical_json(identity).encode())
        digest.update(_pairs_csv(self.pairs))
        return digest.hexdigest()

    def verify(self) -> "Manifest":
        """Recompute the sha256 of every image and mask; the first missing or changed file is a UserError."""
        known: dict[Path, str] = {}
        for pair in self.pairs:
            for path, expected, role in ((self.image_path(pair), pair.image_sha256, "image"),
                                         (self.mask_path(pair), pair.mask_sha256, "mask")):
                if path not in known:
                    if not path.is_file():
                        raise UserError(f"{path}: {role} of test pair {pair.pair_id} is missing (frozen in "
                                        f"{self.out_dir / MANIFEST_CSV})")
                    known[path] = sha256_file(path)
                if known[path] != expected:
                    raise UserError(f"{path}: {role} changed since the test pairs were frozen in "
                                    f"{self.out_dir / MANIFEST_CSV} (sha256 differs); restore it or build a new "
                                    "manifest in another folder")
        return self


# ----------------------------------------------------------------------------- building
def build_manifest(image_set, protocol: MaskProtocol, out_dir: str | os.PathLike) -> Manifest:
    """Freeze the test pairs of ``image_set`` under ``protocol`` in ``out_dir`` (or reuse them)."""
    out_dir = Path(out_dir).expanduser().resolve()
    protocol_record = protocol.record()
    if not image_set.items:
        raise UserError(f"{image_set.root}: the test set has no images to pair with masks")
    relative_images = [image_set.relative_path(index) for index in range(len(image_set.items))]
    dataset = {"name": image_set.name, "kind": image_set.kind, "split": image_set.split,
               "root": str(Path(image_set.root).resolve()), "images": len(image_set.items)}
    identity = {"protocol_version": PROTOCOL_VERSION, "protocol": protocol_record, "dataset": dataset,
                "image_size": image_set.image_size, "crop": image_set.crop}
    if (out_dir / MANIFEST_JSON).exists():
        return _reuse(out_dir, identity, relative_images)

    image_hashes = [sha256_file(item.path) for item in image_set.items]
    if protocol_record["source"] == "freeform":
        pairs, extra = _freeform_pairs(relative_images, image_hashes, protocol_record, image_set.image_size, out_dir)
    else:
        pairs, extra = _nvidia_pairs(relative_images, image_hashes, protocol_record, image_set.image_size)
    drawn = Counter(pair.bin for pair in pairs)
    counts = {**{label: drawn[label] for label in protocol_record["bins"]}, "All": len(pairs)}
    record = {**identity, "dataset": {**dataset, "digest": image_set.digest()}, **extra, "pairs": len(pairs),
              "counts_per_bin": counts, "software": {"numpy": np.__version__, "pillow": PIL.__version__}}
    manifest = Manifest(out_dir, record, tuple(pairs))
    atomic_write_bytes(out_dir / MANIFEST_CSV, _pairs_csv(manifest.pairs))
    atomic_write_bytes(out_dir / MANIFEST_JSON, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def _reuse(out_dir: Path, identity: dict[str, Any], relative_images: list[str]) -> Manifest:
    manifest = load_manifest(out_dir)
    stored = {key: manifest.record.get(key) for key in identity}
    stored["dataset"] = {key: (manifest.record.get("dataset") or {}).get(key) for key in identity["dataset"]}
    difference = first_difference(stored, identity)
    if difference is None:
        frozen_images = list(dict.fromkeys(pair.image for pair in manifest.pairs))
        if frozen_images != relative_images:
            difference = ("dataset.images (file list)", "other files", "these files")
    if difference is not None:
        key, old, new = difference
        raise UserError(f"{out_dir}: already holds test pairs for a different protocol or data set ({key} is {old!r} "
                        f"there, {new!r} now); choose another output folder or delete {out_dir}")
    return manifest.verify()


def first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first (dotted key, old value, new value) where two nested dicts differ, keys in sorted order; None when
    they are equal. What a refusal to reuse a folder of other options names."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def _freeform_pairs(relative_images: list[str], image_hashes: list[str], protocol: dict[str, Any], size: int,
                    out_dir: Path) -> tuple[list[Pair], dict[str, Any]]:
    config = FreeFormConfig(protocol["generator"]["preset"])
    generator = config.to_json()
    pairs = []
    for index, (relative, image_hash) in enumerate(zip(relative_images, image_hashes)):
        for label in protocol["bins"]:
            for k in range(protocol["masks_per_bin"]):
                seed = mask_seed(protocol["seed"], relative, label, k)
                mask, ratio = generate_mask_in_bin(size, label, seed, config)
                pair_id = _pair_id(index, label, k)
                png = encode_png(mask * np.uint8(255))
                mask_relative = f"{MASK_FOLDER}/{pair_id}.png"
                atomic_write_bytes(out_dir / mask_relative, png)
                pairs.append(Pair(pair_id, relative, mask_relative, ratio, label, image_hash,
                                  hashlib.sha256(png).hexdigest(), seed, generator))
    return pairs, {}


def _nvidia_pairs(relative_images: list[str], image_hashes: list[str], protocol: dict[str, Any],
                  size: int) -> tuple[list[Pair], dict[str, Any]]:
    folder = Path(protocol["folder"])
    masks = nvidia_mask_set(folder, size=size)
    candidates = {}
    for label in protocol["bins"]:
        members = [mask for mask in masks if in_bin(mask.ratio, label)]
        if not members:
            raise UserError(f"{folder}: no mask has a hole ratio in {label} at {size}x{size}; drop that bin or use "
                            "another mask folder")
        candidates[label] = sorted(members, key=lambda mask: _nvidia_rank(protocol["seed"], label, folder, mask.path))
    used_per_bin: Counter[str] = Counter()
    hashes: dict[str, str] = {}
    pairs = []
    for index, (relative, image_hash) in enumerate(zip(relative_images, image_hashes)):
        for label in protocol["bins"]:
            for k in range(protocol["masks_per_bin"]):
                mask = candidates[label][used_per_bin[label] % len(candidates[label])]
                used_per_bin[label] += 1
                if mask.path not in hashes:
                    hashes[mask.path] = sha256_file(mask.path)
                pairs.append(Pair(_pair_id(index, label, k), relative, _relative_to(mask.path, folder), mask.ratio,
                                  label, image_hash, hashes[mask.path], None, ""))
    outside = sum(not any(in_bin(mask.ratio, label) for label in protocol["bins"]) for mask in masks)
    extra = {"nvidia": {"files": len(masks), "outside_requested_bins": outside,
                        "candidates_per_bin": {label: len(candidates[label]) for label in protocol["bins"]}}}
    return pairs, extra


def mask_seed(protocol_seed: int, image_relative: str, label: str, k: int) -> int:
    """The free-form mask seed of one pair (see the module doc); stable across runs and machines."""
    text = f"sahn-bench-mask-seed\0{protocol_seed}\0{image_relative}\0{label}\0{k}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _nvidia_rank(protocol_seed: int, label: str, folder: Path, path: str) -> str:
    return hashlib.sha256(f"sahn-bench-nvidia-order\0{protocol_seed}\0{label}\0"
                          f"{_relative_to(path, folder)}".encode()).hexdigest()


def _relative_to(path: str, folder: Path) -> str:
    try:
        return Path(path).relative_to(folder).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _pair_id(index: int, label: str, k: int) -> str:
    if label.strip().lower() == "all":
        tag = "all"
    else:
        lo, hi = parse_bin(label)
        tag = f"r{bin_label(lo, hi)[1:-1].replace(',', '-')}"
    return f"{index:06d}_{tag}_{k}"


# ----------------------------------------------------------------------------- files
def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _pairs_csv(pairs: tuple[Pair, ...] | list[Pair]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for pair in pairs:
        writer.writerow([pair.pair_id, pair.image, pair.mask, repr(float(pair.ratio)), pair.bin, pair.image_sha256,
                         pair.mask_sha256, "" if pair.mask_seed is None else str(pair.mask_seed), pair.generator])
    return buffer.getvalue().encode()


def load_manifest(out_dir: str | os.PathLike) -> Manifest:
    """Read ``out_dir/manifest.json`` and ``manifest.csv`` (files are not re-hashed: see :meth:`Manifest.verify`)."""
    out_dir = Path(out_dir).expanduser().resolve()
    json_path, csv_path = out_dir / MANIFEST_JSON, out_dir / MANIFEST_CSV
    for path in (json_path, csv_path):
        if not path.is_file():
            raise UserError(f"{path}: missing; build the test manifest first (bench.data.manifest.build_manifest)")
    try:
        record = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{json_path}: not a readable manifest ({exc})") from None
    if not isinstance(record, dict) or record.get("protocol_version") != PROTOCOL_VERSION:
        found = record.get("protocol_version") if isinstance(record, dict) else None
        raise UserError(f"{json_path}: protocol version {found!r}, this sahn-bench reads {PROTOCOL_VERSION!r}; "
                        "build a new manifest in another folder")
    pairs = _read_pairs(csv_path)
    if len(pairs) != record.get("pairs"):
        raise UserError(f"{csv_path}: holds {len(pairs)} pairs but {json_path.name} says {record.get('pairs')}; "
                        "the manifest is damaged, delete the folder and build it again")
    return Manifest(out_dir, record, tuple(pairs))


def _read_pairs(csv_path: Path) -> list[Pair]:
    try:
        rows = list(csv.reader(io.StringIO(csv_path.read_text())))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{csv_path}: not a readable manifest ({exc})") from None
    if not rows or tuple(rows[0]) != CSV_COLUMNS:
        raise UserError(f"{csv_path}: expected the columns {','.join(CSV_COLUMNS)}")
    pairs = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(CSV_COLUMNS):
            raise UserError(f"{csv_path}:{number}: expected {len(CSV_COLUMNS)} fields, got {len(row)}")
        values = dict(zip(CSV_COLUMNS, row))
        try:
            ratio = float(values["ratio"])
            seed = int(values["mask_seed"]) if values["mask_seed"] else None
        except ValueError:
            raise UserError(f"{csv_path}:{number}: bad ratio or mask_seed") from None
        pairs.append(Pair(values["pair_id"], values["image"], values["mask"], ratio, values["bin"],
                          values["image_sha256"], values["mask_sha256"], seed, values["generator"]))
    return pairs
