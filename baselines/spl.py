"""SPL (Zhang et al., IJCAI 2021) and SPN, the Semantic Pyramid Network (Zhang et al., Pattern Recognition
2023), behind the harness's method interface.

Written from the facts of the official code (WendongZh/SPL @35d5329: networks.py, rn.py, models_inpaint.py,
main.py, eval_final.py; WendongZh/SPN @1165a93: SPN_determine/, the same files). SPN is SPL's multi-scale
extension, so both live here and share their layers. Module names follow the official ones, so the official
checkpoints load strictly.

Generators (images [0,1], mask 1 = hole)
  image encoder   broken = image·(1−m)+m; ReflPad 3 + conv7 → conv4 s2 → conv4 s2 (64/128/256), each
                  followed by RN_B (basic region normalisation, the mask nearest-resized) and ReLU.
  prior learner   [broken, m] nearest-upsampled ×2 (512² for a 256² image) → conv7 → three conv4 s2
                  (64/128/256/256; LeakyReLU 0.1 in SPL, ReLU in SPN) → conv3 → 16 residual dense blocks
                  (G0 256, growth 32, 6 layers) → global feature fusion (+ the encoder output) → 4 plain
                  residual blocks = the *layout* (256 ch at H/4); a 1×1 head predicts the teacher's features.
  SPN pyramid     layout → conv → PixelShuffle → ReLU → shortcut residual block over [prior-encoder feature
                  at H/2, ·] = layout at H/2 (128 ch); once more with the H feature = layout at H (64 ch);
                  1×1 heads on each: predictions at H, H/2, H/4 (76/76/152 channels for TResNet-L).
  middle          8 SPADE residual blocks (dilation 2) modulated by the H/4 layout.
  decoder         SPL: conv → PixelShuffle → RN_L (learnable region norm, threshold 0.8) → ReLU, twice;
                  SPN: nearest ×2 → SPADE-MaskG block (layout at H/2), nearest ×2 → SPADE-MaskG block
                  (layout at H) → LeakyReLU 0.2. Both end with ReflPad 3 + conv7 → (tanh + 1) / 2.
  Discriminator   EdgeConnect's spectral-norm PatchGAN (:class:`bench.nn.discriminators.PatchDiscriminator`).

Teacher (training only)
  The frozen :mod:`bench.nn.teacher` shared with SAHN, fed the full image bilinearly upsampled ×2 (the official
  dataset resizes the original file to 512²): ASL TResNet-L truncated after layer2 (``teacher="tresnet_l"``,
  the paper's; SPL reads layer2, SPN conv1/layer1/layer2), or offline the pretrained EfficientNet-Lite0 at
  strides 2/4/8 (``"efficientnet_lite0"``, the default, recorded in ``substitutions``). The 1×1 prior heads
  are sized for the configured teacher (:data:`TEACHER_CHANNELS`). The teacher is built on the first training
  step, so inference never needs its weights. Loading an official checkpoint configures the method from it
  (:meth:`SemanticPriorInpainting.inspect_official`): TResNet-sized heads set ``teacher="tresnet_l"`` and every
  width and block count is the file's, so ``create_method("spl").load(file)`` evaluates it without the ASL file
  (fine-tuning it needs that file, as training always does).

Training (main.py) per step: D on (real image, detached prediction), nsgan, (real + fake) / 2, one Adam step;
then G: 1.0 × adversarial + 10 × mean(|pred − gt|·(1 + 2m)) + w_prior × Σ_scales mean(|prior − teacher|·
(1 + 3m_s)), m_s the mask nearest-resized to each scale (SPN's conv1 target nearest-upsampled to H first).
Adam lr 1e-4, betas (0, 0.9) for G and D. The official schedule is by epochs; the harness trains by steps, so
it is set in steps: ``lr_decay_step`` (official: ×0.1 once 50 epochs are done) and ``prior_cut_step`` (official,
Paris only: w_prior = 0 once 60 (SPL) / 70 (SPN) epochs are done); :func:`official_schedule` converts.

Departures (none changes the function of a trained model)
  - nsgan is written on D's logits (softplus), equal to the official BCE on sigmoid outputs; D's sigmoid has
    no weights, so its state_dict is unchanged. G's adversarial gradient is not accumulated into D (the
    official code zeroes it before D's next step anyway).
  - D starts from EdgeConnect's N(0, 0.02) initialisation (the shared class), SPL from PyTorch's default;
    spectral norm removes the scale.
  - Masks are binarised at 0.5; sizes that are not multiples of 4 (which the official code cannot run) are
    reflect-padded at the bottom/right and cropped back.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.nn.discriminators import PatchDiscriminator
from bench.errors import CheckpointError, UserError
from bench.nn.layers import FrozenNetworks
from bench.nn.losses import discriminator_adversarial_loss, generator_adversarial_loss, hole_weighted_l1
from bench.methods import InpaintingMethod, apply_overrides, variant
from bench.checkpoint_format import CheckpointInfo, load_state_dict_strict, safe_torch_load
from bench.nn.state_dicts import consecutive_count, is_state_dict, read_plain_checkpoint, tensor_shape
from bench.nn.teacher import PAPER_TEACHER, TEACHER_NAMES, SemanticTeacher, create_teacher, substitution_note

#: channels of the teacher maps each method's prior heads predict (finest first), per teacher
TEACHER_CHANNELS: dict[str, dict[str, tuple[int, ...]]] = {
    "spl": {"tresnet_l": (152,), "efficientnet_lite0": (40,)},  # layer2 / stage 2, stride 8 of the 2× input
    "spn": {"tresnet_l": (76, 76, 152), "efficientnet_lite0": (16, 24, 40)},
}
#: the image encoder downsamples ×4 and the prior learner ×8 from the 2× input
SIZE_MULTIPLE = 4
#: official schedule in epochs (main.py): lr × 0.1 once this many epochs are done
LR_DECAY_AFTER_EPOCHS = 50
#: prior loss dropped once this many epochs are done (official, Paris StreetView only)
PRIOR_CUT_AFTER_EPOCHS = {"spl": 60, "spn": 70}
#: top-level entries of the official checkpoint (InpaintingModel.state_dict()) that are not the networks:
#: the TResNet teacher (ours comes from its own weights file) and the adversarial loss's label buffers
OFFICIAL_IGNORED_PREFIXES = ("tresnet_xL_hold.", "adversarial_loss.")


# ===================================================================== configuration
@dataclass
class SemanticPriorConfig:
    """SPL's and SPN's hyper-parameters; the defaults are the official sizes and training settings."""

    # generator
    image_channels: tuple[int, int, int] = (64, 128, 256)  # image encoder (decoder mirrors it)
    prior_channels: tuple[int, int, int] = (64, 128, 256)  # prior-learner encoder before its last conv
    layout_channels: int = 256  # the layout, G0 of the dense blocks (prior encoder's last conv)
    dense_blocks: int = 16
    dense_growth: int = 32
    dense_layers: int = 6
    layout_blocks: int = 4  # plain residual blocks after global feature fusion
    spade_blocks: int = 8
    spade_dilation: int = 2
    spade_hidden: int = 128
    rn_threshold: float = 0.8  # RN_L's threshold on its self-aware map (SPL's decoder)
    disc_channels: int = 64
    # losses: adv·adversarial + l1·mean(|Δ|(1 + l1_hole·m)) + prior·Σ mean(|Δ_prior|(1 + prior_hole·m_s))
    adv_weight: float = 1.0
    l1_weight: float = 10.0
    l1_hole_weight: float = 2.0
    prior_weight: float = 1.0
    prior_hole_weight: float = 3.0
    # optimisers (Adam for G and D) and the step schedule (see official_schedule)
    lr: float = 1e-4
    d_lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.9)
    lr_decay_step: int | None = None  # steps done after which both learning rates are × lr_decay_factor
    lr_decay_factor: float = 0.1
    prior_cut_step: int | None = None  # steps done after which the prior loss weight is 0
    # teacher (frozen, never saved, built on the first training step)
    teacher: str = "efficientnet_lite0"  # efficientnet_lite0 (offline substitute) | tresnet_l (the paper's)
    teacher_path: str | None = None  # tresnet_l: ASL Open_ImagesV6_TRresNet_L_448.pth


def validate_config(config: SemanticPriorConfig, kind: str) -> None:
    """One clear line per mistake, naming the option."""
    for name in ("image_channels", "prior_channels"):
        value = tuple(getattr(config, name))
        if len(value) != 3 or min(value) < 1:
            raise UserError(f"{kind.upper()} option {name}={value}: needs 3 positive integers")
    for name in ("layout_channels", "dense_growth", "dense_layers", "spade_hidden", "disc_channels",
                 "spade_dilation"):
        if int(getattr(config, name)) < 1:
            raise UserError(f"{kind.upper()} option {name}={getattr(config, name)}: needs a positive integer")
    for name in ("dense_blocks", "layout_blocks", "spade_blocks"):
        if int(getattr(config, name)) < 0 or (name == "dense_blocks" and config.dense_blocks < 1):
            raise UserError(f"{kind.upper()} option {name}={getattr(config, name)}: too small")
    if config.teacher not in TEACHER_NAMES:
        raise UserError(f"{kind.upper()} option teacher={config.teacher!r}: choose one of {', '.join(TEACHER_NAMES)}")
    if len(tuple(config.betas)) != 2:
        raise UserError(f"{kind.upper()} option betas={config.betas}: needs two numbers")


def official_schedule(kind: str, steps_per_epoch: int, dataset: str) -> dict[str, int | None]:
    """The official epoch schedule as step overrides: ``{"lr_decay_step", "prior_cut_step"}``.

    main.py decays both learning rates ×0.1 after epoch 50 and, for Paris StreetView only, drops the prior
    loss after epoch 60 (SPL) / 70 (SPN). ``steps_per_epoch`` = training images // batch size.
    E.g. Paris (14,900 images, batch 8): ``create_method("spn", **official_schedule("spn", 1862, "paris"))``.
    """
    if kind not in PRIOR_CUT_AFTER_EPOCHS:
        raise UserError(f"unknown method kind {kind!r}; choose spl or spn")
    if steps_per_epoch < 1:
        raise UserError(f"steps_per_epoch={steps_per_epoch}: needs a positive integer")
    cut = PRIOR_CUT_AFTER_EPOCHS[kind] * steps_per_epoch if dataset.lower() == "paris" else None
    return {"lr_decay_step": LR_DECAY_AFTER_EPOCHS * steps_per_epoch, "prior_cut_step": cut}


# ===================================================================== region normalisation (rn.py)
def normalize_region(region: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
    """Instance-normalise the pixels where ``region_mask`` is 1 using their own statistics (zero elsewhere).

    ``region`` is already zero outside the region. Filling the outside with the region's mean and rescaling
    by √(area fraction) makes the whole-map instance norm equal the region's own standardisation; an empty
    region gives zeros.
    """
    height, width = region.shape[-2:]
    area = region_mask.sum(dim=(2, 3), keepdim=True)
    area = torch.where(area == 0, torch.ones_like(area), area)
    mean = region.sum(dim=(2, 3), keepdim=True) / area
    filled = region + (1 - region_mask) * mean
    return F.instance_norm(filled, eps=1e-5) * torch.sqrt(area / (height * width))


def region_normalize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The two regions of a binary ``mask`` (hole and known) each normalised by their own statistics."""
    mask = mask.detach()
    return normalize_region(x * mask, mask) + normalize_region(x * (1 - mask), 1 - mask)


