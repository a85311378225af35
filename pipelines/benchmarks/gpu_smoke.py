"""GPU smoke test: the acceptance test of a GPU machine, bounded by a time budget.

    python -m pipelines.benchmarks.gpu_smoke [--budget-s 420] [--all | --methods NAME ...] [--device cuda]

Without CUDA it says so and exits 0. With CUDA it runs, part by part, what a user's run goes through, and ends
with one summary table. Every part is capped (subprocesses by their timeout, in-process parts by an alarm) and
the whole run fits ``--budget-s``: a part that would not fit what is left is skipped and listed, and a watchdog
prints the table and stops the process if a CUDA call ever hangs past the budget. Downloads are off (offline
mode): a metric network whose weights no pip package ships (FID's Inception) is reported as unavailable.

Methods: the paper's columns (one paper-size variant each) and every tiny variant; ``--all`` every registered
method. For each trainable method:
  train fp32 / bf16 / fp16   ``bench.run.train.train``, 2 steps, channels_last, one data worker (fp32 with TF32 off)
  resume                     a checkpoint at step 1, resumed to step 2, against 2 uninterrupted steps, bit for
                             bit under --deterministic (a method whose backward has ops torch warns have no
                             deterministic CUDA implementation is reported, not failed)
and for each method:
  inpaint GPU vs CPU         same weights, TF32 off: max |GPU - CPU| within --tolerance (diffusion samplers:
                             fewer steps, and the tolerance times the first step's noise-to-image gain)
  deterministic repeats      inpaint twice (must be bit-identical) and train_step twice (reported)
  scoring CPU vs GPU         the same uint8 composites scored on both: pixel metrics, Lite0, FID features
Then: the synchronised batch norm of multi-GPU training through LaMa's R1 double backward on a 1-rank NCCL
group; two Ray cells (bf16, fp16) through ``pipelines.full_benchmark`` with small evaluation shards; with 2 or
more GPUs a 2-worker training of every GAN method; and ``pipelines.efficiency`` latencies of the paper's three
timed columns at 256², batch 1, fp32 (TF32 off) and bf16, as ratios to the paper's RTX 4090 figures.

Exit code: 0 every part ran and passed; 1 a part failed; 2 the budget ran out before every part ran (or the
arguments are wrong).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bench.devices import (CUBLAS_WORKSPACE, DETERMINISTIC_CUBLAS_WORKSPACE, cuda_tf32, deterministic_algorithms,
                           tf32_state)
from bench.errors import NotTrainable
from bench.data.masks import FreeFormConfig, TrainMaskSampler
from bench.methods import InpaintingMethod, available_methods, create_method, get_factory, tagged_methods

DEFAULT_BUDGET_S = 420
BATCH = 2
SIZE = 64
SEED = 0
DEFAULT_TOLERANCE = 1e-3  # a quarter of one uint8 step: float32 round-off, not a different function
#: sampling steps of a diffusion sampler in the GPU-vs-CPU comparison (its CPU reference runs every one)
SAMPLER_STEPS_COMPARED = 5
METRIC_RTOL = 1e-4  # per-image metrics of the same composites, GPU vs CPU: float32 round-off
FEATURE_RTOL = 1e-3  # features, relative to their largest magnitude
NONDETERMINISTIC = "does not have a deterministic implementation"
TIMED_COLUMNS = {"sahn_paper": "SAHN", "lama_fourier": "LaMa-Fourier", "ddnm": "DDNM"}  # the paper's §4.5 rows
GAN_TINY = ("ec_tiny", "ctsdg_tiny", "spl_tiny", "spn_tiny", "sahn_tiny", "lama_tiny")
RAY_CELLS = (("bf16", "sahn_tiny"), ("fp16", "lama_tiny"))  # precision, method
PAPER_EFFICIENCY = Path(__file__).resolve().parents[2] / "reports" / "paper_data" / "efficiency_4_5.csv"
OFFLINE_ENVIRONMENT = {"SAHN_BENCH_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "HF_DATASETS_OFFLINE": "1"}

PASSED, FAILED, INFO, UNAVAILABLE, SKIPPED, STOPPED = "passed", "FAILED", "info", "unavailable", "skipped", "stopped"


# ------------------------------------------------------------------------------------ parts and the budget
class PartUnavailable(Exception):
    """What a part needs is not on this machine (a second GPU, bf16, Inception weights): not a failure."""


class PartTimeout(BaseException):
    """Raised inside a part by its alarm (a BaseException, so a part's own ``except Exception`` lets it pass)."""


@dataclass
class Part:
    name: str
    run: Callable[[float], tuple[str, str]]  # (seconds it may take) -> (status, detail)
    estimate_s: float  # what it should take on a current GPU: a part that would not fit what is left is skipped
    cap_s: float  # the most it may take; more is a failure


@dataclass
class Outcome:
    part: str
    status: str
    seconds: float
    detail: str = ""


class Budget:
    """Seconds left of ``--budget-s``, less a reserve for the summary at the end."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self.started = clock()
        self.reserve = min(10.0, 0.05 * seconds)

    def left(self) -> float:
        return self.seconds - self.reserve - (self.clock() - self.started)

    def fits(self, part: Part) -> bool:
        return part.estimate_s <= self.left()


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`PartTimeout` in this (main) thread after ``seconds``. Python code and CUDA calls that return
    (kernel launches are asynchronous) are interrupted; a call stuck in C is left to the watchdog."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise PartTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_parts(parts: list[Part], budget: Budget, outcomes: list[Outcome]) -> list[Outcome]:
    """Run ``parts`` in order within ``budget``, appending one outcome each to ``outcomes`` (shared with the
    watchdog, which prints them if the budget ends inside a part)."""
    for part in parts:
        left = budget.left()
        if not budget.fits(part):
            outcomes.append(Outcome(part.name, SKIPPED, 0.0, f"needs about {part.estimate_s:.0f} s, {max(left, 0):.0f} s "
                                                             "of the budget left"))
            continue
        limit = min(part.cap_s, left)
        print(f"[{budget.clock() - budget.started:5.0f} s] {part.name} ...", flush=True)
        started = budget.clock()
        try:
            with alarm(limit):
                status, detail = part.run(limit)
        except PartTimeout:
            cut_by_budget = limit < part.cap_s
            status = STOPPED if cut_by_budget else FAILED
            detail = (f"stopped at the end of the budget after {limit:.0f} s" if cut_by_budget
                      else f"over its {part.cap_s:.0f} s cap")
        except PartUnavailable as exc:
            status, detail = UNAVAILABLE, str(exc)
        except Exception as exc:  # noqa: BLE001 - one part's failure is a row of the table, not the end
            status, detail = FAILED, first_line(exc)
            traceback.print_exc(file=sys.stderr)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        outcomes.append(Outcome(part.name, status, budget.clock() - started, detail))
    return outcomes


def exit_code(outcomes: list[Outcome]) -> int:
    if any(o.status == FAILED for o in outcomes):
        return 1
    if any(o.status in (SKIPPED, STOPPED) for o in outcomes):
        return 2
    return 0


def summary_table(outcomes: list[Outcome], budget_s: float, wall_s: float) -> str:
    lines = ["| part | verdict | s | detail |", "|---|---|---|---|"]
    def cell(text: str) -> str:  # a table cell: no column separators, one line
        return text.replace("|", "/").replace("\n", " ")

    for o in outcomes:
        lines.append(f"| {cell(o.part)} | {o.status} | {o.seconds:.1f} | {cell(o.detail) or '-'} |")
    counts = {status: sum(o.status == status for o in outcomes)
              for status in (PASSED, INFO, UNAVAILABLE, FAILED, STOPPED, SKIPPED)}
    tally = ", ".join(f"{count} {status}" for status, count in counts.items() if count)
    verdict = {0: "GPU smoke test passed", 1: "GPU smoke test FAILED",
               2: "GPU smoke test incomplete: the budget ran out before every part ran"}[exit_code(outcomes)]
    return "\n".join(lines) + f"\n\n{tally or 'no parts'}; {wall_s:.0f} s of a {budget_s:.0f} s budget. {verdict}."


def start_watchdog(budget: Budget, outcomes: list[Outcome]) -> threading.Timer:
    """At the end of the budget (a CUDA call stuck where the alarm cannot reach it), print what ran and exit 2."""

    def expire() -> None:
        wall = budget.clock() - budget.started
        print("\nthe budget ran out inside a part that did not return:\n" + summary_table(outcomes, budget.seconds, wall),
              flush=True)
        os._exit(2)

    timer = threading.Timer(max(budget.seconds - (budget.clock() - budget.started), 0.0), expire)
    timer.daemon = True
    timer.start()
    return timer


# ------------------------------------------------------------------------------------ inputs
def photographs(size: int, count: int) -> torch.Tensor:
    """``count`` crops of scikit-image's public-domain photographs, ``[count,3,size,size]`` in [0,1]."""
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    crops = []
    for index in range(count):
        picture = torch.from_numpy(np.ascontiguousarray(sources[index % len(sources)])).permute(2, 0, 1).float() / 255
        side = min(picture.shape[1:])
        offset = (index // len(sources)) * side // 8
        square = picture[:, :side - offset, offset:offset + side - offset][None]
        crops.append(F.interpolate(square, size=(size, size), mode="area"))
    return torch.cat(crops).clamp(0, 1)


def photo_batch(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    return photographs(size, BATCH), TrainMaskSampler(size, SEED, FreeFormConfig()).sample(BATCH)


def write_photo_dataset(root: Path, size: int = SIZE) -> Path:
    """A ``folder:`` dataset of photograph crops (``train/``, ``test/``): what training and the Ray cells read."""
    from bench.data.images import quantize, write_png

    images = quantize(photographs(size, 12))
    for split, chosen in (("train", range(8)), ("test", range(8, 12))):
        (root / split).mkdir(parents=True, exist_ok=True)
        for index in chosen:
            write_png(root / split / f"{split}_{index:02d}.png", images[index].permute(1, 2, 0).numpy())
    return root


# ------------------------------------------------------------------------------------ methods
def is_sampler(method: InpaintingMethod) -> bool:
    config = method.config_dict()
    return "num_timesteps" in config and "steps" in config


def seeded_method(name: str, device: torch.device, size: int = SIZE, **overrides: Any) -> InpaintingMethod:
    """``name`` with the same initial weights on every device; built for ``size`` if it is built for a size."""
    torch.manual_seed(SEED)
    method = create_method(name, **overrides)
    if method.config_dict().get("image_size", size) != size:  # DDNM's networks are built for one size
        torch.manual_seed(SEED)
        method = create_method(name, image_size=size, **overrides)
    return method.to(device)


def comparison_method(name: str, device: torch.device) -> InpaintingMethod:
    """The method as the GPU-vs-CPU comparison runs it: a diffusion sampler with few steps, since its CPU
    reference runs every step and what the comparison tests is each step's function, not how many there are."""
    method = seeded_method(name, torch.device("cpu"))
    if is_sampler(method):
        method = seeded_method(name, torch.device("cpu"), steps=SAMPLER_STEPS_COMPARED)
    return method.to(device)


def sampler_gain(method: InpaintingMethod) -> float:
    """How much a diffusion sampler's first step magnifies an error of its noise estimate in x̂0: 1/√ᾱ_T of
    its linear β schedule (about 157 for DDNM's). Float32 round-off in ε comes out that much larger."""
    config = method.config_dict()
    betas = np.linspace(config["beta_start"], config["beta_end"], config["num_timesteps"], dtype=np.float64)
    return float(1.0 / math.sqrt(np.prod(1.0 - betas)))


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


@torch.no_grad()
def inpaint_on(method: InpaintingMethod, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    method.eval()
    return method.inpaint(images.to(method.device), masks.to(method.device))


def verdict(problems: list[str], detail: str) -> tuple[str, str]:
    return (FAILED, "; ".join(problems[:3]) + (f" (+{len(problems) - 3})" if len(problems) > 3 else "")) \
        if problems else (PASSED, detail)


class MethodParts:
    """The parts of one method on ``device``; the GPU's inpaint output is kept for the scoring part."""

    def __init__(self, name: str, device: torch.device, tolerance: float, dataset: Callable[[], Path],
                 scorers: Callable[[], dict[str, Any]]):
        self.name, self.device, self.tolerance = name, device, tolerance
        self.dataset, self.scorers = dataset, scorers
        self.images, self.masks = photo_batch()
        self.gpu_output: torch.Tensor | None = None

    def inpaint_vs_cpu(self, limit: float) -> tuple[str, str]:
        reference = inpaint_on(comparison_method(self.name, torch.device("cpu")), self.images, self.masks)
        method = comparison_method(self.name, self.device)
        with cuda_tf32(self.device, False):
            exact = inpaint_on(method, self.images, self.masks)
        with cuda_tf32(self.device, True):
            with_tf32 = inpaint_on(method, self.images, self.masks)
        problems = [] if exact.shape == self.images.shape else [f"output shape {tuple(exact.shape)}"]
        problems += [] if exact.device == self.device else [f"output on {exact.device}"]
        problems += [] if torch.isfinite(exact).all() else ["output not finite"]
        problems += misplaced_or_nonfinite(method, self.device)
        if problems:
            return verdict(problems, "")
        self.gpu_output = exact.float().cpu()
        tolerance, how = self.tolerance, ""
        if is_sampler(method):
            gain = sampler_gain(method)
            tolerance, how = self.tolerance * gain, f", {SAMPLER_STEPS_COMPARED} steps, x{gain:.0f} first-step gain"
        difference = float((self.gpu_output - reference).abs().max())
        tf32_difference = float((with_tf32.float().cpu() - reference).abs().max())
        detail = (f"max |GPU-CPU| {difference:.2e} with TF32 off (tolerance {tolerance:.2g}{how}); "
                  f"{tf32_difference:.2e} with TF32 on")
        return (PASSED if difference <= tolerance else FAILED), detail

    def train(self, precision: str) -> Callable[[float], tuple[str, str]]:
        def run(limit: float) -> tuple[str, str]:
            from bench.config import TrainConfig
            from bench.data.datasets import load_image_set
            from bench.run.train import train

            if precision == "bf16" and not torch.cuda.is_bf16_supported():
                raise PartUnavailable("this GPU has no bf16")
            method = seeded_method(self.name, self.device)
            method.set_memory_format("channels_last")
            images = load_image_set("folder", "train", root=str(self.dataset()), image_size=SIZE)
            with cuda_tf32(self.device, False) as tf32:
                result = train(method, images, TrainConfig(steps=2, batch_size=BATCH, checkpoint_every=2),
                               progress=False, data_workers=1, precision=precision)
            losses = result.history[-1]
            problems = [f"loss {key} = {value}" for key, value in losses.items()
                        if key != "step" and not math.isfinite(value)]
            problems += misplaced_or_nonfinite(method, self.device)
            shown = ", ".join(f"{key} {value:.3g}" for key, value in list(losses.items())[1:4])
            return verdict(problems, f"channels_last, 1 data worker, TF32 {tf32}: {shown}")
        return run

    def resume(self, limit: float) -> tuple[str, str]:
        from bench.config import TrainConfig
        from bench.data.datasets import load_image_set
        from bench.run.train import train

        images = load_image_set("folder", "train", root=str(self.dataset()), image_size=SIZE)
        runs = []
        with tempfile.TemporaryDirectory(prefix="gpu-smoke-resume-") as scratch, \
                warnings.catch_warnings(record=True) as caught, deterministic_algorithms(True), \
                cuda_tf32(self.device, False):
            warnings.simplefilter("always")
            checkpoint = Path(scratch) / "train_state.pt"
            for steps, path in ((2, None), (1, checkpoint), (2, checkpoint)):
                method = seeded_method(self.name, self.device)
                result = train(method, images, TrainConfig(steps=steps, batch_size=BATCH, checkpoint_every=1),
                               checkpoint_path=path, progress=False, data_workers=1)
                runs.append((result, method))
        (whole, whole_method), _, (resumed, resumed_method) = runs
        if resumed.resumed_from != 1:
            return FAILED, f"resumed from {resumed.resumed_from}, not step 1"
        same = whole.history == resumed.history and all(
            torch.equal(a, b) for a, b in zip(whole_method.state_dict().values(), resumed_method.state_dict().values()))
        warned = sorted({str(w.message).split()[0] for w in caught if NONDETERMINISTIC in str(w.message)})
        if same:
            return PASSED, "resumed at step 1: losses and weights bit-identical to 2 uninterrupted steps"
        if warned:
            return INFO, f"not bit-identical; torch warned these have no deterministic CUDA op: {', '.join(warned)}"
        return FAILED, "resumed run differs from the uninterrupted one, and torch warned of no nondeterministic op"

    def repeats(self, limit: float) -> tuple[str, str]:
        with warnings.catch_warnings(record=True) as caught, deterministic_algorithms(True), \
                cuda_tf32(self.device, False):
            warnings.simplefilter("always")
            first, second = (inpaint_on(comparison_method(self.name, self.device), self.images, self.masks)
                             for _ in range(2))
            steps = []
            if get_factory(self.name).trainable:
                for _ in range(2):
                    method = seeded_method(self.name, self.device)
                    try:
                        losses = method.train_step({"image": self.images.to(self.device),
                                                    "mask": self.masks.to(self.device)})
                    except NotTrainable:
                        break
                    steps.append(({k: float(v) for k, v in losses.items()},
                                  [p.detach().cpu().clone() for p in method.parameters()]))
        inpaint_same = torch.equal(first, second)
        detail = f"inpaint bit-identical: {'yes' if inpaint_same else 'NO'}"
        if len(steps) == 2:
            (losses_a, weights_a), (losses_b, weights_b) = steps
            same = losses_a == losses_b and all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
            detail += f"; train_step bit-identical: {'yes' if same else 'no'}"
        warned = sorted({str(w.message).split()[0] for w in caught if NONDETERMINISTIC in str(w.message)})
        if warned:
            detail += f"; no deterministic CUDA op: {', '.join(warned)}"
        return (PASSED if inpaint_same else FAILED), detail

    def scoring(self, limit: float) -> tuple[str, str]:
        from bench.data.images import quantize

        if self.gpu_output is None:
            raise PartUnavailable("no GPU inpaint output to score (its comparison did not pass)")
        composites = quantize(self.gpu_output * self.masks + self.images * (1 - self.masks))
        truths = quantize(self.images)
        scorers = self.scorers()
        scores = {where: scorer.per_image(composites, truths) for where, scorer in scorers.items()}
        features = {where: scorer.features(composites) for where, scorer in scorers.items()}
        problems, compared = [], []
        for metric, on_cpu in scores["cpu"].items():
            on_gpu = scores["cuda"][metric].cpu().double()
            worst = float(((on_gpu - on_cpu.double()).abs() / on_cpu.double().abs().clamp_min(1e-12)).max())
            compared.append(metric)
            if not worst <= METRIC_RTOL:
                problems.append(f"{metric} differs by {worst:.1e} relative")
        for network, on_cpu in features["cpu"].items():
            on_gpu = features["cuda"][network].cpu().float()
            worst = float((on_gpu - on_cpu.float()).abs().max() / on_cpu.float().abs().max().clamp_min(1e-12))
            compared.append(f"{network} features")
            if not worst <= FEATURE_RTOL:
                problems.append(f"{network} features differ by {worst:.1e} relative")
        missing = scorers["cpu"].unavailable()
        detail = f"{', '.join(compared)} agree"
        if missing:
            detail += f"; unavailable offline: {', '.join(sorted(missing))}"
        return verdict(problems, detail)

    def parts(self, paper_size: bool) -> list[Part]:
        scale = 3.0 if paper_size else 1.0  # paper-size networks: slower builds, CPU references and steps
        parts = [Part(f"{self.name}: inpaint GPU vs CPU", self.inpaint_vs_cpu, 4 * scale, 60 * scale)]
        if get_factory(self.name).trainable:
            parts += [Part(f"{self.name}: train 2 steps {precision}", self.train(precision), 4 * scale, 60 * scale)
                      for precision in ("fp32", "bf16", "fp16")]
            parts.append(Part(f"{self.name}: checkpoint, resume, bit-compare", self.resume, 6 * scale, 90 * scale))
        parts.append(Part(f"{self.name}: deterministic repeats", self.repeats, 4 * scale, 60 * scale))
        parts.append(Part(f"{self.name}: scoring CPU vs GPU", self.scoring, 3, 60))
        return parts


# ------------------------------------------------------------------------------------ cluster paths
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def synchronised_batch_norm_r1(device: torch.device) -> Callable[[float], tuple[str, str]]:
    """LaMa's training step, R1's double backward included, with every batch norm synchronised over a 1-rank
    NCCL group: the path a multi-GPU run takes (forced, since at world size 1 it would fall back to plain)."""
    def run(limit: float) -> tuple[str, str]:
        import torch.distributed as dist
        from bench.run.data_parallel import synchronise_batch_norm

        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                device_id=device)
        try:
            method = seeded_method("lama_tiny", device)
            replaced = sum(synchronise_batch_norm(network, device, force_sync=True)
                           for network in method.networks().values())
            if replaced == 0:
                return FAILED, "no batch norm was synchronised"
            images, masks = photo_batch()
            losses = method.train_step({"image": images.to(device), "mask": masks.to(device)})
            problems = [f"loss {k} = {float(v)}" for k, v in losses.items() if not math.isfinite(float(v))]
            problems += misplaced_or_nonfinite(method, device)
            return verdict(problems, f"{replaced} batch norms synchronised; R1 double backward ran")
        finally:
            dist.destroy_process_group()
    return run


def run_benchmark_subprocess(arguments: list[str], out: Path, limit: float) -> tuple[subprocess.CompletedProcess | None, str]:
    command = [sys.executable, "-m", "pipelines.full_benchmark", "--out", str(out), *arguments]
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as sink:
        try:
            finished = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=max(limit - 2, 1))
        except subprocess.TimeoutExpired:
            return None, f"full_benchmark over its {limit:.0f} s cap; log {log}"
    return finished, log.read_text()[-600:]


def ray_cell(precision: str, method: str, dataset: Callable[[], Path], scratch: Path) -> Callable[[float], tuple[str, str]]:
    """One cell through the real entry point on a GPU share, trained 2 steps at ``precision``, evaluated in shards."""
    def run(limit: float) -> tuple[str, str]:
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise PartUnavailable("this GPU has no bf16")
        out = scratch / f"ray-{precision}"
        finished, tail = run_benchmark_subprocess(
            ["--methods", method, "--datasets", f"folder:{dataset()}", "--image-size", str(SIZE), "--steps", "2",
             "--batch-size", str(BATCH), "--precision", precision, "--device", "cuda", "--gpus-per-cell", "0.5",
             "--eval-batch-size", "4", "--eval-shard-pairs", "4", "--bins", '["(0.1,0.2]", "(0.3,0.4]"]',
             "--cpus-per-cell", "1"], out, limit)
        if finished is None or finished.returncode != 0:
            return FAILED, (tail if finished is None else f"exit {finished.returncode}: {tail.strip().splitlines()[-1:]}")
        records = [json.loads(path.read_text()) for path in out.glob("*/*/cell.json")]
        if not records:
            return FAILED, "no cell.json written"
        record = records[0]
        problems = [] if str(record.get("device", "")).startswith("cuda") else [f"ran on {record.get('device')}"]
        problems += [] if record.get("precision") == precision else [f"precision {record.get('precision')}"]
        problems += [] if len(record.get("eval_shards") or []) > 1 else ["evaluated in one piece, not in shards"]
        problems += [] if record.get("tf32") == "off" else [f"tf32 recorded as {record.get('tf32')!r}"]
        return verdict(problems, f"{method} at {precision}: {len(record.get('eval_shards') or [])} shards, "
                                 f"memory share {record.get('gpu_memory_fraction')}, TF32 {record.get('tf32')}")
    return run


def multi_gpu_training(dataset: Callable[[], Path], scratch: Path) -> Callable[[float], tuple[str, str]]:
    def run(limit: float) -> tuple[str, str]:
        if torch.cuda.device_count() < 2:
            raise PartUnavailable(f"{torch.cuda.device_count()} GPU: needs 2")
        out = scratch / "two-workers"
        finished, tail = run_benchmark_subprocess(
            ["--methods", *GAN_TINY, "--datasets", f"folder:{dataset()}", "--image-size", str(SIZE), "--steps", "2",
             "--batch-size", "4", "--device", "cuda", "--gpus-per-cell", "2", "--cpus-per-cell", "2",
             "--bins", '["(0.1,0.2]"]', "--nosave-images"], out, limit)
        if finished is None or finished.returncode != 0:
            return FAILED, (tail if finished is None else f"exit {finished.returncode}: {tail.strip().splitlines()[-1:]}")
        records = [json.loads(path.read_text()) for path in out.glob("*/*/cell.json")]
        two = sorted(r["method"] for r in records if r.get("train_workers") == 2)
        missing = sorted(set(GAN_TINY) - set(two))
        return verdict([f"not trained by 2 workers: {', '.join(missing)}"] if missing else [],
                       f"{len(two)} GAN methods trained 2 steps in 2 workers")
    return run


# ------------------------------------------------------------------------------------ timing
def paper_latencies() -> dict[str, float]:
    import pandas as pd

    frame = pd.read_csv(PAPER_EFFICIENCY, keep_default_na=False, na_values=[""])
    return {row["method"]: float(row["latency_ms"]) for _, row in frame.iterrows() if row["latency_ms"] == row["latency_ms"]}


def efficiency_timing(name: str, precision: str, device: torch.device,
                      timings: dict[tuple[str, str], float]) -> Callable[[float], tuple[str, str]]:
    """``pipelines.efficiency``'s latency of ``name`` at 256², batch 1, on this GPU, at fp32 (TF32 off) or bf16."""
    def run(limit: float) -> tuple[str, str]:
        from bench.run.evaluate import inference_autocast
        from pipelines.efficiency import EfficiencyConfig, measure_method

        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise PartUnavailable("this GPU has no bf16")
        config = EfficiencyConfig(methods=[name], image_size=256, batch_size=1, warmup=1, repeats=3,
                                  throughput_batch=0, device=str(device), isolate=False)
        with cuda_tf32(device, False) as tf32, inference_autocast(device, precision):
            row = measure_method(config, name)
        timings[(name, precision)] = row["latency_ms"]
        state = f"TF32 {tf32}" if precision == "fp32" else "autocast"
        return INFO, f"{row['latency_ms']:.1f} ms ({state}), {row['peak_memory_MB']:.0f} MB peak"
    return run


def timing_table(timings: dict[tuple[str, str], float]) -> str:
    paper = paper_latencies()
    lines = ["| method | paper RTX 4090 ms | fp32 (TF32 off) ms | ratio | bf16 ms | ratio |", "|---|---|---|---|---|---|"]
    for name, column in TIMED_COLUMNS.items():
        reference = paper.get(column)
        cells = []
        for precision in ("fp32", "bf16"):
            ours = timings.get((name, precision))
            cells += ["-", "-"] if ours is None else [f"{ours:.1f}", f"{ours / reference:.2f}" if reference else "-"]
        lines.append(f"| {column} ({name}) | {reference if reference else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the run
def chosen_methods(args: argparse.Namespace) -> list[str]:
    if args.methods:
        return list(args.methods)
    if args.all:
        return available_methods()
    tiny = [name for name in available_methods() if getattr(get_factory(name), "scale", "any") == "tiny"]
    return tiny + paper_columns()


def paper_columns() -> list[str]:
    """The paper's columns that have networks (the classical references among them have nothing to run on a GPU)."""
    return [name for name in tagged_methods("paper_column") if getattr(get_factory(name), "trainable", True)]


@dataclass
class Run:
    """What the parts share: the device, a scratch folder, lazily made inputs and scorers, the timings."""

    device: torch.device
    scratch: Path
    tolerance: float
    timings: dict[tuple[str, str], float] = field(default_factory=dict)
    _dataset: Path | None = None
    _scorers: dict[str, Any] | None = None

    def dataset(self) -> Path:
        if self._dataset is None:
            self._dataset = write_photo_dataset(self.scratch / "photos")
        return self._dataset

    def scorers(self) -> dict[str, Any]:
        from bench.metrics.scoring import Scorer

        if self._scorers is None:
            self._scorers = {"cpu": Scorer(device=torch.device("cpu")), "cuda": Scorer(device=self.device)}
        return self._scorers


def build_parts(run: Run, methods: list[str]) -> list[Part]:
    """Every part, cheapest and most telling first: tiny variants, the cluster paths, paper-size columns,
    timings, then multi-GPU training."""
    columns = paper_columns()
    tiny = [name for name in methods if name not in columns]
    paper = [name for name in methods if name in columns]
    parts = []
    for name in tiny:
        parts += MethodParts(name, run.device, run.tolerance, run.dataset, run.scorers).parts(paper_size=False)
    parts.append(Part("synchronised batch norm: LaMa R1 double backward, 1-rank NCCL",
                      synchronised_batch_norm_r1(run.device), 10, 60))
    parts += [Part(f"Ray cell {precision} ({method}, 0.5 GPU, shards of 4 pairs)",
                   ray_cell(precision, method, run.dataset, run.scratch), 45, 150) for precision, method in RAY_CELLS]
    for name in paper:
        parts += MethodParts(name, run.device, run.tolerance, run.dataset, run.scorers).parts(paper_size=True)
    for name in TIMED_COLUMNS:
        parts += [Part(f"efficiency {name} 256² {precision}", efficiency_timing(name, precision, run.device, run.timings),
                       20 if name == "ddnm" else 8, 120) for precision in ("fp32", "bf16")]
    parts.append(Part("2-worker training of every GAN method (2 GPUs)", multi_gpu_training(run.dataset, run.scratch),
                      120, 300))
    return parts


def prepare_process() -> None:
    """Before any CUDA work: cuBLAS reads its workspace setting once, when it starts, so the deterministic parts
    need it set now; and offline mode, so that no part waits on a download."""
    os.environ.setdefault(CUBLAS_WORKSPACE, DETERMINISTIC_CUBLAS_WORKSPACE)
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds the whole run may take, every part and subprocess included (default "
                             f"{DEFAULT_BUDGET_S}); parts that do not fit are skipped and listed, exit code 2")
    parser.add_argument("--device", default="cuda", help="the GPU to test (default cuda, i.e. cuda:0)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--all", action="store_true", help="every registered method (default: the paper's columns "
                                                           "and the tiny variants)")
    chosen.add_argument("--methods", nargs="+", default=None, help="these methods only")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest max |GPU-CPU| of inpaint outputs, TF32 off (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--out", default=None, help="keep the scratch files (datasets, Ray cells, logs) here")
    args = parser.parse_args(argv)
    if not args.budget_s > 0:
        parser.error(f"--budget-s {args.budget_s:g}: give a positive number of seconds")
    if not args.tolerance > 0:
        parser.error(f"--tolerance {args.tolerance:g}: give a positive number")
    if args.methods:
        unknown = sorted(set(args.methods) - set(available_methods()))
        if unknown:
            parser.error(f"--methods: unknown {', '.join(unknown)}; registered: {', '.join(available_methods())}")
    device = torch.device(args.device)
    if device.type != "cuda":
        parser.error(f"--device {args.device}: the smoke test tests a CUDA device (cuda or cuda:N)")
    args.device = torch.device("cuda", device.index or 0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    prepare_process()
    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}): nothing to test here")
        return 0
    budget = Budget(args.budget_s)
    outcomes: list[Outcome] = []
    device = args.device
    print(f"{device}: {torch.cuda.get_device_name(device)}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}; TF32 by default here: {tf32_state()}; budget {args.budget_s:.0f} s",
          flush=True)
    watchdog = start_watchdog(budget, outcomes)
    try:
        with contextlib.ExitStack() as stack:
            scratch = Path(args.out).expanduser().resolve() if args.out else Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-smoke-")))
            scratch.mkdir(parents=True, exist_ok=True)
            run = Run(device, scratch, args.tolerance)
            run_parts(build_parts(run, chosen_methods(args)), budget, outcomes)
            if run.timings:
                print(f"\nLatency at 256², batch 1, on {torch.cuda.get_device_name(device)}, against the paper's "
                      f"RTX 4090 (ratio = ours / paper):\n{timing_table(run.timings)}", flush=True)
    finally:
        watchdog.cancel()
    wall = budget.clock() - budget.started
    print(f"\nSummary:\n{summary_table(outcomes, args.budget_s, wall)}", flush=True)
    return exit_code(outcomes)


if __name__ == "__main__":
    sys.exit(main())
