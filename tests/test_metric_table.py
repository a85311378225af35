"""The metric table (bench/metrics/table.py) is where every shown metric's facts come from: every metric the harness
computes, a report shows or the search optimises has a row, the rows say what the reports printed before, and a
metric without a row is a clear error wherever it would be shown."""
import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.metrics.aggregate import SET_METRIC_NAMES, summarize
from bench.metrics.table import BY_NAME, METRICS, PER_IMAGE, PER_IMAGE_METRICS, PIXEL_METRICS, SET_LEVEL, \
    UnknownMetric, metric
from bench.metrics.scoring import Scorer
from pipelines.search.options import VALIDATION_METRICS, TuneConfig, check_config
from pipelines.search.results import choose_best
from reports import tables
from reports.sensitivity import sensitivity_figure

ROOT = Path(__file__).resolve().parent.parent


def summary_of_every_metric() -> pd.DataFrame:
    """What bench.metrics.aggregate writes to summary.csv for pairs scored with every metric and every feature extractor."""
    rng = np.random.default_rng(0)
    pairs = 6
    per_image = pd.DataFrame({"ratio": np.linspace(0.05, 0.55, pairs),
                              **{name: rng.random(pairs) for name in PER_IMAGE_METRICS}})
    features = {f"{side}/{extractor}": rng.random((pairs, 4))
                for extractor in SET_METRIC_NAMES for side in ("pred", "gt")}
    return summarize(per_image, features, bins=("All",), kid_subsets=2, kid_subset_size=3)


def test_every_metric_a_summary_holds_has_a_row_of_its_level():
    summary = summary_of_every_metric()
    shown = [name for name in dict.fromkeys(summary["metric"]) if not name.endswith("_std")]  # KID's spread
    assert len(shown) == len(PER_IMAGE_METRICS) + 2 * len(SET_METRIC_NAMES)
    for name in shown:
        expected = PER_IMAGE if name in PER_IMAGE_METRICS else SET_LEVEL
        assert metric(name).level == expected, name
    assert set(BY_NAME) == {name.lower() for name in shown}  # and no row describes a metric nothing computes


def test_every_metric_the_scorer_and_the_search_compute_has_a_row():
    assert Scorer(networks=False).metric_names() == list(PIXEL_METRICS) == ["psnr", "ssim", "mae"]
    assert VALIDATION_METRICS == PIXEL_METRICS
    assert all(metric(name).level == PER_IMAGE and metric(name).from_pixels for name in VALIDATION_METRICS)
    assert TuneConfig().metric in VALIDATION_METRICS


def test_the_rows_say_what_the_reports_and_the_search_showed():
    headers = {m.name: m.header for m in METRICS}
    assert headers == {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "mae": "MAE (×10⁻¹) ↓", "fid": "FID ↓", "kid": "KID ↓",
                       "lpips": "LPIPS ↓", "fd_lite0": "FD-Lite0 ↓ (substitute for FID)",
                       "kid_lite0": "KID-Lite0 ↓ (substitute for KID)",
                       "lite0_dist": "Lite0 distance ↓ (substitute for LPIPS)"}
    assert [(m.digits, m.scale) for m in METRICS] == [(2, 1.0), (3, 1.0), (3, 10.0), (2, 1.0), (4, 1.0), (4, 1.0),
                                                      (3, 1.0), (4, 1.0), (4, 1.0)]
    assert {name: metric(name).mode for name in VALIDATION_METRICS} == {"psnr": "max", "ssim": "max", "mae": "min"}
    labels = [f"validation {metric(name).label_with_unit}, {metric(name).direction}" for name in VALIDATION_METRICS]
    assert labels == ["validation PSNR (dB), higher is better", "validation SSIM, higher is better",
                      "validation MAE, lower is better"]
    assert tables.STYLE is BY_NAME and tables.METRICS is METRICS  # the report tables read the table, no copy


def test_the_tables_bold_the_better_end_the_table_names():
    summary = pd.DataFrame([{"method": method, "paper_name": None, "bin": "All", "metric": name, "value": value,
                             "n": 4} for name in ("psnr", "mae") for method, value in (("a", 1.0), ("b", 2.0))])
    text = tables.to_markdown(tables.dataset_table(summary, bins=("All",)))
    assert "| PSNR (dB) ↑ | All | 1.00 | **2.00** |" in text  # higher is better
    assert "| MAE (×10⁻¹) ↓ | All | **10.000** | 20.000 |" in text  # lower is better, shown in tenths


def test_a_metric_without_a_row_is_a_clear_error(tmp_path):
    with pytest.raises(UnknownMetric, match=r"'psnr_y' is not in the metric table \(bench/metrics/table.py\)"):
        metric("psnr_y")
    assert metric("FID") is BY_NAME["fid"]  # summary.csv's capitals name the same row
    trials = pd.DataFrame({"trial_id": ["t1", "t2"], "status": ["completed"] * 2, "alpha": [0.2, 0.8],
                           "psnr_y": [20.0, 21.0], "error": [""] * 2})
    with pytest.raises(UnknownMetric, match="psnr_y"):
        sensitivity_figure(trials, "psnr_y", tmp_path / "sensitivity")
    with pytest.raises(UnknownMetric, match="psnr_y"):
        choose_best(trials, "psnr_y")
    with pytest.raises(Exception, match="--metric psnr_y: choose one of psnr, ssim, mae"):
        check_config(TuneConfig(metric="psnr_y"))
    assert not list(tmp_path.iterdir())


def test_the_table_sits_low_it_imports_nothing_of_bench_but_its_errors():
    tree = ast.parse((ROOT / "bench" / "metrics" / "table.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {name for name in imported if name.split(".")[0] == "bench"} == {"bench.errors"}
