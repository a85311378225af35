"""Memory layout of the methods' networks (issue 18): ``--memory-format auto`` is channels_last only on CUDA at
bf16/fp16; a method lays out its networks' 4-D weights, the evaluation loop gives it its inputs in that layout, each
cell records the layout, and cells that stay contiguous keep the fingerprints they had before the option existed."""
import dataclasses
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch

from bench.run import distributed
from bench.run.cell import CellSpec, cell_fingerprint, run_cell
from bench.config import BenchmarkConfig, ResourceConfig
from bench.devices import requested_device_type, resolve_memory_format
from bench.errors import UserError
from bench.data.images import read_image
from bench.methods import create_method, in_memory_format
from pipelines.full_benchmark import prepare
from tiny_methods import TinyTrainer, TinyTrainerConfig, config_from_dict, tiny_config_dict, write_folder_dataset

pytestmark = pytest.mark.timeout(300)

SIZE = 64
SCORES = ["psnr", "ssim", "mae"]


def channels_last(tensor: torch.Tensor) -> bool:
    """Laid out as NHWC and not also as NCHW (a tensor with one channel or a 1×1 kernel is both)."""
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


@pytest.fixture
def cuda_untouched():
    """Any CUDA query fails the test: resolving a layout for a CUDA device must not need a GPU."""
    touched = AssertionError("CUDA was queried")
    with mock.patch("torch.cuda.is_available", side_effect=touched), \
            mock.patch("torch.cuda.device_count", side_effect=touched), \
            mock.patch("torch.cuda._lazy_init", side_effect=touched), \
            mock.patch("torch.cuda.current_device", side_effect=touched):
        yield


# ------------------------------------------------------------------------------------ resolution (pure)
@pytest.mark.parametrize("name, device, precision, expected", [
    ("auto", torch.device("cpu"), "fp32", "contiguous"),
    ("auto", torch.device("cpu"), "bf16", "contiguous"),
    ("auto", torch.device("cpu"), "fp16", "contiguous"),
    ("auto", torch.device("cuda"), "fp32", "contiguous"),  # reproduction keeps its numbers on a GPU too
    ("auto", torch.device("cuda"), "bf16", "channels_last"),
    ("auto", torch.device("cuda", 1), "fp16", "channels_last"),
    ("auto", "cuda:0", "bf16", "channels_last"),
    ("channels_last", torch.device("cpu"), "fp32", "channels_last"),  # asked for explicitly: wherever
    ("contiguous", torch.device("cuda"), "bf16", "contiguous"),
])
def test_memory_format_resolution(cuda_untouched, name, device, precision, expected):
    assert resolve_memory_format(name, device, precision) == expected


def test_the_device_type_of_a_cell_follows_from_its_request(cuda_untouched):
    assert requested_device_type("auto", 0.0) == "cpu"
    assert requested_device_type("auto", 0.5) == "cuda"
    assert requested_device_type("cuda:1", 2.0) == "cuda"
    assert requested_device_type("cpu", 1.0) == "cpu"


def test_unknown_memory_formats_are_user_errors():
    with pytest.raises(UserError, match="--memory-format 'nhwc'"):
        resolve_memory_format("nhwc", torch.device("cpu"), "fp32")
    with pytest.raises(UserError, match="memory format 'auto'"):  # a method takes a resolved layout only
        TinyTrainer(TinyTrainerConfig()).set_memory_format("auto")


# ------------------------------------------------------------------------------------ the method's networks
@pytest.mark.parametrize("make", [lambda: TinyTrainer(TinyTrainerConfig()), lambda: create_method("ec_tiny")],
                         ids=["tiny_trainer", "ec_tiny"])
def test_set_memory_format_lays_out_every_4d_weight_in_place(make):
    torch.manual_seed(0)
    method = make()
    before = {name: value.clone() for name, value in method.state_dict().items()}
    optimised = [p for optimizer in method.optimizers.values() for group in optimizer.param_groups
                 for p in group["params"]]
    weights = [p for p in method.parameters() if p.dim() == 4]
    assert weights and not any(channels_last(p) for p in weights)

    method.set_memory_format("channels_last")
    assert method.memory_format == "channels_last"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert sum(channels_last(p) for p in weights) > len(weights) // 2  # all but 1×1 kernels really changed layout
    assert all(p.is_contiguous() for p in method.parameters() if p.dim() != 4)  # biases, norms: as they were
    state = method.state_dict()
    assert all(torch.equal(state[name], value) for name, value in before.items())  # values stay
    parameters = {id(p) for p in method.parameters()}
    assert optimised and all(id(p) in parameters for p in optimised)  # optimisers still step the same tensors

    method.set_memory_format("contiguous")
    assert method.memory_format == "contiguous" and all(p.is_contiguous() for p in weights)


def test_in_memory_format_lays_out_image_batches_only():
    batch, flat = torch.rand(2, 3, 8, 8), torch.rand(2, 3)
    assert channels_last(in_memory_format(batch, "channels_last"))
    assert in_memory_format(batch, "contiguous") is batch  # already contiguous: no copy
    assert in_memory_format(flat, "channels_last") is flat


# ------------------------------------------------------------------------------------ fingerprints
def fingerprint(**resources) -> str:
    return cell_fingerprint(BenchmarkConfig(resources=ResourceConfig(**resources)),
                            CellSpec("tiny_trainer", "faces", 0, "/cells/c", "/manifests/m"))


