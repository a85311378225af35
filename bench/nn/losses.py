"""Training losses shared by the GAN inpainting methods.

- Non-saturating GAN losses on discriminator *logits* (Goodfellow et al. 2014; EdgeConnect's "nsgan"):
  G minimises −log D(fake), D minimises −log D(real) − log(1 − D(fake)), written with softplus.
- Hole-weighted L1: mean(|a − b| · (1 + w·m)) — the form of SPL/SPN's reconstruction and prior losses
  and SAHN's L_rec (‖I_full − I_out‖₁ plus ∂ times the same over the hole) and L_prior.
- The semantic prior loss of SPL/SPN/SAHN: the hole-weighted L1 between teacher features and the
  student's predictions, summed over scales, with the mask resized to each scale.
- :class:`PerceptualLoss`: Σ_i η_i · mean |φ_i(output) − φ_i(target)| on a frozen
  :class:`bench.metrics.pretrained.FeaturePyramid` (VGG16 when its weights resolve, else the labelled Lite0).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import UserError
from bench.metrics.pretrained import FeaturePyramid, loss_network


# --------------------------------------------------------------------- adversarial
def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """−log σ(D(fake)), averaged over patches: the non-saturating generator loss."""
    return F.softplus(-fake_logits).mean()


def discriminator_adversarial_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """−log σ(D(real)) − log(1 − σ(D(fake))), each averaged over patches (the paper's eq. 18)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


# --------------------------------------------------------------------- pixel / feature L1
def hole_weighted_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     hole_weight: float) -> torch.Tensor:
    """mean(|prediction − target| · (1 + hole_weight · mask)); ``mask`` (1 = hole) broadcasts over channels."""
    return ((prediction - target).abs() * (1 + hole_weight * mask)).mean()


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The hole fraction of each cell at ``size`` (area resampling): exact for block-aligned holes, and a
    coarse cell that is partly hole gets a partial weight instead of an all-or-nothing nearest pick."""
    size = tuple(int(s) for s in size)
    if tuple(mask.shape[-2:]) == size:
        return mask
    if size[0] <= mask.shape[-2] and size[1] <= mask.shape[-1]:
        return F.interpolate(mask, size=size, mode="area")
    return F.interpolate(mask, size=size, mode="nearest")


def semantic_prior_loss(predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                        mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Σ_n mean(|F_goal^n − pred^n| · (1 + α·M^n)), with M^n the mask resized to scale n."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predicted scales for {len(targets)} teacher scales")
    total = predictions[0].new_zeros(())
    for prediction, target in zip(predictions, targets):
        if prediction.shape != target.shape:
            raise ValueError(f"prior prediction {tuple(prediction.shape)} vs teacher {tuple(target.shape)}")
        total = total + hole_weighted_l1(prediction, target, resize_mask(mask, target.shape[-2:]), alpha)
    return total


# --------------------------------------------------------------------- perceptual
class PerceptualLoss(nn.Module):
    """Σ_i η_i · mean |φ_i(output) − φ_i(target)| on a frozen feature pyramid; the target's features are
    computed without gradients. Hold it with :class:`bench.nn.layers.FrozenNetworks` so it is never saved."""

    def __init__(self, network: FeaturePyramid, layer_weights: Sequence[float] | None = None):
        super().__init__()
        self.network = network
        self.layer_weights = tuple(layer_weights) if layer_weights is not None else None
        self.name = network.name
        self.provenance = network.provenance

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_features = self.network(target)
        output_features = self.network(output)
        weights = self.layer_weights or (1.0,) * len(output_features)
        if len(weights) != len(output_features):
            raise ValueError(f"{len(weights)} layer weights for {len(output_features)} layers of {self.name}")
        return sum(w * F.l1_loss(a, b) for w, a, b in zip(weights, output_features, target_features))


PERCEPTUAL_NAMES = ("vgg16", "vgg19", "efficientnet_lite0")


def create_perceptual_loss(name: str, layers: Sequence[str], path: str | os.PathLike | None = None,
                           layer_weights: Sequence[float] | None = None,
                           substitute_stages: Sequence[int] = (0, 1, 2, 3)) -> tuple[PerceptualLoss, str | None]:
    """The named loss network (``layers`` of VGG) or the pretrained Lite0 stages ``substitute_stages``.

    Returns ``(loss, substitution)``; ``substitution`` is the line to record in ``method.substitutions``
    whenever the network is not the requested VGG (Lite0 asked for by name, or VGG weights unavailable).
    ``layer_weights`` apply to whichever network is used; None weighs every layer 1.
    """
    if name not in PERCEPTUAL_NAMES:
        raise UserError(f"unknown perceptual network {name!r}; choose one of {', '.join(PERCEPTUAL_NAMES)}")
    network, substitution = loss_network(name, tuple(layers), path, tuple(substitute_stages))
    if name == "efficientnet_lite0":
        substitution = (f"{network.name} (pretrained ImageNet EfficientNet-Lite0, {network.provenance}) "
                        f"instead of the paper's VGG16")
    if substitution is not None and layer_weights is not None and len(layer_weights) != len(substitute_stages):
        layer_weights = None  # weights were given per VGG layer; the substitute has its own layers
    return PerceptualLoss(network, layer_weights), substitution
