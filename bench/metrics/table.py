"""Every metric the harness reports, described once: what it is computed over, which way is better, how it is
shown. Reports, the search (``pipelines.tune``) and its sensitivity figure read these facts here, so that a
metric cannot be "higher is better" in one table and "lower is better" in another.

Order matters: :data:`METRICS` is the order of the rows of every results table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from bench.errors import UserError

PER_IMAGE, SET_LEVEL = "per-image", "set-level"
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


class UnknownMetric(UserError):
    """A metric name that has no row in :data:`METRICS`: a new metric must be described before it is shown."""


@dataclass(frozen=True)
class Metric:
    name: str  # the name in per_image.csv and summary.csv (lower case; summary.csv writes set-level names in capitals)
    # per-image: a value per pair, averaged over the pairs of a bin; set-level: one value from the features of all
    # the pairs of a bin (FID, KID), which no pair has alone
    level: Literal["per-image", "set-level"]
    higher_is_better: bool
    label: str  # the name a reader knows it by
    digits: int  # decimals of a shown value (after scaling)
    unit: str = ""  # the unit of the value itself ("dB")
    scale: float = 1.0  # a table shows value × scale (MAE in tenths), so that its decimals are comparable
    note: str = ""  # said beside the header: what an offline substitute stands in for
    from_pixels: bool = False  # computed from the pixels alone (bench.metrics.functional.pixel_metrics), no network

    @property
    def mode(self) -> Literal["max", "min"]:
        """Ray Tune's name of the direction."""
        return "max" if self.higher_is_better else "min"

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    @property
    def label_with_unit(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label

    @property
    def header(self) -> str:
        """A results table's row name: label, unit or scale, the better direction as an arrow, then the note."""
        shown_in = self.unit or _scale_text(self.scale)
        text = f"{self.label} ({shown_in})" if shown_in else self.label
        text += " ↑" if self.higher_is_better else " ↓"
        return f"{text} ({self.note})" if self.note else text

    def shown(self, value: float) -> float:
        return value * self.scale


def _scale_text(scale: float) -> str:
    """``10`` → ``"×10⁻¹"``: what a table's numbers are counted in when it shows value × scale."""
    if scale == 1.0:
        return ""
    exponent = round(-math.log10(scale))
    if 10.0 ** -exponent != scale:
        raise ValueError(f"display scale {scale} is not a power of ten")
    return "×10" + str(exponent).translate(_SUPERSCRIPT)


METRICS: tuple[Metric, ...] = (
    Metric("psnr", PER_IMAGE, True, "PSNR", 2, unit="dB", from_pixels=True),
    Metric("ssim", PER_IMAGE, True, "SSIM", 3, from_pixels=True),
    Metric("mae", PER_IMAGE, False, "MAE", 3, scale=10.0, from_pixels=True),
    Metric("fid", SET_LEVEL, False, "FID", 2),
    Metric("kid", SET_LEVEL, False, "KID", 4),
    Metric("lpips", PER_IMAGE, False, "LPIPS", 4),
    Metric("fd_lite0", SET_LEVEL, False, "FD-Lite0", 3, note="substitute for FID"),
    Metric("kid_lite0", SET_LEVEL, False, "KID-Lite0", 4, note="substitute for KID"),
    Metric("lite0_dist", PER_IMAGE, False, "Lite0 distance", 4, note="substitute for LPIPS"),
)
BY_NAME = {metric.name: metric for metric in METRICS}

#: per-image columns of per_image.csv, in table order
PER_IMAGE_METRICS = tuple(metric.name for metric in METRICS if metric.level == PER_IMAGE)
#: the per-image metrics computed from the pixels alone (``bench.metrics.functional.pixel_metrics``)
PIXEL_METRICS = tuple(metric.name for metric in METRICS if metric.level == PER_IMAGE and metric.from_pixels)


def metric(name: str) -> Metric:
    """The table's row of ``name`` (any case: summary.csv writes ``FID``); a name without a row is an error."""
    found = BY_NAME.get(name.lower())
    if found is None:
        raise UnknownMetric(f"metric {name!r} is not in the metric table (bench/metrics/table.py): describe it there "
                            f"before showing it; known: {', '.join(BY_NAME)}")
    return found
