"""The main job: benchmark every registered method on the frozen test pairs of each dataset.

    python -m pipelines.full_benchmark                      # default preset: embedded suites, tiny variants
    python -m pipelines.full_benchmark --config paper --datasets celeba:/data/celeba paris:/data/paris
    python -m pipelines.full_benchmark --datasets folder:~/photos --source nvidia --folder ~/masks
    python -m pipelines.full_benchmark --ray-address auto --mlflow-uri http://mlflow-host:5000
    python -m pipelines.full_benchmark --config paper --plan   # cells, pairs, shards, GPU-hours: runs nothing

Stages: (1) check the MLflow store and the Ray cluster, build the image sets and freeze each dataset's
test manifest before any method runs, (2) run one cell per method × dataset × seed (train, then
evaluate) as Ray tasks — or in this process with --serial — logging each finished cell to MLflow,
(3) rebuild the report. Re-running the same command skips finished cells and resumes unfinished
training from its last checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from bench.run import distributed
from bench.run.cell import CellSpec, parse_dataset, read_done, run_cell
from bench.weights import PublishedWeights, absolute_weights, check_published_weights
from bench.cli import parse_config, run_main
from bench.config import BenchmarkConfig, to_dict
from bench.data.datasets import load_image_set, write_split_manifest
from bench.run.distributed import CellOutcome
from bench.errors import UserError
from bench.files import atomic_write_bytes
from bench.data.manifest import build_manifest
from bench.run.resources import cell_threads, check_feasible, cluster_slots, torch_threads, training_workers, worker_resources
from bench.methods import apply_overrides, create_method, get_factory, has_tags, select_methods
from bench.run.tracking import Tracker, resolve_uri
from pipelines.shared import absolute_dataset, absolute_path, mask_protocol

PRESETS = Path(__file__).parent / "presets" / "benchmark"


@dataclass
class Plan:
    config: BenchmarkConfig
    out: Path
    methods: list[str]
    cells: list[CellSpec]
    dataset_digests: dict[str, str] = field(default_factory=dict)  # label → digest of the test images
    weights: dict[tuple[str, str], PublishedWeights] = field(default_factory=dict)  # (method, label) → checkpoint


def cell_dir(out: Path, label: str, method: str, seed: int, seeds: Sequence[int]) -> Path:
    base = out / label / method
    return base if len(seeds) == 1 else base / f"seed{seed}"


def absolute_paths(config: BenchmarkConfig) -> BenchmarkConfig:
    """Every path in the config made absolute, so it means the same in every Ray worker (whose
    working folder may differ) and in the MLflow params."""
    replace = dataclasses.replace
    return replace(config, out=absolute_path(config.out), inception_weights=absolute_path(config.inception_weights),
                   lpips_weights=absolute_path(config.lpips_weights), weights=absolute_weights(config.weights),
                   data=replace(config.data, datasets=[absolute_dataset(e) for e in config.data.datasets],
                                cache_dir=absolute_path(config.data.cache_dir)),
                   masks=replace(config.masks, folder=absolute_path(config.masks.folder)))


def resolve_methods(config: BenchmarkConfig) -> list[str]:
    methods = select_methods(config.methods, config.scale)  # unknown names and tags fail here, before any work
    if not methods:
        raise UserError(f"no methods registered for scale {config.scale!r}")
    return methods


def with_method_names(config: BenchmarkConfig, methods: list[str]) -> BenchmarkConfig:
    """The config with ``tag:`` selectors replaced by the names they select, so config.json and MLflow record
    the methods that ran, as a list of names does."""
    return dataclasses.replace(config, methods=list(methods)) if has_tags(config.methods) else config


def check_weights(config: BenchmarkConfig, methods: list[str]) -> dict[tuple[str, str], PublishedWeights]:
    """Load every published checkpoint of the run once, before anything is written (see bench.weights)."""
    if not config.weights:
        return {}
    labels = [parse_dataset(entry).label for entry in config.data.datasets]
    bar = lambda items: tqdm(list(items), desc="check weights", unit="checkpoint", dynamic_ncols=True)  # noqa: E731
    return check_published_weights(
        config.weights, methods, labels, progress=bar,
        create=lambda name: create_method(name, **config.method_options.get(name, {})),
        finetune=lambda name: apply_overrides(config.train, config.train_options.get(name, {})).finetune)


def trains(config: BenchmarkConfig, method: str, has_weights: bool) -> bool:
    """Whether the method's cells train (and so need a training split)."""
    train = apply_overrides(config.train, config.train_options.get(method, {}))
    return (getattr(get_factory(method), "trainable", True) and train.steps > 0
            and (not has_weights or train.finetune))


