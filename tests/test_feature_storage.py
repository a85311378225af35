"""How a cell stores what its set-level metrics need, and what that costs: float32 composite features, the ground
truth once per test image in the manifest's cache (one file per key) and referenced by the cells, FID/KID exactly
as before from those files, bytes per pair within budget, and pieces written as they are scored and a merge,
neither of whose memory grows with the pairs."""
import functools
import itertools
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import bench.metrics.aggregate
import bench.run.evaluate
from bench.metrics.aggregate import GT_ROWS, DEFAULT_BINS, bin_members, open_features, save_features, summarize
from bench.run.evaluate import (FEATURES_FORMAT, GroundTruth, PairResults, ScoredBatch, cell_features, key_digest,
                                write_pair_files, write_results)
from bench.metrics.functional import frechet_distance_of_features, kid
from bench.metrics.scoring import Scorer
from bench.run.resources import finish_task_memory
from bench.run.shards import Shard, merge_shards, write_shard_done, write_shard_files

pytestmark = pytest.mark.timeout(600)

NVIDIA_BINS = ["(0.0,0.1]", "(0.1,0.2]", "(0.2,0.3]", "(0.3,0.4]", "(0.4,0.5]", "(0.5,0.6]"]
#: the two networks' widths; the arrays here are synthetic stand-ins of their features
INCEPTION_DIM, LITE0_DIM = 2048, 1280


def synthetic_cell(images: int, dims: dict[str, int], seed: int = 0):
    """``images`` test images × the six NVIDIA bins: per-image rows, float32 composite features per pair and the
    ground truth's per test image (as the networks give them: float32), and every pair's image row."""
    rng = np.random.default_rng(seed)
    pairs = images * len(NVIDIA_BINS)
    image_rows = np.repeat(np.arange(images), len(NVIDIA_BINS)).astype(np.int32)
    bins = np.tile(np.arange(len(NVIDIA_BINS)), images)
    ratios = 0.1 * bins + 0.05
    per_image = pd.DataFrame({"pair_id": [f"p{i:07d}" for i in range(pairs)], "ratio": ratios,
                              "bin": [NVIDIA_BINS[b] for b in bins], "psnr": rng.normal(30, 3, pairs),
                              "ssim": rng.uniform(0.5, 1.0, pairs)})
    truth = {f"gt/{name}": rng.normal(size=(images, dim)).astype(np.float32) for name, dim in dims.items()}
    pred = {f"pred/{name}": (truth[f"gt/{name}"][image_rows] + rng.normal(scale=0.3 + 0.1 * bins[:, None],
                                                                         size=(pairs, dim))).astype(np.float32)
            for name, dim in dims.items()}
    return per_image, pred, truth, image_rows


def summary_as_before(per_image: pd.DataFrame, pred: dict, truth: dict, image_rows: np.ndarray,
                      kid_subsets: int) -> pd.DataFrame:
    """The set-level rows as the code before this storage computed them: float64 features of the composites and
    the ground truth copied to every pair, a bin's rows selected whole, then FID and KID."""
    rows = []
    for label in DEFAULT_BINS:
        selected = bin_members(per_image["ratio"], label)
        for key in pred:
            name = key.partition("/")[2]
            fd_name, kid_name = bench.metrics.aggregate.set_metric_names(name)
            a = pred[key].astype(np.float64)[selected]
            b = truth[f"gt/{name}"].astype(np.float64)[image_rows][selected]
            fd = frechet_distance_of_features(a, b) if len(a) >= 2 else float("nan")
            kid_mean, kid_std = kid(a, b, kid_subsets) if len(a) >= 2 else (float("nan"), float("nan"))
            rows += [(label, fd_name, fd), (label, kid_name, kid_mean), (label, f"{kid_name}_std", kid_std)]
    return pd.DataFrame(rows, columns=["bin", "metric", "value"])


def write_cache(folder: Path, truth: dict, key: str) -> Path:
    path = folder / "manifest" / f"gt_features-{key_digest(key)}.npz"
    save_features(path, {**truth, "provenance": np.array(key), "images_digest": np.array("-")})
    return path


