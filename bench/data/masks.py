"""Hole masks: ratio bins, reading mask files, the seeded free-form generator, the NVIDIA test set.

Polarity: inside the harness a mask is ``uint8``/float with **1 = hole**, 0 = known; on disk a mask
file is white (255) = hole.

Ratio bins
    Half-open ``(a, b]`` as in Liu et al. 2018: ``"(0.0,0.1]"`` … ``"(0.5,0.6]"``, plus ``"All"`` =
    ``(0, 1]`` (every mask with at least one hole pixel). The hole ratio of a mask is
    ``count / N`` (one correctly rounded division). Bounds are parsed from short decimals, and a
    ratio ``count / N`` differs from such a bound by at least ``1 / (10**k * N)`` unless it equals it,
    so plain float comparison gives the exact answer: 0.2 exactly falls in ``(0.1,0.2]``.

Reading mask files (:func:`read_mask`)
    Luminance of any mode (alpha is ignored; 16-bit and float grey are scaled to [0, 1]), EXIF
    orientation applied, first frame of multi-frame files. The mask must be square; it is resized to
    ``size²`` by nearest neighbour (pixel centres: source index ``floor((i + 0.5) * src / size)``)
    with a :class:`MaskResizedWarning`, then binarised: hole where luminance ≥ 0.5. Files that are
    not already two-level (JPEG) give a :class:`MaskNotBinaryWarning`; 8-bit files holding only 0 and
    1 are read as 1 = hole (with a warning) because thresholding them at 0.5 would erase every hole.
    The hole ratio is measured after resizing.

Free-form generator (:func:`generate_mask`, :func:`generate_mask_in_bin`)
    Presets, with lengths in pixels at 256² (``reference_size``); at another size every length
    (widths, step radii, segment lengths, box sizes, margins) is multiplied by ``size / 256`` and
    rounded, never below 1 px; counts and angles do not change.

    ``deepfill`` — DeepFill-v2 brush strokes (Yu et al. 2019, ``brush_stroke_mask``): 1–3 strokes;
    each a polyline of 4–11 steps from a uniform start point; a stroke draws an angle window
    ``2π/5 ± U(0, 2π/15)`` on each side and alternates step directions ``2π − U(window)`` /
    ``U(window)``; step length ``N(d/8, d/16)`` clipped to ``[0, d/4]`` with ``d`` the image
    diagonal; width ``int(U(12, 40))`` (12–39 px) for the whole stroke, with a disc of that diameter
    on every vertex. The official code meant to flip the mask left-right and up-down at random but
    discarded the flipped image; we apply those flips (probability ½ each) so the strokes have no
    preferred direction.

    ``thin`` / ``medium`` / ``thick`` — LaMa's evaluation masks (Suvorov et al. 2022,
    ``configs/data_gen/random_{thin,medium,thick}_256.yaml`` and ``make_random_irregular_mask``):
    ``times ∈ [min_times, max_times]`` strokes; each starts at a uniform point and has 1–5 straight
    segments; segment angle ``0.01 + randint(max_angle)`` radians, mirrored to ``2π − angle`` on
    even-numbered strokes; length ``10 + randint(max_len)``; width ``5 + randint(max_width)``; the
    end point is clipped to the image. thin: times 4–50, max_width 10, max_len 40; medium: times
    4–5, max_width 50, max_len 100; thick: times 1–5, max_width 100, max_len 200; max_angle 4 for
    all. medium and thick draw, instead of strokes, a set of boxes with probability 0.3/1.3 (LaMa's
    ``box_proba`` 0.3 beside ``irregular_proba`` 1): medium 1–5 boxes of side 10–49, margin 0;
    thick 1–3 boxes of side 30–149, margin 10.

    A mask is the union of *shapes* (a stroke or a box). :func:`generate_mask_in_bin` draws one
    preset mask; if its ratio is in the bin it is kept; if it is below the bin, shapes of further
    preset draws are added one at a time until the ratio exceeds the lower bound (kept if it is then
    in the bin); a mask above the bin is discarded and drawing restarts. Everything comes from
    ``numpy.random.default_rng(seed)``, and shapes are rasterised with Pillow's ImageDraw, so a seed
    gives the same mask on every run with the same numpy and Pillow.

NVIDIA irregular mask test set (:func:`nvidia_mask_set`)
    Liu et al. 2018 released 12,000 test masks (512², ``00000.png`` … ``11999.png``): six ratio
    categories × (1000 with and 1000 without a border constraint). The release does not document
    which file belongs to which category (NVIDIA/partialconv issue #29 is unanswered), so the bin of
    every file is computed from the file itself after resizing to the evaluation size, and
    ``border`` records whether its holes touch the image border. Any folder of mask images works.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw

from bench.errors import UserError
from bench.data.images import SIXTEEN_BIT_MODES, decode_image

# ----------------------------------------------------------------------------- ratio bins
RATIO_BINS: tuple[tuple[float, float], ...] = (
    (0.0, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.6),
)
ALL_BIN = "All"
PAPER_BINS = ("(0.2,0.4]", "(0.4,0.6]", ALL_BIN)
_BIN_PATTERN = re.compile(r"^\(\s*(\d+(?:\.\d*)?)\s*,\s*(\d+(?:\.\d*)?)\s*\]$")


def _format_bound(value: float) -> str:
    text = f"{float(value):.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def bin_label(lo: float, hi: float) -> str:
    """``(0.2, 0.4)`` → ``"(0.2,0.4]"`` (at least one decimal, at most six)."""
    return f"({_format_bound(lo)},{_format_bound(hi)}]"


def parse_bin(label: str) -> tuple[float, float]:
    """``"(0.2,0.4]"`` → ``(0.2, 0.4)``; ``"All"`` → ``(0.0, 1.0)``. Bounds must satisfy 0 ≤ a < b ≤ 1."""
    if not isinstance(label, str):
        raise UserError(f"ratio bin {label!r}: expected a string like '(0.2,0.4]' or 'All'")
    if label.strip().lower() == ALL_BIN.lower():
        return 0.0, 1.0
    match = _BIN_PATTERN.match(label.strip())
    if not match:
        raise UserError(f"ratio bin {label!r}: expected 'All' or a half-open interval like '(0.2,0.4]'")
    lo, hi = float(match.group(1)), float(match.group(2))
    if not 0.0 <= lo < hi <= 1.0:
        raise UserError(f"ratio bin {label!r}: bounds must satisfy 0 <= lower < upper <= 1")
    return lo, hi


def in_bin(ratio: float, label: str) -> bool:
    """Whether a hole ratio lies in the half-open bin ``(a, b]`` (``"All"``: ``(0, 1]``)."""
    lo, hi = parse_bin(label)
    return lo < float(ratio) <= hi


def nvidia_bin(ratio: float) -> str | None:
    """Label of the NVIDIA bin holding ``ratio``, or None outside ``(0, 0.6]``."""
    for lo, hi in RATIO_BINS:
        if lo < ratio <= hi:
            return bin_label(lo, hi)
    return None


def hole_ratio(mask: np.ndarray) -> float:
    """Fraction of hole pixels, as one division ``count / N`` (see the module doc on bins)."""
    return int(np.count_nonzero(mask)) / int(mask.size)


def _bin_is_reachable(lo: float, hi: float, pixel_count: int) -> bool:
    """Whether some hole count ``c`` in ``1..N`` gives ``lo < c/N <= hi``."""
    lo_exact, hi_exact = Fraction(_format_bound(lo)), Fraction(_format_bound(hi))
    largest = math.floor(hi_exact * pixel_count)
    return largest >= 1 and Fraction(largest, pixel_count) > lo_exact


# ----------------------------------------------------------------------------- reading mask files
class MaskWarning(UserWarning):
    """Something about a mask file the user may want to fix; the mask was still read."""


class MaskResizedWarning(MaskWarning):
    """The mask file's size differs from the evaluation size; it was resized by nearest neighbour."""


