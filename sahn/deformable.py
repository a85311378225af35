"""SAHN's deformable 3×3 convolution, with a kernel per mode: the autograd-friendly one for training, the
fastest one for inference.

Training keeps :class:`bench.nn.layers.DeformableConv2d`'s forward (torchvision's kernel on CUDA, the gather
version elsewhere, whose backward is faster than torchvision's on CPU). Without autograd — ``inpaint``
runs under ``torch.no_grad`` — the CPU runs :func:`bag_deform_conv2d` instead, by default. sahn/README.md
explains the choice; docs/measurements.md has the figures behind it.

Importing this module also gives torchvision's ``deform_conv2d`` operator a FLOP formula (that of the
regular convolution with the same weight, which is what the gather and bag versions' matrix products count),
so ``FlopCounterMode`` measures SAHN alike whichever kernel runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import flop_registry, register_flop_formula

from bench.nn.layers import DeformableConv2d, gather_deform_conv2d

#: inference kernels: ``auto`` = ``torchvision`` on CUDA, ``bag`` elsewhere
INFERENCE_KERNELS = ("auto", "bag", "torchvision", "gather")
#: bytes of samples per block and thread in :func:`bag_deform_conv2d`: big enough for efficient convolutions,
#: small enough to stay in cache and below glibc's mmap threshold (so blocks reuse memory, no page faults).
#: Per thread, because every block is a few parallel regions whose threads wait for each other.
BLOCK_BYTES_PER_THREAD = 4 << 20


def bag_deform_conv2d(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      *, padding: int, dilation: int = 1, block_bytes: int | None = None) -> torch.Tensor:
    """Stride-1 deformable convolution, forward only, with torchvision's offset layout and sampling rule
    (``offset[:, 2k]`` = Δy, ``offset[:, 2k+1]`` = Δx of tap k, row-major; bilinear, zero outside).

    The input is laid out as a table of pixels (channels last), so bilinearly sampling one tap is a
    weighted sum of four table rows, and one ``F.embedding_bag`` call samples every tap of a block of
    output rows. The samples are ordered to form an image k_h times taller and k_w times wider than the
    block, in which output pixel (y, x) finds its tap (i, j) at (k_h·y + i, k_w·x + j): the regular
    convolution with the same weight and stride (k_h, k_w) then finishes the block, with the fast kernels
    of the plain layers (faster than a matrix product over the same samples; docs/measurements.md).

    A block holds ``block_bytes`` of samples (default :data:`BLOCK_BYTES_PER_THREAD` per torch thread, at
    least one output row). Beyond its input and output a call needs one block and the corner indices and
    weights (48 bytes per output pixel and tap, a few times that while they are computed), instead of the
    gather version's B·C·9·H·W intermediates; the arithmetic is the regular convolution's.
    """
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    out_h = height + 2 * padding - dilation * (kernel_h - 1)
    out_w = width + 2 * padding - dilation * (kernel_w - 1)
    # Per-image 2-D transposes into preallocated memory: several times faster than a 4-D permute's copy
    table = x.new_empty(batch * height * width, channels)
    for image in range(batch):
        table[image * height * width:(image + 1) * height * width].copy_(x[image].reshape(channels, -1).t())
    index, corner_weights = bilinear_corners(offset, (kernel_h, kernel_w), (height, width), padding, dilation)
    tiled_weight = weight.contiguous(memory_format=torch.channels_last)
    samples_per_row = kernel_h * kernel_w * out_w  # bags per output row
    if block_bytes is None:
        block_bytes = BLOCK_BYTES_PER_THREAD * torch.get_num_threads()
    rows_per_block = max(1, block_bytes // (samples_per_row * channels * x.element_size()))
    result = x.new_empty(batch, out_channels, out_h * out_w)
    for image in range(batch):
        for top in range(0, out_h, rows_per_block):
            bottom = min(top + rows_per_block, out_h)
            first, last = (image * out_h + top) * samples_per_row, (image * out_h + bottom) * samples_per_row
            sampled = F.embedding_bag(index[first:last], table, per_sample_weights=corner_weights[first:last],
                                      mode="sum")
            tiled = sampled.view(1, (bottom - top) * kernel_h, out_w * kernel_w, channels).permute(0, 3, 1, 2)
            out = F.conv2d(tiled, tiled_weight, bias, stride=(kernel_h, kernel_w))  # [1, C_out, rows, out_w]
            out = out[0].permute(1, 2, 0).reshape((bottom - top) * out_w, out_channels)  # a view when channels-last
            result[image, :, top * out_w:bottom * out_w].copy_(out.t())
    return result.view(batch, out_channels, out_h, out_w)


def bilinear_corners(offset: torch.Tensor, kernel_size: tuple[int, int], input_size: tuple[int, int],
                     padding: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the pixel table and weights of the four bilinear neighbours of every sample: two
    ``[samples, 4]`` tensors, samples ordered (image, output row, tap row, output column, tap column) — the
    tiled layout of :func:`bag_deform_conv2d`. A neighbour outside the image gets weight 0 (any valid row)."""
    batch, _, out_h, out_w = offset.shape
    kernel_h, kernel_w = kernel_size
    height, width = input_size
    device, dtype = offset.device, offset.dtype
    # [B, out_h, k_h, out_w, k_w] from channels (k_h, k_w, Δy/Δx)
    offset = offset.view(batch, kernel_h, kernel_w, 2, out_h, out_w).permute(3, 0, 4, 1, 5, 2).contiguous()
    rows = torch.arange(out_h, device=device, dtype=dtype).view(1, out_h, 1, 1, 1)
    cols = torch.arange(out_w, device=device, dtype=dtype).view(1, 1, 1, out_w, 1)
    tap_rows = (torch.arange(kernel_h, device=device, dtype=dtype) * dilation - padding).view(1, 1, kernel_h, 1, 1)
    tap_cols = (torch.arange(kernel_w, device=device, dtype=dtype) * dilation - padding).view(1, 1, 1, 1, kernel_w)
    sample_y = rows + tap_rows + offset[0]
    sample_x = cols + tap_cols + offset[1]
    top, left = sample_y.floor(), sample_x.floor()
    frac_y, frac_x = (sample_y - top).unsqueeze(-1), (sample_x - left).unsqueeze(-1)
    corner = torch.tensor([0, 1], device=device)
    corner_rows = top.long().unsqueeze(-1) + corner.repeat_interleave(2)  # corners (0,0), (0,1), (1,0), (1,1)
    corner_cols = left.long().unsqueeze(-1) + corner.repeat(2)
    weight_y = torch.cat([1 - frac_y, 1 - frac_y, frac_y, frac_y], dim=-1)
    weight_x = torch.cat([1 - frac_x, frac_x, 1 - frac_x, frac_x], dim=-1)
    inside = (corner_rows >= 0) & (corner_rows < height) & (corner_cols >= 0) & (corner_cols < width)
    weights = (weight_y * weight_x).masked_fill_(~inside, 0)
    image = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1, 1)
    index = (image * height + corner_rows.clamp_(0, height - 1)) * width + corner_cols.clamp_(0, width - 1)
    return index.view(-1, 4), weights.view(-1, 4)


