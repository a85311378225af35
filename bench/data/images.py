"""Reading, writing and converting images: the one place where files become arrays and back.

Decisions every caller inherits (and the tests pin down):

* ``read_image`` always returns ``uint8 [H, W, 3]`` RGB.
  - 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I``) is scaled by ``round(v / 257)`` so that
    65535 maps to 255; Pillow's own ``convert`` clips instead, which turns most 16-bit photos white.
    ``I`` images (32-bit ints) must hold values in ``[0, 65535]``; anything else is refused.
  - Float images (``F``) must hold values in ``[0, 1]`` and are scaled by 255; other ranges are
    refused rather than guessed.
  - Transparent images (``RGBA``, ``LA``, ``PA``, palettes with a transparent index) are composited
    over **white**, so the RGB under a fully transparent pixel never leaks into the result.
  - ``CMYK`` uses Pillow's conversion; embedded ICC profiles are ignored (no colour management,
    like the reference repositories). The EXIF orientation tag is applied, as image viewers do.
  - Multi-frame files (GIF, multi-page TIFF) contribute their first frame.
* Crops: ``"center"`` takes the centred square of side ``min(H, W)``; ``"celeba"`` the centred
  178×178 square (CTSDG and SPL crop aligned CelebA 178×218 this way); ``"resize"`` keeps the whole
  image and changes its aspect ratio (Paris StreetView in SPL/CTSDG). The result is resized to
  ``size × size`` with Pillow's bicubic filter, which antialiases when it shrinks.
* Bad files are a :class:`UserError` with one line naming the file. Truncated files are never
  accepted: Pillow's ``LOAD_TRUNCATED_IMAGES`` must stay False and every image is fully decoded.
* ``quantize`` rounds (``torch.round``, half to even) rather than truncating.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from bench.errors import UserError
from bench.files import atomic_write_bytes

CROPS = ("center", "celeba", "resize")
CELEBA_CROP_SIDE = 178
PNG_COMPRESS_LEVEL = 1
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# What Pillow raises on damaged data varies by codec; all of these mean "the bytes are bad".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
Decoded = TypeVar("Decoded")


# ----------------------------------------------------------------------------- reading
def read_image(path: str | os.PathLike, *, size: int | None = None, crop: str = "center") -> np.ndarray:
    """Decode ``path`` to ``uint8 [H, W, 3]`` RGB, crop it (see module doc) and resize to ``size``²."""
    if crop not in CROPS:
        raise UserError(f"unknown crop {crop!r}: expected one of {', '.join(CROPS)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UserError(f"image size must be a positive integer, got {size!r}")
    image = _decode_rgb(Path(path))
    image = _crop(image, crop)
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8)


def _decode_rgb(path: Path) -> Image.Image:
    return decode_image(path, "image", lambda image: _to_rgb(image, path))


def decode_image(path: Path, kind: str, convert: Callable[[Image.Image], Decoded]) -> Decoded:
    """``convert`` of the file's first frame, decoded strictly and turned upright (EXIF orientation).

    Every way a file can be unusable (missing, a folder, empty, unreadable, unrecognised, truncated,
    corrupt, a decompression bomb, or a value ``convert`` refuses) is one :class:`UserError` naming the
    file; ``kind`` ("image", "mask") is the word the messages use for it.
    """
    # With this flag on, Pillow pads a truncated file with grey and returns it as if it were fine.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(f"PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; sahn-bench refuses "
                           f"to read {kind}s that way because truncated files would be scored")
    try:
        if path.is_dir():
            raise UserError(f"{path}: is a folder, not a file")
        if path.stat().st_size == 0:
            raise UserError(f"{path}: {kind} file is empty (0 bytes)")
        with open(path, "rb") as handle, Image.open(handle) as image:
            image.load()
            if image.width == 0 or image.height == 0:
                raise UserError(f"{path}: {kind} has zero size ({image.width}x{image.height})")
            return convert(ImageOps.exif_transpose(image))
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: {kind} file does not exist") from None
    except PermissionError:
        raise UserError(f"{path}: {kind} file cannot be read (permission denied)") from None
    except UnidentifiedImageError:
        raise UserError(f"{path}: not a readable image (unrecognised format, damaged header or zero size)") from None
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: too many pixels to decode safely ({exc})") from None
    except _DECODE_ERRORS as exc:
        raise UserError(f"{path}: corrupt or truncated {kind} file ({_one_line(exc)})") from None


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        return _grey_to_rgb(_sixteen_bit_to_uint8(np.asarray(image), path))
    if mode == "F":
        return _grey_to_rgb(_unit_float_to_uint8(np.asarray(image), path))
    if mode == "P" and "transparency" in image.info:
        return _composite_over_white(image.convert("RGBA"))
    if mode in _ALPHA_MODES:
        return _composite_over_white(image.convert("RGBA"))
    try:
        return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGBX, ...
    except ValueError:
        raise UserError(f"{path}: unsupported image mode {mode!r}") from None


def _sixteen_bit_to_uint8(values: np.ndarray, path: Path) -> np.ndarray:
    values = values.astype(np.int64)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise UserError(f"{path}: integer image values span [{low}, {high}], outside the 16-bit range "
                        "[0, 65535]; convert it to 8-bit first")
    return np.round(values / 257.0).astype(np.uint8)


def _unit_float_to_uint8(values: np.ndarray, path: Path) -> np.ndarray:
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise UserError(f"{path}: float image holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise UserError(f"{path}: float image values span [{low:g}, {high:g}], outside [0, 1]; "
                        "convert it to 8-bit first")
    return np.round(values * 255.0).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")


def _composite_over_white(rgba: Image.Image) -> Image.Image:
    pixels = np.asarray(rgba, dtype=np.float64)
    alpha = pixels[:, :, 3:4] / 255.0
    blended = pixels[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
    return Image.fromarray(np.round(blended).astype(np.uint8), "RGB")


def _crop(image: Image.Image, crop: str) -> Image.Image:
    if crop == "resize":
        return image
    width, height = image.size
    side = min(width, height)
    if crop == "celeba":
        side = min(side, CELEBA_CROP_SIDE)
    if (side, side) == (width, height):
        return image
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ----------------------------------------------------------------------------- writing
def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a ``uint8`` array ``[H, W, 3]`` (RGB) or ``[H, W]`` (grey); deterministic."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        raise TypeError(f"encode_png needs a uint8 numpy array, got {getattr(array, 'dtype', type(array))}")
    if array.ndim == 3 and array.shape[2] == 3:
        image = Image.fromarray(array, "RGB")
    elif array.ndim == 2:
        image = Image.fromarray(array, "L")
    else:
        raise ValueError(f"encode_png needs shape [H, W, 3] or [H, W], got {list(array.shape)}")
    buffer = io.BytesIO()
    # Level 1 is ~3x faster than Pillow's default 6 for ~10% larger files; PNG is lossless either way.
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def write_png(path: str | os.PathLike, array_uint8: np.ndarray) -> Path:
    """Save a ``uint8`` array as PNG atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, encode_png(np.ascontiguousarray(array_uint8)))


# ----------------------------------------------------------------------------- tensors
def to_tensor(array: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` → float ``[3, H, W]`` in ``[0, 1]``."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"to_tensor needs uint8 [H, W, 3], got {array.dtype} {list(array.shape)}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div(255.0)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float ``[..., 3, H, W]`` in ``[0, 1]`` → ``uint8`` by clamping and rounding (never truncating)."""
    if not images.is_floating_point():
        raise TypeError(f"quantize needs a float tensor, got {images.dtype}")
    return (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def to_numpy_uint8(image: torch.Tensor) -> np.ndarray:
    """``uint8 [3, H, W]`` tensor (any device) → ``uint8 [H, W, 3]`` numpy array."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"to_numpy_uint8 needs a uint8 [3, H, W] tensor, got {image.dtype} "
                         f"{list(image.shape)}; quantize float images first")
    return np.ascontiguousarray(image.detach().permute(1, 2, 0).cpu().numpy())
