"""SAHN — the seed paper's semantic-aware hierarchical network — as a sahn-bench method.

Variants (entry points in pyproject.toml): :func:`sahn_paper` (256² input, the paper's size) and
:func:`sahn_tiny` (same topology, fewer channels and blocks, for CPU benchmarks). Every hyper-parameter
is a field of :class:`SAHNConfig`, so ``create_method("sahn_tiny", alpha=0.4)`` and a Ray Tune search can
set any of them. Choices the paper leaves open are listed in sahn/README.md.

``python -m sahn.model sahn_paper`` prints the parameter count and checkpoint size beside the paper's.
"""
from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench.errors import UserError
from bench.nn.layers import FrozenNetworks
from bench.nn.losses import create_perceptual_loss, hole_weighted_l1, semantic_prior_loss
from bench.methods import InpaintingMethod, apply_overrides, variant
from bench.nn.teacher import TEACHER_NAMES, create_teacher, substitution_note
from sahn.deformable import INFERENCE_KERNELS
from sahn.discriminator import D_TARGETS, MaskGuidedDiscriminator, discriminator_loss, generator_loss
from sahn.generator import NUM_SCALES, SAHNGenerator

#: §4.5 of the paper: "98.7 M parameters (395 MB storage)"
PAPER_PARAMETERS = 98.7e6
PAPER_CHECKPOINT_MB = 395


@dataclass
class SAHNConfig:
    """SAHN's hyper-parameters; the defaults are :func:`sahn_paper`'s. Per-scale tuples are finest first
    (scale 1 = the image resolution H, scale 2 = H/2, scale 3 = H/4)."""

    # generator: texture encoder E_text (conv7, conv4 s2, conv4 s2 → F_text at H/4)
    texture_channels: tuple[int, int, int] = (64, 128, 256)
    # semantic prior mapper: U-Net encoder E_s at 2H (stem, F_s^1, F_s^2; F_s^3 has pyramid_channels[2])
    encoder_channels: tuple[int, int, int] = (64, 128, 256)
    pyramid_channels: tuple[int, int, int] = (128, 256, 512)  # F_pyr^1..3 (and F_str^1..3)
    multi_res_blocks: int = 10  # dilated residual blocks on F_s^N (the paper's Multi-ResBlock)
    res_dilation: int = 2  # dilation of those blocks
    outer_kernel: int = 7  # kernel of the full-resolution convs: first of E_text and E_s, last of MSF (odd)
    # multi-scale fusion (MSF): SPADE residual blocks per scale
    msf_channels: tuple[int, int, int] = (64, 128, 256)
    msf_blocks: tuple[int, int, int] = (1, 2, 8)
    spade_hidden: int = 128  # width of SPADE's shared conv
    deformable_scales: tuple[int, ...] = (1, 2, 3)  # MSF scales whose blocks use deformable 3×3 convs; () = none
    # deformable kernel without autograd (inpaint): auto = torchvision on CUDA, bag elsewhere (sahn/deformable.py);
    # gather = the training kernel. Outputs agree to float rounding, so this is a speed setting
    deform_inference: str = "auto"
    # ablations (the paper's Table 4)
    use_unet: bool = True  # False: no skip connections from E_s into the prior pyramid
    use_msf: bool = True  # False: only F_str^N, modulating every scale (single-scale semantic fusion)
    # discriminator: four stride-2 convs (three hidden widths, then one logit per patch)
    disc_channels: tuple[int, int, int] = (64, 128, 256)
    disc_spectral_norm: bool = True
    d_target: str = "mask"  # mask: patches of I_pred without hole pixels are real; image: all of I_pred is fake
    # loss L = w_rec·L_rec + w_fm·L_fm + w_adv·L_adv + w_prior·L_prior (the paper's §4.1 weights)
    w_rec: float = 1.0
    w_fm: float = 0.3
    w_adv: float = 0.1
    w_prior: float = 0.5
    hole_weight: float = 2.0  # ∂ in L_rec = mean(|I_full − I_out| · (1 + ∂·M))
    alpha: float = 0.8  # α in L_prior (paper: one of 0.2, 0.4, 0.6, 0.8)
    # optimiser (Adam for G and D)
    lr: float = 1e-4
    d_lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.9)
    # pretrained networks (frozen, never saved): teacher P and the perceptual-loss network
    teacher: str = "efficientnet_lite0"  # efficientnet_lite0 (offline substitute) | tresnet_l (the paper's)
    teacher_path: str | None = None  # explicit weights file (tresnet_l: ASL Open_ImagesV6_TRresNet_L_448.pth)
    perceptual: str = "efficientnet_lite0"  # efficientnet_lite0 (offline substitute) | vgg16 (the paper's)
    perceptual_layers: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")  # VGG16 layers φ_i
    perceptual_stages: tuple[int, ...] = (0, 1, 2, 3)  # Lite0 stages used instead of VGG16
    perceptual_path: str | None = None