def test_fid_and_kid_of_a_2000_pair_cell_are_those_of_the_float64_copied_features(tmp_path, monkeypatch):
    """Widths 512 and 64 put the NVIDIA bins (334 pairs) on FID's N < D path and 'All' (2004) on its N ≥ D path.
    KID draws 10 subsets instead of 100 (to save time here; each subset is computed alike)."""
    monkeypatch.setattr(bench.run.evaluate, "summarize", functools.partial(summarize, kid_subsets=10))
    per_image, pred, truth, image_rows = synthetic_cell(334, {"inception_v3_fid": 512, "efficientnet_lite0": 64})
    key = "stand-in key"
    ground_truth = GroundTruth(write_cache(tmp_path, truth, key), key_digest(key), image_rows)
    cell = tmp_path / "cell"
    write_results(cell, PairResults(per_image, pred, 0.0), ground_truth)

    stored = open_features(cell / "features.npz")
    assert all(stored[k].dtype == np.float32 for k in pred) and int(stored["format"]) == FEATURES_FORMAT
    assert not any(k.startswith("gt/") for k in stored)  # referenced, not copied
    summary = pd.read_csv(cell / "summary.csv")
    set_level = summary[summary["metric"].str.contains("FID|KID|FD_")].reset_index(drop=True)
    expected = summary_as_before(per_image, pred, truth, image_rows, kid_subsets=10)
    assert list(set_level["metric"]) == list(expected["metric"])
    # bit for bit before the CSV: the summary recomputed from the files equals the former computation exactly
    again = summarize(per_image, cell_features(cell), kid_subsets=10)
    again = again[again["metric"].str.contains("FID|KID|FD_")].reset_index(drop=True)
    assert again["value"].tolist() == expected["value"].tolist()
    assert np.array_equal(set_level["value"].to_numpy(), pd.to_numeric(expected["value"].map("{:.10g}".format)).to_numpy(),
                          equal_nan=True)


def test_bins_larger_than_the_in_memory_rows_stream_with_the_same_values(monkeypatch):
    per_image, pred, truth, image_rows = synthetic_cell(120, {"efficientnet_lite0": 24}, seed=1)
    features = {**pred, **truth, GT_ROWS: image_rows}
    whole = summarize(per_image, features, kid_subsets=20, kid_subset_size=50)
    monkeypatch.setattr(bench.metrics.aggregate, "SET_METRIC_ROWS_IN_MEMORY", 100)  # 'All' (720) and every bin (120)
    monkeypatch.setattr(bench.metrics.aggregate, "STREAM_CHUNK_ROWS", 64)
    streamed = summarize(per_image, features, kid_subsets=20, kid_subset_size=50)
    fd = whole["metric"] == "FD_lite0"
    assert np.allclose(streamed.loc[fd, "value"], whole.loc[fd, "value"], rtol=1e-10, atol=0)
    assert not np.array_equal(streamed.loc[fd, "value"], whole.loc[fd, "value"])  # it did take the streamed path
    kid_rows = whole["metric"].str.startswith("KID")
    assert np.allclose(streamed.loc[kid_rows, "value"], whole.loc[kid_rows, "value"], rtol=1e-9, atol=1e-15)
    # per subset, KID reads its rows by index: exactly kid() without precomputed full kernels
    selected = np.ones(len(per_image), dtype=bool)
    a, b = pred["pred/efficientnet_lite0"].astype(np.float64), truth["gt/efficientnet_lite0"][image_rows].astype(float)
    per_subset = kid(a[selected], b[selected], num_subsets=20, subset_size=50, full_kernel_max_entries=0)
    all_rows = streamed[(streamed["bin"] == "All") & streamed["metric"].isin(["KID_lite0", "KID_lite0_std"])]
    assert all_rows["value"].tolist() == list(per_subset)


