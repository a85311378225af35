"""LaMa (Suvorov et al., WACV 2022) behind the harness's method interface.

Written from the facts of the official code (advimman/lama @786f593, see
docs/official-sources.md); module and attribute names follow the official ones so that the
official state_dict keys (``generator.model.5.conv1.ffc.convg2g.fu.conv_layer.weight``, ...,
``discriminator.model0.0.weight``, ...) map 1:1 onto this module's keys.

- Generator: FFC ResNet (Fast Fourier Convolution), ``nn.Sequential`` named ``model``; global share of
  channels 0.75 in the ResNet blocks, LFU off (not implemented), BatchNorm, sigmoid output.
- Discriminator: pix2pixHD ``NLayerDiscriminator`` (``model0`` … ``model{n_layers+1}``), BatchNorm.
- Losses (configs/training/lama-fourier.yaml, big-lama.yaml): L1 on known pixels only, non-saturating
  adversarial loss with R1 on reals and the mask as the fake target, discriminator feature matching,
  high-receptive-field perceptual loss (HRFPL).
- Inference as bin/predict.py: [0,1] input, mask binarised (>0, 1 = hole), symmetric padding to a
  multiple of 8 at the bottom/right, crop back.
- Official checkpoints: big-lama ``models/best.ckpt`` (PyTorch Lightning) loads through :meth:`LaMa.load`;
  foreign Python objects in it (OmegaConf configs, callback classes) are replaced by inert
  placeholders, so loading never runs code named by the file.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from bench.run.data_parallel import whole_batch_normaliser
from bench.errors import CheckpointError, UserError, WeightsUnavailable
from bench.metrics.pretrained_registry import resolve_weights
from bench.methods import InpaintingMethod, apply_overrides, variant
from bench.checkpoint_format import CheckpointInfo, load_state_dict_strict, safe_torch_load
from bench.nn.state_dicts import consecutive_count, pickled_globals, tensor_shape

#: generator output channels / input channels (masked RGB + mask), as configs/training/generator/*.yaml
OUTPUT_CHANNELS = 3
INPUT_CHANNELS = 4
PERCEPTUAL_CHOICES = ("auto", "ade20k_resnet50dilated", "efficientnet_lite0", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: where a release folder (big-lama, lama-fourier, ...) keeps its weights, beside config.yaml
RELEASE_CHECKPOINT = Path("models") / "best.ckpt"
#: configs/training/big-lama.yaml's generator depth; lama-fourier has LamaConfig's default (9)
BIG_LAMA_BLOCKS = 18

LocalGlobal = tuple[torch.Tensor, "torch.Tensor | None"]


# ===================================================================== configuration
@dataclass
class LamaConfig:
    """Defaults are the official lama-fourier settings; variants change the sizes only."""
    # generator (FFCResNetGenerator)
    ngf: int = 64
    n_downsampling: int = 3
    n_blocks: int = 9
    ratio_g: float = 0.75  # share of global (spectral) channels in the ResNet blocks
    max_features: int = 1024
    # discriminator (pix2pixHD NLayerDiscriminator)
    disc_ndf: int = 64
    disc_n_layers: int = 4
    # losses
    l1_weight_known: float = 10.0
    l1_weight_missing: float = 0.0
    adversarial_weight: float = 10.0
    r1_gp_coef: float = 0.001
    mask_as_fake_target: bool = True
    feature_matching_weight: float = 100.0
    perceptual_weight: float = 30.0
    #: auto: ADE20k ResNet50-dilated if its weights are on disk, else the EfficientNet-Lite0 substitute;
    #: ade20k_resnet50dilated: the official network or an error; efficientnet_lite0: the substitute; none
    perceptual_network: str = "auto"
    perceptual_weights_path: str | None = None
    # optimisation (configs/training/optimizers/default_optimizers.yaml, trainer gradient_clip_val)
    lr_generator: float = 1e-3
    lr_discriminator: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip_norm: float = 1.0
    # inference (configs/prediction/default.yaml: pad_out_to_modulo)
    pad_multiple: int = 8


def validate_config(config: LamaConfig) -> None:
    if config.n_downsampling < 1 or config.n_blocks < 0:
        raise UserError(f"LaMa needs n_downsampling >= 1 and n_blocks >= 0, got {config.n_downsampling}, "
                        f"{config.n_blocks}")
    bottleneck = min(config.max_features, config.ngf * 2 ** config.n_downsampling)
    global_channels = int(bottleneck * config.ratio_g)
    if not 0 < global_channels < bottleneck:
        raise UserError(f"ratio_g={config.ratio_g} leaves no local or no global channels at width {bottleneck}")
    if config.pad_multiple % 2 ** config.n_downsampling:
        raise UserError(f"pad_multiple={config.pad_multiple} must be a multiple of 2**n_downsampling")
    if config.perceptual_network not in PERCEPTUAL_CHOICES:
        raise UserError(f"perceptual_network={config.perceptual_network!r}; choose one of {PERCEPTUAL_CHOICES}")


# ===================================================================== FFC generator
class FourierUnit(nn.Module):
    """1×1 conv + BN + ReLU on the real FFT of the input: one layer with an image-wide receptive field."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_layer = nn.Conv2d(2 * channels, 2 * channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(2 * channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # FFTs in float32 (no-op casts at fp32): under autocast the convolutions give bf16/fp16, which torch's
        # FFTs refuse (bf16) or take only at power-of-two sizes (fp16 on CUDA)
        spectrum = torch.fft.rfft2(x.float(), norm="ortho")
        # The official weights expect real and imaginary parts interleaved per channel (c0.re, c0.im, c1.re, …).
        stacked = torch.stack((spectrum.real, spectrum.imag), dim=2).reshape(batch, 2 * channels, height, -1)
        stacked = self.relu(self.bn(self.conv_layer(stacked))).float()
        parts = stacked.reshape(batch, -1, 2, height, stacked.shape[-1])
        spectrum = torch.complex(parts[:, :, 0], parts[:, :, 1])
        return torch.fft.irfft2(spectrum, s=(height, width), norm="ortho")


