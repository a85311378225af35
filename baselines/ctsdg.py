"""CTSDG (Guo, Yang and Huang, "Image Inpainting via Conditional Texture and Structure Dual Generation",
ICCV 2021) behind the harness's method interface.

Written from the facts of the official code (xiefan-guo/ctsdg @def0274: models/generator/*.py,
models/discriminator/*.py, criteria/loss.py, datasets/dataset.py, utils/canny.py, utils/misc.py, options/*.py,
train.py, trainer.py, test.py). Module names follow the official ones, so an official checkpoint
``{'n_iter', 'generator', 'discriminator'}`` loads strictly through :meth:`CTSDG.load`.

Generator (models/generator/generator.py)
  Two coupled U-Nets of bias-free partial convolutions with a multi-channel mask (1 = valid):
  texture (masked RGB, 3 ch) and structure ([masked Canny edges, masked gray], 2 ch). Encoders: stride-2
  PConvs 64, 128, 256, 512, 512, 512, 512 with kernels 7, 5, 5, 3, 3, 3, 3, BatchNorm except on the first,
  ReLU. Each decoder starts from the *other* branch's bottleneck: bilinear ×2 (mask: nearest), concatenate the
  own encoder's skip (and its mask), 3×3 PConv + BN + LeakyReLU 0.2; the last level's skip is the input.
  Then projection heads (residual bottleneck + 1×1 conv; tanh → image, sigmoid → edge) on the two 64-ch
  decoder outputs, Bi-GFF (gated exchange, texture updated first), a stride-2 fuse, CFA (region affinity
  attention without masking, then four dilated branches mixed by a learned softmax) at half resolution, a
  3×3 fuse, bilinear ×2, and a 1×1 conv + tanh on [that, Bi-GFF output].
  Parameters: generator 52,147,789; discriminator 5,531,729.

Discriminator (models/discriminator/*.py)
  ``texture_branch`` and ``structure_branch`` are EdgeConnect's spectral-norm PatchGAN
  (:class:`bench.nn.discriminators.PatchDiscriminator`) on RGB and on [edges, gray]; ``edge_detector`` is a small
  residual CNN predicting an edge map from an RGB image. Real samples pair the image with its Canny edges,
  fake ones with the edge detector's prediction on the output. The official branches end in a sigmoid (no
  weights); ours return logits and the real/fake terms use :mod:`bench.nn.losses` (softplus), which equals the
  official BCE on sigmoid outputs. Edge-target terms are BCE on the sigmoid outputs, as official.

Inference (test.py, datasets/dataset.py, utils/canny.py)
  Images in [-1, 1] by ``(x − 0.5) / 0.5``; mask 1 = valid inside the network (hole where the harness mask
  is ≥ 0.5); gray and Canny edges (σ 2) from the *whole* image (the official test set-up does this too, so
  edges next to a hole see the hole's pixels; they are then multiplied by the mask); network input
  ``gt·mask`` (holes 0), ``[edges·mask, gray·mask]``, mask; output ``(x + 1) / 2`` clamped to [0, 1].
  Sizes that are not multiples of ``2**levels`` (128 for ``ctsdg``; the official code cannot run them) are
  padded at the bottom/right (reflect, or replicate when the pad exceeds the image) and cropped back.

The preprocessing quirk (``preprocessing="official"``, the default)
  The official dataset computes gray and edges by ``rgb2gray(np.array(ToPILImage()(image)))`` on the image
  tensor *after* ``Normalize(0.5, 0.5)``. ToPILImage multiplies the float tensor by 255 and casts to uint8,
  which truncates toward zero and wraps negative values modulo 256: [0,1] values 0.0, 0.25, 0.5, 0.75, 1.0
  become 1, 129, 0, 127, 255 (p < 128 → 2p + 1, else 2p − 255 for a pixel p). The gray image fed to the
  network (in [0, 1], from those bytes) and the Canny edges therefore come from a wrapped, contrast-doubled
  picture. The released checkpoints were trained on it, so ``ctsdg`` reproduces it bit for bit (per image,
  on the uint8 array, as official; see :func:`official_gray_and_edges`). ``preprocessing="corrected"``
  computes gray and edges from the image itself (:func:`bench.data.edges.gray_and_edges`); use it only to train
  from scratch: official weights expect the wrapped input.

Training (trainer.py, criteria/loss.py, options/train_options.py)
  Generator loss: 60 × hole L1 + 10 × valid L1 + 0.1 × perceptual + 250 × style + 0.1 × adversarial +
  1.0 × intermediate, with
    - hole / valid: ``l1((1−m)·out, (1−m)·gt)`` / ``l1(m·out, m·gt)`` (means over all pixels),
    - perceptual / style: Σ over VGG16 pool1, pool2, pool3 of L1 between the features (Gram matrices) of the
      output and of the composite vs the ground truth. VGG16 sees the [-1, 1] images without ImageNet
      normalisation, as official. Offline the VGG16 weights are unavailable: the losses then use the
      pretrained EfficientNet-Lite0 stages 0–2 (strides 2, 4, 8, like pool1–3) on [0, 1] images, recorded in
      ``substitutions["perceptual"]``,
    - adversarial: fake → real on [texture, structure] outputs + BCE(edge detector(output), Canny edges),
    - intermediate: BCE(projected edge, Canny edges) + L1(projected image, gt).
  Discriminator loss: real/fake terms on both branches + BCE of the edge detector's prediction on the real
  and on the (detached) fake image against the Canny edges.
  Adam with default betas, generator lr 2e-4, discriminator lr × 0.1. Official order: the generator steps
  first (through the current discriminator), then the discriminator on the detached output.
  Fine-tune stage (``finetune=True``; official ``--finetune True``): lr 5e-5 and every BatchNorm of the
  generator in eval mode (running statistics frozen, affine parameters still trained). The official code
  sets ``freeze_ec_bn`` in an overridden ``train()`` that its training script never calls, so there the
  freeze has no effect; we apply it, as intended (the paper, after PConv, freezes the encoder's BN; the
  override freezes every BN of the generator, and so do we). Stages, as the README::

      m = create_method("ctsdg");                 train(m, ...); m.save("stage1.pt")
      m = create_method("ctsdg", finetune=True);  m.load("stage1.pt"); train(m, ...)

Reported losses are the weighted terms (``g_*`` sum to the generator loss) and ``d_adversarial``.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import rgb2gray
from skimage.feature import canny
from torch import nn

from bench.nn.discriminators import PatchDiscriminator, init_conv_
from bench.data.edges import DEFAULT_SIGMA, gray_and_edges
from bench.errors import CheckpointError, UserError
from bench.nn.feature_losses import perceptual_loss, style_loss
from bench.nn.layers import FrozenNetworks
from bench.nn.losses import discriminator_adversarial_loss, generator_adversarial_loss
from bench.methods import InpaintingMethod, apply_overrides, variant
from bench.checkpoint_format import CheckpointInfo, load_state_dict_strict, safe_torch_load
from bench.metrics.pretrained import loss_network
from bench.nn.state_dicts import consecutive_count, is_state_dict, read_plain_checkpoint, tensor_shape

PREPROCESSING = ("official", "corrected")
FEATURE_NETWORKS = ("vgg16", "efficientnet_lite0")
#: VGG16FeatureExtractor: the outputs of features[:5], [5:10], [10:17]
VGG16_LAYERS = ("pool1", "pool2", "pool3")
#: EfficientNet-Lite0 stages with the strides of pool1–3 (2, 4, 8)
SUBSTITUTE_STAGES = (0, 1, 2)
#: official weights_init('normal', 0.02): conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0
INIT_STD = 0.02


# ===================================================================== configuration
@dataclass
class CTSDGConfig:
    """Defaults are the official sizes and options/train_options.py values."""
    # networks: widths and kernels of the stride-2 encoder levels (the same for both branches)
    encoder_channels: tuple[int, ...] = (64, 128, 256, 512, 512, 512, 512)
    encoder_kernels: tuple[int, ...] = (7, 5, 5, 3, 3, 3, 3)
    discriminator_channels: int = 64
    edge_detector_channels: int = 16
    # structure inputs (--sigma), and the ToPILImage wrap of the official dataset (see the module doc)
    canny_sigma: float = DEFAULT_SIGMA
    preprocessing: str = "official"
    # training
    lr: float = 2e-4
    d2g_lr: float = 0.1
    finetune: bool = False
    finetune_lr: float = 5e-5
    hole_weight: float = 60.0
    valid_weight: float = 10.0
    perceptual_weight: float = 0.1
    style_weight: float = 250.0
    adversarial_weight: float = 0.1
    intermediate_weight: float = 1.0
    #: "vgg16" (official; the labelled substitute when its weights cannot be had) or "efficientnet_lite0"
    feature_network: str = "vgg16"
    feature_weights_path: str | None = None


def validate_config(config: CTSDGConfig) -> None:
    if config.preprocessing not in PREPROCESSING:
        raise UserError(f"CTSDG preprocessing={config.preprocessing!r}; choose one of {PREPROCESSING}")
    if config.feature_network not in FEATURE_NETWORKS:
        raise UserError(f"CTSDG feature_network={config.feature_network!r}; choose one of {FEATURE_NETWORKS}")
    channels, kernels = tuple(config.encoder_channels), tuple(config.encoder_kernels)
    if len(channels) < 2 or len(channels) != len(kernels):
        raise UserError(f"CTSDG needs at least 2 encoder levels and one kernel per level; got encoder_channels="
                        f"{channels}, encoder_kernels={kernels}")
    if channels[0] < 4 or min(channels) < 1 or any(k < 1 or k % 2 == 0 for k in kernels):
        raise UserError("CTSDG needs encoder_channels[0] >= 4 (the projection heads use a quarter of it) "
                        "and odd encoder_kernels")
    if min(config.discriminator_channels, config.edge_detector_channels) < 1:
        raise UserError("CTSDG needs discriminator_channels, edge_detector_channels >= 1")


# ===================================================================== preprocessing (utils/canny.py)
def to_signed(images: torch.Tensor) -> torch.Tensor:
    """[0,1] → [-1,1] as ``transforms.Normalize((0.5,)*3, (0.5,)*3)`` computes it."""
    return (images - 0.5) / 0.5


def wrap_like_to_pil_image(images: torch.Tensor) -> torch.Tensor:
    """The uint8 values ``ToPILImage()`` gives for the *normalised* image tensor (the official quirk).

    ToPILImage computes ``tensor.mul(255).byte()``: float → uint8 truncates toward zero and, for negative
    values, keeps the low byte (modulo 256). That cast is undefined for negatives in C++; it is written out
    here (trunc, then remainder) so the result does not depend on the platform. Computed in float32 like the
    official tensors. [B,3,H,W] in [0,1] → uint8 [B,3,H,W].
    """
    scaled = to_signed(images.float()) * 255
    return torch.trunc(scaled).remainder(256).to(torch.uint8)


def official_gray_and_edges(pixels: torch.Tensor, sigma: float = DEFAULT_SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B,3,H,W] → gray [B,1,H,W] (float32, [0,1]) and Canny edges (float32, 0/1), per image exactly as
    ``image_to_edge``: ``rgb2gray`` of the uint8 H×W×3 array, ``canny(gray, sigma)`` on its float64 result,
    the gray image cast to float32. (The batched :func:`bench.data.edges.gray_and_edges` works on float input and
    can differ in the last bit, which may flip a Canny pixel at a threshold; hence the per-image path.)"""
    grays, edges = [], []
    for image in pixels.detach().cpu().permute(0, 2, 3, 1).numpy():
        gray = rgb2gray(image)
        grays.append(gray.astype(np.float32))
        edges.append(canny(gray, sigma=sigma).astype(np.float32))
    return _stacked(grays, pixels.device), _stacked(edges, pixels.device)