# ------------------------------------------------------------------------------------ merging in bounded memory
def write_synthetic_shards(cell: Path, images: int, shard_pairs: int, dim: int) -> tuple[list[Shard], GroundTruth]:
    per_image, pred, truth, image_rows = synthetic_cell(images, {"efficientnet_lite0": dim}, seed=2)
    per_image = per_image.assign(image="i", mask="m", output="", digest="0" * 16)
    shards = [Shard(i, start, min(start + shard_pairs, len(per_image)))
              for i, start in enumerate(range(0, len(per_image), shard_pairs))]
    for shard in shards:
        piece = PairResults(per_image.iloc[shard.start:shard.stop].reset_index(drop=True),
                            {k: v[shard.start:shard.stop] for k, v in pred.items()}, 1.0)
        write_shard_files(cell, shard, piece)
        write_shard_done(cell, shard, piece.seconds, {"feature_key": {}})
    key = "stand-in key"
    return shards, GroundTruth(write_cache(cell.parent, truth, key), key_digest(key), image_rows)


def merge_peak_bytes(tmp_path: Path, images: int) -> int:
    cell = tmp_path / f"cell{images}"
    shards, truth = write_synthetic_shards(cell, images, shard_pairs=600, dim=256)
    tracemalloc.start()
    merge_shards(cell, shards, shards[-1].stop, truth, chunk_rows=256)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_merge_memory_does_not_grow_with_the_pairs_beyond_their_scalars(tmp_path, monkeypatch):
    """N and 4N pairs of 256-d float32 features (1 KB a pair): the peak grows by the per-pair scalars only (ratio
    and metrics, bin membership, positions: a few hundred bytes a pair, transient copies included)."""
    monkeypatch.setattr(bench.metrics.aggregate, "SET_METRIC_ROWS_IN_MEMORY", 500)  # bins above it stream
    small, large = merge_peak_bytes(tmp_path, 200), merge_peak_bytes(tmp_path, 800)  # 1,200 and 4,800 pairs
    growth_per_pair = (large - small) / (4800 - 1200)
    print(f"merge peak: {small / 2**20:.2f} MiB at 1,200 pairs, {large / 2**20:.2f} MiB at 4,800 "
          f"({growth_per_pair:.0f} B per added pair; features are 1,024 B a pair)")
    assert growth_per_pair < 400  # whole features would add over 1,024 B a pair (2,048 with the copy)


def synthetic_batches(per_image: pd.DataFrame, pred: dict, batch: int):
    """The rows and features of a cell as the evaluation loop hands them over, a batch at a time, each batch
    made when asked for (as the loop makes them)."""
    for start in range(0, len(per_image), batch):
        rows = per_image.iloc[start:start + batch].to_dict("records")
        yield ScoredBatch(rows, {name: values[start:start + batch].copy() for name, values in pred.items()})


