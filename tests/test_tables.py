import math

import pandas as pd

from reports.tables import PAPER_BINS, dataset_table, latex_escape, to_latex, to_markdown


def summary_frame():
    rows = []
    for method, paper, psnr, mae in [("sahn_tiny", "SAHN", 30.0, 0.02), ("biharmonic", None, 28.0, 0.03)]:
        for label, n in [("(0.2,0.4]", 5), ("(0.4,0.6]", 4), ("All", 12)]:
            rows.append({"method": method, "paper_name": paper, "bin": label, "metric": "psnr", "value": psnr, "n": n})
            rows.append({"method": method, "paper_name": paper, "bin": label, "metric": "MAE", "value": mae, "n": n})
    return pd.DataFrame(rows)


def test_table_layout_scales_mae_and_counts_pairs():
    table = dataset_table(summary_frame(), PAPER_BINS)
    assert list(table.columns) == ["sahn_tiny (SAHN)", "biharmonic"]
    assert table.loc[("PSNR (dB) ↑", "All"), "sahn_tiny (SAHN)"] == 30.0
    assert math.isclose(table.loc[("MAE (×10⁻¹) ↓", "All"), "biharmonic"], 0.3)  # printed ×10⁻¹ like the paper
    assert table.loc[("N (pairs)", "(0.4,0.6]"), "biharmonic"] == 4


def test_markdown_bolds_the_best_value_in_the_right_direction():
    text = to_markdown(dataset_table(summary_frame(), PAPER_BINS))
    psnr_row = next(line for line in text.splitlines() if line.startswith("| PSNR (dB) ↑ | All"))
    mae_row = next(line for line in text.splitlines() if line.startswith("| MAE (×10⁻¹) ↓ | All"))
    assert "**30.00**" in psnr_row and "**28.00**" not in psnr_row
    assert "**0.200**" in mae_row  # lower MAE is better


def test_latex_is_escaped_and_balanced():
    assert latex_escape("sahn_tiny & 50% #1 ~x^2") == r"sahn\_tiny \& 50\% \#1 \textasciitilde{}x\textasciicircum{}2"
    assert latex_escape("MAE (×10⁻¹) ↓") == r"MAE ($\times$10$^{-1}$) $\downarrow$"
    tex = to_latex(dataset_table(summary_frame(), PAPER_BINS), "Results on faces_1", "tab:faces_1")
    assert r"\toprule" in tex and r"\bottomrule" in tex and "sahn\\_tiny (SAHN)" in tex
    assert tex.count("{") == tex.count("}")
    body = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert all(line.count("&") == 3 for line in body)  # Metric, Bin and two methods on every row
