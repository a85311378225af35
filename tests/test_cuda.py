"""CUDA correctness on a CPU machine (issue 21).

Ray's fake GPUs (a local cluster started with ``num_gpus=2``) stand in for a GPU node: what a cell's task
sees — ``ray.get_gpu_ids()``, ``CUDA_VISIBLE_DEVICES``, the device it resolves — is checked with small
tasks that run the cell's own device code, with torch's CUDA queries mocked (there is no GPU to query).
The rest is checked in-process: the device rules with --serial, the CUDA RNG state in training
checkpoints (torch.cuda's RNG calls mocked by a CPU generator), the determinism and TF32 settings, the
ground-truth feature cache key, and numerics that would crash or slow down on CUDA.
"""
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench.run.train
from baselines.ctsdg import binary_cross_entropy
from baselines.ddnm_unet import AttnBlock
from bench.config import ResourceConfig, TrainConfig
from bench.data.datasets import load_image_set
from bench.devices import (CUBLAS_WORKSPACE, CUDA_CONTEXT_RESERVE_BYTES, DETERMINISTIC_CUBLAS_WORKSPACE,
                           METRIC_PRECISION, VISIBLE_DEVICES, allocator_fraction, choose_device, cuda_tf32,
                           deterministic_algorithms, device_record, full_fp32, gpu_memory_cap, request_problem,
                           resolve_device, tf32_enabled, tf32_state, visible_entries)
from bench.run.distributed import cell_settings, cell_task_options, remote_cell_function
from bench.run.resources import check_feasible
from bench.errors import UserError
from bench.run.evaluate import _ground_truth_features
from bench.data.images import to_tensor
from bench.data.manifest import MaskProtocol, build_manifest
from bench.methods import create_method
from bench.run.tracking import cell_params
from bench.run.train import ImageCache, restore_rng_states, rng_states, train
from pipelines.full_benchmark import run_benchmark
from tiny_methods import (TinyTrainer, TinyTrainerConfig, config_from_dict, empty_mlflow_store, tiny_config_dict,
                          write_folder_dataset)

pytestmark = pytest.mark.timeout(300)

NODE_GPUS = "0,1"  # the CUDA_VISIBLE_DEVICES a two-GPU node's processes inherit
FAKE_GPU_BYTES = 16 * 2**30  # the memory of the mocked GPUs
TASK_SECONDS = 120


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "data")


@pytest.fixture(scope="module")
def fake_gpu_node():
    """This module's Ray cluster: one node with 2 CPUs and 2 fake GPUs whose processes inherit
    ``CUDA_VISIBLE_DEVICES=0,1``. Yields what a plain Ray task that asks for no GPU sees there, recorded
    before any cell's code ran in the cluster's (reused) CPU workers."""
    import ray

    ray.shutdown()  # the session's CPU-only cluster, if a module before this one started it
    previous = os.environ.get(VISIBLE_DEVICES)
    os.environ[VISIBLE_DEVICES] = NODE_GPUS
    try:
        ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 2**20)
        plain = ray.remote(num_cpus=1, num_gpus=0)(lambda: os.environ.get(VISIBLE_DEVICES))
        yield {"plain_task_without_gpu_sees": ray.get(plain.remote(), timeout=TASK_SECONDS)}
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop(VISIBLE_DEVICES, None)
        else:
            os.environ[VISIBLE_DEVICES] = previous


