"""Ray Tune search over SAHN's α and loss weights, scored on a validation split (never the test pairs).

    python -m pipelines.tune                                # default preset: sahn_tiny on `faces`, CPU, minutes
    python -m pipelines.tune --config paper --dataset paris:/data/paris_streetview
    python -m pipelines.tune --searcher grid --w-rec 1.0 --w-fm 0.3 --w-adv 0.1 --w-prior 0.5   # α grid only
    python -m pipelines.full_benchmark --config results-tune/best_config.yaml           # benchmark the winner

Searched: α of the semantic prior loss and the loss weights w1..w4 (``w_rec``, ``w_fm``, ``w_adv``,
``w_prior``; the paper uses 0.2–0.8 and 1.0, 0.3, 0.1, 0.5). Each option takes one value (fixed), a list
of values (``choice`` sampling), or ``low high`` (``uniform`` / ``loguniform`` sampling). Searchers:
``optuna`` (TPE, seeded), ``random`` (seeded) or ``grid`` (every combination of the value lists).

A trial trains the method in chunks of ``--steps-per-report`` steps; after each chunk it scores the
*validation* pairs, reports the metric with a checkpoint, and ASHA stops the weaker trials early. With
``--train-workers N`` (or ``--gpus-per-trial N``, N > 1) each chunk trains data-parallel in N Ray Train
workers, as a benchmark cell does (:mod:`bench.ray_train`), so a search can use a multi-GPU cluster. The
validation pairs are frozen once, before any trial runs, from the dataset's ``val`` split into
``<out>/val_manifest`` (the same manifest machinery as the test protocol, on other images); this
pipeline never lists, builds or reads a test split or a test manifest.

Output folder (``--out``):
  val_manifest/      the frozen validation pairs
  search/            Ray Tune's experiment (trial checkpoints, state for resuming)
  search.json        the options of the search and its MLflow parent run (a re-run must match them)
  trials.csv         one row per trial: its values, status, last step and validation metrics
  curves.csv         every report of every trial (step, validation metrics, mean losses of the chunk)
  best_config.yaml   the best trial as a benchmark config (``python -m pipelines.full_benchmark --config``)
  sensitivity.png/.pdf   the validation metric against α and each loss weight

MLflow: one parent run per search (its options as params; best value, tables and figure at the end),
one nested run per trial (sampled values as params, validation metrics and losses per reported step),
written from the driver only. Re-running the same command after an interruption (Ctrl-C, a killed
driver, a lost node) restores the search with ``Tuner.restore``: finished trials are kept, unfinished
ones continue from their last checkpoint, and they log into their existing MLflow runs (steps logged
before are not logged twice). A trial that crashes is retried from its last checkpoint up to
``--max-failures`` times.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import pandas as pd
from ray.tune import Callback

from bench.cell import parse_dataset, resolve_device
from bench.cli import parse_config, run_main
from bench.config import ResourceConfig, TrackingConfig, TrainConfig, to_dict
from bench.data_parallel import Ranks
from bench.datasets import load_image_set
from bench.errors import UserError
from bench.images import atomic_write_bytes
from bench.manifest import Manifest, MaskProtocol, build_manifest, load_manifest
from bench.methods import create_method, get_factory, register_method, safe_torch_load
from bench.ray_train import RUN_FOLDER, fit_on_workers, training_workers, worker_device, worker_resources
from bench.tracking import (GIT_COMMIT_TAG, OUT_TAG, PARENT_TAG, ROLE_TAG, RunContext, Tracker, config_params,
                            resolve_uri, safe_name, search_runs)

PRESETS = Path(__file__).parent / "presets" / "tune"

SEARCHED = ("alpha", "w_rec", "w_fm", "w_adv", "w_prior")  # fields of the method's config (sahn.model.SAHNConfig)
METRIC_MODES = {"psnr": "max", "ssim": "max", "mae": "min"}  # validation metrics and their direction

EXPERIMENT_FOLDER = "search"
VAL_MANIFEST_FOLDER = "val_manifest"
SEARCH_RECORD = "search.json"
TRIALS_CSV = "trials.csv"
CURVES_CSV = "curves.csv"
BEST_CONFIG = "best_config.yaml"
SENSITIVITY = "sensitivity"
TRAIN_STATE = "train_state.pt"  # inside a trial checkpoint: bench.train's resumable state
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

SEARCH_ROLE = "search"  # ROLE_TAG of the parent run
TRIAL_ROLE = "trial"  # ROLE_TAG of a trial's nested run
TRIAL_ID_TAG = "sahn.trial_id"
SEARCH_KEY_TAG = "sahn.search_key"  # the search's identity digest
ERROR_TAG = "sahn.error"
STOPPED_EARLY_TAG = "sahn.stopped_early"
DATA_TAG_PREFIX = "sahn.data."  # what a trial trained and scored on (reported by the trial itself)

COMPLETED, STOPPED_EARLY, FAILED = "completed", "stopped_early", "failed"
# Options that may change between an interrupted search and its re-run (where it runs, how it prints).
RESUMABLE_CHANGES = ("resources.ray_address", "verbose", "snapshot_seconds")


# ------------------------------------------------------------------------------------------ config
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
    metric: Literal["psnr", "ssim", "mae"] = "psnr"  # validation metric to optimise (psnr/ssim max, mae min)
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
    if config.metric not in METRIC_MODES:
        raise UserError(f"--metric {config.metric}: choose one of {', '.join(METRIC_MODES)}")
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
    """A trial's request as a cell's, for the rules and helpers of :mod:`bench.ray_train` and Ray's checks."""
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
    def absolute(path: str | None) -> str | None:
        return os.path.abspath(os.path.expanduser(path)) if path else path

    kind, sep, root = config.dataset.partition(":")
    dataset = f"{kind}:{absolute(root)}" if sep and root else config.dataset
    options = {key: absolute(value) if key.endswith("_path") and isinstance(value, str) else value
               for key, value in config.method_options.items()}
    return dataclasses.replace(config, out=absolute(config.out), dataset=dataset, cache_dir=absolute(config.cache_dir),
                               method_options=options)


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


