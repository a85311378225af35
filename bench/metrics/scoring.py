"""One object that scores quantised image pairs with every metric whose network is available.

Which networks exist is decided once, when the :class:`Scorer` is built: a network whose weights
cannot be resolved (offline: Inception for FID, AlexNet for LPIPS) is recorded as unavailable with
the reason, and its metric is left out — never computed with a random network. Conventions of
every metric: :mod:`bench.metrics.functional`. Every metric is computed in full float32, TF32 off on GPUs
(:func:`bench.devices.full_fp32`), so a GPU scores like the CPU up to float32 round-off.

On the CPU every metric network sees one image at a time: convolution kernels pick their blocking by
batch size, so an image's features would otherwise change (by float32 round-off) with the images that
share its batch. One at a time, each pair's scores and features are a function of its two images alone —
the same in any batch layout, shard or method — which is also what lets a ground truth shared by several
pairs be embedded once (:meth:`Scorer.reference`) with identical results. On GPUs images go through in
chunks of :data:`bench.devices.GPU_NETWORK_CHUNK`, as they are not bit-reproducible across layouts anyway.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from bench.devices import METRIC_PRECISION, full_fp32, network_chunk
from bench.errors import WeightsUnavailable
from bench.metrics.features import (FeatureExtractor, InceptionFID, Lite0Pooled, inception_fid_extractor, lite0_distance,
                            lite0_extractor, lpips_metric)
from bench.metrics.functional import pixel_metrics, pixel_metrics_backend
from bench.metrics.table import PIXEL_METRICS

#: how ground-truth features are stored in the cache beside a manifest: one row per test image (part of its key)
GT_FEATURE_ROWS = "one per image, each image alone through the network"

#: a distance's embedding of a batch: per layer or stage, a tensor whose first dimension is the batch
Embedding = list[torch.Tensor]


def _chunked(function: Callable[[torch.Tensor], torch.Tensor | Embedding], images: torch.Tensor
             ) -> torch.Tensor | Embedding:
    """``function`` of ``images`` computed chunk by chunk (:func:`network_chunk`) and concatenated."""
    parts = [function(chunk) for chunk in images.split(network_chunk(images.device))]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return [torch.cat(layer) for layer in zip(*parts)]


def select(embedding: Embedding, index: torch.Tensor) -> Embedding:
    """The rows ``index`` of every layer of an embedding (one row per pair from one row per image)."""
    return [layer.index_select(0, index.to(layer.device)) for layer in embedding]


class Scorer:
    """Per-image metrics and per-image features of ``uint8 [B,3,H,W]`` composites and ground truths.

    ``device=None`` follows the inputs' device; otherwise networks live on ``device`` and inputs are
    moved there. The result tensors are on the device the computation ran on. ``compile_pixel_metrics``
    scores PSNR/SSIM/MAE on the CPU with the compiled kernel (:func:`bench.metrics.functional.pixel_metrics`).
    """

    def __init__(self, device: str | torch.device | None = None, inception_path: str | os.PathLike | None = None,
                 lpips_trunk_path: str | os.PathLike | None = None, compile_pixel_metrics: bool = False,
                 networks: bool = True):
        """``networks=False``: PSNR, SSIM and MAE only (for measuring the harness's data path)."""
        self.device = torch.device(device) if device is not None else None
        self.compile_pixel_metrics = compile_pixel_metrics
        self._unavailable: dict[str, str] = {}
        self._provenance: dict[str, str] = {}
        self._distances: dict[str, nn.Module] = {}
        self._extractors: dict[str, FeatureExtractor] = {}
        self._networks_on: torch.device | None = None  # where the networks are (None: not placed yet)
        if not networks:
            return
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
        if target != self._networks_on:  # moving a module visits every tensor: only when the device changes
            for network in (*self._distances.values(), *self._extractors.values()):
                network.to(target)
            self._networks_on = target
        return images.to(target)

    @torch.no_grad()
    def reference(self, gt_u8: torch.Tensor) -> dict[str, Embedding]:
        """What every distance needs of the ground truths ``gt_u8``, computed once for all the pairs that share
        them: ``{distance name: embedding}`` (pass the rows of each pair to :meth:`per_image`)."""
        gt_u8 = self._placed(gt_u8)
        with full_fp32(gt_u8.device):
            return {name: _chunked(distance.embed, gt_u8) for name, distance in self._distances.items()}

    @torch.no_grad()
    def per_image(self, pred_u8: torch.Tensor, gt_u8: torch.Tensor,
                  reference: dict[str, Embedding] | None = None) -> dict[str, torch.Tensor]:
        """``{metric: float64 [B]}``: psnr, ssim, mae, then lpips and lite0_dist when available. ``reference``:
        the ground truths' :meth:`reference`, one row per pair (computed here when not given)."""
        pred_u8, gt_u8 = self._placed(pred_u8), self._placed(gt_u8)
        if reference is None:
            reference = self.reference(gt_u8)
        with full_fp32(pred_u8.device):
            scores = pixel_metrics(pred_u8, gt_u8, compiled=self.compile_pixel_metrics)
            for name, distance in self._distances.items():
                embedded, chunk = _chunked(distance.embed, pred_u8), network_chunk(pred_u8.device)
                # compared chunk by chunk too: a reduction over few rows may split its sums across threads
                scores[name] = torch.cat([distance.compare([layer[start:start + chunk] for layer in embedded],
                                                           [layer[start:start + chunk] for layer in reference[name]])
                                          for start in range(0, len(pred_u8), chunk)])
        return scores

    @torch.no_grad()
    def features(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{extractor name: float [B,D]}`` for FID/KID (``inception_v3_fid``) and ``efficientnet_lite0``."""
        images_u8 = self._placed(images_u8)
        with full_fp32(images_u8.device):
            return {name: _chunked(extractor, images_u8) for name, extractor in self._extractors.items()}

    def feature_key(self, device: torch.device) -> dict[str, object]:
        """What features computed on ``device`` depend on besides the images: the networks' provenance, the
        device type (a GPU's features differ from the CPU's by float round-off) and the precision."""
        where = self.device or device
        return {"networks": self.provenance(), "device": where.type, "precision": METRIC_PRECISION,
                "rows": GT_FEATURE_ROWS}

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