def what_the_cell_sees(resources: ResourceConfig, barrier: str | None = None, parties: int = 0) -> dict:
    """Runs in a Ray task as a cell does (:func:`bench.run.distributed.cell_settings` first, then the device
    resolution of ``run_cell``) and reports what it saw. torch's CUDA calls are mocked: torch sees as many
    devices as ``CUDA_VISIBLE_DEVICES`` lists. ``barrier``: wait until ``parties`` tasks hold their GPUs."""
    import ray

    seen: dict = {"cuda_queries": 0, "memory_caps": []}

    def device_count() -> int:
        seen["cuda_queries"] += 1
        return len(visible_entries(os.environ.get(VISIBLE_DEVICES)) or [])

    if barrier:
        Path(barrier, str(os.getpid())).touch()
        deadline = time.monotonic() + TASK_SECONDS
        while len(list(Path(barrier).iterdir())) < parties and time.monotonic() < deadline:
            time.sleep(0.05)
    with mock.patch("torch.cuda.device_count", device_count), \
            mock.patch("torch.cuda.set_per_process_memory_fraction",
                       lambda fraction, device=None: seen["memory_caps"].append((fraction, str(device)))), \
            mock.patch("torch.cuda.get_device_name", lambda device=None: "fake GPU"), \
            mock.patch("torch.cuda.get_device_properties",
                       lambda device=None: SimpleNamespace(total_memory=FAKE_GPU_BYTES)):
        with cell_settings(resources):
            device = resolve_device(resources.device, gpus_per_cell=resources.gpus_per_cell)
            record = device_record(device, gpus_per_cell=resources.gpus_per_cell, deterministic=False)
    return {**seen, "device": str(device), "record": record, "visible": os.environ.get(VISIBLE_DEVICES),
            "ray_gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()], "pid": os.getpid()}


def run_like_a_cell(resources: ResourceConfig, *args):
    return remote_cell_function(what_the_cell_sees, resources).remote(resources, *args)


# Ray workers cannot import tests/: the probe above travels as code.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ------------------------------------------------------------------------------------ under Ray
def test_a_cell_that_asks_for_no_gpu_runs_on_the_cpu_and_sees_no_gpu(fake_gpu_node):
    import ray

    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES as it is for a task that asks for no GPU ...
    assert fake_gpu_node["plain_task_without_gpu_sees"] == NODE_GPUS
    resources = ResourceConfig(device="auto", cpus_per_cell=1, gpus_per_cell=0)
    seen = ray.get(run_like_a_cell(resources), timeout=TASK_SECONDS)
    # ... so the cell hides them itself, and never asks CUDA anything
    assert seen["ray_gpu_ids"] == [] and seen["visible"] == ""
    assert seen["device"] == "cpu" and seen["cuda_queries"] == 0
    assert seen["record"]["device"] == "cpu" and seen["record"]["gpu_ids"] == []
    assert seen["memory_caps"] == [] and seen["record"]["gpu_memory_fraction"] is None


def test_cells_with_one_gpu_each_see_exactly_their_assigned_gpu(fake_gpu_node, tmp_path):
    import ray

    resources = ResourceConfig(device="auto", cpus_per_cell=1, gpus_per_cell=1)
    barrier = tmp_path / "holding"
    barrier.mkdir()
    seen = ray.get([run_like_a_cell(resources, str(barrier), 2) for _ in range(2)], timeout=TASK_SECONDS)
    assert sorted(s["ray_gpu_ids"] for s in seen) == [["0"], ["1"]]  # both held a GPU at once: different ones
    for cell in seen:
        assert cell["visible"] == cell["ray_gpu_ids"][0]  # the task sees its own GPU only ...
        assert cell["device"] == "cuda:0"  # ... as its CUDA device 0
        assert cell["record"]["gpu_ids"] == cell["ray_gpu_ids"] and cell["record"]["gpu_name"] == "fake GPU"
        assert cell["memory_caps"] == []  # a whole GPU is not capped

    two = ResourceConfig(device="cuda:1", cpus_per_cell=1, gpus_per_cell=2)
    both = ray.get(run_like_a_cell(two), timeout=TASK_SECONDS)
    assert sorted(both["ray_gpu_ids"]) == ["0", "1"]  # in the order Ray lists them, which varies
    assert both["visible"] == ",".join(both["ray_gpu_ids"])
    assert both["device"] == "cuda:1" and both["record"]["gpu_ids"] == both["ray_gpu_ids"]  # cuda:1 is the 2nd


def test_gpu_cells_get_a_fresh_worker_each_and_a_shared_gpu_caps_its_memory(fake_gpu_node):
    import ray

    half = ResourceConfig(device="cuda", cpus_per_cell=1, gpus_per_cell=0.5)
    seen = [ray.get(run_like_a_cell(half), timeout=TASK_SECONDS) for _ in range(3)]  # one after another
    assert len({cell["pid"] for cell in seen}) == 3  # never the worker of an earlier GPU cell
    for cell in seen:
        assert cell["device"] == "cuda:0" and len(cell["ray_gpu_ids"]) == 1
        # capped for the cell (its share less its CUDA context), lifted after
        assert cell["memory_caps"] == [(0.5 - CUDA_CONTEXT_RESERVE_BYTES / FAKE_GPU_BYTES, "cuda:0"), (1.0, "cuda:0")]
        assert cell["record"]["gpu_memory_fraction"] == 0.5
    assert cell_task_options(half)["max_calls"] == 1
    assert cell_task_options(ResourceConfig(gpus_per_cell=0))["max_calls"] == 0  # CPU cells reuse workers


def test_cuda_3_with_one_gpu_per_cell_is_refused_before_any_work(fake_gpu_node, dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    empty_mlflow_store(out)
    config = config_from_dict(tiny_config_dict(out, dataset))
    config.resources.device, config.resources.gpus_per_cell = "cuda:3", 1.0
    with pytest.raises(UserError, match=r"--device cuda:3 names GPU 3 of a cell's own GPUs, but each cell holds 1"):
        run_benchmark(config)
    assert not (out / "folder-data").exists()  # nothing was prepared, nothing ran


# ------------------------------------------------------------------------------------ the rules
def test_device_requests_that_cannot_work_under_ray_are_refused_with_one_line():
    node = [{"CPU": 8.0, "GPU": 4.0}]
    for device, gpus, expected in (("cuda:3", 1, "each cell holds 1"), ("cuda:2", 2, "each cell holds 2"),
                                   ("cuda", 0, "needs --gpus-per-cell > 0"), ("auto", 1.5, "whole number"),
                                   ("tpu:0", 1, "not a device"), ("cuda:1", 2, "one GPU of its own")):
        with pytest.raises(UserError, match=expected) as refused:
            check_feasible(ResourceConfig(device=device, gpus_per_cell=gpus), node)
        assert "\n" not in str(refused.value)
    for device, gpus in (("cuda:0", 2), ("cuda", 0.5), ("auto", 0), ("cpu", 1), ("auto", 3)):
        assert request_problem(device, gpus) is None
        check_feasible(ResourceConfig(device=device, gpus_per_cell=gpus), node)


def never_asked() -> int:
    raise AssertionError("a CPU cell asked CUDA how many devices it has")


def test_auto_means_the_same_with_serial_and_cuda_n_names_the_cells_own_gpu():
    serial = dict(assigned=None, visible=None)
    assert choose_device("auto", gpus_per_cell=0, **serial, cuda_device_count=never_asked).type == "cpu"
    assert choose_device("auto", gpus_per_cell=1, **serial, cuda_device_count=lambda: 2) == torch.device("cuda", 0)
    assert choose_device("cuda:1", gpus_per_cell=0, **serial, cuda_device_count=lambda: 2) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="torch sees 0 CUDA device.*no CPU fallback"):
        choose_device("auto", gpus_per_cell=1, **serial, cuda_device_count=lambda: 0)
    # without a per-cell request (the efficiency pipeline) auto keeps meaning "CUDA when present"
    assert choose_device("auto", gpus_per_cell=None, **serial, cuda_device_count=lambda: 1) == torch.device("cuda", 0)
    # under Ray: the N-th of the assigned GPUs, wherever CUDA_VISIBLE_DEVICES puts it
    ray_task = dict(gpus_per_cell=2, cuda_device_count=lambda: 4)
    assert choose_device("cuda:1", assigned=("2", "5"), visible="2,5", **ray_task) == torch.device("cuda", 1)
    assert choose_device("cuda:1", assigned=("2", "5"), visible="1,2,5,7", **ray_task) == torch.device("cuda", 2)
    assert choose_device("cuda", assigned=("3",), visible=None, gpus_per_cell=1,
                         cuda_device_count=lambda: 8) == torch.device("cuda", 3)
    assert choose_device("auto", assigned=(), visible="", gpus_per_cell=0, cuda_device_count=never_asked).type == "cpu"
    with pytest.raises(UserError, match="holds 2 GPU"):
        choose_device("cuda:2", assigned=("2", "5"), visible="2,5", **ray_task)


def test_serial_cells_resolve_auto_from_their_request_and_record_their_device(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # as on a machine with two GPUs
    assert resolve_device("auto", gpus_per_cell=0) == torch.device("cpu")
    assert resolve_device("auto", gpus_per_cell=1) == torch.device("cuda", 0)
    out = tmp_path / "out"
    out.mkdir()
    empty_mlflow_store(out)
    config = config_from_dict(tiny_config_dict(out, dataset, serial=True))
    config.resources.device, config.resources.deterministic = "auto", True
    run_benchmark(config)
    for cell in sorted(out.glob("folder-data/*/cell.json")):
        record = json.loads(cell.read_text())
        assert record["device"] == "cpu" and record["gpu_ids"] == [] and record["deterministic"] is True
        assert record["gpu_memory_fraction"] is None and record["gpu_name"] is None
        assert "tf32" not in record and "cell.tf32" not in cell_params(record)  # no TF32 on a CPU
    assert len(list(out.glob("folder-data/*/cell.json"))) == 2
    assert not torch.are_deterministic_algorithms_enabled()  # the cells' settings ended with them


# ------------------------------------------------------------------------------------ settings
def test_deterministic_settings_hold_for_the_cell_and_are_undone_after(monkeypatch):
    monkeypatch.delenv(CUBLAS_WORKSPACE, raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ[CUBLAS_WORKSPACE] == DETERMINISTIC_CUBLAS_WORKSPACE
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before
    assert CUBLAS_WORKSPACE not in os.environ
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()


def precision_settings() -> list[str]:
    backends = torch.backends
    return [s.fp32_precision for s in (backends, backends.cuda.matmul, backends.cudnn, backends.cudnn.conv,
                                       backends.cudnn.rnn)]


def legacy_flags() -> list:
    """torch's legacy TF32 flags as a reader sees them: a value, or the error torch raises."""
    read = []
    for flag in (lambda: torch.backends.cuda.matmul.allow_tf32, lambda: torch.backends.cudnn.allow_tf32):
        try:
            read.append(flag())
        except RuntimeError as exc:
            read.append(f"raises: {str(exc)[:40]}")
    return read


@pytest.fixture
def original_precision_settings():
    original = precision_settings()
    matmul_precision = torch.get_float32_matmul_precision()
    yield original
    for setting, value in zip((torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn,
                               torch.backends.cudnn.conv, torch.backends.cudnn.rnn), original):
        setting.fp32_precision = value
    torch.set_float32_matmul_precision(matmul_precision)


def test_metric_networks_run_without_tf32_on_cuda_and_the_precision_settings_come_back(original_precision_settings):
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # a user who opted in through torch's newer API
    before = precision_settings()
    with full_fp32(torch.device("cuda", 0)):
        assert tf32_state() == "off"
        assert [torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
                torch.backends.cudnn.rnn.fp32_precision] == ["ieee"] * 3
    assert precision_settings() == before
    with full_fp32(torch.device("cpu")):  # no TF32 on the CPU: nothing to change
        assert precision_settings() == before


def test_after_full_fp32_torchs_legacy_tf32_flags_still_read_as_before(original_precision_settings):
    """Turning TF32 off through the legacy flags and restoring through fp32_precision left torch refusing to read
    torch.backends.cudnn.allow_tf32 ("a mix of the legacy and new APIs"); one API leaves the flags as they were."""
    before = legacy_flags()
    assert not any(isinstance(flag, str) for flag in before)  # torch's defaults read fine
    with full_fp32(torch.device("cuda", 0)):
        pass
    assert legacy_flags() == before
    assert torch.backends.cudnn.allow_tf32 in (True, False)  # reading it does not raise


@pytest.mark.parametrize("start", ["torch default", "legacy flags off", "legacy matmul on", "new API conv ieee"])
def test_the_tf32_option_is_applied_and_everything_is_restored(original_precision_settings, start):
    if start == "legacy flags off":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    elif start == "legacy matmul on":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif start == "new API conv ieee":
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    before, flags_before, matmul_before = precision_settings(), legacy_flags(), torch.get_float32_matmul_precision()
    gpu = torch.device("cuda", 0)
    for enabled, state in ((True, "on"), (False, "off")):
        with cuda_tf32(gpu, enabled) as recorded:
            assert recorded == state == tf32_state()
            expected = "tf32" if enabled else "ieee"
            assert [torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
                    torch.backends.cudnn.rnn.fp32_precision] == [expected] * 3
        assert precision_settings() == before and legacy_flags() == flags_before
        assert torch.get_float32_matmul_precision() == matmul_before
    with cuda_tf32(torch.device("cpu"), True) as recorded:  # the CPU has no TF32: nothing changes
        assert recorded is None and precision_settings() == before


def test_the_tf32_option_reads_on_and_off_as_yaml_and_the_command_line_give_them():
    assert tf32_enabled("on") is True and tf32_enabled(True) is True  # YAML reads a bare on as true
    assert tf32_enabled("off") is False and tf32_enabled(False) is False
    with pytest.raises(UserError, match="--tf32 'yes': choose off or on"):
        tf32_enabled("yes")


def test_cuda_cells_fingerprint_and_record_their_tf32_state_and_cpu_cells_keep_their_fingerprints(
        dataset, tmp_path, monkeypatch):
    import bench.run.cell
    from bench.run.cell import CellSpec, cell_fingerprint
    from bench.config import BenchmarkConfig

    spec = CellSpec("tiny_trainer", "faces", 0, "/cells/c", "/manifests/m")

    def fingerprint(**resources) -> str:
        return cell_fingerprint(BenchmarkConfig(resources=ResourceConfig(**resources)), spec)

    # the fingerprint of this CellSpec before --tf32 existed (tests/test_memory_format.py): CPU cells keep it
    assert fingerprint() == fingerprint(tf32="on") == "c289659993d5f2c5"
    assert len({fingerprint(), fingerprint(gpus_per_cell=1.0), fingerprint(gpus_per_cell=1.0, tf32="on")}) == 3

    applied = []

    @contextlib.contextmanager
    def as_on_a_gpu(device, enabled):  # what cuda_tf32 does on a GPU, on this CPU machine
        applied.append(enabled)
        yield "on" if enabled else "off"

    monkeypatch.setattr(bench.run.cell.devices, "cuda_tf32", as_on_a_gpu)
    out = tmp_path / "out"
    out.mkdir()
    empty_mlflow_store(out)
    config = config_from_dict(tiny_config_dict(out, dataset, methods=("tiny_trainer",), serial=True, steps=2))
    config.resources.tf32 = "on"
    run_benchmark(config)
    record = json.loads(next(out.glob("folder-data/*/cell.json")).read_text())
    assert record["tf32"] == "on" and cell_params(record)["cell.tf32"] == "on"
    assert applied.count(True) == 2  # training and inpainting, each through the one setting


def test_a_shared_gpu_is_capped_at_the_cells_share_less_its_cuda_context(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(total_memory=FAKE_GPU_BYTES))
    gpu = torch.device("cuda", 0)
    for device, gpus in ((torch.device("cpu"), 0.5), (gpu, 1.0), (gpu, 2.0)):
        with gpu_memory_cap(device, gpus) as share:
            assert share is None
    assert calls == []
    with gpu_memory_cap(gpu, 0.25) as fraction:
        # two processes at 0.5 each must fit the card with their contexts: 0.5 of it minus one context each
        assert fraction == pytest.approx(0.25 - 0.5 / 16) and calls == [(fraction, gpu)]
    assert calls == [(fraction, gpu), (1.0, gpu)]
    assert 2 * (allocator_fraction(0.5, FAKE_GPU_BYTES, 0.5) * FAKE_GPU_BYTES + CUDA_CONTEXT_RESERVE_BYTES) \
        == FAKE_GPU_BYTES
    with pytest.raises(UserError, match="--gpus-per-cell 0.02: a 0.02 share of this GPU's 16.0 GiB leaves nothing"):
        with gpu_memory_cap(gpu, 0.02):
            pass


# ------------------------------------------------------------------------------------ metric cache
class CountingScorer:
    """Stands in for :class:`bench.metrics.scoring.Scorer` in the ground-truth cache: counts feature batches, and
    keys its features by the device type it claims."""

    def __init__(self, device_type: str):
        self.device_type, self.batches = device_type, 0

    def feature_key(self, device: torch.device) -> dict:
        return {"networks": {"net": "net.pth sha256:0"}, "device": self.device_type, "precision": METRIC_PRECISION}

    def features(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batches += 1
        return {"net": images_u8.float().mean(dim=(2, 3))}


def test_cached_ground_truth_features_are_keyed_by_device_type(dataset, tmp_path, monkeypatch):
    test_set = load_image_set("folder", "test", root=str(dataset), image_size=32)
    manifest = build_manifest(test_set, MaskProtocol(bins=("(0.1,0.2]",)), tmp_path / "manifest")
    cpu = torch.device("cpu")
    first, again, gpu = CountingScorer("cpu"), CountingScorer("cpu"), CountingScorer("cuda")
    computed = _ground_truth_features(manifest, first, 2, cpu)
    assert first.batches > 0
    reused = _ground_truth_features(manifest, again, 2, cpu)
    assert again.batches == 0 and np.array_equal(reused.arrays()["gt/net"], computed.arrays()["gt/net"])
    on_gpu = _ground_truth_features(manifest, gpu, 2, cpu)
    assert gpu.batches > 0  # a CPU run's cache is not mixed into a GPU run's FID
    # nor replaced by it: cells of the CPU key point to their own file, which is still there and unchanged
    assert on_gpu.path != computed.path and computed.path.exists()
    assert np.array_equal(_ground_truth_features(manifest, CountingScorer("cpu"), 2, cpu).arrays()["gt/net"],
                          computed.arrays()["gt/net"])

    import bench.metrics.scoring
    from bench.errors import WeightsUnavailable

    def unavailable(*args, **kwargs):
        raise WeightsUnavailable("not needed here")

    for builder in ("lpips_metric", "lite0_distance", "inception_fid_extractor", "lite0_extractor"):
        monkeypatch.setattr(bench.metrics.scoring, builder, unavailable)
    scorer = bench.metrics.scoring.Scorer(device=None)
    on_cpu, on_gpu = scorer.feature_key(cpu), scorer.feature_key(torch.device("cuda", 0))
    assert on_cpu["device"] == "cpu" and on_gpu["device"] == "cuda" and on_cpu != on_gpu
    assert on_cpu["precision"] == METRIC_PRECISION and on_cpu["networks"] == scorer.provenance()


# ------------------------------------------------------------------------------------ training
class FakeCudaRandom:
    """A CPU generator behind mocks of torch.cuda's RNG calls: the GPU's default generator on a CPU machine."""

    NEW_PROCESS_SEED = 424242  # where a new process's generator starts (not the config's seed)

    def __init__(self):
        self.generator = torch.Generator()
        self.restart()

    def restart(self) -> None:
        self.generator.manual_seed(self.NEW_PROCESS_SEED)

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.generator.get_state())
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": self.generator.set_state(state))
        monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: self.generator.manual_seed(seed))


class NoisyTrainer(TinyTrainer):
    """tiny_trainer that, like DDNM, draws noise from the GPU's generator in every step."""

    def __init__(self, gpu_random: FakeCudaRandom):
        super().__init__(TinyTrainerConfig())
        self.gpu_random = gpu_random

    def train_step(self, batch):
        noise = torch.randn(batch["image"].shape, generator=self.gpu_random.generator)
        return super().train_step({**batch, "image": (batch["image"] + 0.1 * noise).clamp(0, 1)})


def test_a_resumed_gpu_training_restores_the_cuda_rng_state(dataset, tmp_path, monkeypatch):
    gpu_random = FakeCudaRandom()
    gpu_random.install(monkeypatch)
    gpu = torch.device("cuda", 0)
    # The method computes on the CPU; its checkpoints take the path of a run on ``gpu``.
    monkeypatch.setattr(bench.run.train, "rng_states", lambda device: rng_states(gpu))
    monkeypatch.setattr(bench.run.train, "restore_rng_states",
                        lambda states, device, source: restore_rng_states(states, gpu, source))
    images = load_image_set("folder", "train", root=str(dataset), image_size=32)

    def trainer() -> NoisyTrainer:
        torch.manual_seed(0)
        return NoisyTrainer(gpu_random)

    def weights(method) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in method.parameters()])

    full = trainer()
    full_history = train(full, images, TrainConfig(steps=6, batch_size=2, checkpoint_every=2), progress=False).history
    checkpoint = tmp_path / "train_state.pt"
    train(trainer(), images, TrainConfig(steps=3, batch_size=2, checkpoint_every=2), checkpoint_path=checkpoint,
          progress=False)
    saved = torch.load(checkpoint, weights_only=True)
    assert torch.equal(saved["cuda_rng"], gpu_random.generator.get_state())  # the state after step 3

    gpu_random.restart()  # a new process: its GPU generator is not where the interrupted run left it
    resumed = trainer()
    result = train(resumed, images, TrainConfig(steps=6, batch_size=2, checkpoint_every=2),
                   checkpoint_path=checkpoint, progress=False)
    assert result.resumed_from == 3
    assert result.history == full_history and torch.equal(weights(resumed), weights(full))

    # Without the GPU state the resumed noise differs, and such a checkpoint is refused on a GPU.
    gpu_random.restart()
    monkeypatch.setattr(bench.run.train, "restore_rng_states", restore_rng_states)
    train(trainer(), images, TrainConfig(steps=3, batch_size=2, checkpoint_every=2), checkpoint_path=tmp_path / "b.pt",
          progress=False)
    gpu_random.restart()
    other = train(trainer(), images, TrainConfig(steps=6, batch_size=2), checkpoint_path=tmp_path / "b.pt",
                  progress=False)
    assert other.history[:3] == full_history[:3] and other.history[3:] != full_history[3:]
    with pytest.raises(UserError, match="b.pt holds no CUDA RNG state"):
        restore_rng_states({"torch_rng": torch.get_rng_state()}, gpu, tmp_path / "b.pt")


