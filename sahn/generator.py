"""SAHN's multi-scale semantic-driven generator G (the paper's §3.1, Figures 2–3).

Scales are numbered as in the paper, n = 1 … N (N = 3), finest first: scale n has side H / 2^(n−1) for
an H×H image, i.e. 256, 128, 64 at H = 256. Every list below is ordered the same way (index 0 = n = 1).

    I_broken, I_mask ──E_text (3 convs)──────────────────────────────► F_text (H/4)
          │ ↑×2                                                         │
          └─► E_s (U-Net encoder at 2H) ─► F_s^1 (H), F_s^2 (H/2), F_s^3 (H/4)
                 F_pyr^3 = Multi-ResBlock(F_s^3)
                 F_pyr^n = ResBlock1(PixelShuffle↑(F_pyr^{n+1}) ⊕ F_s^n),  n < N     (⊕ = U-Net skip)
                 prior^n = conv1×1(F_pyr^n)   ── L_prior against the teacher's F_goal^n
                 F_str^n = ResBlock2(F_pyr^n)
          MSF:   x = F_text; for n = N … 1: x = SPADE-ResBlocks^n(x, F_str^n); x = ↑2(x) if n > 1
          I_out = (tanh(conv7(x)) + 1) / 2

The three full-resolution convs that touch pixels (first of E_text, first of E_s, last of MSF) are 7×7
as in SPL/SPN/EdgeConnect; ``outer_kernel`` makes them smaller for CPU-sized variants.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DeformConv2d

from bench.nn.discriminators import init_conv_
from bench.nn.layers import PixelShuffleUp, ResnetBlock, ShortcutResBlock, SPADEResBlock, plain_conv3x3
from sahn.deformable import SAHNDeformableConv2d, deformable_conv3x3_factory

NUM_SCALES = 3


def conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Conv (reflection 'same' padding for odd kernels, padding 1 for the 4×4 stride-2 ones) → IN → ReLU."""
    if kernel_size % 2:
        conv = [nn.ReflectionPad2d(kernel_size // 2), nn.Conv2d(in_channels, out_channels, kernel_size, stride)]
    else:
        conv = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=1)]
    return nn.Sequential(*conv, nn.InstanceNorm2d(out_channels), nn.ReLU(inplace=True))


class TextureEncoder(nn.Module):
    """E_text: three conv layers on I_broken ⊕ I_mask — conv k×k (k = ``outer_kernel``, 7 at the paper's
    size), conv4 s2, conv4 s2 — giving F_text at H/4."""

    def __init__(self, channels: Sequence[int], outer_kernel: int = 7):
        super().__init__()
        c1, c2, c3 = channels
        self.body = nn.Sequential(conv_norm_relu(4, c1, outer_kernel), conv_norm_relu(c1, c2, 4, 2),
                                  conv_norm_relu(c2, c3, 4, 2))

    def forward(self, broken: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([broken, mask], dim=1))