class MaskNotBinaryWarning(MaskWarning):
    """The mask file holds more than two levels (e.g. JPEG) or 0/1 values; it was binarised."""


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"mask size must be a positive integer, got {size!r}")


def read_mask(path: str | os.PathLike, size: int) -> np.ndarray:
    """Mask file → ``uint8 [size, size]`` with 1 = hole (white); see the module doc for the rules."""
    _check_size(size)
    mask, notes = _load_mask(Path(path), size)
    for category, message in notes:
        warnings.warn(message, category, stacklevel=2)
    return mask


def _load_mask(path: Path, size: int | None) -> tuple[np.ndarray, list[tuple[type[Warning], str]]]:
    """The mask and the warnings :func:`read_mask` would give, so callers may summarise them instead.

    ``size`` None keeps the file's own (square) size.
    """
    if size is not None:
        _check_size(size)
    levels = _decode_levels(path)
    notes: list[tuple[type[Warning], str]] = []
    height, width = levels.shape
    size = width if size is None else size
    if height != width:
        raise UserError(f"{path}: mask is {width}x{height}, not square; resizing it to {size}x{size} would "
                        "distort it (crop or pad it to a square first)")
    if not _is_two_level(levels):
        notes.append((MaskNotBinaryWarning, f"{path}: mask is not binary (grey levels, e.g. JPEG); "
                                            "binarised at 0.5 (white = hole)"))
    elif levels.max() == 1.0 / 255.0:
        levels = levels * 255.0
        notes.append((MaskNotBinaryWarning, f"{path}: mask holds only the values 0 and 1; read 1 as hole "
                                            "(save masks as 0/255 to avoid this)"))
    if (height, width) != (size, size):
        levels = _resize_nearest(levels, size)
        notes.append((MaskResizedWarning, f"{path}: mask resized from {width}x{height} to {size}x{size} "
                                          "(nearest neighbour)"))
    return (levels >= 0.5).astype(np.uint8), notes