def test_cells_that_stay_contiguous_keep_the_fingerprints_they_had_before_the_option():
    # Computed by bench.run.cell before --memory-format existed (commit 88d6746), for the CellSpec above: results
    # of earlier runs are reused only if these stay the same.
    assert fingerprint() == "c289659993d5f2c5"
    assert fingerprint(memory_format="contiguous") == "c289659993d5f2c5"
    assert fingerprint(precision="bf16") == "573f6eadabcef63b"  # auto on the CPU: contiguous
    # GPU cells: auto at fp32 is contiguous; their fingerprints differ from the CPU's by their --tf32 state alone
    assert fingerprint(gpus_per_cell=1.0) == fingerprint(gpus_per_cell=1.0, memory_format="contiguous")
    assert fingerprint(gpus_per_cell=1.0, precision="bf16", memory_format="contiguous") == "44b8a83af2f94be8"


def test_cells_laid_out_channels_last_get_a_fingerprint_of_their_own():
    on_gpu = fingerprint(gpus_per_cell=1.0, precision="bf16")  # auto: channels_last
    assert on_gpu != "573f6eadabcef63b"  # the bf16 GPU cell of before ran contiguous: not reused
    assert on_gpu == fingerprint(gpus_per_cell=1.0, precision="bf16", memory_format="channels_last")
    assert fingerprint(memory_format="channels_last") not in (fingerprint(), on_gpu)


# ------------------------------------------------------------------------------------ end to end on the CPU
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "data", train=4, test=3, size=SIZE)


def run_tiny_cell(out: Path, dataset: Path, **resources) -> tuple[dict, Path, BenchmarkConfig, CellSpec]:
    """The tiny trainer (two convolutions) trained 4 steps and evaluated on six 64² pairs, in-process, with the
    thread count a Ray task gets; returns the cell record, the cell folder, the config and the cell."""
    values = tiny_config_dict(out, dataset, methods=("tiny_trainer",), steps=4, serial=True)
    values["data"]["image_size"] = SIZE
    values["eval_batch_size"] = 2
    values["resources"].update(resources)
    config = config_from_dict(values)
    (cell,) = prepare(config).cells
    with distributed.cell_settings(config.resources):
        record = run_cell(config, cell, progress=False)
    return record, Path(cell.cell_dir), config, cell


def composite_pixels(cell_dir: Path) -> np.ndarray:
    return np.stack([read_image(p) for p in sorted((cell_dir / "images").glob("*.png"))]).astype(int)


@pytest.fixture(scope="module")
def contiguous_cell(tmp_path_factory, dataset):
    return run_tiny_cell(tmp_path_factory.mktemp("contiguous") / "out", dataset)


def test_a_default_cpu_run_records_contiguous_and_keeps_its_fingerprint(contiguous_cell):
    record, cell_dir, config, cell = contiguous_cell
    assert config.resources.memory_format == "auto"
    assert record["memory_format"] == "contiguous"
    assert json.loads((cell_dir / "cell.json").read_text())["memory_format"] == "contiguous"
    explicit = dataclasses.replace(config, resources=dataclasses.replace(config.resources, memory_format="contiguous"))
    assert record["fingerprint"] == cell_fingerprint(explicit, cell)  # the fingerprint of a run without the option


def test_a_channels_last_cell_runs_on_the_cpu_records_it_and_scores_like_the_contiguous_one(
        contiguous_cell, tmp_path, dataset):
    seen = {"train": set(), "eval": set()}
    # The class the registry creates: test modules import tiny_methods under two names, each registering its own.
    registered = type(create_method("tiny_trainer"))
    inpaint = registered.inpaint

    def recording_inpaint(self, images, masks):
        weights = channels_last(self.net[0].weight) and channels_last(self.net[2].weight)
        seen["train" if self.training else "eval"].add((weights, channels_last(images)))
        return inpaint(self, images, masks)

    with mock.patch.object(registered, "inpaint", recording_inpaint):
        record, cell_dir, _, _ = run_tiny_cell(tmp_path / "out", dataset, memory_format="channels_last")
    assert record["memory_format"] == "channels_last"
    assert json.loads((cell_dir / "cell.json").read_text()) == record
    assert {weights for weights, _ in seen["train"]} == {True}  # trained with channels_last weights
    assert seen["eval"] == {(True, True)}  # evaluated with channels_last weights and inputs

    reference, reference_dir, _, _ = contiguous_cell
    assert record["fingerprint"] != reference["fingerprint"]
    ours = pd.read_csv(cell_dir / "per_image.csv")
    theirs = pd.read_csv(reference_dir / "per_image.csv")
    assert list(ours["pair_id"]) == list(theirs["pair_id"]) and np.isfinite(ours[SCORES].to_numpy()).all()
    # CPU convolutions take other kernels for NHWC, so weights and outputs may differ by float32 round-off (the
    # trained weights here by ~1.5e-8), which can flip a composite pixel by one level where it rounds: the bounds
    # allow that on 0.1 % of the values (no pixel flipped on the machine this was written on, 2 cores, torch 2.14).
    pixels, reference_pixels = composite_pixels(cell_dir), composite_pixels(reference_dir)
    assert pixels.shape == reference_pixels.shape
    assert np.abs(pixels - reference_pixels).max() <= 1
    assert (pixels != reference_pixels).mean() < 1e-3
    assert np.allclose(ours["psnr"], theirs["psnr"], rtol=0, atol=0.01)  # dB
    assert np.allclose(ours["ssim"], theirs["ssim"], rtol=0, atol=1e-4)
    assert np.allclose(ours["mae"], theirs["mae"], rtol=0, atol=1e-5)
