"""Sharded evaluation: a cell's pairs evaluated in shards (under Ray and in-process), merged in manifest order,
give the files of one piece; a killed shard is re-run, a finished one kept; DDNM draws a pair's noise whatever
the shard or batch layout; data workers and reduced precision give what they should."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.run import distributed
from bench.metrics.aggregate import load_features
from bench.run.cell import TRAINED_FILE, evaluate_shard, plan_cell_shards, read_done, run_cell, train_cell
from bench.errors import UserError
from bench.run.evaluate import PngWriter, evaluate_pairs, shared_images
from bench.data.manifest import Pair, load_manifest
from bench.run.shards import AUTO_MIN_SHARD_PAIRS, SHARDS_FOLDER, Shard, automatic_shard_pairs, shard_layout
from bench.run.resources import cluster_slots, torch_threads
from pipelines.full_benchmark import prepare
from tiny_methods import config_from_dict, ensure_local_ray, tiny_config_dict, write_folder_dataset

pytestmark = pytest.mark.timeout(300)

PATH_COLUMNS = ["image", "mask", "output"]  # differ between output folders by construction
SIZE = 64  # ddnm_tiny's U-Net is built for 64²


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "data", train=4, test=3, size=SIZE)


def tiny_config(out: Path, dataset: Path, *, methods=("tiny_trainer",), steps: int = 4, batch: int = 2,
                shard_pairs: int = 0, serial: bool = True, method_options: dict | None = None, **resources):
    """Three 64² test images × two bins = six pairs per cell."""
    values = tiny_config_dict(out, dataset, methods=methods, steps=steps, serial=serial, method_options=method_options)
    values["data"]["image_size"] = SIZE
    values.update(eval_batch_size=batch, eval_shard_pairs=shard_pairs)
    values["resources"].update(resources)
    return config_from_dict(values)


def only_cell(config):
    plan = prepare(config)
    (cell,) = plan.cells
    return cell


def cell_folder(cell) -> Path:
    return Path(cell.cell_dir)


def scores(cell) -> pd.DataFrame:
    return pd.read_csv(cell_folder(cell) / "per_image.csv").drop(columns=PATH_COLUMNS)


def composites(cell) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cell_folder(cell) / "images").glob("*.png"))}


def assert_same_results(cell, reference) -> None:
    """Byte-identical per_image.csv (up to the folder in its paths) and summary.csv, equal features and composites."""
    ours, theirs = cell_folder(cell), cell_folder(reference)
    assert (ours / "per_image.csv").read_text().replace(str(ours.parents[1]), "@") == \
        (theirs / "per_image.csv").read_text().replace(str(theirs.parents[1]), "@")
    assert (ours / "summary.csv").read_bytes() == (theirs / "summary.csv").read_bytes()
    mine, other = load_features(ours / "features.npz"), load_features(theirs / "features.npz")
    assert sorted(mine) == sorted(other) and all(np.array_equal(mine[k], other[k]) for k in mine)
    assert composites(cell) == composites(reference)


def run_in_process(config, cell) -> dict:
    """What --serial does with a cell: run_cell with the thread count a Ray task gets (float sums depend on it)."""
    with distributed.cell_settings(config.resources):
        return run_cell(config, cell, progress=False)


@pytest.fixture(scope="module")
def one_piece(tmp_path_factory, dataset):
    """The trained tiny cell evaluated in one piece at batch size 2, in-process: the reference."""
    config = tiny_config(tmp_path_factory.mktemp("one") / "out", dataset)
    cell = only_cell(config)
    run_in_process(config, cell)
    return cell


# ------------------------------------------------------------------------------------ layout (pure)
def test_shards_start_at_batch_boundaries_and_cover_every_pair_once():
    assert shard_layout(6, 2, 3) == [Shard(0, 0, 4), Shard(1, 4, 6)]  # 3 pairs rounded up to two batches
    assert shard_layout(6, 2, 0) == [Shard(0, 0, 6)] and shard_layout(6, 2, 6) == [Shard(0, 0, 6)]
    layout = shard_layout(120_000, 32, 10_000)
    assert all(shard.start % 32 == 0 for shard in layout) and layout[-1].stop == 120_000
    assert all(a.stop == b.start for a, b in zip(layout, layout[1:]))
    assert Shard(1, 4, 6).folder("/c") == Path("/c") / SHARDS_FOLDER / "0000004-0000006"


def test_automatic_sharding_splits_only_big_cells_when_slots_outnumber_cells():
    assert automatic_shard_pairs([60] * 15, slots=2) == AUTO_MIN_SHARD_PAIRS  # the default preset: no split
    assert automatic_shard_pairs([120_000] * 3, slots=16) == 22_500  # 3 cells on 16 GPUs: ~16 shards
    assert automatic_shard_pairs([120_000] * 27, slots=8) >= 120_000  # more cells than slots: whole cells
    assert automatic_shard_pairs([5_000], slots=1) == 0  # one slot (--serial): nothing to spread
    nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 4.0}, {"CPU": 64.0}]
    assert cluster_slots(nodes, cpus_per_cell=4, gpus_per_cell=1) == 6  # 4 + 2 (CPU-bound) + 0
    assert cluster_slots(nodes, cpus_per_cell=1, gpus_per_cell=0.5) == 16
    assert cluster_slots(nodes, cpus_per_cell=2, gpus_per_cell=0) == 44


def test_a_batch_embeds_each_shared_ground_truth_once():
    pairs = [Pair(f"p{i}", image, "", 0.1, "b", "", "", None, "") for i, image in enumerate("aaabbc")]
    firsts, index = shared_images(pairs)
    assert firsts == [0, 3, 5] and index.tolist() == [0, 0, 0, 1, 1, 2]


def test_png_writer_raises_the_first_error_in_the_loop_and_finishes_every_write(tmp_path):
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    with PngWriter(max_pending=2) as writer:
        for index in range(5):
            writer.submit(tmp_path / f"{index}.png", pixels)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"{i}.png" for i in range(5)]
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        with PngWriter() as writer:
            writer.submit(tmp_path / "file" / "x.png", pixels)  # a folder that is a file
            writer.close()


def test_a_bad_image_read_in_a_data_worker_is_a_one_line_user_error(tmp_path):
    from bench.data.datasets import load_image_set
    from bench.errors import UserError
    from bench.data.manifest import MaskProtocol, build_manifest
    from bench.methods import create_method
    from bench.metrics.scoring import Scorer

    data = write_folder_dataset(tmp_path / "data", train=0, test=2, size=32)
    test_set = load_image_set("folder", "test", root=str(data), image_size=32)
    manifest = build_manifest(test_set, MaskProtocol(bins=("(0.1,0.2]",)), tmp_path / "manifest")
    (data / "test" / "test_01.png").write_bytes(b"not a png")  # damaged after the pairs were frozen
    with pytest.raises(UserError) as caught:
        evaluate_pairs(create_method("diffusion_fill"), manifest, Scorer(networks=False), batch_size=1,
                       save_images=False, data_workers=1, progress=False)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{data / 'test' / 'test_01.png'}: ")


# ------------------------------------------------------------------------------------ in-process (--serial)
def test_two_shards_in_process_give_the_files_of_one_piece_and_resume_shard_by_shard(tmp_path, dataset, one_piece):
    log = tmp_path / "inpaint.log"
    config = tiny_config(tmp_path / "out", dataset, shard_pairs=3, method_options={"tiny_trainer": {
        "inpaint_log": str(log)}})
    cell = only_cell(config)
    shards = plan_cell_shards(config, [cell], slots=1)[cell]
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 6)]
    with distributed.cell_settings(config.resources):
        train_cell(config, cell, progress=False)
        evaluate_shard(config, cell, shards[0], progress=False)  # then the run is "killed"
    assert log.read_text().split() == ["2", "2"]
    record = run_in_process(config, cell)
    assert log.read_text().split() == ["2", "2", "2"]  # only the unfinished shard ran again
    assert_same_results(cell, one_piece)
    assert record["pairs"] == 6 and [s["pairs"] for s in record["eval_shards"]] == [[0, 4], [4, 6]]
    assert record["train"] is not None and record["precision"] == "fp32"
    assert not (cell_folder(cell) / SHARDS_FOLDER).exists() and not (cell_folder(cell) / TRAINED_FILE).exists()


def test_a_one_piece_cell_run_again_after_a_kill_tidies_the_partial_file_the_kill_left(tmp_path, dataset, one_piece):
    """A one-piece cell writes per_image.csv to a temporary file for as long as it evaluates; a killed process
    (no exception handler runs) leaves it. The run that finishes the cell removes it."""
    config = tiny_config(tmp_path / "out", dataset)
    cell = only_cell(config)
    with distributed.cell_settings(config.resources):
        train_cell(config, cell, progress=False)
    left = cell_folder(cell) / ".per_image.csv.k1ll3d.tmp"
    left.write_text("pair_id,image\n000000_r0.1-0.2_0,")  # what a kill mid-evaluation leaves
    run_in_process(config, cell)
    assert not list(cell_folder(cell).glob(".*.tmp"))
    assert_same_results(cell, one_piece)


def test_automatic_sharding_keeps_the_layout_of_shards_an_earlier_run_finished(tmp_path, dataset):
    import dataclasses

    config = tiny_config(tmp_path / "out", dataset, shard_pairs=3)
    cell = only_cell(config)
    first, _ = plan_cell_shards(config, [cell], slots=1)[cell]
    with distributed.cell_settings(config.resources):
        train_cell(config, cell, progress=False)
        evaluate_shard(config, cell, first, progress=False)
    automatic = dataclasses.replace(config, eval_shard_pairs=0)  # would be one piece on a fresh cell
    assert plan_cell_shards(automatic, [cell], slots=1)[cell] == [Shard(0, 0, 4), Shard(1, 4, 6)]


def test_data_workers_give_identical_results(tmp_path, dataset, one_piece):
    config = tiny_config(tmp_path / "out", dataset, data_workers=2)
    cell = only_cell(config)
    record = run_in_process(config, cell)
    assert record["data_workers"] == 2
    assert_same_results(cell, one_piece)


def test_bf16_runs_a_tiny_method_end_to_end_and_records_its_precision(tmp_path, dataset, one_piece):
    config = tiny_config(tmp_path / "out", dataset, precision="bf16")
    cell = only_cell(config)
    record = run_in_process(config, cell)
    assert record["precision"] == "bf16" and json.loads((cell_folder(cell) / "cell.json").read_text()) == record
    ours, theirs = scores(cell), scores(one_piece)
    assert np.isfinite(ours[["psnr", "ssim", "mae"]].to_numpy()).all()
    assert not ours["psnr"].equals(theirs["psnr"])  # the network did run in bfloat16
    assert (ours["psnr"] - theirs["psnr"]).abs().max() < 3.0  # ... and still inpaints like the fp32 one


def composite_pixels(cell) -> np.ndarray:
    from bench.data.images import read_image

    return np.stack([read_image(p) for p in sorted((cell_folder(cell) / "images").glob("*.png"))]).astype(int)


def test_ddnm_gives_a_pair_the_same_result_in_any_shard_or_batch_layout(tmp_path, dataset):
    """DDNM seeds each pair's noise from the pair itself and on the CPU runs its U-Net one sample at a time, so a
    pair's scores and composite are the same bits whatever its batch: six pairs in one batch (size 8), in batches
    of 3 or of 2, or split into two shards. Batched, the U-Net's round-off would differ with the batch size."""
    runs = {}
    for name, batch, shard_pairs in (("batch 8", 8, 0), ("batch 3", 3, 0), ("batch 2", 2, 0),
                                     ("two shards of batch 2", 2, 3)):
        config = tiny_config(tmp_path / name.replace(" ", "_"), dataset, methods=("ddnm_tiny",), steps=0,
                             batch=batch, shard_pairs=shard_pairs)
        cell = only_cell(config)
        record = run_in_process(config, cell)
        assert len(record.get("eval_shards", [None])) == (2 if shard_pairs else 1)
        runs[name] = cell
    reference = runs.pop("batch 8")
    for name, cell in runs.items():
        pd.testing.assert_frame_equal(scores(cell), scores(reference), check_exact=True, obj=name)
        assert np.array_equal(composite_pixels(cell), composite_pixels(reference)), name