def _decode_levels(path: Path) -> np.ndarray:
    """Luminance of the file's first frame as float64 in [0, 1]."""
    return decode_image(path, "mask", lambda image: _luminance(image, path))


def _luminance(image: Image.Image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise UserError(f"{path}: integer mask values outside the 16-bit range [0, 65535]")
        return values / 65535.0
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0:
            raise UserError(f"{path}: float mask values must lie in [0, 1]")
        return values
    try:
        grey = image.convert("L")  # alpha is ignored: only luminance says where the holes are
    except ValueError:
        raise UserError(f"{path}: unsupported mask mode {mode!r}") from None
    return np.asarray(grey).astype(np.float64) / 255.0


def _is_two_level(levels: np.ndarray) -> bool:
    """Only black and white (or only 0 and the smallest 8-bit step, for 0/1-coded files)."""
    values = np.unique(levels)
    return bool(np.isin(values, (0.0, 1.0)).all() or np.isin(values, (0.0, 1.0 / 255.0)).all())


def _resize_nearest(levels: np.ndarray, size: int) -> np.ndarray:
    source = levels.shape[0]
    index = np.minimum(((np.arange(size) + 0.5) * source / size).astype(np.int64), source - 1)
    return levels[np.ix_(index, index)]


# ----------------------------------------------------------------------------- generator presets
GENERATOR_VERSION = "sahn-bench-freeform/1"
REFERENCE_SIZE = 256


@dataclass(frozen=True)
class BrushStrokeParams:
    """DeepFill-v2 brush strokes; lengths in pixels at 256²."""

    min_strokes: int = 1
    max_strokes: int = 3
    min_vertices: int = 4
    max_vertices: int = 11
    min_width: float = 12.0  # width = int(U(min_width, max_width))
    max_width: float = 40.0
    mean_angle: float = 2 * math.pi / 5
    angle_range: float = 2 * math.pi / 15
    step_fraction_of_diagonal: float = 1 / 8  # mean step length; std is half of it, clipped to [0, 2×mean]
    random_flips: bool = True


@dataclass(frozen=True)
class BoxParams:
    """LaMa's random rectangles; lengths in pixels at 256²."""

    margin: float
    bbox_min_size: float
    bbox_max_size: float  # exclusive, as numpy's randint
    min_times: int
    max_times: int


@dataclass(frozen=True)
class LamaStrokeParams:
    """LaMa's irregular strokes (and optional boxes); lengths in pixels at 256²."""

    min_times: int
    max_times: int
    max_width: int
    max_angle: int
    max_len: int
    box_proba: float = 0.0  # LaMa's box_proba beside irregular_proba = 1
    box: BoxParams | None = None


PRESETS: dict[str, BrushStrokeParams | LamaStrokeParams] = {
    "deepfill": BrushStrokeParams(),
    "thin": LamaStrokeParams(min_times=4, max_times=50, max_width=10, max_angle=4, max_len=40),
    "medium": LamaStrokeParams(min_times=4, max_times=5, max_width=50, max_angle=4, max_len=100, box_proba=0.3,
                               box=BoxParams(margin=0, bbox_min_size=10, bbox_max_size=50, min_times=1, max_times=5)),
    "thick": LamaStrokeParams(min_times=1, max_times=5, max_width=100, max_angle=4, max_len=200, box_proba=0.3,
                              box=BoxParams(margin=10, bbox_min_size=30, bbox_max_size=150, min_times=1, max_times=3)),
}


@dataclass(frozen=True)
class FreeFormConfig:
    """Which free-form preset to draw; pixel lengths are given at ``reference_size``² and scale with size."""

    preset: str = "deepfill"
    reference_size: int = REFERENCE_SIZE

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise UserError(f"unknown free-form mask preset {self.preset!r}: expected one of {', '.join(PRESETS)}")
        if isinstance(self.reference_size, bool) or not isinstance(self.reference_size, int) or self.reference_size < 1:
            raise UserError(f"mask reference size must be a positive integer, got {self.reference_size!r}")

    @property
    def parameters(self) -> BrushStrokeParams | LamaStrokeParams:
        return PRESETS[self.preset]

    def record(self) -> dict:
        """Everything that determines the masks, for manifests and run parameters."""
        return {"algorithm": GENERATOR_VERSION, "preset": self.preset, "reference_size": self.reference_size,
                "parameters": asdict(self.parameters)}

    def to_json(self) -> str:
        """The configuration itself (the preset's numbers follow from ``algorithm`` and ``preset``)."""
        config = {"algorithm": GENERATOR_VERSION, "preset": self.preset, "reference_size": self.reference_size}
        return json.dumps(config, sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------- drawing shapes
# A shape is pure geometry: a tuple of primitives in pixel coordinates (pixel centres at integers).
#   ("line", ((x0, y0), (x1, y1), ...), width)   polyline
#   ("disc", (x, y), diameter)
#   ("box", (left, top, right, bottom))          inclusive pixel bounds
Shape = tuple


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _scaled(length: float, scale: float) -> int:
    return max(1, int(round(length * scale)))


def _brush_stroke(size: int, rng: np.random.Generator, params: BrushStrokeParams, scale: float) -> Shape:
    vertex_count = int(rng.integers(params.min_vertices, params.max_vertices + 1))
    angle_low = params.mean_angle - rng.uniform(0, params.angle_range)
    angle_high = params.mean_angle + rng.uniform(0, params.angle_range)
    # Alternating directions make the zig-zag of a hand-drawn stroke.
    angles = [2 * math.pi - rng.uniform(angle_low, angle_high) if i % 2 == 0 else rng.uniform(angle_low, angle_high)
              for i in range(vertex_count)]
    mean_step = math.hypot(size, size) * params.step_fraction_of_diagonal
    vertices = [(int(rng.integers(0, size)), int(rng.integers(0, size)))]
    for angle in angles:
        step = _clamp(float(rng.normal(mean_step, mean_step / 2)), 0, 2 * mean_step)
        x = _clamp(vertices[-1][0] + step * math.cos(angle), 0, size)
        y = _clamp(vertices[-1][1] + step * math.sin(angle), 0, size)
        vertices.append((int(x), int(y)))
    width = _scaled(int(rng.uniform(params.min_width, params.max_width)), scale)
    return (("line", tuple(vertices), width),) + tuple(("disc", vertex, width) for vertex in vertices)


def _lama_stroke(size: int, rng: np.random.Generator, params: LamaStrokeParams, scale: float,
                 stroke_index: int) -> Shape:
    primitives = []
    x, y = int(rng.integers(size)), int(rng.integers(size))
    for _ in range(1 + int(rng.integers(5))):
        angle = 0.01 + int(rng.integers(params.max_angle))
        if stroke_index % 2 == 0:
            angle = 2 * math.pi - angle
        length = (10 + int(rng.integers(params.max_len))) * scale
        width = _scaled(5 + int(rng.integers(params.max_width)), scale)
        end_x = int(_clamp(int(x + length * math.sin(angle)), 0, size))
        end_y = int(_clamp(int(y + length * math.cos(angle)), 0, size))
        # Discs on both ends give the round caps of OpenCV's thick lines.
        primitives += [("line", ((x, y), (end_x, end_y)), width), ("disc", (x, y), width), ("disc", (end_x, end_y), width)]
        x, y = end_x, end_y
    return tuple(primitives)


def _lama_boxes(size: int, rng: np.random.Generator, box: BoxParams, scale: float) -> Iterator[Shape]:
    margin = int(round(box.margin * scale))
    room = max(1, size - 2 * margin)
    smallest = min(_scaled(box.bbox_min_size, scale), room)
    largest = max(min(_scaled(box.bbox_max_size, scale), room), smallest + 1)
    for _ in range(int(rng.integers(box.min_times, box.max_times + 1))):
        box_width = min(int(rng.integers(smallest, largest)), room)
        box_height = min(int(rng.integers(smallest, largest)), room)
        left = int(rng.integers(margin, max(margin, size - margin - box_width) + 1))
        top = int(rng.integers(margin, max(margin, size - margin - box_height) + 1))
        yield (("box", (left, top, left + box_width - 1, top + box_height - 1)),)


def _mirror(shape: Shape, size: int, columns: bool, rows: bool) -> Shape:
    """The shape flipped left-right and/or up-down (pixel ``c`` ↔ ``size - 1 - c``)."""
    def point(x, y):
        return (size - 1 - x if columns else x, size - 1 - y if rows else y)

    mirrored = []
    for primitive in shape:
        if primitive[0] == "line":
            mirrored.append(("line", tuple(point(*p) for p in primitive[1]), primitive[2]))
        elif primitive[0] == "disc":
            mirrored.append(("disc", point(*primitive[1]), primitive[2]))
        else:
            left, top, right, bottom = primitive[1]
            (x0, y0), (x1, y1) = point(left, top), point(right, bottom)
            mirrored.append(("box", (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))))
    return tuple(mirrored)


def _paint(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    for primitive in shape:
        if primitive[0] == "line":
            draw.line(primitive[1], fill=255, width=primitive[2])
        elif primitive[0] == "disc":
            (x, y), radius = primitive[1], primitive[2] // 2
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
        else:
            draw.rectangle(primitive[1], fill=255)


def _preset_shapes(size: int, rng: np.random.Generator, config: FreeFormConfig) -> Iterator[Shape]:
    """The shapes of one preset mask, drawn lazily from ``rng``; their union is the mask."""
    params = config.parameters
    scale = size / config.reference_size
    if isinstance(params, BrushStrokeParams):
        stroke_count = int(rng.integers(params.min_strokes, params.max_strokes + 1))
        flip_columns = params.random_flips and bool(rng.random() < 0.5)
        flip_rows = params.random_flips and bool(rng.random() < 0.5)
        for _ in range(stroke_count):
            yield _mirror(_brush_stroke(size, rng, params, scale), size, flip_columns, flip_rows)
        return
    if params.box is not None and rng.random() < params.box_proba / (1.0 + params.box_proba):
        yield from _lama_boxes(size, rng, params.box, scale)
        return
    for stroke_index in range(int(rng.integers(params.min_times, params.max_times + 1))):
        yield _lama_stroke(size, rng, params, scale, stroke_index)


class _Canvas:
    """A growing mask: shapes are painted onto one 8-bit image (white = hole)."""

    def __init__(self, size: int):
        self.image = Image.new("L", (size, size), 0)
        self.draw = ImageDraw.Draw(self.image)

    def paint(self, shape: Shape) -> None:
        _paint(self.draw, shape)

    def mask(self) -> np.ndarray:
        return (np.asarray(self.image) > 0).astype(np.uint8)

    def ratio(self) -> float:
        return hole_ratio(np.asarray(self.image))


def generate_mask(size: int, rng: np.random.Generator, config: FreeFormConfig | None = None) -> np.ndarray:
    """One preset mask, ``uint8 [size, size]`` with 1 = hole, drawn from ``rng``."""
    _check_size(size)
    config = config or FreeFormConfig()
    canvas = _Canvas(size)
    for shape in _preset_shapes(size, rng, config):
        canvas.paint(shape)
    return canvas.mask()


MAX_SHAPES_PER_TRY = 2000


def generate_mask_in_bin(size: int, label: str, seed: int, config: FreeFormConfig | None = None,
                         max_tries: int = 1000) -> tuple[np.ndarray, float]:
    """A mask whose hole ratio lies in bin ``label``, and that ratio; deterministic in ``seed``.

    See the module doc for the rule (keep, add shapes, or restart). Raises :class:`UserError` when no
    mask of ``size²`` pixels can have such a ratio, or when ``max_tries`` restarts all missed.
    """
    _check_size(size)
    config = config or FreeFormConfig()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"mask seed must be a non-negative integer, got {seed!r}")
    lo, hi = parse_bin(label)
    pixel_count = size * size
    if not _bin_is_reachable(lo, hi, pixel_count):
        raise UserError(f"no {size}x{size} mask can have a hole ratio in {label} (ratios are multiples of "
                        f"1/{pixel_count}); use a larger image size or a wider bin")
    rng = np.random.default_rng(int(seed))
    for _ in range(max_tries):
        canvas = _draw_until_above(size, rng, config, lo)
        ratio = canvas.ratio()
        if lo < ratio <= hi:
            return canvas.mask(), ratio
    raise UserError(f"could not draw a {size}x{size} {config.preset!r} mask with a hole ratio in {label} in "
                    f"{max_tries} tries (seed {seed}); choose another preset or bin")


def _draw_until_above(size: int, rng: np.random.Generator, config: FreeFormConfig, lo: float) -> _Canvas:
    """One preset mask, then shapes of further preset masks one at a time while the ratio is ≤ ``lo``."""
    canvas = _Canvas(size)
    for shape in _preset_shapes(size, rng, config):
        canvas.paint(shape)
    added = 0
    while canvas.ratio() <= lo and added < MAX_SHAPES_PER_TRY:
        for shape in _preset_shapes(size, rng, config):
            canvas.paint(shape)
            added += 1
            if canvas.ratio() > lo or added >= MAX_SHAPES_PER_TRY:
                break
    return canvas


# ----------------------------------------------------------------------------- training masks
class TrainMaskSampler:
    """Free-form training masks with hole ratio in ``(0, max_ratio]``, as float ``[B, 1, H, W]``.

    Batch ``n`` is drawn from ``default_rng([seed, n])``, so the masks depend only on the seed and
    how many batches came before; :meth:`state_dict` / :meth:`load_state_dict` carry that count.
    """

    MAX_DRAWS_PER_MASK = 1000

    def __init__(self, size: int, seed: int, config: FreeFormConfig | None = None, max_ratio: float = 0.6):
        _check_size(size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UserError(f"mask sampler seed must be a non-negative integer, got {seed!r}")
        if not 0.0 < max_ratio <= 1.0:
            raise UserError(f"max mask ratio must lie in (0, 1], got {max_ratio!r}")
        self.size, self.seed, self.max_ratio = size, seed, float(max_ratio)
        self.config = config or FreeFormConfig()
        self.batches_drawn = 0

    def sample(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
        rng = np.random.default_rng([self.seed, self.batches_drawn])
        masks = np.stack([self._one_mask(rng) for _ in range(batch_size)])
        self.batches_drawn += 1
        return torch.from_numpy(masks.astype(np.float32))[:, None].to(device)

    def _one_mask(self, rng: np.random.Generator) -> np.ndarray:
        for _ in range(self.MAX_DRAWS_PER_MASK):
            mask = generate_mask(self.size, rng, self.config)
            if 0.0 < hole_ratio(mask) <= self.max_ratio:
                return mask
        raise UserError(f"the {self.config.preset!r} preset never gave a {self.size}x{self.size} mask with hole "
                        f"ratio <= {self.max_ratio} in {self.MAX_DRAWS_PER_MASK} draws; raise max_ratio")

    def state_dict(self) -> dict:
        return {"size": self.size, "seed": self.seed, "max_ratio": self.max_ratio,
                "config": self.config.record(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        expected = {"size": self.size, "seed": self.seed, "max_ratio": self.max_ratio, "config": self.config.record()}
        found = {key: state.get(key) for key in expected}
        if found != expected:
            changed = next(key for key in expected if found[key] != expected[key])
            raise UserError(f"mask sampler state is for {changed}={found[changed]!r}, not {expected[changed]!r}; "
                            "resume with the settings of the original run")
        self.batches_drawn = int(state["batches_drawn"])


# ----------------------------------------------------------------------------- NVIDIA test masks
MASK_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")
NVIDIA_LAYOUT = ("expected the NVIDIA irregular mask test set (Liu et al. 2018: 12,000 PNGs, 00000.png … "
                 "11999.png, white = hole) or any folder of square mask images")


@dataclass(frozen=True)
class NvidiaMask:
    path: str  # absolute
    bin_label: str | None  # NVIDIA bin of the measured ratio; None outside (0, 0.6]
    border: bool  # some hole pixel lies on the outermost row or column
    ratio: float  # hole ratio measured after resizing (see nvidia_mask_set)


def list_mask_files(folder: str | os.PathLike) -> list[Path]:
    """Mask images under ``folder`` (recursive, hidden names skipped), sorted by relative path."""
    root = Path(folder)
    found = []
    for directory, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.extend(Path(directory) / name for name in files
                     if not name.startswith(".") and name.lower().endswith(MASK_EXTENSIONS))
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def nvidia_mask_set(folder: str | os.PathLike, size: int | None = None) -> list[NvidiaMask]:
    """Every mask in ``folder`` with its measured bin, ratio and border flag, sorted by relative path.

    The ratio is measured after resizing to ``size``² (the file's own size when None). Per-file
    resize / non-binary warnings are summarised in one warning each.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise UserError(f"{root}: mask folder does not exist; {NVIDIA_LAYOUT}")
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; {NVIDIA_LAYOUT}")
    paths = list_mask_files(root)
    if not paths:
        raise UserError(f"{root}: no mask images found; {NVIDIA_LAYOUT}")
    masks, noted = [], {}
    for path in paths:
        mask, notes = _load_mask(path.resolve(), size)
        for category, message in notes:
            noted.setdefault(category, []).append(message)
        ratio = hole_ratio(mask)
        masks.append(NvidiaMask(str(path.resolve()), nvidia_bin(ratio), _touches_border(mask), ratio))
    for category, messages in noted.items():
        warnings.warn(f"{len(messages)} of {len(paths)} masks in {root}: {messages[0]} (and likewise for the others)",
                      category, stacklevel=2)
    outside = sum(mask.bin_label is None for mask in masks)
    if outside * 2 > len(masks):
        warnings.warn(f"{outside} of {len(masks)} masks in {root} have hole ratios outside (0, 0.6]; are the holes "
                      "black? sahn-bench reads white as hole", MaskWarning, stacklevel=2)
    return masks


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
