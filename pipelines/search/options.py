"""The options of a search (``python -m pipelines.tune``): what is searched and how, the validation pairs, the
trials' resources; their checks, the search space as Ray Tune's domains, and the search's identity (what a re-run
must match to resume)."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

from bench.config import ResourceConfig, TrackingConfig, TrainConfig, to_dict
from bench.run.data_parallel import Ranks
from bench.errors import UserError
from bench.metrics.table import PIXEL_METRICS
from bench.run.resources import training_workers
from pipelines.shared import absolute_dataset, absolute_path

SEARCHED = ("alpha", "w_rec", "w_fm", "w_adv", "w_prior")  # fields of the method's config (sahn.model.SAHNConfig)
VALIDATION_METRICS = PIXEL_METRICS  # what a trial scores: the metrics that need no network

EXPERIMENT_FOLDER = "search"
VAL_MANIFEST_FOLDER = "val_manifest"
SEARCH_RECORD = "search.json"
TRIALS_CSV = "trials.csv"
CURVES_CSV = "curves.csv"
BEST_CONFIG = "best_config.yaml"
SENSITIVITY = "sensitivity"
TRAIN_STATE = "train_state.pt"  # inside a trial checkpoint: bench.run.train's resumable state
PROGRESS = "progress.json"  # inside a trial checkpoint: steps done and the reports so far
SCORES = "scores.json"  # beside train_state.pt when workers train a trial: rank 0's validation scores of the chunk
WORKERS_FOLDER = "workers"  # in a trial's storage folder: train_state.pt between chunks, when workers train it
# What a trial that trains in workers asks for itself: no CPU and no GPU, they are its workers' (a trial holding a
# CPU its workers need waits for them forever). Tune refuses a request of nothing, so it holds one byte of Ray's
# memory resource, which every node has.
LAUNCHER_REQUEST = {"cpu": 0.0, "gpu": 0.0, "memory": 1}
# bench's messages name a benchmark cell's flags; a search sets the same things per trial.
CELL_TO_TRIAL_FLAGS = (("--cpus-per-cell", "--cpus-per-trial"), ("--gpus-per-cell", "--gpus-per-trial"),
                       ("--batch-size", "--train.batch-size"))

COMPLETED, STOPPED_EARLY, FAILED = "completed", "stopped_early", "failed"
# Options that may change between an interrupted search and its re-run (where it runs, how it prints).
RESUMABLE_CHANGES = ("resources.ray_address", "verbose", "snapshot_seconds")


@dataclass
class SearchSpace:
    """The values to try. One value fixes an option; ``choice`` sampling takes a list of values,
    ``uniform`` / ``loguniform`` take ``low high``."""

    alpha: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])  # α of L_prior (the paper's four)
    alpha_sampling: Literal["choice", "uniform"] = "choice"
    w_rec: list[float] = field(default_factory=lambda: [0.3, 3.0])  # w1, reconstruction (paper 1.0)
    w_fm: list[float] = field(default_factory=lambda: [0.1, 0.9])  # w2, feature matching (paper 0.3)
    w_adv: list[float] = field(default_factory=lambda: [0.03, 0.3])  # w3, adversarial (paper 0.1)
    w_prior: list[float] = field(default_factory=lambda: [0.15, 1.5])  # w4, semantic prior (paper 0.5)
    weight_sampling: Literal["loguniform", "uniform", "choice"] = "loguniform"


@dataclass
class ValidationConfig:
    """The frozen validation pairs: images of the ``val`` split, each with one free-form mask per bin."""

    limit: int | None = None  # use at most this many validation images (None = all)
    bins: list[str] = field(default_factory=lambda: ["(0.1,0.2]", "(0.3,0.4]", "(0.5,0.6]"])
    masks_per_bin: int = 1
    preset: str = "deepfill"  # free-form mask preset
    seed: int = 0  # seed of the validation masks
    batch_size: int = 16  # pairs per inference batch


@dataclass
class AshaConfig:
    """Trials report every ``steps_per_report`` steps; ASHA (asynchronous successive halving) keeps the
    best 1/``reduction_factor`` of the trials at each rung, starting at ``grace_steps``."""

    steps_per_report: int = 10
    grace_steps: int = 20  # no trial is stopped before this many steps
    reduction_factor: int = 2


@dataclass
class TrialResources:
    device: str = "auto"  # auto (CUDA when present), cpu, cuda
    cpus_per_trial: float = 1.0  # Ray CPU request per trial (fractional allowed; torch uses max(1, floor) threads)
    gpus_per_trial: float = 0.0  # Ray GPU request per trial (fractional allowed)
    ray_address: str | None = None  # existing Ray cluster (or env RAY_ADDRESS); default: a local cluster
    # Processes that train one trial together, data-parallel under Ray Train (NCCL on GPUs, gloo on CPUs), as
    # --train-workers does for a benchmark cell, so that a search can give each trial several GPUs; 0 = one per
    # GPU of --gpus-per-trial (one without GPUs). The workers hold the trial's request, each an even share of
    # --cpus-per-trial / --gpus-per-trial; the trial's own process then holds nothing (LAUNCHER_REQUEST: were it
    # to keep a CPU its workers need, they would never start) and scores the validation pairs on the CPU
    # between chunks, while its workers are idle. Several trials whose workers do not all fit take turns: Ray
    # Train reserves a trial's workers all at once or not at all.
    train_workers: int = 0


@dataclass
class TuneConfig:
    """Search SAHN's α and loss weights on one dataset's validation split with Ray Tune (ASHA)."""

    out: str = "results-tune"  # output folder (validation manifest, Tune experiment, tables, best config)
    method: str = "sahn_tiny"  # a registered method whose config has the searched fields
    dataset: str = "faces"  # an embedded suite or KIND:PATH (celeba:/data/celeba); its val split is used
    image_size: int = 64
    train_limit: int | None = None  # use at most this many training images (None = all)
    cache_dir: str | None = None  # where embedded suites are built
    metric: str = "psnr"  # validation metric to optimise, of VALIDATION_METRICS (direction: bench.metrics.table)
    searcher: Literal["optuna", "random", "grid"] = "optuna"
    search_seed: int = 0  # seeds the searcher's sampling
    num_samples: int = 6  # trials (grid: repetitions of the whole grid)
    max_concurrent_trials: int = 2
    max_failures: int = 2  # retries of a crashed trial, each from its last checkpoint
    snapshot_seconds: float = 1.0  # how often Tune saves the search state (what a killed driver can lose)
    verbose: int = 1  # Tune's console output: 0 silent, 1 status, 2 every result
    # Fixed options of the method for every trial (YAML or command line), e.g. {teacher: tresnet_l, teacher_path: /w/asl.pth}.
    method_options: dict[str, Any] = field(default_factory=dict)
    space: SearchSpace = field(default_factory=SearchSpace)
    val: ValidationConfig = field(default_factory=ValidationConfig)
    asha: AshaConfig = field(default_factory=AshaConfig)
    # steps = a trial's full length (ASHA's max); checkpoint_every is unused (a trial checkpoints at each report).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=60))
    resources: TrialResources = field(default_factory=TrialResources)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="sahn-bench-tune"))


# ------------------------------------------------------------------------------------------ validation of options
def _positive_int(value: Any, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag} must be a positive integer, got {value!r}")
    return value


def check_config(config: TuneConfig) -> None:
    """Every option a search needs, checked before any work; one line naming the flag."""
    if config.metric not in VALIDATION_METRICS:
        raise UserError(f"--metric {config.metric}: choose one of {', '.join(VALIDATION_METRICS)}")
    if config.searcher not in ("optuna", "random", "grid"):
        raise UserError(f"--searcher {config.searcher}: choose optuna, random or grid")
    _positive_int(config.num_samples, "--num-samples")
    _positive_int(config.max_concurrent_trials, "--max-concurrent-trials")
    _positive_int(config.image_size, "--image-size")
    _positive_int(config.train.steps, "--train.steps")
    _positive_int(config.train.batch_size, "--train.batch-size")
    _positive_int(config.asha.steps_per_report, "--steps-per-report")
    _positive_int(config.asha.grace_steps, "--grace-steps")
    _positive_int(config.val.batch_size, "--val.batch-size")
    if config.asha.reduction_factor < 2:
        raise UserError(f"--reduction-factor must be at least 2, got {config.asha.reduction_factor}")
    if config.asha.grace_steps > config.train.steps:
        raise UserError(f"--grace-steps {config.asha.grace_steps} exceeds --train.steps {config.train.steps}")
    if config.max_failures < 0:
        raise UserError(f"--max-failures must be ≥ 0, got {config.max_failures}")
    if config.snapshot_seconds < 0:
        raise UserError(f"--snapshot-seconds must be ≥ 0, got {config.snapshot_seconds}")
    clashes = sorted(set(config.method_options) & set(SEARCHED))
    if clashes:
        raise UserError(f"method_options sets {clashes}, which the search space decides: set them under space")
    param_space(config.space, config.searcher)  # raises on a malformed space
    workers = trial_workers(config.resources)
    if workers > 1:
        with trial_flags():
            Ranks(size=workers).share(config.train.batch_size)  # raises when the workers cannot split the batch


@contextlib.contextmanager
def trial_flags() -> Iterator[None]:
    """A :class:`UserError` of bench's resource rules, re-raised with the search's flag names."""
    try:
        yield
    except UserError as exc:
        message = str(exc)
        for cell_flag, trial_flag in CELL_TO_TRIAL_FLAGS:
            message = message.replace(cell_flag, trial_flag)
        raise UserError(message) from None


def trial_resource_config(resources: TrialResources) -> ResourceConfig:
    """A trial's request as a cell's, for the rules and helpers of :mod:`bench.run.ray_train` and Ray's checks."""
    return ResourceConfig(device=resources.device, cpus_per_cell=resources.cpus_per_trial,
                          gpus_per_cell=resources.gpus_per_trial, ray_address=resources.ray_address,
                          train_workers=resources.train_workers)


