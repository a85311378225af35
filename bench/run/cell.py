"""One benchmark cell (method × dataset × seed): train if the method trains, then evaluate on the frozen
manifest. The same functions run in-process or as Ray tasks; each is idempotent (a finished cell is
read back, an unfinished training resumes from its checkpoint, a finished shard is kept).

A cell in one piece is :func:`run_cell`: train, evaluate every pair, write. A cell whose pairs are split
into shards (:mod:`bench.run.shards`) runs as :func:`train_cell` (once, first), :func:`evaluate_shard` (once per
shard, anywhere, in any order: each loads the trained weights from ``model.pt`` or the published ones) and
:func:`finish_cell` (merge, ``cell.json``); the ground truths' features are computed before the shards, once per
manifest (:func:`prepare_ground_truth`), so merging needs no metric network. Files of a cell folder:

  trained.json   training is finished (or there was none): whether the weights are ``model.pt``, how long
  model.pt       the trained weights; losses.csv the loss curves; train_state.pt the resumable checkpoint
  shards/        the shards' results until they are merged
  cell.json      the record, written last: the cell is finished
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import pandas as pd
import torch

from bench.weights import PublishedWeights, verify_unchanged
from bench import devices
from bench.config import BenchmarkConfig, TrainConfig
from bench.run.data_parallel import SINGLE, Ranks
from bench.data.datasets import load_image_set
from bench.run.evaluate import (FEATURES_FORMAT, ScoredBatch, cached_ground_truth_features, ground_truth_features,
                                scored_batches, write_csv_atomic, write_results)
from bench.run.ray_train import RUN_FOLDER, remove_run_folder, run_on_workers
from bench.run.resources import training_workers, worker_resources
from bench.data.manifest import PROTOCOL_VERSION, Manifest, load_manifest
from bench.errors import UserError
from bench.files import atomic_write_text
from bench.methods import InpaintingMethod, apply_overrides, create_method, get_factory
from bench.metrics.scoring import Scorer
from bench.run.shards import (Shard, automatic_shard_pairs, finished_shard_size, merge_shards, read_shard_done, remove_shards,
                          shard_layout, shards_seconds, write_shard_done, write_shard_files)

T = TypeVar("T")

EMBEDDED_SUITES = ("faces", "scenes", "facades")
DONE_FILE = "cell.json"
TRAINED_FILE = "trained.json"
STARTED_FILE = "started.json"


@dataclass(frozen=True)
class DatasetRef:
    label: str  # name used in results and reports
    kind: str  # faces | scenes | facades | celeba | paris | places2 | folder
    root: str | None


def parse_dataset(entry: str) -> DatasetRef:
    """``faces`` or ``KIND:PATH`` (``celeba:/data/celeba``, ``folder:~/photos``)."""
    kind, _, root = entry.partition(":")
    kind = kind.strip().lower()
    if not root:
        return DatasetRef(kind, kind, None)
    root = os.path.abspath(os.path.expanduser(root))
    label = f"folder-{Path(root).name}" if kind == "folder" else kind
    return DatasetRef(label, kind, root)


@dataclass(frozen=True)
class CellSpec:
    method: str
    dataset: str  # the config's dataset entry (``faces``, ``celeba:/data/celeba``)
    seed: int
    cell_dir: str  # absolute
    manifest_dir: str  # absolute
    weights: PublishedWeights | None = None  # the checkpoint the cell loads (checked by the driver)

    @property
    def key(self) -> str:
        return f"{parse_dataset(self.dataset).label}/{self.method}/seed{self.seed}"


@functools.lru_cache(maxsize=4)
def cached_scorer(device: str, inception_path: str | None, lpips_path: str | None, compile_metrics: bool) -> Scorer:
    """One scorer per worker process: its networks load once, not once per cell."""
    return Scorer(device=torch.device(device), inception_path=inception_path, lpips_trunk_path=lpips_path,
                  compile_pixel_metrics=compile_metrics)


def resolve_device(name: str, *, gpus_per_cell: float | None = None) -> torch.device:
    """The device a cell runs on, from its own request (:func:`bench.devices.resolve_device`): ``auto`` is the
    CPU when it asks for no GPU, under Ray and with --serial alike; under Ray ``cuda:N`` is its N-th own GPU."""
    return devices.resolve_device(name, gpus_per_cell=gpus_per_cell)


def cell_train_config(config: BenchmarkConfig, cell: CellSpec) -> TrainConfig:
    overrides = dict(config.train_options.get(cell.method, {}))
    return apply_overrides(dataclasses.replace(config.train, seed=cell.seed), overrides)


def cell_fingerprint(config: BenchmarkConfig, cell: CellSpec) -> str:
    """Digest of every option that changes a cell's numbers, so stale results are never reused."""
    train = dataclasses.asdict(cell_train_config(config, cell))
    if not train["finetune"]:  # a field added later: absent when unset, so earlier results keep their fingerprints
        del train["finetune"]
    relevant = {"method": cell.method, "options": config.method_options.get(cell.method, {}),
                "train": train, "dataset": cell.dataset,
                "image_size": config.data.image_size, "train_limit": config.data.train_limit,
                "manifest": cell.manifest_dir, "inception": config.inception_weights, "lpips": config.lpips_weights}
    if config.compile_metrics:  # only when set, so results of earlier runs keep their fingerprints
        relevant["compile_metrics"] = True
    if config.resources.deterministic:  # only when set, like compile_metrics
        relevant["deterministic"] = True
    if cell.weights is not None:  # the bytes, not the path: a replaced file never reuses old results
        relevant["weights_sha256"] = cell.weights.sha256
    if training_workers(config.resources) > 1:  # only when set: N workers draw other noise than one process
        relevant["train_workers"] = training_workers(config.resources)
    if config.resources.precision != "fp32":  # only when set, like compile_metrics
        relevant["precision"] = config.resources.precision
    memory_format = devices.resolve_memory_format(config.resources.memory_format, devices.requested_device_type(
        config.resources.device, config.resources.gpus_per_cell), config.resources.precision)
    if memory_format != "contiguous":  # only when not the layout every earlier run had, like precision
        relevant["memory_format"] = memory_format
    if cell_device_type(config) == "cuda":  # CPU cells have no TF32: their fingerprints stay as they were
        relevant["tf32"] = "on" if devices.tf32_enabled(config.resources.tf32) else "off"
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_device_type(config: BenchmarkConfig) -> str:
    """``cpu`` or ``cuda``: what the cell's request makes it run on, known before it runs."""
    return devices.requested_device_type(config.resources.device, config.resources.gpus_per_cell)


