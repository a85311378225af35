"""Tiny methods and data for the Ray / MLflow / resume tests, importable by test modules and runnable as a
benchmark driver in a subprocess:

    python tests/tiny_methods.py CONFIG.json      # run_benchmark(config) with the tiny methods registered

``tiny_trainer`` is a two-convolution inpainting network (milliseconds per step) with hooks that let a
test interrupt it at a known step:
- ``crash_at_step`` exits the worker process once (``crash_marker`` records that it happened);
- ``pause_at_step`` parks the cell once (``pause_marker`` holds the node id and pid), optionally only on a
  Ray node that has the custom resource ``pause_on_resource``, so a test can kill the driver or remove
  the node while the cell is in flight;
- ``fail_at_step`` raises (a bug in the method: not retried);
- ``start_log`` gets one line per process that trains the cell: the step it started from (0, or the
  checkpoint's step after a resume);
- ``inpaint_log`` gets one line per evaluation batch (``inpaint`` outside training): its number of pairs;
- ``crash_in_inpaint_marker`` exits the worker process once, at its first evaluation batch (the marker file
  records that it happened).
Ray workers cannot import ``tests/``, so this module is pickled by value (see the bottom).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.methods import InpaintingMethod, apply_overrides, register_method, variant

PAUSE_LIMIT_SECONDS = 300  # a parked cell gives up waiting to be killed after this long


def _first_to_create(marker: str, text: str) -> bool:
    """Create ``marker`` unless it exists; True for the one process that created it. Atomic (O_EXCL): cells running
    side by side share one marker, and a check-then-write would let two of them crash at once."""
    try:
        descriptor = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as stream:
        stream.write(text)
    return True

@dataclass
class TinyTrainerConfig:
    channels: int = 4
    lr: float = 1e-2
    crash_at_step: int | None = None  # exit the worker once at this step (before the step runs)
    crash_marker: str | None = None  # file created just before that exit: the crash happens once
    pause_at_step: int | None = None  # park once at this step (before it runs) ...
    pause_marker: str | None = None  # ... writing this file (node id, pid); an existing file means "paused before"
    pause_on_resource: str | None = None  # ... but only on a Ray node that has this custom resource
    start_log: str | None = None  # append the step each training process starts from
    fail_at_step: int | None = None  # raise at this step: a bug in the method, not a lost worker
    inpaint_log: str | None = None  # append the batch size of every evaluation batch
    crash_in_inpaint_marker: str | None = None  # exit the worker once at an evaluation batch, creating this file


class TinyTrainer(InpaintingMethod):
    paper_name = None
    trainable = True

    def __init__(self, config: TinyTrainerConfig):
        super().__init__(config)
        self.net = nn.Sequential(nn.Conv2d(4, config.channels, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(config.channels, 3, 3, padding=1))
        self.optimizers["net"] = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        # Saved with the weights, so a resumed run knows which step it is at.
        self.register_buffer("steps_taken", torch.zeros((), dtype=torch.long))
        self._started = False  # has this process logged its starting step yet

    def inpaint(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if not self.training:  # an evaluation batch (train_step calls inpaint too)
            self._evaluation_hooks(len(images))
        return torch.sigmoid(self.net(torch.cat([images * (1 - masks), masks], dim=1)))

    def _evaluation_hooks(self, pairs: int) -> None:
        config = self.config
        if config.crash_in_inpaint_marker is not None:
            if _first_to_create(config.crash_in_inpaint_marker, f"crashed in an evaluation batch of {pairs} pairs\n"):
                os._exit(1)  # a lost worker, as in _maybe_crash
        if config.inpaint_log is not None:
            with open(config.inpaint_log, "a") as log:
                log.write(f"{pairs}\n")

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        step = int(self.steps_taken)
        if self.config.start_log and not self._started:
            self._started = True
            with open(self.config.start_log, "a") as log:
                log.write(f"{step}\n")
        if step == self.config.fail_at_step:
            raise RuntimeError(f"tiny_trainer fails at step {step} as configured")
        self._maybe_crash(step)
        self._maybe_pause(step)
        images, masks = batch["image"], batch["mask"]
        prediction = self.inpaint(images, masks)
        hole = F.l1_loss(prediction * masks, images * masks)
        valid = F.l1_loss(prediction * (1 - masks), images * (1 - masks))
        total = hole + 0.5 * valid
        self.optimizers["net"].zero_grad()
        self.backward(total)
        self.step("net")
        self.steps_taken += 1
        return {"hole": hole.detach(), "valid": valid.detach(), "total": total.detach()}

    def _maybe_crash(self, step: int) -> None:
        config = self.config
        if config.crash_at_step is None or step != config.crash_at_step or config.crash_marker is None:
            return
        if _first_to_create(config.crash_marker, f"crashed at step {step}\n"):
            os._exit(1)  # what a segfault or an OOM kill looks like to Ray: the worker process is gone

    def _maybe_pause(self, step: int) -> None:
        config = self.config
        if config.pause_at_step is None or step != config.pause_at_step or config.pause_marker is None:
            return
        marker = Path(config.pause_marker)
        if marker.exists():
            return
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        if config.pause_on_resource is not None:
            here = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id), {})
            if config.pause_on_resource not in here:
                return
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps({"node_id": node_id, "pid": os.getpid(), "step": step}))
        os.replace(tmp, marker)
        deadline = time.monotonic() + PAUSE_LIMIT_SECONDS
        while time.monotonic() < deadline:  # until the test kills this process (driver killed, node removed)
            time.sleep(0.2)


@variant(scale="tiny")
def tiny_trainer(**overrides) -> TinyTrainer:
    return TinyTrainer(apply_overrides(TinyTrainerConfig(), overrides))


register_method("tiny_trainer", tiny_trainer)


def ensure_local_ray() -> str:
    """One local Ray cluster of 2 CPUs per test session (started on first use); returns its address."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 2**20)
    return ray.get_runtime_context().gcs_address