def trial_workers(resources: TrialResources) -> int:
    """How many processes train each trial (a request that cannot be met raises a one-line UserError)."""
    with trial_flags():
        return training_workers(trial_resource_config(resources))


def _values(space: SearchSpace, name: str) -> list[float]:
    values = getattr(space, name)
    if not values:
        raise UserError(f"--{name.replace('_', '-')}: give at least one value")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"--{name.replace('_', '-')} {values}: expected numbers") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(f"--{name.replace('_', '-')} {values}: values must be finite and ≥ 0")
    return values


def _domain(name: str, values: list[float], sampling: str, searcher: str) -> Any:
    """One option's Tune domain: a constant, a choice / grid, or a range."""
    from ray import tune

    flag = f"--{name.replace('_', '-')}"
    if len(values) == 1:
        return values[0]
    if sampling == "choice":
        distinct = list(dict.fromkeys(values))
        return tune.grid_search(distinct) if searcher == "grid" else tune.choice(distinct)
    sampling_flag = "--alpha-sampling" if name == "alpha" else "--weight-sampling"
    if searcher == "grid":
        raise UserError(f"{flag} {values}: --searcher grid needs value lists; set {sampling_flag} choice "
                        "or give one value")
    if len(values) != 2 or values[0] >= values[1]:
        raise UserError(f"{flag} {values}: {sampling} sampling needs two values, low < high")
    if sampling == "loguniform":
        if values[0] <= 0:
            raise UserError(f"{flag} {values}: loguniform sampling needs low > 0")
        return tune.loguniform(values[0], values[1])
    if sampling == "uniform":
        return tune.uniform(values[0], values[1])
    raise UserError(f"{sampling_flag} {sampling}: choose choice, uniform or loguniform")


