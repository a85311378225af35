"""Kill the driver mid-run, re-run the same command: the finished cell is skipped, the cell in flight
resumes from its checkpoint, and the tables equal those of an uninterrupted run."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from pipelines.full_benchmark import run_benchmark
from tiny_methods import config_from_dict, ensure_local_ray, tiny_config_dict, wait_for, write_folder_dataset

pytestmark = pytest.mark.timeout(420)

DRIVER = Path(__file__).with_name("tiny_methods.py")
METHODS = ("diffusion_fill", "tiny_trainer")
PATH_COLUMNS = ["image", "mask", "output"]  # differ between output folders by construction


def results(out: Path) -> dict[str, object]:
    """Everything a table is made of, per cell, plus the rendered report."""
    found: dict[str, object] = {"report.md": (out / "report.md").read_text()}
    for tex in sorted((out / "report" / "tables").glob("*.tex")):
        found[tex.name] = tex.read_text()
    for cell in sorted(out.glob("*/*/cell.json")):
        folder = cell.parent
        key = folder.relative_to(out).as_posix()
        found[f"{key}/summary.csv"] = (folder / "summary.csv").read_bytes()
        found[f"{key}/per_image"] = pd.read_csv(folder / "per_image.csv").drop(columns=PATH_COLUMNS).to_csv()
        if (folder / "losses.csv").exists():
            found[f"{key}/losses.csv"] = (folder / "losses.csv").read_bytes()
    return found


def test_killing_the_driver_and_rerunning_gives_the_tables_of_an_uninterrupted_run(tmp_path):
    address = ensure_local_ray()  # the driver subprocesses join this cluster (RAY_ADDRESS), as on a real cluster
    dataset = write_folder_dataset(tmp_path / "data")
    reference = tmp_path / "reference"
    run_benchmark(config_from_dict(tiny_config_dict(reference, dataset, methods=METHODS)))

    out = tmp_path / "out"
    marker, starts = tmp_path / "paused.json", tmp_path / "starts.log"
    options = {"tiny_trainer": {"pause_at_step": 4, "pause_marker": str(marker), "start_log": str(starts)}}
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(tiny_config_dict(out, dataset, methods=METHODS, method_options=options)))
    command = [sys.executable, str(DRIVER), str(config_file)]
    env = {**os.environ, "RAY_ADDRESS": address}
    log = tmp_path / "first.log"
    with open(log, "w") as stream:
        driver = subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT)
        try:
            finished = out / "folder-data" / "diffusion_fill" / "cell.json"
            wait_for(lambda: finished.exists() and marker.exists(), driver, log, seconds=300)
        finally:
            driver.kill()  # SIGKILL: no handler, no cleanup — a crashed or killed driver
            driver.wait(timeout=30)
    trainer = out / "folder-data" / "tiny_trainer"
    assert (trainer / "train_state.pt").exists() and not (trainer / "cell.json").exists()
    parked = json.loads(marker.read_text())["pid"]
    gone = time.monotonic() + 60
    while psutil.pid_exists(parked) and time.monotonic() < gone:
        time.sleep(0.2)
    assert not psutil.pid_exists(parked), "the killed driver's cell kept running"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "skip (finished earlier) done folder-data/diffusion_fill" in rerun.stdout
    assert [int(s) for s in starts.read_text().split()] == [0, 4]  # resumed from the step-4 checkpoint
    assert results(out) == results(reference)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    parents = client.search_runs([experiment], "tags.`sahn.role` = 'benchmark'")
    assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED"]  # the dead driver's run is closed
    cells = client.search_runs([experiment], "tags.`sahn.role` = 'cell'")
    assert sorted(c.data.tags["sahn.cell_key"] for c in cells) == ["folder-data/diffusion_fill/seed0",
                                                                  "folder-data/tiny_trainer/seed0"]