class RegionNormB(nn.Module):
    """RN_B (basic region normalisation): regions from the inpainting mask, one affine pair per region."""

    def __init__(self, channels: int):
        super().__init__()
        self.foreground_gamma = nn.Parameter(torch.zeros(channels))
        self.foreground_beta = nn.Parameter(torch.zeros(channels))
        self.background_gamma = nn.Parameter(torch.zeros(channels))
        self.background_beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = F.interpolate(mask, size=x.shape[-2:], mode="nearest")
        normalized = region_normalize(x, mask)

        def per_channel(vector: torch.Tensor) -> torch.Tensor:
            return vector.view(1, -1, 1, 1)

        # both betas apply to every pixel, as in the official layer
        hole = normalized * mask * (1 + per_channel(self.foreground_gamma)) + per_channel(self.foreground_beta)
        known = normalized * (1 - mask) * (1 + per_channel(self.background_gamma)) + per_channel(self.background_beta)
        return hole + known


class SelfAwareAffine(nn.Module):
    """RN_L's self-aware map: sigmoid(conv7([channel mean, channel max])) and a conv7 γ, β from it."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=padding, bias=False)
        self.gamma_conv = nn.Conv2d(1, 1, kernel_size, padding=padding)
        self.beta_conv = nn.Conv2d(1, 1, kernel_size, padding=padding)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = torch.cat((x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)), dim=1)
        importance = torch.sigmoid(self.conv1(pooled))
        return importance, self.gamma_conv(importance), self.beta_conv(importance)


class RegionNormL(nn.Module):
    """RN_L (learnable region normalisation): regions where the self-aware map reaches ``threshold``."""

    def __init__(self, threshold: float = 0.8):
        super().__init__()
        self.sa = SelfAwareAffine()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        importance, gamma, beta = self.sa(x)
        regions = (importance.detach() >= self.threshold).to(x.dtype)
        return region_normalize(x, regions) * (1 + gamma) + beta


# ===================================================================== blocks (networks.py, rn.py)
class SPADE(nn.Module):
    """out = IN(x)·(1 + γ) + β, γ and β from the layout (nearest-resized to x): conv3 + ReLU, then conv3 each."""

    def __init__(self, channels: int, layout_channels: int, hidden_channels: int = 128):
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Conv2d(layout_channels, hidden_channels, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden_channels, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden_channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        layout = F.interpolate(layout, size=x.shape[-2:], mode="nearest")
        hidden = self.mlp_shared(layout)
        return F.instance_norm(x, eps=1e-5) * (1 + self.mlp_gamma(hidden)) + self.mlp_beta(hidden)


def run_with_layout(layers: nn.Sequential, x: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """Run a Sequential whose SPADE layers also take the layout."""
    for layer in layers:
        x = layer(x, layout) if isinstance(layer, SPADE) else layer(x)
    return x


class DenseLayer(nn.Module):
    """x ⊕ ReLU(conv3(x)): one layer of a residual dense block."""

    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, growth, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, F.relu(self.conv(x))), dim=1)


class ResidualDenseBlock(nn.Module):
    """x + conv1×1(dense layers(x)) (RDB, Zhang et al. 2018)."""

    def __init__(self, channels: int, growth: int, num_layers: int):
        super().__init__()
        self.layers = nn.Sequential(*[DenseLayer(channels + growth * i, growth) for i in range(num_layers)])
        self.lff = nn.Conv2d(channels + growth * num_layers, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lff(self.layers(x))


class ResnetBlock(nn.Module):
    """x + conv3(ReLU(conv3(x))) with reflection padding and no normalisation (the prior learner's block)."""

    def __init__(self, channels: int, dilation: int = 1):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(dilation), nn.Conv2d(channels, channels, 3, dilation=dilation), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ShortcutResnetBlock(nn.Module):
    """SPN's ResnetBlock_withshort: conv3 shortcut + conv3(ReLU(conv3(x))), from ``in_channels`` to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(dilation), nn.Conv2d(in_channels, out_channels, 3, dilation=dilation), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(out_channels, out_channels, 3))
        self.shortcut = nn.Sequential(nn.ReflectionPad2d(dilation),
                                      nn.Conv2d(in_channels, out_channels, 3, dilation=dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv_block(x)


class SpadeResnetBlock(nn.Module):
    """x + conv3(ReLU(SPADE(conv3_dilated(ReLU(SPADE(x)))))) with reflection padding (ResnetBlock_Spade)."""

    def __init__(self, channels: int, layout_channels: int, dilation: int, hidden_channels: int = 128):
        super().__init__()
        self.conv_block = nn.Sequential(
            SPADE(channels, layout_channels, hidden_channels), nn.ReLU(True),
            nn.ReflectionPad2d(dilation), nn.Conv2d(channels, channels, 3, dilation=dilation),
            SPADE(channels, layout_channels, hidden_channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3))

    def forward(self, x: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        return x + run_with_layout(self.conv_block, x, layout)


class SpadeMaskGBlock(nn.Module):
    """SPN's ResnetBlock_Spade_MaskG: (SPADE → LeakyReLU 0.2 → conv3) twice, zero padding; when the widths
    differ the shortcut is conv3(SPADE(x)), else x."""

    def __init__(self, in_channels: int, out_channels: int, layout_channels: int, hidden_channels: int = 128):
        super().__init__()
        middle = min(in_channels, out_channels)
        self.learned_shortcut = in_channels != out_channels
        self.conv_block = nn.Sequential(
            SPADE(in_channels, layout_channels, hidden_channels), nn.LeakyReLU(0.2),
            nn.Conv2d(in_channels, middle, 3, padding=1),
            SPADE(middle, layout_channels, hidden_channels), nn.LeakyReLU(0.2),
            nn.Conv2d(middle, out_channels, 3, padding=1))
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            self.SPADE_s = SPADE(in_channels, layout_channels, hidden_channels)

    def forward(self, x: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.SPADE_s(x, layout)) if self.learned_shortcut else x
        return shortcut + run_with_layout(self.conv_block, x, layout)


# ===================================================================== generators
class SemanticPriorGenerator(nn.Module):
    """The parts SPL's and SPN's G_Net share; subclasses register them in the official order (state_dict
    order) and add their decoder. ``forward(images, masks)`` → ``(image in [0,1], [prior predictions])``,
    the predictions finest first, in the teacher's channels."""

    prior_negative_slope = 0.1  # SPL's prior encoder uses LeakyReLU(0.1); SPN's plain ReLU

    def build_image_encoder(self, config: SemanticPriorConfig) -> None:
        c1, c2, c3 = config.image_channels
        self.encoder_conv1 = nn.Conv2d(3, c1, kernel_size=7)
        self.encoder_in1 = RegionNormB(c1)
        self.encoder_conv2 = nn.Conv2d(c1, c2, kernel_size=4, stride=2, padding=1)
        self.encoder_in2 = RegionNormB(c2)
        self.encoder_conv3 = nn.Conv2d(c2, c3, kernel_size=4, stride=2, padding=1)
        self.encoder_in3 = RegionNormB(c3)

    def build_middle(self, config: SemanticPriorConfig) -> None:
        self.middle = nn.Sequential(*[
            SpadeResnetBlock(config.image_channels[2], config.layout_channels, config.spade_dilation,
                             config.spade_hidden) for _ in range(config.spade_blocks)])

    def build_prior_learner(self, config: SemanticPriorConfig, head_channels: int) -> None:
        p1, p2, p3 = config.prior_channels
        layout, growth, layers = config.layout_channels, config.dense_growth, config.dense_layers
        self.encoder_conv1_sm = nn.Conv2d(4, p1, kernel_size=7)
        self.encoder_conv2_sm = nn.Conv2d(p1, p2, kernel_size=4, stride=2, padding=1)
        self.encoder_conv3_sm = nn.Conv2d(p2, p3, kernel_size=4, stride=2, padding=1)
        self.encoder_conv4_sm = nn.Conv2d(p3, layout, kernel_size=4, stride=2, padding=1)
        self.encoder_sm_out = nn.Conv2d(layout, layout, kernel_size=3, padding=1)
        self.rdbs = nn.ModuleList([ResidualDenseBlock(layout, growth, layers) for _ in range(config.dense_blocks)])
        self.gff = nn.Sequential(nn.Conv2d(layout * config.dense_blocks, layout, kernel_size=1),
                                 nn.Conv2d(layout, layout, kernel_size=3, padding=1))
        self.feature_recon = nn.Sequential(*[ResnetBlock(layout) for _ in range(config.layout_blocks)])
        self.feature_mapping = nn.Conv2d(layout, head_channels, kernel_size=1)

    # ----------------------------------------------------------------- shared forward parts
    def encode_image(self, broken: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.encoder_in1(self.encoder_conv1(F.pad(broken, (3, 3, 3, 3), mode="reflect")), masks))
        x = F.relu(self.encoder_in2(self.encoder_conv2(x), masks))
        return F.relu(self.encoder_in3(self.encoder_conv3(x), masks))

    def encode_prior(self, broken: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The prior learner's input (broken image and mask, nearest ×2) through its encoder; returns the
        deepest map (H/4) and the maps at H and H/2 (SPN's skip features)."""
        def act(x: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(x, self.prior_negative_slope)

        inputs = F.interpolate(torch.cat((broken, masks), dim=1), scale_factor=2, mode="nearest")
        x = act(self.encoder_conv1_sm(F.pad(inputs, (3, 3, 3, 3), mode="reflect")))
        at_full = act(self.encoder_conv2_sm(x))
        at_half = act(self.encoder_conv3_sm(at_full))
        return act(self.encoder_conv4_sm(at_half)), [at_full, at_half]

    def layout_at_quarter(self, encoded: torch.Tensor) -> torch.Tensor:
        """Dense blocks + global feature fusion (residual over the encoder output) + residual blocks."""
        x = self.encoder_sm_out(encoded)
        local_features = []
        for block in self.rdbs:
            x = block(x)
            local_features.append(x)
        return self.feature_recon(self.gff(torch.cat(local_features, dim=1)) + encoded)

    @staticmethod
    def to_image(logits: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(logits) + 1) / 2


class SPLGenerator(SemanticPriorGenerator):
    """SPL's G_Net: one layout at H/4, RN_L decoder."""

    def __init__(self, config: SemanticPriorConfig, teacher_channels: Sequence[int]):
        super().__init__()
        c1, c2, c3 = config.image_channels
        self.build_image_encoder(config)
        self.build_middle(config)
        self.build_prior_learner(config, teacher_channels[-1])
        self.decoder = nn.Sequential(
            nn.Conv2d(c3, c2 * 4, 3, padding=1), nn.PixelShuffle(2), RegionNormL(config.rn_threshold), nn.ReLU(True),
            nn.Conv2d(c2, c1 * 4, 3, padding=1), nn.PixelShuffle(2), RegionNormL(config.rn_threshold), nn.ReLU(True),
            nn.ReflectionPad2d(3), nn.Conv2d(c1, 3, kernel_size=7))

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        broken = images * (1 - masks) + masks
        x = self.encode_image(broken, masks)
        encoded, _ = self.encode_prior(broken, masks)
        layout = self.layout_at_quarter(encoded)
        for block in self.middle:
            x = block(x, layout)
        return self.to_image(self.decoder(x)), [self.feature_mapping(layout)]


class SPNGenerator(SemanticPriorGenerator):
    """SPN's G_Net: a layout pyramid at H/4, H/2, H and a SPADE-MaskG decoder modulated by its finer levels."""

    prior_negative_slope = 0.0

    def __init__(self, config: SemanticPriorConfig, teacher_channels: Sequence[int]):
        super().__init__()
        c1, c2, c3 = config.image_channels
        p1, p2, p3 = config.prior_channels
        self.build_image_encoder(config)
        self.build_middle(config)
        self.build_prior_learner(config, teacher_channels[2])
        # the layout pyramid: index 3 and 7 consume [prior-encoder feature, upsampled layout]
        self.feature_recon_decoder = nn.Sequential(
            nn.Conv2d(config.layout_channels, c2 * 4, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(),
            ShortcutResnetBlock(c2 + p3, c2),
            nn.Conv2d(c2, c1 * 4, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(),
            ShortcutResnetBlock(c1 + p2, c1))
        self.feature_mapping_128 = nn.Conv2d(c2, teacher_channels[1], kernel_size=1)
        self.feature_mapping_256 = nn.Conv2d(c1, teacher_channels[0], kernel_size=1)
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), SpadeMaskGBlock(c3, c2, c2, config.spade_hidden),
            nn.Upsample(scale_factor=2, mode="nearest"), SpadeMaskGBlock(c2, c1, c1, config.spade_hidden),
            nn.LeakyReLU(0.2), nn.ReflectionPad2d(3), nn.Conv2d(c1, 3, kernel_size=7))

    def layout_pyramid(self, layout: torch.Tensor, at_full: torch.Tensor,
                       at_half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layouts at H/2 and H from the one at H/4 and the prior encoder's features at those sizes."""
        steps = self.feature_recon_decoder
        x = steps[2](steps[1](steps[0](layout)))
        layout_half = steps[3](torch.cat((at_half, x), dim=1))
        x = steps[6](steps[5](steps[4](layout_half)))
        layout_full = steps[7](torch.cat((at_full, x), dim=1))
        return layout_half, layout_full

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        broken = images * (1 - masks) + masks
        x = self.encode_image(broken, masks)
        encoded, (at_full, at_half) = self.encode_prior(broken, masks)
        layout = self.layout_at_quarter(encoded)
        layout_half, layout_full = self.layout_pyramid(layout, at_full, at_half)
        priors = [self.feature_mapping_256(layout_full), self.feature_mapping_128(layout_half),
                  self.feature_mapping(layout)]
        for block in self.middle:
            x = block(x, layout)
        steps = self.decoder
        x = steps[1](steps[0](x), layout_half)
        x = steps[3](steps[2](x), layout_full)
        return self.to_image(steps[6](steps[5](steps[4](x)))), priors


# ===================================================================== losses
def semantic_prior_loss(predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], masks: torch.Tensor,
                        hole_weight: float) -> torch.Tensor:
    """Σ_scales mean(|prediction − target| · (1 + hole_weight · m_s)) as main.py computes it: a target at
    another size (SPN's conv1 at stride 4 vs its prediction at H) and the mask are nearest-resized to the
    prediction's size."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} prior predictions for {len(targets)} teacher maps")
    total = predictions[0].new_zeros(())
    for prediction, target in zip(predictions, targets):
        size = prediction.shape[-2:]
        if target.shape[-2:] != size:
            target = F.interpolate(target, size=size, mode="nearest")
        if target.shape != prediction.shape:
            raise ValueError(f"prior prediction {tuple(prediction.shape)} vs teacher {tuple(target.shape)}")
        total = total + hole_weighted_l1(prediction, target, F.interpolate(masks, size=size, mode="nearest"),
                                         hole_weight)
    return total


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    height, width = x.shape[-2:]
    pad_bottom, pad_right = -height % multiple, -width % multiple
    return F.pad(x, (0, pad_right, 0, pad_bottom), mode="reflect") if pad_bottom or pad_right else x


# ===================================================================== the methods
def forget_host_step_count(module: nn.Module, incompatible_keys: Any) -> None:
    """After a load the host's mirror of ``steps_done`` may be stale: the schedule re-reads the buffer."""
    module.steps_done_on_host = None


class SemanticPriorInpainting(FrozenNetworks, InpaintingMethod):
    """Generator, PatchGAN discriminator, their Adam optimisers, a step counter (for the schedule, saved with
    the weights) and the frozen teacher (held outside ``state_dict``, built on the first training step)."""

    kind = ""  # "spl" | "spn"
    generator_class: type[SemanticPriorGenerator] = SemanticPriorGenerator
    teacher_taps = slice(None)  # which teacher maps the heads predict

    def __init__(self, config: SemanticPriorConfig):
        validate_config(config, self.kind)
        super().__init__(config)
        self.teacher_channels = TEACHER_CHANNELS[self.kind][config.teacher]
        self.generator = self.generator_class(config, self.teacher_channels)
        # logits out: the nsgan losses apply the sigmoid themselves (see the module doc)
        self.discriminator = PatchDiscriminator(3, use_sigmoid=False, use_spectral_norm=True,
                                                base_channels=config.disc_channels)
        betas = tuple(config.betas)
        self.optimizers = {
            "generator": torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=betas),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=config.d_lr, betas=betas),
        }
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        # The count the schedule reads, mirrored on the host: reading the buffer at every step would wait for the
        # device. None after any load_state_dict: then read from the buffer once.
        self.steps_done_on_host: int | None = 0
        self.register_load_state_dict_post_hook(forget_host_step_count)
        if config.teacher != "tresnet_l":  # completed with the weights' provenance when the teacher is built
            self.substitutions["teacher"] = (f"{config.teacher} (pretrained ImageNet) instead of {PAPER_TEACHER}"
                                             f"{self.teacher_use}")

    @property
    def teacher_use(self) -> str:
        return f"; {self.kind.upper()} predicts its maps with {self.teacher_channels} channels"

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    # ----------------------------------------------------------------- teacher (training only)
    @property
    def teacher(self) -> SemanticTeacher:
        """The frozen teacher, built (and checked against the prior heads) on first use."""
        if "teacher" not in self.frozen_networks():
            teacher = create_teacher(self.config.teacher, self.config.teacher_path, layout=self.kind)
            channels = tuple(teacher.channels[self.teacher_taps])
            if channels != self.teacher_channels:
                raise ValueError(f"teacher {teacher.name} gives {channels} channels; the prior heads of "
                                 f"{self.kind.upper()} were sized for {self.teacher_channels}")
            note = substitution_note(teacher)
            if note:
                self.substitutions["teacher"] = note + self.teacher_use
            self.hold_frozen("teacher", teacher.to(self.device))
        return self.frozen("teacher")

    def teacher_targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's maps of the full image at twice its size (the official 512² input for 256²)."""
        upsampled = F.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False)
        return self.teacher(upsampled)[self.teacher_taps]

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        was_training = self.generator.training
        self.generator.eval()
        try:
            height, width = images.shape[-2:]
            masks = (masks > 0.5).to(images.dtype)
            output, _ = self.generator(pad_to_multiple(images), pad_to_multiple(masks))
            return output[..., :height, :width]
        finally:
            self.generator.train(was_training)

    # ----------------------------------------------------------------- training
    def schedule(self) -> tuple[float, float]:
        """(learning-rate factor, prior-loss weight) for the next step, from the steps already done."""
        if self.steps_done_on_host is None:
            self.steps_done_on_host = int(self.steps_done)
        config, done = self.config, self.steps_done_on_host
        lr_factor = config.lr_decay_factor if config.lr_decay_step is not None and done >= config.lr_decay_step else 1.0
        cut = config.prior_cut_step is not None and done >= config.prior_cut_step
        return lr_factor, 0.0 if cut else config.prior_weight

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """main.py's step: the discriminator first, then the generator against the updated discriminator."""
        config = self.config
        self.train()
        images = batch["image"].to(self.device)
        masks = (batch["mask"].to(self.device) > 0.5).to(images.dtype)
        lr_factor, prior_weight = self.schedule()
        for name, base_lr in (("generator", config.lr), ("discriminator", config.d_lr)):
            for group in self.optimizers[name].param_groups:
                group["lr"] = base_lr * lr_factor

        targets = self.teacher_targets(images)
        prediction, priors = self.generator(images, masks)

        real_logits, _ = self.discriminator(images)
        fake_logits, _ = self.discriminator(prediction.detach())
        d_loss = discriminator_adversarial_loss(real_logits, fake_logits) / 2
        self.optimizers["discriminator"].zero_grad(set_to_none=True)
        self.backward(d_loss)
        self.step("discriminator")

        self.discriminator.requires_grad_(False)
        try:
            adversarial = generator_adversarial_loss(self.discriminator(prediction)[0])
        finally:
            self.discriminator.requires_grad_(True)
        l1 = hole_weighted_l1(prediction, images, masks, config.l1_hole_weight)
        prior = semantic_prior_loss(priors, targets, masks, config.prior_hole_weight)
        total = config.adv_weight * adversarial + config.l1_weight * l1 + prior_weight * prior
        self.optimizers["generator"].zero_grad(set_to_none=True)
        self.backward(total)
        self.step("generator")
        self.steps_done += 1
        self.steps_done_on_host += 1
        return {"g_adv": adversarial.detach(), "g_l1": l1.detach(), "g_prior": prior.detach(),
                "g_total": total.detach(), "d": d_loss.detach()}

    # ----------------------------------------------------------------- official checkpoints
    @classmethod
    def inspect_official(cls, path: Path) -> CheckpointInfo | None:
        """An official file (``InpaintingModel.state_dict()``: ``generator[.module].*``, ``discriminator[.module].*``
        and the teacher's ``tresnet_xL_hold.*``) of this class's kind, read without building a network. The
        prior heads' widths tell the teacher they were trained for (:data:`TEACHER_CHANNELS`); every width and
        block count of the generator and the discriminator's width come from the tensors. SPN files are told
        from SPL ones by the layout pyramid (``feature_recon_decoder``)."""
        path = Path(path)
        if not path.is_file():
            return None
        payload = read_plain_checkpoint(path)
        if not is_state_dict(payload):
            return None
        parts = split_official_state(payload)
        generator, discriminator = parts["generator"], parts["discriminator"]
        if not generator:
            if "conv1.0.weight_orig" in discriminator:  # this family's PatchGAN alone: the generator is missing
                raise CheckpointError(f"{path}: no generator.* keys beside its discriminator; an official SPL/SPN "
                                      "checkpoint holds generator.module.* and discriminator.module.*")
            return None
        if "encoder_conv1_sm.weight" not in generator:
            return None  # another method's generator (LaMa's generator.model.*, say)
        pyramid = ("feature_recon_decoder.", "feature_mapping_128.")
        kind = "spn" if any(k.startswith(pyramid) for k in generator) else "spl"
        if kind != cls.kind:
            return None
        config = official_generator_config(generator, path, kind)
        variant_name = next((name for name, preset in VARIANT_SHAPES[kind].items()
                             if all(_same(getattr(preset, k), v) for k, v in config.items() if k != "teacher")), kind)
        if discriminator:
            config["disc_channels"] = int(tensor_shape(discriminator, "conv1.0.weight_orig", path,
                                                       f"an {kind.upper()} discriminator")[0])
        else:
            config["disc_channels"] = VARIANT_SHAPES[kind][variant_name].disc_channels
        networks = ("generator", "discriminator") if discriminator else ("generator",)
        size = "paper-size" if variant_name == kind else f"shapes of {variant_name}"
        return CheckpointInfo(variant=variant_name, format="official", config=config, networks=networks,
                              release=f"an {kind.upper()} release file ({config['teacher']} prior heads, {size}"
                                      + (")" if discriminator else ", generator only)"))

    def load_official(self, path: Path) -> None:
        """The official checkpoint: ``InpaintingModel.state_dict()`` as main.py saves it under DDP
        (``generator.module.*``, ``discriminator.module.*``, plus the TResNet teacher ``tresnet_xL_hold.*`` and
        the loss's label buffers, which are skipped). The generator loads strictly, the discriminator strictly
        when present (inference does not need it); the official loader's silent skipping of missing keys is
        not reproduced: a partial file fails, naming the keys."""
        payload = safe_torch_load(path)
        if not isinstance(payload, dict) or not all(torch.is_tensor(v) for v in payload.values()):
            raise CheckpointError(f"{path}: neither a sahn-bench checkpoint nor an official {self.kind.upper()} "
                                  "checkpoint (a state_dict with generator.module.* keys)")
        parts = split_official_state(payload)
        unknown = sorted(k for k in parts.pop("other") if not k.startswith(OFFICIAL_IGNORED_PREFIXES))
        if unknown:
            raise CheckpointError(f"{path}: unexpected keys outside generator/discriminator: "
                                  + ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""))
        if not parts["generator"]:
            raise CheckpointError(f"{path}: no generator.* keys; not an official {self.kind.upper()} checkpoint")
        self.check_prior_heads(parts["generator"], path)
        load_state_dict_strict(self.generator, parts["generator"], what=f"{path} (generator)")
        if parts["discriminator"]:
            load_state_dict_strict(self.discriminator, parts["discriminator"], what=f"{path} (discriminator)")

    def check_prior_heads(self, state: dict[str, torch.Tensor], path: Path) -> None:
        """A clear error when the checkpoint's prior heads were trained for another teacher than the configured one."""
        own = self.generator.state_dict()
        heads = [k for k in own if k.startswith("feature_mapping") and k.endswith(".weight")]
        if all(k in state and state[k].shape == own[k].shape for k in heads):
            return
        found = tuple(int(state[k].shape[0]) for k in heads if k in state)
        for teacher, channels in TEACHER_CHANNELS[self.kind].items():
            if teacher != self.config.teacher and sorted(found) == sorted(channels):
                raise CheckpointError(
                    f"{path}: its prior heads predict the {teacher} teacher's {found} channels, but this "
                    f"{self.kind.upper()} is configured with teacher={self.config.teacher!r} "
                    f"({self.teacher_channels}); create it with teacher={teacher!r} (the teacher is only used "
                    "for training, so evaluating needs no teacher weights)")