class SpectralTransform(nn.Module):
    """Global branch of an FFC: 1×1 reduce → Fourier unit (+ skip) → 1×1 expand (local Fourier unit off)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        hidden = out_channels // 2
        self.downsample = nn.AvgPool2d(kernel_size=2, stride=2) if stride == 2 else nn.Identity()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.fu = FourierUnit(hidden)
        self.conv2 = nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.downsample(x))
        return self.conv2(x + self.fu(x))


def _sum_present(*terms: torch.Tensor | None) -> torch.Tensor | None:
    present = [t for t in terms if t is not None]
    return sum(present[1:], present[0]) if present else None


class FFC(nn.Module):
    """Fast Fourier Convolution: local↔local/global convolutions plus a spectral global↔global path.

    Absent paths (a side with zero channels) are ``None``; the official code uses parameter-free
    ``nn.Identity`` there, so the state_dict keys are the same.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, ratio_gin: float, ratio_gout: float,
                 stride: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__()
        in_global = int(in_channels * ratio_gin)
        in_local = in_channels - in_global
        out_global = int(out_channels * ratio_gout)
        out_local = out_channels - out_global

        def conv(cin: int, cout: int) -> nn.Conv2d | None:
            if not cin or not cout:
                return None
            return nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation, bias=False, padding_mode="reflect")

        self.convl2l = conv(in_local, out_local)
        self.convl2g = conv(in_local, out_global)
        self.convg2l = conv(in_global, out_local)
        self.convg2g = SpectralTransform(in_global, out_global, stride) if in_global and out_global else None
        self.out_local, self.out_global = out_local, out_global

    @staticmethod
    def _apply_path(path: nn.Module | None, x: torch.Tensor | None) -> torch.Tensor | None:
        return path(x) if path is not None and x is not None else None

    def forward(self, x: torch.Tensor | LocalGlobal) -> LocalGlobal:
        x_local, x_global = x if isinstance(x, tuple) else (x, None)
        out_local = _sum_present(self._apply_path(self.convl2l, x_local), self._apply_path(self.convg2l, x_global))
        out_global = _sum_present(self._apply_path(self.convl2g, x_local), self._apply_path(self.convg2g, x_global))
        return out_local, out_global


