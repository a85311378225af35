"""The "simple" DDPM noise-prediction U-Net (Ho et al. 2020), as used by DDNM for CelebA-HQ.

Written from the facts of the official module (wyhuai/DDNM ``guided_diffusion/models.py``, the same
network as ermongroup/ddim ``models/diffusion.py`` and SDEdit): attribute names and nesting follow the
official ones, so the released state_dicts (SDEdit's ``celeba_hq.ckpt``) load strictly with their own
key names: ``temb.dense.0.weight``, ``conv_in.weight``, ``down.0.block.0.norm1.weight``,
``down.4.attn.1.q.weight``, ``mid.attn_1.q.weight``, ``up.5.upsample.conv.weight``, ``norm_out.weight``, ...

Layout: sinusoidal timestep embedding (width ``ch``) → two dense layers (width ``4·ch``); ``conv_in``;
per resolution level ``num_res_blocks`` residual blocks (GroupNorm 32, swish, 3×3 convs, timestep
projection added after the first conv, 1×1 ``nin_shortcut`` when the width changes), self-attention
after each block at the resolutions in ``attn_resolutions``, stride-2 conv downsampling (zero pad right
and bottom only); middle block–attention–block; the decoder mirrors it with ``num_res_blocks + 1``
blocks per level over the concatenated skip activations and nearest ×2 + 3×3 conv upsampling;
GroupNorm, swish, ``conv_out``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OFFICIAL_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6


def timestep_embedding(timesteps: torch.Tensor, width: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: sines of all frequencies, then cosines.

    Frequencies are ``10000^(-k/(half-1))`` for k = 0…half-1 (the tensor2tensor variant the official
    DDPM code uses); an odd width gets one zero column at the end.
    """
    half = width // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - 1)
    frequencies = torch.exp(-math.log(10000.0) * exponents)
    angles = timesteps.float()[:, None] * frequencies[None, :]
    embedding = torch.cat((angles.sin(), angles.cos()), dim=1)
    return F.pad(embedding, (0, 1)) if width % 2 else embedding


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)


