"""How well ``--plan`` foretells a run: plan a small real benchmark, run it, print predicted ÷ actual per stage.

    python -m pipelines.benchmarks.plan_accuracy [--out DIR] [-- extra full_benchmark flags]

By default: 2 trainable tiny methods (ec_tiny, lama_tiny) × 2 embedded suites (faces, scenes), 25 test images ×
6 bins = 150 pairs per dataset (300 per method), 20 training steps, one cell at a time (``--serial``: the plan's
wall time is then the sum of its cells, and nothing but the run competes with the cells for the CPUs). Stages:
  training    the plan's training seconds (setup + steps × seconds per step) vs the cells' ``train_seconds``;
  evaluation  the plan's pairs × (inpaint + harness) + summary vs the cells' ``eval_seconds``;
  disk        the plan's bytes vs every byte the run added under ``--out`` but MLflow's database (the plan does
              not estimate it; its size is printed below the table);
  total       the plan's wall time vs the run's, from its start to its report (MLflow logging and the report
              included: the plan does not estimate them, so they show here as a miss).
The machine's load average is printed before and after: on a shared machine the timings move with it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.cli import run_main

DEFAULTS = ["--methods", "ec_tiny", "lama_tiny", "--datasets", "faces", "scenes", "--test-limit", "25",
            "--steps", "20", "--serial", "true", "--save-images", "all"]


def folder_bytes(root: Path) -> dict[Path, int]:
    return {path: path.stat().st_size for path in root.rglob("*") if path.is_file()}


def ratio(predicted: float, actual: float) -> str:
    return f"{predicted / actual:.2f}" if actual > 0 else "-"


def main(argv: list[str] | None = None) -> None:
    from pipelines import full_benchmark

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="results folder (default: a temporary one, removed after)")
    parser.add_argument("extra", nargs="*", help="full_benchmark flags after --, replacing the defaults' values")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="plan-accuracy-"))
    if out.exists() and any(out.iterdir()) and args.out:
        raise SystemExit(f"error: {out} is not empty: a run there would skip finished cells")
    flags = [*DEFAULTS, *args.extra, "--out", str(out)]
    load_before = os.getloadavg()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)} ({os.cpu_count()} CPUs)", flush=True)
    try:
        started = time.perf_counter()
        full_benchmark.main([*flags, "--plan", "true"])
        plan_seconds = time.perf_counter() - started
        figures = json.loads((out / "plan.json").read_text())
        before = folder_bytes(out)
        started = time.perf_counter()
        full_benchmark.main(flags)
        run_seconds = time.perf_counter() - started
        after = folder_bytes(out)
        cells = [json.loads(path.read_text()) for path in out.rglob("cell.json")]
        written = {path: size - before.get(path, 0) for path, size in after.items()}
        database = sum(size for path, size in written.items() if path.name.startswith("mlflow.db"))
        actual = {"training": sum(c.get("train_seconds") or 0 for c in cells),
                  "evaluation": sum(c.get("eval_seconds") or 0 for c in cells),
                  "disk": sum(written.values()) - database, "total": run_seconds}
        predicted = {"training": figures["train_seconds"], "evaluation": figures["eval_seconds"],
                     "disk": figures["disk_bytes"], "total": figures["wall_seconds"]}
        load_after = os.getloadavg()
        print()
        print(f"plan_accuracy: {len(cells)} cells, {sum(c['pairs'] for c in cells):,} pairs evaluated; the plan took "
              f"{plan_seconds:.0f} s")
        print(f"{'stage':<11} {'predicted':>12} {'actual':>12} {'pred/actual':>11}")
        for stage in ("training", "evaluation", "disk", "total"):
            unit = (lambda x: f"{x / 1e6:.2f} MB") if stage == "disk" else (lambda x: f"{x:.1f} s")
            print(f"{stage:<11} {unit(predicted[stage]):>12} {unit(actual[stage]):>12} "
                  f"{ratio(predicted[stage], actual[stage]):>11}")
        print(f"not predicted: MLflow's database {database / 1e6:.2f} MB")
        per_cell = {c["cell"]: c for c in figures["cells"]}
        print(f"{'cell':<28} {'train pred/act':>14} {'eval pred/act':>13}")
        for record in sorted(cells, key=lambda c: (c["dataset"], c["method"])):
            key = next(k for k in per_cell if k.startswith(f"{record['dataset']}/{record['method']}"))
            print(f"{key:<28} {ratio(per_cell[key]['train_seconds'], record['train_seconds'] or 0):>14} "
                  f"{ratio(per_cell[key]['eval_seconds'], record['eval_seconds']):>13}")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
