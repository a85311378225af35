"""The compiled pixel-metric backend from the config to the results: chosen by ``compile_metrics``,
recorded in every cell and the report, part of the cell's fingerprint, scoring like the eager path."""
import dataclasses
import json

import pandas as pd
import pytest

from pipelines.full_benchmark import run_benchmark
from tiny_methods import config_from_dict, tiny_config_dict, write_folder_dataset

pytestmark = pytest.mark.timeout(300)


def test_compile_metrics_is_recorded_per_cell_and_scores_like_the_eager_path(tmp_path):
    dataset = write_folder_dataset(tmp_path / "data", train=1, test=3)
    per_image, records = {}, {}
    for compiled in (False, True):
        out = tmp_path / f"compiled-{compiled}"
        config = config_from_dict(tiny_config_dict(out, dataset, methods=("diffusion_fill",), serial=True))
        run_benchmark(dataclasses.replace(config, compile_metrics=compiled))
        cell = out / "folder-data" / "diffusion_fill"
        records[compiled] = json.loads((cell / "cell.json").read_text())
        per_image[compiled] = pd.read_csv(cell / "per_image.csv")
        backend = "compiled" if compiled else "eager"
        assert f"Pixel-metric backend (PSNR, SSIM, MAE): {backend}." in (out / "report.md").read_text()
    assert records[False]["pixel_metrics"] == "eager" and records[True]["pixel_metrics"] == "compiled"
    assert records[False]["fingerprint"] != records[True]["fingerprint"]
    eager, compiled = per_image[False], per_image[True]
    assert len(eager) == len(compiled) == 6  # three test images in two bins
    assert eager["image"].map(lambda p: p.split("/")[-1]).equals(compiled["image"].map(lambda p: p.split("/")[-1]))
    assert (eager[["psnr", "mae"]] == compiled[["psnr", "mae"]]).all().all()  # exact sums on both paths
    assert (eager["ssim"] - compiled["ssim"]).abs().max() <= 1e-5
    assert (eager["ssim"] < 1).all()