def prepare(config: BenchmarkConfig, methods: list[str] | None = None,
            weights: dict[tuple[str, str], PublishedWeights] | None = None) -> Plan:
    """Build image sets and freeze manifests: everything before the first cell runs."""
    out = Path(config.out).expanduser().resolve()
    methods = methods if methods is not None else resolve_methods(config)
    weights = check_weights(config, methods) if weights is None else weights
    config = with_method_names(config, methods)
    cells, digests = [], {}
    for entry in config.data.datasets:
        dataset = parse_dataset(entry)
        if any(trains(config, m, (m, dataset.label) in weights) for m in methods):
            # a missing training split fails now, not after hours of other cells
            try:
                load_image_set(dataset.kind, "train", root=dataset.root, image_size=config.data.image_size,
                               limit=config.data.train_limit, cache_dir=config.data.cache_dir)
            except UserError as exc:
                raise UserError(f"{exc} — trainable methods need a training split; run only methods that need "
                                "none (--methods biharmonic diffusion_fill) or pass --steps 0") from exc
        test_set = load_image_set(dataset.kind, "test", root=dataset.root, image_size=config.data.image_size,
                                  limit=config.data.test_limit, cache_dir=config.data.cache_dir)
        manifest_dir = out / dataset.label / "manifest"
        write_split_manifest(test_set, out / dataset.label / "split_test.csv")
        manifest = build_manifest(test_set, mask_protocol(config.masks), manifest_dir)
        digests[dataset.label] = manifest.verify().dataset_digest
        for method in methods:
            for seed in config.seeds:
                cells.append(CellSpec(method, entry, seed, str(cell_dir(out, dataset.label, method, seed, config.seeds)),
                                      str(manifest_dir), weights=weights.get((method, dataset.label))))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    return Plan(config, out, methods, cells, digests, weights)


def summary_line(record: dict) -> str:
    params = sum(record["num_parameters"].values())
    return (f"done {record['dataset']}/{record['method']} seed {record['seed']}: {record['pairs']} pairs, "
            f"{params / 1e6:.2f}M params, train {record['train_seconds']:.1f}s, eval {record['eval_seconds']:.1f}s")


def run_serial(plan: Plan, on_done: distributed.OnDone) -> list[CellOutcome]:
    """Cells one after another in this process, with the settings a Ray task would get (threads, device)."""
    outcomes = []
    for cell in tqdm(plan.cells, desc="cells", unit="cell", dynamic_ncols=True):
        was_done = read_done(cell.cell_dir) is not None
        with distributed.cell_settings(plan.config.resources):
            record = run_cell(plan.config, cell)
        outcome = CellOutcome(cell, record, skipped=was_done)
        on_done(outcome)
        outcomes.append(outcome)
    return outcomes


def run_cells(plan: Plan, on_done: distributed.OnDone) -> list[CellOutcome]:
    if plan.config.resources.serial:
        return run_serial(plan, on_done)
    return distributed.run_cells(plan.config, plan.cells, on_done=on_done)


class CellLogger:
    """Called in the driver as each cell finishes: one summary line, one nested MLflow run.

    A logging failure (a tracking server gone away) is a warning, not the end of the benchmark: the
    cell is recorded in its folder, and the next invocation logs every finished cell not yet logged."""

    def __init__(self, plan: Plan, tracker: Tracker):
        self.plan, self.tracker = plan, tracker
        self.config_values = to_dict(plan.config)
        self.logged_before = tracker.logged_digests()
        self.counts = {"cells_run": 0, "cells_skipped": 0, "cells_logged": 0, "cells_not_logged": 0}

    def __call__(self, outcome: CellOutcome) -> None:
        self.counts["cells_skipped" if outcome.skipped else "cells_run"] += 1
        tqdm.write(("skip (finished earlier) " if outcome.skipped else "") + summary_line(outcome.record))
        tags = {"sahn.dataset_digest": self.plan.dataset_digests.get(outcome.record["dataset"], "unknown")}
        if outcome.node_id:
            tags["ray.node_id"] = outcome.node_id
        try:
            run_id = self.tracker.log_cell(outcome.cell.cell_dir, out=self.plan.out, config_values=self.config_values,
                                           extra_tags=tags, logged=self.logged_before)
        except Exception as exc:  # noqa: BLE001 - any tracking failure; the cell itself is safe on disk
            self.counts["cells_not_logged"] += 1
            tqdm.write(f"warning: {outcome.cell.key} not logged to MLflow ({type(exc).__name__}: {exc}); "
                       "re-run to log it")
            return
        if run_id is not None:
            self.counts["cells_logged"] += 1


def main(argv: Sequence[str] | None = None) -> Path:
    config = parse_config(BenchmarkConfig, argv, presets=PRESETS, default_preset="default", description=__doc__)
    return run_plan(config) if config.plan else run_benchmark(config)


