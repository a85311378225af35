"""Classical inpainting that needs no training: sanity-floor rows in every table.

- ``biharmonic``: scikit-image's biharmonic inpainting (Damelin & Hoang 2018), per image on CPU.
- ``diffusion_fill``: a coarse-to-fine harmonic (Laplace) fill, batched in torch on any device: holes
  are first filled from a masked image pyramid, then relaxed by Jacobi iterations of the heat
  equation with the known pixels as boundary condition at every scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.restoration import inpaint_biharmonic

from bench.methods import InpaintingMethod, apply_overrides, variant


class ClassicalMethod(InpaintingMethod):
    trainable = False

    def __init__(self, config):
        super().__init__(config)
        # An empty buffer gives the method a device, so ``method.to(device)`` works as for networks.
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)


@dataclass
class BiharmonicConfig:
    split_into_regions: bool = True  # solve each hole separately: same result, much faster


class BiharmonicInpainting(ClassicalMethod):
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        outputs = []
        for image, mask in zip(images.detach().cpu().double().numpy(), masks.detach().cpu().numpy()):
            hole = mask[0] > 0.5
            if not hole.any():
                outputs.append(image)
                continue
            filled = inpaint_biharmonic(image.transpose(1, 2, 0), hole, channel_axis=-1,
                                        split_into_regions=self.config.split_into_regions)
            outputs.append(filled.transpose(2, 0, 1))
        return torch.from_numpy(np.stack(outputs)).to(images.device, images.dtype).clamp(0, 1)


@dataclass
class DiffusionFillConfig:
    iterations_per_scale: int = 40
    min_size: int = 4  # coarsest pyramid level (pixels per side)


def _masked_downsample(values: torch.Tensor, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average of the known pixels in each 2×2 cell (ceil mode keeps odd sizes)."""
    weight = F.avg_pool2d(known, 2, ceil_mode=True)
    summed = F.avg_pool2d(values * known, 2, ceil_mode=True)
    return summed / weight.clamp_min(1e-8), (weight > 0).to(values.dtype)


def _relax(values: torch.Tensor, known: torch.Tensor, anchor: torch.Tensor, iterations: int) -> torch.Tensor:
    kernel = values.new_tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]])
    kernel = kernel.expand(values.shape[1], 1, 3, 3)
    for _ in range(iterations):
        neighbours = F.conv2d(F.pad(values, (1, 1, 1, 1), mode="replicate"), kernel, groups=values.shape[1])
        values = anchor * known + neighbours * (1 - known)
    return values


class DiffusionFill(ClassicalMethod):
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        known = (masks < 0.5).to(images.dtype)
        pyramid = [(images, known)]
        while min(pyramid[-1][0].shape[-2:]) > self.config.min_size:
            pyramid.append(_masked_downsample(*pyramid[-1]))
        coarse_values, coarse_known = pyramid[-1]
        # Whatever is unknown even at the coarsest level starts from the mean of the known pixels.
        total = (images * known).sum(dim=(2, 3), keepdim=True)
        count = known.sum(dim=(2, 3), keepdim=True).clamp_min(1)
        filled = torch.where(coarse_known > 0, coarse_values, (total / count).expand_as(coarse_values))
        for values, level_known in reversed(pyramid[:-1]):
            guess = F.interpolate(filled, size=values.shape[-2:], mode="bilinear", align_corners=False)
            start = values * level_known + guess * (1 - level_known)
            filled = _relax(start, level_known, values, self.config.iterations_per_scale)
        return filled.clamp(0, 1)


@variant(scale="any", trainable=False, paper_column=8)
def biharmonic(**overrides) -> BiharmonicInpainting:
    return BiharmonicInpainting(apply_overrides(BiharmonicConfig(), overrides))


@variant(scale="any", trainable=False, paper_column=9)
def diffusion_fill(**overrides) -> DiffusionFill:
    return DiffusionFill(apply_overrides(DiffusionFillConfig(), overrides))
