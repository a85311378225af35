"""Pretrained networks built from the pretrained-network registry (architectures from timm/torchvision).

Every constructor returns a frozen network in eval mode together with its provenance string, or
raises :class:`bench.errors.WeightsUnavailable`. Nothing here ever returns random weights.
"""
from __future__ import annotations

import os

import timm
import torch
from torch import nn

from bench.errors import WeightsUnavailable
from bench.checkpoint_format import safe_torch_load
from bench.metrics.pretrained_registry import resolve_weights

#: strides and channels of EfficientNet-Lite0's five feature stages (timm ``features_only``)
LITE0_STRIDES = (2, 4, 8, 16, 32)
LITE0_CHANNELS = (16, 24, 40, 112, 320)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def lite0_normalize(images: torch.Tensor) -> torch.Tensor:
    """[0,1] RGB → the scaling EfficientNet-Lite0 was trained with: (x·255 − 127) / 128."""
    return (images * 255.0 - 127.0) / 128.0


def _lite0_state_dict(model: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The PyPI file uses the efficientnet_pytorch key names; timm's tf_efficientnet_lite0 has the same
    tensors in the same order, so keys are mapped by position after checking every shape."""
    source = [(k, v) for k, v in safe_torch_load(path).items() if not k.endswith("num_batches_tracked")]
    target = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(source) != len(target):
        raise WeightsUnavailable(f"{path}: {len(source)} tensors, EfficientNet-Lite0 needs {len(target)}")
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source, target):
        if src.shape != dst.shape:
            raise WeightsUnavailable(f"{path}: {src_key} {tuple(src.shape)} does not fit {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    mapped.update({k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")})
    return mapped


def efficientnet_lite0(path: str | os.PathLike | None = None) -> tuple[nn.Module, str]:
    """The ImageNet classifier (1000 logits). Input: :func:`lite0_normalize` of [0,1] RGB."""
    resolved = resolve_weights("efficientnet_lite0", path)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(_lite0_state_dict(model, resolved.path), strict=True)
    return freeze(model), resolved.provenance()


def efficientnet_lite0_features(out_indices: tuple[int, ...] = (0, 1, 2, 3, 4),
                                path: str | os.PathLike | None = None) -> tuple[nn.Module, str]:
    """Feature pyramid (strides :data:`LITE0_STRIDES`) of the pretrained Lite0; returns a list of maps."""
    classifier, provenance = efficientnet_lite0(path)
    features = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True,
                                 out_indices=out_indices)
    wanted = features.state_dict()
    weights = {k: v for k, v in classifier.state_dict().items() if k in wanted}
    features.load_state_dict(weights, strict=True)
    # Drop the blocks after the deepest requested stage: timm would still run them, for nothing.
    last_module = features.feature_info.module_name()[-1]  # e.g. "blocks.2"
    features.blocks = features.blocks[: int(last_module.split(".")[1]) + 1]
    return freeze(features), provenance


# ---------------------------------------------------------------- loss networks (perceptual / style)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: index of each named activation in torchvision's ``vgg.features`` Sequential
VGG_LAYERS = {
    "vgg16": {"relu1_1": 1, "relu1_2": 3, "pool1": 4, "relu2_1": 6, "relu2_2": 8, "pool2": 9, "relu3_1": 11,
              "relu3_2": 13, "relu3_3": 15, "pool3": 16, "relu4_1": 18, "relu4_2": 20, "relu4_3": 22,
              "pool4": 23, "relu5_1": 25, "relu5_2": 27, "relu5_3": 29, "pool5": 30},
    "vgg19": {"relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13,
              "relu3_3": 15, "relu3_4": 17, "relu4_1": 20, "relu4_2": 22, "relu4_3": 24, "relu4_4": 26,
              "relu5_1": 29, "relu5_2": 31, "relu5_3": 33, "relu5_4": 35},
}


class FeaturePyramid(nn.Module):
    """A frozen pretrained network that maps [0,1] RGB images to feature maps at chosen layers."""

    def __init__(self, name: str, body: nn.Module, taps: list[int], mean, std, provenance: str):
        super().__init__()
        self.name, self.provenance, self.taps = name, provenance, taps
        self.body = freeze(body)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FeaturePyramid":
        return super().train(False)  # frozen BatchNorm statistics, whatever the owner's mode

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        if isinstance(self.body, nn.Sequential):
            outputs = []
            for index, layer in enumerate(self.body):
                x = layer(x)
                if index in self.taps:
                    outputs.append(x)
                if index >= max(self.taps):
                    break
            return outputs
        features = self.body(x)
        return [features[i] for i in self.taps]


def vgg_features(arch: str, layers: tuple[str, ...], path: str | os.PathLike | None = None) -> FeaturePyramid:
    """torchvision VGG16/VGG19 (ImageNet) truncated after the deepest requested layer."""
    import torchvision

    resolved = resolve_weights(arch, path)
    model = getattr(torchvision.models, arch)(weights=None)
    model.load_state_dict(safe_torch_load(resolved.path), strict=True)
    taps = [VGG_LAYERS[arch][name] for name in layers]
    body = nn.Sequential(*list(model.features.children())[: max(taps) + 1])
    return FeaturePyramid(f"{arch}:{','.join(layers)}", body, taps, IMAGENET_MEAN, IMAGENET_STD, resolved.provenance())


def lite0_pyramid(stages: tuple[int, ...] = (0, 1, 2, 3), path: str | os.PathLike | None = None) -> FeaturePyramid:
    """Pretrained EfficientNet-Lite0 feature stages (strides 2, 4, 8, 16, 32) as a loss network."""
    features, provenance = efficientnet_lite0_features(out_indices=tuple(stages), path=path)
    # lite0_normalize as an affine map: (x·255 − 127)/128 = (x − 127/255) / (128/255)
    return FeaturePyramid(f"efficientnet_lite0:stages{','.join(map(str, stages))}", features, list(range(len(stages))),
                          (127 / 255,) * 3, (128 / 255,) * 3, provenance)


def loss_network(arch: str, layers: tuple[str, ...], path: str | os.PathLike | None = None,
                 substitute_stages: tuple[int, ...] = (0, 1, 2, 3)) -> tuple[FeaturePyramid, str | None]:
    """The paper's loss network when its weights resolve; otherwise the pretrained Lite0 substitute.
    Returns ``(network, substitution)`` where ``substitution`` describes the swap (None when none)."""
    if arch == "efficientnet_lite0":
        return lite0_pyramid(substitute_stages), None
    try:
        return vgg_features(arch, layers, path), None
    except WeightsUnavailable as exc:
        network = lite0_pyramid(substitute_stages)
        return network, (f"{network.name} (pretrained ImageNet EfficientNet-Lite0, {network.provenance}) "
                         f"instead of {arch} {','.join(layers)} — {exc}")
