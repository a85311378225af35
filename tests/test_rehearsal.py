"""The paper-scale rehearsal script runs end to end at a tiny size and reports every stage with numbers.

It runs the real pipeline through a local Ray cluster, so it costs a Ray start (tens of seconds on two loaded
cores); the stand-ins it installs in the workers must be what scored the cell (the report's provenance says so).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("manifest", "evaluation: ground truth", "evaluation: shards", "merge", "summarise",
          "finish: cell.json, tidy", "report")
ROW = re.compile(r"^(?P<stage>[a-z].*?)\s+(?P<seconds>\d+\.\d\d)\s+(?P<peak>\d+)\s+(?P<private>\d+)\s+(?P<max>\d+)\s+(?P<bytes>[\d,]+)\s+"
                 r"(?P<per_pair>\d+\.\d)\s+(?P<where>.+)$")


def rehearse(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAHN_BENCH_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "pipelines.benchmarks.paper_scale_rehearsal", "--images", "60",
                           "--mask-files", "60", "--cpus", "2", "--out", str(tmp_path / "work"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def stage_rows(stdout: str) -> dict[str, dict[str, str]]:
    return {match["stage"]: match.groupdict() for match in map(ROW.match, stdout.splitlines()) if match}


def test_the_rehearsal_runs_the_pipeline_and_prints_every_stage_with_numbers(tmp_path):
    done = rehearse(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "60 test images × 6 bins = 360 pairs" in out
    rows = stage_rows(out)
    assert list(rows) == list(STAGES), out
    for stage, row in rows.items():
        assert int(row["peak"]) > 0 and int(row["max"]) > 0, row  # sampled RSS and ru_maxrss differ by a page or so
        assert 0 < int(row["private"]) <= int(row["peak"]), row  # the anonymous part of the resident memory
    assert float(rows["evaluation: shards"]["seconds"]) > 0 and float(rows["summarise"]["seconds"]) > 0
    written = {stage: int(row["bytes"].replace(",", "")) for stage, row in rows.items()}
    assert all(written[stage] > 0 for stage in STAGES), written  # each stage leaves files
    per_pair = {stage: float(row["per_pair"]) for stage, row in rows.items()}
    assert per_pair["evaluation: shards"] == pytest.approx(written["evaluation: shards"] / 360, abs=0.06)
    # float32 features of 2,048 dimensions: a shard and the merged cell hold at least 8 KB a pair
    assert per_pair["evaluation: shards"] > 8192 and per_pair["merge"] > 8192
    # where each stage ran: the driver builds the manifest and the report, Ray's workers the rest
    assert rows["manifest"]["where"] == rows["report"]["where"] == "driver"
    assert rows["evaluation: shards"]["where"] == "2 Ray tasks"
    assert rows["merge"]["where"] == rows["summarise"]["where"] == rows["finish: cell.json, tidy"]["where"] == "Ray task"
    # the finishing task has a worker process of its own: none of the evaluation's workers is reused for it
    records = [json.loads(line) for line in (tmp_path / "work" / "stages.jsonl").read_text().splitlines()]
    evaluating = {r["pid"] for r in records if r["stage"] in ("evaluation", "ground truth")}
    finishing = {r["pid"] for r in records if r["stage"] in ("merge", "summarise", "finish")}
    assert len(finishing) == 1 and not finishing & evaluating, records
    assert "kept on disk" in out and "STAND-INS" in out
    assert re.search(r"--plan's estimate of this summary: [0-9.]+ s, measured [0-9.]+ s \(predicted / actual [0-9.]+\)", out)
    # the stand-ins scored the cell in the workers, and the report says what they are
    report = (tmp_path / "work" / "results" / "report.md").read_text()
    assert "STAND-IN (not a metric)" in report and "STAND-IN stub of lpips" in report
    assert "stand_in_input_returned" in report and "inpaint returns its input" in report