def test_cpu_training_checkpoints_never_touch_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: never_asked())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a, **k: never_asked())
    states = rng_states(torch.device("cpu"))
    assert set(states) == {"torch_rng"}
    restore_rng_states(states, torch.device("cpu"))


def test_image_cache_keeps_uint8_pixels_within_its_budget_and_returns_the_same_images(dataset):
    images = load_image_set("folder", "train", root=str(dataset), image_size=32)
    per_image = 3 * 32 * 32
    cache = ImageCache(images, budget_bytes=len(images) * per_image)
    first = [cache[i] for i in range(len(images))]
    assert cache.cached_bytes() == len(images) * per_image  # what the budget counts is what it holds
    for index, image in enumerate(first):
        assert image.dtype == torch.float32 and torch.equal(image, to_tensor(images.read(index)))
        assert torch.equal(cache[index], image)  # from the cache: the same values
    over_budget = ImageCache(images, budget_bytes=len(images) * per_image - 1)
    assert torch.equal(over_budget[0], first[0]) and over_budget.cached_bytes() == 0


# ------------------------------------------------------------------------------------ numerics
def test_ctsdg_bce_equals_the_old_formula_on_finite_inputs_and_never_asserts():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        shape = (2, 1, 8 + trial, 9)
        probabilities = torch.rand(shape, generator=generator)
        probabilities.view(-1)[:4] = torch.tensor([0.0, 1.0, 1e-45, 1.0 - 2**-24])  # saturated sigmoids, a denormal
        targets = (torch.rand(shape, generator=generator) > 0.7).float()
        if trial % 2:
            targets = torch.rand(shape, generator=generator)  # soft targets as well
        torch.testing.assert_close(binary_cross_entropy(probabilities, targets),
                                   F.binary_cross_entropy(probabilities, targets), rtol=1e-6, atol=0)
    for p, y in ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0), (1e-45, 1.0)):  # the floored terms, exactly
        single_p, single_y = torch.tensor([p]), torch.tensor([y])
        assert torch.equal(binary_cross_entropy(single_p, single_y), F.binary_cross_entropy(single_p, single_y))

    logits = torch.tensor([-200.0, -3.0, -0.5, 0.0, 0.7, 4.0, 200.0], requires_grad=True)  # ±200: exactly 0 and 1
    targets = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    ours = torch.autograd.grad(binary_cross_entropy(torch.sigmoid(logits), targets), logits)[0]
    old = torch.autograd.grad(F.binary_cross_entropy(torch.sigmoid(logits), targets), logits)[0]
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, old, rtol=1e-5, atol=1e-7)

    broken = torch.tensor([0.3, float("nan")])
    with pytest.raises(RuntimeError):  # the CPU's form of the device assert
        F.binary_cross_entropy(broken, torch.ones(2))
    assert torch.isnan(binary_cross_entropy(broken, torch.ones(2)))  # a NaN loss, which training reports


