"""Published checkpoints through the pipeline: a cell with ``weights`` evaluates the loaded model without
training (or fine-tunes it with ``finetune``), records what it loaded, and bad checkpoints stop the run
with one line before anything is written."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from bench.run.cell import CellSpec, cell_fingerprint, cell_method, parse_dataset
from bench.weights import PublishedWeights, check_published_weights, checkpoint_sha256, weights_path
from bench.data.datasets import load_image_set
from bench.run.resources import torch_threads
from bench.errors import UserError
from bench.run.evaluate import evaluate
from bench.data.manifest import load_manifest
from bench.methods import create_method
from bench.metrics.scoring import Scorer
from bench.run.train import train
from pipelines.full_benchmark import run_benchmark
from official_layouts import LoadCounter, ctsdg_file, ddnm_file, ec_folder, lama_folder, spl_file
from tiny_methods import config_from_dict, tiny_config_dict, write_folder_dataset

pytestmark = pytest.mark.timeout(300)
PATH_COLUMNS = ["image", "mask", "output"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_folder_dataset(tmp_path_factory.mktemp("data"))


def label(dataset: Path) -> str:
    return parse_dataset(f"folder:{dataset}").label


def saved_trainer(path: Path, seed: int = 7) -> Path:
    """A harness checkpoint of tiny_trainer with deterministic weights that no cell would start from."""
    torch.manual_seed(seed)
    create_method("tiny_trainer").save(path)
    return path


def benchmark(out: Path, dataset: Path, weights: dict, **changes):
    values = tiny_config_dict(out, dataset, methods=("tiny_trainer",), serial=True)
    values["weights"] = weights
    for key, value in changes.items():
        section, _, field = key.partition(".")
        (values[section].__setitem__(field, value) if field else values.__setitem__(key, value))
    return config_from_dict(values)


def direct_scores(checkpoint: Path, cell_dir: Path, out: Path) -> pd.DataFrame:
    """Score ``inpaint`` of the loaded model on the cell's manifest, outside the pipeline (with the cell's
    one torch thread: float sums depend on the thread count)."""
    method = create_method("tiny_trainer").load(checkpoint)
    manifest = load_manifest(cell_dir.parent / "manifest")
    with torch_threads(1):
        evaluate(method, manifest, out, Scorer(device=torch.device("cpu")), batch_size=8, progress=False)
    return pd.read_csv(out / "per_image.csv")


def test_weights_are_evaluated_as_released_and_recorded(tmp_path, dataset):
    checkpoint = saved_trainer(tmp_path / "released.pt")
    out = tmp_path / "out"
    report = run_benchmark(benchmark(out, dataset, {"tiny_trainer": str(checkpoint)}))
    cell_dir = out / label(dataset) / "tiny_trainer"
    record = json.loads((cell_dir / "cell.json").read_text())

    assert record["train"] is None and record["train_seconds"] == 0
    assert not (cell_dir / "losses.csv").exists() and not (cell_dir / "model.pt").exists()
    assert record["weights"] == {"path": str(checkpoint), "sha256": checkpoint_sha256(checkpoint),
                                 "format": "harness", "release": "a sahn-bench checkpoint of tiny_trainer",
                                 "variant": "tiny_trainer", "use": "as released", "finetune_steps": None}
    ours = pd.read_csv(cell_dir / "per_image.csv").drop(columns=PATH_COLUMNS)
    theirs = direct_scores(checkpoint, cell_dir, tmp_path / "direct").drop(columns=PATH_COLUMNS)
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.`sahn.role` = 'cell'")
    assert run.data.params["cell.weights.sha256"] == record["weights"]["sha256"]
    assert run.data.params["cell.weights.path"] == str(checkpoint)
    assert run.data.params["cell.weights.use"] == "as released"
    text = report.read_text()
    assert "tiny_trainer [published weights]" in text
    assert f"| {label(dataset)} | tiny_trainer | `released.pt` | `{record['weights']['sha256'][:16]}…` | harness |" in text


def test_a_per_dataset_mapping_picks_the_cell_dataset_and_needs_every_dataset(tmp_path, dataset):
    checkpoint = saved_trainer(tmp_path / "released.pt")
    assert weights_path({"ec": {"celeba": "/a", "paris": "/b"}}, "ec", "paris") == "/b"
    assert weights_path({"ec": "/a"}, "ec", "anything") == "/a"
    assert weights_path({"ec": "/a"}, "ctsdg", "paris") is None
    out = tmp_path / "out"
    run_benchmark(benchmark(out, dataset, {"tiny_trainer": {label(dataset): str(checkpoint)}}))
    record = json.loads((out / label(dataset) / "tiny_trainer" / "cell.json").read_text())
    assert record["weights"]["sha256"] == checkpoint_sha256(checkpoint)


def test_the_fingerprint_follows_the_checkpoint_bytes_not_its_path(tmp_path, dataset):
    checkpoint = saved_trainer(tmp_path / "released.pt")
    config = benchmark(tmp_path / "out", dataset, {"tiny_trainer": str(checkpoint)})

    def fingerprint() -> str:
        weights = PublishedWeights(str(checkpoint), checkpoint_sha256(checkpoint), "harness", "x", "tiny_trainer")
        return cell_fingerprint(config, CellSpec("tiny_trainer", f"folder:{dataset}", 0, "/c", "/m", weights))

    before = fingerprint()
    assert fingerprint() == before
    saved_trainer(checkpoint, seed=8)  # same path, other bytes
    assert fingerprint() != before
    without = cell_fingerprint(config, CellSpec("tiny_trainer", f"folder:{dataset}", 0, "/c", "/m"))
    assert without not in (before, fingerprint())


def test_changing_the_file_after_a_run_never_reuses_its_results(tmp_path, dataset):
    checkpoint = saved_trainer(tmp_path / "released.pt")
    out = tmp_path / "out"
    run_benchmark(benchmark(out, dataset, {"tiny_trainer": str(checkpoint)}))
    saved_trainer(checkpoint, seed=8)
    with pytest.raises(UserError, match="holds results made with other options"):
        run_benchmark(benchmark(out, dataset, {"tiny_trainer": str(checkpoint)}))


def test_finetune_trains_from_the_loaded_weights(tmp_path, dataset):
    checkpoint = saved_trainer(tmp_path / "released.pt")
    out = tmp_path / "out"
    config = benchmark(out, dataset, {"tiny_trainer": str(checkpoint)}, **{"train.steps": 3, "train.finetune": True})
    run_benchmark(config)
    cell_dir = out / label(dataset) / "tiny_trainer"
    record = json.loads((cell_dir / "cell.json").read_text())
    assert record["weights"]["use"] == "fine-tuned" and record["weights"]["finetune_steps"] == 3
    assert record["train"]["finetune"] is True and (cell_dir / "model.pt").exists()
    first = pd.read_csv(cell_dir / "losses.csv").iloc[0]

    # The same first step, taken here from the loaded model and from a fresh one: the cell's equals the former.
    images = load_image_set("folder", "train", root=str(dataset), image_size=32)
    one_step = dataclasses.replace(config.train, steps=1, seed=0)
    loaded = train(create_method("tiny_trainer").load(checkpoint), images, one_step, progress=False).history[0]
    torch.manual_seed(0)
    fresh = train(create_method("tiny_trainer"), images, one_step, progress=False).history[0]
    assert first["total"] == pytest.approx(loaded["total"], rel=1e-6)
    assert abs(loaded["total"] - fresh["total"]) > 1e-3


def run_cli(out: Path, dataset: Path, weights: dict, tmp_path: Path, methods=("tiny_trainer",)):
    """The benchmark as a user runs it (tiny_methods.py is the driver that registers tiny_trainer)."""
    values = tiny_config_dict(out, dataset, methods=methods, serial=True)
    values["weights"] = weights
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(values))
    return subprocess.run([sys.executable, str(Path(__file__).with_name("tiny_methods.py")), str(config_file)],
                          capture_output=True, text=True, timeout=240)


def bad_input_cases(tmp_path: Path, dataset: Path) -> dict[str, tuple[dict, str]]:
    good = saved_trainer(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])

    class Payload:
        def __reduce__(self):
            return (exec, ("print('pwned')",))

    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": Payload()}, pickled)
    other = tmp_path / "other.pt"
    create_method("diffusion_fill").save(other)
    return {
        "truncated": ({"tiny_trainer": str(truncated)}, f"{truncated}: truncated or corrupted"),
        "pickle": ({"tiny_trainer": str(pickled)}, f"{pickled}: holds a pickled Python object (exec)"),
        "missing": ({"tiny_trainer": str(tmp_path / "absent.pt")}, "absent.pt does not exist"),
        "other method": ({"tiny_trainer": str(other)},
                         f"{other}: a sahn-bench checkpoint of 'diffusion_fill', not of 'tiny_trainer'"),
        "missing dataset": ({"tiny_trainer": {"celeba": str(good)}},
                            f"weights for tiny_trainer name datasets ['celeba'] but not '{label(dataset)}'"),
        "not in the run": ({"ec": str(good)}, "weights given for ['ec'], which this run does not include"),
    }


@pytest.mark.parametrize("case", ["truncated", "pickle", "missing", "other method", "missing dataset",
                                  "not in the run"])
def test_bad_checkpoints_stop_the_run_with_one_line_before_anything_is_written(tmp_path, dataset, case):
    weights, expected = bad_input_cases(tmp_path, dataset)[case]
    out = tmp_path / "out"
    done = run_cli(out, dataset, weights, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr[-2000:]
    assert "weights_only=False" not in done.stderr and "Traceback" not in done.stderr
    assert "pwned" not in done.stdout
    assert not out.exists() or not list(out.rglob("cell.json")) and not list(out.rglob("per_image.csv"))
    assert not out.exists(), f"{out} was created: {sorted(p.name for p in out.rglob('*'))}"


def test_finetune_of_a_method_that_cannot_train_is_refused_before_any_work(tmp_path, dataset):
    saved = tmp_path / "fill.pt"
    create_method("diffusion_fill").save(saved)
    config = benchmark(tmp_path / "out", dataset, {"diffusion_fill": str(saved)}, methods=["diffusion_fill"],
                       **{"train.finetune": True})
    with pytest.raises(UserError, match="cannot be fine-tuned"):
        run_benchmark(config)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ official releases through the pipeline
OFFICIAL = ("lama_tiny", "ec_tiny", "ctsdg_tiny", "spl_tiny", "spn_tiny", "ddnm_tiny")


def official_releases(root: Path) -> dict[str, str]:
    """Each baseline's official layout (tiny sizes, deterministic weights): method → path."""
    ec_folder(root / "ec" / "celeba")
    ctsdg_file(root / "ctsdg" / "celeba.pt")
    spl_file(root / "spl" / "celeba.pth")
    spl_file(root / "spn" / "celeba.pth", name="spn_tiny")
    lama_folder(root / "lama" / "lama-fourier")
    ddnm_file(root / "ddnm" / "celeba_hq.ckpt")
    return {"ec_tiny": str(root / "ec" / "celeba"), "ctsdg_tiny": str(root / "ctsdg" / "celeba.pt"),
            "spl_tiny": str(root / "spl" / "celeba.pth"), "spn_tiny": str(root / "spn" / "celeba.pth"),
            "lama_tiny": str(root / "lama" / "lama-fourier"), "ddnm_tiny": str(root / "ddnm" / "celeba_hq.ckpt")}


