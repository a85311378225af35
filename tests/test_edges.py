"""Grayscale and Canny helpers (bench.data.edges): scikit-image's results, batched; known pixels only with a mask."""
import numpy as np
import pytest
import torch
from skimage.feature import canny

from bench.data.edges import canny_edges, gray_and_edges, rgb_to_gray


def square_images(batch: int = 2, size: int = 32) -> torch.Tensor:
    """Dark background with a bright square per image (different places), plus mild noise: clear edges."""
    generator = torch.Generator().manual_seed(0)
    images = 0.2 + 0.05 * torch.rand(batch, 3, size, size, generator=generator)
    for index in range(batch):
        start = 4 + 3 * index
        images[index, :, start:start + 10, start:start + 12] = 0.9
    return images


def hole_masks(batch: int = 2, size: int = 32) -> torch.Tensor:
    masks = torch.zeros(batch, 1, size, size)
    masks[:, :, 14:26, 12:28] = 1
    return masks


def test_gray_is_the_itu_r_601_luminance_skimage_uses():
    images = torch.rand(3, 3, 8, 9, generator=torch.Generator().manual_seed(1))
    expected = 0.2125 * images[:, 0] + 0.7154 * images[:, 1] + 0.0721 * images[:, 2]
    gray = rgb_to_gray(images)
    assert gray.shape == (3, 1, 8, 9)
    torch.testing.assert_close(gray[:, 0], expected, rtol=0, atol=1e-6)


def test_batched_canny_equals_skimage_per_image():
    gray = rgb_to_gray(square_images())
    edges = canny_edges(gray, sigma=2.0)
    assert edges.shape == gray.shape and edges.dtype == gray.dtype
    for index in range(len(gray)):
        expected = canny(gray[index, 0].double().numpy(), sigma=2.0)
        assert expected.any()
        np.testing.assert_array_equal(edges[index, 0].numpy(), expected.astype(np.float32))


def test_masked_canny_ignores_hole_pixels():
    images, masks = square_images(), hole_masks()
    altered = images.clone()
    altered[:, :, 14:26, 12:28] = torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(2))
    _, edges = gray_and_edges(images, masks=masks)
    _, altered_edges = gray_and_edges(altered, masks=masks)
    torch.testing.assert_close(edges, altered_edges, rtol=0, atol=0)
    assert edges.sum() > 0  # the known part of each square still has edges
    assert edges[masks > 0].sum() == 0  # and nothing is detected inside the holes
    # without the mask the same change does move the edges, so the check above is not vacuous
    assert not torch.equal(gray_and_edges(images)[1], gray_and_edges(altered)[1])


def test_gray_and_edges_agree_with_the_separate_helpers():
    images, masks = square_images(), hole_masks()
    gray, edges = gray_and_edges(images, sigma=2.0, masks=masks)
    torch.testing.assert_close(gray, rgb_to_gray(images))
    torch.testing.assert_close(edges, canny_edges(rgb_to_gray(images), sigma=2.0, masks=masks))


def test_outputs_follow_the_input_dtype():
    images = square_images().double()
    gray, edges = gray_and_edges(images)
    assert gray.dtype == edges.dtype == torch.float64 and gray.device == images.device


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        rgb_to_gray(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError):
        canny_edges(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError):
        canny_edges(torch.rand(2, 1, 8, 8), masks=torch.zeros(2, 1, 4, 4))
