"""The GPU smoke test's own machinery on a CPU machine: arguments, the budget, exit codes and the summary table,
with a fake CUDA (torch.cuda's queries mocked) and cheap parts in place of the GPU work."""
import os
import threading
import time

import pytest
import torch

from bench.devices import CUBLAS_WORKSPACE, DETERMINISTIC_CUBLAS_WORKSPACE
from bench.methods import available_methods, create_method
from pipelines.benchmarks import gpu_smoke
from pipelines.benchmarks.gpu_smoke import (FAILED, INFO, PASSED, SKIPPED, STOPPED, UNAVAILABLE, Budget, Outcome, Part,
                                            PartUnavailable, exit_code, main, run_parts, summary_table)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def process_environment(monkeypatch):
    """main() sets process-wide variables: each test gets them back as they were."""
    for name in (CUBLAS_WORKSPACE, *gpu_smoke.OFFLINE_ENVIRONMENT):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)


def sleeper(seconds: float, status: str = PASSED, detail: str = ""):
    def run(limit: float):
        time.sleep(seconds)
        return status, detail
    return run


def substitute_parts(monkeypatch, parts: list[Part]) -> None:
    monkeypatch.setattr(gpu_smoke, "build_parts", lambda run, methods: parts)


def test_without_cuda_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--budget-s", "60"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_cublas_workspace_and_offline_mode_are_set_before_any_cuda_work(monkeypatch):
    seen = {}

    def first_cuda_call() -> bool:
        seen.update({name: os.environ.get(name) for name in (CUBLAS_WORKSPACE, "SAHN_BENCH_OFFLINE", "HF_HUB_OFFLINE")})
        return False

    monkeypatch.setattr(torch.cuda, "is_available", first_cuda_call)
    assert main([]) == 0
    assert seen == {CUBLAS_WORKSPACE: DETERMINISTIC_CUBLAS_WORKSPACE, "SAHN_BENCH_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("arguments, message", [
    (["--budget-s", "0"], "--budget-s 0: give a positive number"),
    (["--budget-s", "ten"], "invalid float value"),
    (["--all", "--methods", "ec_tiny"], "not allowed with argument"),
    (["--methods", "no_such_method"], "--methods: unknown no_such_method"),
    (["--device", "cpu"], "tests a CUDA device"),
])
def test_wrong_arguments_are_one_line_and_exit_2(arguments, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(arguments)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_default_is_the_paper_columns_and_the_tiny_variants_and_all_is_everything():
    focused = gpu_smoke.chosen_methods(gpu_smoke.parse_arguments([]))
    assert set(gpu_smoke.paper_columns()) <= set(focused)
    assert gpu_smoke.paper_columns() == ["sahn_paper", "ec", "ctsdg", "spl", "spn", "lama_fourier", "ddnm"]
    assert {"ec_tiny", "lama_tiny", "sahn_tiny", "ddnm_tiny"} <= set(focused)
    assert not {"ddnm_imagenet", "big_lama", "sahn_tiny_no_msf", "biharmonic"} & set(focused)
    assert gpu_smoke.chosen_methods(gpu_smoke.parse_arguments(["--all"])) == available_methods()
    assert gpu_smoke.chosen_methods(gpu_smoke.parse_arguments(["--methods", "ec_tiny"])) == ["ec_tiny"]


def test_a_tiny_budget_with_a_fake_cuda_stops_inside_it_with_the_table_and_exit_2(fake_cuda, monkeypatch, capsys):
    parts = [Part(f"quick {index}", sleeper(0.15), 0.15, 5) for index in range(4)]
    parts.append(Part("hangs", sleeper(30), 0.1, 60))  # cut at the end of the budget
    parts += [Part(f"later {index}", sleeper(0.15), 0.15, 5) for index in range(3)]
    substitute_parts(monkeypatch, parts)
    started = time.monotonic()
    code = main(["--budget-s", "1.5"])
    wall = time.monotonic() - started
    out = capsys.readouterr().out
    assert code == 2 and wall < 1.5 + 0.5  # stopped inside its budget (plus Python's own start of the table)
    table = out[out.index("Summary:"):]
    for index in range(4):
        assert f"| quick {index} | passed |" in table
    assert "| hangs | stopped |" in table and "stopped at the end of the budget" in table
    for index in range(3):
        assert f"| later {index} | skipped |" in table
    assert "incomplete: the budget ran out before every part ran" in table


def test_a_failure_exits_1_and_an_unavailable_part_is_not_a_failure(fake_cuda, monkeypatch, capsys):
    def broken(limit):
        raise RuntimeError("the kernel said no\nand more lines")

    def missing(limit):
        raise PartUnavailable("this GPU has no bf16")

    substitute_parts(monkeypatch, [Part("works", sleeper(0), 0, 5), Part("breaks", broken, 0, 5),
                                   Part("needs bf16", missing, 0, 5), Part("informs", sleeper(0, INFO, "12 ms"), 0, 5)])
    assert main(["--budget-s", "30"]) == 1
    out = capsys.readouterr().out
    assert "| breaks | FAILED | " in out and "RuntimeError: the kernel said no |" in out
    assert "| needs bf16 | unavailable | " in out and "this GPU has no bf16" in out
    assert "1 passed, 1 info, 1 unavailable, 1 FAILED" in out and "GPU smoke test FAILED" in out

    substitute_parts(monkeypatch, [Part("works", sleeper(0), 0, 5), Part("needs bf16", missing, 0, 5)])
    assert main(["--budget-s", "30"]) == 0


def test_a_part_over_its_own_cap_fails_and_the_run_goes_on():
    outcomes = run_parts([Part("slow", sleeper(5), 0.1, 0.3), Part("next", sleeper(0), 0, 5)], Budget(30), [])
    assert [(o.part, o.status) for o in outcomes] == [("slow", FAILED), ("next", PASSED)]
    assert outcomes[0].detail == "over its 0 s cap" and outcomes[0].seconds < 1


def test_exit_codes_and_the_summary_table():
    outcomes = [Outcome("a", PASSED, 1.25, "fine"), Outcome("b | c", SKIPPED, 0.0, "needs about 9 s, 2 s left")]
    assert exit_code(outcomes) == 2
    assert exit_code([*outcomes, Outcome("d", FAILED, 0.5)]) == 1  # a failure outweighs the budget
    assert exit_code([Outcome("a", PASSED, 1), Outcome("u", UNAVAILABLE, 0), Outcome("i", INFO, 0)]) == 0
    assert exit_code([Outcome("s", STOPPED, 3)]) == 2
    assert summary_table(outcomes, 420, 12.4).splitlines() == [
        "| part | verdict | s | detail |", "|---|---|---|---|",
        "| a | passed | 1.2 | fine |", "| b / c | skipped | 0.0 | needs about 9 s, 2 s left |", "",
        "1 passed, 1 skipped; 12 s of a 420 s budget. GPU smoke test incomplete: the budget ran out before every "
        "part ran."]


def test_the_watchdog_prints_what_ran_and_exits_2_when_a_part_never_returns(monkeypatch, capsys):
    exits = []
    exited = threading.Event()
    monkeypatch.setattr(os, "_exit", lambda code: (exits.append(code), exited.set()))
    timer = gpu_smoke.start_watchdog(Budget(0.2), [Outcome("done", PASSED, 0.1)])
    assert exited.wait(5)
    timer.cancel()
    assert exits == [2] and "| done | passed |" in capsys.readouterr().out


def test_a_diffusion_samplers_comparison_allows_for_its_first_steps_gain():
    """DDNM's first step turns the noise estimate into x̂0 through 1/√ᾱ_T: float32 round-off in ε comes out
    about 157 times larger, so the GPU-vs-CPU tolerance of a sampler is scaled by that gain (and fewer steps)."""
    ddnm = create_method("ddnm_tiny")
    assert gpu_smoke.is_sampler(ddnm) and not gpu_smoke.is_sampler(create_method("ec_tiny"))
    assert gpu_smoke.sampler_gain(ddnm) == pytest.approx(157.4, abs=0.5)
    steps = gpu_smoke.comparison_method("ddnm_tiny", torch.device("cpu")).config_dict()["steps"]
    assert steps == gpu_smoke.SAMPLER_STEPS_COMPARED < ddnm.config_dict()["steps"]


def test_the_paper_latencies_are_read_for_the_timed_columns():
    latencies = gpu_smoke.paper_latencies()
    assert {column: latencies[column] for column in gpu_smoke.TIMED_COLUMNS.values()} == {
        "SAHN": 178.0, "LaMa-Fourier": 152.0, "DDNM": 682.0}
    table = gpu_smoke.timing_table({("sahn_paper", "fp32"): 89.0})
    assert "| SAHN (sahn_paper) | 178.0 | 89.0 | 0.50 | - | - |" in table
