"""--plan: cells, pairs, shards and their estimated cost (training, evaluation, disk, memory), printed without
running a cell: only a few timed training steps and pairs, in memory."""
import json
import re
from pathlib import Path

import pandas as pd
import pytest

import bench.run.cell
import bench.run.distributed
import bench.run.resources
import bench.run.plan
import pipelines.full_benchmark as full_benchmark
from bench.errors import UserError
from bench.run.plan import (CellCost, SummaryTiming, TrainTiming, held_seconds, run_wall_seconds, summary_seconds,
                            time_summary, wall_seconds)
from tiny_methods import config_from_dict, tiny_config_dict, write_folder_dataset

pytestmark = pytest.mark.timeout(300)

COLUMNS = ("pairs", "shards", "steps", "step_s", "train_h", "inpaint", "harness", "eval_h", "disk", "finish_mem")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "data")


def forbid(monkeypatch, module, name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"--plan called {module.__name__}.{name}")

    monkeypatch.setattr(module, name, refuse)


def plan_values(tmp_path, dataset, **options) -> dict:
    values = tiny_config_dict(tmp_path / "out", dataset, methods=("diffusion_fill", "tiny_trainer"), seeds=(0, 1))
    values.update(plan=True, **options)
    return values


def planned(tmp_path, dataset, monkeypatch, capsys, values=None, **options) -> tuple[Path, str]:
    for module, name in ((full_benchmark, "run_cells"), (full_benchmark, "run_cell"),
                         (bench.run.distributed, "run_cells"), (bench.run.cell, "train_cell"), (bench.run.cell, "run_cell"),
                         (bench.run.cell, "train_and_save")):
        forbid(monkeypatch, module, name)
    full_benchmark.run_plan(config_from_dict(values or plan_values(tmp_path, dataset, **options)))
    return tmp_path / "out", capsys.readouterr().out


def row(text: str, key: str) -> dict[str, str]:
    (line,) = [line for line in text.splitlines() if line.startswith(key + " ")]
    return dict(zip(COLUMNS, line.split()[1:], strict=True))


def size(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(B|KB|MB|GB|TB)", text).groups()
    return float(number) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]


def test_plan_runs_no_cell_and_prints_training_evaluation_disk_for_every_cell(tmp_path, dataset, monkeypatch,
                                                                              capsys):
    out, text = planned(tmp_path, dataset, monkeypatch, capsys)
    cells = [f"folder-data/{method}/seed{seed}" for method in ("diffusion_fill", "tiny_trainer") for seed in (0, 1)]
    for key in cells:
        figures = row(text, key)
        assert figures["pairs"] == "6" and figures["shards"] == "1"
        assert float(figures["inpaint"]) > 0 and float(figures["harness"]) > 0 and float(figures["eval_h"]) > 0
        assert size(figures["disk"]) > 6 * 4 * 1000  # at least float32 features of some thousand dimensions a pair
        assert figures["finish_mem"] == "-"  # one piece: no finishing task
        if "trainer" in key:
            assert figures["steps"] == "6" and float(figures["step_s"]) > 0 and float(figures["train_h"]) > 0
        else:
            assert figures["steps"] == "0" and figures["step_s"] == "-" and float(figures["train_h"]) == 0
    assert re.search(r"wall time on \d+ slot\(s\): [0-9.e-]+ h \([0-9]+ s\), training then evaluation", text)
    assert re.search(r"training CPU-h: [0-9.e-]+ \(2 cell\(s\)", text)
    assert re.search(r"disk: [0-9.]+ [KMG]?B = features .*ground truth .*composites .*checkpoints .*mlflow", text)
    assert "memory: no cell is sharded" in text
    assert (out / "plan.txt").read_text().strip() == text[text.index("plan: "):].strip()
    figures = json.loads((out / "plan.json").read_text())
    assert figures["train_seconds"] > 0 and figures["eval_seconds"] > 0 and figures["disk_bytes"] > 0
    trainer = next(cell for cell in figures["cells"] if cell["cell"] == "folder-data/tiny_trainer/seed0")
    assert trainer["train_seconds"] == pytest.approx(trainer["train_setup_seconds"]
                                                     + 6 * trainer["train_step_seconds"])
    assert trainer["disk"]["checkpoints"] > 0 and trainer["disk"]["resume"] > trainer["disk"]["checkpoints"]
    timed = pd.read_csv(out / "plan_train.csv")
    assert list(timed["method"]) == ["tiny_trainer"] and timed["step_seconds"][0] > 0
    assert (out / "folder-data" / "manifest" / "manifest.json").exists()  # frozen, as a run would
    produced = {p.name for p in out.rglob("*") if p.is_file()}
    assert not produced & {"cell.json", "trained.json", "model.pt", "per_image.csv", "train_state.pt", "mlflow.db",
                           "losses.csv"}