def test_simple_unet_attention_hands_heads_to_sdpa_and_keeps_its_outputs(monkeypatch):
    torch.manual_seed(0)
    block = AttnBlock(32, 8).eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():  # the 3-D formulation the block used before
        normed = block.norm(x)
        q, k, v = (p(normed).flatten(2).transpose(1, 2) for p in (block.q, block.k, block.v))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 32, 8, 8)
        expected = x + block.proj_out(attended)
    shapes = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: shapes.append(q.shape) or sdpa(q, k, v, **kw))
    with torch.no_grad():
        output = block(x)
    assert shapes == [torch.Size([2, 1, 64, 32])]  # [B, heads, L, d]: what the fused CUDA kernels take
    assert torch.equal(output, expected)


# ------------------------------------------------------------------------------------ fp16: LaMa's R1 penalty
def test_the_r1_penalty_takes_its_gradient_through_the_loss_scale_at_fp16():
    """CPU autocast at fp16 stands in for a GPU's: a discriminator whose input gradients are below fp16's
    smallest subnormal loses the whole penalty unscaled; scaled by the loss scaler it keeps it."""
    from baselines.lama import r1_penalty

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(1e-3)
    reals = torch.rand(2, 3, 8, 8, requires_grad=True)
    exact = r1_penalty(conv(reals) * 1e-5, reals)  # float32: the penalty itself
    with torch.autocast("cpu", dtype=torch.float16):
        unscaled = r1_penalty(conv(reals) * 1e-5, reals)
        scaled = r1_penalty(conv(reals) * 1e-5, reals, torch.amp.GradScaler("cpu", init_scale=2.0 ** 14))
    assert exact > 0 and unscaled == 0  # what fp16 made of the penalty before
    torch.testing.assert_close(scaled, exact, rtol=1e-2, atol=0)