def _stacked(maps: list[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(maps)[:, None]).to(device)


def structure_inputs(images: torch.Tensor, sigma: float = DEFAULT_SIGMA,
                     preprocessing: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
    """Gray image and Canny edges of the whole [0,1] images ([B,1,H,W] each, dtype of ``images``):
    from the wrapped bytes (``"official"``) or from the images themselves (``"corrected"``)."""
    if preprocessing == "official":
        gray, edges = official_gray_and_edges(wrap_like_to_pil_image(images), sigma)
        return gray.to(images.dtype), edges.to(images.dtype)
    if preprocessing == "corrected":
        return gray_and_edges(images, sigma)
    raise UserError(f"CTSDG preprocessing={preprocessing!r}; choose one of {PREPROCESSING}")


def structure_input_batch(images: torch.Tensor, masks: torch.Tensor, sigma: float = DEFAULT_SIGMA,
                          preprocessing: str = "official") -> dict[str, torch.Tensor]:
    """:func:`structure_inputs` as named tensors, for the host-side preprocessing hook (training and inference
    alike: CTSDG's gray and edges come from the whole image; the masks are applied inside the network)."""
    gray, edges = structure_inputs(images, sigma, preprocessing)
    return {"gray": gray, "edges": edges}


# ===================================================================== partial convolutions (pconv.py)
class PartialConv2d(nn.Conv2d):
    """Partial convolution (Liu et al. 2018) with a multi-channel mask, bias-free as every CTSDG PConv.

    ``output = conv(x · mask) · (window / valid count)`` where a window holds any valid input, 0 elsewhere,
    with ``window = in_channels · k²`` and the count taken over channels and window; the updated mask is 1
    where the window held a valid input. The official layer gets the input and its multi-channel mask as
    two concatenated tensors, and every mask in CTSDG is one [B,1,H,W] map repeated over a block of channels
    (the input mask ×3 or ×2, each PConv's output mask × out_channels, and a decoder's concatenation of two
    such blocks). So the input is given here as its blocks, ``[(features, mask [B,1,H,W]), ...]``, and the
    updated mask is returned as one channel: the same numbers without materialising repeated masks.
    Counts are integers (exact in float32) as in the official all-ones convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)

    def forward(self, blocks: Sequence[tuple[torch.Tensor, torch.Tensor]]  # type: ignore[override]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        masked = [features * mask for features, mask in blocks]
        # Counts in float32 outside autocast (no-op casts at fp32): in fp16 the 1e-8 below underflows to 0, and
        # 0/0 where a window holds no valid input would be NaN
        with torch.no_grad(), torch.autocast(blocks[0][0].device.type, enabled=False):
            valid_channels = sum(mask.float() * features.shape[1] for features, mask in blocks)
            ones = valid_channels.new_ones(1, 1, *self.kernel_size)
            count = F.conv2d(valid_channels, ones, stride=self.stride, padding=self.padding, dilation=self.dilation)
            updated = count.clamp(0, 1)
            ratio = window / (count + 1e-8) * updated
        x = masked[0] if len(masked) == 1 else torch.cat(masked, dim=1)
        return super().forward(x) * ratio, updated


class PConvBNActiv(nn.Module):
    """PConv → BatchNorm (optional) → ReLU (encoder) or LeakyReLU 0.2 (decoder); keys ``conv.*``, ``bn.*``.
    Takes the input as (features, one-channel mask) blocks, returns (features, one-channel mask)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 batch_norm: bool = True, activation: str = "relu"):
        super().__init__()
        self.conv = PartialConv2d(in_channels, out_channels, kernel_size, stride)
        if batch_norm:
            self.bn = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU() if activation == "relu" else nn.LeakyReLU(0.2)

    def forward(self, blocks: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = self.conv(blocks)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return self.activation(x), mask


# ===================================================================== projection heads (projection.py)
class Bottleneck(nn.Module):
    """relu(x + bn2(conv2(relu(bn1(conv1(x)))))) with bias-free 3×3 convs through ``planes`` channels."""

    def __init__(self, channels: int, planes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, planes, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class Feature2Structure(nn.Module):
    """Structure decoder features → edge map (sigmoid), supervised by the intermediate loss."""

    def __init__(self, channels: int):
        super().__init__()
        self.structure_resolver = Bottleneck(channels, channels // 4)
        self.out_layer = nn.Sequential(nn.Conv2d(channels, 1, kernel_size=1), nn.Sigmoid())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.structure_resolver(features))


class Feature2Texture(nn.Module):
    """Texture decoder features → image in [-1,1] (tanh), supervised by the intermediate loss."""

    def __init__(self, channels: int):
        super().__init__()
        self.texture_resolver = Bottleneck(channels, channels // 4)
        self.out_layer = nn.Sequential(nn.Conv2d(channels, 3, kernel_size=1), nn.Tanh())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.texture_resolver(features))


# ===================================================================== Bi-GFF (bigff.py)
class BiGFF(nn.Module):
    """Bi-directional gated feature fusion: each branch adds the other's gated features, scaled by a learned
    γ (initially 0). The texture branch is updated first and the structure branch uses the *updated* texture,
    as in the official forward."""

    def __init__(self, channels: int):
        super().__init__()
        self.structure_gate = nn.Sequential(nn.Conv2d(2 * channels, channels, kernel_size=3, padding=1), nn.Sigmoid())
        self.texture_gate = nn.Sequential(nn.Conv2d(2 * channels, channels, kernel_size=3, padding=1), nn.Sigmoid())
        self.structure_gamma = nn.Parameter(torch.zeros(1))
        self.texture_gamma = nn.Parameter(torch.zeros(1))

    def forward(self, texture: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
        both = torch.cat((texture, structure), dim=1)
        structure_to_texture = self.structure_gate(both)
        texture_to_structure = self.texture_gate(both)
        texture = texture + self.texture_gamma * (structure_to_texture * structure)
        structure = structure + self.structure_gamma * (texture_to_structure * texture)
        return torch.cat((texture, structure), dim=1)


# ===================================================================== CFA (cfa.py)
def region_affinity(features: torch.Tensor, softmax_scale: float = 10.0, rate: int = 2) -> torch.Tensor:
    """RAL with background = foreground = ``features`` (how CTSDG calls it): no hole masking.

    The foreground is downscaled by ``rate`` (bilinear, align_corners=True); its zero-padded 3×3 patches,
    each divided by its L2 norm (at least 1e-4), are matched against every 3×3 window of the foreground
    (cosine-like scores, softmax over patches at scale 10, clamped at 1e-8). The output pastes the
    corresponding 2·rate × 2·rate background patches (stride rate, padding 1) weighted by the attention, / 4.
    The official per-sample conv2d / conv_transpose2d is written as matrix products over unfolded patches
    (the same sums); samples are processed one at a time to bound memory (the attention matrix of one
    256² sample is 4096 × 4096).
    """
    height, width = features.shape[-2:]
    small = F.interpolate(features, scale_factor=1.0 / rate, mode="bilinear", align_corners=True)
    outputs = []
    for sample, background in zip(small, features):
        windows = F.unfold(sample[None], kernel_size=3, padding=1)[0]  # [C·9, Q] — also the patches
        norms = windows.pow(2).sum(0, keepdim=True).sqrt().clamp(min=1e-4)
        scores = (windows / norms).t() @ windows  # [P, Q]: patch p against window q
        attention = F.softmax(scores * softmax_scale, dim=0).clamp(min=1e-8)
        patch = 2 * rate
        background_patches = F.unfold(background[None], kernel_size=patch, stride=rate, padding=1)[0]  # [C·16, P]
        pasted = F.fold((background_patches @ attention)[None], output_size=(height, width), kernel_size=patch,
                        stride=rate, padding=1)
        outputs.append(pasted / 4.0)
    return torch.cat(outputs, dim=0)


class MSFA(nn.Module):
    """Multi-scale feature aggregation: dilated 3×3 branches (1, 2, 4, 8) mixed by a per-pixel softmax."""

    DILATIONS = (1, 2, 4, 8)

    def __init__(self, channels: int):
        super().__init__()
        for index, dilation in enumerate(self.DILATIONS):
            self.add_module(f"dilated_conv_{index}", nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size=3, dilation=dilation, padding=dilation), nn.ReLU(inplace=True)))
        self.weight_calc = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, len(self.DILATIONS), kernel_size=1), nn.ReLU(inplace=True),
            nn.Softmax(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.weight_calc(x)
        branches = [getattr(self, f"dilated_conv_{index}")(x) for index in range(len(self.DILATIONS))]
        return sum(weights[:, index:index + 1] * branch for index, branch in enumerate(branches))


class CFA(nn.Module):
    """Contextual feature aggregation: region affinity attention, then :class:`MSFA` (key ``msfa.*``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.msfa = MSFA(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.msfa(region_affinity(x))


# ===================================================================== generator (generator.py)
def _upsample(x: torch.Tensor, mode: str) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))


class CTSDGGenerator(nn.Module):
    """The coupled texture/structure U-Nets with Bi-GFF and CFA (official attribute names and order).

    ``forward(image, structure, mask)`` takes the masked [-1,1] image, [masked edges, masked gray] and the
    mask [B,1,H,W] (1 = valid; H, W multiples of ``2**levels``) and returns the image (tanh), and the
    projected image (tanh) and edge map (sigmoid) that the intermediate loss supervises.
    """

    BRANCHES = (("texture", 3), ("structure", 2))

    def __init__(self, encoder_channels: Sequence[int] = (64, 128, 256, 512, 512, 512, 512),
                 encoder_kernels: Sequence[int] = (7, 5, 5, 3, 3, 3, 3)):
        super().__init__()
        self.levels = len(encoder_channels)
        #: the fine-tune stage's BatchNorm freeze (official ``freeze_ec_bn``), applied by :meth:`train`
        self.freeze_batch_norm = False
        for branch, in_channels in self.BRANCHES:
            widths = (in_channels, *encoder_channels)
            for level in range(1, self.levels + 1):
                self.add_module(f"ec_{branch}_{level}", PConvBNActiv(
                    widths[level - 1], widths[level], encoder_kernels[level - 1], stride=2, batch_norm=level > 1))
            for level in range(self.levels, 0, -1):
                # the up-sampled deeper level (width of this level) + the skip; out: the skip's width (≥ level 1)
                self.add_module(f"dc_{branch}_{level}", PConvBNActiv(
                    widths[level] + widths[level - 1], widths[max(level - 1, 1)], activation="leaky"))
        features = encoder_channels[0]
        self.structure_feature_projection = Feature2Structure(features)
        self.texture_feature_projection = Feature2Texture(features)
        self.bigff = BiGFF(features)
        self.fusion_layer1 = nn.Sequential(nn.Conv2d(2 * features, features, kernel_size=3, stride=2, padding=1),
                                           nn.LeakyReLU(0.2))
        self.cfa = CFA(features)
        self.fusion_layer2 = nn.Sequential(nn.Conv2d(2 * features, features, kernel_size=3, padding=1),
                                           nn.LeakyReLU(0.2))
        self.out_layer = nn.Sequential(nn.Conv2d(3 * features, 3, kernel_size=1), nn.Tanh())
        self.apply(_official_init)

    @property
    def size_multiple(self) -> int:
        return 2 ** self.levels

    def encode(self, branch: str, x: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(input, mask), (level 1, its mask), …, (bottleneck, its mask)], masks [B,1,h,w]."""
        levels = [(x, mask)]
        for level in range(1, self.levels + 1):
            levels.append(getattr(self, f"ec_{branch}_{level}")([levels[-1]]))
        return levels

    def decode(self, branch: str, start: tuple[torch.Tensor, torch.Tensor],
               skips: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x, mask = start
        for level in range(self.levels, 0, -1):
            upsampled = (_upsample(x, "bilinear"), _upsample(mask, "nearest"))
            x, mask = getattr(self, f"dc_{branch}_{level}")([upsampled, skips[level - 1]])
        return x

    def forward(self, image: torch.Tensor, structure: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        texture_levels = self.encode("texture", image, mask)
        structure_levels = self.encode("structure", structure, mask)
        # the coupling: each decoder starts from the other branch's bottleneck
        texture = self.decode("texture", structure_levels[-1], texture_levels)
        structure = self.decode("structure", texture_levels[-1], structure_levels)
        projected_image = self.texture_feature_projection(texture)
        projected_edge = self.structure_feature_projection(structure)
        fused = self.bigff(texture, structure)
        x = self.fusion_layer1(fused)
        x = self.fusion_layer2(torch.cat((x, self.cfa(x)), dim=1))
        output = self.out_layer(torch.cat((_upsample(x, "bilinear"), fused), dim=1))
        return output, projected_image, projected_edge

    def train(self, mode: bool = True) -> "CTSDGGenerator":
        super().train(mode)
        if self.freeze_batch_norm:
            for module in self.modules():  # every kind: data-parallel training synchronises them
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def _official_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        init_conv_(module, INIT_STD)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.zeros_(module.bias)


# ===================================================================== discriminator (discriminator/*.py)
class EdgeDetector(nn.Module):
    """RGB → edge probability: conv3+BN+ReLU, a residual pair of conv3+BN, ReLU, 1×1 conv + sigmoid.
    PyTorch's default initialisation, as official (the discriminator does not re-initialise it)."""

    def __init__(self, in_channels: int = 3, mid_channels: int = 16):
        super().__init__()
        self.projection = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1),
                                        nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True))
        self.res_layer = nn.Sequential(
            nn.Conv2d(mid_channels, mid_channels, kernel_size=3, padding=1), nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=3, padding=1), nn.BatchNorm2d(mid_channels))
        self.relu = nn.ReLU(inplace=True)
        self.out_layer = nn.Sequential(nn.Conv2d(mid_channels, 1, kernel_size=1), nn.Sigmoid())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.projection(images)
        return self.out_layer(self.relu(self.res_layer(x) + x))


