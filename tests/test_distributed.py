"""Cells as Ray tasks on a local 2-CPU cluster: nested MLflow runs, a crashed worker retried from its
checkpoint, infeasible requests failing fast, and a two-node cluster losing a node mid-run."""
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from bench.config import ResourceConfig
from bench.run.distributed import CellsFailed
from bench.run.resources import cell_threads, infeasibility
from bench.errors import UserError
from bench.run.tracking import PARENT_TAG
from pipelines.full_benchmark import run_benchmark
from tiny_methods import config_from_dict, empty_mlflow_store, ensure_local_ray, tiny_config_dict, write_folder_dataset

pytestmark = pytest.mark.timeout(300)

GRID = {"methods": ("tiny_trainer",), "seeds": (0, 1)}  # two trainable cells


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "data")


@pytest.fixture(scope="module")
def store_template(tmp_path_factory):
    return empty_mlflow_store(tmp_path_factory.mktemp("template"))


def config_for(out: Path, dataset: Path, store_template: Path | None, **options):
    """A tiny config; its MLflow store starts as a copy of the template (the default place, <out>/mlflow.db)."""
    if store_template is not None:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(store_template, out / "mlflow.db")
    return config_from_dict(tiny_config_dict(out, dataset, **options))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset, store_template):
    """The two-cell grid, uninterrupted, through Ray: what every interrupted run must reproduce."""
    ensure_local_ray()
    out = tmp_path_factory.mktemp("reference") / "out"
    run_benchmark(config_for(out, dataset, store_template, **GRID))
    return out


def cell_files(out: Path, name: str) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob(f"*/tiny_trainer/**/{name}"))}


def tables(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((out / "report" / "tables").glob("*.tex"))}