def test_official_releases_of_every_baseline_are_evaluated_as_released(tmp_path):
    dataset = write_folder_dataset(tmp_path / "photos", train=0, test=1, size=64)
    releases = official_releases(tmp_path / "weights")
    values = tiny_config_dict(tmp_path / "out", dataset, methods=OFFICIAL, serial=True, steps=50)
    values["data"]["image_size"] = 64
    values["weights"] = releases
    report = run_benchmark(config_from_dict(values))  # no training split: nothing may train
    text = report.read_text()
    for name, path in releases.items():
        cell_dir = tmp_path / "out" / label(dataset) / name
        record = json.loads((cell_dir / "cell.json").read_text())
        assert record["train"] is None and not (cell_dir / "losses.csv").exists(), name
        weights = record["weights"]
        assert (weights["path"], weights["format"], weights["use"]) == (path, "official", "as released"), name
        assert weights["sha256"] == checkpoint_sha256(path, create_method(name).load(path).loaded_checkpoint.files)
        method = create_method(name).load(path)
        direct = tmp_path / "direct" / name
        with torch_threads(1):
            evaluate(method, load_manifest(cell_dir.parent / "manifest"), direct, Scorer(device=torch.device("cpu")),
                     batch_size=8, progress=False)
        ours = pd.read_csv(cell_dir / "per_image.csv").drop(columns=PATH_COLUMNS)
        theirs = pd.read_csv(direct / "per_image.csv").drop(columns=PATH_COLUMNS)
        pd.testing.assert_frame_equal(ours, theirs, check_exact=True, obj=name)
        assert f"{name} (" in text and "[published weights]" in text
    assert text.count("[published weights]") >= len(releases)


