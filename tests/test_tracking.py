"""MLflow tracking: URIs, nested runs per finished cell, idempotent logging, the report rebuilt from MLflow,
and a real ``mlflow server`` serving the runs back over http (what a user sees in the UI)."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.errors import UserError
from bench.run.tracking import (EXPERIMENT_KIND_TAG, PARENT_TAG, Tracker, bin_key, bin_label_of_key, cell_metrics,
                            default_uri, load_cells, parse_summary_metric_name, resolve_uri)
from reports.build import build_report, build_report_from_mlflow
from tiny_methods import empty_mlflow_store

pytestmark = pytest.mark.timeout(240)

BINS = ["(0.1,0.2]", "(0.3,0.4]", "All"]
CONFIG = {"out": "x", "train": {"steps": 3, "seed": 0}, "data": {"datasets": ["faces"]}, "method_options": {}}


def write_cell(out: Path, method: str, paper_name, values: dict[str, float], losses: pd.DataFrame | None) -> Path:
    """A finished cell folder as bench.run.cell.run_cell leaves it (cell.json, CSVs, composites, masks)."""
    folder = out / "faces" / method
    (folder / "images").mkdir(parents=True)
    rows, summary = [], []
    for index, label in enumerate(BINS[:-1]):
        composite = np.full((16, 16, 3), 40 * (index + 1), np.uint8)
        mask = np.zeros((16, 16), np.uint8)
        mask[4:9, 4:9] = 255
        Image.fromarray(composite).save(folder / "images" / f"p{index}.png")
        Image.fromarray(mask).save(folder / f"mask{index}.png")
        rows.append({"pair_id": f"p{index}", "image": "unused.png", "mask": str(folder / f"mask{index}.png"),
                     "output": str(folder / "images" / f"p{index}.png"), "ratio": 0.15 + 0.2 * index, "bin": label,
                     "psnr": values["psnr"]})
    for label in BINS:
        for metric, value in values.items():
            summary.append({"bin": label, "metric": metric, "value": value, "n": 2 if label == "All" else 1})
    pd.DataFrame(rows).to_csv(folder / "per_image.csv", index=False)
    pd.DataFrame(summary).to_csv(folder / "summary.csv", index=False, float_format="%.10g")
    if losses is not None:
        losses.to_csv(folder / "losses.csv", index=False)
        (folder / "model.pt").write_bytes(b"weights")
    record = {"method": method, "paper_name": paper_name, "dataset": "faces", "dataset_entry": "faces", "seed": 0,
              "device": "cpu", "protocol": "sahn-bench-protocol/1", "manifest_digest": "m" * 64,
              "num_parameters": {"generator": 123}, "substitutions": {}, "metric_networks": {"lpips": "unavailable"},
              "method_config": {"width": 4}, "train": {"steps": 3} if losses is not None else None,
              "train_seconds": 1.5, "eval_seconds": 0.5, "pairs": 2}
    (folder / "cell.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module")
def store_template(tmp_path_factory):
    return empty_mlflow_store(tmp_path_factory.mktemp("template"))


@pytest.fixture
def benchmark_folder(tmp_path, store_template):
    """Two finished cells with awkward floats (exact round trips matter), one of them trained, and an
    empty MLflow store at the default place (``<out>/mlflow.db``)."""
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(store_template, out / "mlflow.db")
    losses = pd.DataFrame({"step": [0, 1, 2], "g_total": [1 / 3, 0.25, math.pi / 20], "l1": [0.5, 0.4, 1e-7]})
    write_cell(out, "classical", None, {"psnr": 21.123456789, "MAE": 0.0312345678, "FD_lite0": 12.5}, None)
    write_cell(out, "tiny_net", "SAHN", {"psnr": 23.987654321, "MAE": 0.0212345678, "FD_lite0": 10.25}, losses)
    return out


def log_folder(out: Path, uri: str | None = None) -> Tracker:
    tracker = Tracker.open(uri or default_uri(out), "bench")
    tracker.start_benchmark(CONFIG, out)
    logged = tracker.logged_digests()
    for cell in sorted(out.rglob("cell.json")):
        tracker.log_cell(cell.parent, out=out, config_values=CONFIG, logged=logged)
    tracker.finish_benchmark("FINISHED", metrics={"cells": 2})
    return tracker


def test_default_uri_is_an_absolute_sqlite_file_inside_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_uri("results") == f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    assert resolve_uri(None, "results").startswith("sqlite:////")
    assert resolve_uri("sqlite:///rel/m.db", "results") == f"sqlite:///{tmp_path / 'rel' / 'm.db'}"
    assert resolve_uri("http://127.0.0.1:5000", "results") == "http://127.0.0.1:5000"


@pytest.mark.parametrize("uri", ["results/mlflow.db", "ftp://host/x", "file:///tmp/mlruns"])
def test_uris_mlflow_cannot_use_are_user_errors(uri):
    with pytest.raises(UserError, match="--mlflow-uri"):
        resolve_uri(uri, "out")


def test_unreachable_server_and_unwritable_store_fail_with_the_uri_named(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UserError, match=f"--mlflow-uri http://127.0.0.1:{port}: cannot open"):
        Tracker.open(f"http://127.0.0.1:{port}", "bench")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="--mlflow-uri sqlite:///.*cannot create"):
        Tracker.open(f"sqlite:///{blocker / 'sub' / 'mlflow.db'}", "bench")


def test_a_bad_mlflow_uri_stops_the_benchmark_before_any_work(tmp_path):
    import ray

    from pipelines.full_benchmark import run_benchmark
    from tiny_methods import config_from_dict, tiny_config_dict, write_folder_dataset

    was_connected = ray.is_initialized()
    dataset = write_folder_dataset(tmp_path / "data", train=1, test=1)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="--mlflow-uri ftp://"):
        run_benchmark(config_from_dict(tiny_config_dict(out, dataset, mlflow_uri="ftp://127.0.0.1/mlflow")))
    assert not out.exists()  # no image set, manifest or cell folder was made
    assert ray.is_initialized() == was_connected  # and no Ray cluster was started


def test_the_experiment_opens_on_the_runs_table_whether_created_or_reused(tmp_path, store_template):
    from mlflow.tracking import MlflowClient

    shutil.copy(store_template, tmp_path / "mlflow.db")
    uri = default_uri(tmp_path)
    client = MlflowClient(tracking_uri=uri)

    def kind(name: str) -> str | None:
        return client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)

    Tracker.open(uri, "created-here")
    assert kind("created-here") == "custom_model_development"
    client.create_experiment("made-before-the-tag")  # as an older harness (or another tool) left it
    assert kind("made-before-the-tag") is None
    Tracker.open(uri, "made-before-the-tag")
    assert kind("made-before-the-tag") == "custom_model_development"
    client.create_experiment("chosen-by-the-user", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    Tracker.open(uri, "chosen-by-the-user")
    assert kind("chosen-by-the-user") == "finetuning"


def test_bins_map_to_mlflow_names_and_back():
    for label in ["(0.0,0.1]", "(0.2,0.4]", "(0.5,0.6]", "All"]:
        assert bin_label_of_key(bin_key(label)) == label
    assert parse_summary_metric_name("psnr/0.2-0.4") == ("psnr", "(0.2,0.4]")
    assert parse_summary_metric_name("FD_lite0/all") == ("FD_lite0", "All")
    assert parse_summary_metric_name("params/generator") is None  # not a bin
    assert parse_summary_metric_name("loss/l1") is None


def test_cells_become_nested_runs_with_config_losses_metrics_and_artifacts(benchmark_folder):
    tracker = log_folder(benchmark_folder)
    client = tracker.client
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["train.steps"] == "3"
    runs = client.search_runs([tracker.experiment_id], f"tags.{PARENT_TAG} = '{tracker.parent_run_id}'")
    assert sorted(r.data.tags["sahn.cell_key"] for r in runs) == ["faces/classical/seed0", "faces/tiny_net/seed0"]
    trained = next(r for r in runs if r.data.tags["sahn.method"] == "tiny_net")
    assert trained.info.status == "FINISHED"
    assert trained.data.params["cell.method_config.width"] == "4" and trained.data.params["train.seed"] == "0"
    assert trained.data.tags["mlflow.source.git.commit"] and trained.data.tags["sahn.manifest_digest"] == "m" * 64
    summary = pd.read_csv(benchmark_folder / "faces" / "tiny_net" / "summary.csv")
    written = summary[(summary["metric"] == "psnr") & (summary["bin"] == "(0.3,0.4]")]["value"].item()
    assert trained.data.metrics["psnr/0.3-0.4"] == written and trained.data.metrics["n/psnr/all"] == 2
    history = client.get_metric_history(trained.info.run_id, "loss/g_total")
    assert [(m.step, m.value) for m in history] == [(0, 1 / 3), (1, 0.25), (2, math.pi / 20)]
    artifacts = {a.path for a in client.list_artifacts(trained.info.run_id)}
    assert {"per_image.csv", "summary.csv", "losses.csv", "samples.png", "cell_record.json", "checkpoint",
            "environment"} <= artifacts
    assert [a.path for a in client.list_artifacts(trained.info.run_id, "checkpoint")] == ["checkpoint/model.pt"]
    grid = Image.open(client.download_artifacts(trained.info.run_id, "samples.png", str(benchmark_folder.parent)))
    assert grid.size == (32, 32)  # two pairs (one per bin), each masked input | composite at 16²


def test_relogging_the_same_cells_adds_no_runs_and_a_rerun_cell_gets_a_new_one(benchmark_folder):
    log_folder(benchmark_folder)
    tracker = log_folder(benchmark_folder)  # a second invocation: a new parent, no new cell runs
    assert len(tracker.cell_runs()) == 2
    parents = tracker.client.search_runs([tracker.experiment_id], "tags.`sahn.role` = 'benchmark'")
    assert len(parents) == 2
    record_path = benchmark_folder / "faces" / "tiny_net" / "cell.json"
    record = json.loads(record_path.read_text())
    record["train_seconds"] = 9.0  # the cell was run again from scratch: a different cell.json
    record_path.write_text(json.dumps(record))
    tracker = log_folder(benchmark_folder)
    assert len(tracker.cell_runs()) == 3
    cells = load_cells(tracker.uri, "bench")
    assert [c.record["train_seconds"] for c in cells if c.method == "tiny_net"] == [9.0]  # the newest run wins


# cell.json's eval_shards as bench.run.cell.cell_record writes it for a cell evaluated in three shards.
EVAL_SHARDS = [{"pairs": [0, 40], "seconds": 12.25, "device": "cuda", "gpu_ids": [0], "node_id": "node-a"},
               {"pairs": [40, 80], "seconds": 1 / 3, "device": "cuda", "gpu_ids": [1], "node_id": "node-b"},
               {"pairs": [80, 90], "seconds": 7.5, "device": "cpu", "gpu_ids": [], "node_id": None}]
SHARD_METRICS = ("time/eval_shard_seconds", "eval_shards")


def test_a_sharded_cell_logs_its_shards_seconds_as_one_series_and_their_count(tmp_path):
    folder = write_cell(tmp_path, "tiny_net", "SAHN", {"psnr": 23.5, "MAE": 0.02}, None)
    whole = json.loads((folder / "cell.json").read_text())
    in_one_piece = [(m.key, m.value, m.step) for m in cell_metrics(folder, whole, 1000)]
    assert not [m for m in in_one_piece if m[0] in SHARD_METRICS]
    sharded = [(m.key, m.value, m.step) for m in cell_metrics(folder, {**whole, "eval_shards": EVAL_SHARDS}, 1000)]
    assert sorted((m for m in sharded if m[0] in SHARD_METRICS), key=lambda m: (m[0], m[2])) == [
        ("eval_shards", 3.0, 0),
        ("time/eval_shard_seconds", 12.25, 0), ("time/eval_shard_seconds", 1 / 3, 1),
        ("time/eval_shard_seconds", 7.5, 2)]
    assert [m for m in sharded if m[0] not in SHARD_METRICS] == in_one_piece  # the rest is as for one piece


def test_shard_timings_reach_mlflow_as_a_history_of_the_cell_run(benchmark_folder):
    record_path = benchmark_folder / "faces" / "tiny_net" / "cell.json"
    record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "eval_shards": EVAL_SHARDS}))
    tracker = log_folder(benchmark_folder)
    cell_runs = tracker.cell_runs()
    assert len(cell_runs) == 2  # shards are not runs
    runs = {run.data.tags["sahn.method"]: run for run in (tracker.client.get_run(r.run_id) for r in cell_runs)}
    history = tracker.client.get_metric_history(runs["tiny_net"].info.run_id, "time/eval_shard_seconds")
    assert sorted((m.step, m.value) for m in history) == [(0, 12.25), (1, 1 / 3), (2, 7.5)]
    assert runs["tiny_net"].data.metrics["eval_shards"] == 3
    assert not set(SHARD_METRICS) & set(runs["classical"].data.metrics)
    tracked = next(c for c in load_cells(tracker.uri, "bench") if c.method == "tiny_net").summary()
    folder_summary = pd.read_csv(record_path.parent / "summary.csv")
    assert sorted(zip(tracked["metric"], tracked["bin"])) == sorted(
        zip(folder_summary["metric"], folder_summary["bin"]))  # no shard metric is read back as a score


# Sections drawn from files that MLflow does not hold (composites, manifests, efficiency.csv) say so when the
# report is rebuilt from MLflow; every section built from tracked values must be identical.
FOLDER_ONLY_SECTIONS = ("## Differences to SAHN", "## Qualitative comparison", "## Computational efficiency")


def tracked_sections(report: str) -> list[str]:
    sections = report.split("\n## ")
    return [s for s in sections if not any(("## " + s).startswith(h) for h in FOLDER_ONLY_SECTIONS)]


def test_report_from_mlflow_equals_report_from_the_folder(benchmark_folder, tmp_path):
    tracker = log_folder(benchmark_folder)
    from_folder = build_report(benchmark_folder)
    from_mlflow = build_report_from_mlflow(tracker.uri, "bench", tmp_path / "from-mlflow")
    assert tracked_sections(from_mlflow.read_text()) == tracked_sections(from_folder.read_text())
    assert len(tracked_sections(from_folder.read_text())) >= 3  # title, the dataset table, provenance
    for tex in sorted((benchmark_folder / "report" / "tables").glob("*.tex")):
        if tex.name.startswith(("intervals", "efficiency")):  # from per-image files and efficiency.csv
            continue
        assert (tmp_path / "from-mlflow" / "report" / "tables" / tex.name).read_text() == tex.read_text()
    assert (tmp_path / "from-mlflow" / "report" / "figures" / "losses_faces.png").exists()
    assert "1 finished" not in from_folder.read_text() and "2 finished cells" in from_folder.read_text()


def test_report_cli_reads_an_experiment_and_names_what_is_missing(benchmark_folder, tmp_path, capsys, monkeypatch):
    from reports.build import main

    tracker = log_folder(benchmark_folder)
    report = main(["--from", "bench", "--mlflow-uri", tracker.uri, "--out", str(tmp_path / "r")])
    assert report == tmp_path / "r" / "report.md" and "tiny_net (SAHN)" in report.read_text()
    monkeypatch.chdir(tmp_path)  # the default output folder, ./report-<experiment>, would go here
    with pytest.raises(UserError, match="no MLflow experiment 'nope'.*bench"):
        main(["--from", "nope", "--mlflow-uri", tracker.uri])
    assert not (tmp_path / "report-nope").exists()  # refused before anything was made
    with pytest.raises(UserError, match="--from .*no-such-folder: no such results folder"):
        main(["--from", str(tmp_path / "no-such-folder")])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, seconds: float) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server at {url} not ready after {seconds} s")


def test_a_real_mlflow_server_serves_the_runs_back_over_http(benchmark_folder, tmp_path):
    from mlflow.tracking import MlflowClient

    tracker = log_folder(benchmark_folder)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracker.uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        wait_until_serving(url, server, seconds=180)
        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("bench")
        parents = client.search_runs([experiment.experiment_id], "tags.`sahn.role` = 'benchmark'")
        assert [p.info.run_id for p in parents] == [tracker.parent_run_id]
        nested = client.search_runs([experiment.experiment_id], f"tags.{PARENT_TAG} = '{tracker.parent_run_id}'")
        assert len(nested) == 2
        trained = next(r for r in nested if r.data.tags["sahn.method"] == "tiny_net")
        assert len(client.get_metric_history(trained.info.run_id, "loss/l1")) == 3
        assert "per_image.csv" in {a.path for a in client.list_artifacts(trained.info.run_id)}
        report = build_report_from_mlflow(url, "bench", tmp_path / "over-http")
        assert tracked_sections(report.read_text()) == tracked_sections(build_report(benchmark_folder).read_text())
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(timeout=30)
        log.close()