def test_training_seconds_come_from_a_file_scaled_to_the_run(tmp_path, dataset, monkeypatch, capsys):
    forbid(monkeypatch, bench.run.plan, "time_training")
    steps = tmp_path / "steps.csv"
    pd.DataFrame([{"method": "tiny_trainer", "step_seconds": 2.0, "image_size": 64, "batch_size": 1}]
                 ).to_csv(steps, index=False)
    values = plan_values(tmp_path, dataset, plan_train_from=str(steps))
    values["resources"].update(cpus_per_cell=2.0, train_workers=2)
    _, text = planned(tmp_path, dataset, monkeypatch, capsys, values)
    figures = row(text, "folder-data/tiny_trainer/seed0")
    # 2 s at 64² and 1 image → 32² (¼ of the pixels) and each of 2 workers' share of the batch of 2 (1 image)
    assert float(figures["step_s"]) == pytest.approx(0.5)
    assert float(figures["train_h"]) == pytest.approx(6 * 0.5 * 2 / 3600, rel=1e-2)  # both workers' CPUs
    assert "training in 2 workers" in text and "on 2 workers each" in text
    assert f"training steps: from {steps}" in text


def test_a_bad_training_file_is_one_line(tmp_path):
    bad = tmp_path / "steps.csv"
    bad.write_text("method,seconds\ntiny_trainer,1\n")
    with pytest.raises(UserError, match="needs the columns method and step_seconds"):
        bench.run.plan.measured_train_steps(bad, 32, 2)
    with pytest.raises(UserError, match="no such file"):
        bench.run.plan.measured_train_steps(tmp_path / "absent.csv", 32, 2)


def test_a_sharded_cell_shows_the_finishing_tasks_memory_request(tmp_path, dataset, monkeypatch, capsys):
    monkeypatch.setattr(bench.run.resources, "FINISH_TASK_BASE_BYTES", 2**30)  # the plan asks resources, not a copy
    monkeypatch.setattr(bench.run.resources, "FINISH_TASK_BYTES_PER_PAIR", 2**28)
    _, text = planned(tmp_path, dataset, monkeypatch, capsys, eval_batch_size=2, eval_shard_pairs=4,
                      methods=["diffusion_fill"], seeds=[0])
    figures = row(text, "folder-data/diffusion_fill/seed0")
    assert figures["shards"] == "2" and figures["finish_mem"] == "2.5GiB"  # 1 GiB + 6 × ¼ GiB
    assert "memory: finishing tasks ask Ray for 2.68 GB to 2.68 GB each" in text


def test_latencies_come_from_an_efficiency_folder_when_given(tmp_path, dataset, monkeypatch, capsys):
    measured = tmp_path / "efficiency"
    measured.mkdir()
    pd.DataFrame([{"method": "tiny_trainer", "device": "cuda:0", "device_name": "Some GPU", "image_size": 64,
                   "batch_size": 2, "latency_ms": 40.0, "throughput_img_s": float("nan"), "error": ""}]
                 ).to_csv(measured / "efficiency.csv", index=False)
    _, text = planned(tmp_path, dataset, monkeypatch, capsys, plan_latency_from=str(measured), eval_batch_size=2,
                      eval_shard_pairs=4)
    figures = row(text, "folder-data/tiny_trainer/seed0")
    assert float(figures["inpaint"]) == pytest.approx(40.0 / 2 / 4)  # per pair, scaled from 64² to the run's 32²
    assert figures["shards"] == "2"  # --eval-shard-pairs 4 over 6 pairs
    assert "efficiency.csv" in text


def test_disk_estimate_matches_a_real_cell(tmp_path, dataset):
    values = tiny_config_dict(tmp_path / "out", dataset, methods=("tiny_trainer",), serial=True)
    config = full_benchmark.absolute_paths(config_from_dict(values))
    plan = full_benchmark.prepare(config)
    (cell,) = plan.cells
    import torch

    (cost,) = bench.run.plan.estimate(plan.config, [cell], 1, torch.device("cpu"), log=lambda text: None)
    bench.run.cell.run_cell(plan.config, cell, progress=False)
    folder = Path(cell.cell_dir)
    features = (folder / "features.npz").stat().st_size
    assert cost.disk.features == pytest.approx(features, rel=0.1)
    (truth,) = Path(cell.manifest_dir).glob("gt_features-*.npz")
    assert cost.disk.ground_truth == pytest.approx(truth.stat().st_size, rel=0.1)
    assert cost.disk.checkpoints == pytest.approx((folder / "model.pt").stat().st_size, rel=0.25, abs=4096)
    assert cost.disk.per_image == pytest.approx((folder / "per_image.csv").stat().st_size, rel=0.2)
    pngs = sum(path.stat().st_size for path in (folder / "images").glob("*.png"))
    assert cost.disk.composites - 2 * 2 * cost.disk.composites / (6 + 4) == pytest.approx(pngs, rel=0.3)


def test_wall_time_spreads_the_longest_tasks_first_over_the_slots():
    assert wall_seconds([3, 3, 2, 2, 2], slots=2) == 7
    assert wall_seconds([3, 3, 2, 2, 2], slots=1) == 12
    assert wall_seconds([5, 1, 1], slots=8) == 5