def _first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


# ------------------------------------------------------------------------------------------ validation pairs
def mask_protocol(config: TuneConfig) -> MaskProtocol:
    val = config.val
    return MaskProtocol(source="freeform", preset=val.preset, bins=tuple(val.bins), masks_per_bin=val.masks_per_bin,
                        seed=val.seed)


def build_validation_pairs(config: TuneConfig, out: Path) -> Manifest:
    """Freeze the validation pairs from the dataset's ``val`` split (the only split scored here)."""
    dataset = parse_dataset(config.dataset)
    try:
        val_set = load_image_set(dataset.kind, "val", root=dataset.root, image_size=config.image_size,
                                 limit=config.val.limit, cache_dir=config.cache_dir)
    except UserError as exc:
        raise UserError(f"{exc} — the search scores trials on a validation split, never on test images") from exc
    return build_manifest(val_set, mask_protocol(config), out / VAL_MANIFEST_FOLDER)


def load_validation_pairs(manifest_dir: str | os.PathLike) -> Manifest:
    """The frozen validation pairs; a manifest of any other split is refused."""
    manifest = load_manifest(manifest_dir)
    split = manifest.record["dataset"].get("split")
    if split != "val":
        raise UserError(f"{manifest_dir}: holds pairs of the {split!r} split; a search scores the 'val' split only")
    return manifest


def validation_scores(method: Any, manifest: Manifest, batch_size: int) -> dict[str, float]:
    """Mean PSNR, SSIM and MAE of the method's composites over the validation pairs (protocol scoring:
    composite quantised once, metrics on uint8)."""
    import torch

    from bench.evaluate import load_pair_batch
    from bench.images import quantize
    from bench.metrics import mae, psnr, ssim

    functions = {"psnr": psnr, "ssim": ssim, "mae": mae}
    totals = dict.fromkeys(functions, 0.0)
    pairs = list(manifest.pairs)
    method.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            images, masks = load_pair_batch(manifest, pairs[start:start + batch_size], method.device)
            prediction = method.inpaint(images, masks)
            composite = quantize(prediction * masks + images * (1 - masks))
            truth = quantize(images)
            for name, function in functions.items():
                totals[name] += float(function(composite, truth).sum())
    return {name: total / len(pairs) for name, total in totals.items()}


