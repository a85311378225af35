"""Efficiency measurement (bench.run.profiling, pipelines.efficiency) on the CPU with tiny networks: every figure
is finite and positive, FLOPs match a hand count, step scaling multiplies what it should."""
import concurrent.futures
import json
import math
import multiprocessing
import statistics
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from torch import nn

from bench import methods

from bench.run import profiling
from bench.methods import InpaintingMethod, apply_overrides, register_method, variant
from pipelines.efficiency import EfficiencyConfig, measure_method, run_efficiency

WORKSPACE_FLOATS = 16 * 2**20  # 64 MB: above glibc's largest mmap threshold, so always fresh pages


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))


# ------------------------------------------------------------------------------------------ bench.run.profiling
def test_latency_times_each_repeat_after_the_warmup_calls():
    net, x = tiny_net(), torch.rand(1, 3, 32, 32)
    calls = []

    def run():
        calls.append(1)
        with torch.no_grad():
            net(x)

    latency = profiling.measure_latency(run, device=x.device, warmup=2, repeats=3)
    assert len(calls) == 5 and len(latency.runs_ms) == 3
    assert all(math.isfinite(v) and v > 0 for v in latency.runs_ms)
    assert latency.median_ms == statistics.median(latency.runs_ms)
    with pytest.raises(ValueError):
        profiling.measure_latency(run, device=x.device, repeats=0)