def validate(config: SAHNConfig) -> None:
    """One clear line per mistake, naming the field."""
    for name in ("texture_channels", "encoder_channels", "pyramid_channels", "msf_channels", "msf_blocks",
                 "disc_channels"):
        value = tuple(getattr(config, name))
        if len(value) != NUM_SCALES or any(int(v) < 1 for v in value):
            raise UserError(f"SAHN option {name}={value}: needs {NUM_SCALES} positive integers")
    if any(n not in range(1, NUM_SCALES + 1) for n in config.deformable_scales):
        raise UserError(f"SAHN option deformable_scales={tuple(config.deformable_scales)}: scales are 1..{NUM_SCALES}")
    if config.d_target not in D_TARGETS:
        raise UserError(f"SAHN option d_target={config.d_target!r}: choose one of {', '.join(D_TARGETS)}")
    if config.deform_inference not in INFERENCE_KERNELS:
        raise UserError(f"SAHN option deform_inference={config.deform_inference!r}: choose one of "
                        f"{', '.join(INFERENCE_KERNELS)}")
    if config.teacher not in TEACHER_NAMES:
        raise UserError(f"SAHN option teacher={config.teacher!r}: choose one of {', '.join(TEACHER_NAMES)}")
    if config.outer_kernel < 1 or config.outer_kernel % 2 == 0:
        raise UserError(f"SAHN option outer_kernel={config.outer_kernel}: needs an odd positive integer")
    if config.multi_res_blocks < 1:
        raise UserError(f"SAHN option multi_res_blocks={config.multi_res_blocks}: needs at least 1")
    if len(tuple(config.betas)) != 2:
        raise UserError(f"SAHN option betas={config.betas}: needs two numbers")


def upsample_image(images: torch.Tensor) -> torch.Tensor:
    """×2 bilinear: the teacher and E_s work at twice the image resolution (the paper's I'_full, I'_broken)."""
    return F.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False)