def piece_peak_bytes(tmp_path: Path, images: int, dim: int) -> int:
    """Peak traced memory of writing one piece's files from batches, the batches' own making excluded as far as
    they are views: the synthetic cell itself is made before tracing starts."""
    per_image, pred, _, _ = synthetic_cell(images, {"efficientnet_lite0": dim}, seed=4)
    per_image = per_image.assign(image="i", mask="m", output="", digest="0" * 16)
    tracemalloc.start()
    write_pair_files(tmp_path / f"piece{images}", synthetic_batches(per_image, pred, batch=32), float_format=None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_a_piece_is_written_as_it_is_scored_in_memory_that_does_not_grow_with_its_features(tmp_path, monkeypatch):
    """A shard's (or a one-piece cell's) files are written batch by batch: between N and 4N pairs of 512-d
    float32 features (2 KB a pair) the peak grows by the per-pair scalars only. Holding the features until the
    end, as the loop once did, would add at least 2,048 B a pair (4,096 with the final concatenation)."""
    monkeypatch.setattr(bench.run.evaluate, "SPILL_CHUNK_ROWS", 256)
    small, large = piece_peak_bytes(tmp_path, 200, 512), piece_peak_bytes(tmp_path, 800, 512)  # 1,200 and 4,800
    growth_per_pair = (large - small) / (4800 - 1200)
    print(f"piece peak: {small / 2**20:.2f} MiB at 1,200 pairs, {large / 2**20:.2f} MiB at 4,800 "
          f"({growth_per_pair:.0f} B per added pair; features are 2,048 B a pair)")
    assert growth_per_pair < 400


def test_a_piece_written_from_batches_has_the_files_of_one_written_from_memory(tmp_path):
    per_image, pred, truth, image_rows = synthetic_cell(7, {"efficientnet_lite0": 6, "inception_v3_fid": 5}, seed=5)
    per_image = per_image.assign(image="i", mask="m", output="", digest="0" * 16)
    key = "stand-in key"
    ground_truth = GroundTruth(write_cache(tmp_path, truth, key), key_digest(key), image_rows)
    in_memory = write_results(tmp_path / "memory", PairResults(per_image, pred, 0.0), ground_truth)
    streamed = write_results(tmp_path / "streamed", synthetic_batches(per_image, pred, batch=4), ground_truth)
    for name in ("per_image.csv", "features.npz", "summary.csv"):
        assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name
    pd.testing.assert_frame_equal(in_memory.summary, streamed.summary, check_exact=True)
    assert not [path.name for path in (tmp_path / "streamed").iterdir() if path.name.startswith(".")]


def test_a_piece_that_fails_while_scored_leaves_no_files(tmp_path):
    per_image, pred, _, _ = synthetic_cell(4, {"efficientnet_lite0": 3})

    def failing():
        yield from itertools.islice(synthetic_batches(per_image, pred, batch=5), 2)
        raise RuntimeError("the method failed")

    with pytest.raises(RuntimeError, match="the method failed"):
        write_pair_files(tmp_path / "piece", failing(), float_format=None)
    assert list((tmp_path / "piece").iterdir()) == []


def test_merged_features_reference_the_cache_and_match_one_piece(tmp_path):
    cell = tmp_path / "sharded"
    shards, truth = write_synthetic_shards(cell, 30, shard_pairs=50, dim=8)
    merge_shards(cell, shards, shards[-1].stop, truth)
    merged = cell_features(cell)
    pieces = [open_features(shard.folder(cell) / "features.npz")["pred/efficientnet_lite0"] for shard in shards]
    assert np.array_equal(merged["pred/efficientnet_lite0"], np.concatenate(pieces))
    assert merged[GT_ROWS].tolist() == truth.rows.tolist()
    (tmp_path / "manifest" / truth.path.name).unlink()
    with pytest.raises(Exception, match="are gone"):
        cell_features(cell)


def test_cells_of_the_earlier_format_still_summarise(tmp_path):
    """Format 1 (float64, the ground truth copied to every pair) is read as it was."""
    per_image, pred, truth, image_rows = synthetic_cell(5, {"efficientnet_lite0": 4})
    cell = tmp_path / "old"
    save_features(cell / "features.npz", {**{k: v.astype(np.float64) for k, v in pred.items()},
                                          **{k: v.astype(np.float64)[image_rows] for k, v in truth.items()}})
    old = summarize(per_image, cell_features(cell), kid_subsets=5)
    new = summarize(per_image, {**pred, **truth, GT_ROWS: image_rows}, kid_subsets=5)
    assert old["value"].tolist() == pytest.approx(new["value"].tolist(), nan_ok=True, rel=0, abs=0)


# ------------------------------------------------------------------------------------ bytes per pair
class StandInExtractor(nn.Module):
    """A labelled stand-in of a feature network's width, NOT a metric network: a fixed random projection of the
    image pooled to 8×8. Only the bytes its features take are measured with it."""

    def __init__(self, name: str, dim: int):
        super().__init__()
        self.name, self.dim = name, dim
        self.provenance = f"stand-in for {name}: random projection to {dim}-d (not a metric)"
        self.register_buffer("projection", torch.randn(3 * 8 * 8, dim, generator=torch.Generator().manual_seed(dim)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images.float() / 255, 8).flatten(1) @ self.projection


def stand_in_scorer(dims: dict[str, int]) -> Scorer:
    scorer = Scorer(networks=False)  # PSNR, SSIM and MAE, as the real cell's pixel metrics
    for name, dim in dims.items():
        scorer._extractors[name] = StandInExtractor(name, dim)
        scorer._provenance[name] = scorer._extractors[name].provenance
    return scorer


def bytes_per_pair(tmp_path: Path, monkeypatch, dims: dict[str, int]) -> tuple[float, int, int]:
    """Two cells (two classical methods) on the six NVIDIA bins of 10 test images; returns the non-image bytes
    under the dataset's folder (cells and manifest) per pair × cell, the pairs and the cells. The manifest and the
    ground-truth cache are shared by the cells (a paper run has nine per dataset; two here keep the test short and
    the shared part's share large: 2,549 B a pair with both networks, over 2 cells)."""
    import bench.run.cell
    from bench.run.cell import run_cell
    from pipelines.full_benchmark import prepare
    from tiny_methods import config_from_dict, tiny_config_dict, write_folder_dataset

    data = write_folder_dataset(tmp_path / "data", train=0, test=10, size=32)
    values = tiny_config_dict(tmp_path / "out", data, methods=("diffusion_fill", "biharmonic"), serial=True)
    values["masks"]["bins"] = NVIDIA_BINS
    values["save_images"] = "sample"
    config = config_from_dict(values)
    scorer = stand_in_scorer(dims)
    monkeypatch.setattr(bench.run.cell, "cell_scorer", lambda config, device: scorer)
    cells = prepare(config).cells
    for cell in cells:
        run_cell(config, cell, progress=False)
    dataset_folder = Path(cells[0].manifest_dir).parent
    assert all(Path(cell.cell_dir).is_relative_to(dataset_folder) for cell in cells)
    pairs = len(pd.read_csv(Path(cells[0].cell_dir) / "per_image.csv"))
    files = [p for p in dataset_folder.rglob("*") if p.is_file() and p.suffix != ".png"]
    return sum(p.stat().st_size for p in files) / (pairs * len(cells)), pairs, len(cells)


@pytest.mark.parametrize("dims, budget", [({"inception_v3_fid": INCEPTION_DIM, "efficientnet_lite0": LITE0_DIM}, 16 * 1024),
                                          ({"efficientnet_lite0": LITE0_DIM}, 7 * 1024)], ids=["both", "lite0"])
def test_a_cell_stores_within_its_bytes_per_pair_budget(tmp_path, monkeypatch, dims, budget):
    measured, pairs, cells = bytes_per_pair(tmp_path, monkeypatch, dims)
    print(f"{'+'.join(dims)}: {measured:.0f} bytes per pair × cell ({pairs} pairs, {cells} cells; budget {budget})")
    assert pairs == 60 and cells == 2 and measured <= budget


# ------------------------------------------------------------------------------------ Ray requests
class RecordedRemote:
    """Stands in for a Ray remote function: records its options and each call."""

    def __init__(self, name: str, options: dict, calls: list):
        self.name, self.options, self.calls = name, options, calls

    def remote(self, *args):
        self.calls.append((self.name, self.options, args))
        return f"ref{len(self.calls)}:{self.name}"


def test_a_sharded_cells_finishing_task_asks_for_memory_and_no_gpu_in_a_fresh_worker_after_the_ground_truth(
        tmp_path, monkeypatch):
    from bench.run import distributed
    from bench.run.cell import CellSpec
    from bench.config import BenchmarkConfig, ResourceConfig

    calls: list = []
    monkeypatch.setattr(distributed, "remote_cell_function", lambda function, resources, max_retries=0: RecordedRemote(
        function.__name__, distributed.cell_task_options(resources, max_retries), calls))
    monkeypatch.setattr(distributed, "remote_finish_function", lambda resources, pairs, max_retries=0: RecordedRemote(
        "_finish_task", distributed.finish_task_options(resources, pairs, max_retries), calls))
    config = BenchmarkConfig(resources=ResourceConfig(device="cuda", cpus_per_cell=4, gpus_per_cell=1))
    cells = [CellSpec("diffusion_fill", "faces", seed, str(tmp_path / f"cell{seed}"), str(tmp_path / "manifest"))
             for seed in (0, 1)]
    layout = [Shard(0, 0, 120_000), Shard(1, 120_000, 219_000)]
    distributed.submit_cell_tasks(config, cells, board=None, layouts={cell: layout for cell in cells})

    truths = [call for call in calls if call[0] == "_ground_truth_task"]
    finishes = [call for call in calls if call[0] == "_finish_task"]
    assert len(truths) == 1 and truths[0][1]["num_gpus"] == 1  # once per manifest, on the cells' evaluation GPU
    assert len(finishes) == 2
    for _, options, args in finishes:
        assert options["num_gpus"] == 0 and options["num_cpus"] == 4
        # a fresh worker (a runtime environment of its own, ended after the task): its request is what it holds
        assert options["max_calls"] == 1 and options["runtime_env"] == {"env_vars": {distributed.FINISH_WORKER_ENV: "1"}}
        assert options["memory"] == finish_task_memory(219_000) > 2**30
        assert args[4] == f"ref{calls.index(truths[0]) + 1}:_ground_truth_task"  # it waits for the cache
    assert calls.index(truths[0]) < calls.index(finishes[0])


# ------------------------------------------------------------------------------------ composites
def evaluated(tmp_path: Path, policy, name: str):
    from bench.data.datasets import load_image_set
    from bench.run.evaluate import evaluate_pairs
    from bench.data.manifest import MaskProtocol, build_manifest
    from bench.methods import create_method
    from tiny_methods import write_folder_dataset

    data = tmp_path / "data"
    if not data.exists():
        write_folder_dataset(data, train=0, test=4, size=32)
    test_set = load_image_set("folder", "test", root=str(data), image_size=32)
    manifest = build_manifest(test_set, MaskProtocol(bins=("(0.1,0.2]", "(0.3,0.4]"), seed=0), tmp_path / "manifest")
    results = evaluate_pairs(create_method("diffusion_fill"), manifest, Scorer(networks=False), batch_size=3,
                             save_images=policy, image_dir=tmp_path / name, progress=False)
    return manifest, results.per_image


def test_save_images_keeps_all_a_seeded_sample_per_bin_or_none_and_every_row_has_its_composites_digest(
        tmp_path, monkeypatch):
    import hashlib

    from bench.errors import UserError
    from bench.run.evaluate import image_policy, sampled_pairs
    from bench.data.images import read_image

    monkeypatch.setattr(bench.run.evaluate, "SAMPLED_PER_BIN", 2)
    manifest, every = evaluated(tmp_path, "all", "all")
    _, sample = evaluated(tmp_path, "sample", "sample")
    _, none = evaluated(tmp_path, "none", "none")
    # the digest is the composite's, whether or not its PNG was kept
    for row in every.itertuples():
        assert row.digest == hashlib.sha256(read_image(row.output).tobytes()).hexdigest()[:16]
    assert every["digest"].tolist() == sample["digest"].tolist() == none["digest"].tolist()
    assert every["digest"].nunique() == len(every)
    kept = sampled_pairs(manifest, per_bin=2)
    assert kept == sampled_pairs(manifest, per_bin=2)  # fixed: from the manifest and the seed alone
    per_bin = pd.Series([p.bin for p in manifest.pairs if p.pair_id in kept]).value_counts()
    assert per_bin.tolist() == [2, 2]
    assert sorted(p.stem for p in (tmp_path / "sample").glob("*.png")) == sorted(kept)
    assert set(sample.loc[sample["output"] != "", "pair_id"]) == kept
    assert not (tmp_path / "none").exists() and (none["output"] == "").all()
    assert len(list((tmp_path / "all").glob("*.png"))) == len(every)
    assert image_policy(True) == "all" and image_policy(False) == "none"
    with pytest.raises(UserError, match="all, sample, none"):
        image_policy("some")


def test_mlflow_samples_come_from_the_sample_and_their_absence_is_said(tmp_path, monkeypatch):
    from bench.run.tracking import NO_SAMPLES_NOTE, write_sample_grid

    monkeypatch.setattr(bench.run.evaluate, "SAMPLED_PER_BIN", 1)
    _, sample = evaluated(tmp_path, "sample", "images")
    cell = tmp_path
    sample.to_csv(cell / "per_image.csv", index=False)
    grid = write_sample_grid(cell)
    assert grid is not None and grid.stat().st_size > 0  # with some rows' composites missing
    sample.assign(output="").to_csv(cell / "per_image.csv", index=False)
    assert write_sample_grid(cell) is None and "save_images: none" in NO_SAMPLES_NOTE