def mlflow_client(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    return client, client.get_experiment_by_name("tiny").experiment_id


# ------------------------------------------------------------------------------------ pure checks
def test_infeasible_requests_are_found_without_a_cluster():
    two_single_gpu_nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert infeasibility({"CPU": 1.0, "GPU": 0.5}, two_single_gpu_nodes) is None  # fractional GPUs fit
    problem = infeasibility({"CPU": 1.0, "GPU": 2.0}, two_single_gpu_nodes)  # 2 GPUs in total, but not on one node
    assert "2 GPU" in problem and "largest node: 8 CPU, 1 GPU" in problem
    assert infeasibility({"CPU": 16.0, "GPU": 0.0}, two_single_gpu_nodes) is not None
    assert cell_threads(ResourceConfig(cpus_per_cell=0.5)) == 1 and cell_threads(ResourceConfig(cpus_per_cell=3)) == 3


# ------------------------------------------------------------------------------------ local cluster
def test_a_two_cell_grid_runs_through_ray_and_lands_in_mlflow_as_nested_runs(reference):
    client, experiment = mlflow_client(reference)
    parents = client.search_runs([experiment], "tags.`sahn.role` = 'benchmark'")
    assert [p.info.status for p in parents] == ["FINISHED"]
    parent = parents[0]
    assert parent.data.metrics["cells_run"] == 2 and parent.data.params["train.steps"] == "6"
    cells = client.search_runs([experiment], f"tags.{PARENT_TAG} = '{parent.info.run_id}'")
    assert sorted(c.data.tags["sahn.cell_key"] for c in cells) == ["folder-data/tiny_trainer/seed0",
                                                                  "folder-data/tiny_trainer/seed1"]
    for cell in cells:
        assert cell.info.status == "FINISHED" and cell.data.tags["ray.node_id"]
        assert len(client.get_metric_history(cell.info.run_id, "loss/total")) == 6
        assert "psnr/all" in cell.data.metrics and cell.data.tags["sahn.dataset_digest"] != "unknown"
        assert {"per_image.csv", "samples.png", "checkpoint"} <= {a.path for a in client.list_artifacts(cell.info.run_id)}
    assert (reference / "report.md").exists() and r"tiny\_trainer" in tables(reference)["folder-data.tex"]


def test_a_worker_killed_mid_training_is_retried_and_resumes_from_its_checkpoint(tmp_path, dataset, store_template,
                                                                                   reference):
    out = tmp_path / "out"
    options = {"tiny_trainer": {"crash_at_step": 3, "crash_marker": str(tmp_path / "crashed"),
                                "start_log": str(tmp_path / "starts.log")}}
    run_benchmark(config_for(out, dataset, store_template, **GRID, method_options=options))
    assert (tmp_path / "crashed").exists()  # the worker did die
    # Every cell trains from step 0 once; the crashed one again from its step-2 checkpoint (checkpoint_every=2).
    assert sorted(int(s) for s in (tmp_path / "starts.log").read_text().split()) == [0, 0, 2]
    assert cell_files(out, "losses.csv") == cell_files(reference, "losses.csv")
    assert cell_files(out, "summary.csv") == cell_files(reference, "summary.csv")
    assert tables(out) == tables(reference)


def test_a_cell_that_raises_is_not_retried_and_the_other_cells_still_finish(tmp_path, dataset, store_template,
                                                                            reference):
    out = tmp_path / "out"
    options = {"tiny_trainer": {"fail_at_step": 1, "start_log": str(tmp_path / "starts.log")}}
    config = config_for(out, dataset, store_template, methods=("diffusion_fill", "tiny_trainer"), method_options=options)
    with pytest.raises(CellsFailed, match="folder-data/tiny_trainer/seed0: RuntimeError: tiny_trainer fails at step 1"):
        run_benchmark(config)
    assert (tmp_path / "starts.log").read_text().split() == ["0"]  # one attempt: an exception is not retried
    assert (out / "folder-data" / "diffusion_fill" / "cell.json").exists()
    client, experiment = mlflow_client(out)
    assert [p.info.status for p in client.search_runs([experiment], "tags.`sahn.role` = 'benchmark'")] == ["FAILED"]
    cells = client.search_runs([experiment], "tags.`sahn.role` = 'cell'")
    assert [c.data.tags["sahn.cell_key"] for c in cells] == ["folder-data/diffusion_fill/seed0"]


@pytest.mark.timeout(120)
def test_an_infeasible_gpu_request_fails_at_once_with_a_clear_message(tmp_path, dataset, store_template):
    ensure_local_ray()
    out = tmp_path / "out"
    config = config_for(out, dataset, store_template, **GRID)
    config.resources.gpus_per_cell = 1.0
    with pytest.raises(UserError, match=r"each cell asks for 1 CPU, 1 GPU, but no node .* has that \(largest node: "
                                        r"2 CPU, 0 GPU"):
        run_benchmark(config)
    assert not (out / "folder-data").exists()  # nothing was prepared, nothing ran


# ------------------------------------------------------------------------------------ two nodes
def test_two_node_cluster_uses_both_nodes_and_survives_losing_one_mid_run(tmp_path, dataset, store_template, reference):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test needs its own cluster; the next test that wants the local one restarts it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 128 * 2**20})
    try:
        victim = cluster.add_node(num_cpus=1, resources={"victim": 1}, object_store_memory=128 * 2**20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        head_id = ray.get_runtime_context().get_node_id()
        marker = tmp_path / "paused.json"
        options = {"tiny_trainer": {"pause_at_step": 4, "pause_marker": str(marker), "pause_on_resource": "victim",
                                    "start_log": str(tmp_path / "starts.log")}}
        removed = threading.Event()

        def remove_victim_once_a_cell_is_parked_on_it():
            deadline = time.monotonic() + 200
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            if marker.exists():
                cluster.remove_node(victim)
                removed.set()

        remover = threading.Thread(target=remove_victim_once_a_cell_is_parked_on_it, daemon=True)
        remover.start()
        out = tmp_path / "out"
        run_benchmark(config_for(out, dataset, store_template, **GRID, method_options=options))
        remover.join(timeout=10)
        assert removed.is_set(), "no cell ran on the second node"
        victim_id = json.loads(marker.read_text())["node_id"]
        assert victim_id != head_id  # one cell ran on each node ...
        client, experiment = mlflow_client(out)
        assert {c.data.tags["ray.node_id"] for c in client.search_runs([experiment], "tags.`sahn.role` = 'cell'")} == {
            head_id}  # ... and after the second node was removed, its cell finished on the head
        assert sorted(int(s) for s in (tmp_path / "starts.log").read_text().split()) == [0, 0, 4]
        assert tables(out) == tables(reference)
        assert cell_files(out, "summary.csv") == cell_files(reference, "summary.csv")
    finally:
        ray.shutdown()
        cluster.shutdown()
