"""Losses computed on the features of a frozen network (:class:`bench.metrics.pretrained.FeaturePyramid`)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def perceptual_loss(features_a: Sequence[torch.Tensor], features_b: Sequence[torch.Tensor],
                    weights: Sequence[float] | None = None) -> torch.Tensor:
    """Σ_i w_i · mean |φ_i(a) − φ_i(b)| (L1, as EdgeConnect/CTSDG/SAHN)."""
    weights = weights or [1.0] * len(features_a)
    return sum(w * F.l1_loss(a, b) for w, a, b in zip(weights, features_a, features_b))


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Channel Gram matrix normalised by C·H·W (Gatys et al.; EdgeConnect's normalisation). Always in float32,
    outside autocast: in fp16 its sums over H·W products overflow (no-op casts for float32 features)."""
    b, c, h, w = features.shape
    with torch.autocast(features.device.type, enabled=False):
        flat = features.float().reshape(b, c, h * w)
        return flat @ flat.transpose(1, 2) / (c * h * w)


def style_loss(features_a: Sequence[torch.Tensor], features_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i mean |G(φ_i(a)) − G(φ_i(b))|."""
    return sum(F.l1_loss(gram_matrix(a), gram_matrix(b)) for a, b in zip(features_a, features_b))
