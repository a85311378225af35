"""Networks behind the learned metrics: feature extractors for FID/KID and the perceptual distances.

Every constructor loads real pretrained weights through the pretrained-network registry (strictly) or raises
:class:`bench.errors.WeightsUnavailable`; none ever returns a randomly initialised network.
Input conventions of each network are stated in :mod:`bench.metrics.functional` (the one place for them).

- :func:`inception_fid_extractor` — pytorch-fid's FID InceptionV3, pool3 2048-d (for FID, KID).
- :func:`lite0_extractor` — pretrained EfficientNet-Lite0, pooled 1280-d (for ``FD_lite0``,
  ``KID_lite0``: the offline substitute, never called FID).
- :func:`lpips_metric` — the ``lpips`` package v0.1 with its shipped linear layers and a registry trunk.
- :func:`lite0_distance` — ``lite0_dist``, an unlearned LPIPS-style distance on Lite0 stages (NOT LPIPS).
"""
from __future__ import annotations

import importlib.metadata
import os
import warnings
from pathlib import Path

import lpips
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
from torch import nn

from bench.errors import UserError
from bench.checkpoint_format import load_state_dict_strict, safe_torch_load
from bench.metrics.pretrained import efficientnet_lite0, efficientnet_lite0_features, freeze, lite0_normalize
from bench.files import sha256_file
from bench.metrics.pretrained_registry import resolve_weights

