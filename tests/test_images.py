"""bench.data.images: bad files are one-line UserErrors naming the file; every mode becomes the right RGB."""
from __future__ import annotations

import builtins
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from bench.errors import UserError
from bench.data.images import quantize, read_image, to_numpy_uint8, to_tensor, write_png


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise(height: int = 24, width: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _assert_one_line_error_naming(path: Path, excinfo, *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message


# ----------------------------------------------------------------------------- bad files
def test_corrupt_png_is_refused(tmp_path):
    data = bytearray(_png_bytes(_noise()))
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # wipe part of the compressed pixel stream
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(UserError) as excinfo:
        read_image(path)
    _assert_one_line_error_naming(path, excinfo, "corrupt")


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_file_is_refused_not_padded(tmp_path, image_format):
    buffer = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(buffer, format=image_format)
    path = tmp_path / f"truncated.{image_format.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(UserError) as excinfo:
        read_image(path)
    _assert_one_line_error_naming(path, excinfo, "truncated")


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(UserError) as excinfo:
        read_image(path)
    _assert_one_line_error_naming(path, excinfo, "empty")


def test_unreadable_file_is_refused(tmp_path, monkeypatch):
    # chmod cannot make a file unreadable for root (these tests may run as root), so the operating
    # system's refusal is simulated at the one place the reader opens the file.
    path = tmp_path / "locked.png"
    path.write_bytes(_png_bytes(_noise()))
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(UserError) as excinfo:
        read_image(path)
    _assert_one_line_error_naming(path, excinfo, "permission denied")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: chmod 000 does not stop root from reading, so the real permission "
                           "check cannot be exercised (test_unreadable_file_is_refused simulates it instead)")
def test_file_without_read_permission_is_refused(tmp_path):
    path = tmp_path / "locked.png"
    path.write_bytes(_png_bytes(_noise()))
    path.chmod(0)
    try:
        with pytest.raises(UserError) as excinfo:
            read_image(path)
        _assert_one_line_error_naming(path, excinfo, "permission denied")
    finally:
        path.chmod(0o644)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\n")
    with pytest.raises(UserError) as excinfo:
        read_image(path)
    _assert_one_line_error_naming(path, excinfo, "not a readable image")


def test_zero_size_image_is_refused(tmp_path):
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 0, 4, 8, 2, 0, 0, 0)  # width 0, height 4, 8-bit RGB
    path = tmp_path / "zero.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    with pytest.raises(UserError) as excinfo:
        read_image(path)
    _assert_one_line_error_naming(path, excinfo)


def test_missing_file_and_folder_are_refused(tmp_path):
    with pytest.raises(UserError) as excinfo:
        read_image(tmp_path / "absent.png")
    _assert_one_line_error_naming(tmp_path / "absent.png", excinfo, "does not exist")
    folder = tmp_path / "looks_like.png"
    folder.mkdir()
    with pytest.raises(UserError) as excinfo:
        read_image(folder)
    _assert_one_line_error_naming(folder, excinfo, "folder")


def test_truncated_images_stay_refused_even_if_someone_enables_pil_padding(tmp_path, monkeypatch):
    path = tmp_path / "fine.png"
    path.write_bytes(_png_bytes(_noise()))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        read_image(path)


def test_bad_crop_and_size_are_user_errors(tmp_path):
    path = tmp_path / "fine.png"
    path.write_bytes(_png_bytes(_noise()))
    with pytest.raises(UserError, match="crop"):
        read_image(path, crop="squash")
    with pytest.raises(UserError, match="size"):
        read_image(path, size=0)