def test_an_official_release_changed_in_place_changes_the_fingerprint(tmp_path):
    path = tmp_path / "ctsdg.pt"
    ctsdg_file(path)
    config = config_from_dict(tiny_config_dict(tmp_path / "out", tmp_path, methods=("ctsdg_tiny",)))

    def fingerprint() -> str:
        weights = PublishedWeights(str(path), checkpoint_sha256(path), "official", "CTSDG", "ctsdg_tiny")
        return cell_fingerprint(config, CellSpec("ctsdg_tiny", "faces", 0, "/c", "/m", weights))

    before = fingerprint()
    ctsdg_file(path, seed=1)
    assert fingerprint() != before


def test_a_release_of_another_method_stops_the_run_naming_what_it_is(tmp_path, dataset):
    releases = tmp_path / "weights"
    ec_folder(releases / "ec" / "celeba")
    out = tmp_path / "out"
    done = run_cli(out, dataset, {"ctsdg_tiny": str(releases / "ec" / "celeba")}, tmp_path, methods=("ctsdg_tiny",))
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "EdgeConnect" in errors[0] and "loads into method ec_tiny, not ctsdg_tiny" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize("kind", ["ctsdg", "lama"])
def test_the_driver_check_and_a_cell_each_read_a_published_file_once(tmp_path, monkeypatch, kind):
    """The driver loads a file once for all the datasets it serves; a cell loads it once and checks its bytes with
    one streaming hash (LaMa's Lightning file: a refused plain read, then the inert one)."""
    if kind == "ctsdg":
        ctsdg_file(tmp_path / "weights" / "celeba.pt")
        method, path, checkpoint = "ctsdg_tiny", tmp_path / "weights" / "celeba.pt", tmp_path / "weights" / "celeba.pt"
    else:
        lama_folder(tmp_path / "weights" / "lama-fourier")
        method, path = "lama_tiny", tmp_path / "weights" / "lama-fourier"
        checkpoint = path / "models" / "best.ckpt"
    reads = 2 if kind == "lama" else 1
    config = config_from_dict(tiny_config_dict(tmp_path / "out", tmp_path, methods=(method,)))
    counter = LoadCounter(monkeypatch)
    checked = check_published_weights({method: str(path)}, [method], ["celeba", "paris", "places2"],
                                      create=create_method, finetune=lambda name: False)
    assert [file for file, _ in counter.loads] == [str(checkpoint)] * reads and counter.hashes == [str(checkpoint)]
    cell = CellSpec(method, "faces", 0, str(tmp_path / "cell"), str(tmp_path / "manifest"), checked[(method, "paris")])
    cell_method(config, cell, torch.device("cpu"), trained=False)
    assert len(counter.loads) == 2 * reads and counter.hashes == [str(checkpoint)] * 2
