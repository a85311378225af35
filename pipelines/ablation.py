"""The paper's Table 4: SAHN without the U-Net and without multi-scale semantic fusion, beside the full model.

    python -m pipelines.ablation                       # default preset: tiny variants on `facades`, CPU
    python -m pipelines.ablation --config paper --datasets paris:/data/paris_streetview
    python -m pipelines.ablation --steps 400 --seeds 0 1 2

An ablation run is a benchmark (the same frozen manifest, training, evaluation, Ray/MLflow machinery and
resume as ``python -m pipelines.full_benchmark``) of three variants, scored on hole ratios (0.5,0.6]
only, as the paper (50–60% irregular masks on Paris StreetView):

  sahn_tiny            the full model                                  (paper column "SAHN")
  sahn_tiny_no_unet    ``use_unet=False``: no skips from E_s to the prior pyramid   ("SAHN w/o U-Net")
  sahn_tiny_no_msf     ``use_msf=False``: one semantic scale modulates every MSF scale
                                                                       ("SAHN w/o multi-scale semantic fusion")
and ``sahn_paper``, ``sahn_paper_no_unet``, ``sahn_paper_no_msf`` at the paper's size (``--config paper``).

The discriminator's two readings of its targets (sahn/README.md) run side by side with
``python -m pipelines.ablation --config d_target``: ``sahn_tiny`` (mask-guided: patches of the restored
image without hole pixels are real) beside ``sahn_tiny_d_image`` (every patch of the restored image is
fake), on all six hole-ratio bins; ``sahn_paper_d_image`` is the second reading at the paper's size. Name
them with ``--methods`` to put them into any ablation run.

Results go to their own folder (default ``results-ablation``, beside the benchmark's ``results``): the
full model there is trained and scored on other pairs than the benchmark's, so the two must not mix in
one table. The report of that folder holds Table 4, the paper's Table 4 beside it, and paired-bootstrap
intervals of each variant against the full model; ``python -m reports.build --from results`` picks the
sibling folder up for its own Table 4 section.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from bench.cli import parse_config, run_main
from bench.config import BenchmarkConfig
from bench.errors import UserError
from reports.paper_compare import ABLATION_BIN

PRESETS = Path(__file__).parent / "presets" / "ablation"

#: the full model and its two ablations per scale; the ablated variants are entry points of scale
#: "ablation" (sahn/model.py), so the benchmark presets never pick them up by themselves
VARIANTS = {
    "tiny": ("sahn_tiny", "sahn_tiny_no_unet", "sahn_tiny_no_msf"),
    "paper": ("sahn_paper", "sahn_paper_no_unet", "sahn_paper_no_msf"),
}


#: SAHN with each reading of the discriminator's targets: mask-guided (the default) and every patch fake
D_READINGS = {
    "tiny": ("sahn_tiny", "sahn_tiny_d_image"),
    "paper": ("sahn_paper", "sahn_paper_d_image"),
}
#: what a variant's name ends with when it differs from the full model
VARIED = ("_no_unet", "_no_msf", "_d_image")


def ablation_methods(scale: str) -> list[str]:
    return list(VARIANTS[scale])


def ablation_config(config: BenchmarkConfig) -> BenchmarkConfig:
    """The full model and its two ablations at the config's scale when no methods are named."""
    return dataclasses.replace(config, methods=list(config.methods) or ablation_methods(config.scale))


def run_ablation(config: BenchmarkConfig) -> Path:
    """Run the ablation as a benchmark; returns the report path."""
    from pipelines.full_benchmark import run_benchmark

    config = ablation_config(config)
    if config.masks.bins != [ABLATION_BIN]:
        print(f"note: scoring on {config.masks.bins}, the paper's Table 4 uses {ABLATION_BIN} only", file=sys.stderr)
    if not any(name.endswith(VARIED) for name in config.methods):
        choices = dict.fromkeys(n for table in (VARIANTS, D_READINGS) for names in table.values() for n in names)
        raise UserError(f"--methods {' '.join(config.methods)}: no ablated variant; choose from {', '.join(choices)}")
    return run_benchmark(config)


def main(argv: Sequence[str] | None = None) -> Path:
    return run_ablation(parse_config(BenchmarkConfig, argv, presets=PRESETS, default_preset="default",
                                     description=__doc__))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