def param_space(space: SearchSpace, searcher: str) -> dict[str, Any]:
    """Tune's ``param_space``: one entry per searched option of the method's config."""
    sampling = {name: space.alpha_sampling if name == "alpha" else space.weight_sampling for name in SEARCHED}
    return {name: _domain(name, _values(space, name), sampling[name], searcher) for name in SEARCHED}


def expected_trials(config: TuneConfig) -> int:
    """How many trials a complete search has (grid: every combination, ``num_samples`` times)."""
    if config.searcher != "grid":
        return config.num_samples
    sizes = [len(domain["grid_search"]) for domain in param_space(config.space, "grid").values()
             if isinstance(domain, dict) and "grid_search" in domain]
    return config.num_samples * math.prod(sizes)


def absolute_paths(config: TuneConfig) -> TuneConfig:
    """Paths made absolute: Tune runs each trial in its own folder, and workers may start elsewhere."""
    options = {key: absolute_path(value) if key.endswith("_path") and isinstance(value, str) else value
               for key, value in config.method_options.items()}
    return dataclasses.replace(config, out=absolute_path(config.out), dataset=absolute_dataset(config.dataset),
                               cache_dir=absolute_path(config.cache_dir), method_options=options)


def search_identity(config: TuneConfig) -> dict[str, Any]:
    """Every option that decides the search's trials; a re-run must match them to resume."""
    values = json.loads(json.dumps(to_dict(config), default=str))
    if not config.resources.train_workers:  # only when set: searches begun before the option still resume
        values["resources"].pop("train_workers", None)
    for dotted in RESUMABLE_CHANGES:
        *parents, leaf = dotted.split(".")
        node = values
        for parent in parents:
            node = node[parent]
        node.pop(leaf, None)
    return values


def identity_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def trial_request(resources: TrialResources) -> dict[str, float]:
    """What a trial's own process asks Ray for: its whole request, or nothing when its workers hold it."""
    if trial_workers(resources) > 1:
        return dict(LAUNCHER_REQUEST)
    return {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial}