def broken_image(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The paper's eq. 1: I_broken = I_full ⊙ (1 − M) + M (holes white)."""
    return images * (1 - masks) + masks


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x


class SAHN(FrozenNetworks, InpaintingMethod):
    """Generator, mask-guided discriminator, their Adam optimisers, and the frozen teacher and perceptual
    networks (held outside ``state_dict`` and the optimisers)."""

    paper_name = "SAHN"
    #: images are padded to a multiple of this (E_text and E_s downsample ×4 from H; the teacher ×8 from 2H)
    SIDE_MULTIPLE = 4

    def __init__(self, config: SAHNConfig):
        validate(config)
        super().__init__(config)
        teacher = self.hold_frozen("teacher", create_teacher(config.teacher, config.teacher_path, layout="sahn"))
        perceptual, perceptual_note = create_perceptual_loss(
            config.perceptual, config.perceptual_layers, config.perceptual_path,
            substitute_stages=config.perceptual_stages)
        self.hold_frozen("perceptual", perceptual)
        teacher_note = substitution_note(teacher)
        if teacher_note:
            self.substitutions["teacher"] = teacher_note
        if perceptual_note:
            self.substitutions["perceptual"] = perceptual_note
        #: every pretrained network in use, with its weights file and sha256 (recorded with runs)
        self.pretrained = {"teacher": f"{teacher.name} {teacher.provenance}",
                           "perceptual": f"{perceptual.name} {perceptual.provenance}"}

        self.generator = SAHNGenerator(
            texture_channels=config.texture_channels, encoder_channels=config.encoder_channels,
            pyramid_channels=config.pyramid_channels, teacher_channels=teacher.channels,
            multi_res_blocks=config.multi_res_blocks, res_dilation=config.res_dilation,
            msf_channels=config.msf_channels, msf_blocks=config.msf_blocks, spade_hidden=config.spade_hidden,
            deformable_scales=tuple(config.deformable_scales), use_unet=config.use_unet, use_msf=config.use_msf,
            outer_kernel=config.outer_kernel, deform_inference=config.deform_inference)
        self.discriminator = MaskGuidedDiscriminator(config.disc_channels, use_spectral_norm=config.disc_spectral_norm)
        betas = tuple(config.betas)
        self.optimizers = {
            "generator": torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=betas),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=config.d_lr, betas=betas),
        }

    @property
    def teacher(self):
        return self.frozen("teacher")

    @property
    def perceptual(self):
        return self.frozen("perceptual")

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            height, width = images.shape[-2:]
            padded_images = pad_to_multiple(images, self.SIDE_MULTIPLE)
            padded_masks = pad_to_multiple(masks, self.SIDE_MULTIPLE)
            output = self.generator(broken_image(padded_images, padded_masks), padded_masks).image
            return output[..., :height, :width].clamp(0, 1)
        finally:
            self.train(was_training)

    # ----------------------------------------------------------------- training
    @staticmethod
    def restored_image(images: torch.Tensor, masks: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """I_pred = I_full ⊙ (1 − M) + I_out ⊙ M: known pixels from the image, holes from the generator."""
        return images * (1 - masks) + output * masks

    def fake_patches(self, masks: torch.Tensor) -> torch.Tensor | None:
        """D's per-patch fake labels for I_pred under ``d_target="mask"``; None when every patch is fake."""
        return self.discriminator.fake_patches(masks) if self.config.d_target == "mask" else None

    def losses(self, images: torch.Tensor, masks: torch.Tensor, output, goals: list[torch.Tensor],
               fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generator's four loss terms and their weighted total (the paper's eq. 14)."""
        config = self.config
        terms = {
            "rec": hole_weighted_l1(output.image, images, masks, config.hole_weight),
            "fm": self.perceptual(output.image, images),
            "adv": generator_loss(fake_logits, self.fake_patches(masks)),
            "prior": semantic_prior_loss(output.priors, goals, masks, config.alpha),
        }
        terms["total"] = (config.w_rec * terms["rec"] + config.w_fm * terms["fm"] + config.w_adv * terms["adv"]
                          + config.w_prior * terms["prior"])
        return terms

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One discriminator step, then one generator step, on the same batch."""
        images, masks = batch["image"], batch["mask"]
        goals = self.teacher(upsample_image(images))  # F_goal^n of the full image, no gradients
        output = self.generator(broken_image(images, masks), masks)
        restored = self.restored_image(images, masks, output.image)

        # D: real I_full and restored I_pred in one batch ("jointly used as inputs")
        logits = self.discriminator(torch.cat([images, restored.detach()]))
        real_logits, fake_logits = logits.chunk(2)
        d_loss = discriminator_loss(real_logits, fake_logits, self.fake_patches(masks))
        self.optimizers["discriminator"].zero_grad(set_to_none=True)
        self.backward(d_loss)
        self.step("discriminator")

        # G: D's weights are fixed for this step, so no gradient is computed for them
        self.discriminator.requires_grad_(False)
        try:
            terms = self.losses(images, masks, output, goals, self.discriminator(restored))
        finally:
            self.discriminator.requires_grad_(True)
        self.optimizers["generator"].zero_grad(set_to_none=True)
        self.backward(terms["total"])
        self.step("generator")
        return {**{k: v.detach() for k, v in terms.items()}, "d": d_loss.detach()}


# --------------------------------------------------------------------- variants
#: sahn_tiny: the same topology at CPU scale (64² images, batch 8). Deformable convs only at the coarsest
#: MSF scale: on CPU a deformable 3×3 conv costs several plain ones (see sahn/README.md). A higher
#: learning rate than the paper's, because tiny runs last hundreds of steps, not epochs.
TINY: dict[str, Any] = dict(
    texture_channels=(16, 24, 32), encoder_channels=(8, 16, 24), pyramid_channels=(16, 24, 32),
    multi_res_blocks=2, msf_channels=(16, 16, 32), msf_blocks=(1, 1, 2), spade_hidden=16,
    deformable_scales=(3,), disc_channels=(32, 64, 128), lr=5e-4, d_lr=5e-4,
)


@variant(scale="paper", paper_name="SAHN", paper_column=1)
def sahn_paper(**overrides: Any) -> SAHN:
    """SAHN at the paper's size (256² input; teacher and semantic encoder at 512²)."""
    return SAHN(apply_overrides(SAHNConfig(), overrides))


@variant(scale="tiny", paper_name="SAHN")
def sahn_tiny(**overrides: Any) -> SAHN:
    """SAHN with fewer channels and blocks: a few hundred steps on 64² images in minutes on 2 CPU cores."""
    return SAHN(apply_overrides(SAHNConfig(**TINY), overrides))


# Table 4 ablations. Scale "ablation" keeps them out of the default and paper benchmark presets.
@variant(scale="ablation", paper_name="SAHN w/o U-Net")
def sahn_tiny_no_unet(**overrides: Any) -> SAHN:
    return sahn_tiny(**{"use_unet": False, **overrides})


@variant(scale="ablation", paper_name="SAHN w/o multi-scale semantic fusion")
def sahn_tiny_no_msf(**overrides: Any) -> SAHN:
    return sahn_tiny(**{"use_msf": False, **overrides})


@variant(scale="ablation", paper_name="SAHN w/o U-Net")
def sahn_paper_no_unet(**overrides: Any) -> SAHN:
    return sahn_paper(**{"use_unet": False, **overrides})


@variant(scale="ablation", paper_name="SAHN w/o multi-scale semantic fusion")
def sahn_paper_no_msf(**overrides: Any) -> SAHN:
    return sahn_paper(**{"use_msf": False, **overrides})


# The other reading of D's targets (every patch of I_pred fake), beside the default mask-guided one. Still
# the paper's model, so its paper column is SAHN's.
@variant(scale="ablation", paper_name="SAHN")
def sahn_tiny_d_image(**overrides: Any) -> SAHN:
    return sahn_tiny(**{"d_target": "image", **overrides})


@variant(scale="ablation", paper_name="SAHN")
def sahn_paper_d_image(**overrides: Any) -> SAHN:
    return sahn_paper(**{"d_target": "image", **overrides})


# --------------------------------------------------------------------- size report
def checkpoint_bytes(method: InpaintingMethod) -> int:
    """Size of the harness checkpoint (weights only) as :meth:`InpaintingMethod.save` writes it."""
    buffer = io.BytesIO()
    torch.save({"format": "sahn-bench/1", "method": method.name, "config": method.config_dict(),
                "state_dict": method.state_dict()}, buffer)
    return buffer.getbuffer().nbytes


def size_report(method: SAHN) -> str:
    counts = method.num_parameters()
    total = sum(counts.values())
    lines = [f"{name:>14}: {count:>12,} parameters" for name, count in counts.items()]
    lines.append(f"{'total':>14}: {total:>12,} parameters ({total / 1e6:.1f}M; paper: {PAPER_PARAMETERS / 1e6:.1f}M)")
    lines.append(f"{'checkpoint':>14}: {checkpoint_bytes(method) / 1e6:.0f} MB float32 (paper: {PAPER_CHECKPOINT_MB} MB)")
    for role, description in method.pretrained.items():
        lines.append(f"{role:>14}: {description} (frozen, not counted, not saved)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print a SAHN variant's parameter count and checkpoint size.")
    parser.add_argument("variant", nargs="?", default="sahn_paper", choices=["sahn_paper", "sahn_tiny"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    method = {"sahn_paper": sahn_paper, "sahn_tiny": sahn_tiny}[args.variant]()
    method.name = args.variant
    print(f"{args.variant}\n{size_report(method)}")


if __name__ == "__main__":
    main()