def official_generator_config(state: dict[str, torch.Tensor], path: Path, kind: str) -> dict[str, Any]:
    """The :class:`SemanticPriorConfig` fields a generator state_dict decides, read from its tensor shapes."""
    what = f"an {kind.upper()} generator"

    def width(key: str) -> int:
        return int(tensor_shape(state, key, path, what)[0])

    heads = ("feature_mapping_256", "feature_mapping_128", "feature_mapping") if kind == "spn" else ("feature_mapping",)
    head_widths = tuple(width(f"{head}.weight") for head in heads)
    teacher = next((name for name, widths in TEACHER_CHANNELS[kind].items() if widths == head_widths), None)
    if teacher is None:
        known = "; ".join(f"{name}: {widths}" for name, widths in TEACHER_CHANNELS[kind].items())
        raise CheckpointError(f"{path}: its prior heads predict {head_widths} channels, which fit no teacher the "
                              f"harness has ({known})")
    # SPADE's hidden width: the middle blocks', or SPN's decoder blocks' when there are no middle blocks
    spade = next((k for k in ("middle.0.conv_block.0.mlp_shared.0.weight", "decoder.1.conv_block.0.mlp_shared.0.weight")
                  if k in state), "middle.0.conv_block.0.mlp_shared.0.weight")
    config: dict[str, Any] = {
        "image_channels": tuple(width(f"encoder_conv{i}.weight") for i in (1, 2, 3)),
        "prior_channels": tuple(width(f"encoder_conv{i}_sm.weight") for i in (1, 2, 3)),
        "layout_channels": width("encoder_conv4_sm.weight"),
        "dense_blocks": consecutive_count(state, "rdbs."),
        "dense_growth": width("rdbs.0.layers.0.conv.weight"),
        "dense_layers": consecutive_count(state, "rdbs.0.layers."),
        "layout_blocks": consecutive_count(state, "feature_recon."),
        "spade_blocks": consecutive_count(state, "middle."),
        "teacher": teacher,
    }
    if kind == "spn" or config["spade_blocks"]:
        config["spade_hidden"] = width(spade)
    return config