class TimestepEmbedding(nn.Module):
    """Holds the two dense layers under the official name ``temb.dense.{0,1}``."""

    def __init__(self, ch: int, width: int):
        super().__init__()
        self.dense = nn.ModuleList([nn.Linear(ch, width), nn.Linear(width, width)])
        self.ch = ch

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        hidden = swish(self.dense[0](timestep_embedding(timesteps, self.ch)))
        return self.dense[1](hidden)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float, norm_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = h + self.temb_proj(swish(temb))[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1×1 convs for q, k, v and the output, residual."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        normed = self.norm(x)

        def tokens(projection: nn.Conv2d) -> torch.Tensor:  # [B, 1 head, HW, C]
            return projection(normed).flatten(2).transpose(1, 2).unsqueeze(1)

        # softmax(q·kᵀ/√C)·v, the official attention. The head axis is there because the fused CUDA kernels
        # (flash, memory-efficient) take only [B, heads, L, d]: with 3-D inputs CUDA falls back to the
        # unfused path, which materialises the HW×HW weights. Same function: on the CPU the same values.
        attended = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v)).squeeze(1)
        attended = attended.transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # asymmetric padding (right and bottom only), as the original TensorFlow "SAME" stride-2 conv
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``block`` and ``attn`` lists, plus ``downsample`` or ``upsample`` when present."""

    def __init__(self, blocks: list[ResnetBlock], attentions: list[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attentions)

    def run_block(self, index: int, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block[index](h, temb)
        return self.attn[index](h) if len(self.attn) else h


class Middle(nn.Module):
    def __init__(self, channels: int, temb_channels: int, dropout: float, norm_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, temb_channels, dropout, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, temb_channels, dropout, norm_groups)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h, temb)), temb)


class SimpleUNet(nn.Module):
    """ε-prediction U-Net; ``forward(x_t, t)`` with ``t`` a ``[B]`` tensor of timesteps (int or float).

    ``resolution`` is the image size the network is built for: it decides at which levels attention
    sits (levels whose side equals one of ``attn_resolutions``), as in the official constructor.
    ``norm_groups`` is 32 in every official model; smaller CPU-sized members of the family (width 16)
    need fewer groups. It changes no parameter shapes or names.
    """

    def __init__(self, *, resolution: int, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4, 4),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,), dropout: float = 0.0,
                 in_channels: int = 3, out_ch: int = 3, norm_groups: int = OFFICIAL_NORM_GROUPS):
        super().__init__()
        ch_mult = tuple(ch_mult)
        self.resolution = resolution
        self.num_res_blocks = num_res_blocks
        temb_channels = 4 * ch
        self.temb = TimestepEmbedding(ch, temb_channels)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)

        # encoder: level i maps width ch·mult[i-1] (ch for i = 0) to ch·mult[i]
        input_mult = (1,) + ch_mult
        side = resolution
        self.down = nn.ModuleList()
        width = ch
        for level, mult in enumerate(ch_mult):
            blocks, attentions = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(width, ch * mult, temb_channels, dropout, norm_groups))
                width = ch * mult
                if side in attn_resolutions:
                    attentions.append(AttnBlock(width, norm_groups))
            stage = Level(blocks, attentions)
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(width)
                side //= 2
            self.down.append(stage)

        self.mid = Middle(width, temb_channels, dropout, norm_groups)

        # decoder, built deepest first and stored shallowest first (``up.0`` is full resolution);
        # its last block per level takes the skip from before that level's encoder blocks
        levels: list[Level] = []
        for level in reversed(range(len(ch_mult))):
            blocks, attentions = [], []
            for index in range(num_res_blocks + 1):
                skip = ch * (input_mult[level] if index == num_res_blocks else ch_mult[level])
                blocks.append(ResnetBlock(width + skip, ch * ch_mult[level], temb_channels, dropout, norm_groups))
                width = ch * ch_mult[level]
                if side in attn_resolutions:
                    attentions.append(AttnBlock(width, norm_groups))
            stage = Level(blocks, attentions)
            if level != 0:
                stage.upsample = Upsample(width)
                side *= 2
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)

        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, out_ch, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        temb = self.temb(timesteps)
        skips = [self.conv_in(x)]
        for stage in self.down:
            for index in range(self.num_res_blocks):
                skips.append(stage.run_block(index, skips[-1], temb))
            if hasattr(stage, "downsample"):
                skips.append(stage.downsample(skips[-1]))

        h = self.mid(skips[-1], temb)
        for stage in reversed(self.up):
            for index in range(self.num_res_blocks + 1):
                h = stage.run_block(index, torch.cat((h, skips.pop()), dim=1), temb)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


# ===================================================================== guided-diffusion U-Net (ImageNet 256)
# Facts from openai/guided-diffusion ``unet.py`` as vendored by DDNM (``guided_diffusion/unet.py``,
# ``configs/imagenet_256.yml``): GroupNorm(32) with PyTorch's default eps, SiLU, timestep embedding with
# cosines first and frequencies 10000^(-k/half), residual blocks with FiLM-style scale-shift norm,
# multi-head attention with the "legacy" head-major q/k/v layout, residual blocks that resample
# (``resblock_updown``), and ``2·3`` output channels when the variance is learned (ε is the first 3).
# Module names follow the official ones (``time_embed.0``, ``input_blocks.1.0.in_layers.2``,
# ``middle_block.1.qkv``, ``output_blocks.17.2.emb_layers.1``, ``out.2``, ...).


def guided_timestep_embedding(timesteps: torch.Tensor, width: int, max_period: float = 10000.0) -> torch.Tensor:
    half = width // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                                  device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * frequencies[None, :]
    embedding = torch.cat((angles.cos(), angles.sin()), dim=1)
    return F.pad(embedding, (0, 1)) if width % 2 else embedding


def guided_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(OFFICIAL_NORM_GROUPS, channels)


class GuidedResBlock(nn.Module):
    """in_layers (norm, SiLU, conv) → + timestep (scale-shift or add) → out_layers (norm, SiLU, dropout,
    conv) plus a skip; ``resample`` ("up"/"down") resizes both paths between the norm and the first conv."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float,
                 scale_shift: bool, resample: str | None = None):
        super().__init__()
        self.in_layers = nn.Sequential(guided_norm(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, kernel_size=3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels))
        self.out_layers = nn.Sequential(guided_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, kernel_size=1))
        self.scale_shift = scale_shift
        self.resample = resample

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._resize(self.in_layers[:-1](x))
        h = self.in_layers[-1](h)
        x = self._resize(x)
        emb_out = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class GuidedAttention(nn.Module):
    """Multi-head self-attention; the 1×1 ``qkv`` projection is laid out head by head ([q, k, v] of head 0,
    then of head 1, ...), the legacy order the released checkpoints use."""

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention width {channels} is not a multiple of head width {head_channels}")
        self.heads = channels // head_channels
        self.norm = guided_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv1d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        flat = x.reshape(batch, channels, height * width)
        qkv = self.qkv(self.norm(flat)).reshape(batch, self.heads, 3 * channels // self.heads, -1)
        q, k, v = qkv.transpose(2, 3).chunk(3, dim=-1)  # each [B, heads, HW, head width]
        attended = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(batch, channels, -1)
        return (flat + self.proj_out(attended)).reshape(batch, channels, height, width)


class GuidedDownsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class EmbedSequential(nn.Sequential):
    """Layers applied in order; residual blocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, GuidedResBlock) else layer(x)
        return x


class GuidedUNet(nn.Module):
    """openai/guided-diffusion ``UNetModel`` (unconditional). ``attention_resolutions`` are image sides at
    which attention sits (``"32,16,8"`` in the configs); ``forward`` returns ``out_channels`` channels
    (6 with a learned variance: ε first)."""

    def __init__(self, *, image_size: int = 256, model_channels: int = 256,
                 channel_mult: Sequence[float] = (1, 1, 2, 2, 4, 4), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (32, 16, 8), head_channels: int = 64,
                 dropout: float = 0.0, scale_shift: bool = True, resblock_updown: bool = True,
                 in_channels: int = 3, out_channels: int = 6):
        super().__init__()
        self.model_channels = model_channels
        emb_channels = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_channels), nn.SiLU(),
                                        nn.Linear(emb_channels, emb_channels))

        def block(cin: int, cout: int, resample: str | None = None) -> GuidedResBlock:
            return GuidedResBlock(cin, emb_channels, cout, dropout, scale_shift, resample)

        width = first_width = int(channel_mult[0] * model_channels)
        side = image_size
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))])
        skip_widths = [width]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [block(width, int(mult * model_channels))]
                width = int(mult * model_channels)
                if side in attention_resolutions:
                    layers.append(GuidedAttention(width, head_channels))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_widths.append(width)
            if level != len(channel_mult) - 1:
                down = block(width, width, "down") if resblock_updown else GuidedDownsample(width)
                self.input_blocks.append(EmbedSequential(down))
                skip_widths.append(width)
                side //= 2

        self.middle_block = EmbedSequential(block(width, width), GuidedAttention(width, head_channels),
                                            block(width, width))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(num_res_blocks + 1):
                layers = [block(width + skip_widths.pop(), int(mult * model_channels))]
                width = int(mult * model_channels)
                if side in attention_resolutions:
                    layers.append(GuidedAttention(width, head_channels))
                if level and index == num_res_blocks:
                    layers.append(block(width, width, "up") if resblock_updown else Upsample(width))
                    side *= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(guided_norm(width), nn.SiLU(),
                                 nn.Conv2d(first_width, out_channels, kernel_size=3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(guided_timestep_embedding(timesteps, self.model_channels))
        skips = []
        h = x
        for stage in self.input_blocks:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for stage in self.output_blocks:
            h = stage(torch.cat((h, skips.pop()), dim=1), emb)
        return self.out(h)