# ------------------------------------------------------------------------------------------ the trial
def chunk_losses(history: list[dict[str, float]], start: int, end: int) -> dict[str, float]:
    """Mean of every loss term over the steps ``start ≤ step < end`` (keys ``loss_<term>``)."""
    rows = [row for row in history if start <= row["step"] < end]
    terms = [key for key in (rows[0] if rows else {}) if key != "step"]
    return {f"loss_{term}": sum(row[term] for row in rows) / len(rows) for term in terms}


def _read_progress(checkpoint: Any, work: Path) -> tuple[int, list[dict[str, Any]]]:
    """(steps done, reports so far) from Tune's checkpoint, copied into ``work``; (0, []) when fresh."""
    if checkpoint is None:
        return 0, []
    checkpoint.to_directory(str(work))
    progress = json.loads((work / PROGRESS).read_text())
    return int(progress["step"]), list(progress["curve"])


def _write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())


def training_images(config: TuneConfig) -> Any:
    dataset = parse_dataset(config.dataset)
    return load_image_set(dataset.kind, "train", root=dataset.root, image_size=config.image_size,
                          limit=config.train_limit, cache_dir=config.cache_dir)


def run_trial(params: dict[str, Any], *, config: TuneConfig, factory: Callable, val_manifest: str) -> None:
    """One trial (Ray Tune function trainable): train in chunks, score the validation pairs after each
    chunk, report with a checkpoint; a restarted trial continues from Tune's latest checkpoint. With several
    training workers each chunk trains and is scored in them (:func:`train_chunk_on_workers`)."""
    import torch
    from ray import tune

    from bench.train import train

    register_method(config.method, factory)  # methods registered in the driver (tests, notebooks) exist here
    torch.set_num_threads(max(1, math.floor(config.resources.cpus_per_trial)))
    workers = trial_workers(config.resources)
    # With workers this process holds no GPU (they hold the trial's) and needs no method: they train and score.
    device = resolve_device(config.resources.device) if workers == 1 else None
    train_set = training_images(config)
    validation = load_validation_pairs(val_manifest)
    # What this trial read, reported with every result and kept as tags of its MLflow run.
    data = {"data_train_split": train_set.split, "data_train_images": len(train_set),
            "data_eval_split": validation.record["dataset"]["split"], "data_eval_manifest": str(validation.out_dir),
            "data_eval_pairs": len(validation.pairs)}
    torch.manual_seed(config.train.seed)  # weight initialisation is part of the seeded config
    method = create_method(config.method, **config.method_options, **params).to(device) if device else None
    total = config.train.steps
    with trial_work_folder(config, workers) as work:
        done, curve = _read_progress(tune.get_checkpoint(), work)
        restored_from = done
        while done < total:
            target = min(done + config.asha.steps_per_report, total)
            chunk = dataclasses.replace(config.train, steps=target, checkpoint_every=config.asha.steps_per_report)
            if workers == 1:
                history = train(method, train_set, chunk, checkpoint_path=work / TRAIN_STATE, progress=False).history
                scores = validation_scores(method, validation, config.val.batch_size)
            else:
                history, scores = train_chunk_on_workers(params, chunk, work, config=config, factory=factory,
                                                         val_manifest=val_manifest)
            row = {"step": target, **scores, **chunk_losses(history, done, target)}
            curve.append(row)
            _write_json(work / PROGRESS, {"step": target, "curve": curve})
            tune.report({**row, "restored_from_step": restored_from, **data},
                        checkpoint=tune.Checkpoint.from_directory(str(work)))
            done = target