class SAHNDeformableConv2d(DeformableConv2d):
    """:class:`bench.nn.layers.DeformableConv2d` (same parameters, same state_dict keys) whose forward runs
    ``inference_kernel`` when autograd records nothing; while it records, the bench layer's forward."""

    def __init__(self, in_channels: int, out_channels: int, *, dilation: int = 1, inference_kernel: str = "auto"):
        super().__init__(in_channels, out_channels, dilation=dilation)
        if inference_kernel not in INFERENCE_KERNELS:
            raise ValueError(f"inference_kernel={inference_kernel!r}: choose one of {', '.join(INFERENCE_KERNELS)}")
        self.inference_kernel = inference_kernel

    def records_gradients(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.records_gradients(x):
            return super().forward(x)
        kernel = self.inference_kernel
        if kernel == "auto":
            kernel = "torchvision" if x.is_cuda else "bag"
        offset = self.offset(x)
        if kernel == "torchvision":
            return self.conv(x, offset)
        padding, dilation = self.conv.padding[0], self.conv.dilation[0]
        if kernel == "gather":
            return gather_deform_conv2d(x, offset, self.conv.weight, self.conv.bias, padding=padding, dilation=dilation)
        return bag_deform_conv2d(x, offset, self.conv.weight, self.conv.bias, padding=padding, dilation=dilation)


def deformable_conv3x3_factory(inference_kernel: str = "auto"):
    """A :class:`bench.nn.layers.ConvFactory` building :class:`SAHNDeformableConv2d` with ``inference_kernel``."""

    def build(in_channels: int, out_channels: int, *, dilation: int = 1) -> SAHNDeformableConv2d:
        return SAHNDeformableConv2d(in_channels, out_channels, dilation=dilation, inference_kernel=inference_kernel)

    return build


# --------------------------------------------------------------------- FLOPs of torchvision's kernel
def _deform_conv2d_flops(input_shape, weight_shape, offset_shape, *args, **kwargs) -> int:
    """2 · B · C_out · (C_in / groups) · k_h · k_w · H_out · W_out, as the regular convolution."""
    out_channels, in_per_group, kernel_h, kernel_w = weight_shape
    batch, _, out_h, out_w = offset_shape
    return 2 * batch * out_channels * in_per_group * kernel_h * kernel_w * out_h * out_w


def _register_deform_conv2d_flops() -> None:
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)

    operator = torch.ops.torchvision.deform_conv2d
    if operator not in flop_registry:  # another library may have registered one already
        register_flop_formula(operator)(_deform_conv2d_flops)