# ------------------------------------------------------------------------------------ data
def write_folder_dataset(root: Path, *, train: int = 6, test: int = 3, size: int = 32, seed: int = 0) -> Path:
    """A ``folder:`` dataset with ``train/`` and ``test/`` subfolders of smooth random images."""
    from bench.data.images import write_png

    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            coarse = rng.random((4, 4, 3))
            image = np.kron(coarse, np.ones((size // 4, size // 4, 1)))  # blocks: edges for the methods to fill
            image = (255 * (0.7 * image + 0.3 * rng.random((size, size, 3)))).round().astype(np.uint8)
            write_png(root / split / f"{split}_{index:02d}.png", image)
    return root


def tiny_config_dict(out: Path, dataset: Path, *, methods=("diffusion_fill", "tiny_trainer"), seeds=(0,),
                     steps: int = 6, mlflow_uri: str | None = None, method_options: dict | None = None,
                     serial: bool = False) -> dict:
    """A benchmark config small enough for a test: one 32² folder dataset, two bins, few steps."""
    from bench.config import BenchmarkConfig, to_dict

    values = to_dict(BenchmarkConfig())
    values.update(out=str(out), methods=list(methods), seeds=list(seeds), eval_batch_size=8, save_images=True,
                  method_options=method_options or {})
    values["data"].update(datasets=[f"folder:{dataset}"], image_size=32, test_limit=None, train_limit=None)
    values["masks"].update(source="freeform", bins=["(0.1,0.2]", "(0.3,0.4]"], masks_per_bin=1, seed=0)
    values["train"].update(steps=steps, batch_size=2, seed=0, checkpoint_every=2, log_every=1)
    values["resources"].update(device="cpu", cpus_per_cell=1.0, gpus_per_cell=0.0, serial=serial)
    values["tracking"].update(mlflow_uri=mlflow_uri, experiment="tiny")
    return values


def empty_mlflow_store(folder: Path) -> Path:
    """An MLflow sqlite file with its tables created and no experiment. Creating the tables takes
    seconds; tests copy this file instead of paying that for every store."""
    from mlflow.tracking import MlflowClient

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def config_from_dict(values: dict):
    from bench.config import BenchmarkConfig, from_dict

    return from_dict(BenchmarkConfig, values)


def wait_for(condition, driver, log: Path, seconds: float = 300) -> None:
    """Poll ``condition`` while the driver subprocess runs; fail with the end of its log if it exits or
    ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while not condition():
        if driver.poll() is not None:
            raise AssertionError(f"the driver exited ({driver.returncode}) early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


if __name__ != "__main__":
    import ray.cloudpickle

    # The driver ships method factories to Ray workers (bench.run.distributed); workers have no tests/ on
    # their path, so the factory and its classes travel as code, not as an import.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


if __name__ == "__main__":
    from bench.cli import run_main
    from pipelines.full_benchmark import run_benchmark

    run_main(lambda: run_benchmark(config_from_dict(json.loads(Path(sys.argv[1]).read_text()))))