@contextlib.contextmanager
def trial_work_folder(config: TuneConfig, workers: int) -> Iterator[Path]:
    """Where a trial keeps ``train_state.pt`` between its chunks. Trained in this process: a temporary folder.
    Trained in workers: a folder they all reach, the trial's own folder in the search's storage
    (``<out>/search/trial_<id>/workers``; Ray Train's run folder, its logs, beside it). On one node any folder
    would do; on a multi-node cluster ``--out`` must be shared storage (NFS or the like) mounted at the same
    path on every node, which a search there needs anyway: Tune keeps the trials' checkpoints in it and every
    trial reads the validation pairs from it. Tune's own trial folder (``get_trial_dir``) is node-local."""
    if workers == 1:
        with tempfile.TemporaryDirectory(prefix="sahn-tune-") as folder:
            yield Path(folder)
        return
    from ray import tune

    trial = Path(config.out) / EXPERIMENT_FOLDER / trial_folder_name(tune.get_context().get_trial_id())
    work = trial / WORKERS_FOLDER
    shutil.rmtree(work, ignore_errors=True)  # a failed attempt's state: a restart begins at Tune's checkpoint
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        remove_worker_scratch(trial)


def remove_worker_scratch(trial: Path) -> None:
    """A trial folder without its workers' files (Tune's checkpoints hold what is worth keeping)."""
    shutil.rmtree(trial / WORKERS_FOLDER, ignore_errors=True)
    shutil.rmtree(trial / RUN_FOLDER, ignore_errors=True)


def train_chunk_on_workers(params: dict[str, Any], chunk: TrainConfig, work: Path, *, config: TuneConfig,
                           factory: Callable, val_manifest: str) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Train one chunk in the trial's Ray Train workers, from (or resuming at) ``work/train_state.pt``; rank 0
    then scores the validation pairs on its own device (a GPU when the trial has them). Returns the training
    history rank 0 wrote with the state (one row per logged step) and the scores."""
    setup = {"config": config, "factory": factory, "params": params, "chunk": chunk, "work": str(work),
             "val_manifest": val_manifest}
    fit_on_workers(_trial_worker_loop, setup, trial_resource_config(config.resources), name=f"steps-{chunk.steps}",
                   folder=work.parent / RUN_FOLDER)
    scores = json.loads((work / SCORES).read_text())
    return safe_torch_load(work / TRAIN_STATE)["history"], scores


def _trial_worker_loop(setup: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: the chunk's training at this worker's rank, on its GPU or the CPU,
    with the method created as :func:`run_trial` creates it (the same seed, the same options)."""
    import torch

    from bench.distributed import cell_threads, torch_threads
    from bench.train import train

    config = setup["config"]
    resources = trial_resource_config(config.resources)
    register_method(config.method, setup["factory"])
    with torch_threads(cell_threads(worker_resources(resources))):
        train_set = training_images(config)
        torch.manual_seed(config.train.seed)
        method = create_method(config.method, **config.method_options, **setup["params"]).to(worker_device(resources))
        ranks = Ranks.of_process_group()
        work = Path(setup["work"])
        train(method, train_set, setup["chunk"], checkpoint_path=work / TRAIN_STATE, progress=False, ranks=ranks)
        if ranks.leader:
            scores = validation_scores(method, load_validation_pairs(setup["val_manifest"]), config.val.batch_size)
            _write_json(work / SCORES, scores)


def trial_folder_name(trial_id: str) -> str:
    return f"trial_{trial_id}"


def trial_dirname(trial: Any) -> str:
    """Short, stable trial folders (Tune's default name holds every sampled value)."""
    return trial_folder_name(trial.trial_id)


