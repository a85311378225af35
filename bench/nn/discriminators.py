"""Discriminators shared by several methods.

:class:`PatchDiscriminator` is EdgeConnect's 5-layer PatchGAN (knazeri/edge-connect, src/networks.py), which
SPL, SPN and CTSDG reuse unchanged. Module names follow the official class so that official
``*_dis.pth`` state_dicts load strictly:

- ``conv1`` … ``conv5`` are ``nn.Sequential`` blocks whose conv is at index 0;
- the official class also binds the first block under a second name, ``features``; PyTorch writes a shared
  module once per name, so official state_dicts hold ``conv1.0.*`` *and* ``features.0.*``. We keep the alias;
- spectral norm is the hook-based :func:`torch.nn.utils.spectral_norm`, whose state_dict keys
  (``weight_orig``, ``weight_u``, ``weight_v``) are the ones in the released files. The newer
  parametrization API would name them ``parametrizations.weight.original`` etc.
"""
from __future__ import annotations

import torch
from torch import nn

#: official initialisation (BaseNetwork.init_weights, 'normal'): N(0, 0.02) conv weights, zero biases
INIT_STD = 0.02


def init_conv_(conv: nn.Module, std: float = INIT_STD) -> nn.Module:
    """N(0, std) weights and zero bias; call before wrapping in spectral norm (then ``weight_orig`` gets it)."""
    nn.init.normal_(conv.weight, 0.0, std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def maybe_spectral_norm(module: nn.Module, enabled: bool) -> nn.Module:
    """Hook-based spectral norm (official key names) when ``enabled``; the bare module otherwise."""
    return nn.utils.spectral_norm(module) if enabled else module


class PatchDiscriminator(nn.Module):
    """conv4 s2 → 64, s2 → 128, s2 → 256, s1 → 512, s1 → 1 (LeakyReLU 0.2 between), optional sigmoid.

    ``forward`` returns ``(output, [conv1, …, conv5])``: the intermediate activations are what EdgeConnect's
    feature-matching loss compares. ``base_channels`` scales the widths (64 in every official model); as in
    the official class, convs have a bias only when spectral norm is off.
    """

    def __init__(self, in_channels: int, use_sigmoid: bool = True, use_spectral_norm: bool = True,
                 base_channels: int = 64):
        super().__init__()
        self.use_sigmoid = use_sigmoid
        widths = [in_channels] + [base_channels * m for m in (1, 2, 4, 8)] + [1]
        strides = (2, 2, 2, 1, 1)
        blocks = []
        for index, stride in enumerate(strides):
            conv = init_conv_(nn.Conv2d(widths[index], widths[index + 1], kernel_size=4, stride=stride, padding=1,
                                        bias=not use_spectral_norm))
            layers = [maybe_spectral_norm(conv, use_spectral_norm)]
            if index < len(strides) - 1:
                layers.append(nn.LeakyReLU(0.2, inplace=True))
            blocks.append(nn.Sequential(*layers))
        self.conv1 = blocks[0]
        self.features = self.conv1  # second name of the first block, as in the official class (see module doc)
        self.conv2, self.conv3, self.conv4, self.conv5 = blocks[1:]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        activations = []
        for block in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            x = block(x)
            activations.append(x)
        output = torch.sigmoid(x) if self.use_sigmoid else x
        return output, activations
