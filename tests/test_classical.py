import pytest
import torch

from bench import create_method


def ramp(size=32):
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([x, y, (x + y) / 2])[None]


@pytest.mark.parametrize("name", ["biharmonic", "diffusion_fill"])
def test_fills_a_smooth_image_and_keeps_known_pixels(name):
    image = ramp()
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 10:26] = 1
    method = create_method(name)
    out = method.inpaint(image, mask)
    assert out.shape == image.shape
    known = mask.expand_as(image) == 0
    assert torch.allclose(out[known], image[known], atol=1e-6)
    # A linear ramp is harmonic and biharmonic: both fills must reproduce it inside the hole.
    assert (out - image).abs().max() < 0.01
    assert not method.trainable


def test_diffusion_fill_handles_empty_and_full_masks_and_odd_sizes():
    method = create_method("diffusion_fill")
    image = torch.rand(2, 3, 37, 23)
    assert torch.equal(method.inpaint(image, torch.zeros(2, 1, 37, 23)), image)
    full = method.inpaint(image, torch.ones(2, 1, 37, 23))
    assert torch.isfinite(full).all() and full.shape == image.shape


def test_classical_methods_follow_the_input_device():
    method = create_method("diffusion_fill").to("meta")
    assert method.device.type == "meta"
