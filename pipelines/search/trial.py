"""One trial of a search: its method trained in chunks (in its process, or data-parallel in Ray Train workers
as a benchmark cell's), the validation pairs scored after each chunk as a benchmark cell scores its test pairs,
each report checkpointed for Ray Tune; and the frozen validation pairs themselves."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from bench.run.cell import parse_dataset, resolve_device
from bench.config import TrainConfig
from bench.run.data_parallel import Ranks
from bench.data.datasets import load_image_set
from bench.errors import UserError
from bench.files import atomic_write_bytes
from bench.data.manifest import Manifest, build_manifest, load_manifest
from bench.methods import create_method, get_factory, register_method
from bench.checkpoint_format import safe_torch_load
from bench.run.ray_train import RUN_FOLDER, run_on_workers
from pipelines.search.options import (EXPERIMENT_FOLDER, PROGRESS, SCORES, TRAIN_STATE, VAL_MANIFEST_FOLDER,
                                      VALIDATION_METRICS, WORKERS_FOLDER, TuneConfig, trial_request,
                                      trial_resource_config, trial_workers)
from pipelines.shared import mask_protocol


# ------------------------------------------------------------------------------------------ validation pairs
def build_validation_pairs(config: TuneConfig, out: Path) -> Manifest:
    """Freeze the validation pairs from the dataset's ``val`` split (the only split scored here)."""
    dataset = parse_dataset(config.dataset)
    try:
        val_set = load_image_set(dataset.kind, "val", root=dataset.root, image_size=config.image_size,
                                 limit=config.val.limit, cache_dir=config.cache_dir)
    except UserError as exc:
        raise UserError(f"{exc} — the search scores trials on a validation split, never on test images") from exc
    return build_manifest(val_set, mask_protocol(config.val, source="freeform"), out / VAL_MANIFEST_FOLDER)


def load_validation_pairs(manifest_dir: str | os.PathLike) -> Manifest:
    """The frozen validation pairs; a manifest of any other split is refused."""
    manifest = load_manifest(manifest_dir)
    split = manifest.record["dataset"].get("split")
    if split != "val":
        raise UserError(f"{manifest_dir}: holds pairs of the {split!r} split; a search scores the 'val' split only")
    return manifest


def validation_scores(method: Any, manifest: Manifest, batch_size: int) -> dict[str, float]:
    """The mean of each validation metric over the validation pairs, scored as a benchmark cell scores its test
    pairs (:func:`bench.run.evaluate.evaluate_pairs`: composite quantised once, metrics on uint8) and averaged as its
    ``All`` bin is (:func:`bench.metrics.aggregate.summarize`)."""
    from bench.metrics.aggregate import summarize
    from bench.run.evaluate import evaluate_pairs
    from bench.data.masks import ALL_BIN
    from bench.metrics.scoring import Scorer

    results = evaluate_pairs(method, manifest, Scorer(networks=False), batch_size=batch_size, save_images="none",
                             progress=False)
    summary = summarize(results.per_image, bins=(ALL_BIN,), metrics=VALIDATION_METRICS)
    return dict(zip(summary["metric"], summary["value"]))


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


def write_json(path: Path, data: Any) -> None:
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

    from bench.run.train import train

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
    method = trial_method(config, params, device) if device else None
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
            write_json(work / PROGRESS, {"step": target, "curve": curve})
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


def trial_method(config: TuneConfig, params: dict[str, Any], device: Any) -> Any:
    """The trial's method with its sampled ``params``, on ``device``; seeded, as weight initialisation is part of
    the seeded config."""
    import torch

    torch.manual_seed(config.train.seed)
    return create_method(config.method, **config.method_options, **params).to(device)


def train_chunk_on_workers(params: dict[str, Any], chunk: TrainConfig, work: Path, *, config: TuneConfig,
                           factory: Callable, val_manifest: str) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Train one chunk in the trial's Ray Train workers (the path a benchmark cell's workers take,
    :func:`bench.run.ray_train.run_on_workers`), from (or resuming at) ``work/train_state.pt``; rank 0 then scores the
    validation pairs on its own device (a GPU when the trial has them). Returns the training history rank 0 wrote
    with the state (one row per logged step) and the scores."""
    train_rank = functools.partial(_train_chunk_rank, config=config, params=params, chunk=chunk, work=work,
                                   val_manifest=val_manifest)
    run_on_workers(train_rank, trial_resource_config(config.resources), {config.method: factory},
                   name=f"steps-{chunk.steps}", folder=work.parent / RUN_FOLDER)
    scores = json.loads((work / SCORES).read_text())
    return safe_torch_load(work / TRAIN_STATE)["history"], scores


def _train_chunk_rank(device: Any, *, ranks: Ranks, config: TuneConfig, params: dict[str, Any], chunk: TrainConfig,
                      work: Path, val_manifest: str) -> None:
    """One worker's part of a chunk: the training at its rank, with the method created as :func:`run_trial`
    creates it; rank 0 scores the result."""
    from bench.run.train import train

    train_set = training_images(config)
    method = trial_method(config, params, device)
    train(method, train_set, chunk, checkpoint_path=work / TRAIN_STATE, progress=False, ranks=ranks)
    if ranks.leader:
        scores = validation_scores(method, load_validation_pairs(val_manifest), config.val.batch_size)
        write_json(work / SCORES, scores)


def trial_folder_name(trial_id: str) -> str:
    return f"trial_{trial_id}"


def trial_dirname(trial: Any) -> str:
    """Short, stable trial folders (Tune's default name holds every sampled value)."""
    return trial_folder_name(trial.trial_id)


def make_trainable(config: TuneConfig, val_manifest: Path) -> Any:
    from ray import tune

    resources = trial_request(config.resources)
    trainable = tune.with_parameters(run_trial, config=config, factory=get_factory(config.method),
                                     val_manifest=str(val_manifest))
    return tune.with_resources(trainable, resources)