def read_done(cell_dir: str | os.PathLike) -> dict[str, Any] | None:
    return read_json(Path(cell_dir) / DONE_FILE)


def write_json_atomic(data: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def cell_device(config: BenchmarkConfig) -> torch.device:
    """The device of a task running this cell in one process (with several training workers: an evaluation
    task, which has one worker's share of the request)."""
    resources = worker_resources(config.resources)
    return resolve_device(resources.device, gpus_per_cell=resources.gpus_per_cell)


def cell_scorer(config: BenchmarkConfig, device: torch.device) -> Scorer:
    return cached_scorer(str(device), config.inception_weights, config.lpips_weights, config.compile_metrics)


def check_fingerprint(config: BenchmarkConfig, cell: CellSpec) -> dict[str, Any] | None:
    """The cell's record when it is finished (made with the same options), else None. A cell folder holding
    finished or unfinished work (a training checkpoint, shards) made with other options is refused: resuming
    it would mix the two."""
    fingerprint = cell_fingerprint(config, cell)
    done = read_done(cell.cell_dir)
    recorded = done if done is not None else read_json(Path(cell.cell_dir) / STARTED_FILE)
    if recorded is not None and recorded.get("fingerprint", fingerprint) != fingerprint:
        state = "results" if done is not None else "unfinished work"
        raise UserError(f"{cell.cell_dir} holds {state} made with other options; use a new --out or delete that "
                        "folder")
    return done


def cell_shards(config: BenchmarkConfig, cell: CellSpec) -> list[Shard]:
    """The shards of a cell run alone in this process (--serial): ``--eval-shard-pairs``, or one piece."""
    return plan_cell_shards(config, [cell], slots=1)[cell]


def plan_cell_shards(config: BenchmarkConfig, cells: list[CellSpec], slots: int) -> dict[CellSpec, list[Shard]]:
    """The shards of every cell: ``--eval-shard-pairs`` pairs each, or with 0 the automatic size for ``slots``
    cells at once (:func:`bench.run.shards.automatic_shard_pairs`) — except that a cell an earlier run sharded keeps
    its layout. Pair counts come from the frozen manifests."""
    counts: dict[str, int] = {}
    for cell in cells:
        if cell.manifest_dir not in counts:
            counts[cell.manifest_dir] = len(load_manifest(cell.manifest_dir).pairs)
    pairs = {cell: counts[cell.manifest_dir] for cell in cells}
    size = config.eval_shard_pairs or automatic_shard_pairs(list(pairs.values()), slots)
    layouts = {}
    for cell in cells:
        kept = None if config.eval_shard_pairs else finished_shard_size(cell.cell_dir, pairs[cell], config.eval_batch_size)
        layouts[cell] = shard_layout(pairs[cell], config.eval_batch_size, kept or size)
    return layouts


def cell_method(config: BenchmarkConfig, cell: CellSpec, device: torch.device, trained: bool) -> InpaintingMethod:
    """The cell's method as it evaluates: created with the cell's seed (weight initialisation is part of the
    seeded config), then its trained weights (``model.pt``) or its published ones loaded."""
    torch.manual_seed(cell.seed)
    method = create_method(cell.method, **config.method_options.get(cell.method, {}))
    if trained:
        method.load(Path(cell.cell_dir) / "model.pt")
    elif cell.weights is not None:
        method.load(cell.weights.path)
        verify_unchanged(cell.weights, method.loaded_checkpoint.files)
    method.to(device)
    method.set_memory_format(devices.resolve_memory_format(config.resources.memory_format, device,
                                                           config.resources.precision))
    return method


def train_and_save(config: BenchmarkConfig, cell: CellSpec, device: torch.device, *, ranks: Ranks = SINGLE,
                   progress: bool = True, on_step: Callable[[int, dict[str, Any]], None] | None = None
                   ) -> InpaintingMethod:
    """Create the cell's method on ``device`` (its published weights loaded when it fine-tunes them) and, if it
    trains, train it from (or resuming at) ``train_state.pt``; rank 0 then writes ``losses.csv`` and ``model.pt``.
    Several ``ranks`` (Ray Train workers, :mod:`bench.run.ray_train`) each run this with their own rank."""
    method = cell_method(config, cell, device, trained=False)
    if not method.trainable:
        return method
    from bench.run.train import train  # imported here: classical-only runs never touch the training stack

    cell_dir = Path(cell.cell_dir)
    dataset = parse_dataset(cell.dataset)
    train_set = load_image_set(dataset.kind, "train", root=dataset.root, image_size=config.data.image_size,
                               limit=config.data.train_limit, cache_dir=config.data.cache_dir)
    with devices.cuda_tf32(device, devices.tf32_enabled(config.resources.tf32)):
        result = train(method, train_set, cell_train_config(config, cell), checkpoint_path=cell_dir / "train_state.pt",
                       on_step=on_step, progress=progress, description=f"train {cell.key}",
                       data_workers=config.resources.data_workers, precision=config.resources.precision,
                       ranks=ranks, sync_batch_norm=config.resources.sync_batch_norm)
    if ranks.leader:
        write_csv_atomic(pd.DataFrame(result.history), cell_dir / "losses.csv")
        method.save(cell_dir / "model.pt")
    return method


def cell_trains(config: BenchmarkConfig, cell: CellSpec) -> bool:
    """Whether the cell trains its method (else it evaluates the method as created, or its published weights)."""
    train_config = cell_train_config(config, cell)
    return (train_config.steps > 0 and (cell.weights is None or train_config.finetune)
            and getattr(get_factory(cell.method), "trainable", True))


def check_batch_split(config: BenchmarkConfig, cells: Sequence[CellSpec]) -> None:
    """On the driver, before any task: refuse a training batch that the cells' workers cannot split evenly (a
    worker would raise it only after Ray Train had started them all)."""
    workers = training_workers(config.resources)
    if workers == 1:
        return
    for cell in cells:
        if cell_trains(config, cell):
            Ranks(size=workers).share(cell_train_config(config, cell).batch_size)


def train_on_workers(config: BenchmarkConfig, cell: CellSpec, factories: dict[str, Callable],
                     on_step: Callable[[int, dict[str, Any]], None] | None = None) -> None:
    """Train ``cell`` in its workers and return when rank 0 has written ``model.pt`` and ``losses.csv``.
    ``factories``: the method constructors the workers register (methods registered in the driver only)."""
    import ray

    if not ray.is_initialized():
        raise UserError(f"{cell.key} trains in {training_workers(config.resources)} workers under Ray Train, "
                        "which needs Ray: run without --serial")
    train_rank = functools.partial(train_and_save, config, cell, progress=False, on_step=on_step)
    run_on_workers(train_rank, config.resources, factories, name=cell.key.replace("/", "-"),
                   folder=Path(cell.cell_dir) / RUN_FOLDER)


def train_cell(config: BenchmarkConfig, cell: CellSpec, *, progress: bool = True,
               on_step: Callable[[int, dict[str, Any]], None] | None = None,
               factories: dict[str, Callable] | None = None) -> tuple[InpaintingMethod | None, dict[str, Any]]:
    """Train the cell's method if it trains, once: ``trained.json`` says it is done. Returns the method when it
    was made here (trained, or as created/loaded: ready to evaluate) and the training record. A cell with
    several training workers trains under Ray Train (:mod:`bench.run.ray_train`; ``factories``: the constructors
    its workers register) and returns no method: its evaluation loads ``model.pt`` in tasks of its own."""
    cell_dir = Path(cell.cell_dir)
    training = read_json(cell_dir / TRAINED_FILE)
    if training is not None:
        return None, training
    cell_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"fingerprint": cell_fingerprint(config, cell)}, cell_dir / STARTED_FILE)
    trains = cell_trains(config, cell)
    workers = training_workers(config.resources)
    method, trained, started = None, False, time.perf_counter()
    if trains and workers > 1:
        train_on_workers(config, cell, factories or {cell.method: get_factory(cell.method)}, on_step)
        trained = (cell_dir / "model.pt").exists()  # written by rank 0 unless the method had nothing to train
    elif trains:
        method = train_and_save(config, cell, cell_device(config), progress=progress, on_step=on_step)
        trained = method.trainable
    training = {"trained": trained, "train_seconds": round(time.perf_counter() - started if trains else 0.0, 3)}
    if trained and workers > 1:
        training["train_workers"] = workers
    write_json_atomic(training, cell_dir / TRAINED_FILE)
    return method, training