def test_one_ground_truth_embedding_per_batch_scores_like_each_pair_alone(tmp_path, dataset):
    """The ground truth of several pairs goes through the distance network once per batch, and the ground
    truths' FID features once per image: the values are those of every pair scored on its own."""
    from bench.run.cell import cell_scorer, cell_method

    config = tiny_config(tmp_path / "out", dataset, methods=("tiny_trainer",), steps=0, batch=6)
    cell = only_cell(config)
    manifest = load_manifest(cell.manifest_dir)
    scorer = cell_scorer(config, torch.device("cpu"))
    method = cell_method(config, cell, torch.device("cpu"), trained=False)
    with torch_threads(1):
        batched = evaluate_pairs(method, manifest, scorer, batch_size=6, save_images=False, progress=False)
        alone = [evaluate_pairs(method, manifest, scorer, start=i, stop=i + 1, batch_size=1, save_images=False,
                                progress=False) for i in range(len(manifest.pairs))]
    pd.testing.assert_frame_equal(batched.per_image, pd.concat([a.per_image for a in alone], ignore_index=True),
                                  check_exact=True)
    assert "lite0_dist" in batched.per_image.columns  # the distance was part of it
    for name, values in batched.features.items():
        assert np.array_equal(values, np.concatenate([a.features[name] for a in alone]))


