"""GPU smoke test: the first thing to run on a new GPU machine.

    python -m pipelines.benchmarks.gpu_smoke [--device cuda] [--size 64] [--methods NAME ...] [--no-benchmark]
                                             [--layout-size 256] [--no-layout-timing]

Without CUDA it says so and exits 0. With CUDA, for every registered method (or ``--methods``):

1. ``inpaint`` of two 64² photographs with seeded free-form holes on the GPU and on the CPU, from the same
   initial weights; every output on the device and finite, and the GPU's output within ``--tolerance``
   (max absolute difference, images in [0, 1]) of the CPU's with TF32 off. The difference with torch's
   default (TF32 convolutions on Ampere and later) is printed beside it, for information.
2. One ``train_step`` on the GPU: losses finite; every parameter, buffer, frozen network and optimiser
   state on the device and finite afterwards.
3. ``inpaint`` and the same ``train_step`` twice each from the same seed under ``--deterministic``: whether
   the repeats are bit-identical (outputs; losses and weights), and which operations torch warned have
   no deterministic implementation (the README's account of what is bit-identical on GPUs is checked here).
4. ``inpaint`` at bf16 (fp16 where the GPU has no bf16) at ``--layout-size``² with contiguous and with channels_last
   networks and inputs (what ``--memory-format auto`` picks there): milliseconds per batch of each, for information;
   a layout whose output is not finite fails.

Then it runs the default preset's cells through Ray with ``--device cuda --gpus-per-cell 0.5`` (two cells
share each GPU) into a temporary folder, and checks each cell's record names a GPU and its memory share.
It prints one table per part and exits 1 if anything failed.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bench.devices import deterministic_algorithms, full_fp32
from bench.errors import NotTrainable
from bench.evaluate import inference_autocast
from bench.masks import FreeFormConfig, TrainMaskSampler
from bench.methods import InpaintingMethod, available_methods, create_method, in_memory_format

BATCH = 2
SEED = 0
DEFAULT_TOLERANCE = 1e-3  # a quarter of one uint8 step: float32 round-off, not a different function
NONDETERMINISTIC = "does not have a deterministic implementation"
BENCHMARK_TIMEOUT_SECONDS = 3600
LAYOUTS = ("contiguous", "channels_last")
LAYOUT_REPEATS = 5  # timed calls per layout, after one untimed call (cuDNN chooses its kernels there)


@dataclass
class MethodReport:
    method: str
    inpaint_fp32: float | None = None  # max |GPU − CPU| with TF32 off
    inpaint_tf32: float | None = None  # the same with torch's default precision
    trained: str = ""  # "ok", "n/a" (not trainable), or the failure
    inpaint_repeat: str = ""  # "yes" / "no": two inpaint calls under --deterministic bit-identical
    bit_identical: str = ""  # the same for two train steps: "yes", "no", "n/a"
    nondeterministic_ops: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def photo_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two photographs (scikit-image's astronaut and coffee, public domain) and seeded free-form holes."""
    from skimage import data

    photos = [torch.from_numpy(np.ascontiguousarray(picture)).permute(2, 0, 1).float().div(255)[None]
              for picture in (data.astronaut(), data.coffee())]
    images = torch.cat([F.interpolate(p, size=(size, size), mode="area") for p in photos]).clamp(0, 1)
    masks = TrainMaskSampler(size, SEED, FreeFormConfig()).sample(BATCH)
    return images, masks


def seeded_method(name: str, device: torch.device, size: int) -> InpaintingMethod:
    """``name`` with the same initial weights on every device; built for ``size`` if it is built for a size."""
    torch.manual_seed(SEED)
    method = create_method(name)
    if method.config_dict().get("image_size", size) != size:  # DDNM's networks are built for one size
        torch.manual_seed(SEED)
        method = create_method(name, image_size=size)
    return method.to(device)


