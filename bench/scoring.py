"""One object that scores quantised image pairs with every metric whose network is available.

Which networks exist is decided once, when the :class:`Scorer` is built: a network whose weights
cannot be resolved (offline: Inception for FID, AlexNet for LPIPS) is recorded as unavailable with
the reason, and its metric is left out — never computed with a random network. Conventions of
every metric: :mod:`bench.metrics`.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from bench.errors import WeightsUnavailable
from bench.features import (FeatureExtractor, InceptionFID, Lite0Pooled, inception_fid_extractor, lite0_distance,
                            lite0_extractor, lpips_metric)
from bench.metrics import PIXEL_METRICS, pixel_metrics, pixel_metrics_backend


class Scorer:
    """Per-image metrics and per-image features of ``uint8 [B,3,H,W]`` composites and ground truths.

    ``device=None`` follows the inputs' device; otherwise networks live on ``device`` and inputs are
    moved there. The result tensors are on the device the computation ran on. ``compile_pixel_metrics``
    scores PSNR/SSIM/MAE on the CPU with the compiled kernel (:func:`bench.metrics.pixel_metrics`).
    """

    def __init__(self, device: str | torch.device | None = None, inception_path: str | os.PathLike | None = None,
                 lpips_trunk_path: str | os.PathLike | None = None, compile_pixel_metrics: bool = False):
        self.device = torch.device(device) if device is not None else None
        self.compile_pixel_metrics = compile_pixel_metrics
        self._unavailable: dict[str, str] = {}
        self._provenance: dict[str, str] = {}
        self._distances: dict[str, nn.Module] = {}
        self._extractors: dict[str, FeatureExtractor] = {}
        self._add("lpips", self._distances, lambda: lpips_metric("alex", lpips_trunk_path))
        self._add("lite0_dist", self._distances, lite0_distance)
        self._add(InceptionFID.name, self._extractors, lambda: inception_fid_extractor(inception_path))
        self._add(Lite0Pooled.name, self._extractors, lite0_extractor)

    def _add(self, name: str, registry: dict, build: Callable[[], nn.Module]) -> None:
        try:
            network = build()
        except WeightsUnavailable as exc:
            self._unavailable[name] = str(exc)
            self._provenance[name] = f"unavailable: {exc}"
            return
        self._provenance[name] = network.provenance
        registry[name] = network.to(self.device) if self.device is not None else network

    def _placed(self, images: torch.Tensor) -> torch.Tensor:
        target = self.device if self.device is not None else images.device
        for network in (*self._distances.values(), *self._extractors.values()):
            network.to(target)  # a no-op once the networks are there
        return images.to(target)

    @torch.no_grad()
    def per_image(self, pred_u8: torch.Tensor, gt_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{metric: float64 [B]}``: psnr, ssim, mae, then lpips and lite0_dist when available."""
        pred_u8, gt_u8 = self._placed(pred_u8), self._placed(gt_u8)
        scores = pixel_metrics(pred_u8, gt_u8, compiled=self.compile_pixel_metrics)
        scores.update({name: distance(pred_u8, gt_u8) for name, distance in self._distances.items()})
        return scores

    @torch.no_grad()
    def features(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{extractor name: float [B,D]}`` for FID/KID (``inception_v3_fid``) and ``efficientnet_lite0``."""
        images_u8 = self._placed(images_u8)
        return {name: extractor(images_u8) for name, extractor in self._extractors.items()}

    def metric_names(self) -> list[str]:
        return [*PIXEL_METRICS, *self._distances]

    def pixel_metrics_backend(self, device: torch.device) -> str:
        """``"compiled"`` or ``"eager"`` (with the reason compiling failed): what scored PSNR/SSIM/MAE on ``device``."""
        return pixel_metrics_backend(self.device or device, self.compile_pixel_metrics)

    def provenance(self) -> dict[str, str]:
        """``{network name: "<file> sha256:<digest>" | "unavailable: <reason>"}`` for every metric network."""
        return dict(self._provenance)

    def unavailable(self) -> dict[str, str]:
        return dict(self._unavailable)

