"""The main job: benchmark every registered method on the frozen test pairs of each dataset.

    python -m pipelines.full_benchmark                      # default preset: embedded suites, tiny variants
    python -m pipelines.full_benchmark --config paper --data.datasets celeba:/data/celeba paris:/data/paris
    python -m pipelines.full_benchmark --datasets folder:~/photos --masks.source nvidia --masks.folder ~/masks

Stages: (1) build the image sets and freeze each dataset's test manifest before any method runs,
(2) run one cell per method × dataset × seed (train, then evaluate), (3) rebuild the report.
Re-running the same command skips finished cells and resumes unfinished training.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from bench.cell import CellSpec, parse_dataset, read_done, run_cell
from bench.config import BenchmarkConfig, to_dict
from bench.datasets import load_image_set, write_split_manifest
from bench.errors import UserError
from bench.manifest import MaskProtocol, build_manifest
from bench.methods import available_methods, get_factory
from bench.cli import parse_config, run_main

PRESETS = Path(__file__).parent / "presets" / "benchmark"


@dataclass
class Plan:
    config: BenchmarkConfig
    out: Path
    methods: list[str]
    cells: list[CellSpec]


def mask_protocol(config: BenchmarkConfig) -> MaskProtocol:
    masks = config.masks
    return MaskProtocol(source=masks.source, preset=masks.preset, folder=masks.folder, bins=tuple(masks.bins),
                        masks_per_bin=masks.masks_per_bin, seed=masks.seed)


def cell_dir(out: Path, label: str, method: str, seed: int, seeds: Sequence[int]) -> Path:
    base = out / label / method
    return base if len(seeds) == 1 else base / f"seed{seed}"


def prepare(config: BenchmarkConfig) -> Plan:
    """Resolve methods, build image sets, freeze manifests: everything before the first cell runs."""
    out = Path(config.out).expanduser().resolve()
    methods = list(config.methods) or available_methods(config.scale)
    for name in methods:
        get_factory(name)  # unknown names fail here, before any work
    if not methods:
        raise UserError(f"no methods registered for scale {config.scale!r}")
    cells = []
    for entry in config.data.datasets:
        dataset = parse_dataset(entry)
        test_set = load_image_set(dataset.kind, "test", root=dataset.root, image_size=config.data.image_size,
                                  limit=config.data.test_limit, cache_dir=config.data.cache_dir)
        manifest_dir = out / dataset.label / "manifest"
        write_split_manifest(test_set, out / dataset.label / "split_test.csv")
        build_manifest(test_set, mask_protocol(config), manifest_dir).verify()
        for method in methods:
            for seed in config.seeds:
                cells.append(CellSpec(method, entry, seed, str(cell_dir(out, dataset.label, method, seed, config.seeds)),
                                      str(manifest_dir)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    return Plan(config, out, methods, cells)


def summary_line(record: dict) -> str:
    params = sum(record["num_parameters"].values())
    return (f"done {record['dataset']}/{record['method']} seed {record['seed']}: {record['pairs']} pairs, "
            f"{params / 1e6:.2f}M params, train {record['train_seconds']:.1f}s, eval {record['eval_seconds']:.1f}s")


def run_serial(plan: Plan) -> list[dict]:
    records = []
    bar = tqdm(plan.cells, desc="cells", unit="cell", dynamic_ncols=True)
    for cell in bar:
        was_done = read_done(cell.cell_dir) is not None
        record = run_cell(plan.config, cell)
        tqdm.write(("skip (finished earlier) " if was_done else "") + summary_line(record))
        records.append(record)
    return records


def main(argv: Sequence[str] | None = None) -> Path:
    config = parse_config(BenchmarkConfig, argv, presets=PRESETS, default_preset="default", description=__doc__)
    started = time.perf_counter()
    plan = prepare(config)
    run_serial(plan)
    from reports.build import build_report

    report = build_report(plan.out)
    print(f"report: {report}")
    print(f"wall time: {time.perf_counter() - started:.1f}s")
    return report


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