# ------------------------------------------------------------------------------------------ MLflow
class TrialRuns(Callback):
    """Tune callback, in the driver: one MLflow run per trial, nested under the search's parent run.

    Runs are found by the trial id tag, so a restored search logs into the runs it created before, and
    a step that was logged before (re-run after resuming from an older checkpoint) is not logged again.
    Tune pickles this object with the experiment: only plain values are kept across pickling."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, run_params: dict[str, str],
                 total_steps: int, git_commit: str):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.run_params, self.total_steps, self.git_commit = run_params, total_steps, git_commit
        self._client: Any = None
        self._runs: dict[str, tuple[str, int]] = {}  # trial id → (run id, last logged step)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def run_of(self, trial: Any) -> tuple[str, int]:
        """The trial's run (created on first use) and the last step logged to it."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        query = f"tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'"
        found = list(search_runs(self.client, self.experiment_id, query))
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, "step")
            last = int(max((m.value for m in history), default=0))
        else:
            tags = {PARENT_TAG: self.parent_run_id, ROLE_TAG: TRIAL_ROLE, TRIAL_ID_TAG: trial.trial_id,
                    GIT_COMMIT_TAG: self.git_commit, "sahn.trial_path": str(trial.path)}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"trial {trial.trial_id}")
            run_id = run.info.run_id
            params = {**self.run_params, **{safe_name(k): json.dumps(v) for k, v in trial.config.items()}}
            from mlflow.entities import Param

            self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            last = 0
        self._runs[trial.trial_id] = (run_id, last)
        return run_id, last

    # Tune's hooks. A tracking failure (a server gone away) is a warning, not the end of the search: the
    # trials' results stay in the Tune experiment and in trials.csv / curves.csv.
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._safely(self.log_result, trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safely(self.finish, trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._safely(self.finish, trial, "FAILED")

    def _safely(self, log: Callable[..., None], *args: Any) -> None:
        try:
            log(*args)
        except Exception as exc:  # noqa: BLE001 - any tracking failure
            print(f"warning: MLflow logging of trial {args[0].trial_id} failed ({type(exc).__name__}: "
                  f"{_first_line(str(exc))})", file=sys.stderr)

    def log_result(self, trial: Any, result: dict) -> None:
        """The validation metrics and mean losses of one report, at its training step (once per step)."""
        from mlflow.entities import Metric

        run_id, last = self.run_of(trial)
        step = int(result["step"])
        if step <= last:
            return
        now = int(time.time() * 1000)
        metrics = [Metric("step", float(step), now, step)]
        metrics += [Metric(f"val/{name}", float(result[name]), now, step) for name in METRIC_MODES if name in result]
        metrics += [Metric(f"loss/{safe_name(key[len('loss_'):])}", float(value), now, step)
                    for key, value in result.items() if key.startswith("loss_")]
        self.client.log_batch(run_id, metrics=metrics)
        if last == 0:
            for key, value in result.items():
                if key.startswith("data_"):
                    self.client.set_tag(run_id, DATA_TAG_PREFIX + key[len("data_"):], str(value))
        self._runs[trial.trial_id] = (run_id, step)

    def finish(self, trial: Any, status: str) -> None:
        run_id, last = self.run_of(trial)
        if status == "FAILED":
            self.client.set_tag(run_id, ERROR_TAG, _first_line(getattr(trial, "error_msg", None) or "failed"))
        else:
            self.client.set_tag(run_id, STOPPED_EARLY_TAG, str(last < self.total_steps).lower())
        self.client.set_terminated(run_id, status)


def _first_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


# ------------------------------------------------------------------------------------------ search state
@dataclass
class SearchRecord:
    parent_run_id: str
    identity: dict[str, Any]


def open_search(config: TuneConfig, out: Path, tracker: Tracker, context: RunContext) -> tuple[SearchRecord, bool]:
    """This search's record and parent run: reused when ``out`` holds the same search (resuming), created
    otherwise. Returns (record, resumed)."""
    identity = search_identity(config)
    path = out / SEARCH_RECORD
    if path.exists():
        stored = json.loads(path.read_text())
        difference = _first_difference(stored["identity"], identity)
        if difference:
            key, old, new = difference
            raise UserError(f"{out} holds a search with other options ({key} is {old!r} there, {new!r} now): re-run "
                            f"with the same options to resume it, or use another --out")
        try:
            tracker.client.update_run(stored["parent_run_id"], status="RUNNING")
        except Exception as exc:  # noqa: BLE001 - deleted run or another store: say which
            raise UserError(f"{path}: its MLflow parent run {stored['parent_run_id']} is not in {tracker.uri} "
                            f"({type(exc).__name__}); use the --mlflow-uri of the first run, or another --out") from exc
        return SearchRecord(stored["parent_run_id"], identity), True
    tags = {ROLE_TAG: SEARCH_ROLE, OUT_TAG: str(out), SEARCH_KEY_TAG: identity_digest(identity),
            GIT_COMMIT_TAG: context.git_commit, "sahn.git_dirty": str(context.git_dirty).lower(),
            "mlflow.source.name": "pipelines.tune", "mlflow.user": context.user}
    run = tracker.client.create_run(tracker.experiment_id, tags=tags,
                                    run_name=f"search {config.method} {parse_dataset(config.dataset).label} "
                                             f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in config_params(to_dict(config)).items()]
    for start in range(0, len(params), 100):
        tracker.client.log_batch(run.info.run_id, params=params[start:start + 100])
    tracker.client.log_text(run.info.run_id, context.pip_freeze, "environment/pip-freeze.txt")
    _write_json(path, {"parent_run_id": run.info.run_id, "identity": identity})
    return SearchRecord(run.info.run_id, identity), False


def trial_run_params(config: TuneConfig) -> dict[str, str]:
    """What every trial of the search shares, as params of its run (the sampled values are added)."""
    shared = {"method": config.method, "dataset": config.dataset, "image_size": config.image_size,
              "metric": config.metric, "method_options": config.method_options, "train": to_dict(config.train),
              "val": to_dict(config.val)}
    return {f"search.{key}": value for key, value in config_params(shared).items()}


@contextlib.contextmanager
def snapshot_period(seconds: float) -> Iterator[None]:
    """Tune saves its state every ``TUNE_GLOBAL_CHECKPOINT_S`` (default ≥ 10 s); a killed driver loses
    what happened since, so a search asks for a shorter period."""
    saved = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S")
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = str(seconds)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TUNE_GLOBAL_CHECKPOINT_S", None)
        else:
            os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = saved


def make_tuner(config: TuneConfig, trainable: Any, experiment: Path, callback: Any) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if config.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=config.search_seed)
    else:  # random and grid: Tune's variant generator (grid_search domains are enumerated)
        searcher = BasicVariantGenerator(random_state=config.search_seed)
    scheduler = ASHAScheduler(time_attr="step", max_t=config.train.steps, grace_period=config.asha.grace_steps,
                              reduction_factor=config.asha.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=param_space(config.space, config.searcher),
        tune_config=tune.TuneConfig(metric=config.metric, mode=METRIC_MODES[config.metric], search_alg=searcher,
                                    scheduler=scheduler, num_samples=config.num_samples,
                                    max_concurrent_trials=config.max_concurrent_trials,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=experiment.name, storage_path=str(experiment.parent),
                                  failure_config=tune.FailureConfig(max_failures=config.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  callbacks=[callback], verbose=config.verbose))


def trial_request(resources: TrialResources) -> dict[str, float]:
    """What a trial's own process asks Ray for: its whole request, or nothing when its workers hold it."""
    if trial_workers(resources) > 1:
        return dict(LAUNCHER_REQUEST)
    return {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial}


def make_trainable(config: TuneConfig, val_manifest: Path) -> Any:
    from ray import tune

    resources = trial_request(config.resources)
    trainable = tune.with_parameters(run_trial, config=config, factory=get_factory(config.method),
                                     val_manifest=str(val_manifest))
    return tune.with_resources(trainable, resources)


# ------------------------------------------------------------------------------------------ results
def trial_tables(grid: Any, config: TuneConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per trial, one row per report) from Tune's results and each trial's last checkpoint."""
    rows, curves = [], []
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_")
        curve = []
        if result.checkpoint is not None:
            curve = json.loads((Path(result.checkpoint.path) / PROGRESS).read_text())["curve"]
        last = curve[-1] if curve else {}
        step = int(last.get("step", 0))
        status = FAILED if result.error else COMPLETED if step >= config.train.steps else STOPPED_EARLY
        params = {name: result.config.get(name) for name in SEARCHED}
        rows.append({"trial_id": trial_id, "status": status, "step": step, **params,
                     **{name: last.get(name, float("nan")) for name in METRIC_MODES},
                     "restored_from_step": (result.metrics or {}).get("restored_from_step", 0),
                     "error": _first_line(str(result.error)) if result.error else ""})
        for report in curve:
            losses = {key: value for key, value in report.items() if key.startswith("loss_")}
            curves.append({"trial_id": trial_id, **params, "step": report["step"],
                           **{name: report.get(name) for name in METRIC_MODES}, **losses})
    return pd.DataFrame(rows), pd.DataFrame(curves)


def choose_best(trials: pd.DataFrame, metric: str) -> pd.Series:
    """The best trial by its last validation value; trials that ran every step come before those
    stopped early (an early value is not comparable with a fully trained one)."""
    scored = trials[(trials["status"] != FAILED) & trials[metric].notna()]
    if scored.empty:
        errors = "; ".join(sorted(set(trials["error"]) - {""})) or "no trial reported a value"
        raise UserError(f"no trial finished with a validation {metric}: {errors}")
    completed = scored[scored["status"] == COMPLETED]
    pool = completed if not completed.empty else scored
    ascending = METRIC_MODES[metric] == "min"
    return pool.sort_values(metric, ascending=ascending, kind="stable").iloc[0]


def best_config_values(config: TuneConfig, best: pd.Series) -> dict[str, Any]:
    """The best trial as a ``pipelines.full_benchmark`` config: its method with the found options."""
    found = {name: float(best[name]) for name in SEARCHED}
    train = {key: value for key, value in to_dict(config.train).items() if key not in ("checkpoint_every", "log_every")}
    return {"out": f"{config.out}-best", "methods": [config.method],
            "data": {"datasets": [config.dataset], "image_size": config.image_size, "train_limit": config.train_limit},
            "train": train, "resources": {"device": config.resources.device},
            "method_options": {config.method: {**config.method_options, **found}}}


def best_config_text(config: TuneConfig, best: pd.Series, values: dict[str, Any]) -> str:
    import yaml

    header = (f"# Best trial of the search in {config.out}: {best['trial_id']}, validation {config.metric} "
              f"{best[config.metric]:.4f} after {int(best['step'])} steps ({best['status']}).\n"
              f"# Validation pairs: the val split of {config.dataset}; the test pairs were not used.\n"
              f"# Run it: python -m pipelines.full_benchmark --config <this file>\n")
    return header + yaml.safe_dump(values, sort_keys=False, default_flow_style=None)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(path, frame.to_csv(index=False, float_format="%.10g").encode())


@dataclass
class SearchOutcome:
    out: Path
    best: pd.Series
    best_config: Path
    trials: pd.DataFrame
    parent_run_id: str
    resumed: bool


def is_unfinished(grid: Any, config: TuneConfig) -> bool:
    """True when Tune returned before every trial ended (Ctrl-C: its state is saved for resuming)."""
    return len(grid) < expected_trials(config) or grid.num_terminated + grid.num_errors < len(grid)


def run_search(config: TuneConfig) -> SearchOutcome:
    """The whole search for a parsed config (a Ray connection is made or reused)."""
    from ray import tune

    from bench.distributed import ray_cluster

    started = time.perf_counter()
    config = absolute_paths(config)
    check_config(config)
    get_factory(config.method)  # an unknown method fails before any work
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker.open(resolve_uri(config.tracking.mlflow_uri, out), config.tracking.experiment)
    context = RunContext.collect()
    # Ray's checks of a cell's request, for a trial's: a trial with workers also needs room for all of them.
    with ray_cluster(trial_resource_config(config.resources), log_to_driver=config.verbose > 0):
        manifest = build_validation_pairs(config, out)
        record, resumed = open_search(config, out, tracker, context)
        print(f"mlflow: experiment {tracker.experiment_name!r} in {tracker.uri}, parent run {record.parent_run_id}")
        print(f"validation: {len(manifest.pairs)} pairs from the val split of {config.dataset} in {manifest.out_dir}")
        experiment = out / EXPERIMENT_FOLDER
        trainable = make_trainable(config, manifest.out_dir)
        try:
            if tune.Tuner.can_restore(str(experiment)):
                print(f"resuming the search in {experiment}")
                tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
            else:
                logger = TrialRuns(tracker.uri, tracker.experiment_id, record.parent_run_id, trial_run_params(config),
                                   config.train.steps, context.git_commit)
                tuner = make_tuner(config, trainable, experiment, logger)
            with snapshot_period(config.snapshot_seconds):
                grid = tuner.fit()
            if is_unfinished(grid, config):
                raise KeyboardInterrupt
            if trial_workers(config.resources) > 1:  # trials ASHA stopped mid-chunk may have left their files
                for trial in experiment.glob(trial_folder_name("*")):
                    remove_worker_scratch(trial)
            trials, curves = trial_tables(grid, config)
            write_csv(trials, out / TRIALS_CSV)
            write_csv(curves, out / CURVES_CSV)
            close_trial_runs(tracker, record.parent_run_id, trials)
            best = choose_best(trials, config.metric)
            values = best_config_values(config, best)
            best_path = out / BEST_CONFIG
            text = best_config_text(config, best, values)
            atomic_write_bytes(best_path, text.encode())
            from reports.sensitivity import sensitivity_figure

            figures = sensitivity_figure(trials, config.metric, out / SENSITIVITY)
        except KeyboardInterrupt:
            _close_parent(tracker, record.parent_run_id, "KILLED")
            raise
        except BaseException:
            _close_parent(tracker, record.parent_run_id, "FAILED")
            raise
    wall = time.perf_counter() - started
    finish_parent(tracker, record.parent_run_id, config.metric, best, trials, wall,
                  [best_path, out / TRIALS_CSV, out / CURVES_CSV, *figures])
    print(text, end="")
    print(f"best config written to {best_path}")
    print(f"trials: {out / TRIALS_CSV}   sensitivity figure: {figures[0] if figures else 'none'}")
    print(f"benchmark it: python -m pipelines.full_benchmark --config {best_path}")
    print(f"wall time: {wall:.1f}s")
    return SearchOutcome(out, best, best_path, trials, record.parent_run_id, resumed)


def close_trial_runs(tracker: Tracker, parent_run_id: str, trials: pd.DataFrame) -> None:
    """Give every trial run its final status (a driver killed between a trial's end and its callback
    leaves the run RUNNING)."""
    statuses = dict(zip(trials["trial_id"], trials["status"]))
    for run in search_runs(tracker.client, tracker.experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}'"):
        status = statuses.get(run.data.tags.get(TRIAL_ID_TAG))
        if status is None or run.info.status != "RUNNING":
            continue
        tracker.client.set_tag(run.info.run_id, STOPPED_EARLY_TAG, str(status == STOPPED_EARLY).lower())
        tracker.client.set_terminated(run.info.run_id, "FAILED" if status == FAILED else "FINISHED")


def finish_parent(tracker: Tracker, parent_run_id: str, metric: str, best: pd.Series, trials: pd.DataFrame,
                  wall: float, artifacts: Sequence[Path]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    counts = trials["status"].value_counts()
    values = {f"best/{metric}": float(best[metric]), "wall_seconds": wall, "trials": float(len(trials)),
              **{f"trials_{status}": float(counts.get(status, 0)) for status in (COMPLETED, STOPPED_EARLY, FAILED)}}
    tracker.client.log_batch(parent_run_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()])
    tracker.client.set_tag(parent_run_id, "sahn.best_trial", str(best["trial_id"]))
    for path in artifacts:
        if path.exists():
            tracker.client.log_artifact(parent_run_id, str(path))
    tracker.client.set_terminated(parent_run_id, "FINISHED")


def _close_parent(tracker: Tracker, run_id: str, status: str) -> None:
    try:
        tracker.client.set_terminated(run_id, status)
    except Exception:  # noqa: BLE001 - never hide the original error behind a tracking error
        pass


def main(argv: Sequence[str] | None = None) -> SearchOutcome:
    return run_search(parse_config(TuneConfig, argv, presets=PRESETS, default_preset="default",
                                   description=__doc__))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
