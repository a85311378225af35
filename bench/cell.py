"""One benchmark cell (method × dataset × seed): train if the method trains, then evaluate on the frozen
manifest. The same function runs in-process or as a Ray task; it is idempotent (a finished cell is
read back, an unfinished training resumes from its checkpoint)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from bench.config import BenchmarkConfig, TrainConfig
from bench.datasets import load_image_set
from bench.evaluate import evaluate, write_csv_atomic
from bench.manifest import PROTOCOL_VERSION, load_manifest
from bench.errors import UserError
from bench.methods import apply_overrides, create_method
from bench.scoring import Scorer

EMBEDDED_SUITES = ("faces", "scenes", "facades")
DONE_FILE = "cell.json"


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

    @property
    def key(self) -> str:
        return f"{parse_dataset(self.dataset).label}/{self.method}/seed{self.seed}"


@functools.lru_cache(maxsize=4)
def cached_scorer(device: str, inception_path: str | None, lpips_path: str | None, compile_metrics: bool) -> Scorer:
    """One scorer per worker process: its networks load once, not once per cell."""
    return Scorer(device=torch.device(device), inception_path=inception_path, lpips_trunk_path=lpips_path,
                  compile_pixel_metrics=compile_metrics)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cell_train_config(config: BenchmarkConfig, cell: CellSpec) -> TrainConfig:
    overrides = dict(config.train_options.get(cell.method, {}))
    return apply_overrides(dataclasses.replace(config.train, seed=cell.seed), overrides)


def cell_fingerprint(config: BenchmarkConfig, cell: CellSpec) -> str:
    """Digest of every option that changes a cell's numbers, so stale results are never reused."""
    relevant = {"method": cell.method, "options": config.method_options.get(cell.method, {}),
                "train": dataclasses.asdict(cell_train_config(config, cell)), "dataset": cell.dataset,
                "image_size": config.data.image_size, "train_limit": config.data.train_limit,
                "manifest": cell.manifest_dir, "inception": config.inception_weights, "lpips": config.lpips_weights}
    if config.compile_metrics:  # only when set, so results of earlier runs keep their fingerprints
        relevant["compile_metrics"] = True
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_done(cell_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(cell_dir) / DONE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_json_atomic(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def run_cell(config: BenchmarkConfig, cell: CellSpec, *, progress: bool = True,
             on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Run (or read back) one cell; returns the record written to ``cell.json``."""
    fingerprint = cell_fingerprint(config, cell)
    done = read_done(cell.cell_dir)
    if done is not None:
        if done.get("fingerprint", fingerprint) != fingerprint:
            raise UserError(f"{cell.cell_dir} holds results made with other options; use a new --out "
                            "or delete that folder")
        return done
    cell_dir = Path(cell.cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    dataset = parse_dataset(cell.dataset)
    device = resolve_device(config.resources.device)

    torch.manual_seed(cell.seed)  # weight initialisation is part of the seeded config
    method = create_method(cell.method, **config.method_options.get(cell.method, {})).to(device)
    train_config = cell_train_config(config, cell)
    history: list[dict[str, float]] = []
    train_seconds = 0.0
    if method.trainable and train_config.steps > 0:
        from bench.train import train  # imported here: classical-only runs never touch the training stack

        train_set = load_image_set(dataset.kind, "train", root=dataset.root, image_size=config.data.image_size,
                                   limit=config.data.train_limit, cache_dir=config.data.cache_dir)
        started = time.perf_counter()
        result = train(method, train_set, train_config, checkpoint_path=cell_dir / "train_state.pt",
                       on_step=on_step, progress=progress, description=f"train {cell.key}")
        train_seconds = time.perf_counter() - started
        history = result.history
        write_csv_atomic(pd.DataFrame(history), cell_dir / "losses.csv")
        method.save(cell_dir / "model.pt")

    manifest = load_manifest(cell.manifest_dir)
    scorer = cached_scorer(str(device), config.inception_weights, config.lpips_weights, config.compile_metrics)
    started = time.perf_counter()
    evaluation = evaluate(method, manifest, cell_dir, scorer, batch_size=config.eval_batch_size,
                          save_images=config.save_images, progress=progress, description=f"eval {cell.key}")
    eval_seconds = time.perf_counter() - started

    record = {
        "method": cell.method, "paper_name": method.paper_name, "dataset": dataset.label,
        "dataset_entry": cell.dataset, "seed": cell.seed, "device": str(device),
        "protocol": PROTOCOL_VERSION, "manifest_digest": manifest.digest(), "fingerprint": fingerprint,
        "num_parameters": method.num_parameters(), "substitutions": dict(method.substitutions),
        "pretrained": dict(getattr(method, "pretrained", {}) or {}),
        "metric_networks": scorer.provenance(), "pixel_metrics": scorer.pixel_metrics_backend(device),
        "method_config": method.config_dict(),
        "train": dataclasses.asdict(train_config) if history else None,
        "train_seconds": round(train_seconds, 3), "eval_seconds": round(eval_seconds, 3),
        "pairs": len(evaluation.per_image),
    }
    write_json_atomic(record, cell_dir / DONE_FILE)
    (cell_dir / "train_state.pt").unlink(missing_ok=True)  # the final weights are in model.pt
    return record
