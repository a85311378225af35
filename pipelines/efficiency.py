"""The paper's §4.5 on this machine: size and inference cost of every registered method at one resolution.

    python -m pipelines.efficiency                                  # default preset: paper-size variants, 256²
    python -m pipelines.efficiency --methods sahn_paper lama_fourier ddnm --repeats 5
    python -m pipelines.efficiency --config my_gpu.yaml --device cuda --throughput-batch 16

For each method (created by name with random weights, since cost does not depend on them; or, with
``weights``, the published checkpoint loaded, so the sizes are the released model's) it measures, on one real
photograph with a seeded free-form hole in (0.2,0.3]:
  parameters (M)        every network the method holds (num_parameters), frozen pretrained ones excluded
  checkpoint (MB)       the file ``method.save`` writes, MB = 10⁶ bytes as in the paper
  latency (ms)          median of --repeats timed ``inpaint`` calls at --batch-size after --warmup calls
                        (CUDA events + synchronisation on a GPU, perf_counter on a CPU)
  peak memory (MB)      of the first (warm-up) call: CUDA max allocated on a GPU, the peak-RSS rise on a CPU
  GFLOPs                per image, counted by torch's FlopCounterMode during that call (a lower bound)
  throughput (img/s)    --throughput-batch images per call, from --throughput-repeats timed calls
See bench/run/profiling.py for exactly what each figure means.

Samplers with many steps (DDNM: 100 U-Net passes) are too slow to time in full on a CPU: ``step_scaling``
(YAML or command line) runs such a method with fewer steps and multiplies latency and FLOPs by
full/measured steps. The row says so; one-off costs are then multiplied too, so the figure is an upper bound.

Each method is measured in a fresh process (--isolate, the default): a process's peak RSS only grows, and
memory freed by the previous method would be reused unseen. Rows are written to <out>/efficiency.csv after
every method, with the device named in each row; <out>/efficiency.md holds the rendered comparison with
the paper's RTX 4090 figures. Absolute times compare only on the same device; ratios to SAHN compare across.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import torch

from bench.run import profiling
from bench.run.cell import resolve_device
from bench.weights import PublishedWeights, absolute_weights, check_published_weights
from bench.cli import parse_config, run_main
from bench.errors import UserError
from bench.run.evaluate import write_csv_atomic
from bench.data.masks import generate_mask_in_bin
from bench.methods import create_method, select_methods

PRESETS = Path(__file__).parent / "presets" / "efficiency"
CSV_NAME = "efficiency.csv"
INPUT_HOLE_BIN = "(0.2,0.3]"


@dataclass
class EfficiencyConfig:
    """Measure parameters, checkpoint size, latency, peak memory, FLOPs and throughput of inpainting methods."""

    out: str = "results/efficiency"  # folder for efficiency.csv and efficiency.md
    scale: Literal["tiny", "paper"] = "paper"  # which registered variants to measure when --methods is empty
    methods: list[str] = field(default_factory=list)  # method names (empty = every variant of --scale)
    image_size: int = 256  # input side (the paper's §4.5: 256²)
    batch_size: int = 1  # images per call for latency, memory and FLOPs
    warmup: int = 1  # untimed calls first (the first one measures peak memory and FLOPs)
    repeats: int = 3  # timed calls; latency is their median
    throughput_batch: int = 4  # images per call for throughput (0 = skip)
    throughput_warmup: int = 1  # untimed calls at that batch size
    throughput_repeats: int = 1  # timed calls at that batch size
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:1 ...
    threads: int | None = None  # torch CPU threads (None = torch's default: every core)
    isolate: bool = True  # measure each method in a fresh process (needed for a fair CPU memory figure)
    seed: int = 0  # seeds weights, the input hole and samplers
    # Per-method config overrides, e.g. {"sahn_paper": {"deformable_scales": []}} (YAML or command line).
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per-method step scaling, e.g. {"ddnm": {"option": "steps", "measure": 1}} (YAML or command line): run
    # with ``option`` = ``measure`` and scale latency and FLOPs to the method's configured value.
    step_scaling: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Published checkpoints to measure instead of freshly created networks, per method a path, e.g.
    # {"lama_fourier": "/ckpt/lama-fourier"} (a per-dataset mapping of the benchmark is accepted: its first
    # dataset's checkpoint, by label, is measured).
    weights: dict[str, str | dict[str, str]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ inputs
def photo_input(size: int, batch: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A real photograph (scikit-image's astronaut, public domain) and a seeded free-form hole."""
    from skimage import data

    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float().div(255)[None]
    image = torch.nn.functional.interpolate(photo, size=(size, size), mode="area").clamp(0, 1)
    hole, _ = generate_mask_in_bin(size, INPUT_HOLE_BIN, seed)
    mask = torch.from_numpy(hole.astype(np.float32))[None, None]
    return image.repeat(batch, 1, 1, 1).to(device), mask.repeat(batch, 1, 1, 1).to(device)