def _evaluate_piece(config: BenchmarkConfig, cell: CellSpec, method: InpaintingMethod, manifest: Manifest,
                    shard: Shard, write: Callable[[Iterator[ScoredBatch]], T], *, progress: bool,
                    on_pairs: Callable[[int], None] | None) -> tuple[T, dict[str, Any]]:
    """Evaluate the pairs of ``shard``, handing the scored batches to ``write`` as they come (so a piece's rows
    and features are never in memory at once); returns what ``write`` returned and what the cell record needs
    from this process."""
    device = method.device
    scorer = cell_scorer(config, device)
    whole = shard.pairs == len(manifest.pairs)
    with devices.cuda_tf32(device, devices.tf32_enabled(config.resources.tf32)) as tf32:
        written = write(scored_batches(method, manifest, scorer, start=shard.start, stop=shard.stop,
                                       batch_size=config.eval_batch_size, save_images=config.save_images,
                                       image_dir=Path(cell.cell_dir) / "images",
                                       data_workers=config.resources.data_workers,
                                       precision=config.resources.precision, on_pairs=on_pairs, progress=progress,
                                       description=f"eval {cell.key}" if whole else f"eval {cell.key} {shard.name}"))
    record = {
        "method": {"paper_name": method.paper_name, "num_parameters": method.num_parameters(),
                   "substitutions": dict(method.substitutions),
                   "pretrained": dict(getattr(method, "pretrained", {}) or {}), "method_config": method.config_dict()},
        "device": devices.device_record(device, gpus_per_cell=worker_resources(config.resources).gpus_per_cell,
                                        deterministic=config.resources.deterministic),
        "metric_networks": scorer.provenance(), "pixel_metrics": scorer.pixel_metrics_backend(device),
        "feature_key": scorer.feature_key(device), "batch_size": config.eval_batch_size,
        "precision": config.resources.precision, "data_workers": config.resources.data_workers,
        "memory_format": method.memory_format,
    }
    if tf32 is not None:  # read back from torch while the methods ran: a CUDA cell's TF32 state
        record["tf32"] = tf32
    return written, record