# ----------------------------------------------------------------------------- modes
def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 65535, 1000, 32896]], dtype=np.uint16)
    # 65535 / 257 = 255, 1000 / 257 = 3.89 -> 4, 32896 / 257 = 128
    expected = np.array([0, 1, 255, 4, 128], dtype=np.uint8)
    little = tmp_path / "little.png"
    Image.frombytes("I;16", (5, 1), values.astype("<u2").tobytes()).save(little)
    big = tmp_path / "big.tif"
    Image.frombytes("I;16B", (5, 1), values.astype(">u2").tobytes()).save(big)
    for path in (little, big):
        rgb = read_image(path, crop="resize")
        assert rgb.dtype == np.uint8 and rgb.shape == (1, 5, 3)
        for channel in range(3):
            np.testing.assert_array_equal(rgb[0, :, channel], expected)


def test_32_bit_integer_image_uses_the_16_bit_range_and_refuses_others(tmp_path):
    inside = tmp_path / "inside.tif"
    Image.fromarray(np.array([[0, 65535, 514]], dtype=np.int32)).save(inside)
    np.testing.assert_array_equal(read_image(inside, crop="resize")[0, :, 0], [0, 255, 2])
    outside = tmp_path / "outside.tif"
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(outside)
    with pytest.raises(UserError) as excinfo:
        read_image(outside, crop="resize")
    _assert_one_line_error_naming(outside, excinfo, "16-bit")


def test_float_image_in_unit_range_is_scaled_and_other_ranges_refused(tmp_path):
    unit = tmp_path / "unit.tif"
    Image.fromarray(np.array([[0.0, 1.0, 0.2]], dtype=np.float32)).save(unit)
    np.testing.assert_array_equal(read_image(unit, crop="resize")[0, :, 1], [0, 255, 51])  # 0.2 * 255 = 51
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0.0, 200.0]], dtype=np.float32)).save(wide)
    with pytest.raises(UserError) as excinfo:
        read_image(wide, crop="resize")
    _assert_one_line_error_naming(wide, excinfo, "[0, 1]")


def test_cmyk_converts_to_the_matching_rgb(tmp_path):
    cmyk = np.array([[[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 0, 255], [0, 0, 0, 0], [51, 0, 255, 0]]], dtype=np.uint8)
    path = tmp_path / "cmyk.tif"
    Image.frombytes("CMYK", (5, 1), cmyk.tobytes()).save(path)
    # RGB = (255 - C, 255 - M, 255 - Y) scaled by (255 - K) / 255
    expected = [[0, 255, 255], [255, 0, 255], [0, 0, 0], [255, 255, 255], [204, 255, 0]]
    np.testing.assert_array_equal(read_image(path, crop="resize")[0], expected)


def test_alpha_is_composited_over_white_not_dropped(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    half = [round(value * 128 / 255 + 255 * 127 / 255) for value in (200, 100, 50)]
    np.testing.assert_array_equal(read_image(path, crop="resize")[0], [[200, 100, 50], [255, 255, 255], half])

    grey_alpha = tmp_path / "la.png"
    Image.fromarray(np.array([[[100, 255], [100, 0]]], dtype=np.uint8), "LA").save(grey_alpha)
    np.testing.assert_array_equal(read_image(grey_alpha, crop="resize")[0], [[100, 100, 100], [255, 255, 255]])


def test_palette_images_with_and_without_transparency(tmp_path):
    indices = np.array([[0, 1]], dtype=np.uint8)
    palette = [255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6)
    opaque = Image.fromarray(indices, "P")
    opaque.putpalette(palette)
    opaque_path = tmp_path / "opaque.png"
    opaque.save(opaque_path)
    np.testing.assert_array_equal(read_image(opaque_path, crop="resize")[0], [[255, 0, 0], [0, 0, 255]])

    transparent_path = tmp_path / "transparent.png"
    opaque.save(transparent_path, transparency=1)  # index 1 (blue) is fully transparent
    assert Image.open(transparent_path).mode == "P"
    np.testing.assert_array_equal(read_image(transparent_path, crop="resize")[0], [[255, 0, 0], [255, 255, 255]])


def test_grey_and_bilevel_images_replicate_to_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), "L").save(grey)
    np.testing.assert_array_equal(read_image(grey, crop="resize")[0], [[0, 0, 0], [77, 77, 77], [255, 255, 255]])
    bilevel = tmp_path / "bilevel.png"
    Image.fromarray(np.array([[False, True]])).convert("1").save(bilevel)
    np.testing.assert_array_equal(read_image(bilevel, crop="resize")[0], [[0, 0, 0], [255, 255, 255]])


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(_noise(2, 4))  # stored 4 wide, 2 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    assert read_image(path, crop="resize").shape == (4, 2, 3)