def validate(config: EfficiencyConfig) -> None:
    checks = [("image_size", config.image_size, 8), ("batch_size", config.batch_size, 1),
              ("repeats", config.repeats, 1), ("warmup", config.warmup, 0),
              ("throughput_batch", config.throughput_batch, 0), ("throughput_warmup", config.throughput_warmup, 0),
              ("throughput_repeats", config.throughput_repeats, 1)]
    for flag, value, lowest in checks:
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            raise UserError(f"--{flag.replace('_', '-')} {value!r}: needs an integer ≥ {lowest}")
    for name, rule in config.step_scaling.items():
        if set(rule) != {"option", "measure"} or not isinstance(rule["measure"], int) or rule["measure"] < 1:
            raise UserError(f"step_scaling.{name} = {rule!r}: needs {{option: <config field>, measure: <int ≥ 1>}}")


def resolve_methods(config: EfficiencyConfig) -> list[str]:
    methods = select_methods(config.methods, config.scale)  # unknown names and tags fail before any measurement
    if not methods:
        raise UserError(f"no methods registered for scale {config.scale!r}")
    return methods


def weights_by_method(config: EfficiencyConfig) -> dict[str, str]:
    """One checkpoint per method: a per-dataset mapping contributes its first dataset's (sorted by label)."""
    chosen = {}
    for method, entry in absolute_weights(config.weights).items():
        chosen[method] = entry if isinstance(entry, str) else entry[sorted(entry)[0]] if entry else None
    return {method: path for method, path in chosen.items() if path}


def check_weights(config: EfficiencyConfig, methods: list[str]) -> dict[str, PublishedWeights]:
    """Every checkpoint loads before the first measurement (one line naming a bad file otherwise)."""
    checked = check_published_weights(weights_by_method(config), methods, ["-"],
                                      create=lambda name: create_method(name, **config.method_options.get(name, {})),
                                      finetune=lambda name: False)
    return {method: weights for (method, _), weights in checked.items()}


# ------------------------------------------------------------------------------------------ one method
def _scaled_options(config: EfficiencyConfig, name: str) -> tuple[dict[str, Any], float, str]:
    """(config overrides to measure with, factor to scale latency and FLOPs by, a note for the row)."""
    options = dict(config.method_options.get(name, {}))
    rule = config.step_scaling.get(name)
    if not rule:
        return options, 1.0, ""
    option, measured = rule["option"], int(rule["measure"])
    full = getattr(create_method(name, **options).config, option, None)
    if not isinstance(full, int) or full < 1:
        raise UserError(f"step_scaling.{name}: {name}'s config has no positive integer field {option!r}")
    if measured >= full:
        return options, 1.0, ""
    options[option] = measured
    return options, full / measured, f"{option}={measured} measured, ×{full / measured:g} to {option}={full}"


def measure_method(config: EfficiencyConfig, name: str) -> dict[str, Any]:
    """Every figure of one method, as one row of efficiency.csv (``--threads`` applies during the call)."""
    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _measure(config, name)
    finally:
        torch.set_num_threads(previous)