# ------------------------------------------------------------------------------------ under Ray
def test_two_shards_under_ray_give_the_files_of_one_piece(tmp_path, dataset, one_piece):
    ensure_local_ray()
    config = tiny_config(tmp_path / "out", dataset, shard_pairs=3, serial=False)
    cell = only_cell(config)
    (outcome,) = distributed.run_cells(config, [cell], progress=False)
    assert outcome.record == read_done(cell.cell_dir)
    assert [s["pairs"] for s in outcome.record["eval_shards"]] == [[0, 4], [4, 6]]
    assert all(s["node_id"] for s in outcome.record["eval_shards"])
    assert_same_results(cell, one_piece)


def test_a_shard_whose_worker_dies_is_rerun_and_the_merge_is_unchanged(tmp_path, dataset, one_piece):
    ensure_local_ray()
    marker = tmp_path / "crashed"
    config = tiny_config(tmp_path / "out", dataset, shard_pairs=3, serial=False,
                         method_options={"tiny_trainer": {"crash_in_inpaint_marker": str(marker)}})
    cell = only_cell(config)
    distributed.run_cells(config, [cell], progress=False)
    assert marker.exists()  # a shard's worker did die mid-shard
    assert_same_results(cell, one_piece)


def test_unfinished_work_made_with_other_options_is_refused(tmp_path, dataset):
    """A cell killed after training and one shard, re-run with another precision: resuming would merge shards of
    both precisions (and evaluate weights trained at the other), so the cell is refused, its files untouched."""
    config = tiny_config(tmp_path / "out", dataset, shard_pairs=4)
    cell = only_cell(config)
    train_cell(config, cell, progress=False)
    first = plan_cell_shards(config, [cell], slots=1)[cell][0]
    evaluate_shard(config, cell, first, progress=False)
    before = sorted(str(p.relative_to(cell.cell_dir)) for p in Path(cell.cell_dir).rglob("*"))
    other = tiny_config(tmp_path / "out", dataset, shard_pairs=4, precision="bf16")
    with pytest.raises(UserError, match="holds unfinished work made with other options"):
        run_in_process(other, only_cell(other))
    assert sorted(str(p.relative_to(cell.cell_dir)) for p in Path(cell.cell_dir).rglob("*")) == before
    assert run_in_process(config, cell)["pairs"] == 6  # the original options resume it
