"""--plan: cells, pairs, shards and their estimated cost, printed without running a cell or training."""
import re
from pathlib import Path

import pandas as pd
import pytest

import bench.cell
import bench.distributed
import bench.train
import pipelines.full_benchmark as full_benchmark
from bench.plan import wall_seconds
from tiny_methods import config_from_dict, tiny_config_dict, write_folder_dataset

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "data")


def forbid(monkeypatch, module, name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"--plan called {module.__name__}.{name}")

    monkeypatch.setattr(module, name, refuse)


def planned(tmp_path, dataset, monkeypatch, capsys, **options) -> tuple[Path, str]:
    for module, name in ((bench.train, "train"), (full_benchmark, "run_cells"), (full_benchmark, "run_cell"),
                         (bench.distributed, "run_cells"), (bench.cell, "train_cell")):
        forbid(monkeypatch, module, name)
    values = tiny_config_dict(tmp_path / "out", dataset, methods=("diffusion_fill", "tiny_trainer"), seeds=(0, 1))
    values.update(plan=True, **options)
    full_benchmark.run_plan(config_from_dict(values))
    return tmp_path / "out", capsys.readouterr().out


def row(text: str, key: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if line.startswith(key + " ")]
    return line.split()


def test_plan_runs_no_cell_and_prints_a_figure_for_every_cell(tmp_path, dataset, monkeypatch, capsys):
    out, text = planned(tmp_path, dataset, monkeypatch, capsys)
    cells = [f"folder-data/{method}/seed{seed}" for method in ("diffusion_fill", "tiny_trainer") for seed in (0, 1)]
    for key in cells:
        pairs, shards, steps, inpaint, harness, hours = row(text, key)[1:]
        assert pairs == "6" and shards == "1" and steps == ("6" if "trainer" in key else "0")
        assert float(inpaint) > 0 and float(harness) > 0 and float(hours) > 0
    assert re.search(r"evaluation wall time on \d+ slot\(s\): [0-9.]+ h", text)
    assert "training not estimated: 2 cell(s) train first" in text
    assert (out / "plan.txt").read_text().strip() == text[text.index("plan: "):].strip()
    assert (out / "folder-data" / "manifest" / "manifest.json").exists()  # frozen, as a run would
    produced = {p.name for p in out.rglob("*") if p.is_file()}
    assert not produced & {"cell.json", "trained.json", "model.pt", "per_image.csv", "train_state.pt", "mlflow.db"}


def test_latencies_come_from_an_efficiency_folder_when_given(tmp_path, dataset, monkeypatch, capsys):
    measured = tmp_path / "efficiency"
    measured.mkdir()
    pd.DataFrame([{"method": "tiny_trainer", "device": "cuda:0", "device_name": "Some GPU", "image_size": 64,
                   "batch_size": 2, "latency_ms": 40.0, "throughput_img_s": float("nan"), "error": ""}]
                 ).to_csv(measured / "efficiency.csv", index=False)
    _, text = planned(tmp_path, dataset, monkeypatch, capsys, plan_latency_from=str(measured), eval_batch_size=2,
                      eval_shard_pairs=4)
    pairs, shards, _, inpaint, *_ = row(text, "folder-data/tiny_trainer/seed0")[1:]
    assert float(inpaint) == pytest.approx(40.0 / 2 / 4)  # per pair, scaled from 64² to the run's 32²
    assert shards == "2"  # --eval-shard-pairs 4 over 6 pairs
    assert "efficiency.csv" in text


def test_wall_time_spreads_the_longest_tasks_first_over_the_slots():
    assert wall_seconds([3, 3, 2, 2, 2], slots=2) == 7
    assert wall_seconds([3, 3, 2, 2, 2], slots=1) == 12
    assert wall_seconds([5, 1, 1], slots=8) == 5