def _measure(config: EfficiencyConfig, name: str) -> dict[str, Any]:
    device = resolve_device(config.device)
    options, factor, scaling_note = _scaled_options(config, name)
    torch.manual_seed(config.seed)
    method = create_method(name, **options)
    weights = weights_by_method(config).get(name)
    if weights:
        method.load(weights)
    method = method.to(device).eval()
    counts = method.num_parameters()
    images, masks = photo_input(config.image_size, config.batch_size, config.seed, device)

    def run() -> None:
        with torch.no_grad():
            method.inpaint(images, masks)

    if config.warmup >= 1:  # the first warm-up call is the one measured for memory and FLOPs
        memory = profiling.measure_peak_memory(lambda: profiling.count_flops(run), device=device)
        latency = profiling.measure_latency(run, device=device, warmup=config.warmup - 1, repeats=config.repeats)
    else:
        latency = profiling.measure_latency(run, device=device, warmup=0, repeats=config.repeats)
        memory = profiling.measure_peak_memory(lambda: profiling.count_flops(run), device=device)
    throughput = float("nan")
    if config.throughput_batch:
        big_images, big_masks = photo_input(config.image_size, config.throughput_batch, config.seed, device)

        def run_batch() -> None:
            with torch.no_grad():
                method.inpaint(big_images, big_masks)

        batch_latency = profiling.measure_latency(run_batch, device=device, warmup=config.throughput_warmup,
                                                  repeats=config.throughput_repeats)
        throughput = config.throughput_batch / (batch_latency.median_ms * factor / 1000.0)
    total = sum(counts.values())
    return {
        "method": name, "paper_name": method.paper_name or "", "device": str(device),
        "device_name": profiling.device_name(device), "image_size": config.image_size,
        "batch_size": config.batch_size, "params_M": total / 1e6, "params_by_network": json.dumps(counts),
        "checkpoint_MB": profiling.checkpoint_size_mb(method), "latency_ms": latency.median_ms * factor,
        "latency_measured_ms": latency.median_ms,
        "latency_runs_ms": json.dumps([round(v, 3) for v in latency.runs_ms]), "warmup": config.warmup,
        "repeats": config.repeats, "peak_memory_MB": memory.megabytes, "memory_kind": memory.kind,
        "gflops_per_image": memory.value * factor / config.batch_size / 1e9,
        "throughput_batch": config.throughput_batch, "throughput_img_s": throughput, "scaled": scaling_note,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": _load_average(),
        "weights": weights or "", "error": "",
    }


def _load_average() -> float:
    """The 1-minute load average when a method finished: on a shared machine other processes slow
    OpenMP-parallel inference unevenly, and the table says how busy the machine was."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on every platform
        return float("nan")


def _failed_row(name: str, config: EfficiencyConfig, error: BaseException) -> dict[str, Any]:
    device = resolve_device(config.device)
    return {"method": name, "device": str(device), "device_name": profiling.device_name(device),
            "image_size": config.image_size, "batch_size": config.batch_size,
            "error": f"{type(error).__name__}: {error}".splitlines()[0]}


# ------------------------------------------------------------------------------------------ the job
def _measure_isolated(config: EfficiencyConfig, name: str) -> dict[str, Any]:
    """``measure_method`` in a fresh spawned process (its own peak RSS, its own allocator state)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure_method, config, name).result()


def run_efficiency(config: EfficiencyConfig) -> Path:
    """Measure every method one after another (never in parallel: they would share the cores); returns
    the path of efficiency.csv, rewritten after each method."""
    validate(config)
    methods = resolve_methods(config)
    published = check_weights(config, methods)
    out = Path(config.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "efficiency_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    csv_path = out / CSV_NAME
    rows: list[dict[str, Any]] = []
    for name in methods:
        started = time.perf_counter()
        try:
            row = _measure_isolated(config, name) if config.isolate else measure_method(config, name)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken method must not lose the others' figures
            row = _failed_row(name, config, exc)
            print(f"warning: {name} could not be measured: {row['error']}", file=sys.stderr)
        if name in published:
            row["weights_sha256"] = published[name].sha256
        rows.append(row)
        write_csv_atomic(pd.DataFrame(rows), csv_path)
        if not row.get("error"):
            print(f"{name}: {row['params_M']:.1f}M params, {row['checkpoint_MB']:.0f} MB, "
                  f"{row['latency_ms']:.0f} ms, {row['peak_memory_MB']:.0f} MB peak, "
                  f"{row['gflops_per_image']:.1f} GFLOPs ({time.perf_counter() - started:.0f}s)", flush=True)
    from reports.efficiency_table import section

    report = out / "efficiency.md"
    report.write_text("\n".join(section(out, csv_path)) + "\n")
    print(f"efficiency: {csv_path}\nreport: {report}")
    return csv_path


def main(argv: Sequence[str] | None = None) -> Path:
    return run_efficiency(parse_config(EfficiencyConfig, argv, presets=PRESETS, default_preset="default",
                                       description=__doc__))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