# ----------------------------------------------------------------------------- crops and resizing
def _row_coded(height: int, width: int) -> np.ndarray:
    rows = np.arange(height, dtype=np.uint8)[:, None].repeat(width, axis=1)
    columns = np.arange(width, dtype=np.uint8)[None, :].repeat(height, axis=0)
    return np.stack([rows, columns, np.zeros_like(rows)], axis=2)


def test_center_crop_takes_the_middle_square(tmp_path):
    path = tmp_path / "wide.png"
    write_png(path, _row_coded(4, 10))
    cropped = read_image(path, crop="center")
    assert cropped.shape == (4, 4, 3)
    np.testing.assert_array_equal(cropped[0, :, 1], [3, 4, 5, 6])  # columns (10 - 4) // 2 = 3 onwards


def test_celeba_crop_is_the_central_178_square(tmp_path):
    path = tmp_path / "aligned.png"
    write_png(path, _row_coded(218, 178))
    cropped = read_image(path, crop="celeba")
    assert cropped.shape == (178, 178, 3)
    assert cropped[0, 0, 0] == 20 and cropped[-1, 0, 0] == 197  # rows (218 - 178) // 2 = 20 .. 197


def test_resize_keeps_the_whole_image_and_sizes_are_exact(tmp_path):
    path = tmp_path / "street.png"
    flat = np.full((30, 52, 3), (10, 120, 230), dtype=np.uint8)
    write_png(path, flat)
    for crop in ("center", "celeba", "resize"):
        out = read_image(path, size=16, crop=crop)
        assert out.shape == (16, 16, 3)
        np.testing.assert_array_equal(out, np.broadcast_to(flat[:16, :16], (16, 16, 3)))
    # "resize" keeps both halves of a left/right split image; "center" keeps only the middle
    halves = np.zeros((20, 60, 3), dtype=np.uint8)
    halves[:, :30] = 255
    write_png(path, halves)
    squashed = read_image(path, size=20, crop="resize")
    assert squashed[:, :8].min() == 255 and squashed[:, -8:].max() == 0


# ----------------------------------------------------------------------------- writing, tensors, hashing
def test_write_png_round_trips_and_creates_folders(tmp_path):
    array = _noise(9, 7)
    path = tmp_path / "new" / "folder" / "out.png"
    write_png(path, array)
    np.testing.assert_array_equal(read_image(path, crop="resize"), array)
    assert sorted(os.listdir(path.parent)) == ["out.png"]


def test_write_png_failure_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    with pytest.raises(TypeError):
        write_png(path, np.zeros((4, 4, 3), dtype=np.float32))

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_png(path, _noise(4, 4))
    assert os.listdir(tmp_path) == []


def test_tensor_round_trip_and_quantize_rounds():
    array = _noise(5, 6)
    tensor = to_tensor(array)
    assert tensor.shape == (3, 5, 6) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    np.testing.assert_array_equal(to_numpy_uint8(quantize(tensor)), array)

    values = torch.tensor([100.6 / 255, 100.4 / 255, -0.2, 1.3, 0.0, 1.0])
    assert quantize(values).tolist() == [101, 100, 0, 255, 0, 255]  # truncation would give 100 for 100.6
    assert quantize(values).dtype == torch.uint8
    with pytest.raises(ValueError):
        to_numpy_uint8(tensor)  # float input must be quantised explicitly first
