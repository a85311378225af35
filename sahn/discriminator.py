"""SAHN's mask-guided discriminator D (the paper's §3.2, Figure 4) and its two readings of the targets.

Four 4×4 convolutions, each halving the resolution, with spectral norm and LeakyReLU(0.2) between; the
last outputs one logit per patch (a 16×16 map for a 256² input). D sees real images I_full and restored
images I_pred = I_full ⊙ (1 − M) + I_out ⊙ M. Convolutions start from N(0, 0.02) as SPL/SPN's.

What D is asked to call fake is ``d_target`` in SAHN's config:

- ``mask`` (the paper's "mask-guided" D, which is "to distinguish between synthetic and non-synthetic
  regions in the restored image"): a patch of I_pred is fake when its receptive field holds at least one
  hole pixel, and real otherwise — outside the holes I_pred *is* I_full. :meth:`fake_patches` computes
  that label map by max-pooling the mask through D's own conv geometry.
- ``image`` (eq. 18 as written): every patch of I_pred is fake, so patches that are
  pixel-identical to real ones get the opposite target.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from bench.run.data_parallel import whole_batch_normaliser
from bench.nn.discriminators import init_conv_

D_TARGETS = ("mask", "image")


class MaskGuidedDiscriminator(nn.Module):
    def __init__(self, channels: Sequence[int] = (64, 128, 256), in_channels: int = 3, use_spectral_norm: bool = True):
        super().__init__()
        widths = [in_channels, *channels, 1]
        layers: list[nn.Module] = []
        for index in range(len(widths) - 1):
            # initialised before spectral norm wraps it, so the norm's power iteration starts from these weights
            conv = init_conv_(nn.Conv2d(widths[index], widths[index + 1], kernel_size=4, stride=2, padding=1))
            layers.append(spectral_norm(conv) if use_spectral_norm else conv)
            if index < len(widths) - 2:
                layers.append(nn.LeakyReLU(0.2, inplace=True))
        self.body = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] → patch logits [B, 1, H/16, W/16]."""
        return self.body(images * 2 - 1)

    def fake_patches(self, masks: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] mask (1 = hole) → [B, 1, h, w] with 1 where a patch's receptive field holds a hole pixel.

        A max-pool with each conv's kernel, stride and padding covers exactly the pixels that conv reads,
        so four of them in a row cover each logit's receptive field (46×46 pixels at stride 16 here,
        clipped at the border), and the label map has the logits' shape for any input size.
        """
        covered = masks
        for layer in self.body:
            if isinstance(layer, nn.Conv2d):
                covered = F.max_pool2d(covered, layer.kernel_size, layer.stride, layer.padding)
        return (covered > 0).to(masks.dtype)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                       fake_patches: torch.Tensor | None) -> torch.Tensor:
    """The paper's eq. 18 with D on logits: −log σ(D(I_full)) − log(1 − σ(D(I_pred))), each a mean over
    patches. With ``fake_patches`` (the ``mask`` reading) the patches of I_pred outside it are real targets,
    −log σ(D), like I_full's; ``None`` (the ``image`` reading) makes every patch of I_pred fake."""
    real_loss = F.softplus(-real_logits).mean()
    if fake_patches is None:
        return real_loss + F.softplus(fake_logits).mean()
    per_patch = fake_patches * F.softplus(fake_logits) + (1 - fake_patches) * F.softplus(-fake_logits)
    return real_loss + per_patch.mean()


def generator_loss(fake_logits: torch.Tensor, fake_patches: torch.Tensor | None) -> torch.Tensor:
    """The adversarial term of eq. 17 in its non-saturating form, −log σ(D(I_pred)). The ``image`` reading
    (``fake_patches=None``) averages it over every patch; the ``mask`` reading over the fake patches only
    — the others see no generated pixel, so their term is a constant without gradient for G.

    The fake patches are counted over the whole global batch when several processes train together (each
    divides its share's sum by the ranks' mean count): dividing by its own share's count would weigh a patch of
    an image with a small hole more than one of an image with a large hole, unlike one process."""
    per_patch = F.softplus(-fake_logits)
    if fake_patches is None:
        return per_patch.mean()
    # A batch without fake patches has a zero sum: any positive normaliser gives 0 (clamping each rank's mean
    # count at 1 would not: two ranks' counts 1 and 0 have mean 1/2).
    count = whole_batch_normaliser(fake_patches.sum())
    return (per_patch * fake_patches).sum() / count.clamp_min(torch.finfo(count.dtype).tiny)