class FFCNormAct(nn.Module):
    """FFC followed by BatchNorm and an activation on each side (official ``FFC_BN_ACT``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, ratio_gin: float, ratio_gout: float,
                 stride: int = 1, padding: int = 0, dilation: int = 1,
                 activation: Callable[..., nn.Module] = nn.ReLU):
        super().__init__()
        self.ffc = FFC(in_channels, out_channels, kernel_size, ratio_gin, ratio_gout, stride, padding, dilation)
        self.bn_l = nn.BatchNorm2d(self.ffc.out_local) if self.ffc.out_local else None
        self.bn_g = nn.BatchNorm2d(self.ffc.out_global) if self.ffc.out_global else None
        self.act_l = activation(inplace=True)
        self.act_g = activation(inplace=True)

    def forward(self, x: torch.Tensor | LocalGlobal) -> LocalGlobal:
        x_local, x_global = self.ffc(x)
        if x_local is not None:
            x_local = self.act_l(self.bn_l(x_local))
        if x_global is not None:
            x_global = self.act_g(self.bn_g(x_global))
        return x_local, x_global


class FFCResnetBlock(nn.Module):
    """Two 3×3 FFCs with a residual connection on both the local and the global channels."""

    def __init__(self, dim: int, ratio_g: float):
        super().__init__()
        self.conv1 = FFCNormAct(dim, dim, 3, ratio_g, ratio_g, padding=1)
        self.conv2 = FFCNormAct(dim, dim, 3, ratio_g, ratio_g, padding=1)

    def forward(self, x: LocalGlobal) -> LocalGlobal:
        x_local, x_global = x
        y_local, y_global = self.conv2(self.conv1(x))
        return x_local + y_local, x_global + y_global


class ConcatLocalGlobal(nn.Module):
    """Local channels first, then global ones (the official ``ConcatTupleLayer``)."""

    def forward(self, x: LocalGlobal) -> torch.Tensor:
        x_local, x_global = x
        return x_local if x_global is None else torch.cat((x_local, x_global), dim=1)


class FFCResNetGenerator(nn.Module):
    """ReflPad + 7×7 FFC → stride-2 FFC downsamplings → FFC ResNet blocks → ConvTranspose upsamplings →
    7×7 conv → sigmoid.

    Layer order and indices of ``self.model`` are the official ones (``model.0`` is the padding,
    ``model.1`` the first FFC, ``model.{2+n_downsampling}`` the first ResNet block, …).
    """

    def __init__(self, ngf: int = 64, n_downsampling: int = 3, n_blocks: int = 9, ratio_g: float = 0.75,
                 max_features: int = 1024, input_nc: int = INPUT_CHANNELS, output_nc: int = OUTPUT_CHANNELS):
        super().__init__()

        def width(multiplier: float) -> int:
            return min(max_features, int(ngf * multiplier))

        layers: list[nn.Module] = [nn.ReflectionPad2d(3), FFCNormAct(input_nc, ngf, 7, 0.0, 0.0)]
        for i in range(n_downsampling):
            # only the last downsampling splits its output into local and global channels
            ratio_out = ratio_g if i == n_downsampling - 1 else 0.0
            layers.append(FFCNormAct(width(2 ** i), width(2 ** (i + 1)), 3, 0.0, ratio_out, stride=2, padding=1))
        layers += [FFCResnetBlock(width(2 ** n_downsampling), ratio_g) for _ in range(n_blocks)]
        layers.append(ConcatLocalGlobal())
        for i in range(n_downsampling):
            multiplier = 2 ** (n_downsampling - i)
            layers += [nn.ConvTranspose2d(width(multiplier), width(multiplier / 2), kernel_size=3, stride=2,
                                          padding=1, output_padding=1),
                       nn.BatchNorm2d(width(multiplier / 2)), nn.ReLU(inplace=True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7), nn.Sigmoid()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# ===================================================================== discriminator
class NLayerDiscriminator(nn.Module):
    """pix2pixHD PatchGAN with BatchNorm; returns the logits and every intermediate activation."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 4):
        super().__init__()
        stages = [[nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=2), nn.LeakyReLU(0.2, True)]]
        channels = ndf
        for _ in range(1, n_layers):
            previous, channels = channels, min(channels * 2, 512)
            stages.append([nn.Conv2d(previous, channels, kernel_size=4, stride=2, padding=2),
                           nn.BatchNorm2d(channels), nn.LeakyReLU(0.2, True)])
        previous, channels = channels, min(channels * 2, 512)
        stages.append([nn.Conv2d(previous, channels, kernel_size=4, stride=1, padding=2),
                       nn.BatchNorm2d(channels), nn.LeakyReLU(0.2, True)])
        stages.append([nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=2)])
        for index, stage in enumerate(stages):
            setattr(self, f"model{index}", nn.Sequential(*stage))
        self.n_stages = len(stages)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        for index in range(self.n_stages):
            x = getattr(self, f"model{index}")(x)
            features.append(x)
        return features[-1], features[:-1]