def test_a_lama_fp16_step_whose_r1_gradient_overflows_the_scale_is_skipped_not_reported_as_diverged():
    torch.manual_seed(0)
    method = create_method("lama_tiny")
    method.set_precision("fp16")
    images, masks = torch.rand(1, 3, 32, 32), (torch.rand(1, 1, 32, 32) > 0.6).float()
    with method.autocast():  # the scaler's first scale, 2^16, overflows fp16 for a gradient of 1 a logit
        first = method.discriminator_losses(images, masks, images.flip(-1))
    assert not torch.isfinite(first["discr_adv"])  # what the backward pass takes: the scaler skips the step
    assert torch.isfinite(first["discr_adv_reported"]) and first["discr_r1_overflow"] == 1
    assert first["discr_real_gp"] == 0

    method.grad_scaler.update(new_scale=2.0 ** 8)  # where the scaler's backoff goes after such steps
    with method.autocast():
        second = method.discriminator_losses(images, masks, images.flip(-1))
    method.set_precision("fp32")
    exact = method.discriminator_losses(images, masks, images.flip(-1))
    assert second["discr_r1_overflow"] == 0 and second["discr_real_gp"] > 0
    torch.testing.assert_close(second["discr_real_gp"], exact["discr_real_gp"], rtol=5e-2, atol=0)
    assert "discr_r1_overflow" not in exact  # fp32 reports what it always did