class CTSDGDiscriminator(nn.Module):
    """Texture PatchGAN on the image, structure PatchGAN on [edges, gray], and the edge detector."""

    def __init__(self, base_channels: int = 64, edge_detector_channels: int = 16):
        super().__init__()
        # logits out: the real/fake losses apply the sigmoid themselves (see the module doc)
        self.texture_branch = PatchDiscriminator(3, use_sigmoid=False, use_spectral_norm=True,
                                                 base_channels=base_channels)
        self.structure_branch = PatchDiscriminator(2, use_sigmoid=False, use_spectral_norm=True,
                                                   base_channels=base_channels)
        self.edge_detector = EdgeDetector(3, edge_detector_channels)

    def forward(self, images: torch.Tensor, gray: torch.Tensor,
                edges: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of [texture, structure] (concatenated on channels) and the edge detector's prediction.
        ``edges`` given (real samples): the structure branch sees them; None (fake): it sees the prediction."""
        predicted_edges = self.edge_detector(images)
        texture_logits, _ = self.texture_branch(images)
        structure_logits, _ = self.structure_branch(
            torch.cat((predicted_edges if edges is None else edges, gray), dim=1))
        return torch.cat((texture_logits, structure_logits), dim=1), predicted_edges


# ===================================================================== losses (criteria/loss.py)
BCE_LOG_FLOOR = -100.0  # F.binary_cross_entropy floors each log term here, so a saturated sigmoid costs 100


def _floored_log(x: torch.Tensor) -> torch.Tensor:
    """``max(log x, -100)``. Where x is exactly 0 the floor is taken directly: through ``log`` its gradient
    would be 0 · ∞ = NaN. A NaN stays NaN."""
    zero = x == 0
    return torch.where(zero, BCE_LOG_FLOOR, torch.where(zero, 1.0, x).log().clamp_min(BCE_LOG_FLOOR))


def _floored_log1m(x: torch.Tensor) -> torch.Tensor:
    """``max(log(1 − x), -100)`` through ``log1p``, exact where x is exactly 1, as :func:`_floored_log`."""
    one = x == 1
    return torch.where(one, BCE_LOG_FLOOR, torch.log1p(-torch.where(one, 0.0, x)).clamp_min(BCE_LOG_FLOOR))


def binary_cross_entropy(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE of probabilities, the values of ``F.binary_cross_entropy`` (to float32 round-off; exact at 0
    and 1) from elementwise operations. On CUDA, ``F.binary_cross_entropy`` device-asserts on an input
    outside [0, 1] — a NaN from a diverging step — which leaves the worker's CUDA context unusable; here
    such an input gives a NaN loss, which the training loop reports as a non-finite loss."""
    return ((targets - 1) * _floored_log1m(probabilities) - targets * _floored_log(probabilities)).mean()


# ===================================================================== the method
@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode for the block, the previous mode restored after."""
    mode = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(mode)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right to a multiple: reflect, or replicate when the pad is not smaller than the image."""
    height, width = x.shape[-2:]
    pad_bottom, pad_right = -height % multiple, -width % multiple
    if not (pad_bottom or pad_right):
        return x
    mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"
    return F.pad(x, (0, pad_right, 0, pad_bottom), mode=mode)


class CTSDG(FrozenNetworks, InpaintingMethod):
    """Conditional texture and structure dual generation (see the module doc)."""

    paper_name = "CTSDG"

    def __init__(self, config: CTSDGConfig):
        validate_config(config)
        super().__init__(config)
        self.generator = CTSDGGenerator(tuple(config.encoder_channels), tuple(config.encoder_kernels))
        self.generator.freeze_batch_norm = config.finetune
        self.discriminator = CTSDGDiscriminator(config.discriminator_channels, config.edge_detector_channels)
        generator_lr = config.finetune_lr if config.finetune else config.lr
        self.optimizers = {
            "generator": torch.optim.Adam(self.generator.parameters(), lr=generator_lr),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=generator_lr * config.d2g_lr),
        }
        self._features_take_signed_images = False
        #: ``n_iter`` of the official checkpoint after :meth:`load_official`
        self.official_iteration: int | None = None

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    # ----------------------------------------------------------------- inputs and the generator
    def structure_inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gray and Canny edges of the whole [0,1] images, by ``config.preprocessing``."""
        return structure_inputs(images, self.config.canny_sigma, self.config.preprocessing)

    def host_preprocessing(self, purpose: str) -> functools.partial:
        """Gray and Canny by scikit-image on the CPU, where the batch is before it goes to the device (the same
        for training and :meth:`inpaint`)."""
        return functools.partial(structure_input_batch, sigma=self.config.canny_sigma,
                                 preprocessing=self.config.preprocessing)

    def given_or_computed_structure(self, images: torch.Tensor, gray: torch.Tensor | None,
                                    edges: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The host-made gray and edges of ``images`` when given, else computed here."""
        if gray is None or edges is None:
            return self.structure_inputs(images)
        return gray.to(images.device), edges.to(images.device)

    def run_generator(self, truth: torch.Tensor, gray: torch.Tensor, edges: torch.Tensor,
                      valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The official inputs (``gt·m``, ``[edges·m, gray·m]``, ``m``), padded to the size multiple and
        cropped back; returns the generator's (image, projected image, projected edge)."""
        height, width = truth.shape[-2:]
        multiple = self.generator.size_multiple
        inputs = (truth * valid, torch.cat((edges * valid, gray * valid), dim=1), valid)
        outputs = self.generator(*(pad_to_multiple(x, multiple) for x in inputs))
        return tuple(x[..., :height, :width] for x in outputs)  # type: ignore[return-value]

    @staticmethod
    def valid_mask(masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Harness mask (1 = hole) → CTSDG's (1 = valid), binarised at 0.5 as the official dataset."""
        return (masks < 0.5).to(dtype)

    def inpaint(self, images: torch.Tensor, masks: torch.Tensor, gray: torch.Tensor | None = None,
                edges: torch.Tensor | None = None) -> torch.Tensor:
        """``gray`` and ``edges``: what ``host_preprocessing("inpaint")`` made of these images (computed here when
        absent)."""
        images = images.to(self.device)
        valid = self.valid_mask(masks.to(self.device), images.dtype)
        with evaluating(self.generator), torch.no_grad():
            gray, edges = self.given_or_computed_structure(images, gray, edges)
            output, _, _ = self.run_generator(to_signed(images), gray, edges, valid)
        return ((output + 1) / 2).clamp(0, 1)

    # ----------------------------------------------------------------- perceptual / style network
    def feature_network(self) -> nn.Module:
        """VGG16 pool1–3 fed raw [-1,1] images (official), or the labelled Lite0 substitute on [0,1]."""
        if "features" not in self.frozen_networks():
            config = self.config
            if config.feature_network == "vgg16":
                network, substitution = loss_network("vgg16", VGG16_LAYERS, config.feature_weights_path,
                                                     substitute_stages=SUBSTITUTE_STAGES)
            else:
                network, _ = loss_network("efficientnet_lite0", (), substitute_stages=SUBSTITUTE_STAGES)
                substitution = f"{network.name} ({network.provenance}) instead of vgg16, as configured"
            self._features_take_signed_images = substitution is None
            if substitution is None:
                # VGG16FeatureExtractor has no ImageNet normalisation: it sees the [-1,1] tensors as they are
                network.mean.zero_()
                network.std.fill_(1.0)
            else:
                self.substitutions["perceptual"] = f"perceptual and style losses on {substitution}"
            self.hold_frozen("features", network.to(self.device))
        return self.frozen("features")

    def feature_losses(self, output: torch.Tensor, composite: torch.Tensor,
                       truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted perceptual and style losses of output and composite against the ground truth ([-1,1])."""
        network = self.feature_network()
        prepare = (lambda x: x) if self._features_take_signed_images else (lambda x: (x + 1) / 2)
        batch = len(output)
        fake = network(prepare(torch.cat((output, composite))))
        with torch.no_grad():
            real = network(prepare(truth))
        output_features, composite_features = [f[:batch] for f in fake], [f[batch:] for f in fake]
        perceptual = perceptual_loss(output_features, real) + perceptual_loss(composite_features, real)
        style = style_loss(output_features, real) + style_loss(composite_features, real)
        return perceptual, style

    # ----------------------------------------------------------------- losses (criteria/loss.py)
    def generator_losses(self, truth: torch.Tensor, valid: torch.Tensor, gray: torch.Tensor, edges: torch.Tensor,
                         generated: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted terms of the generator loss (they sum to it)."""
        config = self.config
        output, projected_image, projected_edge = generated
        holes = 1 - valid
        composite = truth * valid + output * holes
        fake_logits, fake_edges = self.discriminator(output, gray)
        perceptual, style = self.feature_losses(output, composite, truth)
        adversarial = generator_adversarial_loss(fake_logits) + binary_cross_entropy(fake_edges, edges)
        intermediate = binary_cross_entropy(projected_edge, edges) + F.l1_loss(projected_image, truth)
        return {
            "g_hole": F.l1_loss(holes * output, holes * truth) * config.hole_weight,
            "g_valid": F.l1_loss(valid * output, valid * truth) * config.valid_weight,
            "g_perceptual": perceptual * config.perceptual_weight,
            "g_style": style * config.style_weight,
            "g_adversarial": adversarial * config.adversarial_weight,
            "g_intermediate": intermediate * config.intermediate_weight,
        }

    def discriminator_loss(self, truth: torch.Tensor, output: torch.Tensor, gray: torch.Tensor,
                           edges: torch.Tensor) -> torch.Tensor:
        """Real/fake on both branches + the edge detector's BCE on the real and the fake image."""
        real_logits, real_edges = self.discriminator(truth, gray, edges)
        fake_logits, fake_edges = self.discriminator(output.detach(), gray)
        return (discriminator_adversarial_loss(real_logits, fake_logits)
                + binary_cross_entropy(real_edges, edges) + binary_cross_entropy(fake_edges, edges))

    # ----------------------------------------------------------------- training (trainer.py)
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Generator step through the current discriminator, then the discriminator step (official order)."""
        self.train()
        images = batch["image"].to(self.device)
        valid = self.valid_mask(batch["mask"].to(self.device), images.dtype)
        gray, edges = self.given_or_computed_structure(images, batch.get("gray"), batch.get("edges"))
        truth = to_signed(images)
        generated = self.run_generator(truth, gray, edges, valid)
        losses = self.generator_losses(truth, valid, gray, edges, generated)

        self.optimizers["generator"].zero_grad(set_to_none=True)
        # the adversarial terms pass through D; only G's parameters receive this gradient (D is frozen here)
        self.backward(sum(losses.values()), inputs=list(self.generator.parameters()))
        self.step("generator")

        self.optimizers["discriminator"].zero_grad(set_to_none=True)
        discriminator_total = self.discriminator_loss(truth, generated[0], gray, edges)
        self.backward(discriminator_total)
        self.step("discriminator")
        return {**{name: value.detach() for name, value in losses.items()},
                "d_adversarial": discriminator_total.detach()}

    # ----------------------------------------------------------------- official checkpoints
    @classmethod
    def inspect_official(cls, path: Path) -> CheckpointInfo | None:
        """An official file ``{'n_iter', 'generator', 'discriminator'}`` read without building a network: the
        encoder widths and kernels (hence the number of levels) come from ``ec_texture_<level>.conv.weight``,
        the discriminator's widths from its first convolutions. ``None`` for anything else."""
        path = Path(path)
        if not path.is_file():
            return None
        payload = read_plain_checkpoint(path)
        generator = payload.get("generator") if isinstance(payload, dict) else None
        if not is_state_dict(generator):
            return None
        generator = _without_data_parallel_prefix(generator)
        levels = consecutive_count(generator, "ec_texture_", start=1)
        if not levels:
            return None  # another method's {'generator': ...} file (EdgeConnect's, say)
        shapes = [tensor_shape(generator, f"ec_texture_{level}.conv.weight", path, "a CTSDG generator")
                  for level in range(1, levels + 1)]
        # the released weights expect the official (wrapped) edge and gray inputs, see the module doc
        config: dict[str, Any] = {"encoder_channels": tuple(int(s[0]) for s in shapes),
                                  "encoder_kernels": tuple(int(s[-1]) for s in shapes), "preprocessing": "official"}
        variant_name = next((name for name, preset in VARIANT_CONFIGS.items()
                             if tuple(preset.encoder_channels) == config["encoder_channels"]
                             and tuple(preset.encoder_kernels) == config["encoder_kernels"]), "ctsdg")
        discriminator = payload.get("discriminator")
        if is_state_dict(discriminator):  # an empty or absent one: a generator-only release
            discriminator = _without_data_parallel_prefix(discriminator)
            what = "a CTSDG discriminator"
            config["discriminator_channels"] = int(
                tensor_shape(discriminator, "texture_branch.conv1.0.weight_orig", path, what)[0])
            config["edge_detector_channels"] = int(
                tensor_shape(discriminator, "edge_detector.projection.0.weight", path, what)[0])
            networks: tuple[str, ...] = ("generator", "discriminator")
        else:
            preset = VARIANT_CONFIGS[variant_name]
            config["discriminator_channels"] = preset.discriminator_channels
            config["edge_detector_channels"] = preset.edge_detector_channels
            networks = ("generator",)
        widths = "/".join(str(c) for c in config["encoder_channels"])
        return CheckpointInfo(variant=variant_name, format="official", config=config, networks=networks,
                              release=f"a CTSDG release file ({levels} levels, widths {widths}"
                                      + (")" if len(networks) == 2 else ", generator only)"))

    def load_official(self, path: Path) -> None:
        """An official checkpoint file ``{'n_iter', 'generator', 'discriminator'}`` (trainer.py), loaded
        strictly; the discriminator is optional (a generator-only file is enough to inpaint)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: neither a sahn-bench checkpoint nor an official CTSDG checkpoint file")
        payload = safe_torch_load(path)
        if not isinstance(payload, dict) or not isinstance(payload.get("generator"), dict):
            raise CheckpointError(f"{path}: expected an official CTSDG checkpoint "
                                  "{'n_iter': int, 'generator': state_dict, 'discriminator': state_dict}")
        load_state_dict_strict(self.generator, _without_data_parallel_prefix(payload["generator"]),
                               what=f"{path} ['generator']")
        if isinstance(payload.get("discriminator"), dict) and payload["discriminator"]:  # empty: generator only
            load_state_dict_strict(self.discriminator, _without_data_parallel_prefix(payload["discriminator"]),
                                   what=f"{path} ['discriminator']")
        self.official_iteration = payload.get("n_iter")


def _without_data_parallel_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official saves unwrap DDP, but a file saved from the wrapper would carry ``module.`` on every key."""
    if state and all(key.startswith("module.") for key in state):
        return {key.removeprefix("module."): value for key, value in state.items()}
    return state


# ===================================================================== variants
#: CPU-sized: five levels 16, 32, 64, 64, 64 (kernels 7, 5, 5, 3, 3), so a 64² image has the official 2×2
#: bottleneck (the official seven levels need 128² and reach 2×2 at 256²) and CFA runs at 32² (half size, as
#: official); 16-channel discriminators and an 8-channel edge detector. BatchNorm and everything else official.
TINY = CTSDGConfig(encoder_channels=(16, 32, 64, 64, 64), encoder_kernels=(7, 5, 5, 3, 3),
                   discriminator_channels=16, edge_detector_channels=8)
#: each variant's preset, for telling which one an official file's shapes belong to
VARIANT_CONFIGS = {"ctsdg": CTSDGConfig(), "ctsdg_tiny": TINY}


@variant(scale="paper", paper_name="CTSDG", method_class=CTSDG, paper_column=3)
def ctsdg(**overrides: Any) -> CTSDG:
    """The official sizes: generator 52,147,789 and discriminator 5,531,729 parameters; official preprocessing."""
    return CTSDG(apply_overrides(CTSDGConfig(), overrides))


@variant(scale="tiny", paper_name="CTSDG", method_class=CTSDG)
def ctsdg_tiny(**overrides: Any) -> CTSDG:
    """CPU-sized CTSDG for 64² images: fewer channels and levels, the official layout, inputs and losses."""
    return CTSDG(apply_overrides(TINY, overrides))