class SemanticPriorMapper(nn.Module):
    """E_s, the pyramid decoder and the 1×1 heads; input is I_broken, I_mask upsampled ×2.

    ``encoder_channels`` = (stem at 2H, F_s^1, F_s^2); F_s^3 has ``pyramid_channels[2]`` channels so the
    Multi-ResBlock keeps its width. ``use_unet=False`` (the paper's "w/o U-Net" ablation) removes the skip
    connections: ResBlock1 then sees only the upsampled coarser level.
    """

    def __init__(self, encoder_channels: Sequence[int], pyramid_channels: Sequence[int],
                 teacher_channels: Sequence[int], multi_res_blocks: int, dilation: int, use_unet: bool,
                 outer_kernel: int = 7):
        super().__init__()
        stem, skip1, skip2 = encoder_channels
        p1, p2, p3 = pyramid_channels
        self.use_unet = use_unet
        self.stem = conv_norm_relu(4, stem, outer_kernel)
        self.down = nn.ModuleList([conv_norm_relu(stem, skip1, 4, 2), conv_norm_relu(skip1, skip2, 4, 2),
                                   conv_norm_relu(skip2, p3, 4, 2)])
        self.multi_res = nn.Sequential(*[ResnetBlock(p3, dilation) for _ in range(multi_res_blocks)])
        # index 0 builds F_pyr^2 from F_pyr^3, index 1 builds F_pyr^1 from F_pyr^2
        self.up = nn.ModuleList([PixelShuffleUp(p3, p2), PixelShuffleUp(p2, p1)])
        skips = (skip2, skip1) if use_unet else (0, 0)
        self.fuse = nn.ModuleList([ShortcutResBlock(p2 + skips[0], p2), ShortcutResBlock(p1 + skips[1], p1)])
        self.heads = nn.ModuleList([nn.Conv2d(p, t, kernel_size=1) for p, t in zip(pyramid_channels, teacher_channels)])

    def forward(self, broken_2x: torch.Tensor, mask_2x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns (F_pyr^1…N, conv1×1(F_pyr^n)…), finest first."""
        x = self.stem(torch.cat([broken_2x, mask_2x], dim=1))
        encoded = []  # F_s^1, F_s^2, F_s^3
        for down in self.down:
            x = down(x)
            encoded.append(x)
        pyramid = [self.multi_res(encoded[2])]  # coarsest first while building
        for up, fuse, skip in zip(self.up, self.fuse, (encoded[1], encoded[0])):
            upsampled = up(pyramid[-1])
            pyramid.append(fuse(torch.cat([upsampled, skip], dim=1) if self.use_unet else upsampled))
        pyramid.reverse()
        return pyramid, [head(level) for head, level in zip(self.heads, pyramid)]


class MultiScaleFusion(nn.Module):
    """MSF: SPADE residual blocks per scale, coarse to fine, nearest ×2 upsampling between scales, then conv7.

    ``blocks[n-1]`` and ``channels[n-1]`` are scale n's block count and width; blocks at the scales in
    ``deformable_scales`` use deformable 3×3 convs, which run ``deform_inference`` (see sahn/deformable.py)
    when no gradient is recorded. ``condition_channels[n-1]`` is the width of the map that modulates scale n
    (F_str^n, or F_str^N at every scale without multi-scale fusion).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], blocks: Sequence[int],
                 condition_channels: Sequence[int], hidden_channels: int, deformable_scales: Sequence[int],
                 outer_kernel: int = 7, deform_inference: str = "auto"):
        super().__init__()
        deformable_conv3x3 = deformable_conv3x3_factory(deform_inference)
        stages = []
        width = in_channels
        for n in range(NUM_SCALES, 0, -1):
            conv = deformable_conv3x3 if n in deformable_scales else plain_conv3x3
            stage = []
            for _ in range(blocks[n - 1]):
                stage.append(SPADEResBlock(width, channels[n - 1], condition_channels[n - 1], hidden_channels, conv=conv))
                width = channels[n - 1]
            stages.append(nn.ModuleList(stage))
        self.stages = nn.ModuleList(stages)  # coarsest scale first
        self.to_image = nn.Sequential(nn.LeakyReLU(0.2), nn.ReflectionPad2d(outer_kernel // 2),
                                      nn.Conv2d(width, 3, kernel_size=outer_kernel))

    def forward(self, texture: torch.Tensor, conditions: Sequence[torch.Tensor]) -> torch.Tensor:
        """``conditions`` finest first (one per scale); returns I_out in [0, 1]."""
        x = texture
        for index, stage in enumerate(self.stages):
            n = NUM_SCALES - index
            for block in stage:
                x = block(x, conditions[n - 1])
            if n > 1:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
        return (torch.tanh(self.to_image(x)) + 1) / 2


@dataclass
class GeneratorOutput:
    image: torch.Tensor  # I_out, [0, 1]
    priors: list[torch.Tensor]  # conv1×1(F_pyr^n), finest first, in the teacher's channels


def init_weights_(module: nn.Module) -> nn.Module:
    """SPL/SPN's initialisation (their ``init_weights('normal')``): every convolution's weight N(0, 0.02)
    and bias 0, deformable kernels included; the offset predictors of deformable convs stay at zero, so a
    fresh deformable conv is a regular one (the standard DCN start)."""
    offset_convs = {id(m.offset) for m in module.modules() if isinstance(m, SAHNDeformableConv2d)}
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, DeformConv2d)) and id(layer) not in offset_convs:
            init_conv_(layer)
    return module


class SAHNGenerator(nn.Module):
    """G: E_text, the semantic prior mapper, ResBlock2 and MSF. ``use_msf=False`` is the paper's
    "w/o multi-scale semantic fusion" ablation: only the coarsest structure F_str^N is built, and it
    modulates every scale (single-scale semantic guidance, as in SPL). Initialised as SPL/SPN
    (:func:`init_weights_`)."""

    def __init__(self, *, texture_channels: Sequence[int], encoder_channels: Sequence[int],
                 pyramid_channels: Sequence[int], teacher_channels: Sequence[int], multi_res_blocks: int,
                 res_dilation: int, msf_channels: Sequence[int], msf_blocks: Sequence[int], spade_hidden: int,
                 deformable_scales: Sequence[int], use_unet: bool, use_msf: bool, outer_kernel: int = 7,
                 deform_inference: str = "auto"):
        super().__init__()
        self.use_msf = use_msf
        self.texture_encoder = TextureEncoder(texture_channels, outer_kernel)
        self.prior_mapper = SemanticPriorMapper(encoder_channels, pyramid_channels, teacher_channels,
                                                multi_res_blocks, res_dilation, use_unet, outer_kernel)
        structured = range(NUM_SCALES) if use_msf else [NUM_SCALES - 1]
        self.structure = nn.ModuleDict({str(i + 1): ResnetBlock(pyramid_channels[i]) for i in structured})
        conditions = pyramid_channels if use_msf else [pyramid_channels[-1]] * NUM_SCALES
        self.fusion = MultiScaleFusion(texture_channels[-1], msf_channels, msf_blocks, conditions, spade_hidden,
                                       deformable_scales, outer_kernel, deform_inference)
        init_weights_(self)

    def forward(self, broken: torch.Tensor, mask: torch.Tensor) -> GeneratorOutput:
        """``broken`` = I_full ⊙ (1 − M) + M and ``mask`` (1 = hole) at H×H, H a multiple of 4."""
        texture = self.texture_encoder(broken, mask)
        broken_2x = F.interpolate(broken, scale_factor=2, mode="bilinear", align_corners=False)
        mask_2x = F.interpolate(mask, scale_factor=2, mode="nearest")
        pyramid, priors = self.prior_mapper(broken_2x, mask_2x)
        if self.use_msf:
            conditions = [self.structure[str(n)](pyramid[n - 1]) for n in range(1, NUM_SCALES + 1)]
        else:
            conditions = [self.structure[str(NUM_SCALES)](pyramid[-1])] * NUM_SCALES
        return GeneratorOutput(self.fusion(texture, conditions), priors)