# ===================================================================== padding as bin/predict.py
def _symmetric_indices(size: int, padded_size: int, device: torch.device) -> torch.Tensor:
    """Indices of numpy's ``mode='symmetric'`` (edge repeated) padding at the end of an axis."""
    index = torch.arange(padded_size, device=device) % (2 * size)
    return torch.where(index < size, index, 2 * size - 1 - index)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right to a multiple, mirroring with the edge pixel repeated (the official dataset's np.pad)."""
    height, width = x.shape[-2:]
    padded_height = -(-height // multiple) * multiple
    padded_width = -(-width // multiple) * multiple
    if (padded_height, padded_width) == (height, width):
        return x
    x = x.index_select(-2, _symmetric_indices(height, padded_height, x.device))
    return x.index_select(-1, _symmetric_indices(width, padded_width, x.device))


# ===================================================================== losses (official formulas)
def masked_l1_loss(predicted: torch.Tensor, target: torch.Tensor, masks: torch.Tensor,
                   weight_known: float, weight_missing: float) -> torch.Tensor:
    pixel_weights = masks * weight_missing + (1 - masks) * weight_known
    return (pixel_weights * (predicted - target).abs()).mean()


def feature_matching_loss(fake_features: Sequence[torch.Tensor], real_features: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([F.mse_loss(fake, real) for fake, real in zip(fake_features, real_features)]).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor,
               scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Squared gradient norm of the discriminator on real images, per sample, averaged. With the fp16 loss
    ``scaler`` the gradient is taken of the scaled logits and divided by the same scale, as torch's AMP notes do
    for gradient penalties: unscaled, the fp16 backward flushes small gradients to zero. A gradient the scale
    overflows makes the penalty non-finite, so the discriminator's gradients are too and the scaler skips the
    step and lowers its scale, as for any overflow."""
    if scaler is None:
        (gradient,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    else:
        # the scale as a tensor on the device: GradScaler.get_scale() would wait for the device every step
        scale = scaler.scale(torch.ones((), device=real_logits.device))
        # summed in float32: the scale itself (2^16 at first) is beyond fp16's range
        (scaled,) = torch.autograd.grad(real_logits.float().sum() * scale, real_images, create_graph=True)
        gradient = scaled / scale
    return gradient.flatten(1).norm(2, dim=1).pow(2).mean()


def discriminator_adversarial_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, masks: torch.Tensor,
                                   gp: torch.Tensor, mask_as_fake_target: bool) -> torch.Tensor:
    """Non-saturating loss; with ``mask_as_fake_target`` only the hole of a fake counts as fake."""
    fake_loss = F.softplus(fake_logits)
    if mask_as_fake_target:
        small_masks = F.interpolate(masks, size=fake_logits.shape[-2:], mode="nearest")
        fake_loss = fake_loss * small_masks + (1 - small_masks) * F.softplus(-fake_logits)
    return (F.softplus(-real_logits) + gp + fake_loss).mean()


class FeaturePerceptualLoss(nn.Module):
    """Σ over feature maps of MSE(features(pred), features(target)) × weight, with a frozen network.

    ``relative=True`` divides each map's MSE by the target map's mean square (a per-batch constant, no
    gradient; the whole global batch's when several workers train). The official HRFPL is a plain MSE of
    post-ReLU ResNet features; the EfficientNet-Lite0 substitute's block outputs carry ~100× more energy, so a
    plain MSE at the official weight would swamp every other loss. The relative form keeps each map's term near
    the 0–1.5 range.
    """

    def __init__(self, network: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor], weight: float,
                 relative: bool = False):
        super().__init__()
        self.network = network
        self.normalize = normalize
        self.weight = weight
        self.relative = relative

    def forward(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        predicted_features = self.network(self.normalize(predicted))
        with torch.no_grad():
            target_features = self.network(self.normalize(target))
        losses = []
        for p, t in zip(predicted_features, target_features):
            loss = F.mse_loss(p, t)
            if self.relative:  # the target's energy: the whole global batch's when several workers train
                loss = loss / whole_batch_normaliser(t.pow(2).mean()).clamp_min(1e-8)
            losses.append(loss)
        return torch.stack(losses).sum() * self.weight


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


# ===================================================================== HRFPL network (ADE20k ResNet50-dilated)
def _bottleneck_stage(in_channels: int, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    """A ResNet-50 stage. With ``dilation`` > 1 the stride is removed (output stride kept at 8) and the
    first block's 3×3 conv is dilated by half as much as the others, as CSAIL's ``ResnetDilated``."""
    out_channels = planes * Bottleneck.expansion
    downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                               nn.BatchNorm2d(out_channels))
    first_dilation = max(1, dilation // 2)
    layers = [Bottleneck(in_channels, planes, stride=stride, downsample=downsample, dilation=first_dilation)]
    layers += [Bottleneck(out_channels, planes, dilation=dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet50Dilated(nn.Module):
    """CSAIL's ADE20k encoder: three-conv stem (to 128 channels), ResNet-50 stages, layer3/4 dilated 2/4.

    Returns the four stage outputs (strides 4, 8, 8, 8; 256/512/1024/2048 channels), which LaMa's
    ``ResNetPL`` compares. Attribute names follow the released ``encoder_epoch_20.pth``.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _bottleneck_stage(128, 64, 3, stride=1, dilation=1)
        self.layer2 = _bottleneck_stage(256, 128, 4, stride=2, dilation=1)
        self.layer3 = _bottleneck_stage(512, 256, 6, stride=1, dilation=2)
        self.layer4 = _bottleneck_stage(1024, 512, 3, stride=1, dilation=4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.maxpool(self.relu3(self.bn3(self.conv3(x))))
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features


def load_ade20k_encoder(path: str | Path) -> ResNet50Dilated:
    """The released encoder, loaded strictly except for BatchNorm ``num_batches_tracked`` counters (absent
    from files written by old PyTorch; unused in eval mode). The official code loads with strict=False."""
    encoder = ResNet50Dilated()
    state = safe_torch_load(path)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {key.removeprefix("module."): value for key, value in state.items()}
    for key, value in encoder.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    load_state_dict_strict(encoder, state, what=str(path))
    encoder.eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return encoder


# ===================================================================== safe loading of official checkpoints
class InertObject:
    """Stands in for a class or function named in a checkpoint that we never import (OmegaConf configs,
    Lightning callbacks, …). It only keeps the plain data it is given; none of its methods runs code
    from the file."""

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any):
        instance = super().__new__(cls)
        instance.args = args
        return instance

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


def plain_dict(*args: Any, **kwargs: Any) -> dict:
    """Stand-in for dict subclasses (``collections.defaultdict``): the file's items are then added to a
    plain dict (torch's loader fills nothing else); the default factory is dropped."""
    return {}


#: foreign globals whose pickled instances receive dict items, so their stand-in must be a plain dict
DICT_LIKE_GLOBALS = frozenset({"collections.defaultdict"})


def inert_stand_ins(names: Sequence[str]) -> list[tuple[Any, str]]:
    """One stand-in per global name, in the (object, name) form torch's allow-list accepts."""
    return [(plain_dict if name in DICT_LIKE_GLOBALS
             else type(f"Inert_{name.replace('.', '_')}", (InertObject,), {"qualified_name": name}), name)
            for name in names]


def load_checkpoint_inertly(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` where every non-allow-listed global is an :class:`InertObject`.

    Tensors and containers load as usual; foreign objects become placeholders (torch still refuses
    globals from blocked modules such as ``os``). Nothing named by the file is imported or called.
    """
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # not a zip checkpoint: only the plain weights_only loader applies
        warnings.warn(f"{path}: cannot list its globals ({exc}); loading with weights_only only")
        foreign = []
    return safe_torch_load(path, extra_globals=inert_stand_ins(foreign))


def official_lama_config(state: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """The :class:`LamaConfig` fields a LaMa state_dict decides, from the official ``generator.model.<i>`` layout:
    ``model.1`` the first FFC (width ``ngf``), then the stride-2 FFCs, then the FFC ResNet blocks (``conv1``,
    ``conv2``); the last downsampling splits its output into local and global channels (``ratio_g``)."""
    what = "a LaMa generator"
    ngf = int(tensor_shape(state, "generator.model.1.ffc.convl2l.weight", path, what)[0])
    n_downsampling = 0  # FFCs right under model.<i> (a block's sit under model.<i>.conv1 / .conv2)
    while f"generator.model.{2 + n_downsampling}.ffc.convl2l.weight" in state:
        n_downsampling += 1
    n_blocks = 0
    while f"generator.model.{2 + n_downsampling + n_blocks}.conv1.ffc.convl2l.weight" in state:
        n_blocks += 1
    last = f"generator.model.{1 + n_downsampling}.ffc"
    local = int(tensor_shape(state, f"{last}.convl2l.weight", path, what)[0])
    global_ = int(tensor_shape(state, f"{last}.convl2g.weight", path, what)[0])
    width = local + global_
    # the official 0.75 when it gives this split, else the plain fraction, else one that survives int() rounding
    ratio_g = next(r for r in (LamaConfig().ratio_g, global_ / width, (global_ + 0.5) / width)
                   if int(width * r) == global_)
    config: dict[str, Any] = {"ngf": ngf, "n_downsampling": n_downsampling, "n_blocks": n_blocks, "ratio_g": ratio_g,
                              # the official cap (1024) unless the file's bottleneck is narrower than ngf·2^n
                              "max_features": width if width < ngf * 2 ** n_downsampling
                              else max(LamaConfig().max_features, width)}
    if "discriminator.model0.0.weight" in state:
        config["disc_ndf"] = int(state["discriminator.model0.0.weight"].shape[0])
        # pix2pixHD: model0 (first conv), n_layers − 1 strided stages, one stride-1 stage, the output conv
        config["disc_n_layers"] = consecutive_count(state, "discriminator.model") - 2
    return config


def official_checkpoint_file(path: Path) -> Path:
    """The big-lama release is a folder with ``config.yaml`` and ``models/best.ckpt``; accept either."""
    if path.is_dir():
        candidate = path / RELEASE_CHECKPOINT
        if not candidate.is_file():
            raise UserError(f"{path}: folder has no models/best.ckpt (expected the official LaMa release layout)")
        return candidate
    return path


def state_dict_of(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Lightning checkpoint (``state_dict``) or of a bare state_dict."""
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not payload or not all(torch.is_tensor(v) for v in payload.values()):
        raise CheckpointError(f"{path}: neither a sahn-bench checkpoint nor a LaMa (Lightning) checkpoint "
                              "with a state_dict of tensors")
    return payload


def split_official_state(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep ``generator.*`` and ``discriminator.*``; list the other top-level prefixes (loss networks,
    evaluators), which are not part of the method and are ignored."""
    kept = {k: v for k, v in state.items() if k.startswith(("generator.", "discriminator."))}
    if not any(k.startswith("generator.") for k in kept):
        prefixes = sorted({k.split(".", 1)[0] for k in state})
        raise CheckpointError(f"{path}: no generator.* keys (top-level prefixes: {', '.join(prefixes)}); "
                              "is this a LaMa checkpoint?")
    ignored = sorted({k.split(".", 1)[0] for k in state if k not in kept})
    return kept, ignored


# ===================================================================== the method
class LaMa(InpaintingMethod):
    """LaMa with an FFC ResNet generator. ``inpaint`` follows bin/predict.py; ``train_step`` the official
    Lightning loop (generator update, then discriminator update on a fresh generator pass)."""

    paper_name = "LaMa-Fourier"

    def __init__(self, config: LamaConfig):
        validate_config(config)
        super().__init__(config)
        self.generator = FFCResNetGenerator(config.ngf, config.n_downsampling, config.n_blocks, config.ratio_g,
                                            config.max_features)
        self.discriminator = NLayerDiscriminator(OUTPUT_CHANNELS, config.disc_ndf, config.disc_n_layers)
        self.optimizers = {
            "generator": torch.optim.Adam(self.generator.parameters(), lr=config.lr_generator, betas=config.betas),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=config.lr_discriminator,
                                              betas=config.betas),
        }
        # Frozen loss networks sit in a plain dict: outside state_dict (small checkpoints) and outside
        # num_parameters; _apply moves them with the method. Built on the first train_step.
        self._loss_networks: dict[str, nn.Module] = {}
        self._perceptual_plan = self._plan_perceptual_network()
        #: top-level checkpoint prefixes ignored by the last official load (e.g. loss_resnet_pl, val_evaluator)
        self.ignored_checkpoint_prefixes: list[str] = []

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for network in self._loss_networks.values():
            network._apply(fn)
        return self

    # ----------------------------------------------------------------- perceptual loss network
    def _plan_perceptual_network(self) -> tuple[str, Path | None]:
        """Decide now (so ``substitutions`` is recorded from the start) which network the HRFPL uses."""
        config = self.config
        choice = config.perceptual_network
        if choice == "none" or config.perceptual_weight == 0:
            return "none", None
        if choice in ("auto", "ade20k_resnet50dilated"):
            try:
                # "auto" never downloads: it takes the official weights only if they are already on disk
                resolved = resolve_weights_path("ade20k_resnet50dilated", config.perceptual_weights_path,
                                                download=False if choice == "auto" else None)
                return "ade20k_resnet50dilated", resolved
            except WeightsUnavailable as exc:
                if choice != "auto":
                    raise
                reason = str(exc)
        else:
            reason = "efficientnet_lite0 requested"
        try:
            path = config.perceptual_weights_path if choice == "efficientnet_lite0" else None
            resolved = resolve_weights_path("efficientnet_lite0", path)
        except WeightsUnavailable as exc:
            self.substitutions["perceptual"] = f"unavailable: {exc}"
            return "unavailable", None
        self.substitutions["perceptual"] = (
            "HRFPL on EfficientNet-Lite0 ImageNet features (4 stages, strides 4-32, MSE relative to the "
            f"target's feature energy) instead of the ADE20k ResNet50-dilated encoder ({reason})")
        return "efficientnet_lite0", resolved

    def perceptual_loss(self) -> FeaturePerceptualLoss | None:
        kind, path = self._perceptual_plan
        if kind == "none":
            return None
        if "perceptual" not in self._loss_networks:
            if kind == "unavailable":
                raise WeightsUnavailable(f"LaMa cannot train: no network for the perceptual loss "
                                         f"({self.substitutions['perceptual']}); pass perceptual_network='none' "
                                         "to train without it")
            if kind == "ade20k_resnet50dilated":
                network, normalize = load_ade20k_encoder(path), imagenet_normalize
            else:
                from bench.metrics.pretrained import efficientnet_lite0_features, lite0_normalize  # timm import is slow
                network, _ = efficientnet_lite0_features((1, 2, 3, 4), path)
                normalize = lite0_normalize
            self._loss_networks["perceptual"] = FeaturePerceptualLoss(
                network.to(self.device), normalize, self.config.perceptual_weight,
                relative=kind == "efficientnet_lite0")
        return self._loss_networks["perceptual"]

    # ----------------------------------------------------------------- inference
    def generate(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Generator pass as the official training module: input ``[img·(1−m), m]``; padded, then cropped."""
        height, width = images.shape[-2:]
        images = pad_to_multiple(images, self.config.pad_multiple)
        masks = pad_to_multiple(masks, self.config.pad_multiple)
        predicted = self.generator(torch.cat((images * (1 - masks), masks), dim=1))
        return predicted[..., :height, :width]

    def inpaint(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        was_training = self.generator.training
        self.generator.eval()
        try:
            with torch.no_grad():
                return self.generate(images, (masks > 0).to(images.dtype))
        finally:
            self.generator.train(was_training)

    # ----------------------------------------------------------------- training
    def generator_losses(self, images: torch.Tensor, masks: torch.Tensor,
                         predicted: torch.Tensor) -> dict[str, torch.Tensor]:
        config = self.config
        losses = {"gen_l1": masked_l1_loss(predicted, images, masks, config.l1_weight_known,
                                           config.l1_weight_missing)}
        with torch.no_grad():  # reals do not depend on the generator (the official pass builds no graph either)
            _, real_features = self.discriminator(images)
        fake_logits, fake_features = self.discriminator(predicted)
        losses["gen_adv"] = F.softplus(-fake_logits).mean() * config.adversarial_weight
        if config.feature_matching_weight > 0:
            losses["gen_fm"] = feature_matching_loss(fake_features, real_features) * config.feature_matching_weight
        perceptual = self.perceptual_loss()
        if perceptual is not None:
            losses["gen_resnet_pl"] = perceptual(predicted, images)
        losses["gen_total"] = torch.stack(list(losses.values())).sum()
        return losses

    def discriminator_losses(self, images: torch.Tensor, masks: torch.Tensor,
                             predicted: torch.Tensor) -> dict[str, torch.Tensor]:
        reals = images.detach().requires_grad_(True)
        real_logits, _ = self.discriminator(reals)
        gp = r1_penalty(real_logits, reals, self.grad_scaler) * self.config.r1_gp_coef
        fake_logits, _ = self.discriminator(predicted.detach())
        total = discriminator_adversarial_loss(real_logits, fake_logits, masks, gp, self.config.mask_as_fake_target)
        losses = {"discr_adv": total, "discr_real_gp": gp.detach(),
                  "discr_real_out": real_logits.detach().mean(), "discr_fake_out": fake_logits.detach().mean()}
        if self.grad_scaler is not None:
            # A step whose scaled R1 gradient overflowed is skipped by the scaler, not a diverged one: its reported
            # losses leave out the penalty it could not compute (the backward pass still takes the non-finite one,
            # which is what makes the scaler skip), and discr_r1_overflow says which steps those were.
            overflowed = ~torch.isfinite(gp.detach())
            without_gp = discriminator_adversarial_loss(real_logits.detach(), fake_logits.detach(), masks,
                                                        torch.zeros_like(gp.detach()), self.config.mask_as_fake_target)
            losses["discr_adv_reported"] = torch.where(overflowed, without_gp, total.detach())
            losses["discr_real_gp"] = torch.where(overflowed, torch.zeros_like(gp.detach()), gp.detach())
            losses["discr_r1_overflow"] = overflowed.float()
        return losses

    def _optimize(self, key: str, network: nn.Module, loss: torch.Tensor) -> None:
        self.optimizers[key].zero_grad(set_to_none=True)
        self.backward(loss)
        if self.config.grad_clip_norm:
            self.unscale_gradients(key)  # the clipping norm is in the gradients' true units
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.config.grad_clip_norm)
        self.step(key)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One generator and one discriminator update, in the official order (Lightning optimizer 0 then 1).

        As in the official loop the discriminator step re-runs the (just updated) generator in train
        mode; its output is detached there, so that pass runs without a graph. Gradient clipping at
        norm 1 is applied per optimizer (Lightning's ``gradient_clip_val``).
        """
        self.train()
        images = batch["image"].to(self.device)
        masks = batch["mask"].to(self.device)

        _set_requires_grad(self.discriminator, False)
        predicted = self.generate(images, masks)
        generator_losses = self.generator_losses(images, masks, predicted)
        self._optimize("generator", self.generator, generator_losses["gen_total"])
        _set_requires_grad(self.discriminator, True)

        _set_requires_grad(self.generator, False)
        with torch.no_grad():
            predicted = self.generate(images, masks)
        discriminator_losses = self.discriminator_losses(images, masks, predicted)
        self._optimize("discriminator", self.discriminator, discriminator_losses["discr_adv"])
        _set_requires_grad(self.generator, True)

        reported = {**generator_losses, **discriminator_losses}
        if "discr_adv_reported" in reported:  # fp16: the discriminator's loss without a penalty that overflowed
            reported["discr_adv"] = reported.pop("discr_adv_reported")
        return {key: value.detach() for key, value in reported.items()}

    # ----------------------------------------------------------------- checkpoints
    @classmethod
    def inspect_official(cls, path: Path) -> CheckpointInfo | None:
        """A release folder (``config.yaml`` + ``models/best.ckpt``) or a Lightning checkpoint, read inertly and
        without building a network: the FFC block count, widths, global ratio and the discriminator's depth and
        width come from the tensors. 18 blocks are big-lama (variant ``big_lama``), 9 lama-fourier. A folder
        with LaMa's layout or a Lightning file that is not a usable LaMa checkpoint is an error; anything else
        is not LaMa's (``None``)."""
        path = Path(path)
        if path.is_dir():
            checkpoint = path / RELEASE_CHECKPOINT
            if not checkpoint.is_file():
                if (path / "config.yaml").is_file() and (path / "models").is_dir():
                    raise CheckpointError(f"{path}: a LaMa release folder without {RELEASE_CHECKPOINT}")
                return None
            claimed, files = True, (RELEASE_CHECKPOINT.as_posix(),)
        elif path.is_file():
            checkpoint, claimed, files = path, False, ()
        else:
            return None
        refusal = None
        try:
            payload = safe_torch_load(checkpoint)
        except CheckpointError as exc:
            if not pickled_globals(checkpoint):
                raise  # truncated or not a torch file: nobody can read it
            refusal = exc  # Python objects inside: Lightning files pickle their configs and callbacks
            payload = load_checkpoint_inertly(checkpoint)  # still refuses blocked globals such as os.system
        lightning = isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict)
        state = payload["state_dict"] if lightning else payload
        if not isinstance(state, dict) or "generator.model.1.ffc.convl2l.weight" not in state:
            if claimed or lightning:
                prefixes = sorted({str(k).split(".", 1)[0] for k in state}) if isinstance(state, dict) else []
                raise CheckpointError(f"{checkpoint}: no generator.* keys of a LaMa FFC generator (top-level "
                                      f"prefixes: {', '.join(prefixes) or 'none'}); is this a LaMa checkpoint?")
            if refusal is not None:  # objects the safe loader refuses and no LaMa weights: say that, not "unknown"
                raise refusal
            return None
        config = official_lama_config(state, checkpoint)
        blocks = config["n_blocks"]
        variant_name = ("big_lama" if blocks == BIG_LAMA_BLOCKS else
                        "lama_tiny" if all(getattr(TINY, k) == v for k, v in config.items()) else "lama_fourier")
        name = {BIG_LAMA_BLOCKS: "big-lama ", LamaConfig().n_blocks: "lama-fourier "}.get(blocks, "")
        has_discriminator = "disc_ndf" in config
        if not has_discriminator:  # the discriminator then has the sizes of the variant the generator matches
            preset = TINY if variant_name == "lama_tiny" else LamaConfig()
            config.update(disc_ndf=preset.disc_ndf, disc_n_layers=preset.disc_n_layers)
        networks = ("generator", "discriminator") if has_discriminator else ("generator",)
        return CheckpointInfo(variant=variant_name, format="official", config=config, networks=networks, files=files,
                              release=f"a LaMa {name}release ({blocks} FFC blocks"
                                      + (")" if has_discriminator else ", generator only)"))

    def load_official(self, path: Path) -> None:
        """The official release: a big-lama folder or its ``best.ckpt`` (Lightning, foreign globals inert)."""
        path = official_checkpoint_file(Path(path))
        self.load_official_payload(load_checkpoint_inertly(path), path)

    def load_official_payload(self, payload: Any, path: Path) -> None:
        """Generator strictly from ``generator.*``; discriminator strictly from ``discriminator.*`` when the
        file has any (a generator-only file keeps the current discriminator; :meth:`load` warns)."""
        kept, ignored = split_official_state(state_dict_of(payload, path), path)
        if not any(k.startswith("discriminator.") for k in kept):  # load() warns about generator-only releases
            kept.update({f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()})
        load_state_dict_strict(self, kept, what=str(path))
        self.ignored_checkpoint_prefixes = ignored


def resolve_weights_path(key: str, path: str | None, download: bool | None = None) -> Path:
    return resolve_weights(key, path, download=download).path


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


# ===================================================================== variants
TINY = LamaConfig(ngf=16, n_blocks=2, disc_ndf=16)


def _build(name: str, base: LamaConfig, overrides: dict[str, Any]) -> LaMa:
    method = LaMa(apply_overrides(base, overrides))
    method.name = name
    return method


@variant(scale="tiny", paper_name="LaMa-Fourier", method_class=LaMa)
def lama_tiny(**overrides: Any) -> LaMa:
    """CPU-sized LaMa (ngf 16, 2 FFC blocks, ndf 16) with the official losses and optimiser settings."""
    return _build("lama_tiny", TINY, overrides)


@variant(scale="paper", paper_name="LaMa-Fourier", method_class=LaMa, paper_column=6)
def lama_fourier(**overrides: Any) -> LaMa:
    """configs/training/lama-fourier.yaml: 9 FFC blocks, generator 27,048,835 parameters."""
    return _build("lama_fourier", LamaConfig(), overrides)


@variant(scale="paper", paper_name="big-LaMa", method_class=LaMa)
def big_lama(**overrides: Any) -> LaMa:
    """configs/training/big-lama.yaml: 18 FFC blocks, generator 50,975,875 parameters (the released model)."""
    return _build("big_lama", dataclasses.replace(LamaConfig(), n_blocks=BIG_LAMA_BLOCKS), overrides)