def _same(preset_value: Any, value: Any) -> bool:
    return tuple(preset_value) == tuple(value) if isinstance(value, tuple) else preset_value == value


def split_official_state(payload: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"generator": …, "discriminator": …, "other": …}`` without the ``<net>.`` and DDP's ``module.`` prefixes."""
    parts: dict[str, dict[str, torch.Tensor]] = {"generator": {}, "discriminator": {}, "other": {}}
    for key, value in payload.items():
        network, _, rest = key.partition(".")
        if network in ("generator", "discriminator") and rest:
            parts[network][rest.removeprefix("module.")] = value
        else:
            parts["other"][key] = value
    return parts


class SPL(SemanticPriorInpainting):
    """SPL: a prior learner distils the teacher's layer2 features of the full image into a layout that
    modulates the inpainting generator's SPADE blocks."""

    paper_name = "SPL"
    kind = "spl"
    generator_class = SPLGenerator
    teacher_taps = slice(-1, None)  # the stride-8 map (TResNet's layer2, Lite0's stage 2)


class SPN(SemanticPriorInpainting):
    """SPN: SPL with a three-level layout pyramid (H/4, H/2, H), each level distilling one teacher map."""

    paper_name = "SPN"
    kind = "spn"
    generator_class = SPNGenerator


# ===================================================================== variants
#: CPU-sized, trained at 64² (teacher at 128²), batch 8: the official layout with generator widths ÷ 8,
#: 2 dense blocks of 3 layers, 1 layout block, 2 SPADE blocks and a 16-channel discriminator (≈ EC-tiny's cost)
TINY: dict[str, Any] = dict(
    image_channels=(8, 16, 32), prior_channels=(8, 16, 32), layout_channels=32, dense_blocks=2, dense_growth=8,
    dense_layers=3, layout_blocks=1, spade_blocks=2, spade_hidden=16, disc_channels=16)