_register_deform_conv2d_flops()


# --------------------------------------------------------------------- kernel timings
#: (input channels, output channels, side, how many) of sahn_paper's deformable convs for a 256² image
PAPER_LAYERS = ((256, 256, 64, 16), (256, 128, 128, 1), (128, 128, 128, 3), (128, 64, 256, 1), (64, 64, 256, 1))


def main(argv: list[str] | None = None) -> None:
    """Print each kernel's time on sahn_paper's deformable-conv shapes beside a plain 3×3 conv's."""
    import argparse
    import statistics
    import time

    from torchvision.ops import deform_conv2d

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per kernel and shape; medians are printed")
    # process CPU time: on a shared machine it is what the call cost, however long it waited for a core
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def median_ms(run) -> float:
        run()
        times = []
        for _ in range(args.repeats):
            started = time.process_time()
            run()
            times.append((time.process_time() - started) * 1e3)
        return statistics.median(times)

    print(f"deformable 3x3 conv forward on CPU, batch 1, {torch.get_num_threads()} torch threads: median process "
          f"CPU ms of {args.repeats} runs (summed over threads); offsets N(0, 2²) pixels")
    print(f"{'C_in→C_out at side':<22}{'count':>6}{'plain conv':>12}{'gather':>10}{'torchvision':>13}{'bag':>9}")
    totals = [0.0] * 4
    generator = torch.Generator().manual_seed(0)
    for in_channels, out_channels, side, count in PAPER_LAYERS:
        x = torch.randn(1, in_channels, side, side, generator=generator)
        weight = torch.randn(out_channels, in_channels, 3, 3, generator=generator) * 0.02
        bias = torch.zeros(out_channels)
        offset = torch.randn(1, 18, side, side, generator=generator) * 2
        with torch.no_grad():
            times = [median_ms(lambda: F.conv2d(x, weight, bias, padding=1)),
                     median_ms(lambda: gather_deform_conv2d(x, offset, weight, bias, padding=1)),
                     median_ms(lambda: deform_conv2d(x, offset, weight, bias, padding=1)),
                     median_ms(lambda: bag_deform_conv2d(x, offset, weight, bias, padding=1))]
        totals = [total + count * t for total, t in zip(totals, times)]
        print(f"{f'{in_channels}→{out_channels} at {side}²':<22}{count:>6}" + "".join(
            f"{t:>{w}.1f}" for t, w in zip(times, (12, 10, 13, 9))))
    print(f"{'sahn_paper, all':<22}{sum(layer[3] for layer in PAPER_LAYERS):>6}" + "".join(
        f"{t:>{w}.0f}" for t, w in zip(totals, (12, 10, 13, 9))))


if __name__ == "__main__":
    main()