def named_tensors(method: InpaintingMethod) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor a method holds: parameters, buffers, frozen networks, optimiser states."""
    yield from method.named_parameters()
    yield from method.named_buffers()
    frozen = getattr(method, "frozen_networks", lambda: {})()
    for role, network in frozen.items():
        for name, tensor in [*network.named_parameters(), *network.named_buffers()]:
            yield f"frozen {role}.{name}", tensor
    for optimizer_name, optimizer in method.optimizers.items():
        for index, state in enumerate(optimizer.state.values()):
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:  # Adam's step counter stays on the CPU
                    yield f"optimizer {optimizer_name}[{index}].{key}", value


def misplaced_or_nonfinite(method: InpaintingMethod, device: torch.device) -> list[str]:
    problems = []
    for name, tensor in named_tensors(method):
        if tensor.device != device:
            problems.append(f"{name} on {tensor.device}")
        elif tensor.is_floating_point() and not torch.isfinite(tensor).all():
            problems.append(f"{name} not finite")
    return problems


def check_output(what: str, output: torch.Tensor, device: torch.device, shape: torch.Size) -> list[str]:
    if output.device != device:
        return [f"{what} on {output.device}"]
    if output.shape != shape:
        return [f"{what} has shape {tuple(output.shape)}"]
    return [] if torch.isfinite(output).all() else [f"{what} not finite"]


@torch.no_grad()
def inpaint_on(method: InpaintingMethod, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    method.eval()
    device = method.device
    return method.inpaint(images.to(device), masks.to(device))


def compare_inpaint(name: str, device: torch.device, images: torch.Tensor, masks: torch.Tensor,
                    report: MethodReport) -> None:
    cpu = torch.device("cpu")
    reference = inpaint_on(seeded_method(name, cpu, images.shape[-1]), images, masks)
    gpu_method = seeded_method(name, device, images.shape[-1])
    with full_fp32(device):
        exact = inpaint_on(gpu_method, images, masks)
    default = inpaint_on(gpu_method, images, masks)
    report.problems += check_output("inpaint output", exact, device, images.shape)
    report.problems += misplaced_or_nonfinite(gpu_method, device)
    if not report.problems:
        report.inpaint_fp32 = float((exact.cpu() - reference).abs().max())
        report.inpaint_tf32 = float((default.cpu() - reference).abs().max())


def one_train_step(name: str, device: torch.device, images: torch.Tensor, masks: torch.Tensor,
                   report: MethodReport) -> None:
    method = seeded_method(name, device, images.shape[-1])
    if not method.trainable:
        report.trained = report.bit_identical = "n/a"
        return
    try:
        losses = method.train_step({"image": images.to(device), "mask": masks.to(device)})
    except NotTrainable:
        report.trained = report.bit_identical = "n/a"
        return
    problems = [f"loss {key} = {value}" for key, value in losses.items() if not math.isfinite(value)]
    problems += misplaced_or_nonfinite(method, device)
    report.problems += problems
    report.trained = "ok" if not problems else "FAILED"


def deterministic_repeats(name: str, device: torch.device, images: torch.Tensor, masks: torch.Tensor,
                          report: MethodReport) -> None:
    """Two seeded inpaint calls and two seeded train steps under --deterministic: bit-identical or not, and
    which ops warned."""
    runs = []
    with warnings.catch_warnings(record=True) as caught, deterministic_algorithms(True):
        warnings.simplefilter("always")
        first, second = (inpaint_on(seeded_method(name, device, images.shape[-1]), images, masks) for _ in range(2))
        report.inpaint_repeat = "yes" if torch.equal(first, second) else "no"
        for _ in range(2 if report.trained == "ok" else 0):
            method = seeded_method(name, device, images.shape[-1])  # torch.manual_seed seeds the GPUs too
            losses = method.train_step({"image": images.to(device), "mask": masks.to(device)})
            runs.append((losses, [p.detach().cpu().clone() for p in method.parameters()]))
    if runs:
        (losses_a, weights_a), (losses_b, weights_b) = runs
        same = losses_a == losses_b and all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
        report.bit_identical = "yes" if same else "no"
    warned = {str(warning.message).split()[0] for warning in caught if NONDETERMINISTIC in str(warning.message)}
    report.nondeterministic_ops = sorted(warned)


def check_method(name: str, device: torch.device, images: torch.Tensor, masks: torch.Tensor) -> MethodReport:
    report = MethodReport(name)
    for part in (compare_inpaint, one_train_step, deterministic_repeats):
        try:
            part(name, device, images, masks, report)
        except Exception as exc:  # noqa: BLE001 - one method's failure is a row of the table, not the end
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            report.problems.append(f"{part.__name__}: {type(exc).__name__}: {first_line}")
            traceback.print_exc(file=sys.stderr)
            break
        finally:
            torch.cuda.empty_cache()
    return report


def method_table(reports: list[MethodReport], tolerance: float) -> tuple[str, bool]:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.2e}"

    lines = [f"| method | inpaint max abs GPU−CPU, TF32 off (tolerance {tolerance:g}) | with TF32 (info) | "
             "train_step | deterministic repeat bit-identical: inpaint | : train_step | "
             "ops torch warned have no deterministic CUDA implementation | problems |",
             "|---|---|---|---|---|---|---|---|"]
    passed = True
    for r in reports:
        within = r.inpaint_fp32 is not None and r.inpaint_fp32 <= tolerance
        ok = within and not r.problems
        passed &= ok
        verdict = number(r.inpaint_fp32) + ("" if within else " FAIL")
        lines.append(f"| {r.method} | {verdict} | {number(r.inpaint_tf32)} | {r.trained or '-'} | "
                     f"{r.inpaint_repeat or '-'} | {r.bit_identical or '-'} | "
                     f"{', '.join(r.nondeterministic_ops) or '-'} | "
                     f"{'; '.join(r.problems) or '-'} |")
    return "\n".join(lines), passed


# ------------------------------------------------------------------------------------ memory layout timing
@torch.no_grad()
def layout_milliseconds(name: str, device: torch.device, size: int, precision: str) -> dict[str, float]:
    """Median milliseconds of one ``inpaint`` of the photo batch per memory layout, under autocast at ``precision``."""
    images, masks = photo_batch(size)
    method = seeded_method(name, device, size).eval()
    timings = {}
    for layout in LAYOUTS:
        method.set_memory_format(layout)
        inputs = [in_memory_format(tensor.to(device), layout) for tensor in (images, masks)]
        seconds = []
        with inference_autocast(device, precision):
            for _ in range(LAYOUT_REPEATS + 1):
                torch.cuda.synchronize(device)
                started = time.perf_counter()
                output = method.inpaint(*inputs)
                torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - started)
        if not torch.isfinite(output).all():
            raise RuntimeError(f"{layout}: inpaint output not finite")
        timings[layout] = 1000 * statistics.median(seconds[1:])
    return timings


def layout_table(names: list[str], device: torch.device, size: int) -> tuple[str, bool]:
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    lines = [f"| method | inpaint ms, {precision}, contiguous | channels_last | contiguous / channels_last |",
             "|---|---|---|---|"]
    passed = True
    for name in names:
        try:
            timing = layout_milliseconds(name, device, size, precision)
            lines.append(f"| {name} | {timing['contiguous']:.2f} | {timing['channels_last']:.2f} | "
                         f"{timing['contiguous'] / timing['channels_last']:.2f} |")
        except Exception as exc:  # noqa: BLE001 - one method's failure is a row of the table, not the end
            passed = False
            lines.append(f"| {name} | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} | | |")
            traceback.print_exc(file=sys.stderr)
        finally:
            torch.cuda.empty_cache()
    return "\n".join(lines), passed


# ------------------------------------------------------------------------------------ the benchmark
def run_default_preset(out: Path, deterministic: bool) -> tuple[str, bool]:
    """The default preset's cells through Ray, two per GPU; a table of what each cell recorded."""
    command = [sys.executable, "-m", "pipelines.full_benchmark", "--device", "cuda", "--gpus-per-cell", "0.5",
               "--out", str(out)]
    if deterministic:
        command += ["--deterministic"]
    print("running:", " ".join(command), flush=True)
    started = time.perf_counter()
    log = out.parent / "benchmark.log"
    with open(log, "w") as sink:
        finished = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=BENCHMARK_TIMEOUT_SECONDS)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        return f"the benchmark failed (exit {finished.returncode}); its last lines:\n{log.read_text()[-4000:]}", False
    lines = ["| cell | device | GPU ids | GPU | memory share | deterministic | train s | eval s | pairs | check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    passed = True
    records = sorted(out.glob("*/*/cell.json")) + sorted(out.glob("*/*/seed*/cell.json"))
    for path in records:
        record: dict[str, Any] = json.loads(path.read_text())
        ok = str(record.get("device", "")).startswith("cuda") and record.get("gpu_memory_fraction") == 0.5
        passed &= ok
        lines.append(f"| {record['dataset']}/{record['method']} | {record.get('device')} | "
                     f"{','.join(record.get('gpu_ids') or []) or '-'} | {record.get('gpu_name') or '-'} | "
                     f"{record.get('gpu_memory_fraction')} | {record.get('deterministic')} | "
                     f"{record['train_seconds']} | {record['eval_seconds']} | {record['pairs']} | "
                     f"{'ok' if ok else 'NOT ON A GPU SHARE'} |")
    if not records:
        passed = False
        lines.append("| (no cell.json written) | | | | | | | | | FAIL |")
    lines.append(f"\nwall time {wall:.0f} s; report in {out / 'report.md'}")
    return "\n".join(lines), passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the GPU to test (default cuda, i.e. cuda:0)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--methods", nargs="*", default=None, help="method names (default: every registered one)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest max |GPU−CPU| of inpaint outputs, TF32 off (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--no-benchmark", action="store_true", help="skip the default preset's cells")
    parser.add_argument("--deterministic", action="store_true",
                        help="run the default preset's cells with --deterministic")
    parser.add_argument("--out", default=None, help="folder for the benchmark run (default: a temporary one)")
    parser.add_argument("--layout-size", type=int, default=256,
                        help="image side of the memory-layout timing (default 256, the paper's)")
    parser.add_argument("--no-layout-timing", action="store_true", help="skip timing contiguous vs channels_last")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}): nothing to test here")
        return 0
    device = torch.device(args.device)
    device = torch.device("cuda", device.index or 0)
    print(f"{device}: {torch.cuda.get_device_name(device)}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}", flush=True)
    images, masks = photo_batch(args.size)
    reports = []
    for name in args.methods or available_methods():
        print(f"checking {name} ...", flush=True)
        reports.append(check_method(name, device, images, masks))
    table, passed = method_table(reports, args.tolerance)
    print(f"\nEvery method at {args.size}², batch {BATCH}, on {device}:\n{table}\n", flush=True)

    if not args.no_layout_timing:
        table, layouts_passed = layout_table(args.methods or available_methods(), device, args.layout_size)
        print(f"Memory layouts at {args.layout_size}², batch {BATCH}, median of {LAYOUT_REPEATS} calls:\n{table}\n",
              flush=True)
        passed &= layouts_passed

    if not args.no_benchmark:
        with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as scratch:
            out = Path(args.out).expanduser().resolve() if args.out else Path(scratch) / "results"
            out.parent.mkdir(parents=True, exist_ok=True)
            table, cells_passed = run_default_preset(out, args.deterministic)
            print(f"The default preset's cells, --device cuda --gpus-per-cell 0.5:\n{table}\n")
            passed &= cells_passed
    print("GPU smoke test passed" if passed else "GPU smoke test FAILED (see the tables above)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