def plan_cluster(config: BenchmarkConfig) -> tuple[int, str]:
    """(cells the run could run at once, where) for --plan: the Ray cluster it would join, the local cluster it
    would start (this machine's CPUs and GPUs, without starting it), or one at a time with --serial."""
    resources = config.resources
    if resources.serial:
        return 1, "this machine, one cell at a time (--serial)"
    address = distributed.cluster_address(resources)
    if address:
        with distributed.ray_cluster(resources, log_to_driver=False) as nodes:
            pass
    else:
        import torch

        nodes = [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]
        check_feasible(resources, nodes)
    total = {kind: sum(node.get(kind, 0.0) for node in nodes) for kind in ("CPU", "GPU")}
    where = (f"the Ray cluster at {address}" if address else "a local Ray cluster on this machine") + \
        f" ({len(nodes)} node(s), {total['CPU']:g} CPUs, {total['GPU']:g} GPUs)"
    share = worker_resources(resources)  # what each evaluation task asks for (all of it with one training worker)
    return cluster_slots(nodes, share.cpus_per_cell, share.gpus_per_cell), where


def run_plan(config: BenchmarkConfig) -> Path:
    """--plan: resolve datasets, methods, cells and shards, estimate their cost, print it; run nothing. The test
    manifests are built (frozen) if they do not exist yet, since the pair counts come from them; a later run
    reuses them. Returns the path of plan.txt (the printed table)."""
    import torch

    from bench import devices
    from bench.run.plan import TRAIN_CSV, estimate, render, training_timings, write_figures, write_train_timings

    config = absolute_paths(config)
    methods = resolve_methods(config)
    config = with_method_names(config, methods)
    weights = check_weights(config, methods)
    slots, where = plan_cluster(config)
    plan = prepare(config, methods, weights)
    sources = []
    try:
        share = worker_resources(config.resources)
        device = devices.resolve_device(share.device, gpus_per_cell=share.gpus_per_cell)
    except UserError as exc:  # planning a GPU run on a machine without one
        device = torch.device("cpu")
        sources.append(f"note: {exc} — timed on the CPU instead; pass --plan-latency-from an efficiency folder "
                       "measured on the cluster's GPUs")
    with torch_threads(cell_threads(worker_resources(config.resources))):
        costs = estimate(config, plan.cells, slots, device, config.plan_latency_from,
                         log=lambda text: print(text, flush=True), train_file=config.plan_train_from)
    write_train_timings(plan.out / TRAIN_CSV, config, training_timings(costs))
    if config.plan_train_from:
        sources.append(f"training steps: from {config.plan_train_from} (methods it lacks timed on {device})")
    else:
        sources.append(f"training steps: timed on {device} after a warm-up step, written to {plan.out / TRAIN_CSV}")
    if config.plan_latency_from:
        sources.insert(0, f"latencies: inpaint from {Path(config.plan_latency_from) / 'efficiency.csv'} (methods it "
                          f"lacks timed on {device}); harness timed on {device} over a few pairs")
    else:
        sources.insert(0, f"latencies: inpaint and harness timed on {device} over a few pairs, after a warm-up call")
    text = render(config, costs, slots, where, sources)
    print(text)
    path = plan.out / "plan.txt"
    atomic_write_bytes(path, (text + "\n").encode())
    write_figures(plan.out / "plan.json", config, costs, slots)
    return path


def run_benchmark(config: BenchmarkConfig) -> Path:
    """The whole job for a parsed config; returns the report path."""
    started = time.perf_counter()
    config = absolute_paths(config)
    if config.resources.serial and training_workers(config.resources) > 1:
        raise UserError(f"a cell trains in {training_workers(config.resources)} workers under Ray Train, which needs "
                        "Ray: drop --serial (or set --train-workers 1 and at most one GPU per cell)")
    methods = resolve_methods(config)
    config = with_method_names(config, methods)
    weights = check_weights(config, methods)  # a bad checkpoint fails here, before anything is written
    # A bad MLflow URI or an impossible resource request fails here, before any image is read.
    tracker = Tracker.open(resolve_uri(config.tracking.mlflow_uri, config.out), config.tracking.experiment)
    cluster = contextlib.nullcontext() if config.resources.serial else distributed.ray_cluster(config.resources)
    with cluster:
        plan = prepare(config, methods, weights)
        tracker.start_benchmark(to_dict(config), plan.out)
        print(f"mlflow: experiment {tracker.experiment_name!r} in {tracker.uri}, run {tracker.parent_run_id}")
        logger = CellLogger(plan, tracker)
        with tracker.closing_parent_on_failure():
            run_cells(plan, logger)
            from reports.build import build_report

            report = build_report(plan.out)
    wall = time.perf_counter() - started
    tracker.finish_benchmark("FINISHED", metrics={**logger.counts, "wall_seconds": wall},
                             artifacts=[(report, None), (plan.out / "report", "report")])
    print(f"report: {report}")
    print(f"tables: {plan.out / 'report' / 'tables'}   figures: {plan.out / 'report' / 'figures'}")
    print(f"mlflow ui --backend-store-uri {tracker.uri}   # browse and compare the runs")
    print(f"wall time: {wall:.1f}s")
    return report


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