def in_fresh_process(function, *args):
    """``function(*args)`` in a spawned interpreter. A process's peak RSS only grows, and pytest's has grown
    through every earlier test, so memory figures are taken where ``pipelines.efficiency`` takes them."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def peak_of_a_workspace(sampled: bool) -> tuple[float, float, str]:
    def allocate():
        workspace = torch.ones(WORKSPACE_FLOATS)  # written, so every page is resident
        return float(workspace[-1])

    if sampled:
        memory = profiling._peak_rss_sampled(allocate)
    else:
        memory = profiling.measure_peak_memory(allocate, device=torch.device("cpu"))
    return memory.value, memory.megabytes, memory.kind


def test_peak_memory_sees_what_the_call_allocates_and_passes_its_result_on():
    value, megabytes, kind = in_fresh_process(peak_of_a_workspace, False)
    assert value == 1.0
    assert math.isfinite(megabytes) and megabytes >= 0.9 * WORKSPACE_FLOATS * 4 / 1e6
    assert "RSS" in kind


def test_sampled_peak_memory_fallback_also_sees_the_allocation():
    value, megabytes, kind = in_fresh_process(peak_of_a_workspace, True)
    assert value == 1.0 and "sampled" in kind
    assert megabytes >= 0.5 * WORKSPACE_FLOATS * 4 / 1e6  # sampling may miss the last pages, not all


def test_flops_match_the_hand_count_of_a_convolution_and_a_linear_layer():
    conv, linear = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(20, 10)
    x, v = torch.rand(2, 3, 16, 16), torch.rand(4, 20)
    conv_macs = 2 * 8 * 16 * 16 * 3 * 3 * 3  # batch × out channels × output pixels × (in channels × 3 × 3)
    linear_macs = 4 * 20 * 10
    assert profiling.count_flops(lambda: conv(x)) == 2 * conv_macs
    assert profiling.count_flops(lambda: linear(v)) == 2 * linear_macs


def test_checkpoint_size_covers_the_float32_weights():
    method = TinyMethod(TinyConfig())
    size = profiling.checkpoint_size_mb(method)
    weights_mb = sum(p.numel() for p in method.parameters()) * 4 / 1e6
    assert weights_mb <= size < weights_mb + 0.1  # weights plus a small pickle header


def test_device_name_names_the_processor():
    name = profiling.device_name(torch.device("cpu"))
    assert "cpu" in name and "threads" in name


# ------------------------------------------------------------------------------------------ the pipeline
@dataclass
class TinyConfig:
    channels: int = 8
    steps: int = 4  # a sampler-like loop: inpaint runs the network this many times
    workspace: bool = True


class TinyMethod(InpaintingMethod):
    """A two-convolution inpainter whose inference also fills a 64 MB workspace, so its peak memory
    must show at least that."""

    paper_name = "SAHN"

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.net = nn.Sequential(nn.Conv2d(4, config.channels, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(config.channels, 3, 3, padding=1))

    def inpaint(self, images, masks):
        if self.config.workspace:
            torch.ones(WORKSPACE_FLOATS, device=images.device)
        out = images
        for _ in range(self.config.steps):
            out = torch.sigmoid(self.net(torch.cat([out * (1 - masks), masks], dim=1)))
        return out


@variant(scale="tiny", paper_name="SAHN")
def tiny_profiled(**overrides) -> TinyMethod:
    return TinyMethod(apply_overrides(TinyConfig(), overrides))


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    # A registry copy for this test only: the tiny method must not join other tests' method lists.
    monkeypatch.setattr(methods, "_LOCAL", dict(methods._LOCAL))
    register_method("tiny_profiled", tiny_profiled)


def small_config(tmp_path, **changes) -> EfficiencyConfig:
    values = dict(out=str(tmp_path / "efficiency"), methods=["tiny_profiled"], image_size=32, repeats=2,
                  throughput_batch=2, throughput_warmup=0, isolate=False, device="cpu")
    values.update(changes)
    return EfficiencyConfig(**values)


def measure_tiny_method(config: EfficiencyConfig) -> dict:
    register_method("tiny_profiled", tiny_profiled)  # this runs in a fresh process: register there too
    return measure_method(config, "tiny_profiled")


def test_every_figure_measured_on_cpu_is_finite_and_positive(tmp_path):
    row = in_fresh_process(measure_tiny_method, small_config(tmp_path))
    for key in ("params_M", "checkpoint_MB", "latency_ms", "peak_memory_MB", "gflops_per_image", "throughput_img_s"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["peak_memory_MB"] >= 0.9 * WORKSPACE_FLOATS * 4 / 1e6
    assert row["device"] == "cpu" and "cpu" in row["device_name"]
    expected_params = sum(json.loads(row["params_by_network"]).values())
    assert row["params_M"] == pytest.approx(expected_params / 1e6)
    assert row["latency_ms"] == row["latency_measured_ms"]  # nothing scaled
    assert row["latency_ms"] == pytest.approx(statistics.median(json.loads(row["latency_runs_ms"])), abs=1e-3)


def test_step_scaling_measures_fewer_steps_and_scales_time_and_flops(tmp_path):
    full = measure_method(small_config(tmp_path, method_options={"tiny_profiled": {"workspace": False}}),
                          "tiny_profiled")
    scaled = measure_method(small_config(tmp_path, method_options={"tiny_profiled": {"workspace": False}},
                                         step_scaling={"tiny_profiled": {"option": "steps", "measure": 1}}),
                            "tiny_profiled")
    assert scaled["scaled"] == "steps=1 measured, ×4 to steps=4"
    assert scaled["gflops_per_image"] == pytest.approx(full["gflops_per_image"])  # 4 × one step = four steps
    assert scaled["latency_ms"] == pytest.approx(4 * scaled["latency_measured_ms"])
    assert scaled["latency_measured_ms"] == pytest.approx(statistics.median(json.loads(scaled["latency_runs_ms"])),
                                                          abs=1e-3)  # the runs are stored to the microsecond


def test_run_writes_one_row_per_method_with_the_device_and_a_report(tmp_path):
    csv_path = run_efficiency(small_config(tmp_path, methods=["tiny_profiled", "biharmonic"], repeats=1,
                                           throughput_batch=0))
    frame = pd.read_csv(csv_path)
    assert list(frame["method"]) == ["tiny_profiled", "biharmonic"]
    assert frame["device_name"].str.contains("cpu").all()
    report = (csv_path.parent / "efficiency.md").read_text()
    assert "RTX 4090" in report and "tiny_profiled" in report


def test_bad_step_scaling_is_a_user_error(tmp_path):
    from bench.errors import UserError

    with pytest.raises(UserError, match="step_scaling.tiny_profiled"):
        run_efficiency(small_config(tmp_path, step_scaling={"tiny_profiled": {"option": "steps"}}))


def test_published_weights_are_measured_as_loaded(tmp_path):
    """A checkpoint decides the network measured: a 16-channel file is measured at 16 channels although the
    variant's default is 8, and the row names the file and its sha256."""
    from bench.weights import checkpoint_sha256

    checkpoint = tmp_path / "released.pt"
    methods.create_method("tiny_profiled", channels=16).save(checkpoint)
    default = measure_method(small_config(tmp_path, throughput_batch=0), "tiny_profiled")
    csv_path = run_efficiency(small_config(tmp_path, repeats=1, throughput_batch=0,
                                           weights={"tiny_profiled": {"celeba": str(checkpoint)}}))
    row = pd.read_csv(csv_path).iloc[0]
    loaded = methods.create_method("tiny_profiled").load(checkpoint)
    assert row["params_M"] == pytest.approx(sum(loaded.num_parameters().values()) / 1e6)
    assert row["params_M"] > default["params_M"]
    assert row["weights"] == str(checkpoint) and row["weights_sha256"] == checkpoint_sha256(checkpoint)


def test_a_bad_checkpoint_stops_the_efficiency_run_before_any_measurement(tmp_path):
    from bench.errors import UserError

    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="broken.pt"):
        run_efficiency(small_config(tmp_path, weights={"tiny_profiled": str(broken)}))
    assert not (tmp_path / "efficiency" / "efficiency.csv").exists()