#: each variant's preset, for telling which one an official file's shapes belong to
VARIANT_SHAPES: dict[str, dict[str, SemanticPriorConfig]] = {
    kind: {kind: SemanticPriorConfig(), f"{kind}_tiny": SemanticPriorConfig(**TINY)} for kind in ("spl", "spn")}


def _build(cls: type[SemanticPriorInpainting], name: str, base: dict[str, Any],
           overrides: dict[str, Any]) -> SemanticPriorInpainting:
    method = cls(apply_overrides(SemanticPriorConfig(**base), overrides))
    method.name = name
    return method


@variant(scale="paper", paper_name="SPL", method_class=SPL, paper_column=4)
def spl(**overrides: Any) -> SPL:
    """Official sizes: generator 45,597,223 parameters with the TResNet-L heads, discriminator 2,763,776."""
    return _build(SPL, "spl", {}, overrides)


@variant(scale="tiny", paper_name="SPL", method_class=SPL)
def spl_tiny(**overrides: Any) -> SPL:
    """CPU-sized SPL: the official layout, inference path and losses with fewer channels and blocks."""
    return _build(SPL, "spl_tiny", TINY, overrides)


@variant(scale="paper", paper_name="SPN", method_class=SPN, paper_column=5)
def spn(**overrides: Any) -> SPN:
    """Official sizes: generator 50,702,643 parameters with the TResNet-L heads, discriminator 2,763,776."""
    return _build(SPN, "spn", {}, overrides)


@variant(scale="tiny", paper_name="SPN", method_class=SPN)
def spn_tiny(**overrides: Any) -> SPN:
    """CPU-sized SPN: the official pyramid and decoder with fewer channels and blocks."""
    return _build(SPN, "spn_tiny", TINY, overrides)
