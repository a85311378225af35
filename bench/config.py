"""Benchmark configuration: one dataclass tree that flows unchanged from the CLI (simple-parsing, YAML
presets) to each Ray task and into MLflow params."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.data.masks import RATIO_BINS, bin_label

SIX_BINS = tuple(bin_label(lo, hi) for lo, hi in RATIO_BINS)


@dataclass
class TrainConfig:
    """Training settings shared by every trainable method (a method's own hyper-parameters live in its
    config dataclass and are overridden through ``method_options``)."""

    steps: int = 200  # optimisation steps per cell (0 = evaluate the method as created/loaded)
    batch_size: int = 8  # images per step
    seed: int = 0  # seeds weights, data order and training masks
    mask_preset: str = "deepfill"  # free-form preset for training masks: deepfill | thin | medium | thick
    max_mask_ratio: float = 0.6  # training masks are drawn with hole ratio ≤ this
    checkpoint_every: int = 50  # steps between resumable checkpoints
    log_every: int = 1  # steps between recorded loss values
    # With published weights (``weights``): train from them for ``steps`` instead of evaluating them as
    # released. Per method through ``train_options`` ({"ec": {"finetune": true}}).
    finetune: bool = False


@dataclass
class DataConfig:
    """Which image sets to benchmark and at what size."""

    # Each entry is an embedded suite (faces, scenes, facades) or KIND:PATH with KIND in celeba, paris,
    # places2, folder — e.g. celeba:/data/celeba or folder:~/my_photos.
    datasets: list[str] = field(default_factory=lambda: ["faces", "scenes", "facades"])
    image_size: int = 64  # evaluation and training resolution (the paper uses 256)
    test_limit: int | None = None  # use at most this many test images per dataset (None = all)
    train_limit: int | None = None  # use at most this many training images (None = all)
    cache_dir: str | None = None  # where embedded suites are built (default $SAHN_BENCH_CACHE or ~/.cache/sahn-bench)


@dataclass
class MaskConfig:
    """The frozen test-mask protocol (see docs/protocol.md)."""

    source: Literal["freeform", "nvidia"] = "freeform"  # seeded free-form generator, or the NVIDIA test masks
    folder: str | None = None  # folder of the NVIDIA irregular mask test set (source=nvidia)
    preset: str = "deepfill"  # free-form preset: deepfill | thin | medium | thick
    bins: list[str] = field(default_factory=lambda: list(SIX_BINS))  # ratio bins to draw test masks in
    masks_per_bin: int = 1  # masks per test image and bin
    seed: int = 0  # seed of the free-form generator / NVIDIA assignment


@dataclass
class ResourceConfig:
    """Where cells run and how much each asks for."""

    device: str = "auto"  # auto (CPU unless --gpus-per-cell > 0, then the cell's GPU), cpu, cuda, cuda:N (N-th own GPU)
    cpus_per_cell: float = 1.0  # Ray CPU request per cell
    # Ray GPU request per cell. A fraction shares a GPU: the cell's CUDA allocator is capped at that share of the
    # GPU's memory less 512 MiB for its process's CUDA context, which the allocator's cap does not count.
    gpus_per_cell: float = 0.0
    ray_address: str | None = None  # existing Ray cluster (or env RAY_ADDRESS); default: a local cluster
    serial: bool = False  # run cells in this process without Ray (debugging)
    # CUDA: deterministic cuDNN/torch algorithms (ops without one warn); slower, recorded per cell
    deterministic: bool = False
    # Arithmetic of the methods' networks: fp32 (reproduction), or bf16 / fp16 under torch.autocast (fp16 training
    # adds a grad scaler). Metric networks always run in full fp32. Recorded per cell.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # CUDA: float32 matmuls and convolutions of the methods' networks (training and inpainting) as TF32 (on: about
    # 3 decimal digits, faster on Ampere and later) or in exact float32 (off). Metric networks always run exact.
    # Recorded per CUDA cell; no effect on the CPU.
    tf32: Literal["off", "on"] = "off"
    # Memory layout of the methods' networks and inputs. auto = channels_last on CUDA at bf16/fp16, where tensor
    # cores want NHWC and it helps; contiguous otherwise, so fp32 reproduction and every CPU run keep their numbers
    # exactly. Recorded per cell.
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    # Processes per cell that read and decode images and masks (0 = in the cell's own process); results are the
    # same with any number. Each one is a process beside the cell's, so count them in --cpus-per-cell.
    data_workers: int = 0
    # Processes that train one cell together, data-parallel under Ray Train (NCCL on GPUs, gloo on CPUs); 0 = one
    # per GPU of --gpus-per-cell (one without GPUs). The cell's request is split evenly among them, and its
    # evaluation runs in tasks of one worker's share each. Needs Ray (not --serial).
    train_workers: int = 0
    # With several training workers: batch-norm statistics of the global batch (false: of each worker's share)
    sync_batch_norm: bool = True


@dataclass
class TrackingConfig:
    mlflow_uri: str | None = None  # MLflow tracking URI; default sqlite:///<out>/mlflow.db
    experiment: str = "sahn-bench"  # MLflow experiment name


@dataclass
class BenchmarkConfig:
    """Benchmark every registered inpainting method on the frozen test pairs of each dataset."""

    out: str = "results"  # output folder (per-image CSVs, composites, report, MLflow store)
    scale: Literal["tiny", "paper"] = "tiny"  # which registered variants to run when --methods is empty
    # Method names, or tag:NAME for the variants carrying a registry tag in its order (tag:paper_column = the
    # paper's columns, bench.methods.TAGS); empty = every variant of --scale.
    methods: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])  # one cell per method × dataset × seed
    eval_batch_size: int = 16  # pairs per inference batch
    # Pairs per evaluation shard (rounded up to a multiple of --eval-batch-size): a cell's pairs are split into
    # shards that run as tasks of their own and are merged in manifest order, with the same results as one
    # piece. 0 = automatic: split only when the cluster has more cell slots than the cells fill, never below
    # 1000 pairs per shard (so small cells stay whole).
    eval_shard_pairs: int = 0
    # Which scored composites are written as PNG to <cell>/images/: all; sample = a fixed, seeded set per ratio bin
    # (bench.run.evaluate.SAMPLED_PER_BIN, the same pairs for every method: what the qualitative figures, MLflow's
    # samples.png and a reviewer need); none. Every per_image.csv row carries its composite's digest either way.
    # true/false of earlier configs mean all/none.
    save_images: Literal["all", "sample", "none"] | bool = "all"
    inception_weights: str | None = None  # explicit pt_inception-2015-12-05 file for FID
    lpips_weights: str | None = None  # explicit AlexNet trunk file for LPIPS
    # CPU: score PSNR/SSIM/MAE with one torch.compile'd kernel per image size: several times faster after
    # a one-time compile (times in docs/measurements.md), worth it on large sets of pairs;
    # SSIM differs from the eager path's by float32 round-off (within 1e-5), PSNR and MAE not at all.
    compile_metrics: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Per-method config overrides, e.g. {"sahn_tiny": {"alpha": 0.4}} (YAML or command line).
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per-method training overrides, e.g. {"ec": {"finetune": true, "steps": 2000}} (YAML or command line).
    train_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Published (or earlier harness) checkpoints to evaluate instead of training, per method one path or per
    # method and dataset label a path, e.g. {"lama_fourier": "/ckpt/lama-fourier", "ec": {"celeba": "/ckpt/ec/celeba"}}
    # (docs/checkpoints.md). Such a cell evaluates them as released unless its train config says finetune.
    weights: dict[str, str | dict[str, str]] = field(default_factory=dict)
    # Print what the run would do (cells, pairs, shards, estimated GPU/CPU-hours and wall time) and stop: no cell
    # runs, nothing trains (manifests are frozen, since pair counts come from them).
    plan: bool = False
    # --plan: per-pair inpainting latencies from this efficiency results folder (pipelines.efficiency's
    # efficiency.csv) instead of timing each method on a few pairs on this machine.
    plan_latency_from: str | None = None
    # --plan: training seconds per step from this CSV (method,step_seconds[,image_size,batch_size]; a plan writes its
    # timed steps to <out>/plan_train.csv in that format) instead of timing a few real steps on this machine.
    plan_train_from: str | None = None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from :func:`to_dict` output."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        f = hints[key]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if isinstance(value, dict) and sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = from_dict(sub, value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"steps": 5}}`` → ``{"train.steps": 5}`` (MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
