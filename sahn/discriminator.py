"""SAHN's mask-guided discriminator D (the paper's §3.2, Figure 4).

Four 4×4 convolutions, each halving the resolution, with spectral norm and LeakyReLU(0.2) between; the
last outputs one logit per patch (a 16×16 map for a 256² input). D sees real images I_full and restored
images I_pred = I_full ⊙ (1 − M) + I_out ⊙ M — the known pixels of a fake are real, so D must find the
generated region: that is what makes it "mask-guided".
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class MaskGuidedDiscriminator(nn.Module):
    def __init__(self, channels: Sequence[int] = (64, 128, 256), in_channels: int = 3, use_spectral_norm: bool = True):
        super().__init__()
        widths = [in_channels, *channels, 1]
        layers: list[nn.Module] = []
        for index in range(len(widths) - 1):
            conv = nn.Conv2d(widths[index], widths[index + 1], kernel_size=4, stride=2, padding=1)
            layers.append(spectral_norm(conv) if use_spectral_norm else conv)
            if index < len(widths) - 2:
                layers.append(nn.LeakyReLU(0.2, inplace=True))
        self.body = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] → patch logits [B, 1, H/16, W/16]."""
        return self.body(images * 2 - 1)
