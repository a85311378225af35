"""Layers shared by the semantic-prior methods (SPL, SPN, SAHN) and the GAN baselines.

- :class:`ResnetBlock` — EdgeConnect's residual block (reflection padding, optional dilation, InstanceNorm).
- :class:`ShortcutResBlock` — a residual block whose input and output widths may differ (1×1 shortcut).
- :class:`PixelShuffleUp` — conv → PixelShuffle ×2 → ReLU, the learned upsampler of SPN's pyramid.
- :class:`SPADE` / :class:`SPADEResBlock` — spatially-adaptive normalisation (Park et al. 2019) with a
  *pluggable* convolution, so a method can swap the plain 3×3 conv for :class:`DeformableConv2d`.
- :class:`FrozenNetworks` — a mixin that keeps frozen pretrained networks (teachers, perceptual-loss
  networks) out of ``state_dict``, ``parameters()`` and every optimiser while still moving them with ``.to``.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DeformConv2d


# --------------------------------------------------------------------- pluggable 3×3 convolutions
class ConvFactory(Protocol):
    def __call__(self, in_channels: int, out_channels: int, *, dilation: int = 1) -> nn.Module: ...


def plain_conv3x3(in_channels: int, out_channels: int, *, dilation: int = 1) -> nn.Module:
    """A 'same' 3×3 convolution (zero padding), the default conv of every block here."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=dilation, dilation=dilation)


class DeformableConv2d(nn.Module):
    """3×3 deformable convolution (Dai et al. 2017, v1): a plain conv predicts one (Δy, Δx) per kernel tap
    and pixel from the input, and the kernel samples the input there (bilinear, zero outside).

    Weights live in a :class:`torchvision.ops.DeformConv2d`. On CUDA its kernel runs; elsewhere
    :func:`gather_deform_conv2d` computes the same function (equal to torchvision's to float rounding,
    tested) faster than torchvision's CPU backward (docs/measurements.md), and on any device.
    The offset conv starts at zero, so a fresh layer computes exactly the regular convolution and
    learns to deform from there (the usual initialisation; random offsets would scramble early training).
    """

    def __init__(self, in_channels: int, out_channels: int, *, dilation: int = 1, kernel_size: int = 3):
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.offset = nn.Conv2d(in_channels, 2 * kernel_size * kernel_size, kernel_size,
                                padding=padding, dilation=dilation)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.conv = DeformConv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset(x)
        if x.is_cuda:
            return self.conv(x, offset)
        return gather_deform_conv2d(x, offset, self.conv.weight, self.conv.bias,
                                    padding=self.conv.padding[0], dilation=self.conv.dilation[0])


def gather_deform_conv2d(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         *, padding: int, dilation: int = 1) -> torch.Tensor:
    """Stride-1 deformable convolution in plain PyTorch, with torchvision's offset layout
    (``offset[:, 2k]`` = Δy, ``offset[:, 2k+1]`` = Δx for kernel tap k, row-major) and sampling rule.

    Each tap's sampling positions are bilinearly interpolated from the four neighbouring pixels
    (gathers; a neighbour outside the image counts as 0), then one matmul applies the kernel.
    """
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w
    out_h, out_w = height + 2 * padding - dilation * (kernel_h - 1), width + 2 * padding - dilation * (kernel_w - 1)
    tap_y, tap_x = torch.meshgrid(torch.arange(kernel_h, device=x.device), torch.arange(kernel_w, device=x.device),
                                  indexing="ij")
    tap_y = (tap_y.reshape(1, taps, 1, 1) * dilation - padding).to(x.dtype)
    tap_x = (tap_x.reshape(1, taps, 1, 1) * dilation - padding).to(x.dtype)
    rows = torch.arange(out_h, device=x.device, dtype=x.dtype).view(1, 1, out_h, 1)
    cols = torch.arange(out_w, device=x.device, dtype=x.dtype).view(1, 1, 1, out_w)
    offset = offset.view(batch, taps, 2, out_h, out_w)
    sample_y = rows + tap_y + offset[:, :, 0]  # [B, taps, out_h, out_w]
    sample_x = cols + tap_x + offset[:, :, 1]
    top, left = sample_y.floor(), sample_x.floor()
    frac_y, frac_x = sample_y - top, sample_x - left
    top, left = top.long(), left.long()
    flat = x.reshape(batch, channels, height * width)
    sampled = x.new_zeros(())
    for dy, weight_y in ((0, 1 - frac_y), (1, frac_y)):
        for dx, weight_x in ((0, 1 - frac_x), (1, frac_x)):
            y, x_ = top + dy, left + dx
            inside = (y >= 0) & (y < height) & (x_ >= 0) & (x_ < width)
            index = (y.clamp(0, height - 1) * width + x_.clamp(0, width - 1)).view(batch, 1, -1)
            values = flat.gather(2, index.expand(batch, channels, index.shape[-1]))
            corner_weight = (weight_y * weight_x * inside).view(batch, 1, -1)
            sampled = sampled + values * corner_weight  # [B, C, taps·out_h·out_w]
    sampled = sampled.view(batch, channels, taps, out_h * out_w)
    out = torch.einsum("bckp,ock->bop", sampled, weight.reshape(out_channels, channels, taps))
    out = out.view(batch, out_channels, out_h, out_w)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def deformable_conv3x3(in_channels: int, out_channels: int, *, dilation: int = 1) -> nn.Module:
    return DeformableConv2d(in_channels, out_channels, dilation=dilation)