def test_wall_time_runs_each_cells_shards_after_its_training():
    def cost(train_seconds, shards):
        return CellCost(cell=None, pairs=sum(shards), shards=shards, train_steps=1 if train_seconds else 0,
                        inpaint_seconds=1.0, harness_seconds=0.0, train=TrainTiming(train_seconds))

    # 2 slots: training 10 s on one, the other cell's 4 s shard beside it; then the 2 × 3 s shards
    assert run_wall_seconds([cost(10, [3, 3]), cost(0, [4])], slots=2) == 13
    # 2 training workers hold both slots: nothing runs beside the training; then 4 s on one slot, 3 + 3 s on the other
    assert run_wall_seconds([cost(10, [3, 3]), cost(0, [4])], slots=2, workers=2) == 16
    assert run_wall_seconds([cost(10, [3, 3]), cost(0, [4])], slots=1) == 20


def test_wall_time_runs_each_cells_summary_after_its_last_shard():
    sharded = CellCost(cell=None, pairs=6, shards=[3, 3], train_steps=0, inpaint_seconds=1.0, harness_seconds=0.0,
                       summary_seconds=5.0)
    # 2 slots: both shards at once (3 s), then the summary (5 s), not beside them
    assert run_wall_seconds([sharded], slots=2) == 8
    assert sharded.eval_seconds == 6 + 5


def test_summary_seconds_follow_the_regime_each_bin_size_gets():
    timing = SummaryTiming(width=2048, kid_subset_seconds=0.3, kid_index_seconds=0.01, frechet_seconds=6.0,
                           row_seconds=1e-4)
    assert summary_seconds([1], [timing]) == 0  # too small for a covariance: NaN, nothing computed
    # 36,500 pairs (a Places2 NVIDIA bin): streamed covariances of both sets, the D×D distance, 100 KID subsets
    large = 2 * 36_500 * 1e-4 + 6.0 + 100 * 0.3
    assert summary_seconds([36_500], [timing]) == pytest.approx(large)
    # 3,000 pairs, at least D: covariances and the distance as above; full kernels (9 subsets' worth) read 100 times
    middle = 2 * 3000 * 1e-4 + 6.0 + 0.3 * 9 + 100 * 0.01
    assert summary_seconds([3000], [timing]) == pytest.approx(middle)
    # 512 pairs, fewer than D: the distance from a 512×512 problem; kernels and reads a quarter of a subset's
    small = 2 * 512 * 1e-4 / 4 + 6.0 / 64 + 0.3 * 0.512 ** 2 + 100 * 0.01 * 0.512 ** 2
    assert summary_seconds([512], [timing]) == pytest.approx(small)
    assert summary_seconds([512, 36_500], [timing, timing]) == pytest.approx(2 * (small + large))


def test_the_summary_is_timed_with_the_cells_threads_and_counted_in_every_cells_evaluation(
        tmp_path, dataset, monkeypatch, capsys):
    calls = []

    def timed(width, threads, rows=bench.run.plan.SUMMARY_TIMED_ROWS):
        calls.append((width, threads))
        return SummaryTiming(width=2, kid_subset_seconds=1.0, kid_index_seconds=0.5, frechet_seconds=100.0,
                             row_seconds=0.0)

    monkeypatch.setattr(bench.run.plan, "time_summary", timed)
    values = plan_values(tmp_path, dataset)
    values["resources"].update(cpus_per_cell=2.0)
    out, text = planned(tmp_path, dataset, monkeypatch, capsys, values=values)
    assert calls and all(threads == 2 for _, threads in calls)
    assert len(calls) == len({width for width, _ in calls})  # each width timed once for the whole plan
    figures = json.loads((out / "plan.json").read_text())
    for cell in figures["cells"]:  # 6 pairs, one per NVIDIA bin: "All" and two paper bins have 2 or more
        assert cell["summary_seconds"] >= 100.0 * len(calls)
        assert cell["eval_seconds"] >= cell["summary_seconds"]
    assert re.search(r"the summaries \(FID and KID per bin, after a cell's last shard\) take [0-9]+ s in all", text)


def test_the_summary_timing_is_of_real_metric_calls():
    timing = time_summary(64, threads=1, rows=1100)
    assert timing.width == 64 and timing.kid_subset_seconds > 0 and timing.kid_index_seconds > 0
    assert timing.frechet_seconds > 0 and timing.row_seconds > 0


def test_a_sharded_cells_summary_holds_no_gpu():
    def cost(shards):
        return CellCost(cell=None, pairs=sum(shards), shards=shards, train_steps=0, inpaint_seconds=1.0,
                        harness_seconds=0.0, summary_seconds=5.0)

    assert held_seconds(cost([3, 3]), gpus=1) == 6  # the finishing task summarises on CPUs
    assert held_seconds(cost([3, 3]), gpus=0) == 11  # ... which are what a CPU cell holds anyway
    assert held_seconds(cost([6]), gpus=1) == 11  # one piece: the cell's own task, GPU and all, summarises