INCEPTION_SIZE = 299
LITE0_SIZE = 224
#: LPIPS nets we can build, and the registry key of each one's ImageNet trunk
LPIPS_TRUNKS = {"alex": "alexnet", "vgg": "vgg16"}
LPIPS_VERSION = "0.1"


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """``uint8 [B,3,H,W]`` → float32 in [0,1]."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 [B,3,H,W] images, got {images.dtype} {tuple(images.shape)}")
    return images.float() / 255.0


def uint8_to_signed(images: torch.Tensor) -> torch.Tensor:
    """``uint8 [B,3,H,W]`` → float32 in [-1,1] (the LPIPS input range)."""
    return 2.0 * uint8_to_unit(images) - 1.0


class FeatureExtractor(nn.Module):
    """A frozen network mapping ``uint8 [B,3,H,W]`` images to float features ``[B,D]``."""

    #: feature key in ``features.npz`` and in provenance records
    name: str = ""
    #: feature dimension D
    dim: int = 0

    def __init__(self, provenance: str):
        super().__init__()
        #: ``"<weights file> sha256:<digest>"``
        self.provenance = provenance

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------- FID Inception
def fid_inception_network() -> nn.Module:
    """pytorch-fid's FID InceptionV3 architecture (1008 classes, TF-ported blocks), NOT loaded.

    pytorch-fid's own ``fid_inception_v3`` downloads its weights, so the same architecture is
    assembled here from torchvision's Inception3 and pytorch-fid's patched blocks instead.
    """
    inception = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                                init_weights=False)
    inception.Mixed_5b = FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = FIDInceptionE_1(1280)
    inception.Mixed_7c = FIDInceptionE_2(2048)
    return inception


def _pool3_layers(inception: nn.Module) -> nn.Sequential:
    """The layers from the input to the final average pool (pytorch-fid's blocks 0–3)."""
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
             "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
             "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]
    return nn.Sequential(*(getattr(inception, name) for name in names), nn.Flatten(1))


class InceptionFID(FeatureExtractor):
    """pool3 features of the FID Inception: bilinear resize to 299², scale to [-1,1] (as pytorch-fid)."""

    name = "inception_v3_fid"
    dim = 2048

    def __init__(self, layers: nn.Sequential, provenance: str):
        super().__init__(provenance)
        self.layers = freeze(layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        unit = uint8_to_unit(images)
        resized = F.interpolate(unit, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.layers(2.0 * resized - 1.0)


def inception_fid_extractor(path: str | os.PathLike | None = None) -> InceptionFID:
    resolved = resolve_weights("inception_fid", path)
    inception = fid_inception_network()
    load_state_dict_strict(inception, safe_torch_load(resolved.path), f"{resolved.path}")
    return InceptionFID(_pool3_layers(inception), resolved.provenance())


# ---------------------------------------------------------------------------------- Lite0 pooled
class Lite0Pooled(FeatureExtractor):
    """Global-average-pooled penultimate features of EfficientNet-Lite0 at 224² (bicubic, antialiased)."""

    name = "efficientnet_lite0"
    dim = 1280

    def __init__(self, network: nn.Module, provenance: str):
        super().__init__(provenance)
        #: the whole ImageNet classifier; its head is kept so callers can check the features are real
        self.network = freeze(network)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        unit = uint8_to_unit(images)
        resized = F.interpolate(unit, size=(LITE0_SIZE, LITE0_SIZE), mode="bicubic", align_corners=False,
                                antialias=True).clamp(0.0, 1.0)  # bicubic overshoots
        feature_map = self.network.forward_features(lite0_normalize(resized))
        return self.network.forward_head(feature_map, pre_logits=True)


def lite0_extractor(path: str | os.PathLike | None = None) -> Lite0Pooled:
    network, provenance = efficientnet_lite0(path)
    return Lite0Pooled(network, provenance)


# ---------------------------------------------------------------------------------- LPIPS
def lpips_linear_layers_path(net: str = "alex") -> Path:
    """The calibrated linear layers shipped inside the ``lpips`` package."""
    return Path(lpips.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / f"{net}.pth"


def _uninitialised_torchvision_trunk(net: str) -> nn.Module:
    """torchvision's AlexNet/VGG16 with allocated but unset tensors: a strict load then sets every one,
    so their (slow) random initialisation would be wasted."""
    with torch.device("meta"):
        trunk = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16}[net](weights=None)
    return trunk.to_empty(device="cpu")


def _lpips_state_dict(model: nn.Module, trunk: nn.Module, linear_layers: dict[str, torch.Tensor]) -> dict:
    """Everything ``lpips.LPIPS`` holds: our trunk's conv layers, the shipped linear layers, its constants.

    lpips keeps torchvision's ``features[i]`` as ``net.slice<k>.<i>``, and each linear layer under two
    names (``lin<k>`` and ``lins.<k>``).
    """
    trunk_features = trunk.features.state_dict()
    state = {}
    for key, own in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "net":
            state[key] = trunk_features[".".join(parts[2:])]
        elif parts[0] == "lins":
            state[key] = linear_layers[".".join([f"lin{parts[1]}", *parts[2:]])]
        elif parts[0].startswith("lin"):
            state[key] = linear_layers[key]
        else:  # scaling_layer shift/scale: fixed constants, not weights
            state[key] = own
    return state


class LPIPSMetric(nn.Module):
    """LPIPS v0.1 of ``uint8`` images mapped to [-1,1]; returns float64 ``[B]``.

    Split in two like every distance here, so a ground truth shared by several pairs goes through the trunk
    once: :meth:`embed` (trunk features, unit-normalised over channels) and :meth:`compare` (the calibrated
    linear layers on the squared differences, spatially averaged, summed over layers). Together they are the
    ``lpips`` package's forward, operation for operation."""

    def __init__(self, model: nn.Module, net: str, provenance: str):
        super().__init__()
        if not model.lpips or model.spatial or model.version != LPIPS_VERSION:
            raise ValueError("LPIPSMetric needs lpips.LPIPS with its linear layers, no spatial map, version 0.1")
        self.model = freeze(model)
        self.name = f"lpips_{net}"
        self.provenance = provenance

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.model.net.forward(self.model.scaling_layer(uint8_to_signed(images)))
        return [lpips.normalize_tensor(output) for output in outputs]

    def compare(self, pred: list[torch.Tensor], gt: list[torch.Tensor]) -> torch.Tensor:
        total = 0
        for layer, (features_pred, features_gt) in enumerate(zip(pred, gt)):
            total += self.model.lins[layer]((features_pred - features_gt) ** 2).mean([2, 3], keepdim=True)
        return total.flatten().double()

    def forward(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        return self.compare(self.embed(pred), self.embed(gt))


def lpips_metric(net: str = "alex", trunk_path: str | os.PathLike | None = None) -> LPIPSMetric:
    """The ``lpips`` package's LPIPS with its shipped linear layers and the registry's ImageNet trunk.

    ``lpips.LPIPS`` would download the trunk through torchvision; it is built with a random trunk
    and no linear layers instead, and then every tensor is loaded strictly from the two files.
    """
    if net not in LPIPS_TRUNKS:
        raise UserError(f"--lpips-net {net!r}: choose one of {sorted(LPIPS_TRUNKS)}")
    resolved = resolve_weights(LPIPS_TRUNKS[net], trunk_path)
    trunk = _uninitialised_torchvision_trunk(net)
    load_state_dict_strict(trunk, safe_torch_load(resolved.path), f"{resolved.path}")
    linear_path = lpips_linear_layers_path(net)
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated ``pretrained=False``
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, version=LPIPS_VERSION, pretrained=False, pnet_rand=True, verbose=False)
    load_state_dict_strict(model, _lpips_state_dict(model, trunk, safe_torch_load(linear_path)),
                           f"{resolved.path} + {linear_path}")
    provenance = (f"{resolved.provenance()} + lpips {importlib.metadata.version('lpips')} v{LPIPS_VERSION} "
                  f"{linear_path.name} sha256:{sha256_file(linear_path)}")
    return LPIPSMetric(model, net, provenance)


# ---------------------------------------------------------------------------------- lite0_dist
def unit_normalize_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide every feature vector (over channels) by its L2 norm, as LPIPS does."""
    return features / (features.square().sum(dim=1, keepdim=True).sqrt() + eps)


class Lite0Distance(nn.Module):
    """``lite0_dist``: Σ over Lite0 stages of the spatial mean of Σ_channels (unit-normalised difference)².

    An unlearned LPIPS-style distance (no calibrated linear layers): NOT LPIPS. Images are used at
    their own size (no resize); float64 ``[B]``. :meth:`embed` and :meth:`compare` split it as for LPIPS.
    """

    name = "lite0_dist"

    def __init__(self, stages: nn.Module, provenance: str):
        super().__init__()
        self.stages = freeze(stages)
        self.provenance = provenance

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five stages' feature maps of ``uint8`` images, unit-normalised over channels."""
        return [unit_normalize_channels(stage) for stage in self.stages(lite0_normalize(uint8_to_unit(images)))]

    def compare(self, pred: list[torch.Tensor], gt: list[torch.Tensor]) -> torch.Tensor:
        distance = torch.zeros(len(pred[0]), dtype=torch.float64, device=pred[0].device)
        for stage_pred, stage_gt in zip(pred, gt):
            squared = (stage_pred - stage_gt).square().sum(dim=1)
            distance += squared.flatten(1).mean(dim=1).double()
        return distance

    def forward(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        return self.compare(self.embed(pred), self.embed(gt))


def lite0_distance(path: str | os.PathLike | None = None) -> Lite0Distance:
    stages, provenance = efficientnet_lite0_features(path=path)
    return Lite0Distance(stages, provenance)
