"""Grayscale and Canny edge maps as EdgeConnect and CTSDG compute them, batched over tensors.

Both official codes use scikit-image: ``skimage.color.rgb2gray`` and ``skimage.feature.canny`` (σ = 2,
default hysteresis thresholds 0.1/0.2). Those run on CPU numpy, one image at a time, so these wrappers
move the batch to CPU float64 (the precision scikit-image works in for uint8 input, as in the official
datasets), compute, and return a tensor on the input's device and dtype.

Masks follow the harness convention, 1 = hole. With ``masks`` given, Canny sees only the known pixels
(``mask=`` the known region): scikit-image then smooths with a mask-normalised Gaussian and suppresses
edges along the mask border, so hole pixels cannot influence the result. EdgeConnect does this at test
time; in training it computes edges on the whole image.
"""
from __future__ import annotations

import numpy as np
import torch
from skimage.color import rgb2gray
from skimage.feature import canny

#: EdgeConnect's and CTSDG's σ of Canny's Gaussian (config SIGMA: 2)
DEFAULT_SIGMA = 2.0


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def _like(array: np.ndarray, reference: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(array).to(device=reference.device, dtype=reference.dtype)


def _gray_array(images: torch.Tensor) -> np.ndarray:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected [B,3,H,W] RGB images, got {tuple(images.shape)}")
    return rgb2gray(_to_numpy(images), channel_axis=1)  # [B,H,W] float64


def _canny_array(gray: np.ndarray, sigma: float, masks: torch.Tensor | None) -> np.ndarray:
    if masks is not None and tuple(masks.shape) != (gray.shape[0], 1, *gray.shape[1:]):
        raise ValueError(f"masks {tuple(masks.shape)} do not match the images ({gray.shape[0]}, 1, {gray.shape[1:]})")
    known_regions = [None] * len(gray) if masks is None else list(_to_numpy(masks)[:, 0] < 0.5)
    return np.stack([canny(image, sigma=sigma, mask=known) for image, known in zip(gray, known_regions)])


def rgb_to_gray(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] RGB in [0,1] → [B,1,H,W] luminance by scikit-image's ``rgb2gray`` (0.2125 R + 0.7154 G + 0.0721 B)."""
    return _like(_gray_array(images)[:, None], images)


def canny_edges(gray: torch.Tensor, sigma: float = DEFAULT_SIGMA, masks: torch.Tensor | None = None) -> torch.Tensor:
    """[B,1,H,W] gray in [0,1] → [B,1,H,W] binary Canny edges (1 = edge) by ``skimage.feature.canny``.

    ``masks`` ([B,1,H,W], 1 = hole) restricts the detector to the known pixels; None uses the whole image.
    """
    if gray.ndim != 4 or gray.shape[1] != 1:
        raise ValueError(f"expected [B,1,H,W] gray images, got {tuple(gray.shape)}")
    edges = _canny_array(_to_numpy(gray)[:, 0], sigma, masks)
    return _like(edges[:, None].astype(np.float64), gray)


def gray_and_edges(images: torch.Tensor, sigma: float = DEFAULT_SIGMA,
                   masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rgb_to_gray(images)`` and its Canny edges (known pixels only when ``masks`` is given), as tensors like
    ``images``. Canny runs on the float64 gray image, as in the official datasets, not on its float32 copy."""
    gray = _gray_array(images)
    edges = _canny_array(gray, sigma, masks)
    return _like(gray[:, None], images), _like(edges[:, None].astype(np.float64), images)