# --------------------------------------------------------------------- residual blocks
class ShortcutResBlock(nn.Module):
    """Residual block from ``in_channels`` to ``out_channels``; the shortcut is a 1×1 conv when they differ.

    Used where a block consumes a concatenation (upsampled coarse features ⊕ encoder skip features)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(dilation),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, dilation=dilation),
            nn.InstanceNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(out_channels, out_channels, kernel_size=3),
            nn.InstanceNorm2d(out_channels),
        )
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.body(x)


class ResnetBlock(ShortcutResBlock):
    """x + IN(conv3(ReLU(IN(conv3_dilated(x))))) with reflection padding (EdgeConnect's block): the
    :class:`ShortcutResBlock` whose widths agree, so its shortcut is the identity."""

    def __init__(self, channels: int, dilation: int = 1):
        super().__init__(channels, channels, dilation)


class PixelShuffleUp(nn.Module):
    """×``scale`` learned upsampling: conv3 to ``out_channels·scale²`` → PixelShuffle → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels * scale * scale, kernel_size=3, padding=1),
            nn.PixelShuffle(scale),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# --------------------------------------------------------------------- SPADE
class SPADE(nn.Module):
    """out = (1 + γ(c)) · IN(x) + β(c), with parameter-free InstanceNorm and γ, β predicted from the
    condition map ``c`` (nearest-resized to ``x``): a shared conv3 + ReLU, then one conv3 each for γ and β.

    Writing the scale as 1 + γ is the usual parametrisation of Park et al.'s γ: a fresh block starts
    near the identity modulation. ``conv`` builds the γ/β convolutions (plain by default).
    """

    def __init__(self, channels: int, condition_channels: int, hidden_channels: int = 128,
                 conv: ConvFactory = plain_conv3x3):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.shared = nn.Sequential(conv(condition_channels, hidden_channels), nn.ReLU(inplace=True))
        self.gamma = conv(hidden_channels, channels)
        self.beta = conv(hidden_channels, channels)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if condition.shape[-2:] != x.shape[-2:]:
            condition = F.interpolate(condition, size=x.shape[-2:], mode="nearest")
        hidden = self.shared(condition)
        return self.norm(x) * (1 + self.gamma(hidden)) + self.beta(hidden)


class SPADEResBlock(nn.Module):
    """SPADE → LeakyReLU(0.2) → conv3, twice, plus a shortcut (SPADE → 1×1 conv when widths differ).

    ``conv`` builds the block's two 3×3 convolutions (where a method may use deformable convs);
    ``spade_conv`` builds the γ/β convolutions inside each SPADE.
    """

    def __init__(self, in_channels: int, out_channels: int, condition_channels: int, hidden_channels: int = 128,
                 conv: ConvFactory = plain_conv3x3, spade_conv: ConvFactory = plain_conv3x3, dilation: int = 1):
        super().__init__()
        middle = min(in_channels, out_channels)
        self.norm_0 = SPADE(in_channels, condition_channels, hidden_channels, spade_conv)
        self.conv_0 = conv(in_channels, middle, dilation=dilation)
        self.norm_1 = SPADE(middle, condition_channels, hidden_channels, spade_conv)
        self.conv_1 = conv(middle, out_channels, dilation=dilation)
        self.learned_shortcut = in_channels != out_channels
        if self.learned_shortcut:
            self.norm_s = SPADE(in_channels, condition_channels, hidden_channels, spade_conv)
            self.conv_s = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, condition)) if self.learned_shortcut else x
        out = self.conv_0(F.leaky_relu(self.norm_0(x, condition), 0.2))
        out = self.conv_1(F.leaky_relu(self.norm_1(out, condition), 0.2))
        return shortcut + out


# --------------------------------------------------------------------- frozen networks
class FrozenNetworks:
    """Mixin for an ``nn.Module`` that uses frozen pretrained networks it must not train or save.

    Networks given to :meth:`hold_frozen` live in a plain dict, so they are not submodules: they are
    absent from ``state_dict`` (checkpoints stay small and load without the pretrained files), from
    ``parameters()`` (no optimiser can see them) and from ``num_parameters``. ``.to()/.cuda()/.double()``
    still reach them through :meth:`_apply`. List the mixin before ``nn.Module`` in the bases.
    """

    def hold_frozen(self, role: str, network: nn.Module) -> nn.Module:
        network.eval()
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        self.__dict__.setdefault("_frozen_networks", {})[role] = network
        return network

    def frozen(self, role: str) -> nn.Module:
        return self.__dict__["_frozen_networks"][role]

    def frozen_networks(self) -> dict[str, nn.Module]:
        return dict(self.__dict__.get("_frozen_networks", {}))

    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        for network in self.__dict__.get("_frozen_networks", {}).values():
            network._apply(fn)
        return result