def evaluate_shard(config: BenchmarkConfig, cell: CellSpec, shard: Shard, *, progress: bool = True,
                   on_pairs: Callable[[int], None] | None = None, method: InpaintingMethod | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate one shard of a trained cell into its folder (a finished shard is read back); returns its record
    (plus ``extra``). ``method``: the cell's method when the caller has it already (in-process runs)."""
    done = read_shard_done(cell.cell_dir, shard)
    if done is not None:  # a shard of an earlier storage format is evaluated again, not merged with others
        if done.get("batch_size") == config.eval_batch_size and done.get("features_format") == FEATURES_FORMAT:
            return done
    training = read_json(Path(cell.cell_dir) / TRAINED_FILE)
    if training is None:
        raise RuntimeError(f"{cell.key}: shard {shard.name} started before the cell's training finished")
    if method is None:
        method = cell_method(config, cell, cell_device(config), training["trained"])
    manifest = load_manifest(cell.manifest_dir)
    written, record = _evaluate_piece(config, cell, method, manifest, shard,
                                      lambda batches: write_shard_files(cell.cell_dir, shard, batches),
                                      progress=progress, on_pairs=on_pairs)
    return write_shard_done(cell.cell_dir, shard, written.seconds, {**record, **(extra or {})})


def cell_record(config: BenchmarkConfig, cell: CellSpec, manifest: Manifest, training: dict[str, Any],
                pieces: list[dict[str, Any]], eval_seconds: float) -> dict[str, Any]:
    """``cell.json``: what ran, on what, with which networks, how long."""
    first = pieces[0]
    train_config = cell_train_config(config, cell)
    trained = training["trained"]
    record = {
        "method": cell.method, "paper_name": first["method"]["paper_name"],
        "dataset": parse_dataset(cell.dataset).label, "dataset_entry": cell.dataset, "seed": cell.seed,
        **first["device"], "protocol": PROTOCOL_VERSION, "manifest_digest": manifest.digest(),
        "fingerprint": cell_fingerprint(config, cell),
        "num_parameters": first["method"]["num_parameters"], "substitutions": first["method"]["substitutions"],
        "pretrained": first["method"]["pretrained"], "metric_networks": first["metric_networks"],
        "pixel_metrics": first["pixel_metrics"], "method_config": first["method"]["method_config"],
        "train": dataclasses.asdict(train_config) if trained else None,
        "weights": cell.weights.record(train_config.steps if trained else None) if cell.weights else None,
        "train_seconds": training["train_seconds"], "eval_seconds": round(eval_seconds, 3),
        "pairs": len(manifest.pairs), "precision": config.resources.precision,
        "memory_format": first.get("memory_format", "contiguous"),  # shards finished before the field: contiguous
        "train_workers": training.get("train_workers", 1) if trained else None,
        "data_workers": config.resources.data_workers, "features_format": FEATURES_FORMAT,
    }
    if "tf32" in first:  # CUDA cells only, like their fingerprint
        record["tf32"] = first["tf32"]
    if len(pieces) > 1:  # one line per shard: where it ran and how long it took
        record["eval_shards"] = [{"pairs": [piece["start"], piece["stop"]], "seconds": piece["seconds"],
                                  "device": piece["device"]["device"], "gpu_ids": piece["device"]["gpu_ids"],
                                  "node_id": piece.get("node_id")} for piece in pieces]
    return record


def prepare_ground_truth(config: BenchmarkConfig, cell: CellSpec) -> str:
    """Compute the ground truths' features of the cell's manifest on the cell's evaluation device, unless the
    manifest's cache for that key exists; returns the cache's file name. Run before a sharded cell's shards, once
    per manifest, so that the merge needs no metric network (nor a GPU)."""
    device = cell_device(config)
    manifest = load_manifest(cell.manifest_dir)
    truth = ground_truth_features(manifest, cell_scorer(config, device), config.eval_batch_size, device,
                                  config.resources.data_workers)
    return truth.path.name


def finish_cell(config: BenchmarkConfig, cell: CellSpec, shards: list[Shard], *,
                compute_ground_truth: bool = True) -> dict[str, Any]:
    """Merge a sharded cell's finished shards into its per_image.csv, features.npz and summary.csv, then write
    cell.json (last) and drop the shards. Needs a metric network only if the ground-truth cache is missing and
    ``compute_ground_truth`` (a Ray finishing task holds no GPU: :func:`prepare_ground_truth` ran before it)."""
    done = check_fingerprint(config, cell)
    if done is not None:
        return done
    started = time.perf_counter()
    cell_dir = Path(cell.cell_dir)
    manifest = load_manifest(cell.manifest_dir)
    pieces = [read_shard_done(cell_dir, shard) for shard in shards]
    if any(piece is None for piece in pieces):
        raise RuntimeError(f"{cell_dir}: a shard is not finished")
    key = json.dumps(pieces[0]["feature_key"], sort_keys=True)
    truth = cached_ground_truth_features(manifest, key)
    if truth is None and not compute_ground_truth:
        raise RuntimeError(f"{cell.key}: the manifest's ground-truth features for the shards' key are missing "
                           f"beside {manifest.out_dir} (they are computed before the shards)")
    if truth is None:
        device = cell_device(config)
        truth = ground_truth_features(manifest, cell_scorer(config, device), config.eval_batch_size, device,
                                      config.resources.data_workers)
    merge_shards(cell_dir, shards, len(manifest.pairs), truth)
    merge_seconds = time.perf_counter() - started
    record = cell_record(config, cell, manifest, read_json(cell_dir / TRAINED_FILE), pieces,
                         shards_seconds(cell_dir, shards) + merge_seconds)
    write_json_atomic(record, cell_dir / DONE_FILE)
    _tidy(cell_dir)
    return record


def _tidy(cell_dir: Path) -> None:
    """After cell.json: the final weights are in model.pt, the results in the cell's own files. Temporary files
    that a killed attempt left (a partial per_image.csv is written for as long as the evaluation runs) go too:
    once cell.json exists nothing writes to the cell any more."""
    for stale in cell_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    (cell_dir / "train_state.pt").unlink(missing_ok=True)
    (cell_dir / TRAINED_FILE).unlink(missing_ok=True)
    (cell_dir / STARTED_FILE).unlink(missing_ok=True)
    remove_shards(cell_dir)
    remove_run_folder(cell_dir)


def run_cell(config: BenchmarkConfig, cell: CellSpec, *, progress: bool = True,
             on_step: Callable[[int, dict[str, float]], None] | None = None,
             on_pairs: Callable[[int], None] | None = None, shards: list[Shard] | None = None) -> dict[str, Any]:
    """Run (or read back) one cell in this process; returns the record written to ``cell.json``. ``shards``
    (default: ``--eval-shard-pairs``, 0 = one piece) is the layout of its evaluation: a cell in several shards
    writes each one to its folder (resumable) and merges them, with the same files as one piece."""
    done = check_fingerprint(config, cell)
    if done is not None:
        return done
    cell_dir = Path(cell.cell_dir)
    manifest = load_manifest(cell.manifest_dir)
    shards = shards if shards is not None else cell_shards(config, cell)
    method, training = train_cell(config, cell, progress=progress, on_step=on_step)
    if method is None:
        method = cell_method(config, cell, cell_device(config), training["trained"])
    if len(shards) > 1:
        for shard in shards:
            evaluate_shard(config, cell, shard, progress=progress, method=method,
                           on_pairs=None if on_pairs is None else lambda done, s=shard: on_pairs(s.start + done))
        return finish_cell(config, cell, shards)

    started = time.perf_counter()  # one piece: straight into the cell's files
    truth = ground_truth_features(manifest, cell_scorer(config, method.device), config.eval_batch_size,
                                  method.device, config.resources.data_workers)
    _, piece = _evaluate_piece(config, cell, method, manifest, shards[0],
                               lambda batches: write_results(cell_dir, batches, truth), progress=progress,
                               on_pairs=on_pairs)
    record = cell_record(config, cell, manifest, training, [piece], time.perf_counter() - started)
    write_json_atomic(record, cell_dir / DONE_FILE)
    _tidy(cell_dir)
    return record
